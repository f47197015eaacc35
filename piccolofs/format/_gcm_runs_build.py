"""cffi build of piccolofs.format._gcm_runs (setup.py's cffi_modules; not imported at run
time). Optional: where it cannot be compiled (no libssl-dev), the pure-Python block loop
of piccolofs.format.content serves, slower."""

from cffi import FFI

# Paths relative to the project root, where setup.py runs.
SRC = "piccolofs/format"

ffi = FFI()
ffi.cdef("""
#define PFS_OK 0
#define PFS_TOO_SHORT 1
#define PFS_ZERO_NONCE 2
#define PFS_BAD_TAG 3
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
EVP_CIPHER_CTX *pfs_gcm_new(const unsigned char *key, int nonce_len);
void pfs_gcm_free(EVP_CIPHER_CTX *ctx);
long pfs_gcm_open_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                      const unsigned char *ct, size_t ct_len, uint64_t first_block,
                      const unsigned char *file_id, unsigned char *out, int *reason);
int pfs_gcm_seal_run(EVP_CIPHER_CTX *ctx, int nonce_len,
                     const unsigned char *pt, size_t pt_len, uint64_t first_block,
                     const unsigned char *file_id, const unsigned char *nonces,
                     unsigned char *out);
""")
ffi.set_source(
    "piccolofs.format._gcm_runs",
    '#include "gcm_runs.h"',
    sources=[f"{SRC}/gcm_runs.c"],
    include_dirs=[SRC],
    libraries=["crypto"],
    optional=True,
)

if __name__ == "__main__":  # from the project root: builds in place
    ffi.compile(verbose=True)
