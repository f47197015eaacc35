"""The TPM sealer against a real software TPM (swtpm): no mocks.

Each test gets its own swtpm with a fresh state, so PCR extensions and the
dictionary-attack counter never leak from one test to another. After every test the TPM
must hold no transient object or session: a TPM without a resource manager keeps them,
and has only a few slots.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ctl.tpm import sealer
from ctl.tpm.sealer import (
    BadPin,
    Lockout,
    PolicyMismatch,
    Sealed,
    SealedCorrupt,
    TpmUnavailable,
    WrongTpm,
)
from tests.swtpm import Swtpm, free_port_pair

pytestmark = pytest.mark.timeout(20)

SECRET = bytes(range(1, 65))  # the largest secret, with no zero byte


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Swtpm]:
    with Swtpm(tmp_path / "tpm") as sw:
        yield sw
        if sw.running:
            assert sw.loaded_handles() == [], "a transient handle was left in the TPM"
    assert all(_gone(pid) for pid in sw.pids)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    """A genuine sealed object, for the offline parsing tests."""
    with Swtpm(tmp_path_factory.mktemp("sample") / "tpm") as sw:
        return sealer.seal(sw.tcti, SECRET, (0, 7))


def _nothing_there() -> str:
    return f"swtpm:host=127.0.0.1,port={free_port_pair()}"


# -- round trips -------------------------------------------------------------------------

def test_seal_unseal_round_trip(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    assert sealed.pcrs == (7,) and sealed.pin is False
    out = sealer.unseal(tpm.tcti, sealed)
    assert isinstance(out, bytearray) and out == SECRET
    again = Sealed.parse(sealed.to_json())
    assert again == sealed
    assert sealer.unseal(tpm.tcti, again) == SECRET


def test_file_format(sample: Sealed) -> None:
    text = sample.to_json().decode()
    assert text.endswith("}\n") and text.startswith('{\n  "version": 1,\n')
    doc = json.loads(text)
    assert list(doc) == ["version", "bank", "pcrs", "pin", "pcr_digest", "public", "private"]
    assert doc["bank"] == "sha256" and doc["pcrs"] == [0, 7] and doc["pin"] is False
    assert base64.b64decode(doc["pcr_digest"]) == sample.pcr_digest
    assert base64.b64decode(doc["public"]) == sample.public
    assert base64.b64decode(doc["private"]) == sample.private
    assert SECRET not in sample.to_json() and base64.b64encode(SECRET) not in sample.to_json()


def test_pcr_change_is_policy_mismatch_until_reset(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    assert sealer.pcr_digest(tpm.tcti, (7,)) == sealed.pcr_digest
    tpm.extend_pcr(7, b"a new Secure Boot db")
    assert sealer.pcr_digest(tpm.tcti, (7,)) != sealed.pcr_digest
    with pytest.raises(PolicyMismatch, match=r"PCR 7 differ.*rc 0x99d"):
        sealer.unseal(tpm.tcti, sealed)
    tpm.restart()  # orderly: Shutdown(CLEAR), stop, start: the PCRs are back to reset values
    assert sealer.pcr_digest(tpm.tcti, (7,)) == sealed.pcr_digest
    assert sealer.unseal(tpm.tcti, sealed) == SECRET


def test_several_pcrs(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET, [7, 0, 7])
    assert sealed.pcrs == (0, 7)
    assert sealer.pcr_digest(tpm.tcti, (7, 0)) == sealed.pcr_digest
    tpm.extend_pcr(3, b"not in the policy")
    assert sealer.unseal(tpm.tcti, sealed) == SECRET
    tpm.extend_pcr(0, b"firmware update")
    with pytest.raises(PolicyMismatch, match="PCR 0,7"):
        sealer.unseal(tpm.tcti, sealed)
    tpm.restart()
    assert sealer.unseal(tpm.tcti, sealed) == SECRET


def test_many_pcrs_read_in_several_rounds(tpm: Swtpm) -> None:
    """A TPM returns at most 8 PCR values per read: the digest must still cover all."""
    pcrs = tuple(range(0, 24, 2))
    sealed = sealer.seal(tpm.tcti, b"k", pcrs)
    assert sealer.unseal(tpm.tcti, sealed) == b"k"
    tpm.extend_pcr(14, b"x")  # 17..22 cannot be extended from locality 0
    with pytest.raises(PolicyMismatch):
        sealer.unseal(tpm.tcti, sealed)


def test_blob_from_another_tpm_is_wrong_tpm(tpm: Swtpm, tmp_path: Path) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    with Swtpm(tmp_path / "other") as other:
        with pytest.raises(WrongTpm, match=r"rc 0x1df"):
            sealer.unseal(other.tcti, sealed)
        assert other.loaded_handles() == []


def test_altered_private_is_refused_by_the_tpm(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    private = bytearray(sealed.private)
    private[-1] ^= 1
    altered = Sealed(pcrs=sealed.pcrs, pin=False, private=bytes(private),
                     public=sealed.public, pcr_digest=sealed.pcr_digest)
    with pytest.raises(WrongTpm):
        sealer.unseal(tpm.tcti, altered)


async def test_under_trio_in_a_worker_thread(tpm: Swtpm) -> None:
    sealed = await trio.to_thread.run_sync(sealer.seal, tpm.tcti, b"boot key", (7,), None)
    out = await trio.to_thread.run_sync(sealer.unseal, tpm.tcti, sealed, None)
    assert out == b"boot key"
    out[:] = bytes(len(out))


# -- the sealed file -------------------------------------------------------------------------

def _doc(sample: Sealed) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(sample.to_json())
    return doc


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _flip(b: bytes, at: int, mask: int = 1) -> bytes:
    out = bytearray(b)
    out[at] ^= mask
    return bytes(out)


CORRUPTIONS: list[tuple[str, Any, str]] = [
    ("truncated", lambda d, raw: raw[: len(raw) // 2], "not JSON"),
    ("empty", lambda d, raw: b"", "not JSON"),
    ("binary", lambda d, raw: b"\xff\xfe\x00", "not UTF-8"),
    ("huge", lambda d, raw: b" " * (sealer.MAX_FILE + 1), "larger than"),
    ("a list", lambda d, raw: b"[1]", "not a JSON object"),
    ("huge number", lambda d, raw: raw.replace(b'"version": 1', b'"version": 1' + b"0" * 5000),
     "number too large"),
    ("version 2", lambda d, raw: {**d, "version": 2}, "unsupported version 2"),
    ("version text", lambda d, raw: {**d, "version": "1"}, "version: not an integer"),
    ("version bool", lambda d, raw: {**d, "version": True}, "version: not an integer"),
    ("no version", lambda d, raw: {k: v for k, v in d.items() if k != "version"}, "no version"),
    ("no private", lambda d, raw: {k: v for k, v in d.items() if k != "private"},
     "missing field 'private'"),
    ("extra field", lambda d, raw: {**d, "note": 1}, "unexpected field 'note'"),
    ("duplicate", lambda d, raw: raw.replace(b'"pin"', b'"pin": false, "pin"'), "duplicate"),
    ("sha1 bank", lambda d, raw: {**d, "bank": "sha1"}, "bank"),
    ("pcr 24", lambda d, raw: {**d, "pcrs": [0, 24]}, "PCR indices 0..23"),
    ("pcr -1", lambda d, raw: {**d, "pcrs": [-1]}, "PCR indices 0..23"),
    ("no pcrs", lambda d, raw: {**d, "pcrs": []}, "non-empty list"),
    ("pcrs unsorted", lambda d, raw: {**d, "pcrs": [7, 0]}, "sorted"),
    ("pcrs text", lambda d, raw: {**d, "pcrs": ["7"]}, "integers"),
    ("pin text", lambda d, raw: {**d, "pin": "no"}, "pin: not a boolean"),
    ("bad base64", lambda d, raw: {**d, "private": "@@@@"}, "private: not valid base64"),
    ("short digest", lambda d, raw: {**d, "pcr_digest": _b64(b"x" * 31)}, "pcr_digest"),
    ("private cut", lambda d, raw: {**d, "private": _b64(base64.b64decode(d["private"])[:-3])},
     "private area: its size field"),
    ("private huge", lambda d, raw: {**d, "private": _b64(bytes(sealer.MAX_PRIVATE + 3))},
     "private: too large"),
    ("public cut", lambda d, raw: {**d, "public": _b64(base64.b64decode(d["public"])[:40])},
     "public area"),
    ("public not sealed data", lambda d, raw: {
        **d, "public": _b64(_flip(base64.b64decode(d["public"]), 3, 0x20))},
     "not a sealed data object"),
    ("NODA dropped", lambda d, raw: {
        **d, "public": _b64(_flip(base64.b64decode(d["public"]), 8, 0x04))},
     "object attributes"),
    ("policy altered", lambda d, raw: {
        **d, "public": _b64(_flip(base64.b64decode(d["public"]), 20))},
     "policy does not match"),
    ("pcrs edited", lambda d, raw: {**d, "pcrs": [7]}, "policy does not match"),
    ("digest edited", lambda d, raw: {**d, "pcr_digest": _b64(bytes(32))},
     "policy does not match"),
    ("pin flag set", lambda d, raw: {**d, "pin": True}, "object attributes"),
]


@pytest.mark.parametrize(("how", "corrupt", "reason"), CORRUPTIONS,
                         ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_sealed_file(sample: Sealed, how: str, corrupt: Any, reason: str) -> None:
    raw = sample.to_json()
    data = corrupt(_doc(sample), raw)
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    with pytest.raises(SealedCorrupt, match=reason):
        Sealed.parse(data)


def test_sealed_checks_itself(sample: Sealed) -> None:
    with pytest.raises(SealedCorrupt, match="pcrs: not a tuple"):
        Sealed(pcrs=[0, 7], pin=False, private=sample.private,  # type: ignore[arg-type]
               public=sample.public, pcr_digest=sample.pcr_digest)
    with pytest.raises(SealedCorrupt, match="policy does not match"):
        Sealed(pcrs=(0, 7), pin=False, private=sample.private, public=sample.public,
               pcr_digest=bytes(32))


def test_parse_accepts_only_what_to_json_writes(sample: Sealed) -> None:
    assert Sealed.parse(sample.to_json()) == sample
    assert Sealed.parse(json.dumps(_doc(sample)).encode()) == sample  # any JSON layout


# -- no TPM ----------------------------------------------------------------------------------

def test_probe(tpm: Swtpm) -> None:
    assert sealer.probe(tpm.tcti) is None
    nothing = _nothing_there()
    reason = sealer.probe(nothing)
    assert reason is not None and nothing in reason and "IO failure" in reason
    reason = sealer.probe("no-such-tcti")
    assert reason is not None and "no-such-tcti" in reason
    assert sealer.probe("") == "no TCTI given"


def test_nothing_listening_is_unavailable(sample: Sealed) -> None:
    nothing = _nothing_there()
    with pytest.raises(TpmUnavailable, match="no TPM answers"):
        sealer.unseal(nothing, sample)
    with pytest.raises(TpmUnavailable):
        sealer.seal(nothing, SECRET)
    with pytest.raises(TpmUnavailable):
        sealer.pcr_digest(nothing, (7,))


def test_tpm_gone_mid_way_is_unavailable(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    tpm.stop()
    with pytest.raises(TpmUnavailable):
        sealer.unseal(tpm.tcti, sealed)


def test_bad_arguments(tpm: Swtpm) -> None:
    with pytest.raises(ValueError, match=r"1\.\.64"):
        sealer.seal(tpm.tcti, bytes(65))
    with pytest.raises(ValueError, match=r"1\.\.64"):
        sealer.seal(tpm.tcti, b"")
    with pytest.raises(ValueError, match=r"0\.\.23"):
        sealer.seal(tpm.tcti, SECRET, (24,))
    with pytest.raises(ValueError, match="at least one"):
        sealer.seal(tpm.tcti, SECRET, ())
    with pytest.raises(ValueError, match="PIN"):
        sealer.seal(tpm.tcti, SECRET, pin=b"")


# -- PIN and dictionary-attack lockout -------------------------------------------------------

def test_pin(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET, pin=b"2468")
    assert sealed.pin and Sealed.parse(sealed.to_json()) == sealed
    assert sealer.unseal(tpm.tcti, sealed, b"2468") == SECRET
    with pytest.raises(BadPin, match="needs its PIN"):
        sealer.unseal(tpm.tcti, sealed)  # refused before the TPM: no try is counted
    assert tpm.property("LOCKOUT_COUNTER") == 0
    with pytest.raises(BadPin, match=r"wrong PIN \(rc 0x98e\)") as exc:
        sealer.unseal(tpm.tcti, sealed, b"1357")
    assert "1357" not in str(exc.value) and "2468" not in str(exc.value)
    assert tpm.property("LOCKOUT_COUNTER") == 1


@pytest.mark.parametrize("pin", [b"p" * 200, b"a\x00b", "ünïcode-pïn".encode()],
                         ids=["long", "nul", "utf8"])
def test_unusual_pins(tpm: Swtpm, pin: bytes) -> None:
    sealed = sealer.seal(tpm.tcti, b"k", pin=pin)
    assert sealer.unseal(tpm.tcti, sealed, pin) == b"k"
    with pytest.raises(BadPin):
        sealer.unseal(tpm.tcti, sealed, pin[:-1] + b"q")


def test_wrong_pins_lead_to_lockout(tpm: Swtpm) -> None:
    max_tries = tpm.property("MAX_AUTH_FAIL")
    assert 0 < max_tries <= 32  # swtpm's default is 3, with a 1000 s recovery time
    sealed = sealer.seal(tpm.tcti, SECRET, pin=b"2468")
    plain = sealer.seal(tpm.tcti, SECRET)
    errors = []
    for _ in range(max_tries + 2):
        with pytest.raises((BadPin, Lockout)) as exc:
            sealer.unseal(tpm.tcti, sealed, b"0000")
        errors.append(type(exc.value))
        if exc.type is Lockout:
            break
    assert errors == [BadPin] * max_tries + [Lockout]
    with pytest.raises(Lockout, match=r"rc 0x921"):
        sealer.unseal(tpm.tcti, sealed, b"2468")  # even the right PIN now
    assert sealer.unseal(tpm.tcti, plain) == SECRET  # NODA: the PCR policy is its only guard


def test_unclean_stops_do_not_lock_out_noda(tpm: Swtpm) -> None:
    sealed = sealer.seal(tpm.tcti, SECRET)
    assert sealer.unseal(tpm.tcti, sealed) == SECRET
    for _ in range(3):
        tpm.restart(orderly=False)  # SIGKILL: a power cut
        assert sealer.unseal(tpm.tcti, sealed) == SECRET
    assert tpm.property("LOCKOUT_COUNTER") == 0


def test_an_unclean_stop_after_pin_use_counts_one_failure(tpm: Swtpm) -> None:
    """A PIN object is DA-protected: once used, a power cut counts as a failed try."""
    sealed = sealer.seal(tpm.tcti, SECRET, pin=b"2468")
    assert sealer.unseal(tpm.tcti, sealed, b"2468") == SECRET
    tpm.restart(orderly=False)
    assert tpm.property("LOCKOUT_COUNTER") == 1
    tpm.restart(orderly=True)
    assert tpm.property("LOCKOUT_COUNTER") == 1
