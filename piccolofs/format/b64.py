"""The two base64 dialects of the format, decoded strictly.

Names, long-name hashes and symlink targets use URL-safe base64, unpadded when the tree has
`Raw64`; JSON byte fields in gocryptfs.conf use standard padded base64. Decoding refuses
non-canonical input (stray padding, non-zero trailing bits, CR/LF) so that one plaintext
name has exactly one backing spelling.
"""

from __future__ import annotations

import base64
import binascii
import re

from piccolofs.format.errors import CorruptName

_URL_RAW = re.compile(rb"^[A-Za-z0-9_-]*$")
_URL_PAD = re.compile(rb"^[A-Za-z0-9_-]*={0,2}$")


def url_encode(data: bytes, raw: bool) -> str:
    out = base64.urlsafe_b64encode(data)
    if raw:
        out = out.rstrip(b"=")
    return out.decode("ascii")


def url_decode(text: bytes | str, raw: bool) -> bytes:
    try:
        s = text.encode("ascii") if isinstance(text, str) else text
    except UnicodeEncodeError:
        raise CorruptName("not base64url") from None
    if not (_URL_RAW if raw else _URL_PAD).match(s):
        raise CorruptName("not base64url")
    padded = s + b"=" * (-len(s) % 4) if raw else s
    if len(padded) % 4:
        raise CorruptName("bad base64 length")
    try:
        data = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        raise CorruptName("bad base64") from None
    if url_encode(data, raw).encode("ascii") != s:
        raise CorruptName("non-canonical base64")
    return data


def std_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def std_decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptName("bad standard base64") from None
