"""The on-disk format against known answers produced with the real gocryptfs binary.

Vectors in tests/data/gocryptfs-vectors.json: section 'chosen' fixes every random input
(and was accepted by gocryptfs 2.3), section 'real_binary' was written by gocryptfs itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from piccolofs.format import b64, config, content, gcm_runs, names
from piccolofs.format.aead import AesGcm, AesSiv, XChaCha20Poly1305
from piccolofs.format.eme import Eme
from piccolofs.format.errors import (
    AuthenticationError,
    ConfigError,
    CorruptHeader,
    CorruptName,
    InvalidName,
    NameTooLong,
    UnsupportedFeature,
    WrongPassword,
)
from piccolofs.format.kdf import ScryptParams, derive_keys
from piccolofs.format.volume import VolumeCrypto

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "gocryptfs-vectors.json").read_text()
)
CHOSEN = VECTORS["chosen"]
INPUTS = CHOSEN["inputs"]
PASSWORD = INPUTS["password_utf8"].encode()
MASTER = bytes.fromhex(INPUTS["masterkey_hex"])
ROOT_IV = bytes.fromhex(INPUTS["root_diriv_hex"])
FILE_ID = bytes.fromhex(INPUTS["file_id_hex"])
VARIANTS = sorted(CHOSEN["variants"])


def _vol(variant: str) -> VolumeCrypto:
    cfg = config.parse(CHOSEN["confs"][variant].encode())
    return VolumeCrypto(cfg, cfg.unwrap(PASSWORD))


def _nonces(variant: str) -> tuple[bytes, bytes]:
    size = "24" if variant == "xchacha" else "16"
    return (bytes.fromhex(INPUTS[f"nonce{size}_block0_hex"]),
            bytes.fromhex(INPUTS[f"nonce{size}_block1_hex"]))


def _plain_name(label: str) -> bytes:
    if "*" in label:
        ch, count = label.split("*")
        return ch.encode() * int(count)
    return label.encode()


# -- keys ------------------------------------------------------------------------------
def test_scrypt_and_hkdf_known_answers() -> None:
    s = INPUTS["scrypt"]
    params = ScryptParams(bytes.fromhex(s["salt_hex"]), s["N"], s["R"], s["P"], s["KeyLen"])
    assert params.derive(PASSWORD).hex() == CHOSEN["kdf"]["scrypt_kek_hex"]
    keys = derive_keys(MASTER, use_hkdf=True)
    kdf = CHOSEN["kdf"]
    assert keys.eme.hex() == kdf["hkdf_eme_key_hex"]
    assert keys.gcm.hex() == kdf["hkdf_gcm_key_hex"]
    assert keys.siv.hex() == kdf["hkdf_siv_key_hex (64 bytes)"]
    assert keys.xchacha.hex() == kdf["hkdf_xchacha_key_hex"]
    legacy = derive_keys(MASTER, use_hkdf=False)
    assert legacy.siv.hex() == kdf["legacy_siv_key_hex = SHA-512(masterkey)"]
    assert "redacted" in repr(keys) and MASTER.hex() not in repr(keys)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_unwraps_and_rewraps_byte_exact(variant: str) -> None:
    text = CHOSEN["confs"][variant].encode()
    cfg = config.parse(text)
    assert cfg.unwrap(PASSWORD) == MASTER
    assert cfg.to_json() == text  # we write what gocryptfs writes, byte for byte
    v = CHOSEN["variants"][variant]
    nonce_key = next(k for k in INPUTS if k.startswith("wrap_nonce_hex"))
    nonce = bytes.fromhex(INPUTS[nonce_key])
    again = cfg.rewrap(MASTER, PASSWORD, salt=cfg.scrypt.salt, nonce=nonce[: cfg._nonce_len()],
                       scrypt_log_n=10)
    assert again.encrypted_key.hex() == v["EncryptedKey_hex"]


def test_wrong_password_is_reported_as_such() -> None:
    cfg = config.parse(CHOSEN["confs"]["gcm"].encode())
    with pytest.raises(WrongPassword):
        cfg.unwrap(b"not the password")


def test_real_binary_tree_decrypts() -> None:
    rb = VECTORS["real_binary"]
    cfg = config.parse(rb["conf"].encode())
    mk = cfg.unwrap(rb["password"].encode())
    assert mk.hex() == rb["masterkey_hex"]
    vol = VolumeCrypto(cfg, mk)
    iv = bytes.fromhex(rb["root_diriv_hex"])
    for cname, entry in rb["tree"].items():
        assert vol.names.decrypt(iv, cname.encode()).decode() == entry["plain"]
        if entry.get("content_hex"):
            data = bytes.fromhex(entry["content_hex"])
            fid = content.parse_header(data[:18])
            assert vol.blocks.open_run(0, fid, data[18:]).decode() == entry["plaintext"]
            for xname, x in entry.get("xattr", {}).items():
                assert vol.names.decrypt_xattr_name(xname) == x["plain_name"]
                assert vol.open_xattr(bytes.fromhex(x["value_hex"])).decode() == x["plain_value"]
        if "symlink_target_cipher" in entry:
            target = vol.open_symlink(entry["symlink_target_cipher"].encode())
            assert target.decode() == entry["symlink_target_plain"]
        if "children" in entry:
            sub_iv = bytes.fromhex(entry["diriv_hex"])
            for child_c, child in entry["children"].items():
                assert vol.names.decrypt(sub_iv, child_c.encode()).decode() == child["plain"]


# -- content ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_content_known_answers(variant: str) -> None:
    vol = _vol(variant)
    v = CHOSEN["variants"][variant]
    n0, n1 = _nonces(variant)
    assert vol.cipher.seal(INPUTS["short_plaintext"].encode(), content.block_aad(0, FILE_ID), n0) \
        == bytes.fromhex(v["file_short"]["cipher_hex"])[18:]
    header = content.new_header(FILE_ID)
    two = b"a" * 4096 + b"tail\n"
    b0 = vol.cipher.seal(two[:4096], content.block_aad(0, FILE_ID), n0)
    b1 = vol.cipher.seal(two[4096:], content.block_aad(1, FILE_ID), n1)
    assert b1.hex() == v["file_two_block1_hex"]
    whole = header + b0 + b1
    assert len(whole) == v["file_two_len"]
    assert hashlib.sha256(whole).hexdigest() == v["file_two_sha256"]
    assert vol.blocks.open_run(0, FILE_ID, b0 + b1) == two
    assert vol.seal_symlink(b"hello.txt", n0).decode() == v["symlink_cipher"]
    assert vol.seal_xattr(b"myvalue", n0).hex() == v["xattr_value_hex"]


def test_holes_read_as_zeros_and_short_zero_block_is_refused() -> None:
    vol = _vol("gcm")
    cbs = vol.blocks.layout.cipher_block
    a = vol.blocks.seal(0, FILE_ID, b"A" * 4096)
    z = vol.blocks.seal(2, FILE_ID, b"Z")
    assert vol.blocks.open_run(0, FILE_ID, a + bytes(cbs) + z) == b"A" * 4096 + bytes(4096) + b"Z"
    with pytest.raises(AuthenticationError):
        vol.blocks.open(0, FILE_ID, bytes(33))


def test_swapped_blocks_fail() -> None:
    vol = _vol("gcm")
    b0 = vol.blocks.seal(0, FILE_ID, b"x" * 4096)
    b1 = vol.blocks.seal(1, FILE_ID, b"y" * 4096)
    with pytest.raises(content.BlockAuthError) as info:
        vol.blocks.open_run(0, FILE_ID, b1 + b0)
    assert info.value.block_no == 0


@pytest.mark.parametrize("variant", ["gcm", "siv", "xchacha"])
def test_a_run_names_the_block_that_fails(variant: str) -> None:
    """open_run decrypts in place: a bad block anywhere in a run fails the whole run and is
    named; holes read as zeros; a short tail is refused."""
    vol = _vol(variant)
    codec = vol.blocks
    cbs = codec.layout.cipher_block
    plain = bytes(range(256)) * 16 * 3 + b"tail"
    run = bytearray(b"".join(codec.seal(b, FILE_ID, plain[b * 4096 : (b + 1) * 4096])
                             for b in range(4)))
    assert codec.open_run(0, FILE_ID, bytes(run)) == plain
    for block, at in ((0, 0), (1, cbs + 40), (2, 3 * cbs - 1), (3, len(run) - 1)):
        bad = bytearray(run)
        bad[at] ^= 0x01
        with pytest.raises(content.BlockAuthError) as info:
            codec.open_run(0, FILE_ID, bytes(bad))
        assert info.value.block_no == block
    holed = bytes(run[:cbs]) + bytes(cbs) + bytes(run[2 * cbs :])
    assert codec.open_run(0, FILE_ID, holed) == plain[:4096] + bytes(4096) + plain[8192:]
    with pytest.raises(content.BlockAuthError) as info:
        codec.open_run(0, FILE_ID, bytes(run[: 3 * cbs + codec.cipher.overhead]))
    assert info.value.block_no == 3
    with pytest.raises(content.BlockAuthError):  # the same blocks at other positions
        codec.open_run(1, FILE_ID, bytes(run))


def _gcm_codecs(monkeypatch: pytest.MonkeyPatch, nonce_len: int
                ) -> tuple[content.BlockCodec, content.BlockCodec]:
    """The same key twice: block runs through the compiled helper, and block by block in
    Python."""
    key = hashlib.sha256(b"gcm runs").digest()
    native = content.BlockCodec(AesGcm(key, nonce_len))
    monkeypatch.setenv("PICCOLOFS_PURE_PYTHON", "1")
    pure = content.BlockCodec(AesGcm(key, nonce_len))
    monkeypatch.delenv("PICCOLOFS_PURE_PYTHON")
    assert native.cipher.runs is not None and pure.cipher.runs is None
    return native, pure


def test_the_compiled_block_runs_are_built() -> None:
    """The suite must exercise the compiled AES-GCM path that mounts use (setup.py builds
    it; libssl-dev is a build dependency)."""
    assert gcm_runs.available(), gcm_runs.unavailable_reason()


@pytest.mark.parametrize("nonce_len", [16, 12])
def test_compiled_runs_write_and_read_what_python_does(monkeypatch: pytest.MonkeyPatch,
                                                       nonce_len: int) -> None:
    """Same nonces, same bytes; each opens the other's runs; every tampered byte, hole,
    short tail and misplaced run fails on the same block with the same reason."""
    native, pure = _gcm_codecs(monkeypatch, nonce_len)
    cbs = native.layout.cipher_block
    rnd = random.Random(7)
    for length in (1, 4095, 4096, 4097, 5 * 4096, 33 * 4096 - 3):
        plain = rnd.randbytes(length)
        nonces = rnd.randbytes(nonce_len * ((length + 4095) // 4096))
        monkeypatch.setattr(content.os, "urandom", lambda n, v=nonces: v[:n])
        sealed = b"".join(native.seal_parts(9, FILE_ID, plain))
        assert sealed == b"".join(pure.seal_parts(9, FILE_ID, plain))
        monkeypatch.undo()
        assert native.open_run(9, FILE_ID, sealed) == plain
        assert pure.open_run(9, FILE_ID, sealed) == plain

    def outcome(codec: content.BlockCodec, first: int, data: bytes) -> object:
        try:
            return bytes(codec.open_run(first, FILE_ID, data))
        except content.BlockAuthError as exc:
            return exc.block_no, str(exc)

    run = pure.seal_run(0, FILE_ID, rnd.randbytes(6 * 4096 + 100))
    cases = [(0, run), (1, run), (0, run[:2 * cbs] + bytes(cbs) + run[3 * cbs:]),
             (0, run[:3 * cbs] + bytes(nonce_len) + run[3 * cbs + nonce_len:]),
             (0, run[:-101]), (0, run[: 6 * cbs + nonce_len + 16]), (0, bytes(2 * cbs))]
    for at in [*rnd.sample(range(len(run)), 60), 0, len(run) - 1]:
        bad = bytearray(run)
        bad[at] ^= 1 << rnd.randrange(8)
        cases.append((0, bytes(bad)))
    for first, data in cases:
        assert outcome(native, first, data) == outcome(pure, first, data), (first, len(data))


@pytest.mark.parametrize("nonce_len", [16, 12])
def test_long_runs_shared_with_the_helper_thread_open_as_python_does(
        monkeypatch: pytest.MonkeyPatch, nonce_len: int) -> None:
    """Runs long enough to be opened in chunks by the caller and a helper thread together
    (gcm_runs.c) give the bytes, and fail on the first bad block with the reason, that the
    block-by-block path gives, wherever the bad blocks fall among the chunks."""
    native, pure = _gcm_codecs(monkeypatch, nonce_len)
    from piccolofs.format._gcm_runs import lib

    cbs = native.layout.cipher_block
    rnd = random.Random(11)
    assert not lib.pfs_gcm_run_is_shared(63 * cbs, nonce_len)
    assert lib.pfs_gcm_run_is_shared(64 * cbs, nonce_len)
    for blocks in (64, 65, 100, 256):
        plain = rnd.randbytes(blocks * 4096 - rnd.randrange(4000))
        run = pure.seal_run(5, FILE_ID, plain)
        for _ in range(20):  # the helper sometimes wakes in time, sometimes not
            assert native.open_run(5, FILE_ID, run) == plain
    # The helper does take part (it may be slow to wake, so give it time), wherever this
    # process may run on two CPUs.
    assert lib.pfs_gcm_helper_ready() == (len(os.sched_getaffinity(0)) > 1)
    if not lib.pfs_gcm_helper_ready():
        return
    before = lib.pfs_gcm_helper_chunks()
    deadline = time.monotonic() + 10
    while lib.pfs_gcm_helper_chunks() == before and time.monotonic() < deadline:
        assert native.open_run(5, FILE_ID, run) == plain
    assert lib.pfs_gcm_helper_chunks() > before

    def outcome(codec: content.BlockCodec, data: bytes) -> object:
        try:
            return bytes(codec.open_run(5, FILE_ID, data))
        except content.BlockAuthError as exc:
            return exc.block_no, str(exc)

    plain = rnd.randbytes(200 * 4096 + 77)
    run = pure.seal_run(5, FILE_ID, plain)
    cases = [run[:150 * cbs] + bytes(cbs) + run[151 * cbs:],  # a hole opens as zeros
             run[:70 * cbs] + bytes(nonce_len) + run[70 * cbs + nonce_len:]]
    for blocks in ([0], [199], [17], [3, 180], [180, 3], [31, 32], [100, 101, 150]):
        bad = bytearray(run)
        for b in blocks:  # a bad tag in each
            bad[b * cbs + cbs - 1] ^= 0x80
        cases.append(bytes(bad))
    # Which thread opens which chunk, and which finishes first, varies from call to call:
    # many calls, so that a later chunk's failure often lands before an earlier one's.
    for data in cases:
        expected = outcome(pure, data)
        for _ in range(30):
            assert outcome(native, data) == expected, len(data)


def test_long_runs_open_right_from_many_threads_at_once() -> None:
    """One run at a time shares the helper thread; the others open alone, meanwhile."""
    codec = content.BlockCodec(AesGcm(hashlib.sha256(b"threads").digest()))
    rnd = random.Random(3)
    plains = [rnd.randbytes(rnd.randrange(60, 260) * 4096) for _ in range(6)]
    runs = [codec.seal_run(i, FILE_ID, p) for i, p in enumerate(plains)]
    wrong: list[int] = []

    def reader(i: int) -> None:
        for _ in range(40):
            if codec.open_run(i, FILE_ID, runs[i]) != plains[i]:
                wrong.append(i)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not wrong


def test_compiled_runs_release_the_gil() -> None:
    """While a thread opens runs in the helper, another thread's Python runs (the point of
    the helper for concurrent reads). The interpreter is told never to force a switch, so
    the other thread gets the GIL only when the helper lets go of it."""
    codec = content.BlockCodec(AesGcm(hashlib.sha256(b"gil").digest()))
    assert codec.cipher.runs is not None
    run = codec.seal_run(0, FILE_ID, bytes(256 * 4096))
    stop = threading.Event()
    ticks = [0]

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)  # hands the GIL back at once

    counter = threading.Thread(target=count)
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        counter.start()
        before = ticks[0]
        deadline = time.monotonic() + 10  # the other thread only needs to be scheduled once
        while ticks[0] == before and time.monotonic() < deadline:
            codec.open_run(0, FILE_ID, run)
        during = ticks[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(old)
        counter.join()
    assert during > 0


def test_header_rules() -> None:
    assert content.parse_header(content.new_header(FILE_ID)) == FILE_ID
    for bad in (bytes(18), b"\x00\x03" + FILE_ID, b"\x00\x02" + bytes(16), b"\x00\x02abc"):
        with pytest.raises(CorruptHeader):
            content.parse_header(bad)


# -- tamper: one flipped byte anywhere makes every primitive fail -----------------------
@pytest.mark.parametrize("cipher_cls,key_len", [(AesGcm, 32), (AesSiv, 64),
                                                (XChaCha20Poly1305, 32)])
def test_every_byte_of_a_sealed_block_is_authenticated(cipher_cls: Any, key_len: int) -> None:
    cipher = cipher_cls(bytes(range(key_len)))
    aad = content.block_aad(3, FILE_ID)
    sealed = cipher.seal(b"secret data " * 10, aad)
    assert cipher.open(sealed, aad) == b"secret data " * 10
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(AuthenticationError):
            cipher.open(bytes(bad), aad)
    with pytest.raises(AuthenticationError):
        cipher.open(sealed, content.block_aad(4, FILE_ID))
    with pytest.raises(AuthenticationError):
        cipher.open(sealed[:-1], aad)


def test_tampered_master_key_wrap_fails() -> None:
    cfg = config.parse(CHOSEN["confs"]["gcm"].encode())
    for i in range(len(cfg.encrypted_key)):
        bad = bytearray(cfg.encrypted_key)
        bad[i] ^= 0x80
        tampered = config.Config(bytes(bad), cfg.scrypt, cfg.feature_flags)
        kek = cfg.scrypt.derive(PASSWORD) if i == 0 else None
        with pytest.raises(WrongPassword):
            tampered.unwrap_with_kek(kek or _KEK)


_KEK = bytes.fromhex(CHOSEN["kdf"]["scrypt_kek_hex"])


def test_tampered_names_symlinks_and_xattrs_fail() -> None:
    vol = _vol("gcm")
    cname = vol.names.encrypt(ROOT_IV, b"a-name-of-some-length")
    for i in range(len(cname)):
        bad = bytearray(cname)
        bad[i] = ord("A") if bad[i] != ord("A") else ord("B")
        try:
            out = vol.names.decrypt(ROOT_IV, bytes(bad))
        except CorruptName:
            continue
        assert out != b"a-name-of-some-length"  # EME has no tag: garbage, never the name
    link = vol.seal_symlink(b"/some/target")
    for i in range(len(link)):
        bad = bytearray(link)
        bad[i] = ord("A") if bad[i] != ord("A") else ord("B")
        with pytest.raises(AuthenticationError):
            vol.open_symlink(bytes(bad))
    value = vol.seal_xattr(b"xattr value")
    for i in range(len(value)):
        bad = bytearray(value)
        bad[i] ^= 0x04
        with pytest.raises(AuthenticationError):
            vol.open_xattr(bytes(bad))


# -- offsets: exhaustive sweep ---------------------------------------------------------
@pytest.mark.parametrize("overhead", [32, 40])
def test_offset_arithmetic_sweep(overhead: int) -> None:
    lay = content.Layout(overhead)
    cbs = lay.cipher_block
    previous = -1
    for plain in range(0, 5 * 4096 + 7):
        csize = lay.cipher_size(plain)
        assert lay.plain_size(csize) == plain
        assert not lay.has_fragment(csize)
        assert csize > previous or plain == 0
        previous = csize
        blocks = lay.block_count(plain)
        if plain:
            assert csize == 18 + (blocks - 1) * cbs + (plain - (blocks - 1) * 4096) + overhead
    for csize in range(0, 18 + 3 * cbs + 1):
        plain = lay.plain_size(csize)
        rest = (csize - 18) % cbs if csize > 18 else 0
        if csize < 18:
            assert plain == 0 and lay.has_fragment(csize) == (csize > 0)
        elif csize == 18:
            assert plain == 0 and not lay.has_fragment(csize)  # header only: empty file
        elif rest == 0 or rest > overhead:
            assert not lay.has_fragment(csize)
            assert lay.cipher_size(plain) == csize
        else:
            assert lay.has_fragment(csize)
            assert lay.plain_size(csize - rest) == plain
    for off in range(0, 3 * 4096, 97):
        for length in (1, 4095, 4096, 4097, 9000):
            first, last = lay.block_range(off, length)
            assert first == off // 4096 and last == (off + length - 1) // 4096
            assert lay.block_offset(first) == 18 + first * cbs


def test_documented_sizes() -> None:
    gcm, xc = content.Layout(32), content.Layout(40)
    for plain, cipher in [(1, 51), (4096, 4146), (4097, 4179), (5000, 5082), (1048589, 1056831)]:
        assert gcm.cipher_size(plain) == cipher
    for plain, cipher in [(1, 59), (4096, 4154), (4097, 4195)]:
        assert xc.cipher_size(plain) == cipher


# -- names -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_name_known_answers(variant: str) -> None:
    vol = _vol(variant)
    v = CHOSEN["variants"][variant]
    iv = ROOT_IV if vol.dir_iv else bytes(16)
    for label, expect in v["names"].items():
        plain = _plain_name(label)
        bn = vol.names.backing_name(iv, plain)
        assert bn.name.decode() == expect["stored_as"]
        if bn.long_cipher is not None:
            assert bn.long_cipher.decode() == expect["eme_b64"]
            assert vol.names.check_companion(bn.name, bn.long_cipher) == bn.long_cipher
        if not vol.plaintext_names:
            assert vol.names.decrypt(iv, expect["eme_b64"].encode()) == plain
    if "xattr_name" in v:
        assert vol.names.encrypt_xattr_name("user.test") == v["xattr_name"]
        assert vol.names.decrypt_xattr_name(v["xattr_name"]) == "user.test"
    assert vol.names.decrypt_xattr_name(v["xattr_user_vec_name"])  # decrypts to a name


def test_eme_vectors() -> None:
    for vec in CHOSEN["eme"]:
        eme = Eme(bytes.fromhex(vec["key_hex"]))
        tweak = bytes.fromhex(vec["tweak_hex"])
        padded = names.pad16(vec["name"].encode())
        assert padded.hex() == vec["padded_hex"]
        out = eme.encrypt(tweak, padded)
        assert out.hex() == vec["eme_out_hex"]
        assert eme.decrypt(tweak, out) == padded
        assert b64.url_encode(out, raw=True) == vec["raw64"]
        assert b64.url_encode(out, raw=False) == vec["padded64"]


def test_eme_round_trip_all_lengths() -> None:
    eme = Eme(bytes(range(32)))
    for m in range(1, 129):
        data = bytes((i * 7 + m) % 256 for i in range(16 * m))
        out = eme.encrypt(ROOT_IV, data)
        assert out != data and eme.decrypt(ROOT_IV, out) == data


def test_name_validation_and_limits() -> None:
    vol = _vol("gcm")
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        with pytest.raises(InvalidName):
            vol.names.backing_name(ROOT_IV, bad)
    with pytest.raises(NameTooLong):
        vol.names.backing_name(ROOT_IV, b"x" * 256)
    assert vol.names.backing_name(ROOT_IV, b"x" * 255).long_cipher is not None
    # Names are bytes: no normalisation, non-UTF-8 allowed.
    nfc, nfd = "\u00e9".encode(), "e\u0301".encode()
    assert vol.names.encrypt(ROOT_IV, nfc) != vol.names.encrypt(ROOT_IV, nfd)
    assert vol.names.decrypt(ROOT_IV, vol.names.encrypt(ROOT_IV, b"\xff\xfe")) == b"\xff\xfe"


def test_strict_base64_and_padding() -> None:
    vol = _vol("gcm")
    good = vol.names.encrypt(ROOT_IV, b"hello.txt")
    for bad in (good + b"=", good[:-1], good + b"\n", b"!!!!", good.replace(b"_", b"/")):
        with pytest.raises(CorruptName):
            vol.names.decrypt(ROOT_IV, bad)
    with pytest.raises(CorruptName):
        names.unpad16(b"a" * 15 + b"\x11")
    with pytest.raises(CorruptName):
        names.unpad16(b"a" * 14 + b"\x01\x02")
    with pytest.raises(CorruptName):
        names.unpad16(b"\x10" * 16)


# -- config refusal --------------------------------------------------------------------
def _conf_obj(variant: str = "gcm") -> dict[str, Any]:
    return dict(json.loads(CHOSEN["confs"][variant]))


@pytest.mark.parametrize("mutate,error,needle", [
    (lambda o: o.update(FeatureFlags=[*o["FeatureFlags"], "Quantum"]), UnsupportedFeature,
     "Quantum"),
    (lambda o: o.update(Version=3), UnsupportedFeature, "version 3"),
    (lambda o: o.update(FeatureFlags=["HKDF", "XChaCha20Poly1305", "AESSIV", "GCMIV128"]),
     ConfigError, "exclusive"),
    (lambda o: o.update(FeatureFlags=["HKDF", "AESSIV"]), ConfigError, "requires GCMIV128"),
    (lambda o: o.update(FeatureFlags=["HKDF", "GCMIV128", "PlaintextNames", "DirIV"]),
     ConfigError, "PlaintextNames forbids"),
    (lambda o: o.update(LongNameMax=100), ConfigError, "together"),
    (lambda o: o["ScryptObject"].update(N=1000), ConfigError, "power of two"),
    (lambda o: o["ScryptObject"].update(Salt="AAAA"), ConfigError, "salt"),
    (lambda o: o.update(EncryptedKey="AAAA"), ConfigError, "EncryptedKey"),
    (lambda o: o.pop("ScryptObject"), ConfigError, "ScryptObject"),
    (lambda o: o.update(Version="2"), ConfigError, "wrong type"),
])
def test_config_refusals(mutate: Any, error: type[Exception], needle: str) -> None:
    obj = _conf_obj()
    mutate(obj)
    with pytest.raises(error, match=needle):
        config.parse(json.dumps(obj).encode())


def test_truncated_and_garbage_configs() -> None:
    text = CHOSEN["confs"]["gcm"].encode()
    for cut in (0, 1, 10, len(text) // 2, len(text) - 3):
        with pytest.raises(ConfigError):
            config.parse(text[:cut])
    with pytest.raises(ConfigError):
        config.parse(b"[1, 2]")


def test_config_is_lenient_where_go_is() -> None:
    obj = _conf_obj()
    obj["SomethingNew"] = {"x": 1}
    obj["version"] = obj.pop("Version")
    cfg = config.parse(json.dumps(obj).encode())
    assert cfg.unwrap(PASSWORD) == MASTER


@pytest.mark.parametrize("options,flags", [
    ({}, ["HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64"]),
    ({"xchacha": True}, ["HKDF", "XChaCha20Poly1305", "DirIV", "EMENames", "LongNames", "Raw64"]),
    ({"aessiv": True}, ["HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64", "AESSIV"]),
    ({"plaintext_names": True}, ["HKDF", "GCMIV128", "PlaintextNames"]),
    ({"deterministic_names": True}, ["HKDF", "GCMIV128", "EMENames", "LongNames", "Raw64"]),
    ({"longname_max": 100},
     ["HKDF", "GCMIV128", "DirIV", "LongNameMax", "EMENames", "LongNames", "Raw64"]),
])
def test_init_writes_the_flags_gocryptfs_writes(options: dict[str, Any], flags: list[str]) -> None:
    cfg, mk = config.create(b"pw", config.InitOptions(scrypt_log_n=10, **options))
    assert list(cfg.feature_flags) == flags
    again = config.parse(cfg.to_json())
    assert again.unwrap(b"pw") == mk


def test_init_refusals() -> None:
    with pytest.raises(ConfigError):
        config.InitOptions(xchacha=True, aessiv=True).feature_flags()
    with pytest.raises(ConfigError):
        config.InitOptions(longname_max=61).feature_flags()
    with pytest.raises(ConfigError):
        config.create(b"", config.InitOptions(scrypt_log_n=10))
