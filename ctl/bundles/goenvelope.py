"""The original Go daemon's `.pcv` export: a JSON envelope around a base64 tar.

    {
      "kind": "control_only" | "full_data",
      "generated_at": "<RFC 3339>",
      "sha256": "<hex of the raw tar>",
      "blob_b64": "<padded standard base64 of the tar>"
    }

(json.MarshalIndent with two spaces and a trailing newline.) Such files can be large, so the
blob is decoded as it is read and never held whole; its SHA-256 is checked when the blob
ends, before `read` reports the end. The inner tar has no manifest and no per-file hashes:
what it yields is trusted only once iteration has ended without an error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from ctl.bundles.format import (
    BundleError,
    ByteStream,
    _Chunks,
    _finish_archive,
    _Member,
    _next_member,
    _Source,
    path_parts,
)
from ctl.paths import BOOTSTRAP, CONTROL

GO_KINDS = {"control_only": "control", "full_data": "full"}
GO_VOLUMES = (BOOTSTRAP, CONTROL)
MAX_HEAD = 64 * 1024  # everything before the blob: three short fields
MAX_TAIL = 4096  # whitespace and the closing brace after the blob
B64_CHUNK = 64 * 1024  # base64 characters decoded at a time (a multiple of 4)

_WS = rb"[ \t\r\n]*"
_BLOB_KEY = b'"blob_b64"'
_BLOB_OPEN = re.compile(_WS + b":" + _WS + b'"')
_BLOB_OPEN_PREFIX = re.compile(_WS + b"(?::" + _WS + b")?")
_TAIL = re.compile(_WS + rb"\}" + _WS)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GO_PAX_KEYS = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname",
                          "mtime", "atime", "ctime"})


class GoEnvelope:
    """A readable stream of the tar inside a Go envelope; `kind` is ours (control/full),
    `go_kind` the envelope's own word."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._b64 = b""  # base64 read but not yet decoded (less than 4 characters or so)
        self._out = bytearray()  # decoded, not yet returned
        self._hash = hashlib.sha256()
        self._decoded = 0
        self._ended = False
        head, rest = self._read_head()
        self.go_kind: str = head["kind"]
        self.kind = GO_KINDS[self.go_kind]
        self.generated_at: str = head["generated_at"]
        self.sha256: str = head["sha256"]
        self._b64 = rest

    def read(self, n: int, /) -> bytes:
        if n < 0:
            raise ValueError("GoEnvelope.read needs a size: the blob is never held whole")
        while len(self._out) < n and not self._ended:
            self._fill()
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    # -- the head: everything up to the blob's opening quote -------------------------------
    def _read_head(self) -> tuple[dict[str, str], bytes]:
        buf = b""
        while _BLOB_KEY not in buf:
            if len(buf) > MAX_HEAD:
                raise BundleError("bad_manifest", "legacy envelope: no blob_b64 in its first "
                                  f"{MAX_HEAD} bytes")
            buf += self._more("its header")
        key_at = buf.index(_BLOB_KEY)
        head = _parse_head(buf[:key_at])
        after = buf[key_at + len(_BLOB_KEY):]
        while (m := _BLOB_OPEN.match(after)) is None:
            if not _BLOB_OPEN_PREFIX.fullmatch(after) or len(after) > MAX_TAIL:
                raise BundleError("bad_manifest", "legacy envelope: blob_b64 is not a string")
            after += self._more("its header")
        return head, after[m.end():]

    def _more(self, where: str) -> bytes:
        data = self._stream.read(B64_CHUNK)
        if not data:
            raise BundleError("truncated", f"the legacy envelope ends inside {where}")
        return data

    # -- the blob ----------------------------------------------------------------------------
    def _fill(self) -> None:
        if b'"' not in self._b64:
            self._b64 += self._more("blob_b64")
        chunk = self._b64
        quote = chunk.find(b'"')
        body = chunk if quote < 0 else chunk[:quote]
        usable = len(body) if quote >= 0 else len(body) - len(body) % 4
        pad_at = body.find(b"=")
        if quote < 0 and pad_at >= 0:  # the final group may still await its closing quote
            if len(body) > pad_at + 2:
                raise BundleError("bad_manifest", "legacy envelope: padding inside blob_b64 "
                                  f"near decoded byte {self._decoded}")
            usable = min(usable, pad_at - pad_at % 4)
        try:
            data = base64.b64decode(body[:usable], validate=True)
        except (binascii.Error, ValueError):
            raise BundleError("bad_manifest", "legacy envelope: blob_b64 is not valid base64 "
                              f"near decoded byte {self._decoded}") from None
        self._hash.update(data)
        self._out += data
        self._decoded += len(data)
        if quote < 0:
            self._b64 = body[usable:]
            return
        self._b64 = b""
        self._end(chunk[quote + 1:])

    def _end(self, tail: bytes) -> None:
        """The blob is complete: its hash must match, and the JSON must close properly."""
        if self._hash.hexdigest() != self.sha256:
            raise BundleError("bad_checksum", "legacy envelope: the SHA-256 of its tar does "
                              "not match its sha256 field")
        while True:
            if _TAIL.fullmatch(tail):
                more = self._stream.read(MAX_TAIL)
                if not more:
                    break
                tail += more
            elif re.fullmatch(_WS, tail):
                tail += self._more("its closing brace")
            else:
                raise BundleError("bad_manifest", "legacy envelope: its JSON does not end "
                                  "with blob_b64 and a closing brace")
            if len(tail) > MAX_TAIL:
                raise BundleError("bad_manifest", "legacy envelope: unexpected data after "
                                  "its closing brace")
        self._ended = True


