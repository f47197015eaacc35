"""`crypto/keyset.json`: the SDEK sealed under Argon2id(password) and Argon2id(recovery key).

Field names and encodings are those of the original daemon, so its state directories are
adopted as they are: `sdek`, `salt`, `nonce`, optional `rk_salt`, `rk_nonce`, `sdek_rk`
(standard base64 without padding), and `kdf {alg, time, memory (KiB), threads}`. The SDEK is
sealed with AES-256-GCM, 12-byte nonce, no associated data.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, replace
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SDEK_LEN = 32
SALT_LEN = 16
MIN_SALT = 8  # Argon2's own minimum
NONCE_LEN = 12
# Bounds on what a keyset may ask of the KDF: a tampered file must not make an unlock
# allocate terabytes or run for days.
MAX_TIME = 64
MAX_THREADS = 64
MAX_MEMORY = 4 * 1024 * 1024  # KiB


class KeysetError(Exception):
    """keyset.json is missing fields, malformed, or uses an unsupported KDF."""


class BadSecret(Exception):
    """The password or recovery key does not open the SDEK."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def unb64(text: Any, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise KeysetError(f"keyset field {field} is missing or empty")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise KeysetError(f"keyset field {field} is not base64") from None


@dataclass(frozen=True)
class KdfParams:
    time: int = 3
    memory: int = 512 * 1024  # KiB
    threads: int = max(1, min((os.cpu_count() or 2) - 1, 8))
    alg: str = "argon2id"

    def validate(self) -> None:
        if self.alg != "argon2id":
            raise KeysetError(f"unsupported kdf: {self.alg}")
        if not (1 <= self.time <= MAX_TIME and 1 <= self.threads <= MAX_THREADS
                and 8 * self.threads <= self.memory <= MAX_MEMORY):
            raise KeysetError("kdf parameters out of range")

    def derive(self, secret: bytes, salt: bytes) -> bytes:
        """Argon2id; seconds of CPU and up to `memory` KiB: callers run it in a thread."""
        self.validate()
        return hash_secret_raw(secret, salt, time_cost=self.time, memory_cost=self.memory,
                               parallelism=self.threads, hash_len=32, type=Type.ID)


def _seal(kek: bytes, sdek: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_LEN)
    return nonce, AESGCM(kek).encrypt(nonce, sdek, None)


def _open(kek: bytes, nonce: bytes, sealed: bytes) -> bytearray:
    if len(nonce) != NONCE_LEN:
        raise KeysetError("keyset nonce must be 12 bytes")
    try:
        sdek = AESGCM(kek).decrypt(nonce, sealed, None)
    except InvalidTag:
        raise BadSecret from None
    if len(sdek) != SDEK_LEN:
        raise KeysetError("sealed SDEK has the wrong length")
    return bytearray(sdek)


@dataclass(frozen=True)
class Keyset:
    sdek: bytes
    salt: bytes
    nonce: bytes
    kdf: KdfParams
    rk_salt: bytes = b""
    rk_nonce: bytes = b""
    sdek_rk: bytes = b""

    @property
    def has_recovery(self) -> bool:
        return bool(self.sdek_rk)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, sdek: bytes, password: bytes, kdf: KdfParams) -> Keyset:
        salt = os.urandom(SALT_LEN)
        nonce, sealed = _seal(kdf.derive(password, salt), sdek)
        return cls(sealed, salt, nonce, kdf)

    def with_password(self, sdek: bytes, password: bytes) -> Keyset:
        """The same SDEK under a new password (new salt and nonce); recovery wrap kept."""
        salt = os.urandom(SALT_LEN)
        nonce, sealed = _seal(self.kdf.derive(password, salt), sdek)
        return replace(self, sdek=sealed, salt=salt, nonce=nonce)

    def with_recovery(self, sdek: bytes, recovery: str) -> Keyset:
        salt = os.urandom(SALT_LEN)
        nonce, sealed = _seal(self.kdf.derive(recovery.encode(), salt), sdek)
        return replace(self, rk_salt=salt, rk_nonce=nonce, sdek_rk=sealed)

    # -- opening -------------------------------------------------------------------------
    def open_with_password(self, password: bytes) -> bytearray:
        return _open(self.kdf.derive(password, self.salt), self.nonce, self.sdek)

    def open_with_recovery(self, recovery: str) -> bytearray:
        if not self.has_recovery:
            raise KeysetError("recovery key not set")
        return _open(self.kdf.derive(recovery.encode(), self.rk_salt), self.rk_nonce,
                     self.sdek_rk)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "sdek": b64(self.sdek),
            "salt": b64(self.salt),
            "nonce": b64(self.nonce),
            "kdf": {"alg": self.kdf.alg, "time": self.kdf.time, "memory": self.kdf.memory,
                    "threads": self.kdf.threads},
        }
        if self.has_recovery:
            obj.update(rk_salt=b64(self.rk_salt), rk_nonce=b64(self.rk_nonce),
                       sdek_rk=b64(self.sdek_rk))
        return (json.dumps(obj, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Keyset:
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KeysetError("keyset.json is not valid JSON (truncated?)") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("kdf"), dict):
            raise KeysetError("keyset.json lacks its kdf section")
        k = obj["kdf"]
        ints = [k.get(f) for f in ("time", "memory", "threads")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) \
                or not isinstance(k.get("alg"), str):
            raise KeysetError("keyset kdf section is malformed")
        kdf = KdfParams(time=ints[0], memory=ints[1], threads=ints[2], alg=k["alg"])
        kdf.validate()
        rk = {}
        if obj.get("sdek_rk"):
            rk = {"rk_salt": unb64(obj.get("rk_salt"), "rk_salt"),
                  "rk_nonce": unb64(obj.get("rk_nonce"), "rk_nonce"),
                  "sdek_rk": unb64(obj.get("sdek_rk"), "sdek_rk")}
        ks = cls(sdek=unb64(obj.get("sdek"), "sdek"), salt=unb64(obj.get("salt"), "salt"),
                 nonce=unb64(obj.get("nonce"), "nonce"), kdf=kdf, **rk)
        for name in ("salt", "rk_salt"):
            salt = getattr(ks, name)
            if (salt or name == "salt") and not MIN_SALT <= len(salt) <= 64:
                raise KeysetError(f"keyset field {name} has the wrong length")
        for name in ("nonce", "rk_nonce"):
            nonce = getattr(ks, name)
            if (nonce or name == "nonce") and len(nonce) != NONCE_LEN:
                raise KeysetError(f"keyset field {name} must be {NONCE_LEN} bytes")
        return ks
