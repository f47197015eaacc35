"""The PCV bundle format (ctl/bundles/format.py) and the Go envelope (goenvelope.py).

Pure and fast: bundles are built in memory from the module's header functions, read back
with its streaming Reader, listed by GNU tar and Python's tarfile, and broken on purpose.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ctl.bundles import format as fmt
from ctl.bundles.format import BundleError, Entry, Manifest, Reader, Volume
from ctl.bundles.goenvelope import GoEnvelope, GoMember, GoTarReader

SDEK = bytes(range(32))
T = 1_700_000_000_000_000_000
T_NS = 1_700_000_000_123_456_789
CTL = "volumes/control/data"
BOOT = "volumes/bootstrap/data"
LONG = "L" * 150
TARGET = "c2VjcmV0" * 30  # 240 chars: needs a pax linkpath


def file(path: str, data: bytes, **kw: Any) -> tuple[Entry, bytes]:
    fields: dict[str, Any] = {"mode": 0o600, "uid": 0, "gid": 0, "mtime_ns": T_NS} | kw
    return Entry(path=path, type="file", size=len(data),
                 sha256=hashlib.sha256(data).hexdigest(), **fields), data


def node(path: str, kind: str, **kw: Any) -> tuple[Entry, None]:
    fields: dict[str, Any] = {"mode": 0o700, "uid": 0, "gid": 0, "mtime_ns": T} | kw
    return Entry(path=path, type=kind, **fields), None


def volumes(*apps: str) -> list[Volume]:
    core = [Volume("bootstrap", "bootstrap", "stateful", "read_only", "mounted"),
            Volume("control", "control", "stateful", "read_only", "mounted")]
    return sorted(core + [Volume(a, "application", "stateful", "detached", "unmounted")
                          for a in apps], key=lambda v: v.id)


def sample() -> list[tuple[Entry, bytes | None]]:
    """Every entry type, pax paths and link targets, ns mtimes, a big uid, xattrs."""
    big = bytes(range(256)) * 40
    return [
        file("crypto/keyset.json", b'{"version":1}\n'),
        node(BOOT, "dir"),
        file(f"{BOOT}/gocryptfs.conf", b"{}\n", mode=0o400),
        node(CTL, "dir", xattrs={"user.gocryptfs.x": base64.b64encode(b"\0\1").decode()}),
        file(f"{CTL}/{LONG}", big, mtime_ns=T),
        node(f"{CTL}/abc", "dir", mode=0o2755),
        file(f"{CTL}/abc/data", b"payload" * 100, uid=3_000_000, gid=4_000_000_000),
        node(f"{CTL}/abc/data2", "hardlink", mode=0o600, mtime_ns=T_NS,
             target=f"{CTL}/abc/data"),
        node(f"{CTL}/abc/link", "symlink", mode=0o777, target=TARGET),
        file(f"{CTL}/empty", b""),
        file(f"{CTL}/gocryptfs.diriv", b"\x11" * 16),
        node(f"{CTL}/short", "symlink", mode=0o777, target="dGFyZ2V0"),
        file(f"{CTL}/\u00fcn\u00efc\u00f6de", b"x"),
    ]


def manifest_of(items: list[tuple[Entry, bytes | None]], kind: str = "control",
                vols: list[Volume] | None = None) -> Manifest:
    return Manifest(kind=kind, source_device="device-a",
                    store=fmt.StoreRef(7, "ab" * 32), volumes=vols or volumes(),
                    tpm=fmt.TpmPolicy((0, 7), False), entries=[e for e, _ in items])


def members(items: Iterable[tuple[Entry, bytes | None]]) -> bytes:
    out = b""
    for entry, data in items:
        out += fmt.entry_header(entry)
        if data is not None:
            out += data + fmt.pad(len(data))
    return out


def assemble(manifest_bytes: bytes, body: bytes, sdek: bytes = SDEK) -> bytes:
    out = fmt.prelude(manifest_bytes, fmt.sign(sdek, manifest_bytes)) + body
    return out + fmt.end_of_archive(len(out))


def build(items: list[tuple[Entry, bytes | None]] | None = None, **kw: Any) -> bytes:
    items = sample() if items is None else items
    return assemble(manifest_of(items, **kw).to_bytes(), members(items))


def canonical(obj: object) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


class Trickle(io.BytesIO):
    """A stream that hands out a few bytes per read, as a pipe or socket may."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        super().__init__(data)
        self.step = step

    def read(self, n: int | None = -1, /) -> bytes:
        return super().read(self.step if n is None or n < 0 else min(n, self.step))


def read_all(data: bytes, consume: bool = True,
             stream: Callable[[bytes], Any] = io.BytesIO) -> list[tuple[Entry, bytes | None]]:
    reader = Reader(stream(data))
    reader.open()
    out: list[tuple[Entry, bytes | None]] = []
    for entry, chunks in reader.entries():
        body = None if chunks is None else (b"".join(chunks) if consume else b"")
        out.append((entry, body))
    return out


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(BundleError) as info:
        fn()
    assert info.value.code in fmt.ERROR_CODES
    return info.value.code


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


