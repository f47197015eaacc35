"""The control store on a real mounted control volume, through the real daemon."""

from __future__ import annotations

import gc
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.cli import ApiError, Client
from ctl.store.checksum import Snapshot
from ctl.store.db import ControlDB
from tests.daemon import PASSWORD, Daemon, second_mount
from tests.fds import open_files

HASH = "argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNo"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, ["--store-check-interval", "3600"])
    with d:
        d.setup_and_unlock()
        # the audit rows of setup and unlock are written asynchronously: let them land
        d.wait_for(lambda: len(d.call("GET", "/store/audit")["audit"]) == 2, what="audit rows")
        yield d
    assert "Traceback" not in d.log(), d.log()


def _commits(d: Daemon, since: int = 0) -> list[dict[str, object]]:
    return [e["data"] for e in d.events(since=since, topic="control_store_commit")]


def test_writes_bump_revision_and_survive_restart(daemon: Daemon) -> None:
    d = daemon
    start = d.call("GET", "/store")
    assert start["schema_version"] == 2 and start["role"] == "leader"
    d.call("PUT", "/store/apps/nextcloud", {"Version": "29.0", "Enabled": True})
    d.call("PUT", "/store/remote", {"endpoint": "https://nexus.example", "enabled": True,
                                    "dns_credentials": {"token": "t"}})
    d.call("PUT", "/store/auth/password-hash", {"password_hash": HASH})
    assert d.call("POST", "/store/auth/initialized")["changed"] is True
    assert d.call("POST", "/store/auth/initialized")["changed"] is False  # no new revision
    d.call("POST", "/store/auth/staleness", {"password_stale": True,
                                             "password_stale_at": "2026-01-02T03:04:05+01:00"})
    status = d.call("GET", "/store")
    commits = [c for c in _commits(d) if c["revision"] > start["revision"]]
    assert [c["revision"] for c in commits] == list(range(start["revision"] + 1,
                                                          status["revision"] + 1))
    assert commits[-1]["checksum"] == status["checksum"] and commits[-1]["role"] == "leader"
    auth = d.call("GET", "/store/auth")
    assert auth["password_stale_at"] == "2026-01-02T02:04:05Z" and "password_hash" not in auth
    audit_before = len(d.call("GET", "/store/audit")["audit"])
    d.stop()
    d.start()
    err = d.error("GET", "/store")
    assert err.status == 423 and err.code == "locked"
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})
    again = d.call("GET", "/store")
    audit_rows = d.call("GET", "/store/audit")["audit"]
    # the only commits since the restart are the audit rows of the new unlock
    assert again["revision"] == status["revision"] + len(audit_rows) - audit_before
    assert [r["kind"] for r in audit_rows[audit_before:]] == ["crypto.unlock"]
    restarted = [c for c in _commits(d) if c["revision"] == again["revision"]]
    assert restarted and restarted[0]["checksum"] == again["checksum"]
    assert d.call("GET", "/store/apps/nextcloud") == {"Name": "nextcloud", "Version": "29.0",
                                                      "Enabled": True}
    assert d.call("GET", "/store/remote")["endpoint"] == "https://nexus.example"


def test_invalid_input_writes_nothing(daemon: Daemon) -> None:
    d = daemon
    before = d.call("GET", "/store")["revision"]
    for path, body in [("/store/apps/Bad%20Name", {}), ("/store/apps/ok", {"Version": 3}),
                       ("/store/apps/ok", {"Colour": "red"}),
                       ("/store/apps/ok", {"Name": "other"}),
                       ("/store/remote", {"enabled": "yes"}),
                       ("/store/remote", {"dns_credentials": {"k": 1}}),
                       ("/store/auth/password-hash", {"password_hash": "$argon2id$plain"}),
                       ("/store/auth/staleness", {"password_stale_at": "yesterday"})]:
        err = d.error("PUT" if "staleness" not in path else "POST", path, body)
        assert err.status in (404, 422), (path, err)
    assert d.call("GET", "/store")["revision"] == before
    with pytest.raises(ApiError) as e:
        d.call("GET", "/store/apps/missing")
    assert e.value.status == 404


