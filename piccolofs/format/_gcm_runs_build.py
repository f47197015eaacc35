"""cffi build of piccolofs.format._gcm_runs (setup.py's cffi_modules; not imported at run
time). Optional: where it cannot be compiled (no libssl-dev), the pure-Python block loop
of piccolofs.format.content serves, slower."""

from pathlib import Path

from cffi import FFI

# Paths relative to the project root, where setup.py runs.
SRC = "piccolofs/format"
HEADER = Path(__file__).with_name("gcm_runs.h")

ffi = FFI()
# The declarations of gcm_runs.h, without its includes; OpenSSL's context stays opaque.
ffi.cdef("typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;\n" + "\n".join(
    line for line in HEADER.read_text().splitlines() if not line.startswith("#include")))
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