# -- round trip, determinism, stock tools ------------------------------------------------


def test_round_trip_through_a_trickling_stream() -> None:
    items = sample()
    bundle = build(items)
    reader = Reader(Trickle(bundle))
    manifest = reader.open()
    assert manifest == manifest_of(items)
    reader.verify(SDEK)
    got = [(e, None if c is None else b"".join(c)) for e, c in reader.entries()]
    assert got == items
    assert reader.offset == len(bundle)


def test_layout_manifest_first_and_whole_records() -> None:
    bundle = build()
    assert bundle.startswith(b"manifest.json\0")
    assert len(bundle) % fmt.RECORD == 0
    assert fmt.sniff(bundle[:512]) == "bundle"
    manifest_bytes = manifest_of(sample()).to_bytes()
    hmac_at = 512 + len(manifest_bytes) + len(fmt.pad(len(manifest_bytes)))
    assert bundle[hmac_at:hmac_at + 14] == b"manifest.hmac\0"


def test_serialization_is_deterministic() -> None:
    assert build(sample()) == build(sample())
    items = sample()
    assert manifest_of(items).to_bytes() == canonical(manifest_of(items).to_json())


def test_plain_header_equals_pythons_pax_header() -> None:
    """Where no pax record is needed our header is tarfile's, except that devmajor and
    devminor hold zeros (as GNU tar writes them) where Python leaves them empty."""
    entry, _ = file(f"{CTL}/abc/data", b"123", mtime_ns=T, mode=0o640, uid=5, gid=6)
    info = tarfile.TarInfo(entry.path)
    info.size, info.mode, info.uid, info.gid, info.mtime = 3, 0o640, 5, 6, T // 10**9
    info.uname = info.gname = ""
    ours, theirs = fmt.entry_header(entry), info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    assert len(ours) == len(theirs) == 512
    for lo, hi in ((0, 148), (156, 329), (345, 512)):
        assert ours[lo:hi] == theirs[lo:hi], (lo, hi)
    assert ours[329:345] == b"0000000\0" * 2


def test_gnu_tar_lists_and_extracts_it(tmp_path: Path) -> None:
    items = sample()
    path = tmp_path / "b.pcv"
    path.write_bytes(build(items))
    run = subprocess.run(["tar", "--numeric-owner", "--full-time", "-tvf", str(path)],
                         capture_output=True, text=True, check=True)
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    expected = ["manifest.json", "manifest.hmac"] + [e.path for e, _ in items]
    assert len(lines) == len(expected)
    types = {"file": "-", "dir": "d", "symlink": "l", "hardlink": "h"}
    for line, name in zip(lines[2:], expected[2:], strict=True):
        entry = next(e for e, _ in items if e.path == name)
        fields = line.split(None, 5)
        assert line[0] == types[entry.type], line
        assert fields[1] == f"{entry.uid}/{entry.gid}"
        assert int(fields[2]) == (entry.size or 0)
        assert fields[5].startswith(name)
        if entry.type == "symlink":
            assert fields[5] == f"{name} -> {entry.target}"
        if entry.type == "hardlink":
            assert fields[5] == f"{name} link to {entry.target}"
    assert "2023-11-14 22:13:20.123456789" in lines[2]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "--no-same-owner", "-xf", str(path), "-C", str(out)], check=True)
    assert (out / CTL / LONG).read_bytes() == dict(items)[next(
        e for e, _ in items if e.path.endswith(LONG))]
    assert os.readlink(out / CTL / "abc" / "link") == TARGET
    assert os.stat(out / CTL / "abc" / "data").st_ino == os.stat(out / CTL / "abc" / "data2").st_ino
    assert os.stat(out / CTL / "abc" / "data").st_mtime_ns == T_NS


def test_python_tarfile_reads_it() -> None:
    items = sample()
    with tarfile.open(fileobj=io.BytesIO(build(items)), mode="r:") as tar:
        got = tar.getmembers()
        assert [m.name for m in got] == ["manifest.json", "manifest.hmac"] + \
            [e.path for e, _ in items]
        by_name = {m.name: m for m in got}
        for entry, data in items:
            m = by_name[entry.path]
            assert (m.mode, m.uid, m.gid) == (entry.mode, entry.uid, entry.gid)
            if entry.type == "file":
                assert tar.extractfile(m).read() == data  # type: ignore[union-attr]
            if entry.target:
                assert m.linkname == entry.target
        assert by_name[f"{CTL}/abc/link"].issym()
        assert by_name[f"{CTL}/abc/data2"].islnk()


# -- manifest size, HMAC, sidecar, sniff -------------------------------------------------


