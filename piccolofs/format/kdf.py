"""Key derivation: scrypt for the password, HKDF-SHA256 for the per-purpose keys.

With the `HKDF` flag (every 2.x tree) each purpose gets its own key derived from the master
key; legacy trees use the master key itself, and SHA-512 of it for AES-SIV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from piccolofs.format.errors import ConfigError

INFO_EME = b"EME filename encryption"
INFO_GCM = b"AES-GCM file content encryption"
INFO_SIV = b"AES-SIV file content encryption"
INFO_XCHACHA = b"XChaCha20-Poly1305 file content encryption"

SCRYPT_MIN_LOG_N = 10
SCRYPT_MAX_LOG_N = 28


def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 with no salt (equivalent to 32 zero bytes), as gocryptfs uses it."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


@dataclass(frozen=True)
class ScryptParams:
    salt: bytes
    n: int
    r: int = 8
    p: int = 1
    key_len: int = 32

    def validate(self) -> None:
        """Refuse parameters gocryptfs 2.3 refuses, plus non-powers of two."""
        if self.n < 1 << SCRYPT_MIN_LOG_N or self.n & (self.n - 1):
            raise ConfigError(f"scrypt N={self.n} is not a power of two >= 1024")
        if self.n > 1 << SCRYPT_MAX_LOG_N:
            raise ConfigError(f"scrypt N={self.n} exceeds 2^{SCRYPT_MAX_LOG_N}")
        if self.r < 8 or self.p < 1:
            raise ConfigError(f"scrypt R={self.r} P={self.p} below the minimum (R>=8, P>=1)")
        if len(self.salt) < 32:
            raise ConfigError(f"scrypt salt is {len(self.salt)} bytes, need >= 32")
        if self.key_len != 32:
            raise ConfigError(f"scrypt KeyLen={self.key_len}, only 32 is usable")

    def derive(self, password: bytes) -> bytes:
        """Return the key-encryption key. Costly (~0.2 s at N=2^16): callers offload it."""
        self.validate()
        return Scrypt(salt=self.salt, length=self.key_len, n=self.n, r=self.r, p=self.p).derive(
            password
        )


@dataclass(frozen=True, repr=False)
class DerivedKeys:
    """The keys one tree uses, derived once at unlock. repr() never shows them."""

    eme: bytes
    gcm: bytes
    siv: bytes
    xchacha: bytes

    def __repr__(self) -> str:
        return "DerivedKeys(<redacted>)"


def derive_keys(master_key: bytes, use_hkdf: bool) -> DerivedKeys:
    if len(master_key) != 32:
        raise ConfigError("master key must be 32 bytes")
    if use_hkdf:
        return DerivedKeys(
            eme=hkdf(master_key, INFO_EME),
            gcm=hkdf(master_key, INFO_GCM),
            siv=hkdf(master_key, INFO_SIV, 64),
            xchacha=hkdf(master_key, INFO_XCHACHA),
        )
    return DerivedKeys(
        eme=master_key,
        gcm=master_key,
        siv=hashlib.sha512(master_key).digest(),
        xchacha=master_key,
    )
