"""The daemon's failure paths, against the real daemon, real mounts and real crashes.

The promise under test: no plaintext ever lands on the host disk, whatever state the daemon
is in, and no volume is reported mounted unless our mount is really there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ctl.cli import ApiError, Client
from ctl.keys.keyset import Keyset
from ctl.volumes.metadata import VolumeMeta, new_passphrase
from tests.daemon import PASSWORD, Daemon, second_mount
from tests.mounts import PiccoloMount, is_mounted

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def unlocked(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    with d:
        d.setup_and_unlock()
        yield d
    assert "Traceback" not in d.log(), d.log()


@contextlib.contextmanager
def underneath(state: Path, where: Path) -> Iterator[Path]:
    """The state dir as the host disk holds it: a non-recursive bind mount shows the bare
    directories under the mounts."""
    where.mkdir()
    subprocess.run(["mount", "--bind", str(state), str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=30)
        where.rmdir()


def _refused(path: Path) -> int:
    """The errno a write at `path` gets (0 if it succeeded)."""
    try:
        path.write_text("plaintext that must not rest on the host")
    except OSError as exc:
        return exc.errno or -1
    return 0


class Writer(threading.Thread):
    """An application that keeps writing to its paths whatever the daemon does."""

    def __init__(self, dirs: list[Path]) -> None:
        super().__init__(daemon=True)
        self.dirs = dirs
        self.stop = threading.Event()
        self.written = 0
        self.refused = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 2_000_000:
            for d in self.dirs:
                n += 1
                try:
                    (d / f"w{n % 50}").write_bytes(b"plaintext" * 10)
                    self.written += 1
                except OSError:
                    self.refused += 1
            time.sleep(0.001)


def test_unmounted_mountpoints_refuse_every_write(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "docs"})
        d.call("POST", "/volumes/docs/attach", {"role": "leader"})
        assert d.volume("docs")["mountpoint_guarded"]
        assert _refused(d.mount("docs") / "ok") == 0  # mounted: writes go to the volume
        d.call("POST", "/crypto/lock")
        for vid in ("control", "docs"):  # locked
            assert _refused(d.mount(vid) / "x") == errno.EPERM
            assert _refused(d.mount(vid) / "sub" / "x") == errno.ENOENT
            with pytest.raises(PermissionError):
                (d.mount(vid) / "dir").mkdir()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.call("POST", "/volumes/docs/detach", {})
        assert _refused(d.mount("docs") / "x") == errno.EPERM  # detached
        d.stop(release=False)
        for vid in ("bootstrap", "control", "docs"):  # daemon stopped
            assert _refused(d.mount(vid) / "x") == errno.EPERM
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.kill9()
        psutil.wait_procs(d.children(), timeout=20)
        for vid in ("bootstrap", "control", "docs"):  # daemon crashed
            assert _refused(d.mount(vid) / "x") == errno.EPERM
        with underneath(d.state, tmp_path / "under") as raw:
            for vid in ("bootstrap", "control", "docs"):
                assert not any((raw / "mounts" / vid).iterdir())
    finally:
        d.stop()


def test_a_writer_never_reaches_the_host_disk(tmp_path: Path) -> None:
    """Through lock, detach, a mount process's death and re-attach, SIGTERM and kill -9 of
    the daemon, an application writing at the mount roots leaves nothing on the host."""
    d = Daemon(tmp_path).start()
    writer = Writer([d.mount("control"), d.mount("docs")])
    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "docs"})
        d.call("POST", "/volumes/docs/attach", {"role": "leader"})
        writer.start()
        d.call("POST", "/crypto/lock")
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.call("POST", "/volumes/docs/detach", {"lazy": True})
        d.call("POST", "/volumes/docs/attach", {"role": "leader"})
        os.kill(d.volume("docs")["pid"], signal.SIGKILL)  # the re-attach gap
        d.wait_for(lambda: d.volume("docs")["observed_state"] == "error", what="death")
        d.wait_for(lambda: d.volume("docs")["observed_state"] == "mounted", what="re-attach")
        d.stop(release=False)  # keep the guard: the writer goes on while we are down
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.kill9()
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        written_before = writer.written
        d.wait_for(lambda: writer.written > written_before + 10, what="writes while mounted")
        writer.stop.set()
        writer.join(timeout=30)
        d.stop(release=False)
        assert writer.refused > 0 and writer.written > 0
        with underneath(d.state, tmp_path / "under") as raw:
            for m in (raw / "mounts").iterdir():
                assert not any(m.iterdir()), f"{m.name}: plaintext under the mountpoint"
            found = {p.relative_to(raw) for p in raw.rglob("*") if p.is_file()
                     and p.relative_to(raw).parts[0] != "ciphertext"}
            assert {p.parts[0] for p in found} <= {"crypto", "volumes", ".ctld.lock"}, found
    finally:
        writer.stop.set()
        writer.join(timeout=30)
        d.stop()


def test_a_failed_mount_is_never_reported_mounted(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "docs"})
    d.call("POST", "/volumes/docs/attach", {"role": "leader"})
    (d.mount("docs") / "keep").write_text("data")
    d.call("POST", "/volumes/docs/detach", {})
    conf = d.state / "ciphertext" / "docs" / "gocryptfs.conf"
    good = conf.read_bytes()
    conf.chmod(0o600)
    conf.write_bytes(b"\x00garbage{")
    for _ in range(2):  # the second attempt must not find a "mounted" volume either
        err = d.error("POST", "/volumes/docs/attach", {"role": "leader"})
        assert err.status == 500 and err.code == "state_corrupt", err.body
        assert err.body["error"]["file"] == str(conf)
        assert "nursery" not in str(err) and err.body["error"]["reason"]
        v = d.volume("docs")
        assert (v["attached"], v["observed_state"], v["needs_repair"]) == \
            (False, "error", True)
        assert not is_mounted(d.mount("docs"))
        health = d.call("GET", "/health")
        assert health["status"] == "degraded" and "docs" in health["needs_repair"]
        assert _refused(d.mount("docs") / "x") == errno.EPERM
    conf.write_bytes(good)

    # A failure only the mount process itself can see: the key opens nothing.
    meta_path = d.state / "ciphertext" / "docs" / "piccolo.volume.json"
    real_meta = meta_path.read_bytes()
    sdek = Keyset.parse((d.state / "crypto" / "keyset.json").read_bytes()) \
        .open_with_password(PASSWORD.encode())
    meta_path.write_bytes(VolumeMeta.seal(bytes(sdek), new_passphrase(), "application",
                                          "stateful", "read_only").to_json())
    err = d.error("POST", "/volumes/docs/attach", {"role": "leader"})
    assert err.status == 500 and "password" in str(err).lower(), str(err)
    assert "nursery" not in str(err)
    assert "password" in d.volume("docs")["last_error"].lower()
    assert not d.volume("docs")["attached"] and not is_mounted(d.mount("docs"))
    meta_path.write_bytes(real_meta)
    v = d.call("POST", "/volumes/docs/attach", {"role": "leader"})
    assert (v["observed_state"], v["needs_repair"]) == ("mounted", False)
    assert (d.mount("docs") / "keep").read_text() == "data"


def test_a_mount_that_vanishes_is_reported_and_replaced(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "docs"})
    d.call("POST", "/volumes/docs/attach", {"role": "leader"})
    (d.mount("docs") / "keep").write_text("data")
    old_pid = d.volume("docs")["pid"]
    since = d.call("GET", "/health")["last_event_seq"]
    # An open file keeps the old mount process serving after the mount leaves the path, so
    # only a comparison with mountinfo can tell that the volume is no longer mounted.
    with open(d.mount("docs") / "keep") as held:
        subprocess.run(["umount", "-l", str(d.mount("docs"))], check=True, timeout=30)
        d.wait_for(lambda: any(e["data"]["observed_state"] == "error" and
                               "gone" in e["data"].get("last_error", "")
                               for e in d.events(since=since, topic="volume_state_changed")),
                   what="the loss to be journaled")
        d.wait_for(lambda: d.volume("docs")["observed_state"] == "mounted"
                   and not d.volume("docs")["needs_repair"], what="re-attach")
        assert d.volume("docs")["pid"] != old_pid
        assert held.read() == "data"  # the old process still serves what it holds
    assert (d.mount("docs") / "keep").read_text() == "data"


def test_core_volumes_are_not_detached_by_hand(unlocked: Daemon) -> None:
    d = unlocked
    for vid in ("control", "bootstrap"):
        err = d.error("POST", f"/volumes/{vid}/detach", {"lazy": True})
        assert err.status == 409, err.body
        err = d.error("POST", f"/volumes/{vid}/role", {"role": "follower"})
        assert err.status == 409, err.body
    assert is_mounted(d.mount("control"))
    d.call("PUT", "/store/apps/a1", {"Image": "app:1"})
    assert d.call("GET", "/store")["health"]["status"] == "ok"


def test_control_mount_lost_behind_our_back_shows_and_recovers(unlocked: Daemon) -> None:
    d = unlocked
    d.call("PUT", "/store/apps/before", {"Image": "app:1"})
    subprocess.run(["umount", "-l", str(d.mount("control"))], check=True, timeout=30)
    d.wait_for(lambda: d.call("GET", "/health")["status"] == "degraded",
               what="health to see the loss")

    def back() -> bool:
        v = d.volume("control")
        # Never "mounted" without a mount process: the loss is journaled as the child goes.
        assert v["attached"] or v["observed_state"] != "mounted", v
        return v["observed_state"] == "mounted" and d.call("POST", "/store/check")["status"] == "ok"

    d.wait_for(back, what="control re-attached and the store reopened on it")
    d.call("PUT", "/store/apps/after", {"Image": "app:1"})
    names = {a["Name"] for a in d.call("GET", "/store/apps")["apps"]}
    assert {"before", "after"} <= names
    d.wait_for(lambda: d.call("GET", "/health")["status"] == "ok", what="health ok again")


def test_orphaned_mount_processes_leave_when_the_daemon_dies(unlocked: Daemon) -> None:
    """In steady state (the race with a starting mount process is what the random kills
    below go after)."""
    d = unlocked
    children = d.children()
    assert len(children) == 2
    d.kill9()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.pid for p in alive]
    assert not is_mounted(d.mount("control"))


def test_a_frozen_stale_mount_never_blocks_the_daemon(tmp_path: Path) -> None:
    """A mount whose process no longer answers (here: stopped) hangs any stat of its
    mountpoint once the kernel's attribute cache has expired. The daemon must start, attach
    and unlock over such mounts, and keep answering, whatever it finds."""
    d = Daemon(tmp_path).start()
    frozen: list[PiccoloMount] = []

    def freeze(vid: str) -> None:
        m = second_mount(d.state, vid, d.mount(vid)).start()
        frozen.append(m)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # past the mount's 1 s attribute timeout: a stat would now hang

    def kill_frozen() -> None:
        while frozen:
            m = frozen.pop()
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=30)
            if m.sock is not None:
                m.sock.close()

    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "docs"})
        d.call("POST", "/volumes/docs/attach", {"role": "leader"})
        (d.mount("docs") / "data").write_text("intact")
        (d.mount("control") / "data").write_text("intact")
        d.call("POST", "/volumes/docs/detach", {})
        freeze("docs")  # while the daemon runs
        quick = Client(str(d.socket), timeout=20)
        quick.call("POST", "/volumes/docs/attach", {"role": "leader"})
        assert quick.call("GET", "/health")["volumes"]["docs"] == "mounted"
        assert (d.mount("docs") / "data").read_text() == "intact"
        d.call("POST", "/crypto/lock")
        freeze("control")  # while locked
        quick.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert (d.mount("control") / "data").read_text() == "intact"
        kill_frozen()
        d.stop(release=False)
        freeze("control")  # while the daemon is down
        d.start(ready_timeout=10)
        assert quick.call("GET", "/crypto/status")["locked"]
        quick.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert (d.mount("control") / "data").read_text() == "intact"
    finally:
        kill_frozen()
        d.stop()


def test_kill9_at_random_moments_of_unlock(tmp_path: Path, soak: bool) -> None:
    """Kills at random moments of an unlock (8, or 20 under --soak); each restart serves
    within 10 s and unlocks with the data intact."""
    rng = random.Random(20261129)
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "docs"})
        d.call("POST", "/volumes/docs/attach", {"role": "leader"})
        (d.mount("docs") / "data").write_text("intact")
        (d.mount("control") / "data").write_text("intact")
        d.call("POST", "/crypto/lock")
        t0 = time.monotonic()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        span = time.monotonic() - t0
        d.call("POST", "/crypto/lock")
        for trial in range(20 if soak else 8):
            children = d.children()
            caller = threading.Thread(target=_unlock_quietly, args=(d.socket,), daemon=True)
            caller.start()
            time.sleep(rng.uniform(0, span * 1.2))
            d.kill9()
            caller.join(timeout=60)
            _, alive = psutil.wait_procs([*children, *d.children()], timeout=20)
            assert not alive, f"trial {trial}: mount processes outlived the daemon"
            d.start(ready_timeout=10)
            d.call("POST", "/crypto/unlock", {"password": PASSWORD})
            for vid in ("docs", "control"):
                assert (d.mount(vid) / "data").read_text() == "intact", (trial, vid)
            d.call("POST", "/crypto/lock")
    finally:
        d.stop()


def _unlock_quietly(sock: Path) -> None:
    with contextlib.suppress(ApiError, OSError):
        Client(str(sock), timeout=30).call("POST", "/crypto/unlock", {"password": PASSWORD})


JOURNALS = {
    "overflow": b'{"desired_state": "mounted", "observed_state": "mounted", '
                b'"role": "leader", "generation": 1e999, "needs_repair": false}',
    "truncated": b'{"desired_state": "mounted", "observed_st',
    "garbage": b"\x8f\x00 not json",
    "empty": b"",
    "list": b"[]",
    "types": b'{"desired_state": "mounted", "observed_state": "mounted", "role": "leader", '
             b'"generation": "7", "needs_repair": "no"}',
    "unknown": b'{"desired_state": "sideways", "observed_state": "mounted", '
               b'"role": "leader", "generation": 3, "needs_repair": false}',
}


def test_corrupt_journals_are_kept_flagged_and_never_stop_the_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        vids = [f"v-{name}" for name in JOURNALS] + ["v-dir", "healthy"]
        for vid in vids:
            d.call("POST", "/volumes", {"id": vid})
            d.call("POST", f"/volumes/{vid}/attach", {"role": "leader"})
        d.stop()
        for name, data in JOURNALS.items():
            (d.state / "volumes" / f"v-{name}" / "state.json").write_bytes(data)
        jdir = d.state / "volumes" / "v-dir" / "state.json"
        jdir.unlink()
        jdir.mkdir()
        for restart in range(2):  # still flagged after a restart with nobody acting
            d.start()
            d.call("POST", "/crypto/unlock", {"password": PASSWORD})
            health = d.call("GET", "/health")
            assert health["status"] == "degraded"
            assert set(health["needs_repair"]) == set(vids) - {"healthy"}, health
            for vid in set(vids) - {"healthy"}:
                v = d.volume(vid)
                assert v["needs_repair"] and not v["attached"], (restart, v)
                assert "intent is unknown" in v["last_error"] and "kept as" in v["last_error"]
                kept = list((d.state / "volumes" / vid).glob("state.json.corrupt-*"))
                assert len(kept) == 1, (vid, kept)
                if vid != "v-dir":
                    assert kept[0].read_bytes() == JOURNALS[vid[2:]]
            assert d.volume("healthy")["observed_state"] == "mounted"
            events = d.events(topic="volume_state_changed")
            assert any(e["data"]["id"] == "v-overflow" and e["data"]["needs_repair"]
                       for e in events)
            d.stop()
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        v = d.call("POST", "/volumes/v-garbage/attach", {"role": "leader"})  # intent stated
        assert (v["observed_state"], v["needs_repair"]) == ("mounted", False)
        assert d.journal("v-garbage")["desired_state"] == "mounted"
    finally:
        d.stop()


def _keyset_variants(good: dict[str, object]) -> dict[str, bytes]:
    def with_(**kw: object) -> bytes:
        return json.dumps({**good, **kw}).encode()

    kdf = dict(good["kdf"])  # type: ignore[call-overload]
    return {
        "empty": b"",
        "truncated": json.dumps(good).encode()[:40],
        "garbage": b"\xff\xfe\x00binary",
        "list": b"[]",
        "no kdf": with_(kdf=None),
        "kdf types": with_(kdf={**kdf, "time": "3"}),
        "kdf memory": with_(kdf={**kdf, "memory": 2**40}),
        "kdf float": with_(kdf={**kdf, "time": 1e999}),
        "sdek base64": with_(sdek="!!not base64!!"),
        "short salt": with_(salt="AAAA"),
        "nonce": with_(nonce="AAAAAAAA"),
    }


def test_a_corrupt_keyset_says_which_file_and_what(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.call("POST", "/crypto/setup", {"password": PASSWORD})
        path = d.state / "crypto" / "keyset.json"
        good = path.read_bytes()
        for name, data in _keyset_variants(json.loads(good)).items():
            path.write_bytes(data)
            err = d.error("POST", "/crypto/unlock", {"password": PASSWORD})
            assert (err.status, err.code) == (500, "state_corrupt"), (name, err.body)
            assert err.body["error"]["file"] == str(path), name
            assert err.body["error"]["reason"], name
            assert path.read_bytes() == data, f"{name}: the file was touched"
        path.unlink()
        path.mkdir()
        err = d.error("POST", "/crypto/unlock", {"password": PASSWORD})
        assert err.code == "state_corrupt" and "read" in err.body["error"]["reason"]
        path.rmdir()
        path.write_bytes(good)
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})  # no back-off was charged

        # A corrupt gocryptfs.conf of the control volume: named, and the unlock rolled back.
        d.call("POST", "/crypto/lock")
        conf = d.state / "ciphertext" / "control" / "gocryptfs.conf"
        conf.chmod(0o600)
        conf.write_text('{"Version": 2, "EncryptedKey": 5}')
        err = d.error("POST", "/crypto/unlock", {"password": PASSWORD})
        assert err.status == 500 and str(conf) in str(err), err.body
        assert d.call("GET", "/crypto/status")["locked"]
        assert not is_mounted(d.mount("control"))
    finally:
        d.stop()


def test_unlock_while_unlocked_still_checks_the_secret(unlocked: Daemon) -> None:
    d = unlocked
    err = d.error("POST", "/crypto/unlock", {"password": "not the password"})
    assert err.status == 401
    err = d.error("POST", "/crypto/unlock", {"recovery_key": "abandon " * 23 + "art"})
    assert err.status in (401, 409, 422), err.body
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})


def _hammer(d: Daemon, n: int, path: str, body: dict[str, str]) -> list[int]:
    codes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one() -> None:
        start.wait(timeout=60)
        try:
            Client(str(d.socket), timeout=120).call("POST", path, body)
            code = 200
        except ApiError as exc:
            code = exc.status
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return codes


def test_concurrent_guesses_share_one_budget(tmp_path: Path) -> None:
    with Daemon(tmp_path) as d:
        d.call("POST", "/crypto/setup", {"password": PASSWORD})
        codes = _hammer(d, 30, "/crypto/recovery-key/generate", {"password": "guess"})
        assert len(codes) == 30 and codes.count(401) <= 3 and codes.count(200) == 0, codes
        assert set(codes) <= {401, 429}, codes
    (tmp_path / "b").mkdir()
    with Daemon(tmp_path / "b") as d:
        d.setup_and_unlock()
        codes = _hammer(d, 50, "/crypto/password",
                        {"old_password": "guess", "new_password": "whatever"})
        assert len(codes) == 50 and codes.count(401) <= 3 and codes.count(200) == 0, codes
        # The same budget covers every route that checks a secret.
        assert d.error("POST", "/crypto/unlock", {"password": "guess"}).status == 429