def test_reserved_manifest_size_is_exact_and_pad_to_keeps_it_valid() -> None:
    items = sample()
    real = manifest_of(items)
    blank = real.with_hashes({e.path: fmt.PLACEHOLDER_SHA256 for e, _ in items
                              if e.type == "file"})
    size = fmt.manifest_size(blank)
    assert size == len(real.to_bytes())
    padded = real.to_bytes(pad_to=size + 1000)
    assert len(padded) == size + 1000 and padded.endswith(b"\n" + b" " * 1000)
    bundle = assemble(padded, members(items))
    assert read_all(bundle) == items
    with pytest.raises(ValueError):
        real.to_bytes(pad_to=size - 1)


def test_hmac_is_hkdf_then_hmac_sha256_and_checks_the_sdek() -> None:
    body = manifest_of(sample()).to_bytes()
    key = HKDF(hashes.SHA256(), 32, None, b"piccolo bundle manifest v1").derive(SDEK)
    expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b"\n"
    assert fmt.sign(SDEK, body) == expected and len(expected) == 65
    fmt.verify(bytearray(SDEK), body, expected)
    assert code_of(lambda: fmt.verify(bytes(32), body, expected)) == "hmac_mismatch"
    assert code_of(lambda: fmt.verify(SDEK, body + b" ", expected)) == "hmac_mismatch"
    assert code_of(lambda: fmt.verify(SDEK, body, expected.upper())) == "hmac_mismatch"
    with pytest.raises(ValueError):
        fmt.sign(SDEK[:16], body)


def test_sidecar_is_sha256sum_format(tmp_path: Path) -> None:
    bundle = build()
    (tmp_path / "b.pcv").write_bytes(bundle)
    digest = hashlib.sha256(bundle).hexdigest()
    line = fmt.sidecar_line(digest, "b.pcv")
    (tmp_path / "b.pcv.sha256").write_text(line)
    subprocess.run(["sha256sum", "--status", "-c", "b.pcv.sha256"], cwd=tmp_path, check=True)
    assert fmt.parse_sidecar(line) == digest
    assert fmt.parse_sidecar(f"{digest.upper()} *b.pcv") == digest
    for bad in ("", "abc  b.pcv\n", f"{digest}\n", f"{digest}  a\n b\n"):
        assert code_of(lambda bad=bad: fmt.parse_sidecar(bad)) == "bad_sidecar"
    with pytest.raises(ValueError):
        fmt.sidecar_line(digest, "a\nb")
    stream = fmt.HashingStream(io.BytesIO(bundle))
    read_all(bundle, stream=lambda d: stream)
    assert stream.hexdigest() == digest


def test_sniff() -> None:
    assert fmt.sniff(b"manifest.json\0" + bytes(50)) == "bundle"
    assert fmt.sniff(b"manifest.js") is None
    assert fmt.sniff(b'{\n  "kind": "full_data",') == "go-envelope"
    assert fmt.sniff(b"") is None
    assert fmt.sniff(b"\x1f\x8b\x08\0") is None
    assert fmt.sniff(tarfile.TarInfo("x").tobuf()) is None


def test_huge_values_go_to_pax_records() -> None:
    """Sizes of 8 GiB and more, ids of 2**21 and more: pax records, zero ustar fields."""
    entry = Entry(path=f"{CTL}/big", type="file", mode=0o600, uid=2**32 - 1, gid=2**21,
                  mtime_ns=T, size=2**40, sha256="0" * 64)
    header = fmt.entry_header(entry)
    with tarfile.open(fileobj=io.BytesIO(header + bytes(1024)), mode="r:") as tar:
        member = tar.next()
        assert member is not None
        assert (member.size, member.uid, member.gid) == (2**40, 2**32 - 1, 2**21)
        assert set(member.pax_headers) == {"size", "uid", "gid"}
    assert header[-512:][124:136] == b"00000000000\0"


def test_end_of_archive_pads_to_a_record() -> None:
    assert len(fmt.end_of_archive(0)) == fmt.RECORD
    assert len(fmt.end_of_archive(512 * 18)) == 1024
    assert len(fmt.end_of_archive(512 * 19)) == 1024 + fmt.RECORD - 512
    assert fmt.pad(0) == b"" and fmt.pad(1) == bytes(511) and fmt.pad(512) == b""
    with pytest.raises(ValueError):
        fmt.end_of_archive(100)


# -- damaged bundles ---------------------------------------------------------------------


def test_truncation_anywhere_is_truncated() -> None:
    items = sample()
    bundle = build(items)
    manifest = manifest_of(items).to_bytes()
    eoa = len(fmt.prelude(manifest, fmt.sign(SDEK, manifest)) + members(items)) + 1024
    assert eoa % fmt.RECORD  # so the record padding is there to be cut
    cuts = set(range(0, eoa, 37)) | {eoa - 1, eoa + 1, len(bundle) - 1}
    cuts |= {b + d for b in range(0, len(bundle), 512) for d in (-1, 0, 1)} - {eoa}
    for cut in sorted(c for c in cuts if 0 <= c < len(bundle) and c != eoa):
        assert code_of(lambda cut=cut: read_all(bundle[:cut])) == "truncated", cut
    assert read_all(bundle[:eoa]) == sample()  # EOF right after the two zero blocks


