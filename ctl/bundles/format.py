"""The PCV bundle format: a plain POSIX (pax) tar with a signed manifest first.

A bundle carries the sealed keyset and each exported volume's ciphertext exactly as stored,
so it is no more sensitive than the state dir itself. `manifest.json` comes first so an
importer knows everything (volumes, every entry with its size and SHA-256) before it writes
anything, and `manifest.hmac` binds the manifest to the device's SDEK. Everything here is
pure: it builds header bytes and parses streams it is given, nothing else. The format is
specified in docs/bundle-format.md; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ctl.bundles.hashing import Hasher
from ctl.errors import InvalidInput
from ctl.paths import BOOTSTRAP, CONTROL
from ctl.volumes.metadata import CLASSES, CLUSTER_MODES, FOLLOWER_POLICIES

FORMAT = "piccolo-bundle"
VERSION = 1
KINDS = ("control", "full")
HMAC_INFO = b"piccolo bundle manifest v1"
MANIFEST_NAME = "manifest.json"
HMAC_NAME = "manifest.hmac"
HMAC_SIZE = 65  # 64 lowercase hex digits and a newline
KEYSET_PATH = "crypto/keyset.json"
MAX_MANIFEST = 64 * 1024 * 1024
ENTRY_TYPES = ("file", "dir", "symlink", "hardlink")
DESIRED_STATES = ("mounted", "unmounted")
PLACEHOLDER_SHA256 = "0" * 64
BLOCK = 512
RECORD = 10240  # tar's default record: 20 blocks
CHUNK = 256 * 1024  # the largest piece of file data held at once
MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTRS = 64
MAX_XATTR_VALUE = 64 * 1024
MAX_PAX = 64 * 1024
MAX_MTIME_NS = 8**11 * 10**9  # the ustar mtime field holds 11 octal digits of seconds
VOLUME_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
XATTR_NAMESPACES = ("user.", "trusted.", "security.")

ERROR_CODES = (
    "not_a_bundle", "truncated", "bad_header", "unsafe_path", "bad_type", "duplicate",
    "unsorted", "size_mismatch", "bad_checksum", "mismatch", "unexpected_entry",
    "future_version", "bad_manifest", "hmac_mismatch", "bad_sidecar",
)

_ZERO_BLOCK = bytes(BLOCK)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TYPEFLAGS = {"file": b"0", "dir": b"5", "symlink": b"2", "hardlink": b"1"}
_TYPE_OF_FLAG = {v: k for k, v in _TYPEFLAGS.items()}
_SPECIAL_FLAGS = {b"3": "character device", b"4": "block device", b"6": "fifo",
                  b"7": "contiguous file", b"\0": "old-style regular file"}
_PAX_KEYS = frozenset({"path", "linkpath", "size", "uid", "gid", "mtime"})
_PAX_HEADER_NAME = b"././@PaxHeader"


class BundleError(InvalidInput):
    """A bundle we refuse. `code` is stable (API, tests); the message names the entry."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ByteStream(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _fail(code: str, message: str) -> BundleError:
    return BundleError(code, message)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- paths -------------------------------------------------------------------------------


