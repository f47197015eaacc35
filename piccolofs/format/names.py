"""File-name encryption: PKCS#7 pad, EME under the directory IV, base64url, long-name hashing.

    plaintext name --pad16--> EME(name key, diriv) --base64url--> cipher name
    cipher name longer than LongNameMax  -->  gocryptfs.longname.<b64(sha256(cipher name))>
                                              + companion "<that>.name" holding the cipher name
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from piccolofs.format import b64
from piccolofs.format.eme import BLOCK, Eme
from piccolofs.format.errors import CorruptName, InvalidName, NameTooLong

NAME_MAX = 255
DIRIV_NAME = b"gocryptfs.diriv"
DIRIV_LEN = 16
CONF_NAME = b"gocryptfs.conf"
# The Piccolo daemon keeps each volume's sealed key beside gocryptfs.conf in the root.
VOLUME_KEY_NAME = b"piccolo.volume.json"
LONGNAME_PREFIX = b"gocryptfs.longname."
LONGNAME_SUFFIX = b".name"
RMDIR_ARTIFACT_PREFIX = b"gocryptfs.diriv.rmdir."
ZERO_IV = bytes(DIRIV_LEN)
XATTR_TWEAK = b"xattr_name_iv_xx"
XATTR_PREFIX = "user.gocryptfs."
NAME_CACHE = 65536  # entries each way; cleared when full


def validate_plain(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidName("invalid file name")
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes exceeds {NAME_MAX}")


def pad16(data: bytes) -> bytes:
    k = BLOCK - len(data) % BLOCK
    return data + bytes([k]) * k


def unpad16(data: bytes) -> bytes:
    if not data or len(data) % BLOCK:
        raise CorruptName("padded length is not a multiple of 16")
    k = data[-1]
    if not 1 <= k <= BLOCK or k > len(data) - 1 or data[-k:] != bytes([k]) * k:
        raise CorruptName("bad name padding")
    return data[:-k]


def check_diriv(diriv: bytes) -> bytes:
    if len(diriv) != DIRIV_LEN:
        raise CorruptName(f"directory IV is {len(diriv)} bytes, expected {DIRIV_LEN}")
    if not any(diriv):
        raise CorruptName("all-zero directory IV")
    return diriv


def is_longname(backing: bytes) -> bool:
    """A hashed entry (not its .name companion)."""
    return backing.startswith(LONGNAME_PREFIX) and not backing.endswith(LONGNAME_SUFFIX)


def is_longname_companion(backing: bytes) -> bool:
    return backing.startswith(LONGNAME_PREFIX) and backing.endswith(LONGNAME_SUFFIX)


@dataclass(frozen=True)
class BackingName:
    """Where a plaintext name lives in its backing directory.

    `name` is the directory entry; for a long name `long_cipher` is the full encrypted name
    that the companion file `name + b".name"` must hold.
    """

    name: bytes
    long_cipher: bytes | None = None

    @property
    def companion(self) -> bytes | None:
        return None if self.long_cipher is None else self.name + LONGNAME_SUFFIX


class NameCodec:
    """Encrypts and decrypts the names of one tree."""

    def __init__(
        self,
        eme_key: bytes,
        *,
        raw64: bool,
        plaintext_names: bool,
        dir_iv: bool,
        longnames: bool = True,
        longname_max: int = NAME_MAX,
    ) -> None:
        self._eme = Eme(eme_key)
        self._enc_cache: dict[tuple[bytes, bytes], bytes] = {}
        self._dec_cache: dict[tuple[bytes, bytes], bytes] = {}
        self.raw64 = raw64
        self.plaintext_names = plaintext_names
        self.dir_iv = dir_iv and not plaintext_names
        self.longnames = longnames and not plaintext_names
        self.longname_max = longname_max

    # -- names ---------------------------------------------------------------------------
    def encrypt(self, diriv: bytes, plain: bytes) -> bytes:
        """The full encrypted name (before any long-name hashing). Memoised: the mapping
        is deterministic for a given directory IV, and every lookup needs it."""
        cached = self._enc_cache.get((diriv, plain))
        if cached is not None:
            return cached
        validate_plain(plain)
        sealed = self._eme.encrypt(diriv, pad16(plain))
        cipher = b64.url_encode(sealed, self.raw64).encode("ascii")
        self._remember(diriv, plain, cipher)
        return cipher

    def _remember(self, diriv: bytes, plain: bytes, cipher: bytes) -> None:
        if len(self._enc_cache) >= NAME_CACHE:
            self._enc_cache.clear()
            self._dec_cache.clear()
        self._enc_cache[(diriv, plain)] = cipher
        self._dec_cache[(diriv, cipher)] = plain

    def decrypt(self, diriv: bytes, cipher: bytes) -> bytes:
        cached = self._dec_cache.get((diriv, cipher))
        if cached is not None:
            return cached
        plain = self._decrypt(diriv, cipher)
        self._remember(diriv, plain, cipher)
        return plain

    def _decrypt(self, diriv: bytes, cipher: bytes) -> bytes:
        raw = b64.url_decode(cipher, self.raw64)
        if not raw or len(raw) % BLOCK or len(raw) > NAME_MAX + 1:
            raise CorruptName("encrypted name has a bad length")
        plain = unpad16(self._eme.decrypt(diriv, raw))
        try:
            validate_plain(plain)
        except (InvalidName, NameTooLong):
            raise CorruptName("decrypted name is not a valid file name") from None
        return plain

    def backing_name(self, diriv: bytes, plain: bytes) -> BackingName:
        """Map a plaintext name to its backing entry (hashing long names)."""
        if self.plaintext_names:
            validate_plain(plain)
            return BackingName(plain)
        cipher = self.encrypt(diriv, plain)
        if len(cipher) <= self.longname_max:
            return BackingName(cipher)
        if not self.longnames:
            raise NameTooLong("encrypted name too long and long names are off")
        return BackingName(self.longname_hash(cipher), cipher)

    def longname_hash(self, cipher: bytes) -> bytes:
        digest = hashlib.sha256(cipher).digest()
        return LONGNAME_PREFIX + b64.url_encode(digest, self.raw64).encode("ascii")

    def check_companion(self, hashed: bytes, cipher: bytes) -> bytes:
        """Verify a .name file's content against its entry name; return the cipher name."""
        if self.longname_hash(cipher) != hashed:
            raise CorruptName("long-name companion does not match its hash")
        return cipher

    def is_hidden(self, backing: bytes, in_root: bool) -> bool:
        """Backing entries that are metadata, never shown as files."""
        if in_root and backing in (CONF_NAME, VOLUME_KEY_NAME):
            return True
        if self.plaintext_names:
            return False
        return (
            backing == DIRIV_NAME
            or is_longname_companion(backing)
            or backing.startswith(RMDIR_ARTIFACT_PREFIX)
        )

    # -- xattr names ---------------------------------------------------------------------
    def encrypt_xattr_name(self, plain: str) -> str:
        sealed = self._eme.encrypt(XATTR_TWEAK, pad16(plain.encode("utf-8", "surrogateescape")))
        return XATTR_PREFIX + b64.url_encode(sealed, self.raw64)

    def decrypt_xattr_name(self, backing: str) -> str:
        if not backing.startswith(XATTR_PREFIX):
            raise CorruptName("not an encrypted xattr name")
        raw = b64.url_decode(backing[len(XATTR_PREFIX) :], self.raw64)
        if not raw or len(raw) % BLOCK:
            raise CorruptName("encrypted xattr name has a bad length")
        plain = unpad16(self._eme.decrypt(XATTR_TWEAK, raw))
        if not plain or b"\0" in plain:
            raise CorruptName("decrypted xattr name is invalid")
        return plain.decode("utf-8", "surrogateescape")
