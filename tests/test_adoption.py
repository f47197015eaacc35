"""A state directory written in the original Go daemon's formats is adopted as it is."""

from __future__ import annotations

import base64
import json
import os
import secrets
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
        assert d.call("GET", "/crypto/status") == {"initialized": True, "locked": True}
        assert d.call("GET", "/crypto/recovery-key") == {"present": True}
        j = d.journal("control")
        assert j["observed_state"] == "pending" and j["generation"] == 8  # continues the count
        d.call("POST", "/crypto/unlock", {"password": PASSWORD.decode()})
        for vid in ("bootstrap", "control"):
            assert (d.mount(vid) / "written-by-piccolod.txt").read_text() == \
                f"{vid} data from the Go daemon"
            assert d.volume(vid)["observed_state"] == "mounted"
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