def path_parts(path: object, what: str = "path") -> tuple[str, ...]:
    """Split a relative '/'-path after checking it cannot name anything outside the root."""
    if not isinstance(path, str) or not path:
        raise _fail("unsafe_path", f"{what} must be a non-empty string")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("unsafe_path", f"{what} {path!r} is not valid UTF-8") from None
    if "\0" in path:
        raise _fail("unsafe_path", f"{what} {path!r} contains NUL")
    if path.startswith("/"):
        raise _fail("unsafe_path", f"{what} {path!r} is absolute")
    if len(raw) > MAX_PATH:
        raise _fail("unsafe_path", f"{what} {path[:64]!r}... is longer than {MAX_PATH} bytes")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise _fail("unsafe_path", f"{what} {path!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_NAME:
            raise _fail("unsafe_path", f"{what} {path!r} has a component over {MAX_NAME} bytes")
    return parts


def volume_of(path: str) -> str | None:
    """The volume an entry path belongs to (None for the keyset); unsafe_path otherwise."""
    parts = path_parts(path)
    if path == KEYSET_PATH:
        return None
    if len(parts) >= 3 and parts[0] == "volumes" and VOLUME_ID.fullmatch(parts[1]) \
            and parts[2] == "data":
        return parts[1]
    raise _fail("unsafe_path", f"{path!r} is neither {KEYSET_PATH} nor under volumes/<id>/data")


def volume_root(volume_id: str) -> str:
    return f"volumes/{volume_id}/data"


def sort_key(path: str) -> tuple[str, ...]:
    """Entries sort by path components, so a directory precedes its contents. Comparing
    code points equals comparing the UTF-8 bytes."""
    return tuple(path.split("/"))


def _check_symlink_target(target: str, path: str) -> None:
    """gocryptfs stores an encrypted symlink target as one base64url word, so a target is
    a single harmless component: nothing can point outside its directory."""
    raw = target.encode("utf-8", "surrogatepass")
    if not target or "/" in target or "\0" in target or target in (".", "..") \
            or len(raw) > MAX_PATH:
        raise _fail("bad_type", f"symlink {path!r} has an unsafe target {target[:64]!r}")
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("bad_type", f"symlink {path!r} target is not valid UTF-8") from None


# -- manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One data entry. `xattrs` maps a name to the base64 of its value, as in the JSON
    (a fresh sorted dict: treat it as read-only)."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    xattrs: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_entry_fields(self)
        object.__setattr__(self, "xattrs", _check_xattrs(self.xattrs, self.path, self.type))

    @property
    def volume(self) -> str | None:
        return volume_of(self.path)

    @property
    def rel(self) -> str:
        """The path inside the volume's cipher dir ("" for its root)."""
        return "/".join(self.path.split("/")[3:])

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode,
                               "uid": self.uid, "gid": self.gid, "mtime_ns": self.mtime_ns}
        if self.type == "file":
            obj.update(size=self.size, sha256=self.sha256)
        if self.type in ("symlink", "hardlink"):
            obj["target"] = self.target
        if self.xattrs:
            obj["xattrs"] = dict(self.xattrs)
        return obj

    @classmethod
    def from_json(cls, obj: object, index: int) -> Entry:
        if not isinstance(obj, dict):
            raise _fail("bad_manifest", f"entries[{index}] is not an object")
        path = obj.get("path")
        what = f"entry {path!r}" if isinstance(path, str) else f"entries[{index}]"
        kind = obj.get("type")
        if kind not in ENTRY_TYPES:
            raise _fail("bad_type", f"{what} has unsupported type {kind!r}")
        allowed = {"path", "type", "mode", "uid", "gid", "mtime_ns", "xattrs"}
        allowed |= {"file": {"size", "sha256"}, "symlink": {"target"},
                    "hardlink": {"target"}}.get(kind, set())
        _check_keys(obj, allowed, allowed - {"xattrs"}, what)
        xattrs = obj.get("xattrs", {})
        if not isinstance(xattrs, dict):
            raise _fail("bad_manifest", f"{what}: xattrs must be an object")
        return cls(path=obj["path"], type=kind, mode=obj["mode"], uid=obj["uid"],
                   gid=obj["gid"], mtime_ns=obj["mtime_ns"], size=obj.get("size"),
                   sha256=obj.get("sha256"), target=obj.get("target"), xattrs=xattrs)


