"""AES-256-GCM over a run of content blocks in one compiled call, the GIL released.

A Python AEAD call costs more than the cipher work on one 4 KiB block (a fresh context,
argument parsing, a result object), so the content hot paths hand a whole run of blocks to
`piccolofs.format._gcm_runs` (C over OpenSSL's libcrypto, built by setup.py through cffi).
A run of 64 blocks or more to open (a large read) is shared with a helper thread of the
compiled code, which opens chunks of it on the other CPU while the caller opens the rest.
The bytes on disk are the same either way. Where the helper was not built, or with
PICCOLOFS_PURE_PYTHON=1 in the environment, `GcmRuns.for_key` returns None and
piccolofs.format.content seals and opens block by block in Python.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from piccolofs.format._gcm_runs import ffi, lib
except ImportError:  # not compiled here
    ffi = lib = None

# Why a run stopped (gcm_runs.h), in the words of the pure-Python path.
REASONS: dict[int, str] = {} if lib is None else {
    lib.PFS_TOO_SHORT: "block too short", lib.PFS_ZERO_NONCE: "all-zero nonce",
    lib.PFS_BAD_TAG: "AES-256-GCM tag mismatch"}


def available() -> bool:
    """True when runs go through the compiled helper."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why runs go block by block in Python, or None when the helper serves them."""
    if lib is None:
        return "the compiled AES-GCM helper is not built (libssl-dev missing at install)"
    if os.environ.get("PICCOLOFS_PURE_PYTHON") == "1":
        return "PICCOLOFS_PURE_PYTHON=1"
    return None


class GcmRuns:
    """Seals and opens runs of content blocks under one AES-256 key.

    OpenSSL contexts carry the key schedule, so they are kept rather than made per run;
    a context serves one run at a time, and the helper runs without the GIL, so each call
    takes one from a pool (list.pop and append are atomic) and gives it back.
    """

    __slots__ = ("_cipher_block", "_key", "_nonce_len", "_pool")

    def __init__(self, key: bytes, nonce_len: int, cipher_block: int) -> None:
        self._key = key
        self._nonce_len = nonce_len
        self._cipher_block = cipher_block
        self._pool: list[tuple[Any, Any]] = []

    @classmethod
    def for_key(cls, key: bytes, nonce_len: int, cipher_block: int) -> GcmRuns | None:
        """None where the helper does not serve (see `available`); AES-256 keys only."""
        if not available() or len(key) != 32:
            return None
        return cls(key, nonce_len, cipher_block)

    def _context(self) -> tuple[Any, Any]:
        """A context and its out-parameter for the reason a run stopped."""
        try:
            return self._pool.pop()
        except IndexError:
            ctx = lib.pfs_gcm_new(self._key, self._nonce_len)
            if ctx == ffi.NULL:
                raise MemoryError("OpenSSL could not set up an AES-GCM context") from None
            return ffi.gc(ctx, lib.pfs_gcm_free), ffi.new("int *")

    def open_into(self, first_block: int, file_id: bytes, ciphertext: Any,
                  out: bytearray) -> tuple[int, int]:
        """Open the run into `out`; (-1, 0) when all blocks authenticate, else the index of
        the first bad block in the run and why (the blocks before it are opened, the rest
        of `out` must be discarded)."""
        assert len(file_id) == 16
        if not isinstance(ciphertext, bytes):  # bytes go as they are
            ciphertext = ffi.from_buffer(ciphertext)
        target = ffi.from_buffer(out)
        entries = [self._context()]
        try:
            helper_ctx = ffi.NULL
            if lib.pfs_gcm_run_is_shared(len(ciphertext), self._nonce_len):
                entries.append(self._context())  # the helper thread's, for its chunks
                helper_ctx = entries[1][0]
            ctx, reason = entries[0]
            bad = lib.pfs_gcm_open_run_shared(ctx, helper_ctx, self._nonce_len, ciphertext,
                                              len(ciphertext), first_block, file_id,
                                              target, reason)
            return bad, reason[0]
        finally:
            self._pool.extend(entries)

    def seal(self, first_block: int, file_id: bytes, plaintext: Any,
             nonces: bytes) -> bytearray:
        """The sealed run (nonce | ciphertext | tag per block), one buffer."""
        full, rest = divmod(len(plaintext), 4096)
        assert len(file_id) == 16 and len(nonces) == (full + (rest > 0)) * self._nonce_len
        out = bytearray(full * self._cipher_block
                        + (rest + self._cipher_block - 4096 if rest else 0))
        if not isinstance(plaintext, bytes):
            plaintext = ffi.from_buffer(plaintext)
        target = ffi.from_buffer(out)
        entry = self._context()
        try:
            ok = lib.pfs_gcm_seal_run(entry[0], self._nonce_len, plaintext, len(plaintext),
                                      first_block, file_id, nonces, target) == 0
        finally:
            self._pool.append(entry)
        if not ok:
            raise MemoryError("OpenSSL could not seal with AES-GCM")
        return out
