"""The three content AEADs and their on-disk block layouts.

    AES-256-GCM         nonce(16) | ciphertext(n) | tag(16)
    AES-SIV-512         nonce(16) | siv(16)       | ciphertext(n)     (tag *before* the data)
    XChaCha20-Poly1305  nonce(24) | ciphertext(n) | tag(16)

The same sealing is used for content blocks, symlink targets, xattr values and the
master-key wrap; only the associated data differs. A block whose nonce is all zero is refused
(gocryptfs does the same) so that a zeroed region can never pass as data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from piccolofs.format.errors import AuthenticationError
from piccolofs.format.gcm_runs import GcmRuns

TAG_LEN = 16


OpenInto = Callable[[bytes, memoryview, bytes, memoryview], object]


class ContentCipher(Protocol):
    name: str
    nonce_len: int
    overhead: int

    def seal(self, plaintext: bytes | bytearray, aad: bytes,
             nonce: bytes | None = None) -> bytes:
        """Return the sealed unit: nonce, tag and ciphertext in this cipher's layout."""
        ...

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Return the plaintext or raise AuthenticationError; never partial output."""
        ...

    def raw_seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview,
                 aad: bytes) -> bytes:
        """The sealed unit without its nonce (hot path: the caller supplies nonces)."""
        ...

    # Hot loops (BlockCodec.open_run) call `open_into(nonce, body, aad, out)` directly: it
    # opens one unit into `out` (exactly the plaintext's length) and raises `tag_error` on
    # a bad tag, after which `out` holds unauthenticated bytes that must be discarded. For
    # AES-GCM it is the library's own method, so a block costs no Python frame.
    @property
    def open_into(self) -> OpenInto: ...

    @property
    def tag_error(self) -> type[Exception]: ...

    # Whole runs of content blocks in one compiled call (AES-GCM only; None elsewhere, or
    # where the helper is not built): see piccolofs.format.gcm_runs.
    @property
    def runs(self) -> GcmRuns | None: ...


def _check_sealed(sealed: bytes, nonce_len: int) -> None:
    if len(sealed) <= nonce_len + TAG_LEN:
        raise AuthenticationError("sealed unit too short")
    if not any(sealed[:nonce_len]):
        raise AuthenticationError("all-zero nonce")


class AesGcm:
    name = "AES-256-GCM"
    nonce_len = 16
    overhead = 16 + TAG_LEN
    tag_error: type[Exception] = InvalidTag

    def __init__(self, key: bytes, nonce_len: int = 16) -> None:
        self._aead = AESGCM(key)
        self.nonce_len = nonce_len
        self.overhead = nonce_len + TAG_LEN
        self.open_into: OpenInto = self._aead.decrypt_into
        self.runs = GcmRuns.for_key(key, nonce_len, 4096 + self.overhead)

    def raw_seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview,
                 aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def seal(self, plaintext: bytes | bytearray, aad: bytes,
             nonce: bytes | None = None) -> bytes:
        nonce = os.urandom(self.nonce_len) if nonce is None else nonce
        return nonce + self.raw_seal(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        _check_sealed(sealed, self.nonce_len)
        n = self.nonce_len
        try:
            return self._aead.decrypt(sealed[:n], sealed[n:], aad)
        except InvalidTag:
            raise AuthenticationError("AES-GCM tag mismatch") from None


class AesSiv:
    name = "AES-SIV-512"
    nonce_len = 16
    overhead = 16 + TAG_LEN
    tag_error: type[Exception] = InvalidTag
    runs = None

    def __init__(self, key: bytes) -> None:
        self._aead = AESSIV(key)

    def raw_seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview,
                 aad: bytes) -> bytes:
        return self._aead.encrypt(plaintext, [aad, nonce])

    def open_into(self, nonce: bytes, body: memoryview, aad: bytes, out: memoryview) -> None:
        self._aead.decrypt_into(body, [aad, nonce], out)

    def seal(self, plaintext: bytes | bytearray, aad: bytes,
             nonce: bytes | None = None) -> bytes:
        nonce = os.urandom(16) if nonce is None else nonce
        return nonce + self.raw_seal(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        _check_sealed(sealed, 16)
        try:
            return self._aead.decrypt(sealed[16:], [aad, sealed[:16]])
        except InvalidTag:
            raise AuthenticationError("AES-SIV tag mismatch") from None


class XChaCha20Poly1305:
    name = "XChaCha20-Poly1305"
    nonce_len = 24
    overhead = 24 + TAG_LEN
    tag_error: type[Exception] = nacl.exceptions.CryptoError
    runs = None

    def __init__(self, key: bytes) -> None:
        self._key = key

    def raw_seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview,
                 aad: bytes) -> bytes:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            bytes(plaintext), aad, nonce, self._key)

    def open_into(self, nonce: bytes, body: memoryview, aad: bytes, out: memoryview) -> None:
        # libsodium's binding has no in-place form
        out[:] = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(body), aad, nonce, self._key)

    def seal(self, plaintext: bytes | bytearray, aad: bytes,
             nonce: bytes | None = None) -> bytes:
        nonce = os.urandom(24) if nonce is None else nonce
        return nonce + self.raw_seal(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        _check_sealed(sealed, 24)
        try:
            return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[24:], aad, sealed[:24], self._key
            )
        except nacl.exceptions.CryptoError:
            raise AuthenticationError("XChaCha20-Poly1305 tag mismatch") from None
