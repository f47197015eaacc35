/* AES-256-GCM over a run of content blocks in one call, with the GIL released.
 *
 * The per-call cost of a Python AEAD call (a fresh cipher context, argument parsing) is
 * larger than the cipher work on one 4 KiB block; here one OpenSSL context serves a whole
 * run, and cffi releases the GIL around the call so that two runs decrypt on two CPUs.
 * A context (pfs_gcm_new) holds one key's schedule and serves one run at a time.
 * The layout is the one of piccolofs.format.content:
 *
 *   block k = nonce(nonce_len) | ciphertext(n <= 4096) | tag(16),
 *   aad     = uint64_be(first_block + k) | file id(16)
 *
 * A full-size block of zero bytes is a hole and opens as 4096 zero bytes.
 */
#include <stdint.h>
#include <string.h>
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