def _check_keys(obj: Mapping[str, object], allowed: set[str], required: set[str],
                what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail("bad_manifest", f"{what} has unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - set(obj))
    if missing:
        raise _fail("bad_manifest", f"{what} lacks field(s) {', '.join(missing)}")


def _check_int(value: object, lo: int, hi: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise _fail("bad_manifest", f"{what} must be an integer in [{lo}, {hi})")


def _check_entry_fields(e: Entry) -> None:
    volume_of(e.path)
    what = f"entry {e.path!r}"
    if e.type not in ENTRY_TYPES:
        raise _fail("bad_type", f"{what} has unsupported type {e.type!r}")
    _check_int(e.mode, 0, 0o10000, f"{what}: mode")
    _check_int(e.uid, 0, 2**32, f"{what}: uid")
    _check_int(e.gid, 0, 2**32, f"{what}: gid")
    _check_int(e.mtime_ns, -MAX_MTIME_NS, MAX_MTIME_NS, f"{what}: mtime_ns")
    if e.type == "file":
        _check_int(e.size, 0, 2**63, f"{what}: size")
        if not isinstance(e.sha256, str) or not _HEX64.fullmatch(e.sha256):
            raise _fail("bad_manifest", f"{what}: sha256 must be 64 lowercase hex digits")
    elif e.size is not None or e.sha256 is not None:
        raise _fail("bad_manifest", f"{what}: only files have size and sha256")
    if e.type in ("symlink", "hardlink"):
        if not isinstance(e.target, str):
            raise _fail("bad_manifest", f"{what}: target must be a string")
        if e.type == "symlink":
            _check_symlink_target(e.target, e.path)
    elif e.target is not None:
        raise _fail("bad_manifest", f"{what}: only links have a target")


def _check_xattrs(xattrs: Mapping[str, str], path: str, kind: str) -> dict[str, str]:
    what = f"entry {path!r}"
    if not isinstance(xattrs, Mapping):
        raise _fail("bad_manifest", f"{what}: xattrs must map names to base64 values")
    if xattrs and kind == "hardlink":
        raise _fail("bad_manifest", f"{what}: a hard link's xattrs belong to its target")
    if len(xattrs) > MAX_XATTRS:
        raise _fail("bad_manifest", f"{what} has more than {MAX_XATTRS} xattrs")
    for name, value in xattrs.items():
        if not isinstance(name, str) or not name.startswith(XATTR_NAMESPACES) \
                or name in XATTR_NAMESPACES or "\0" in name \
                or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
            raise _fail("bad_manifest", f"{what} has an unsupported xattr name {name!r}")
        _check_xattr_value(value, f"{what}: xattr {name!r}")
    return dict(sorted(xattrs.items()))


def _check_xattr_value(value: object, what: str) -> None:
    if not isinstance(value, str) or len(value) > (MAX_XATTR_VALUE + 2) // 3 * 4:
        raise _fail("bad_manifest", f"{what} must be base64 of at most 64 KiB")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _fail("bad_manifest", f"{what} is not base64") from None


@dataclass(frozen=True)
class Volume:
    id: str
    volume_class: str
    cluster_mode: str
    follower_policy: str
    desired_state: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not VOLUME_ID.fullmatch(self.id):
            raise _fail("bad_manifest", f"volume id {self.id!r} must match {VOLUME_ID.pattern}")
        for value, choices, name in ((self.volume_class, CLASSES, "class"),
                                     (self.cluster_mode, CLUSTER_MODES, "cluster_mode"),
                                     (self.follower_policy, FOLLOWER_POLICIES,
                                      "follower_policy"),
                                     (self.desired_state, DESIRED_STATES, "desired_state")):
            if value not in choices:
                raise _fail("bad_manifest", f"volume {self.id!r}: {name} must be one of "
                            f"{', '.join(choices)}")
        expected = {BOOTSTRAP: "bootstrap", CONTROL: "control"}.get(self.id)
        if expected is not None and self.volume_class != expected:
            raise _fail("bad_manifest", f"volume {self.id!r} must have class {expected}")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "class": self.volume_class, "cluster_mode": self.cluster_mode,
                "follower_policy": self.follower_policy, "desired_state": self.desired_state}

    @classmethod
    def from_json(cls, obj: object, index: int) -> Volume:
        if not isinstance(obj, dict):
            raise _fail("bad_manifest", f"volumes[{index}] is not an object")
        keys = {"id", "class", "cluster_mode", "follower_policy", "desired_state"}
        _check_keys(obj, keys, keys, f"volumes[{index}]")
        return cls(obj["id"], obj["class"], obj["cluster_mode"], obj["follower_policy"],
                   obj["desired_state"])


@dataclass(frozen=True)
class StoreRef:
    """The control store's revision and checksum at export, for the operator to compare."""

    revision: int
    checksum: str

    def __post_init__(self) -> None:
        _check_int(self.revision, 0, 2**63, "store.revision")
        if not isinstance(self.checksum, str) or len(self.checksum) > 128:
            raise _fail("bad_manifest", "store.checksum must be a string of <= 128 chars")

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "checksum": self.checksum}


@dataclass(frozen=True)
class TpmPolicy:
    """How the source device sealed its bootstrap key (informational: a TPM never moves)."""

    pcrs: tuple[int, ...]
    pin: bool

    def __post_init__(self) -> None:
        pcrs = self.pcrs
        if not isinstance(pcrs, tuple) or not all(_is_int(p) and 0 <= p <= 23 for p in pcrs) \
                or list(pcrs) != sorted(set(pcrs)):
            raise _fail("bad_manifest", "tpm.pcrs must be ascending distinct PCRs 0..23")
        if not isinstance(self.pin, bool):
            raise _fail("bad_manifest", "tpm.pin must be a boolean")

    def to_json(self) -> dict[str, Any]:
        return {"pcrs": list(self.pcrs), "pin": self.pin}


@dataclass(frozen=True)
class Manifest:
    kind: str
    source_device: str
    store: StoreRef | None
    volumes: Sequence[Volume]
    tpm: TpmPolicy | None
    entries: Sequence[Entry]

    def __post_init__(self) -> None:
        object.__setattr__(self, "volumes", tuple(self.volumes))
        object.__setattr__(self, "entries", tuple(self.entries))
        if self.kind not in KINDS:
            raise _fail("bad_manifest", f"kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if not isinstance(self.source_device, str) or len(self.source_device) > 128:
            raise _fail("bad_manifest", "source_device must be a string of <= 128 chars")
        _check_volumes(self.kind, self.volumes)
        _check_entries(self.entries, {v.id for v in self.volumes})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind,
            "source_device": self.source_device,
            "store": None if self.store is None else self.store.to_json(),
            "volumes": [v.to_json() for v in self.volumes],
            "tpm": None if self.tpm is None else self.tpm.to_json(),
            "entries": [e.to_json() for e in self.entries],
        }

    def to_bytes(self, pad_to: int | None = None) -> bytes:
        """Canonical JSON and a newline, right-padded with spaces to exactly `pad_to`."""
        data = (json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True) + "\n").encode("ascii")
        if pad_to is not None:
            if len(data) > pad_to:
                raise ValueError(f"manifest needs {len(data)} bytes, {pad_to} reserved")
            data += b" " * (pad_to - len(data))
        if len(data) > MAX_MANIFEST:
            raise ValueError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST}")
        return data

    def with_hashes(self, sha256: Mapping[str, str]) -> Manifest:
        """The same manifest with the given file hashes (path -> hex) filled in."""
        entries = tuple(replace(e, sha256=sha256[e.path]) if e.path in sha256 else e
                        for e in self.entries)
        return replace(self, entries=entries)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls.from_json(_load_json(data))

    @classmethod
    def from_json(cls, obj: object) -> Manifest:
        """Format and version first: a future version may change everything else."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise _fail("not_a_bundle", f"manifest.json is not a {FORMAT} manifest")
        version = obj.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _fail("bad_manifest", f"manifest version {version!r} is invalid")
        if version > VERSION:
            raise _fail("future_version", f"bundle format version {version} is newer than "
                        f"this daemon understands ({VERSION}); upgrade piccolo to import it")
        keys = {"format", "version", "kind", "source_device", "store", "volumes", "tpm",
                "entries"}
        _check_keys(obj, keys, keys, "manifest")
        vols, entries = obj["volumes"], obj["entries"]
        if not isinstance(vols, list) or not isinstance(entries, list):
            raise _fail("bad_manifest", "manifest volumes and entries must be lists")
        return cls(kind=obj["kind"], source_device=obj["source_device"],
                   store=_parse_store(obj["store"]),
                   volumes=tuple(Volume.from_json(v, i) for i, v in enumerate(vols)),
                   tpm=_parse_tpm(obj["tpm"]),
                   entries=tuple(Entry.from_json(e, i) for i, e in enumerate(entries)))


def manifest_size(manifest: Manifest) -> int:
    """The exact length of `manifest.to_bytes()` once its hashes are known: every file's
    hash is 64 hex digits, so placeholders serialize to the same length. An exporter that
    writes the manifest before the data reserves this many bytes (or more, with pad_to)."""
    placeholders = {e.path: PLACEHOLDER_SHA256 for e in manifest.entries if e.type == "file"}
    return len(manifest.with_hashes(placeholders).to_bytes())


def _load_json(data: bytes) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key in a JSON object")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs,
                          parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail("bad_manifest", f"manifest.json is not valid JSON: {exc}") from None


def _parse_store(obj: object) -> StoreRef | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise _fail("bad_manifest", "store must be an object or null")
    _check_keys(obj, {"revision", "checksum"}, {"revision", "checksum"}, "store")
    return StoreRef(obj["revision"], obj["checksum"])


def _parse_tpm(obj: object) -> TpmPolicy | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise _fail("bad_manifest", "tpm must be an object or null")
    _check_keys(obj, {"pcrs", "pin"}, {"pcrs", "pin"}, "tpm")
    if not isinstance(obj["pcrs"], list):
        raise _fail("bad_manifest", "tpm.pcrs must be a list")
    return TpmPolicy(tuple(obj["pcrs"]), obj["pin"])


def _check_volumes(kind: str, volumes: Sequence[Volume]) -> None:
    ids = [v.id for v in volumes]
    for a, b in pairwise(ids):
        if a == b:
            raise _fail("duplicate", f"volume {a!r} is listed twice")
        if a > b:
            raise _fail("unsorted", f"volume {b!r} is listed after {a!r}")
    missing = {BOOTSTRAP, CONTROL} - set(ids)
    if missing:
        raise _fail("bad_manifest", f"a {kind} bundle must hold volume(s) "
                    f"{', '.join(sorted(missing))}")
    if kind == "control" and len(ids) != 2:
        extra = sorted(set(ids) - {BOOTSTRAP, CONTROL})
        raise _fail("bad_manifest", f"a control bundle holds only {BOOTSTRAP} and {CONTROL}, "
                    f"not {', '.join(extra)}")


def _check_entries(entries: Sequence[Entry], volume_ids: set[str]) -> None:
    """Order, completeness and references; per-entry fields were checked by Entry."""
    kinds: dict[str, str] = {}
    prev: tuple[str, ...] | None = None
    for e in entries:
        key = sort_key(e.path)
        if prev is not None and key == prev:
            raise _fail("duplicate", f"entry {e.path!r} is listed twice")
        if prev is not None and key < prev:
            raise _fail("unsorted", f"entry {e.path!r} is listed after {'/'.join(prev)!r}")
        prev = key
        _check_place(e, kinds, volume_ids)
        kinds[e.path] = e.type
    if KEYSET_PATH not in kinds:
        raise _fail("bad_manifest", f"the bundle has no {KEYSET_PATH}")
    for vid in sorted(volume_ids):
        if volume_root(vid) not in kinds:
            raise _fail("bad_manifest", f"volume {vid!r} has no {volume_root(vid)} entry")


def _check_place(e: Entry, kinds: Mapping[str, str], volume_ids: set[str]) -> None:
    vid = e.volume
    if vid is None:
        if e.type != "file":
            raise _fail("bad_type", f"{KEYSET_PATH} must be a file")
        return
    if vid not in volume_ids:
        raise _fail("unexpected_entry", f"entry {e.path!r} belongs to volume {vid!r}, which "
                    "the manifest does not list")
    if e.path == volume_root(vid):
        if e.type != "dir":
            raise _fail("bad_type", f"{e.path!r} must be a directory")
        return
    parent = e.path.rsplit("/", 1)[0]
    if kinds.get(parent) != "dir":
        raise _fail("unsafe_path", f"entry {e.path!r}: its parent is not a directory entry "
                    "of the bundle")
    if e.type == "hardlink":
        target = e.target or ""
        same_volume = target.startswith(volume_root(vid) + "/")
        if not same_volume or kinds.get(target) != "file":
            raise _fail("bad_type", f"hard link {e.path!r} must point to an earlier file of "
                        f"volume {vid!r}, not {target[:128]!r}")


# -- HMAC, sidecar -----------------------------------------------------------------------


def hmac_key(sdek: bytes | bytearray) -> bytes:
    if len(sdek) != 32:
        raise ValueError("the SDEK must be 32 bytes")
    return HKDF(hashes.SHA256(), 32, None, HMAC_INFO).derive(sdek)


def sign(sdek: bytes | bytearray, manifest_bytes: bytes) -> bytes:
    """The content of manifest.hmac for these exact manifest.json bytes."""
    mac = hmac.new(hmac_key(sdek), manifest_bytes, hashlib.sha256).hexdigest()
    return (mac + "\n").encode("ascii")


def verify(sdek: bytes | bytearray, manifest_bytes: bytes, hmac_bytes: bytes) -> None:
    if not hmac.compare_digest(sign(sdek, manifest_bytes), hmac_bytes):
        raise _fail("hmac_mismatch", "manifest.hmac does not match: the bundle was changed "
                    "or was not made with this keyset's SDEK")


def sidecar_line(sha_hex: str, filename: str) -> str:
    """`NAME.sha256` content in sha256sum format (checkable with `sha256sum -c`)."""
    if not _HEX64.fullmatch(sha_hex):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    if not filename or "/" in filename or "\n" in filename or "\\" in filename \
            or "\r" in filename:
        raise ValueError(f"unsupported bundle file name {filename!r}")
    return f"{sha_hex}  {filename}\n"


_SIDECAR = re.compile(r"([0-9a-fA-F]{64}) [ *]([^\n]+)\n?")


def parse_sidecar(text: str) -> str:
    """The lowercase SHA-256 hex of a one-line sha256sum file."""
    m = _SIDECAR.fullmatch(text)
    if m is None:
        raise _fail("bad_sidecar", "the .sha256 file is not one '<sha256>  <name>' line")
    return m.group(1).lower()


class HashingStream:
    """Passes reads through while hashing them: the whole-bundle SHA-256 in the same pass."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()

    def read(self, n: int, /) -> bytes:
        data = self._stream.read(n)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# -- writing tar headers -----------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return format(value, "o").zfill(width - 1).encode("ascii") + b"\0"


