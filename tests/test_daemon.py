"""The control daemon as a real process, driven only through its socket and its CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.cli import Client
from tests.daemon import PASSWORD, Daemon
from tests.mounts import force_unmount, is_mounted


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    with d:
        yield d
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def unlocked(daemon: Daemon) -> Daemon:
    daemon.setup_and_unlock()
    return daemon


def _topics(events: list[dict[str, object]]) -> list[str]:
    return [str(e["topic"]) for e in events]


def test_setup_unlock_mounts_bootstrap_then_control(daemon: Daemon) -> None:
    assert daemon.call("GET", "/crypto/status") == {"initialized": False, "locked": False,
                                                       "bootstrap": None, "import": None}
    daemon.call("POST", "/crypto/setup", {"password": PASSWORD})
    assert daemon.call("GET", "/crypto/status") == {"initialized": True, "locked": True,
                                                       "bootstrap": None, "import": None}
    keyset = daemon.state / "crypto" / "keyset.json"
    assert keyset.stat().st_mode & 0o777 == 0o600
    assert (daemon.state / "crypto").stat().st_mode & 0o777 == 0o700
    assert set(json.loads(keyset.read_text())) == {"sdek", "salt", "nonce", "kdf"}
    assert daemon.socket.stat().st_mode & 0o777 == 0o660
    daemon.call("POST", "/crypto/unlock", {"password": PASSWORD})
    assert is_mounted(daemon.mount("bootstrap")) and is_mounted(daemon.mount("control"))
    changes = [e["data"] for e in daemon.events(topic="volume_state_changed")
               if e["data"]["observed_state"] == "mounted"]
    assert [c["id"] for c in changes] == ["bootstrap", "control"]  # bootstrap first
    for vid in ("bootstrap", "control"):
        j = daemon.journal(vid)
        assert (j["desired_state"], j["observed_state"], j["role"]) == \
            ("mounted", "mounted", "leader")
        assert daemon.volume(vid)["generation"] == j["generation"]
    (daemon.mount("control") / "hello").write_text("state lives here")


def test_volume_roles_and_the_read_only_gate(unlocked: Daemon) -> None:
    d = unlocked
    res = d.ctl("volume", "ensure", "photos")
    assert res.returncode == 0, res.stderr
    assert d.ctl("volume", "attach", "photos").returncode == 0
    again = d.ctl("--json", "volume", "attach", "photos")  # idempotent: same child
    pid = json.loads(again.stdout)["pid"]
    (d.mount("photos") / "a.jpg").write_bytes(b"jpeg")
    assert d.ctl("volume", "role", "photos", "follower").returncode == 0
    assert d.volume("photos")["pid"] == pid  # flipped live, not remounted
    with pytest.raises(OSError) as e:
        (d.mount("photos") / "b.jpg").write_bytes(b"nope")
    assert e.value.errno == errno.EROFS
    assert (d.mount("photos") / "a.jpg").read_bytes() == b"jpeg"
    assert d.ctl("volume", "role", "photos", "leader").returncode == 0
    (d.mount("photos") / "b.jpg").write_bytes(b"yes")
    assert d.journal("photos")["role"] == "leader"
    gens = [e["data"]["generation"] for e in d.events(topic="volume_state_changed")
            if e["data"]["id"] == "photos"]
    assert gens == sorted(gens) and len(set(gens)) == len(gens)


def test_leadership_registry_gates_and_flips(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "app1"})
    d.call("POST", "/volumes/app1/attach", {"role": "leader"})
    d.call("POST", "/leadership", {"resource": "app1", "role": "follower"})
    d.wait_for(lambda: d.volume("app1")["read_only"], what="live demotion")
    assert d.journal("app1")["role"] == "follower"
    err = d.error("POST", "/volumes/app1/attach", {"role": "leader"})
    assert err.status == 409 and err.code == "not_leader"
    d.call("POST", "/leadership", {"resource": "app1", "role": "leader"})
    d.wait_for(lambda: d.volume("app1")["read_only"] is False, what="live promotion")
    d.call("POST", "/volumes", {"id": "cold", "follower_policy": "detached"})
    d.call("POST", "/volumes/cold/attach", {"role": "leader"})
    d.call("POST", "/leadership", {"resource": "cold", "role": "follower"})
    d.wait_for(lambda: not d.volume("cold")["attached"], what="detach on demotion")
    assert not is_mounted(d.mount("cold"))
    topics = _topics(d.events(topic="leadership_role_changed"))
    assert topics == ["leadership_role_changed"] * 3


def test_mount_child_death_is_noticed_and_repaired(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "vol"})
    d.call("POST", "/volumes/vol/attach", {"role": "leader"})
    (d.mount("vol") / "keep").write_text("data")
    since = d.call("GET", "/health")["last_event_seq"]
    old_pid = d.volume("vol")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    d.wait_for(lambda: any(e["data"]["observed_state"] == "error" for e in
                           d.events(since=since, topic="volume_state_changed")),
               what="the death to be journaled")
    d.wait_for(lambda: d.volume("vol")["observed_state"] == "mounted"
               and d.volume("vol")["attached"] and not d.volume("vol")["needs_repair"],
               what="re-attach")
    seen = [e["data"] for e in d.events(since=since, topic="volume_state_changed")]
    states = [(s["observed_state"], s["needs_repair"]) for s in seen]
    assert ("error", True) in states
    error = next(s for s in seen if s["observed_state"] == "error")
    assert "exited unexpectedly" in error["last_error"]
    assert states[-1] == ("mounted", False)
    assert d.volume("vol")["pid"] != old_pid
    assert (d.mount("vol") / "keep").read_text() == "data"


def test_detach_busy_then_lazy(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "busy"})
    d.call("POST", "/volumes/busy/attach", {"role": "leader"})
    held = open(d.mount("busy") / "open-file", "w")
    try:
        err = d.error("POST", "/volumes/busy/detach", {})
        assert err.status == 409 and err.code == "busy"
        assert d.volume("busy")["attached"]
        res = d.ctl("volume", "detach", "busy")
        assert res.returncode == 5
        d.call("POST", "/volumes/busy/detach", {"lazy": True})
    finally:
        held.close()
    assert not is_mounted(d.mount("busy"))
    j = d.journal("busy")
    assert (j["desired_state"], j["observed_state"]) == ("unmounted", "unmounted")


def test_lock_keeps_bootstrap_and_leaves_no_plaintext(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "docs"})
    d.call("POST", "/volumes/docs/attach", {"role": "leader"})
    (d.mount("docs") / "secret.txt").write_text("plaintext that must not rest on the host")
    (d.mount("control") / "control.txt").write_text("control data")
    d.call("POST", "/crypto/lock")
    assert is_mounted(d.mount("bootstrap"))
    assert not is_mounted(d.mount("control")) and not is_mounted(d.mount("docs"))
    assert d.call("GET", "/crypto/status")["locked"] is True
    err = d.error("POST", "/volumes/docs/attach", {"role": "leader"})
    assert err.status == 423 and err.code == "locked"
    assert d.ctl("volume", "ensure", "more").returncode == 3
    d.stop()  # everything detached; now inspect what rests on disk
    allowed_files = {"keyset.json", "state.json", "gocryptfs.conf", "gocryptfs.diriv",
                     "piccolo.volume.json", ".ctld.lock"}
    for path in d.state.rglob("*"):
        rel = path.relative_to(d.state)
        if path.is_dir():
            if rel.parts[0] == "mounts" and len(rel.parts) == 2:
                assert not any(path.iterdir()), f"mountpoint {rel} is not empty"
            continue
        if rel.parts[0] == "ciphertext" and path.name not in allowed_files:
            assert path.name.startswith("gocryptfs.longname.") or "." not in path.name
            assert b"plaintext that must" not in path.read_bytes()
            continue
        assert path.name in allowed_files, f"unexpected file {rel}"
    d.start()
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})
    assert (d.mount("docs") / "secret.txt").read_text().startswith("plaintext")


def test_recovery_key_flows(daemon: Daemon) -> None:
    d = daemon
    d.call("POST", "/crypto/setup", {"password": PASSWORD})
    res = d.ctl("recovery-key", "generate", "--with-password", input=PASSWORD + "\n")
    assert res.returncode == 0, res.stderr
    words = d.call("POST", "/crypto/recovery-key/generate", {"password": PASSWORD})["words"]
    assert len(words) == 26
    typo = list(words)
    typo[3] = "alpha" if typo[3] != "alpha" else "bravo"
    err = d.error("POST", "/crypto/unlock", {"recovery_key": " ".join(typo)})
    assert err.status == 422 and "mistyped" in str(err)
    d.call("POST", "/crypto/unlock", {"recovery_key": " ".join(words).upper()})
    assert d.call("GET", "/crypto/status")["locked"] is False
    d.call("POST", "/crypto/lock")
    res = d.ctl("reset-password", input=" ".join(words) + "\nnew password\nnew password\n")
    assert res.returncode == 0, res.stderr
    assert d.error("POST", "/crypto/unlock", {"password": PASSWORD}).status == 401
    d.call("POST", "/crypto/unlock", {"password": "new password"})
    d.call("POST", "/crypto/password", {"old_password": "new password",
                                        "new_password": "third"})
    d.call("POST", "/crypto/lock")
    d.call("POST", "/crypto/unlock", {"recovery_key": " ".join(words)})  # still valid
    kinds = [e["data"]["kind"] for e in d.events(topic="audit")]
    assert "auth.reset_with_recovery" in kinds and "auth.recovery_key_generate" in kinds


def test_wrong_password_backs_off_without_blocking_status(daemon: Daemon) -> None:
    d = daemon
    d.call("POST", "/crypto/setup", {"password": PASSWORD})
    codes = [d.error("POST", "/crypto/unlock", {"password": "wrong"}).status for _ in range(4)]
    assert codes[:3] == [401, 401, 401]
    limited = d.error("POST", "/crypto/unlock", {"password": PASSWORD})
    assert codes[3] == 429 and limited.status == 429
    assert limited.code == "too_many_attempts" and limited.body["error"]["retry_after"] > 0
    assert d.ctl("unlock", input=PASSWORD + "\n").returncode == 5


def test_status_answers_while_a_kdf_runs(tmp_path: Path) -> None:
    with Daemon(tmp_path, ["--kdf-memory", "262144", "--kdf-time", "4"]) as d:
        d.call("POST", "/crypto/setup", {"password": PASSWORD})
        finished = threading.Event()

        def unlock() -> None:
            Client(str(d.socket), timeout=120).call("POST", "/crypto/unlock",
                                                    {"password": PASSWORD})
            finished.set()

        setups = d.log().count("key derivation started")
        t = threading.Thread(target=unlock)
        t.start()
        try:
            d.wait_for(lambda: d.log().count("key derivation started") > setups,
                       what="the unlock's key derivation to start")
            answers = [d.call("GET", "/crypto/status") for _ in range(5)]
            assert all(a["initialized"] for a in answers)
            assert not finished.is_set()  # status came back while the KDF was still running
        finally:
            t.join(timeout=120)
        assert finished.is_set()


def test_malformed_requests_get_one_error_shape(unlocked: Daemon) -> None:
    d = unlocked
    conn_client = d.client

    def raw(method: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        from ctl.cli import UnixHTTPConnection

        conn = UnixHTTPConnection(str(d.socket), 10)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    status, body = raw("POST", "/api/v1/volumes", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_request"  # type: ignore[index]
    status, body = raw("POST", "/api/v1/volumes", b'{"id": 5}')
    assert status == 422 and "id" in body["error"]["message"]  # type: ignore[index]
    status, body = raw("POST", "/api/v1/volumes", b'{"id": "ok", "colour": "red"}')
    assert status == 422 and "colour" in body["error"]["message"]  # type: ignore[index]
    status, body = raw("POST", "/api/v1/volumes", b'{"id": "../etc"}')
    assert status == 422
    status, body = raw("POST", "/api/v1/volumes/nothere/attach", b'{"role": "leader"}')
    assert status == 404 and body["error"]["code"] == "not_found"  # type: ignore[index]
    status, _ = raw("DELETE", "/api/v1/volumes", b"")
    assert status == 405
    status, body = raw("GET", "/api/v1/events?since=abc", b"")
    assert status == 422
    doc = conn_client.call("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.") and "/api/v1/volumes/{id}/attach" in doc["paths"]
    assert d.ctl("volume", "show", "nothere").returncode == 4


def test_events_stream_filter_and_resume(unlocked: Daemon) -> None:
    d = unlocked
    everything = d.events()
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["time"].endswith("Z") for e in everything)
    middle = seqs[len(seqs) // 2]
    resumed = [e["seq"] for e in d.events(since=middle)]
    # Events published meanwhile (an audit row's commit, say) may follow: compare the span.
    assert [s for s in resumed if s <= seqs[-1]] == [s for s in seqs if s > middle]
    assert set(_topics(d.events(topic="lock_state_changed"))) == {"lock_state_changed"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "ctl.cli", "--socket", str(d.socket),
         "--json", "events", "--follow", "--topic", "volume_state_changed",
         "--since", str(seqs[-1])], stdout=subprocess.PIPE, text=True)
    try:
        d.call("POST", "/volumes", {"id": "streamed"})
        assert follower.stdout is not None
        line = json.loads(follower.stdout.readline())
        assert line["topic"] == "volume_state_changed" and line["data"]["id"] == "streamed"
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        if follower.stdout:
            follower.stdout.close()


def test_peer_credentials_are_checked() -> None:
    base = Path(tempfile.mkdtemp(prefix="piccolo-peer-"))
    base.chmod(0o755)  # reachable by another user, so only the credential check stops them
    d = Daemon(base)
    try:
        d.start()
        os.chmod(d.run, 0o755)
        os.chmod(d.socket, 0o666)  # even a world-writable socket refuses strangers
        script = ("import sys; from ctl.cli import Client, ApiError\n"
                  "try:\n Client(sys.argv[1]).call('GET', '/crypto/status')\n"
                  "except ApiError as e: print(e.status)\n")
        res = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                              sys.executable, "-c", script, str(d.socket)],
                             capture_output=True, text=True, timeout=30,
                             cwd=str(Path(__file__).resolve().parents[1]))
        assert res.stdout.strip() == "403", res.stderr
        assert "refused connection from uid 1000" in d.log()
        assert d.call("GET", "/crypto/status")["initialized"] is False  # root still served
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_kill9_daemon_then_restart_reconciles(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "survivor"})
        d.call("POST", "/volumes/survivor/attach", {"role": "leader"})
        with open(d.mount("survivor") / "data", "w") as f:
            f.write("acknowledged write")
            f.flush()
            os.fsync(f.fileno())
        children = d.children()
        d.kill9()
        for child in children:  # orphaned mounts unmount themselves
            child.wait(timeout=30)
        assert not is_mounted(d.mount("survivor"))
        d.start()
        j = d.journal("survivor")
        assert (j["desired_state"], j["observed_state"], j["last_error"]) == \
            ("mounted", "pending", "locked")
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        v = d.volume("survivor")
        assert v["attached"] and v["observed_state"] == "mounted" and not v["needs_repair"]
        assert (d.mount("survivor") / "data").read_text() == "acknowledged write"
    finally:
        d.stop()


def test_stale_mount_at_start_is_cleaned(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/volumes", {"id": "stale"})
        d.call("POST", "/volumes/stale/attach", {"role": "leader"})
        d.stop()
        # Something else mounted over our mountpoint while we were down.
        (tmp_path / "x").mkdir()
        subprocess.run(["mount", "--bind", str(tmp_path / "x"), str(d.mount("stale"))],
                       check=True)
        d.start()
        assert not is_mounted(d.mount("stale"))
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert d.volume("stale")["observed_state"] == "mounted"
    finally:
        d.stop()
        force_unmount(d.mount("stale"))


def test_sigterm_detaches_everything_and_journals(unlocked: Daemon) -> None:
    d = unlocked
    d.call("POST", "/volumes", {"id": "v"})
    d.call("POST", "/volumes/v/attach", {"role": "leader"})
    assert d.stop() == 0
    for vid in ("bootstrap", "control", "v"):
        assert not is_mounted(d.mount(vid))
        j = d.journal(vid)
        assert (j["desired_state"], j["observed_state"]) == ("mounted", "unmounted")
    assert not d.children()
    d.start()


def test_cli_exit_codes(tmp_path: Path, daemon: Daemon) -> None:
    d = daemon
    assert d.ctl("status").stdout.strip().startswith("not initialized")
    assert d.ctl("setup", input=PASSWORD + "\n").returncode == 0
    assert d.ctl("setup", input=PASSWORD + "\n").returncode == 5  # already initialized
    assert d.ctl("volume", "ensure", "x").returncode == 3  # locked
    assert d.ctl("unlock", input="bad\n").returncode == 5
    assert d.ctl("unlock", input=PASSWORD + "\n").returncode == 0
    health = json.loads(d.ctl("--json", "health").stdout)
    assert health["status"] == "ok" and health["volumes"]["control"] == "mounted"
    res = subprocess.run([sys.executable, "-m", "ctl.cli", "--socket", str(tmp_path / "none.sock"),
                          "status"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 6
    assert "PICCOLO" not in d.ctl("lock").stderr


def test_no_module_spells_the_default_state_dir() -> None:
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for p in (root / "ctl").rglob("*.py")
                 if "/var/lib/piccolod" in p.read_text() and p.name != "paths.py"]
    offenders += [str(p.relative_to(root)) for p in (root / "piccolofs").rglob("*.py")
                  if "/var/lib/piccolod" in p.read_text()]
    assert offenders == []


def test_failed_unlock_rolls_back_completely(daemon: Daemon) -> None:
    d = daemon
    d.setup_and_unlock()
    d.call("POST", "/crypto/lock")
    meta = d.state / "ciphertext" / "control" / "piccolo.volume.json"
    good = meta.read_bytes()
    obj = json.loads(good)
    obj["nonce"] = "AAAAAAAAAAAAAAAA"  # 12 bytes, wrong: the key will not open
    meta.write_text(json.dumps(obj))
    d.call("POST", "/crypto/lock")  # idempotent while locked
    bootstrap_pid = d.volume("bootstrap")["pid"]
    err = d.error("POST", "/crypto/unlock", {"password": PASSWORD})
    assert err.status == 500 and "rolled back" in str(err)
    assert d.call("GET", "/crypto/status")["locked"] is True  # no half-unlocked state
    assert not is_mounted(d.mount("control"))
    assert d.volume("bootstrap")["pid"] == bootstrap_pid  # kept: it was mounted before
    j = d.journal("control")
    assert j["needs_repair"] and "does not open" in j["last_error"]
    meta.write_bytes(good)
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})
    assert not d.volume("control")["needs_repair"]


def test_ensure_survives_a_crash_between_steps(unlocked: Daemon) -> None:
    d = unlocked
    cipher_root = d.state / "ciphertext"
    (cipher_root / ".half.init-0000").mkdir()  # what a crash during creation leaves
    (cipher_root / ".half.init-0000" / "gocryptfs.conf").write_text("{}")
    d.call("POST", "/volumes", {"id": "half"})
    assert not (cipher_root / ".half.init-0000").exists()
    assert (cipher_root / "half" / "piccolo.volume.json").exists()
    (cipher_root / "keyless").mkdir()  # a cipher dir whose key is gone is reported, not reused
    (cipher_root / "keyless" / "gocryptfs.conf").write_text("{}")
    err = d.error("POST", "/volumes", {"id": "keyless"})
    assert err.status == 500 and "key is missing" in str(err)
    assert (cipher_root / "keyless" / "gocryptfs.conf").read_text() == "{}"  # untouched
