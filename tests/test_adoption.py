"""A state directory written in the original Go daemon's formats is adopted as it is."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import subprocess
from pathlib import Path

from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.daemon import Daemon
from tests.mounts import GocryptfsMount

PASSWORD = b"go daemon password"
NATO = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)


def _raw64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _argon(secret: bytes, salt: bytes) -> bytes:
    return hash_secret_raw(secret, salt, time_cost=1, memory_cost=8192, parallelism=1,
                           hash_len=32, type=Type.ID)


GO_SCHEMA = """
CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL DEFAULT 0,
    checksum TEXT NOT NULL DEFAULT '', updated_at TEXT NOT NULL DEFAULT '');
CREATE TABLE auth_state (id INTEGER PRIMARY KEY CHECK (id = 1),
    initialized INTEGER NOT NULL DEFAULT 0, password_hash TEXT,
    updated_at TEXT NOT NULL DEFAULT '');
CREATE TABLE remote_config (id INTEGER PRIMARY KEY CHECK (id = 1), payload BLOB NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE apps (name TEXT PRIMARY KEY, payload BLOB NOT NULL, updated_at TEXT NOT NULL);
ALTER TABLE auth_state ADD COLUMN password_stale INTEGER NOT NULL DEFAULT 0;
ALTER TABLE auth_state ADD COLUMN password_stale_at TEXT NOT NULL DEFAULT '';
ALTER TABLE auth_state ADD COLUMN password_ack_at TEXT NOT NULL DEFAULT '';
ALTER TABLE auth_state ADD COLUMN recovery_stale INTEGER NOT NULL DEFAULT 0;
ALTER TABLE auth_state ADD COLUMN recovery_stale_at TEXT NOT NULL DEFAULT '';
ALTER TABLE auth_state ADD COLUMN recovery_ack_at TEXT NOT NULL DEFAULT '';
INSERT INTO meta VALUES (1, 4, 'go-written-checksum', '2025-11-18T10:00:00Z');
INSERT INTO auth_state (id, initialized, password_hash, updated_at, recovery_stale,
    recovery_stale_at) VALUES (1, 1, 'argon2id$v=19$m=65536,t=3,p=1$c2FsdA$aGFzaA',
    '2025-11-18T10:00:00Z', 1, '2025-11-13T09:00:00Z');
INSERT INTO remote_config VALUES (1, CAST('{"endpoint": "https://nexus.example",
    "enabled": true}' AS BLOB), '2025-11-18T10:00:00Z');
INSERT INTO apps VALUES ('legacy-app', CAST('{"Name":"legacy-app"}' AS BLOB),
    '2025-11-18T10:00:00Z');
PRAGMA user_version = 1;
"""


def write_go_control_db(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(GO_SCHEMA)
    db.close()


def write_go_state(state: Path) -> tuple[bytes, str]:
    """What piccolod leaves behind: keyset, sealed volume keys, gocryptfs trees, journals."""
    sdek = os.urandom(32)
    salt, nonce = os.urandom(16), os.urandom(12)
    rk_words = " ".join(secrets.choice(NATO) for _ in range(24))
    rk_salt, rk_nonce = os.urandom(16), os.urandom(12)
    keyset = {
        "sdek": _raw64(AESGCM(_argon(PASSWORD, salt)).encrypt(nonce, sdek, None)),
        "salt": _raw64(salt), "nonce": _raw64(nonce),
        "kdf": {"alg": "argon2id", "time": 1, "memory": 8192, "threads": 1},
        "rk_salt": _raw64(rk_salt), "rk_nonce": _raw64(rk_nonce),
        "sdek_rk": _raw64(AESGCM(_argon(rk_words.encode(), rk_salt)).encrypt(rk_nonce, sdek,
                                                                              None)),
    }
    (state / "crypto").mkdir(parents=True, mode=0o700)
    (state / "crypto" / "keyset.json").write_text(json.dumps(keyset, indent=2))
    for vid in ("bootstrap", "control"):
        cipher = state / "ciphertext" / vid
        cipher.mkdir(parents=True)
        passphrase = _raw64(os.urandom(32))
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", "/dev/stdin",
                        str(cipher)], input=(passphrase + "\n").encode(), check=True,
                       capture_output=True, timeout=60)
        vnonce = os.urandom(12)
        meta = {"version": 1,
                "wrapped_key": base64.b64encode(AESGCM(sdek).encrypt(vnonce, passphrase.encode(),
                                                                     None)).decode(),
                "nonce": base64.b64encode(vnonce).decode()}
        (cipher / "piccolo.volume.json").write_text(json.dumps(meta, indent=2))
        pf = state.parent / f"{vid}.pass"
        pf.write_text(passphrase + "\n")
        with GocryptfsMount(cipher, state.parent / f"go-{vid}", pf) as g:
            (g.mnt / "written-by-piccolod.txt").write_text(f"{vid} data from the Go daemon")
            if vid == "control":
                write_go_control_db(g.mnt / "control.db")
        (state / "mounts" / vid).mkdir(parents=True)
        (state / "volumes" / vid).mkdir(parents=True)
        journal = {"desired_state": "mounted", "observed_state": "mounted", "role": "leader",
                   "updated_at": "2025-11-18T10:00:00.123Z", "generation": 7,
                   "needs_repair": False}
        (state / "volumes" / vid / "state.json").write_text(json.dumps(journal, indent=2) + "\n")
    return sdek, rk_words


def test_go_state_dir_is_adopted(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    _, rk_words = write_go_state(d.state)
    try:
        d.start()
        assert d.call("GET", "/crypto/status") == {"initialized": True, "locked": True,
                                                      "bootstrap": None, "import": None}
        assert d.call("GET", "/crypto/recovery-key") == {"present": True}
        j = d.journal("control")
        assert j["observed_state"] == "pending" and j["generation"] == 8  # continues the count
        d.call("POST", "/crypto/unlock", {"password": PASSWORD.decode()})
        for vid in ("bootstrap", "control"):
            assert (d.mount(vid) / "written-by-piccolod.txt").read_text() == \
                f"{vid} data from the Go daemon"
            assert d.volume(vid)["observed_state"] == "mounted"
        store = d.call("GET", "/store")
        assert store["schema_version"] == 2 and store["revision"] >= 4  # migrated forward
        assert d.call("GET", "/store/apps")["apps"] == [{"Name": "legacy-app"}]
        assert d.call("GET", "/store/remote")["endpoint"] == "https://nexus.example"
        auth = d.call("GET", "/store/auth")
        assert auth["initialized"] and auth["recovery_stale"] and auth["password_set"]
        d.call("PUT", "/store/apps/new-app", {"Version": "1"})
        assert d.call("GET", "/store")["revision"] > store["revision"]
        (d.mount("control") / "written-by-piccolo-ctld.txt").write_text("new")
        d.call("POST", "/crypto/lock")
        d.call("POST", "/crypto/unlock", {"recovery_key": rk_words})  # 24 words, no checksum
        assert (d.mount("control") / "written-by-piccolo-ctld.txt").read_text() == "new"
    finally:
        d.stop()
    res = subprocess.run(["gocryptfs", "-fsck", "-passfile", str(tmp_path / "control.pass"),
                          str(d.state / "ciphertext" / "control")], capture_output=True,
                         text=True, timeout=120)
    # gocryptfs flags the daemon's key file beside gocryptfs.conf, and nothing else.
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if "corrupt" in ln
                  or "invalid entry" in ln]
    assert complaints and all("piccolo.volume.json" in ln for ln in complaints if "entry" in ln)
    assert "1 corrupt files" in res.stdout + res.stderr
    assert "undecodable" not in d.log()