def _ustar_block(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 typeflag: bytes, linkname: bytes = b"") -> bytes:
    buf = bytearray(BLOCK)
    buf[0:len(name)] = name
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(uid, 8)
    buf[116:124] = _octal(gid, 8)
    buf[124:136] = _octal(size, 12)
    buf[136:148] = _octal(mtime, 12)
    buf[148:156] = b" " * 8
    buf[156:157] = typeflag
    buf[157:157 + len(linkname)] = linkname
    buf[257:265] = b"ustar\x0000"
    buf[329:337] = _octal(0, 8)
    buf[337:345] = _octal(0, 8)
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode("ascii") + body


def _fits_ustar(raw: bytes) -> bool:
    return len(raw) <= 100 and raw.isascii()


def entry_header(entry: Entry) -> bytes:
    """The tar header(s) of a data entry: an optional pax header, then the ustar block."""
    name = entry.path.encode("utf-8")
    link = (entry.target or "").encode("utf-8")
    size = entry.size or 0
    sec, ns = divmod(entry.mtime_ns, 10**9)
    records: dict[str, bytes] = {}
    if not _fits_ustar(name):
        records["path"] = name
    if not _fits_ustar(link):
        records["linkpath"] = link
    if size >= 8**11:
        records["size"] = str(size).encode("ascii")
    if entry.uid >= 8**7:
        records["uid"] = str(entry.uid).encode("ascii")
    if entry.gid >= 8**7:
        records["gid"] = str(entry.gid).encode("ascii")
    if entry.mtime_ns < 0:  # before 1970: sign and magnitude, as GNU tar reads it
        records["mtime"] = b"-%d.%09d" % divmod(-entry.mtime_ns, 10**9)
        sec = 0
    elif ns:
        records["mtime"] = b"%d.%09d" % (sec, ns)
    block = _ustar_block(name[:100], entry.mode, 0 if "uid" in records else entry.uid,
                         0 if "gid" in records else entry.gid, 0 if "size" in records else size,
                         sec, _TYPEFLAGS[entry.type], link[:100])
    if not records:
        return block
    pax = b"".join(_pax_record(k, records[k]) for k in sorted(records))
    return _ustar_block(_PAX_HEADER_NAME, 0, 0, 0, len(pax), 0, b"x") + pax + pad(len(pax)) \
        + block