def test_audit_is_persisted_and_append_only(daemon: Daemon) -> None:
    d = daemon
    d.call("POST", "/crypto/recovery-key/generate", {})
    rows = d.call("GET", "/store/audit")["audit"]
    kinds = [r["kind"] for r in rows]
    # setup happened while locked: it waited in memory and was written at unlock
    assert kinds[:2] == ["crypto.setup", "crypto.unlock"]
    assert "auth.recovery_key_generate" in kinds
    assert all(r["source"].startswith("uid:") for r in rows)
    assert d.call("GET", f"/store/audit?since={rows[0]['seq']}")["audit"] == rows[1:]
    d.call("POST", "/crypto/lock")
    with second_mount(d.state, "control", d.base / "peek") as m:
        db = sqlite3.connect(m.mnt / "control.db")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET kind = 'x'")
        db.close()
        # lock ran a TRUNCATE checkpoint: everything is in the main file
        wal = m.mnt / "control.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0


def test_follower_reads_the_leaders_commits_and_cannot_write(daemon: Daemon) -> None:
    d = daemon
    d.call("PUT", "/store/apps/before", {"Version": "1"})
    d.call("POST", "/leadership", {"resource": "control", "role": "follower"})
    d.wait_for(lambda: d.call("GET", "/store")["read_only"], what="store reopened read-only")
    err = d.error("PUT", "/store/apps/after", {"Version": "2"})
    assert err.status == 409 and err.code == "not_leader"
    assert d.ctl("store", "status").stdout.count("read-only") == 1
    # Another node, the leader now, writes into the same control volume.
    with second_mount(d.state, "control", d.base / "leader") as leader:
        db = ControlDB(leader.mnt / "control.db", read_only=False)
        for name in ("from-leader-1", "from-leader-2"):
            db.write(lambda c, n=name: c.execute(
                "INSERT INTO apps (name, payload, updated_at) VALUES (?, ?, '')",
                (n, json.dumps({"Name": n}).encode())))
        revision = db.revision()["revision"]
        db.close()
        names = [a["Name"] for a in d.call("GET", "/store/apps")["apps"]]
        assert names == ["before", "from-leader-1", "from-leader-2"]
        assert d.call("GET", "/store")["revision"] == revision
    d.call("POST", "/leadership", {"resource": "control", "role": "leader"})
    d.wait_for(lambda: not d.call("GET", "/store")["read_only"], what="store writable again")
    d.call("PUT", "/store/apps/after", {"Version": "2"})


def test_corruption_is_detected_repaired_and_reported(daemon: Daemon) -> None:
    d = daemon
    for i in range(300):
        d.call("PUT", f"/store/apps/app-{i:03d}", {"Version": str(i), "Image": "x" * 200})
    revision = d.call("GET", "/store")["revision"]
    audit_before = len(d.call("GET", "/store/audit")["audit"])
    d.call("POST", "/crypto/lock")
    with second_mount(d.state, "control", d.base / "vandal") as m:
        path = m.mnt / "control.db"
        db = sqlite3.connect(path)
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                          "'sqlite_autoindex_apps_1'").fetchone()[0]
        db.close()
        with open(path, "r+b") as f:  # scribble over the apps index, through the mount
            f.seek((root - 1) * page_size)
            f.write(b"\xde\xad\xbe\xef" * 8)
    since = d.call("GET", "/health")["last_event_seq"]
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})
    health = [e["data"] for e in d.events(since=since, topic="control_health")]
    assert [h["status"] for h in health][:2] == ["degraded", "ok"]
    assert health[1]["message"].startswith("repaired: rebuilt with")
    assert d.call("GET", "/health")["control_health"]["status"] == "ok"
    assert len(d.call("GET", "/store/apps")["apps"]) == 300
    d.wait_for(lambda: len(d.call("GET", "/store/audit")["audit"]) == audit_before + 2,
               what="lock and unlock audit rows")
    assert d.call("GET", "/store")["revision"] == revision + 2  # nothing lost, nothing replayed
    assert d.call("POST", "/store/check")["status"] == "ok"
    assert any(p.name.startswith("control.db.damaged-") for p in d.mount("control").iterdir())


