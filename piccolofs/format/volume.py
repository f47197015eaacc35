"""Everything needed to read and write one tree, built once from its config and master key."""

from __future__ import annotations

from piccolofs.format import b64
from piccolofs.format.aead import AesGcm, AesSiv, ContentCipher, XChaCha20Poly1305
from piccolofs.format.config import (
    F_AESSIV,
    F_DIRIV,
    F_HKDF,
    F_PLAINTEXT_NAMES,
    F_RAW64,
    F_XCHACHA,
    Config,
)
from piccolofs.format.content import BlockCodec
from piccolofs.format.errors import AuthenticationError, CorruptName, NameTooLong
from piccolofs.format.kdf import derive_keys
from piccolofs.format.names import NameCodec

PATH_MAX = 4095
_BLOB_AAD = bytes(8)


class VolumeCrypto:
    """Name codec, block codec and the small-blob sealing of one unlocked tree.

    Symlink targets and xattr values are sealed as one AEAD unit with AAD = 8 zero bytes.
    """

    def __init__(self, config: Config, master_key: bytes, *, longnames: bool = True) -> None:
        config.validate()
        keys = derive_keys(master_key, config.has(F_HKDF))
        cipher: ContentCipher
        if config.has(F_XCHACHA):
            cipher = XChaCha20Poly1305(keys.xchacha)
        elif config.has(F_AESSIV):
            cipher = AesSiv(keys.siv)
        else:
            cipher = AesGcm(keys.gcm)
        self.config = config
        self.cipher = cipher
        self.blocks = BlockCodec(cipher)
        self.plaintext_names = config.has(F_PLAINTEXT_NAMES)
        self.dir_iv = config.has(F_DIRIV) and not self.plaintext_names
        self.raw64 = config.has(F_RAW64)
        self.names = NameCodec(
            keys.eme,
            raw64=self.raw64,
            plaintext_names=self.plaintext_names,
            dir_iv=self.dir_iv,
            longnames=longnames,
            longname_max=config.effective_longname_max,
        )

    # -- symlinks ------------------------------------------------------------------------
    def seal_symlink(self, target: bytes, nonce: bytes | None = None) -> bytes:
        if self.plaintext_names or not target:
            out = target
        else:
            sealed = self.cipher.seal(target, _BLOB_AAD, nonce)
            out = b64.url_encode(sealed, self.raw64).encode("ascii")
        if len(out) > PATH_MAX:
            raise NameTooLong("symlink target too long once encrypted")
        return out

    def open_symlink(self, stored: bytes) -> bytes:
        if self.plaintext_names or not stored:
            return stored
        try:
            sealed = b64.url_decode(stored, self.raw64)
        except CorruptName:
            raise AuthenticationError("symlink target is not base64") from None
        return self.cipher.open(sealed, _BLOB_AAD)

    # -- xattr values --------------------------------------------------------------------
    def seal_xattr(self, value: bytes, nonce: bytes | None = None) -> bytes:
        return self.cipher.seal(value, _BLOB_AAD, nonce) if value else b""

    def open_xattr(self, stored: bytes) -> bytes:
        return self.cipher.open(stored, _BLOB_AAD) if stored else b""
