/* AES-256-GCM over a run of content blocks in one call, with the GIL released.
 *
 * The per-call cost of a Python AEAD call (a fresh cipher context, argument parsing) is
 * larger than the cipher work on one 4 KiB block; here one OpenSSL context serves a whole
 * run, and cffi releases the GIL around the call. A long run to open is shared with a
 * helper thread, so that it decrypts on two CPUs (pfs_gcm_open_run_shared, below).
 * A context (pfs_gcm_new) holds one key's schedule and serves one run at a time.
 * The layout is the one of piccolofs.format.content:
 *
 *   block k = nonce(nonce_len) | ciphertext(n <= 4096) | tag(16),
 *   aad     = uint64_be(first_block + k) | file id(16)
 *
 * A full-size block of zero bytes is a hole and opens as 4096 zero bytes.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>

#include "gcm_runs.h"

#define PLAIN_BLOCK 4096
#define TAG_LEN 16
#define FILE_ID_LEN 16
#define AAD_LEN (8 + FILE_ID_LEN)

static int all_zero(const unsigned char *p, size_t n)
{
    unsigned char acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

static void put_aad(unsigned char *aad, uint64_t block_no)
{
    for (int i = 0; i < 8; i++)
        aad[i] = (unsigned char)(block_no >> (56 - 8 * i));
}

EVP_CIPHER_CTX *pfs_gcm_new(const unsigned char *key, int nonce_len)
{
    /* The key schedule is made once per context; a run only sets each block's nonce. */
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, 0) != 1
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, nonce_len, NULL) != 1
        || EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, 0) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

void pfs_gcm_free(EVP_CIPHER_CTX *ctx)
{
    EVP_CIPHER_CTX_free(ctx);
}

long pfs_gcm_open_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                      const unsigned char *ct, size_t ct_len, uint64_t first_block,
                      const unsigned char *file_id, unsigned char *out, int *reason)
{
    const size_t cipher_block = (size_t)nonce_len + PLAIN_BLOCK + TAG_LEN;
    unsigned char aad[AAD_LEN];
    long k = 0;

    *reason = PFS_OK;
    memcpy(aad + 8, file_id, FILE_ID_LEN);
    for (size_t off = 0; off < ct_len; off += cipher_block, k++) {
        const size_t n = ct_len - off < cipher_block ? ct_len - off : cipher_block;
        const unsigned char *b = ct + off;
        unsigned char *o = out + (size_t)k * PLAIN_BLOCK;
        int body, len = 0, fin = 0;

        if (n <= (size_t)nonce_len + TAG_LEN) {
            *reason = PFS_TOO_SHORT;
            break;
        }
        body = (int)(n - (size_t)nonce_len - TAG_LEN);
        if (all_zero(b, (size_t)nonce_len)) {
            if (n == cipher_block && all_zero(b, n)) {
                memset(o, 0, PLAIN_BLOCK);  /* a hole */
                continue;
            }
            *reason = PFS_ZERO_NONCE;
            break;
        }
        put_aad(aad, first_block + (uint64_t)k);
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, b, 0) != 1
            || EVP_DecryptUpdate(ctx, NULL, &len, aad, AAD_LEN) != 1
            || EVP_DecryptUpdate(ctx, o, &len, b + nonce_len, body) != 1
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
                                   (void *)(b + nonce_len + body)) != 1
            || EVP_DecryptFinal_ex(ctx, o + len, &fin) != 1) {
            *reason = PFS_BAD_TAG;
            break;
        }
    }
    return *reason == PFS_OK ? -1 : k;
}

/* -- a second CPU for long runs ------------------------------------------------------
 *
 * A mount answers one request at a time, so a long read would decrypt on one CPU while
 * the other idles. One helper thread per process opens chunks of a long run beside the
 * caller: both take chunks from one counter, so the caller never waits for a helper that
 * is slow to wake (at most for the one chunk the helper holds). The helper touches a run
 * only after claiming it (POSTED -> TAKEN); a caller that finishes every chunk before the
 * helper claims the run withdraws it (POSTED -> IDLE) and returns at once. One run at a
 * time shares the helper; a second caller meanwhile opens its run alone.
 */
