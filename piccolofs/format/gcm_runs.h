/* Declarations shared by gcm_runs.c and its cffi build (_gcm_runs_build.py). */
#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>

#define PFS_OK 0
#define PFS_TOO_SHORT 1
#define PFS_ZERO_NONCE 2
#define PFS_BAD_TAG 3

EVP_CIPHER_CTX *pfs_gcm_new(const unsigned char *key, int nonce_len);
void pfs_gcm_free(EVP_CIPHER_CTX *ctx);
long pfs_gcm_open_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                      const unsigned char *ct, size_t ct_len, uint64_t first_block,
                      const unsigned char *file_id, unsigned char *out, int *reason);
long pfs_gcm_open_run_shared(EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *helper_ctx,
                             int nonce_len, const unsigned char *ct, size_t ct_len,
                             uint64_t first_block, const unsigned char *file_id,
                             unsigned char *out, int *reason);
int pfs_gcm_run_is_shared(size_t ct_len, int nonce_len);
unsigned long pfs_gcm_helper_chunks(void);
int pfs_gcm_helper_ready(void);
int pfs_gcm_seal_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                     const unsigned char *pt, size_t pt_len, uint64_t first_block,
                     const unsigned char *file_id, const unsigned char *nonces,
                     unsigned char *out);
