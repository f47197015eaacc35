"""The read-only gate: --ro at mount, and live leader<->follower flips over the control fd."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from tests.mounts import PiccoloMount, init_piccolofs


def _tree_digest(cipher: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(cipher.rglob("*")):
        st = path.lstat()
        h.update(str(path.relative_to(cipher)).encode())
        h.update(f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}".encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
        for name in sorted(os.listxattr(path, follow_symlinks=False)):
            h.update(name.encode() + os.getxattr(path, name, follow_symlinks=False))
    return h.hexdigest()


MUTATIONS = {
    "create": lambda r: open(r / "new", "w").close(),
    "write": lambda r: open(r / "file", "r+b").write(b"x"),
    "append": lambda r: open(r / "file", "ab").write(b"x"),
    "truncate": lambda r: os.truncate(r / "file", 0),
    "open_trunc": lambda r: os.close(os.open(r / "file", os.O_RDONLY | os.O_TRUNC)),
    "mkdir": lambda r: os.mkdir(r / "nd"),
    "rmdir": lambda r: os.rmdir(r / "dir"),
    "unlink": lambda r: os.unlink(r / "file"),
    "rename": lambda r: os.rename(r / "file", r / "renamed"),
    "symlink": lambda r: os.symlink("x", r / "sl"),
    "link": lambda r: os.link(r / "file", r / "hl"),
    "mknod": lambda r: os.mkfifo(r / "fifo"),
    "chmod": lambda r: os.chmod(r / "file", 0o600),
    "chown": lambda r: os.chown(r / "file", 5, 5),
    "utime": lambda r: os.utime(r / "file", ns=(1, 1)),
    "setxattr": lambda r: os.setxattr(r / "file", "user.n", b"v"),
    "removexattr": lambda r: os.removexattr(r / "file", "user.k"),
}


def _populate(root: Path) -> None:
    (root / "file").write_bytes(b"content")
    os.setxattr(root / "file", "user.k", b"v")
    (root / "dir").mkdir()


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_follower_refuses_every_mutation_with_erofs(volume: PiccoloMount, name: str) -> None:
    _populate(volume.mnt)
    assert volume.set_role("follower")["ok"]
    before = _tree_digest(volume.cipher)
    with pytest.raises(OSError) as e:
        MUTATIONS[name](volume.mnt)
    assert e.value.errno == errno.EROFS
    assert _tree_digest(volume.cipher) == before
    assert (volume.mnt / "file").read_bytes() == b"content"  # reads still work


def test_ro_at_mount_and_live_promotion(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    with PiccoloMount(cipher, tmp_path / "rw", passfile) as m:
        _populate(m.mnt)
    with PiccoloMount(cipher, tmp_path / "mnt", passfile, ro=True) as m:
        assert m.request("stats")["role"] == "follower"
        with pytest.raises(OSError) as e:
            (m.mnt / "file").write_bytes(b"nope")
        assert e.value.errno == errno.EROFS
        assert m.set_role("leader") == {"reply": 2, "ok": True, "role": "leader",
                                         "token": 0, "deadline": None}
        (m.mnt / "file").write_bytes(b"now writable")
        assert (m.mnt / "file").read_bytes() == b"now writable"


def test_demotion_takes_effect_on_open_handles(volume: PiccoloMount) -> None:
    f = open(volume.mnt / "held", "wb", buffering=0)
    try:
        f.write(b"before")
        volume.set_role("follower")
        with pytest.raises(OSError) as e:
            f.write(b"after")
        assert e.value.errno == errno.EROFS
        volume.set_role("leader")
        f.write(b"-again")
    finally:
        f.close()
    assert (volume.mnt / "held").read_bytes() == b"before-again"


def test_control_channel_rejects_bad_requests(volume: PiccoloMount) -> None:
    volume.send_raw(b"this is not json\n")
    assert volume.wait_reply(None)["ok"] is False
    bad_role = volume.request("set_role", role="emperor")
    assert bad_role["ok"] is False and "role" in bad_role["error"]
    assert volume.request("frobnicate")["ok"] is False
    stats = volume.request("stats")
    assert stats["ok"] and stats["role"] == "leader" and stats["internal_errors"] == 0


def test_closing_the_control_channel_unmounts(volume: PiccoloMount) -> None:
    assert volume.sock is not None and volume.proc is not None
    volume.sock.close()
    volume.sock = None
    assert volume.proc.wait(timeout=20) == 0
    from tests.mounts import is_mounted

    assert not is_mounted(volume.mnt)
    volume.start()  # the fixture expects a live mount to tear down