def test_a_flipped_data_bit_is_a_bad_checksum_even_unread() -> None:
    bundle = build()
    at = bundle.index(b"payload")
    damaged = flip(bundle, at)
    assert code_of(lambda: read_all(damaged)) == "bad_checksum"
    assert code_of(lambda: read_all(damaged, consume=False)) == "bad_checksum"
    damaged = flip(bundle, bundle.index(bytes(range(256))) + 5000)
    assert code_of(lambda: read_all(damaged, stream=Trickle)) == "bad_checksum"


def test_bad_checksum_comes_before_the_last_chunk() -> None:
    bundle = flip(build(), build().index(b"payload") + 690)
    reader = Reader(io.BytesIO(bundle))
    seen: list[bytes] = []
    with pytest.raises(BundleError):
        for _entry, chunks in reader.entries():
            for chunk in chunks or ():
                seen.append(chunk)
    assert not any(b"payload" in c for c in seen)


def test_a_flipped_header_bit_is_a_bad_header() -> None:
    bundle = build()
    header = bundle.index(f"{CTL}/abc/data\0".encode())
    assert code_of(lambda: read_all(flip(bundle, header + 101))) == "bad_header"
    assert code_of(lambda: read_all(flip(bundle, 101))) == "bad_header"


def test_a_flipped_manifest_bit_fails_parsing_or_the_hmac() -> None:
    bundle = build()
    brace = 512
    assert code_of(lambda: read_all(flip(bundle, brace))) == "bad_manifest"
    reader = Reader(io.BytesIO(flip(bundle, bundle.index(b"device-a") + 7)))
    assert reader.open().source_device == "device-`"
    assert code_of(lambda: reader.verify(SDEK)) == "hmac_mismatch"
    hmac_at = bundle.index(b"manifest.hmac\0") + 512
    reader = Reader(io.BytesIO(bundle[:hmac_at] + b"f" * 64 + bundle[hmac_at + 64:]))
    reader.open()
    assert code_of(lambda: reader.verify(SDEK)) == "hmac_mismatch"


def test_not_a_bundle() -> None:
    assert code_of(lambda: read_all(b"hello world" * 100)) == "not_a_bundle"
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("etc"))
    assert code_of(lambda: read_all(plain.getvalue())) == "not_a_bundle"
    other = canonical({"format": "something-else", "version": 1})
    assert code_of(lambda: read_all(assemble(other, b""))) == "not_a_bundle"


def mutated(change: Callable[[dict[str, Any]], object]) -> bytes:
    items = sample()
    obj = manifest_of(items).to_json()
    change(obj)
    return assemble(canonical(obj), members(items))


def entry_at(obj: dict[str, Any], path: str) -> dict[str, Any]:
    return next(e for e in obj["entries"] if e["path"] == path)


def _app_volume(o: dict[str, Any]) -> None:
    o["volumes"].append({"id": "zapp", "class": "application", "cluster_mode": "stateful",
                         "follower_policy": "read_only", "desired_state": "mounted"})


def _make_dir(e: dict[str, Any]) -> None:
    del e["size"], e["sha256"]
    e["type"] = "dir"


def _swap(o: dict[str, Any], i: int, j: int) -> None:
    o["entries"][i], o["entries"][j] = o["entries"][j], o["entries"][i]