def test_kill9_during_a_burst_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        d.setup_and_unlock()
        acked: list[int] = []
        stop = threading.Event()

        def burst() -> None:
            client = Client(str(d.socket), timeout=10)
            i = 0
            while not stop.is_set():
                try:
                    client.call("PUT", f"/store/apps/burst-{i:05d}", {"Version": str(i)})
                except (ApiError, OSError):
                    return
                acked.append(i)
                i += 1

        t = threading.Thread(target=burst)
        t.start()
        d.wait_for(lambda: len(acked) > 30, what="a burst of commits")
        d.kill9()
        stop.set()
        t.join(timeout=30)
        for child in d.children():
            child.wait(timeout=30)
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        present = {a["Name"] for a in d.call("GET", "/store/apps")["apps"]}
        missing = [i for i in acked if f"burst-{i:05d}" not in present]
        assert not missing, f"acknowledged but lost: {missing[:10]}"
        assert d.call("GET", "/store")["revision"] >= len(acked)
        assert d.call("POST", "/store/check")["status"] == "ok"
    finally:
        d.stop()


def test_locked_store_refuses_everything(daemon: Daemon) -> None:
    d = daemon
    d.call("POST", "/crypto/lock")
    for method, path, body in [("GET", "/store/apps", None), ("PUT", "/store/apps/x", {}),
                               ("GET", "/store/audit", None), ("POST", "/store/check", None)]:
        err = d.error(method, path, body)
        assert (err.status, err.code) == (423, "locked")
    assert d.call("GET", "/health")["control_health"]["status"] == "unknown"
    assert d.ctl("store", "status").returncode == 3


def test_checksum_follows_the_documented_go_encoding() -> None:
    snap = Snapshot(auth_initialized=True, password_hash="a<b>&c", remote=b'{"x":1}',
                    apps=[b'{"Name":"alpha"}', b'{"Name":"beta"}'], password_stale=True,
                    password_stale_at="2025-11-13T10:00:00Z")
    literal = ('{"version":1,"auth_initialized":true,"remote":{"Payload":"eyJ4IjoxfQ=="},'
               '"apps":[{"Name":"alpha"},{"Name":"beta"}],'
               '"password_hash":"a\\u003cb\\u003e\\u0026c","password_stale":true,'
               '"password_stale_at":"2025-11-13T10:00:00Z","revision":7,"checksum":""}')
    assert snap.checksum(7) == hashlib.sha256(literal.encode()).hexdigest()
    assert Snapshot().checksum(1) == hashlib.sha256(
        b'{"version":1,"auth_initialized":false,"revision":1,"checksum":""}').hexdigest()


def test_store_health_in_cli(daemon: Daemon) -> None:
    res = daemon.ctl("health")
    assert res.returncode == 0 and "control store: ok" in res.stdout
    res = daemon.ctl("store", "check")
    assert res.returncode == 0 and res.stdout.startswith("ok")
    time.sleep(0)  # keep the fixture's log check last


def test_a_database_that_cannot_open_is_closed_at_once(tmp_path: Path) -> None:
    """A control.db that is not a database is refused with SQLite's error, and the daemon
    holds no file of it afterwards (not until a garbage collection)."""
    path = tmp_path / "control.db"
    path.write_bytes(b"not a database at all " * 200)
    gc.disable()  # the error's traceback keeps every frame alive: only a close frees the file
    try:
        with pytest.raises(sqlite3.DatabaseError, match="not a database"):
            ControlDB(path, read_only=False)
        held = [f for f in open_files() if f.startswith(str(path))]
    finally:
        gc.enable()
    assert held == []
    assert path.read_bytes() == b"not a database at all " * 200
