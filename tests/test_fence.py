"""The write lease and fencing token of a leader's mount, through a real mount process and
its control channel (the parent here plays the daemon, and can simply stop renewing, as a
frozen or dead daemon would)."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from tests.mounts import PiccoloMount, init_piccolofs

pytestmark = pytest.mark.timeout(120)


def _write(path: Path) -> int:
    try:
        path.write_bytes(b"record")
    except OSError as exc:
        return exc.errno or -1
    return 0


@pytest.fixture
def leased(tmp_path: Path, passfile: Path) -> PiccoloMount:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    return PiccoloMount(cipher, tmp_path / "mnt", passfile, extra=["--lease", "30",
                                                                   "--token", "5"])


def test_a_lease_that_is_not_renewed_ends_writes_by_itself(leased: PiccoloMount) -> None:
    with leased as m:
        stats = m.request("stats")
        assert (stats["role"], stats["token"]) == ("leader", 5)
        assert 0 < stats["lease_remaining"] <= 30
        reply = m.request("lease", token=5, lease=1.0)
        assert reply["ok"], reply
        deadline = reply["deadline"]  # the mount's CLOCK_MONOTONIC, the same as ours
        # A writer that keeps going: no write may start after the deadline and succeed.
        results: list[tuple[float, int]] = []

        def writer() -> None:
            n = 0
            while time.monotonic() < deadline + 1.0 and n < 100_000:
                n += 1
                started = time.monotonic()
                results.append((started, _write(m.mnt / f"r{n % 20}")))

        t = threading.Thread(target=writer)
        t.start()
        t.join(timeout=30)
        ok = [s for s, e in results if e == 0]
        refused = [(s, e) for s, e in results if e != 0]
        assert ok and refused, "the writer must have run on both sides of the deadline"
        assert max(ok) < deadline, "a write that started after the deadline succeeded"
        assert {e for _, e in refused} == {errno.EROFS}
        events = m.drain_events()
        assert {"event": "lease_expired", "token": 5} in [
            {k: e[k] for k in ("event", "token")} for e in events if "token" in e]
        assert m.request("stats")["role"] == "follower"  # and it sticks:
        late = m.request("lease", token=5, lease=10.0)
        assert not late["ok"] and "run out" in late["error"]
        assert _write(m.mnt / "late") == errno.EROFS


def test_renewals_keep_a_leader_writing(leased: PiccoloMount) -> None:
    with leased as m:
        for i in range(8):
            assert m.request("lease", token=5, lease=0.6)["ok"]
            assert _write(m.mnt / f"w{i}") == 0
            time.sleep(0.2)
        assert m.request("stats")["role"] == "leader"


def test_stale_tokens_are_refused(leased: PiccoloMount) -> None:
    with leased as m:
        assert not m.request("lease", token=4, lease=5.0)["ok"]  # an older term
        assert not m.request("lease", token=6, lease=5.0)["ok"]  # a term never granted here
        assert m.request("set_role", role="follower")["ok"]
        assert _write(m.mnt / "x") == errno.EROFS
        stale = m.request("set_role", role="leader", token=4, lease=5.0)
        assert not stale["ok"] and "stale token" in stale["error"]
        assert _write(m.mnt / "x") == errno.EROFS  # the refused promotion changed nothing
        newer = m.request("set_role", role="leader", token=7, lease=5.0)
        assert newer["ok"] and newer["token"] == 7
        assert _write(m.mnt / "x") == 0
        assert m.request("stats")["token"] == 7
        # A parent gives the lease's end on the shared monotonic clock: a delay in
        # delivering it cannot lengthen it, and an end already past is refused.
        until = time.monotonic() + 3.0
        assert m.request("lease", token=7, until=until)["deadline"] >= until
        assert m.request("set_role", role="follower")["ok"]
        late = m.request("set_role", role="leader", token=8, until=time.monotonic() - 0.1)
        assert not late["ok"] and "already run out" in late["error"]
        assert _write(m.mnt / "y") == errno.EROFS


def test_without_a_lease_nothing_changes(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    with PiccoloMount(cipher, tmp_path / "mnt", passfile) as m:
        stats = m.request("stats")
        assert stats["lease_remaining"] is None and stats["token"] == 0
        assert _write(m.mnt / "x") == 0
        assert not m.request("lease", token=0, lease=5.0)["ok"]  # no lease to extend
        bad = m.request("lease", token=-1, lease=5.0)
        assert not bad["ok"]