MANIFEST_DAMAGE: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("future version", lambda o: o.update(version=2, novelty=True), "future_version"),
    ("version zero", lambda o: o.update(version=0), "bad_manifest"),
    ("wrong kind", lambda o: o.update(kind="everything"), "bad_manifest"),
    ("control kind with an app", _app_volume, "bad_manifest"),
    ("no bootstrap volume", lambda o: o["volumes"].pop(0), "bad_manifest"),
    ("unknown top-level field", lambda o: o.update(extra=1), "bad_manifest"),
    ("unknown entry field", lambda o: o["entries"][0].update(owner="root"), "bad_manifest"),
    ("mode as a string", lambda o: o["entries"][0].update(mode="0600"), "bad_manifest"),
    ("uid as a bool", lambda o: o["entries"][0].update(uid=True), "bad_manifest"),
    ("uid too large", lambda o: o["entries"][0].update(uid=2**32), "bad_manifest"),
    ("upper-case sha256", lambda o: o["entries"][0].update(
        sha256=o["entries"][0]["sha256"].upper()), "bad_manifest"),
    ("dir with a size", lambda o: entry_at(o, CTL).update(size=0), "bad_manifest"),
    ("bad xattr name", lambda o: entry_at(o, CTL).update(xattrs={"system.x": ""}),
     "bad_manifest"),
    ("xattr not base64", lambda o: entry_at(o, CTL).update(xattrs={"user.x": "!"}),
     "bad_manifest"),
    ("bad class", lambda o: o["volumes"][1].update({"class": "application"}),
     "bad_manifest"),
    ("no keyset", lambda o: o["entries"].pop(0), "bad_manifest"),
    ("volume without root", lambda o: o["entries"].__delitem__(slice(1, 3)), "bad_manifest"),
    ("dotdot", lambda o: o["entries"][2].update(path=f"{BOOT}/../../../etc/x"), "unsafe_path"),
    ("absolute", lambda o: o["entries"][0].update(path="/crypto/keyset.json"), "unsafe_path"),
    ("outside data", lambda o: o["entries"][2].update(path="volumes/bootstrap/other"),
     "unsafe_path"),
    ("top-level name", lambda o: o["entries"][0].update(path="keyset.json"), "unsafe_path"),
    ("NUL in path", lambda o: o["entries"][2].update(path=f"{BOOT}/a\0b"), "unsafe_path"),
    ("empty component", lambda o: o["entries"][2].update(path=f"{BOOT}//x"), "unsafe_path"),
    ("parent not a dir", lambda o: o["entries"][2].update(path=f"{BOOT}/nodir/x"),
     "unsafe_path"),
    ("symlink target with a slash", lambda o: entry_at(o, f"{CTL}/short").update(
        target="../../../etc/passwd"), "bad_type"),
    ("symlink target dotdot", lambda o: entry_at(o, f"{CTL}/short").update(target=".."),
     "bad_type"),
    ("device type", lambda o: o["entries"][2].update(type="chardev"), "bad_type"),
    ("keyset as a dir", lambda o: _make_dir(o["entries"][0]), "bad_type"),
    ("hard link to nothing", lambda o: entry_at(o, f"{CTL}/abc/data2").update(
        target=f"{CTL}/abc/missing"), "bad_type"),
    ("hard link to a later file", lambda o: entry_at(o, f"{CTL}/abc/data2").update(
        target=f"{CTL}/empty"), "bad_type"),
    ("hard link to a dir", lambda o: entry_at(o, f"{CTL}/abc/data2").update(
        target=f"{CTL}/abc"), "bad_type"),
    ("hard link into another volume", lambda o: entry_at(o, f"{CTL}/abc/data2").update(
        target=f"{BOOT}/gocryptfs.conf"), "bad_type"),
    ("duplicate entry", lambda o: o["entries"].insert(3, o["entries"][2]), "duplicate"),
    ("unsorted entries", lambda o: _swap(o, 9, 10), "unsorted"),
    ("duplicate volume", lambda o: o["volumes"].insert(1, o["volumes"][0]), "duplicate"),
    ("entry of an unlisted volume", lambda o: o["entries"].append(
        {**o["entries"][1], "path": "volumes/zzz/data"}), "unexpected_entry"),
]


@pytest.mark.parametrize(("change", "code"), [(c, k) for _, c, k in MANIFEST_DAMAGE],
                         ids=[n for n, _, _ in MANIFEST_DAMAGE])
def test_manifest_damage(change: Callable[[dict[str, Any]], object], code: str) -> None:
    bundle = mutated(change)
    with pytest.raises(BundleError) as info:
        Reader(io.BytesIO(bundle)).open()
    assert info.value.code == code
    if code == "future_version":
        assert "upgrade" in info.value.message


def test_a_full_bundle_holds_applications() -> None:
    items = sample()
    items.insert(-1, node("volumes/app1/data", "dir"))  # before volumes/bootstrap
    items.sort(key=lambda i: fmt.sort_key(i[0].path))
    bundle = build(items, kind="full", vols=volumes("app1"))
    assert [e.path for e, _ in read_all(bundle)][1] == "volumes/app1/data"
    with pytest.raises(BundleError) as info:
        manifest_of(items, kind="control", vols=volumes("app1"))
    assert info.value.code == "bad_manifest"


def test_manifest_json_is_strict() -> None:
    body = manifest_of(sample()).to_bytes()
    duplicated = body.replace(b'"kind":"control"', b'"kind":"control","kind":"control"')
    for bad in (duplicated, body.replace(b'"version":1', b'"version":1.0'),
                body.replace(b'"version":1', b'"version":NaN'), b"\xff" + body, b"[]"):
        code = code_of(lambda bad=bad: Reader(io.BytesIO(assemble(bad, b""))).open())
        assert code in ("bad_manifest", "not_a_bundle"), bad[:40]


def swapped_header(index: int, **changes: Any) -> bytes:
    """A bundle whose `index`th data entry has a tar header disagreeing with the manifest."""
    items = sample()
    entry, data = items[index]
    new = dataclasses.replace(entry, **changes)
    body = members(items[:index]) + fmt.entry_header(new)
    if entry.type == "file":
        body += (data or b"") + fmt.pad(len(data or b""))
    body += members(items[index + 1:])
    return assemble(manifest_of(items).to_bytes(), body)