#define CHUNK_BLOCKS 16
#define SHARED_MIN_BLOCKS 64
#define WAIT_SPIN_NS 200000

enum { IDLE, POSTED, TAKEN, DONE };

struct shared_run {
    EVP_CIPHER_CTX *helper_ctx;
    int nonce_len;
    const unsigned char *ct;
    size_t ct_len;
    uint64_t first_block;
    const unsigned char *file_id;
    unsigned char *out;
    size_t chunks;
    atomic_size_t next;    /* the next chunk to take */
    atomic_long first_bad; /* (block << 2) | reason of the first bad block; LONG_MAX: none */
};

static struct {
    pthread_mutex_t lock; /* held by the caller whose run is shared */
    pthread_once_t once;
    int ready;            /* the helper thread runs */
    atomic_int state;
    struct shared_run run;
    atomic_ulong chunks_opened; /* by the helper, since the process started */
} helper = { .lock = PTHREAD_MUTEX_INITIALIZER, .once = PTHREAD_ONCE_INIT, .state = IDLE };

static void futex_wait(atomic_int *addr, int expected)
{
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(atomic_int *addr)
{
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static unsigned long open_chunks(struct shared_run *r, EVP_CIPHER_CTX *ctx)
{
    const size_t cipher_block = (size_t)r->nonce_len + PLAIN_BLOCK + TAG_LEN;
    unsigned long opened = 0;
    size_t c;

    for (; (c = atomic_fetch_add(&r->next, 1)) < r->chunks; opened++) {
        const size_t start = c * CHUNK_BLOCKS * cipher_block;
        const size_t left = r->ct_len - start;
        const size_t len = left < CHUNK_BLOCKS * cipher_block ? left : CHUNK_BLOCKS * cipher_block;
        int reason;
        long k = pfs_gcm_open_run(ctx, r->nonce_len, r->ct + start, len,
                                  r->first_block + c * CHUNK_BLOCKS, r->file_id,
                                  r->out + c * CHUNK_BLOCKS * PLAIN_BLOCK, &reason);
        if (k >= 0) {
            long bad = ((long)(c * CHUNK_BLOCKS) + k) << 2 | reason;
            long seen = atomic_load(&r->first_bad);
            while (bad < seen && !atomic_compare_exchange_weak(&r->first_bad, &seen, bad))
                ;
        }
    }
    return opened;
}

static void *helper_main(void *unused)
{
    (void)unused;
    for (;;) {
        int s = atomic_load(&helper.state);
        if (s != POSTED) {
            futex_wait(&helper.state, s);
            continue;
        }
        if (!atomic_compare_exchange_strong(&helper.state, &s, TAKEN))
            continue;  /* withdrawn */
        atomic_fetch_add(&helper.chunks_opened,
                         open_chunks(&helper.run, helper.run.helper_ctx));
        atomic_store(&helper.state, DONE);
        futex_wake(&helper.state);
    }
    return NULL;
}

static void start_helper(void)
{
    pthread_attr_t attr;
    pthread_t thread;
    cpu_set_t cpus;
    sigset_t all, old;

    /* The CPUs this process may run on (taskset, cpusets), not those of the machine. */
    if (sched_getaffinity(0, sizeof cpus, &cpus) != 0 || CPU_COUNT(&cpus) < 2
        || pthread_attr_init(&attr) != 0)
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* Signals stay with the interpreter's threads, but for the faults of this one. */
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGABRT);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    helper.ready = pthread_create(&thread, &attr, helper_main, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

unsigned long pfs_gcm_helper_chunks(void)
{
    return atomic_load(&helper.chunks_opened);
}

int pfs_gcm_helper_ready(void)
{
    return pthread_once(&helper.once, start_helper) == 0 && helper.ready;
}

int pfs_gcm_run_is_shared(size_t ct_len, int nonce_len)
{
    const size_t cipher_block = (size_t)nonce_len + PLAIN_BLOCK + TAG_LEN;
    return ct_len >= SHARED_MIN_BLOCKS * cipher_block;
}

/* As pfs_gcm_open_run, with helper_ctx (same key) for the helper's chunks. A short run,
 * no helper_ctx, no helper thread or a helper busy with another run: the caller opens
 * the run alone. */
long pfs_gcm_open_run_shared(EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *helper_ctx,
                             int nonce_len, const unsigned char *ct, size_t ct_len,
                             uint64_t first_block, const unsigned char *file_id,
                             unsigned char *out, int *reason)
{
    const size_t cipher_block = (size_t)nonce_len + PLAIN_BLOCK + TAG_LEN;
    struct shared_run *r = &helper.run;
    long bad;

    if (helper_ctx == NULL || !pfs_gcm_run_is_shared(ct_len, nonce_len)
        || pthread_once(&helper.once, start_helper) != 0 || !helper.ready
        || pthread_mutex_trylock(&helper.lock) != 0)
        return pfs_gcm_open_run(ctx, nonce_len, ct, ct_len, first_block, file_id, out,
                                reason);
    r->helper_ctx = helper_ctx;
    r->nonce_len = nonce_len;
    r->ct = ct;
    r->ct_len = ct_len;
    r->first_block = first_block;
    r->file_id = file_id;
    r->out = out;
    r->chunks = (ct_len + CHUNK_BLOCKS * cipher_block - 1) / (CHUNK_BLOCKS * cipher_block);
    atomic_store(&r->next, 0);
    atomic_store(&r->first_bad, LONG_MAX);
    atomic_store(&helper.state, POSTED);  /* publishes the run */
    futex_wake(&helper.state);
    open_chunks(r, ctx);
    int s = POSTED;
    if (!atomic_compare_exchange_strong(&helper.state, &s, IDLE)) {
        /* The helper holds a chunk: wait for it, briefly spinning, then sleeping. */
        const int64_t until = now_ns() + WAIT_SPIN_NS;
        while ((s = atomic_load(&helper.state)) == TAKEN && now_ns() < until)
            cpu_relax();
        while ((s = atomic_load(&helper.state)) == TAKEN)
            futex_wait(&helper.state, TAKEN);
        atomic_store(&helper.state, IDLE);
    }
    bad = atomic_load(&r->first_bad);
    pthread_mutex_unlock(&helper.lock);
    if (bad == LONG_MAX) {
        *reason = PFS_OK;
        return -1;
    }
    *reason = (int)(bad & 3);
    return bad >> 2;
}

int pfs_gcm_seal_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                     const unsigned char *pt, size_t pt_len, uint64_t first_block,
                     const unsigned char *file_id, const unsigned char *nonces,
                     unsigned char *out)
{
    const size_t cipher_block = (size_t)nonce_len + PLAIN_BLOCK + TAG_LEN;
    unsigned char aad[AAD_LEN];
    int ok = 1;

    memcpy(aad + 8, file_id, FILE_ID_LEN);
    for (size_t k = 0; ok && k * PLAIN_BLOCK < pt_len; k++) {
        const size_t rest = pt_len - k * PLAIN_BLOCK;
        const int n = (int)(rest < PLAIN_BLOCK ? rest : PLAIN_BLOCK);
        const unsigned char *nonce = nonces + k * (size_t)nonce_len;
        unsigned char *o = out + k * cipher_block;
        int len = 0, fin = 0;

        memcpy(o, nonce, (size_t)nonce_len);
        put_aad(aad, first_block + (uint64_t)k);
        ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) == 1
            && EVP_EncryptUpdate(ctx, NULL, &len, aad, AAD_LEN) == 1
            && EVP_EncryptUpdate(ctx, o + nonce_len, &len, pt + k * PLAIN_BLOCK, n) == 1
            && EVP_EncryptFinal_ex(ctx, o + nonce_len + len, &fin) == 1
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN,
                                   o + nonce_len + n) == 1;
    }
    return ok ? 0 : -1;
}