def _parse_head(head: bytes) -> dict[str, str]:
    """`{"kind": ..., "generated_at": ..., "sha256": ...,` -- exactly those, blob last."""
    text = head.rstrip(b" \t\r\n")
    if not text.endswith(b","):
        raise BundleError("bad_manifest", "legacy envelope: blob_b64 is not a field of it")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    try:
        obj = json.loads(text[:-1].decode("utf-8") + "}", object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleError("bad_manifest", "legacy envelope: its header is not JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"kind", "generated_at", "sha256"}:
        raise BundleError("bad_manifest", "legacy envelope: fields must be kind, "
                          "generated_at, sha256, blob_b64")
    if obj["kind"] not in GO_KINDS:
        raise BundleError("bad_manifest", f"legacy envelope: unknown kind {obj['kind']!r}")
    if not isinstance(obj["generated_at"], str) or not _RFC3339.fullmatch(obj["generated_at"]):
        raise BundleError("bad_manifest", "legacy envelope: generated_at is not RFC 3339")
    if not isinstance(obj["sha256"], str) or not _HEX64.fullmatch(obj["sha256"]):
        raise BundleError("bad_manifest", "legacy envelope: sha256 is not 64 lowercase hex")
    return obj


class GoMember(NamedTuple):
    """One member of a Go tar. `rel` is the path inside the volume's cipher dir ("" for
    its root); `mtime` is in whole seconds, as Go writes it; chunks is None for dirs."""

    volume: str
    rel: str
    type: str
    mode: int
    size: int
    mtime: int
    chunks: Iterator[bytes] | None


class GoTarReader:
    """Iterates the tar of a Go envelope: `control/...` and `bootstrap/...`, directories
    and regular files only (the Go daemon refused symlinks), each dir before its contents.
    After the last member it reads its stream to the end, so a GoEnvelope's checksum is
    verified before the iteration ends."""

    def __init__(self, stream: ByteStream) -> None:
        self._src = _Source(stream)

    def __iter__(self) -> Iterator[GoMember]:
        kinds: dict[str, str] = {}
        while (m := _next_member(self._src, _GO_PAX_KEYS, gnu=True)) is not None:
            volume, rel, kind = _go_place(m, kinds)
            if kind == "file":
                chunks = _Chunks(self._src, m.name, m.size, None)
                yield GoMember(volume, rel, kind, m.mode & 0o7777, m.size,
                               m.mtime_ns // 10**9, chunks)
                chunks.finish()
            else:
                if m.size:
                    raise BundleError("size_mismatch", f"directory {m.name!r} has a size")
                yield GoMember(volume, rel, kind, m.mode & 0o7777, 0, m.mtime_ns // 10**9,
                               None)
        _finish_archive(self._src, zero_blocks_read=1)
        if self._src.read_upto(1):  # reading to the end lets a GoEnvelope check its hash
            raise BundleError("unexpected_entry", "data after the end of the legacy tar")


def _go_place(m: _Member, kinds: dict[str, str]) -> tuple[str, str, str]:
    """(volume, rel, type) of a Go tar member, refusing anything but safe dirs and files."""
    flag = m.typeflag
    if flag == b"5":
        kind = "dir"
    elif flag in (b"0", b"\0"):
        kind = "file"
    else:
        what = {b"2": "symlink", b"1": "hard link"}.get(flag, f"type {flag!r} member")
        raise BundleError("bad_type", f"{m.name!r} at byte {m.offset} is a {what}; the Go "
                          "daemon wrote only directories and regular files")
    name = m.name[:-1] if kind == "dir" and m.name.endswith("/") else m.name
    parts = path_parts(name, "member")
    if parts[0] not in GO_VOLUMES:
        raise BundleError("unexpected_entry", f"{m.name!r}: legacy envelopes carry only the "
                          f"{BOOTSTRAP} and {CONTROL} volumes")
    if name in kinds:
        raise BundleError("duplicate", f"{m.name!r} appears twice in the legacy tar")
    if len(parts) == 1 and kind != "dir":
        raise BundleError("bad_type", f"{m.name!r} must be a directory")
    if len(parts) > 1 and kinds.get(name.rsplit("/", 1)[0]) != "dir":
        raise BundleError("unsafe_path", f"{m.name!r}: its parent is not an earlier directory "
                          "of the tar")
    kinds[name] = kind
    return parts[0], "/".join(parts[1:]), kind