def member_header(name: str, size: int) -> bytes:
    """The header of manifest.json or manifest.hmac: a file, 0600, owned by 0:0, mtime 0."""
    raw = name.encode("ascii")
    if not _fits_ustar(raw) or not 0 <= size < 8**11:
        raise ValueError(f"{name!r} of {size} bytes does not fit a plain ustar header")
    return _ustar_block(raw, 0o600, 0, 0, size, 0, b"0")


def pad(size: int) -> bytes:
    """Zeros from the end of `size` bytes of member data to the next block."""
    return bytes(-size % BLOCK)


def end_of_archive(offset_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to the next multiple of the 10240-byte record."""
    if offset_so_far % BLOCK:
        raise ValueError("the archive so far must end on a 512-byte block")
    end = offset_so_far + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


def prelude(manifest_bytes: bytes, hmac_bytes: bytes) -> bytes:
    """The first two members, manifest.json and manifest.hmac, each padded to a block."""
    return (member_header(MANIFEST_NAME, len(manifest_bytes)) + manifest_bytes
            + pad(len(manifest_bytes)) + member_header(HMAC_NAME, len(hmac_bytes))
            + hmac_bytes + pad(len(hmac_bytes)))


# -- reading tar -------------------------------------------------------------------------


class _Source:
    """Exact reads with an offset, so every truncation is caught and located."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self.offset = 0

    def read_upto(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._stream.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        self.offset += got
        return b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        start = self.offset
        data = self.read_upto(n)
        if len(data) < n:
            raise _fail("truncated", f"the bundle ends at byte {self.offset} inside {what} "
                        f"(bytes {start}..{start + n})")
        return data

    def skip_padding(self, size: int, what: str) -> None:
        if self.read_exact(-size % BLOCK, f"the padding after {what}").strip(b"\0"):
            raise _fail("bad_header", f"non-zero padding after {what}")


@dataclass
class _Member:
    name: str
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    offset: int


def _number(raw: bytes, what: str, offset: int) -> int:
    if raw[:1] and raw[0] & 0x80:
        raise _fail("bad_header", f"tar header at byte {offset}: base-256 {what} unsupported")
    digits = raw.split(b"\0", 1)[0].strip(b" ")
    if not digits or digits.strip(b"01234567"):
        raise _fail("bad_header", f"tar header at byte {offset}: {what} is not octal")
    return int(digits, 8)


def _text(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("bad_header", f"tar header at byte {offset}: {what} is not UTF-8") from None


def _parse_block(block: bytes, offset: int, gnu: bool) -> _Member:
    """One ustar (or, for the Go reader, GNU) header block, checksum verified."""
    stored = _number(block[148:156], "checksum", offset)
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise _fail("bad_header", f"tar header at byte {offset}: checksum mismatch")
    magic = block[257:265]
    is_gnu = magic == b"ustar  \0"
    if is_gnu and not gnu:
        raise _fail("bad_header", f"tar header at byte {offset}: GNU format (long names?); "
                    "bundles use POSIX pax headers only")
    if magic != b"ustar\x0000" and not is_gnu:
        raise _fail("bad_header", f"tar header at byte {offset}: not a POSIX ustar header")
    name = _text(block[0:100], "name", offset)
    prefix = "" if is_gnu else _text(block[345:500], "prefix", offset)
    return _Member(name=f"{prefix}/{name}" if prefix else name, typeflag=block[156:157],
                   mode=_number(block[100:108], "mode", offset),
                   uid=_number(block[108:116], "uid", offset),
                   gid=_number(block[116:124], "gid", offset),
                   size=_number(block[124:136], "size", offset),
                   mtime_ns=_number(block[136:148], "mtime", offset) * 10**9,
                   linkname=_text(block[157:257], "linkname", offset), offset=offset)


def _parse_pax(data: bytes, allowed: frozenset[str], offset: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise _fail("bad_header", f"pax header at byte {offset}: malformed record")
        end = pos + int(length_text)
        if end > len(data) or end <= space or data[end - 1:end] != b"\n":
            raise _fail("bad_header", f"pax header at byte {offset}: malformed record")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        name = key.decode("ascii", "replace")
        if not eq or name not in allowed:
            raise _fail("bad_header", f"pax header at byte {offset}: unsupported record "
                        f"{name[:32]!r}")
        if name in out:
            raise _fail("bad_header", f"pax header at byte {offset}: repeated record {name!r}")
        out[name] = value
        pos = end
    return out


_PAX_MTIME_STRICT = re.compile(rb"(-?)(0|[1-9][0-9]*)(?:\.([0-9]{9}))?")
_PAX_MTIME_LOOSE = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")


def _apply_pax(m: _Member, pax: Mapping[str, bytes], strict: bool) -> None:
    where = f"pax header before byte {m.offset}"

    def decimal(key: str) -> int:
        if not pax[key].isdigit():
            raise _fail("bad_header", f"{where}: {key} is not a decimal number")
        return int(pax[key])

    def text(key: str) -> str:
        try:
            return pax[key].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("bad_header", f"{where}: {key} is not UTF-8") from None

    if "path" in pax:
        m.name = text("path")
    if "linkpath" in pax:
        m.linkname = text("linkpath")
    for key in ("size", "uid", "gid"):
        if key in pax:
            setattr(m, key, decimal(key))
    if "mtime" in pax:
        match = (_PAX_MTIME_STRICT if strict else _PAX_MTIME_LOOSE).fullmatch(pax["mtime"])
        if match is None:
            raise _fail("bad_header", f"{where}: malformed mtime")
        frac = (match.group(3) or b"")[:9].ljust(9, b"0")
        magnitude = int(match.group(2)) * 10**9 + int(frac)
        m.mtime_ns = -magnitude if match.group(1) else magnitude


def _next_member(src: _Source, pax_keys: frozenset[str], gnu: bool) -> _Member | None:
    """The next member with its extension headers applied; None at a zero block."""
    pax: dict[str, bytes] | None = None
    longs: dict[bytes, str] = {}
    while True:
        offset = src.offset
        block = src.read_exact(BLOCK, "a tar header")
        if block == _ZERO_BLOCK:
            if pax is not None or longs:
                raise _fail("bad_header", f"extension header before byte {offset} describes "
                            "no member")
            return None
        m = _parse_block(block, offset, gnu)
        flag = m.typeflag
        if flag == b"x" and pax is None:
            pax = _parse_pax(_extension_data(src, m), pax_keys, offset)
        elif flag in (b"L", b"K") and gnu and flag not in longs:
            longs[flag] = _text(_extension_data(src, m), "GNU long name", offset)
        elif flag in (b"x", b"g", b"L", b"K"):
            raise _fail("bad_header", f"tar header at byte {offset}: unsupported extension "
                        f"header type {flag.decode('latin-1')!r}")
        else:
            break
    if b"L" in longs:
        m.name = longs[b"L"]
    if b"K" in longs:
        m.linkname = longs[b"K"]
    if pax:
        _apply_pax(m, pax, strict=not gnu)
    return m


def _extension_data(src: _Source, m: _Member) -> bytes:
    if m.size > MAX_PAX:
        raise _fail("bad_header", f"extension header at byte {m.offset} is too large")
    data = src.read_exact(m.size, f"the extension header at byte {m.offset}")
    src.skip_padding(m.size, f"the extension header at byte {m.offset}")
    return data


class _Chunks:
    """A file's data, streamed; its SHA-256 (when known) is checked before the last chunk
    is handed out, and whatever the caller leaves unread is read and checked by finish()."""

    def __init__(self, src: _Source, name: str, size: int, sha256: str | None,
                 hasher: Hasher | None = None) -> None:
        self._src, self._name, self._remaining = src, name, size
        self._size, self._sha256 = size, sha256
        self._hasher = hasher  # hashes while the caller writes the chunk it was given
        self._hash = hashlib.sha256()
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._remaining == 0:
            self._complete()
            raise StopIteration
        data = self._src.read_exact(min(CHUNK, self._remaining), f"the data of {self._name!r}")
        self._remaining -= len(data)
        if self._hasher is not None:
            self._hasher.feed(data)
        else:
            self._hash.update(data)
        if self._remaining == 0:
            self._complete()
        return data

    def finish(self) -> None:
        for _ in self:
            pass

    def _complete(self) -> None:
        if self._done:
            return
        self._done = True
        digest = self._hasher.digest() if self._hasher else self._hash.hexdigest()
        if self._sha256 is not None and digest != self._sha256:
            raise _fail("bad_checksum", f"{self._name!r}: SHA-256 of its data does not match "
                        "the manifest")
        self._src.skip_padding(self._size, f"the data of {self._name!r}")


def _finish_archive(src: _Source, zero_blocks_read: int = 0) -> None:
    """Two zero blocks, then nothing but zeros up to the record boundary (or EOF)."""
    for _ in range(2 - zero_blocks_read):
        offset = src.offset
        block = src.read_exact(BLOCK, "the end-of-archive marker")
        if block != _ZERO_BLOCK:
            raise _fail("unexpected_entry", f"{_describe(block, offset)} after the last "
                        "entry of the manifest")
    limit = -src.offset % RECORD
    rest = src.read_upto(limit + 1)
    if rest.strip(b"\0") or len(rest) > limit:
        raise _fail("unexpected_entry", f"data after the end of the archive at byte "
                    f"{src.offset - len(rest)}")
    if 0 < len(rest) < limit:
        raise _fail("truncated", f"the bundle ends at byte {src.offset} inside the padding "
                    "of its last record")


def _describe(block: bytes, offset: int) -> str:
    try:
        return f"member {_parse_block(block, offset, gnu=True).name!r} at byte {offset}"
    except BundleError:
        return f"data at byte {offset}"


# -- the bundle reader -------------------------------------------------------------------


class Reader:
    """Streams a bundle: `open()` reads and parses the manifest, then `entries()` yields
    each data entry in manifest order as (entry, chunks) -- chunks is an iterator of bytes
    for files, None otherwise -- checking every header against the manifest and every
    file against its size and SHA-256. Memory stays bounded by CHUNK and the manifest.
    Chunks the caller leaves unread are read and checked when it moves on; after a
    BundleError the reader is spent.

    The HMAC is not checked here: its key comes from the keyset inside the bundle, so the
    importer reads crypto/keyset.json (always the first entry), unseals the SDEK and calls
    `verify(sdek)` before it trusts anything else."""

    def __init__(self, stream: ByteStream) -> None:
        self._src = _Source(stream)
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""
        self.hmac_bytes = b""
        self._iterating = False

    @property
    def offset(self) -> int:
        return self._src.offset

    def open(self) -> Manifest:
        if self.manifest is not None:
            return self.manifest
        self.manifest_bytes = self._read_fixed(MANIFEST_NAME, first=True)
        manifest = Manifest.from_bytes(self.manifest_bytes)
        self.hmac_bytes = self._read_fixed(HMAC_NAME, first=False)
        if not re.fullmatch(rb"[0-9a-f]{64}\n", self.hmac_bytes):
            raise _fail("bad_manifest", "manifest.hmac is not 64 lowercase hex digits and a "
                        "newline")
        self.manifest = manifest
        return manifest

    def verify(self, sdek: bytes | bytearray) -> None:
        self.open()
        verify(sdek, self.manifest_bytes, self.hmac_bytes)

    def entries(self) -> Iterator[tuple[Entry, Iterator[bytes] | None]]:
        manifest = self.open()
        if self._iterating:
            raise RuntimeError("a bundle's entries can be read only once")
        self._iterating = True
        index = {e.path: i for i, e in enumerate(manifest.entries)}
        hasher = Hasher()
        try:
            for i, entry in enumerate(manifest.entries):
                m = _next_member(self._src, _PAX_KEYS, gnu=False)
                if m is None:
                    raise _fail("truncated", f"the archive ends before entry {entry.path!r}")
                _check_member(m, entry, i, index)
                if entry.type == "file":
                    chunks = _Chunks(self._src, entry.path, m.size, entry.sha256, hasher)
                    yield entry, chunks
                    chunks.finish()
                else:
                    yield entry, None
            _finish_archive(self._src)
        finally:
            hasher.close()

    def _read_fixed(self, name: str, first: bool) -> bytes:
        """manifest.json or manifest.hmac: a plain member with the fixed header fields."""
        offset = self._src.offset
        block = self._src.read_upto(BLOCK)
        expected = name.encode("ascii") + b"\0"
        if first and not block.startswith(expected[:len(block)]):
            raise _fail("not_a_bundle", f"the stream does not start with {MANIFEST_NAME}")
        if first and len(block) == BLOCK and block[257:263] != b"ustar\0":
            raise _fail("not_a_bundle", "the stream is not a POSIX tar")
        if len(block) < BLOCK:
            raise _fail("truncated", f"the bundle ends at byte {self._src.offset} inside the "
                        f"header of {name}")
        if block == _ZERO_BLOCK or not block.startswith(expected):
            raise _fail("bad_manifest", f"the bundle's member at byte {offset} is not {name}")
        m = _parse_block(block, offset, gnu=False)
        if (m.typeflag, m.mode, m.uid, m.gid, m.mtime_ns, m.linkname) \
                != (b"0", 0o600, 0, 0, 0, ""):
            raise _fail("bad_header", f"{name} must be a plain file, mode 0600, 0:0, mtime 0")
        limit = MAX_MANIFEST if first else HMAC_SIZE
        if not 0 < m.size <= limit or (not first and m.size != HMAC_SIZE):
            raise _fail("bad_manifest", f"{name} has an invalid size of {m.size} bytes")
        data = self._src.read_exact(m.size, name)
        self._src.skip_padding(m.size, name)
        return data


def _member_type(m: _Member) -> str:
    kind = _TYPE_OF_FLAG.get(m.typeflag)
    if kind is None:
        what = _SPECIAL_FLAGS.get(m.typeflag, f"type {m.typeflag.decode('latin-1')!r}")
        raise _fail("bad_type", f"member {m.name!r} at byte {m.offset} is a {what}; bundles "
                    "hold only files, directories, symlinks and hard links")
    return kind


def _check_member(m: _Member, entry: Entry, i: int, index: Mapping[str, int]) -> None:
    kind = _member_type(m)
    volume_of(m.name)
    j = index.get(m.name)
    if j is None:
        raise _fail("unexpected_entry", f"member {m.name!r} at byte {m.offset} is not listed "
                    "in the manifest")
    if j < i:
        raise _fail("duplicate", f"member {m.name!r} at byte {m.offset} appears twice")
    if j > i:
        raise _fail("unsorted", f"member {m.name!r} at byte {m.offset} comes before "
                    f"{entry.path!r}, against the manifest's order")
    size = entry.size if entry.type == "file" else 0
    if m.size != size:
        raise _fail("size_mismatch", f"{m.name!r}: the tar header says {m.size} bytes, the "
                    f"manifest {size}")
    want = (entry.type, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.target or "")
    got = (kind, m.mode, m.uid, m.gid, m.mtime_ns, m.linkname)
    for name, w, g in zip(("type", "mode", "uid", "gid", "mtime", "link target"), want, got,
                          strict=True):
        if w != g:
            raise _fail("mismatch", f"{m.name!r}: the tar header's {name} {g!r} disagrees "
                        f"with the manifest's {w!r}")


_GO_HEAD = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"kind"[ \t\r\n]*:')


def sniff(first_bytes: bytes) -> str | None:
    """"bundle", "go-envelope" (the Go daemon's JSON .pcv) or None, from the first bytes
    of a file (pass at least 512 of them when the file has that many)."""
    head = MANIFEST_NAME.encode("ascii") + b"\0"
    if first_bytes.startswith(head) and \
            (len(first_bytes) < 263 or first_bytes[257:263] == b"ustar\0"):
        return "bundle"
    if _GO_HEAD.match(first_bytes):
        return "go-envelope"
    return None
