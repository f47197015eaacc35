"""gocryptfs.conf: parsing, validation, writing, and the master-key wrap.

The file is JSON written like Go's MarshalIndent with tabs. Reading is lenient where Go is
(unknown keys ignored, key names case-insensitive) and strict where safety needs it: an
unknown feature flag, another version, or an inconsistent flag set is refused, because
mounting a tree we do not fully understand could silently corrupt it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from piccolofs.format import b64
from piccolofs.format.errors import ConfigError, FormatError, UnsupportedFeature, WrongPassword
from piccolofs.format.kdf import INFO_GCM, ScryptParams, hkdf

CONFIG_VERSION = 2
DEFAULT_SCRYPT_LOG_N = 16
LONGNAMEMAX_MIN = 62
LONGNAMEMAX_MAX = 255
CREATOR = "piccolofs 0.1.0"

F_PLAINTEXT_NAMES = "PlaintextNames"
F_DIRIV = "DirIV"
F_EME_NAMES = "EMENames"
F_GCMIV128 = "GCMIV128"
F_LONG_NAMES = "LongNames"
F_LONG_NAME_MAX = "LongNameMax"
F_AESSIV = "AESSIV"
F_RAW64 = "Raw64"
F_HKDF = "HKDF"
F_FIDO2 = "FIDO2"
F_XCHACHA = "XChaCha20Poly1305"

KNOWN_FLAGS = frozenset(
    {
        F_PLAINTEXT_NAMES, F_DIRIV, F_EME_NAMES, F_GCMIV128, F_LONG_NAMES, F_LONG_NAME_MAX,
        F_AESSIV, F_RAW64, F_HKDF, F_FIDO2, F_XCHACHA,
    }
)
_WRAP_AAD = bytes(8)


@dataclass(frozen=True)
class InitOptions:
    """What `init` may choose; mirrors gocryptfs -init flags."""

    xchacha: bool = False
    aessiv: bool = False
    plaintext_names: bool = False
    deterministic_names: bool = False
    longname_max: int = 0
    scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N

    def feature_flags(self) -> list[str]:
        """The flags, in the order gocryptfs 2.3 writes them."""
        if self.xchacha and self.aessiv:
            raise ConfigError("--xchacha and --aessiv are mutually exclusive")
        if self.longname_max and not LONGNAMEMAX_MIN <= self.longname_max <= LONGNAMEMAX_MAX:
            raise ConfigError(
                f"--longnamemax must be {LONGNAMEMAX_MIN}..{LONGNAMEMAX_MAX}, "
                f"got {self.longname_max}"
            )
        flags = [F_HKDF]
        flags.append(F_XCHACHA if self.xchacha else F_GCMIV128)
        if self.plaintext_names:
            flags.append(F_PLAINTEXT_NAMES)
        else:
            if not self.deterministic_names:
                flags.append(F_DIRIV)
            if self.longname_max:
                flags.append(F_LONG_NAME_MAX)
            flags += [F_EME_NAMES, F_LONG_NAMES, F_RAW64]
        if self.aessiv:
            flags.append(F_AESSIV)
        return flags


@dataclass(frozen=True)
class Config:
    encrypted_key: bytes
    scrypt: ScryptParams
    feature_flags: tuple[str, ...]
    creator: str = CREATOR
    version: int = CONFIG_VERSION
    longname_max: int = 0
    fido2: dict[str, Any] | None = field(default=None, compare=False)

    # -- flag helpers --------------------------------------------------------------------
    def has(self, flag: str) -> bool:
        return flag in self.feature_flags

    @property
    def aead_name(self) -> str:
        if self.has(F_XCHACHA):
            return "XChaCha20-Poly1305"
        if self.has(F_AESSIV):
            return "AES-SIV-512"
        return "AES-256-GCM"

    @property
    def effective_longname_max(self) -> int:
        return self.longname_max if self.has(F_LONG_NAME_MAX) else LONGNAMEMAX_MAX

    def validate(self) -> None:
        """Apply the consistency rules gocryptfs 2.3 applies on load."""
        if self.version != CONFIG_VERSION:
            raise UnsupportedFeature(
                f"gocryptfs.conf version {self.version} is not supported (only {CONFIG_VERSION})"
            )
        unknown = sorted(set(self.feature_flags) - KNOWN_FLAGS)
        if unknown:
            raise UnsupportedFeature(f"unknown feature flag(s): {', '.join(unknown)}")
        h = self.has
        if h(F_XCHACHA) and h(F_AESSIV):
            raise ConfigError("XChaCha20Poly1305 and AESSIV are mutually exclusive")
        if h(F_AESSIV) and not h(F_GCMIV128):
            raise ConfigError("AESSIV requires GCMIV128")
        if h(F_XCHACHA) and (h(F_GCMIV128) or not h(F_HKDF)):
            raise ConfigError("XChaCha20Poly1305 requires HKDF and forbids GCMIV128")
        if not h(F_XCHACHA) and not h(F_AESSIV) and not h(F_GCMIV128):
            raise ConfigError("AES-GCM trees require GCMIV128 (64-bit IVs are not supported)")
        if h(F_PLAINTEXT_NAMES):
            bad = [f for f in (F_EME_NAMES, F_DIRIV, F_LONG_NAMES, F_RAW64, F_LONG_NAME_MAX)
                   if h(f)]
            if bad:
                raise ConfigError(f"PlaintextNames forbids {', '.join(bad)}")
        if h(F_LONG_NAME_MAX) != bool(self.longname_max):
            raise ConfigError("LongNameMax flag and value must appear together")
        if self.longname_max and not LONGNAMEMAX_MIN <= self.longname_max <= LONGNAMEMAX_MAX:
            raise ConfigError(f"LongNameMax {self.longname_max} outside 62..255")
        expected = 64 if h(F_HKDF) else 60
        if len(self.encrypted_key) != expected:
            raise ConfigError(
                f"EncryptedKey is {len(self.encrypted_key)} bytes, expected {expected}"
            )
        self.scrypt.validate()

    # -- the master key ------------------------------------------------------------------
    def _wrap_key(self, kek: bytes) -> bytes:
        return hkdf(kek, INFO_GCM) if self.has(F_HKDF) else kek

    def _nonce_len(self) -> int:
        return 16 if self.has(F_HKDF) else 12

    def unwrap(self, password: bytes) -> bytes:
        """Return the master key. Costs one scrypt; raises WrongPassword."""
        if self.has(F_FIDO2):
            raise UnsupportedFeature("FIDO2-protected trees are not supported")
        if not password:
            raise ConfigError("empty password")
        return self.unwrap_with_kek(self.scrypt.derive(password))

    def unwrap_with_kek(self, kek: bytes) -> bytes:
        n = self._nonce_len()
        key = AESGCM(self._wrap_key(kek))
        try:
            master = key.decrypt(self.encrypted_key[:n], self.encrypted_key[n:], _WRAP_AAD)
        except InvalidTag:
            raise WrongPassword("password incorrect") from None
        if len(master) != 32:
            raise ConfigError("unwrapped master key is not 32 bytes")
        return master

    def rewrap(self, master_key: bytes, password: bytes, scrypt_log_n: int | None = None,
               nonce: bytes | None = None, salt: bytes | None = None) -> Config:
        """The same tree under a new password (fresh salt), like `gocryptfs -passwd`."""
        n = self.scrypt.n if scrypt_log_n is None else 1 << scrypt_log_n
        params = ScryptParams(salt=salt or os.urandom(32), n=n)
        kek = params.derive(password)
        nonce = nonce or os.urandom(self._nonce_len())
        wrapped = nonce + AESGCM(self._wrap_key(kek)).encrypt(nonce, master_key, _WRAP_AAD)
        return replace(self, scrypt=params, encrypted_key=wrapped)

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "Creator": self.creator,
            "EncryptedKey": b64.std_encode(self.encrypted_key),
            "ScryptObject": {
                "Salt": b64.std_encode(self.scrypt.salt),
                "N": self.scrypt.n,
                "R": self.scrypt.r,
                "P": self.scrypt.p,
                "KeyLen": self.scrypt.key_len,
            },
            "Version": self.version,
            "FeatureFlags": list(self.feature_flags),
        }
        if self.fido2:
            obj["FIDO2"] = self.fido2
        if self.longname_max:
            obj["LongNameMax"] = self.longname_max
        return (json.dumps(obj, indent="\t", ensure_ascii=False) + "\n").encode("utf-8")


def _ci(obj: dict[str, Any], key: str) -> Any:
    """Case-insensitive lookup, as Go's encoding/json matches keys."""
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def parse(data: bytes) -> Config:
    """Parse and validate gocryptfs.conf bytes. Raises ConfigError with the precise reason."""
    if not data.strip():
        raise ConfigError("gocryptfs.conf is empty")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"gocryptfs.conf is not valid JSON (truncated?): {exc.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError("gocryptfs.conf is not UTF-8") from None
    if not isinstance(obj, dict):
        raise ConfigError("gocryptfs.conf is not a JSON object")

    def need(o: dict[str, Any], key: str, typ: type) -> Any:
        v = _ci(o, key)
        if v is None:
            raise ConfigError(f"gocryptfs.conf lacks {key}")
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"gocryptfs.conf field {key} has the wrong type")
        return v

    version = need(obj, "Version", int)
    flags = need(obj, "FeatureFlags", list)
    if not all(isinstance(f, str) for f in flags):
        raise ConfigError("FeatureFlags must be strings")
    so = need(obj, "ScryptObject", dict)
    try:
        scrypt = ScryptParams(
            salt=b64.std_decode(need(so, "Salt", str)),
            n=need(so, "N", int),
            r=need(so, "R", int),
            p=need(so, "P", int),
            key_len=need(so, "KeyLen", int),
        )
        encrypted_key = b64.std_decode(need(obj, "EncryptedKey", str))
    except FormatError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"gocryptfs.conf has bad base64: {exc}") from None
    lnm = _ci(obj, "LongNameMax") or 0
    if not isinstance(lnm, int) or isinstance(lnm, bool):
        raise ConfigError("LongNameMax must be an integer")
    creator = _ci(obj, "Creator")
    fido2 = _ci(obj, "FIDO2")
    cfg = Config(
        encrypted_key=encrypted_key,
        scrypt=scrypt,
        feature_flags=tuple(flags),
        creator=creator if isinstance(creator, str) else "",
        version=version,
        longname_max=lnm,
        fido2=fido2 if isinstance(fido2, dict) else None,
    )
    cfg.validate()
    return cfg


def create(password: bytes, options: InitOptions, master_key: bytes | None = None,
           creator: str = CREATOR) -> tuple[Config, bytes]:
    """A new config around a fresh (or given) master key. Returns (config, master key)."""
    if not password:
        raise ConfigError("empty password")
    mk = os.urandom(32) if master_key is None else master_key
    flags = tuple(options.feature_flags())
    template = Config(
        encrypted_key=bytes(64),
        scrypt=ScryptParams(salt=bytes(32), n=1 << options.scrypt_log_n),
        feature_flags=flags,
        creator=creator,
        longname_max=options.longname_max,
    )
    cfg = template.rewrap(mk, password, options.scrypt_log_n)
    cfg.validate()
    return cfg, mk