@pytest.mark.parametrize(("index", "changes", "code"), [
    (2, {"mode": 0o644}, "mismatch"),
    (2, {"uid": 1}, "mismatch"),
    (6, {"gid": 1}, "mismatch"),
    (2, {"mtime_ns": T_NS + 1}, "mismatch"),
    (8, {"target": "b3RoZXI="}, "mismatch"),
    (7, {"target": f"{CTL}/{LONG}"}, "mismatch"),
    (8, {"type": "file", "target": None, "size": 0, "sha256": "0" * 64}, "mismatch"),
], ids=["mode", "uid", "gid", "mtime-ns", "symlink-target", "hardlink-target", "type"])
def test_header_disagreeing_with_the_manifest(index: int, changes: dict[str, Any],
                                              code: str) -> None:
    assert code_of(lambda: read_all(swapped_header(index, **changes))) == code


def test_size_mismatch() -> None:
    items = sample()
    entry, data = items[2]
    longer = (data or b"") + b"!"
    body = members(items[:2]) + fmt.entry_header(dataclasses.replace(entry, size=len(longer))) \
        + longer + fmt.pad(len(longer)) + members(items[3:])
    bundle = assemble(manifest_of(items).to_bytes(), body)
    assert code_of(lambda: read_all(bundle)) == "size_mismatch"


def foreign(info: tarfile.TarInfo, data: bytes = b"",
            fmt_: int = tarfile.PAX_FORMAT) -> bytes:
    """A member written by Python's tarfile, as another tool might."""
    buf = info.tobuf(fmt_, "utf-8", "surrogateescape")
    return buf + data + fmt.pad(len(data))


def with_member_at(index: int, member: bytes, replace_it: bool = True) -> bytes:
    items = sample()
    body = members(items[:index]) + member + members(items[index + replace_it:])
    return assemble(manifest_of(items).to_bytes(), body)


