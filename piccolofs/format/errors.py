"""Domain errors of the on-disk format.

Each names what is wrong without echoing key material or plaintext; the layers above map them
to errno values (FUSE) or exit codes (CLI) in one place each.
"""


class FormatError(Exception):
    """Base class: the bytes on disk do not follow the format."""


class ConfigError(FormatError):
    """gocryptfs.conf is unreadable, malformed, or uses something we refuse."""


class UnsupportedFeature(ConfigError):
    """A feature flag or version we do not know: refusing is the only safe answer."""


class WrongPassword(FormatError):
    """The master key did not authenticate under the derived key-encryption key."""


class AuthenticationError(FormatError):
    """An AEAD tag did not verify: the ciphertext was tampered with or truncated."""


class CorruptHeader(FormatError):
    """A file header is malformed (bad version, all-zero ID, truncated)."""


class CorruptName(FormatError):
    """A backing name is not a valid encrypted name (base64, length, padding)."""


class NameTooLong(FormatError):
    """A plaintext name, or what it becomes on disk, exceeds the allowed length."""


class InvalidName(FormatError):
    """A plaintext name that no directory may hold (empty, '.', '..', '/', NUL)."""
