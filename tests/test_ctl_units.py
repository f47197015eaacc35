"""Daemon building blocks without processes: events, journal rules, keys, recovery words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from ctl.errors import InvalidInput, TooManyAttempts, Unauthorized
from ctl.events import GAP, EventBus
from ctl.keys import recovery
from ctl.keys.keyset import BadSecret, KdfParams, Keyset, KeysetError
from ctl.keys.manager import Backoff, KeyManager
from ctl.paths import Paths
from ctl.volumes import journal
from ctl.volumes.journal import JournalRecord
from ctl.volumes.metadata import MetadataCorrupted, VolumeMeta, new_passphrase

CHEAP = KdfParams(time=1, memory=8192, threads=1)


async def test_events_have_sequence_time_and_gap_markers() -> None:
    bus = EventBus(history=8)
    slow = bus.subscribe(["audit"], capacity=3)
    other = bus.subscribe(["lock_state_changed"])
    for i in range(10):
        bus.publish("audit", {"i": i})
    bus.publish("lock_state_changed", {"locked": True})
    first = await slow.next()
    assert first.topic == GAP and first.data["missed"] == 7
    assert first.data["from_seq"] == 1 and first.data["to_seq"] == 7
    rest = [await slow.next() for _ in range(3)]
    assert [e.data["i"] for e in rest] == [7, 8, 9]
    assert [e.seq for e in rest] == [8, 9, 10]
    assert (await other.next()).data == {"locked": True}
    with pytest.raises(ValueError):
        bus.publish("no_such_topic", {})
    resumed = bus.subscribe(since=1)  # history holds 8: seqs 4..11, so 2..3 are a gap
    gap = await resumed.next()
    assert gap.topic == GAP and gap.data == {"missed": 2, "from_seq": 2, "to_seq": 3}
    assert (await resumed.next()).seq == 4
    bus.close()
    with pytest.raises(trio.EndOfChannel):
        while True:
            await other.next()


def test_journal_rules(tmp_path: Path) -> None:
    r = JournalRecord()
    r = r.transition(desired="mounted", observed="pending", role="leader")
    assert r.generation == 1 and not r.needs_repair
    r = r.transition(observed="error", cause="boom")
    assert r.needs_repair and r.last_error == "boom" and r.generation == 2
    r = r.transition(observed="pending")
    assert r.needs_repair and r.last_error == ""  # inherited until reality matches intent
    r = r.transition(observed="mounted")
    assert not r.needs_repair
    path = tmp_path / "volumes" / "v" / "state.json"
    journal.write(path, r)
    assert journal.read(path) == r
    assert path.stat().st_mode & 0o777 == 0o600
    on_disk = json.loads(path.read_text())
    assert "last_error" not in on_disk and on_disk["updated_at"].endswith("Z")
    path.write_text("{truncated")
    with pytest.raises(journal.CorruptJournal):
        journal.read(path)


def test_recovery_words() -> None:
    key = recovery.generate()
    words = key.split()
    assert len(words) == 26 and all(w in recovery.WORDS for w in words)
    assert recovery.normalize("  " + key.upper().replace(" ", "\n ")) == key
    noticed = 0
    for i in range(24):
        typo = list(words)
        typo[i] = recovery.WORDS[(recovery.WORDS.index(typo[i]) + 1) % 26]
        try:
            recovery.normalize(" ".join(typo))
        except recovery.RecoveryKeyError as exc:
            assert "mistyped" in str(exc)
            noticed += 1
    assert noticed >= 22  # a checksum collision is possible (1 in 676), not a pattern
    legacy = " ".join(["alpha"] * 24)
    assert recovery.normalize(legacy) == legacy
    with pytest.raises(recovery.RecoveryKeyError, match="unknown word"):
        recovery.normalize("alpha " * 23 + "omega")
    with pytest.raises(recovery.RecoveryKeyError, match="25"):
        recovery.normalize("alpha " * 25)


def test_keyset_round_trip_and_refusals() -> None:
    ks = Keyset.create(b"\x01" * 32, b"pw", CHEAP)
    parsed = Keyset.parse(ks.to_json())
    assert bytes(parsed.open_with_password(b"pw")) == b"\x01" * 32
    with pytest.raises(BadSecret):
        parsed.open_with_password(b"other")
    with_rk = parsed.with_recovery(b"\x01" * 32, "alpha " * 23 + "bravo")
    assert bytes(Keyset.parse(with_rk.to_json()).open_with_recovery("alpha " * 23 + "bravo")) \
        == b"\x01" * 32
    renewed = with_rk.with_password(b"\x01" * 32, b"new")
    assert bytes(renewed.open_with_recovery("alpha " * 23 + "bravo")) == b"\x01" * 32
    obj = json.loads(ks.to_json())
    assert not any(v.endswith("=") for v in (obj["sdek"], obj["salt"], obj["nonce"]))
    for broken in (b"", b"{", b'{"kdf": {"alg": "scrypt", "time": 1, "memory": 8, '
                             b'"threads": 1}}', json.dumps({**obj, "sdek": "!!"}).encode()):
        with pytest.raises(KeysetError):
            Keyset.parse(broken)


def test_backoff_grows_and_decays() -> None:
    now = [1000.0]
    b = Backoff(clock=lambda: now[0])
    for _ in range(Backoff.FREE):
        b.admit("uid:1")  # the first FREE attempts are free...
    with pytest.raises(TooManyAttempts):
        b.admit("uid:1")  # ...and the next one is not, even a moment later
    b.admit("uid:2")  # per client
    now[0] += 1.5
    with pytest.raises(TooManyAttempts):
        b.admit("uid:1")
    now[0] += 1
    b.admit("uid:1")  # ~2 s after the third
    with pytest.raises(TooManyAttempts):
        b.admit("uid:1")  # and then ~4 s
    now[0] += 3600
    b.admit("uid:1")  # decayed
    b.success("uid:1")
    assert b.wait_for("uid:1") == 0
    for _ in range(Backoff.FREE):
        b.admit("uid:3")
    b.refund("uid:3")  # an attempt that checked nothing costs nothing
    b.admit("uid:3")


async def test_key_manager_locks_by_zeroing(tmp_path: Path) -> None:
    km = KeyManager(Paths(tmp_path / "s", tmp_path / "r"), CHEAP)
    await km.setup(b"pw")
    assert km.locked and km.status() == {"initialized": True, "locked": True,
                                         "recovery_key": False}
    with pytest.raises(InvalidInput):
        await km.unlock(b"", "c")
    for _ in range(Backoff.FREE):
        with pytest.raises(Unauthorized):
            await km.unlock(b"bad", "c")
    with pytest.raises(TooManyAttempts):
        await km.unlock(b"pw", "c")  # the attempt after the free ones waits, right or not
    await km.unlock(b"pw", "other-client")
    held = km._sdek
    assert held is not None and any(held)
    km.lock()
    assert km.locked and not any(held)  # the very buffer was overwritten


def test_volume_metadata() -> None:
    sdek = b"\x02" * 32
    pp = new_passphrase()
    assert len(pp) == 43
    meta = VolumeMeta.seal(sdek, pp, "control", "stateful", "read_only")
    parsed = VolumeMeta.parse(meta.to_json())
    assert bytes(parsed.unseal(sdek)) == pp and parsed.volume_class == "control"
    with pytest.raises(MetadataCorrupted):
        parsed.unseal(b"\x03" * 32)
    obj = json.loads(meta.to_json())
    for broken in ({**obj, "nonce": "AAAA"}, {**obj, "wrapped_key": ""}, "text"):
        with pytest.raises(MetadataCorrupted):
            VolumeMeta.parse(json.dumps(broken).encode())