def tarinfo(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uname, info.gname = kind, 0o600, T // 10**9, "", ""
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_member_damage() -> None:
    keyset = tarinfo("crypto/keyset.json", size=14)
    cases = {
        "device node": (with_member_at(2, foreign(tarinfo(f"{BOOT}/gocryptfs.conf",
                                                          tarfile.CHRTYPE))), "bad_type"),
        "fifo": (with_member_at(2, foreign(tarinfo(f"{BOOT}/gocryptfs.conf",
                                                   tarfile.FIFOTYPE))), "bad_type"),
        "absolute": (with_member_at(0, foreign(tarinfo("/etc/passwd", size=14),
                                               b'{"version":1}\n')), "unsafe_path"),
        "dotdot": (with_member_at(2, foreign(tarinfo(f"{BOOT}/../../../x"))), "unsafe_path"),
        "not listed": (with_member_at(2, foreign(tarinfo(f"{BOOT}/zzz")), False),
                       "unexpected_entry"),
        "duplicate": (with_member_at(1, members(sample()[:1]), False), "duplicate"),
        "unsorted": (with_member_at(2, members(sample()[3:4]), False), "unsorted"),
        "unknown pax record": (with_member_at(0, foreign(
            tarinfo("crypto/keyset.json", size=14, pax_headers={"comment": "hi"}),
            b'{"version":1}\n')), "bad_header"),
        "atime pax record": (with_member_at(0, foreign(
            tarinfo("crypto/keyset.json", size=14, pax_headers={"atime": "1"}),
            b'{"version":1}\n')), "bad_header"),
        "GNU long name": (with_member_at(4, foreign(tarinfo(f"{CTL}/{LONG}", size=0),
                                                    fmt_=tarfile.GNU_FORMAT)), "bad_header"),
        "GNU magic": (with_member_at(0, foreign(keyset, b'{"version":1}\n',
                                                tarfile.GNU_FORMAT)), "bad_header"),
    }
    for name, (bundle, code) in cases.items():
        assert code_of(lambda bundle=bundle: read_all(bundle)) == code, name


def test_trailing_members_and_data() -> None:
    items = sample()
    head = fmt.prelude(manifest_of(items).to_bytes(), b"0" * 64 + b"\n") + members(items)
    extra = foreign(tarinfo(f"{CTL}/zzz"))
    assert code_of(lambda: read_all(head + extra + fmt.end_of_archive(len(head + extra)))) \
        == "unexpected_entry"
    bundle = build(items)
    assert code_of(lambda: read_all(bundle + b"\0")) == "unexpected_entry"
    assert code_of(lambda: read_all(bundle[:-1] + b"x")) == "unexpected_entry"
    early = fmt.prelude(manifest_of(items).to_bytes(), b"0" * 64 + b"\n") + members(items[:3])
    assert code_of(lambda: read_all(early + fmt.end_of_archive(len(early)))) == "truncated"


def test_entries_stream_in_bounded_chunks() -> None:
    big = os.urandom(3 * fmt.CHUNK + 5)
    items = sample()
    items[4] = file(f"{CTL}/{LONG}", big)
    reader = Reader(io.BytesIO(build(items)))
    sizes = [len(c) for e, chunks in reader.entries() if e.path.endswith(LONG)
             for c in chunks or ()]
    assert sizes == [fmt.CHUNK] * 3 + [5]


# -- the Go daemon's envelope ------------------------------------------------------------


def go_header(name: str, flag: bytes, mode: int, size: int = 0,
              mtime: int = 1_600_000_000) -> bytes:
    """A USTAR header as Go's archive/tar writes it (octal fields, uname root)."""
    buf = bytearray(512)
    raw = name.encode()
    buf[:len(raw)] = raw

    def octal(at: int, width: int, value: int) -> None:
        buf[at:at + width] = format(value, "o").zfill(width - 1).encode() + b"\0"

    octal(100, 8, mode)
    octal(108, 8, 0)
    octal(116, 8, 0)
    octal(124, 12, size)
    octal(136, 12, mtime)
    buf[148:156] = b" " * 8
    buf[156:157] = flag
    buf[257:265] = b"ustar\x0000"
    buf[265:269] = b"root"
    buf[297:301] = b"root"
    buf[148:155] = format(sum(buf), "o").zfill(6).encode() + b"\0"
    return bytes(buf)


def go_tar(members_: list[tuple[str, bytes, int, bytes]]) -> bytes:
    out = b""
    for name, flag, mode, data in members_:
        out += go_header(name, flag, mode, len(data)) + data + fmt.pad(len(data))
    return out + bytes(1024)


GO_TREE = [
    ("bootstrap/", b"5", 0o40700, b""),
    ("bootstrap/gocryptfs.conf", b"0", 0o100600, b"{}"),
    ("control/", b"5", 0o700, b""),
    ("control/gocryptfs.diriv", b"0", 0o600, b"\x22" * 16),
    ("control/sub/", b"5", 0o700, b""),
    ("control/sub/big", b"0", 0o600, bytes(range(256)) * 700),
]


def go_envelope(tar: bytes, kind: str = "control_only", sha: str | None = None) -> bytes:
    """Exactly what json.MarshalIndent(v, "", "  ") plus a newline writes."""
    doc = {"kind": kind, "generated_at": "2024-05-01T12:34:56.123456789Z",
           "sha256": sha or hashlib.sha256(tar).hexdigest(),
           "blob_b64": base64.b64encode(tar).decode()}
    return (json.dumps(doc, indent=2) + "\n").encode()


def drain(stream: Any, n: int = 1000) -> bytes:
    out = b""
    while chunk := stream.read(n):
        out += chunk
    return out


def test_go_envelope_decodes_in_bounded_reads() -> None:
    tar = go_tar(GO_TREE)
    env = go_envelope(tar, "full_data")
    assert env.startswith(b'{\n  "kind": "full_data",\n  "generated_at": ')
    assert fmt.sniff(env[:512]) == "go-envelope"
    decoded = GoEnvelope(Trickle(env, 4093))
    assert (decoded.kind, decoded.go_kind) == ("full", "full_data")
    assert drain(decoded, 777) == tar
    assert GoEnvelope(io.BytesIO(env)).read(0) == b""


class Pieces(io.BytesIO):
    """A stream whose reads end exactly at the given offsets."""

    def __init__(self, data: bytes, cuts: Iterable[int]) -> None:
        super().__init__(data)
        self.cuts = sorted(cuts)

    def read(self, n: int | None = -1, /) -> bytes:
        pos = self.tell()
        stop = min([c for c in self.cuts if c > pos] + [len(self.getvalue())])
        return super().read(stop - pos if n is None or n < 0 else min(n, stop - pos))


def test_go_envelope_reads_split_anywhere() -> None:
    tar = go_tar(GO_TREE[:4])
    tar += b"x" * ((1 - len(tar)) % 3)  # length 1 mod 3: the base64 ends in "=="
    env = go_envelope(tar)
    quote = env.rindex(b'"')
    assert env[quote - 2:quote] == b"=="
    blob = env.index(b'"blob_b64": "') + 13
    for cut in range(quote - 8, quote + 4):
        assert drain(GoEnvelope(Pieces(env, [blob + 10, cut]))) == tar, cut
    for cut in range(1, blob + 3):  # the head, split anywhere
        assert drain(GoEnvelope(Pieces(env, [cut]))) == tar, cut


def test_go_envelope_damage() -> None:
    tar = go_tar(GO_TREE)
    env = go_envelope(tar)
    blob = env.index(b'"blob_b64": "') + 13
    cases = {
        "bad sha": (go_envelope(tar, sha="0" * 64), "bad_checksum"),
        "flipped blob": (env[:blob + 5000] + (b"B" if env[blob + 5000:blob + 5001] != b"B"
                                              else b"C") + env[blob + 5001:], "bad_checksum"),
        "bad base64": (env[:blob + 100] + b"!" + env[blob + 101:], "bad_manifest"),
        "padding inside": (env[:blob + 100] + b"=" + env[blob + 101:], "bad_manifest"),
        "escape inside": (env[:blob + 8] + b"\\/" + env[blob + 10:], "bad_manifest"),
        "short blob": (env[:blob + 5] + env[blob + 6:], "bad_manifest"),
        "garbage after": (env + b"x", "bad_manifest"),
        "second object": (env + b"{}", "bad_manifest"),
        "unknown kind": (env.replace(b"control_only", b"everything"), "bad_manifest"),
        "bad time": (env.replace(b"2024-05-01T", b"2024-05-01 "), "bad_manifest"),
        "extra field": (env.replace(b'"kind"', b'"x": 1,\n  "kind"'), "bad_manifest"),
        "blob not last": (env.replace(b'"kind": "control_only",\n', b"").replace(
            b"\n}", b',\n  "kind": "control_only"\n}'), "bad_manifest"),
    }
    for name, (data, code) in cases.items():
        assert code_of(lambda data=data: drain(GoEnvelope(io.BytesIO(data)))) == code, name


def test_go_envelope_truncation_is_truncated() -> None:
    tar = go_tar(GO_TREE[:4])
    env = go_envelope(tar)
    for cut in [*range(0, 200), *range(200, len(env) - 1, 97), len(env) - 3, len(env) - 2]:
        assert code_of(lambda cut=cut: drain(GoEnvelope(io.BytesIO(env[:cut])))) \
            == "truncated", cut
    assert drain(GoEnvelope(io.BytesIO(env[:-1]))) == tar  # without the final newline


def go_members(data: bytes) -> list[tuple[str, str, str, int, int, int, bytes | None]]:
    out = []
    for m in GoTarReader(io.BytesIO(data)):
        assert isinstance(m, GoMember)
        body = None if m.chunks is None else b"".join(m.chunks)
        out.append((m.volume, m.rel, m.type, m.mode, m.size, m.mtime, body))
    return out


def test_go_tar_reader_yields_the_volumes() -> None:
    got = go_members(go_tar(GO_TREE))
    assert [(v, r, t, m) for v, r, t, m, *_ in got] == [
        ("bootstrap", "", "dir", 0o700), ("bootstrap", "gocryptfs.conf", "file", 0o600),
        ("control", "", "dir", 0o700), ("control", "gocryptfs.diriv", "file", 0o600),
        ("control", "sub", "dir", 0o700), ("control", "sub/big", "file", 0o600)]
    assert got[5][4:] == (256 * 700, 1_600_000_000, bytes(range(256)) * 700)
    env = go_envelope(go_tar(GO_TREE))
    assert len(list(GoTarReader(GoEnvelope(Trickle(env, 1000))))) == 6


def test_go_tar_reader_checks_the_envelope_hash_before_it_ends() -> None:
    env = go_envelope(go_tar(GO_TREE), sha="f" * 64)
    reader = iter(GoTarReader(GoEnvelope(io.BytesIO(env))))
    with pytest.raises(BundleError) as info:
        for member in reader:
            for _ in member.chunks or ():
                pass
    assert info.value.code == "bad_checksum"


@pytest.mark.parametrize(("extra", "code"), [
    (("control/link", b"2", 0o777, b""), "bad_type"),
    (("control/hard", b"1", 0o600, b""), "bad_type"),
    (("control/dev", b"3", 0o600, b""), "bad_type"),
    (("control/../../etc/passwd", b"0", 0o600, b"x"), "unsafe_path"),
    (("/etc/passwd", b"0", 0o600, b"x"), "unsafe_path"),
    (("apps/", b"5", 0o700, b""), "unexpected_entry"),
    (("control/nodir/x", b"0", 0o600, b"x"), "unsafe_path"),
    (("control/gocryptfs.diriv", b"0", 0o600, b"x"), "duplicate"),
    (("control/sub/big/", b"5", 0o700, b""), "duplicate"),
    (("control/x/", b"0", 0o600, b""), "unsafe_path"),
], ids=["symlink", "hardlink", "device", "dotdot", "absolute", "other-volume", "no-parent",
        "duplicate", "dir-over-file", "file-with-slash"])
def test_go_tar_reader_refuses(extra: tuple[str, bytes, int, bytes], code: str) -> None:
    assert code_of(lambda: go_members(go_tar([*GO_TREE, extra]))) == code


def test_go_tar_truncation_and_trailing_data() -> None:
    tar = go_tar(GO_TREE[:4])
    for cut in range(0, len(tar), 101):
        assert code_of(lambda cut=cut: go_members(tar[:cut])) == "truncated", cut
    assert code_of(lambda: go_members(tar + b"junk")) == "unexpected_entry"
    assert code_of(lambda: go_members(go_tar([("control", b"0", 0o600, b"")]))) == "bad_type"


def test_a_time_before_1970_round_trips_and_gnu_tar_reads_it(tmp_path: Path) -> None:
    old = -(86400 * 365 * 10) * 10**9 - 250_000_000  # 1960, and a quarter of a second
    items = [*sample()[:3], node(CTL, "dir"), file(f"{CTL}/zz-old", b"old", mtime_ns=old)]
    data = build(items)
    got = dict((e.path, e) for e, _ in read_all(data))
    assert got[f"{CTL}/zz-old"].mtime_ns == old
    path = tmp_path / "old.pcv"
    path.write_bytes(data)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "--no-same-owner", "-xf", str(path), "-C", str(out)], check=True)
    assert os.stat(out / CTL / "zz-old").st_mtime_ns == old
