"""POSIX behaviour through the kernel on a real piccolofs mount."""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from piccolofs.backing.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from tests.mounts import PiccoloMount, force_unmount, fsck_piccolofs, init_piccolofs


def _backing_names(cipher: Path) -> list[str]:
    return sorted(p.name for p in cipher.iterdir())


def test_write_read_at_any_offset_and_size(volume: PiccoloMount) -> None:
    path = volume.mnt / "f"
    rng = random.Random(1)
    model = bytearray()
    with open(path, "w+b", buffering=0) as f:
        for _ in range(300):
            off = rng.randrange(0, 40000)
            size = rng.choice([1, 7, 4095, 4096, 4097, 10000, rng.randrange(1, 20000)])
            data = rng.randbytes(size)
            f.seek(off)
            f.write(data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        f.seek(0)
        assert f.read() == bytes(model)
        for _ in range(100):
            off, size = rng.randrange(0, len(model) + 10), rng.randrange(0, 9000)
            f.seek(off)
            assert f.read(size) == bytes(model[off : off + size])
    assert os.stat(path).st_size == len(model)


def test_writes_past_eof_leave_holes(volume: PiccoloMount) -> None:
    path = volume.mnt / "sparse"
    with open(path, "wb") as f:
        f.write(b"A" * 100)
        f.seek(10 * 4096 + 5)
        f.write(b"Z")
    data = path.read_bytes()
    assert data == b"A" * 100 + bytes(10 * 4096 + 5 - 100) + b"Z"
    backing = next(p for p in volume.cipher.iterdir() if p.name != "gocryptfs.conf"
                   and p.name != "gocryptfs.diriv")
    # Blocks 1..9 were never written: the backing file is sparse there.
    assert backing.stat().st_blocks * 512 < 10 * 4096


def test_truncate_down_and_up(volume: PiccoloMount) -> None:
    path = volume.mnt / "t"
    payload = os.urandom(3 * 4096 + 123)
    path.write_bytes(payload)
    for size in (3 * 4096 + 200, 3 * 4096, 5000, 4096, 1, 0, 8192, 10000, 4097):
        before = path.read_bytes()
        os.truncate(path, size)
        expect = before[:size] + bytes(max(0, size - len(before)))
        assert path.read_bytes() == expect
        assert os.stat(path).st_size == size
    with open(path, "r+b") as f:
        f.truncate(2)
        assert f.read() == path.read_bytes()[:2]


def test_open_flags(volume: PiccoloMount) -> None:
    path = volume.mnt / "flags"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"hello")
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b" world")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"!")
    os.close(fd)
    assert path.read_bytes() == b"hello world!"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.read_bytes() == b""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * 5000)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert path.read_bytes() == b"x" * 5000
    with pytest.raises(IsADirectoryError):
        os.open(volume.mnt, os.O_WRONLY)


def test_directories_and_listing(volume: PiccoloMount) -> None:
    root = volume.mnt
    (root / "d").mkdir(mode=0o750)
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750
    names = {f"file-{i:04d}" for i in range(600)}
    for n in names:
        (root / "d" / n).write_bytes(n.encode())
    assert set(os.listdir(root / "d")) == names
    assert os.listdir(root) == ["d"]  # gocryptfs.conf and gocryptfs.diriv never show
    with pytest.raises(OSError) as e:
        os.rmdir(root / "d")
    assert e.value.errno == errno.ENOTEMPTY
    for n in names:
        (root / "d" / n).unlink()
    os.rmdir(root / "d")
    assert os.listdir(root) == []
    assert "gocryptfs.diriv" in _backing_names(volume.cipher)
    assert not any(n.startswith("gocryptfs.diriv.rmdir") for n in _backing_names(volume.cipher))
    with pytest.raises(FileNotFoundError):
        os.stat(root / "d")
    st = os.stat(root)
    assert st.st_nlink >= 2


def test_rename_semantics(volume: PiccoloMount) -> None:
    r = volume.mnt
    (r / "a").mkdir()
    (r / "b").mkdir()
    (r / "a" / "f").write_bytes(b"one")
    (r / "b" / "g").write_bytes(b"two")
    os.rename(r / "a" / "f", r / "b" / "f")  # across directories
    assert (r / "b" / "f").read_bytes() == b"one"
    os.rename(r / "b" / "f", r / "b" / "g")  # overwrite
    assert (r / "b" / "g").read_bytes() == b"one" and not (r / "b" / "f").exists()
    (r / "a" / "sub").mkdir()
    (r / "a" / "sub" / "deep").write_bytes(b"deep")
    os.rename(r / "a" / "sub", r / "b" / "moved")  # directory across parents
    assert (r / "b" / "moved" / "deep").read_bytes() == b"deep"
    (r / "empty").mkdir()
    os.rename(r / "b" / "moved", r / "empty")  # over an empty directory
    assert (r / "empty" / "deep").read_bytes() == b"deep"
    (r / "full").mkdir()
    (r / "full" / "x").write_bytes(b"")
    with pytest.raises(OSError) as e:
        os.rename(r / "empty", r / "full")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as e:
        os.rename(r / "b" / "g", r / "full")
    assert e.value.errno == errno.EISDIR
    (r / "p").write_bytes(b"p")
    (r / "q").write_bytes(b"q")
    with pytest.raises(FileExistsError):
        renameat2(-100, str(r / "p").encode(), -100, str(r / "q").encode(), RENAME_NOREPLACE)
    renameat2(-100, str(r / "p").encode(), -100, str(r / "q").encode(), RENAME_EXCHANGE)
    assert (r / "p").read_bytes() == b"q" and (r / "q").read_bytes() == b"p"
    renameat2(-100, str(r / "p").encode(), -100, str(r / "new").encode(), RENAME_NOREPLACE)
    assert (r / "new").read_bytes() == b"q"
    os.rename(r / "q", r / "q")  # onto itself: no-op
    assert (r / "q").read_bytes() == b"p"


def test_symlinks(volume: PiccoloMount) -> None:
    r = volume.mnt
    (r / "target").write_bytes(b"t")
    os.symlink("target", r / "link")
    assert os.readlink(r / "link") == "target"
    assert os.lstat(r / "link").st_size == len("target")
    assert (r / "link").read_bytes() == b"t"
    os.symlink("x" * 3039, r / "longest")
    assert os.readlink(r / "longest") == "x" * 3039
    with pytest.raises(OSError) as e:
        os.symlink("x" * 3040, r / "toolong")
    assert e.value.errno == errno.ENAMETOOLONG
    os.symlink("/absolute/dangling", r / "dangling")
    assert os.readlink(r / "dangling") == "/absolute/dangling"
    os.utime(r / "link", ns=(1, 2_000_000_001), follow_symlinks=False)
    assert os.lstat(r / "link").st_mtime_ns == 2_000_000_001
    os.chown(r / "link", 1234, 4321, follow_symlinks=False)
    assert (os.lstat(r / "link").st_uid, os.lstat(r / "link").st_gid) == (1234, 4321)


def test_hard_links(volume: PiccoloMount) -> None:
    r = volume.mnt
    (r / "d").mkdir()
    (r / "orig").write_bytes(b"shared")
    os.link(r / "orig", r / "d" / "alias")
    a, b = os.stat(r / "orig"), os.stat(r / "d" / "alias")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    with open(r / "d" / "alias", "ab") as f:
        f.write(b"+more")
    assert (r / "orig").read_bytes() == b"shared+more"
    os.unlink(r / "orig")
    assert os.stat(r / "d" / "alias").st_nlink == 1
    assert (r / "d" / "alias").read_bytes() == b"shared+more"
    os.symlink("somewhere", r / "sl")
    os.link(r / "sl", r / "sl2", follow_symlinks=False)
    assert os.readlink(r / "sl2") == "somewhere"
    with pytest.raises(PermissionError):
        os.link(r / "d", r / "dlink")


def test_special_files(volume: PiccoloMount) -> None:
    r = volume.mnt
    os.mkfifo(r / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(r / "fifo").st_mode)
    os.mknod(r / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(r / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(r)) == ["fifo", "null"]


def test_statfs(volume: PiccoloMount) -> None:
    sv = os.statvfs(volume.mnt)
    backing = os.statvfs(volume.cipher)
    assert sv.f_blocks == backing.f_blocks and sv.f_namemax == 255


def test_xattrs(volume: PiccoloMount) -> None:
    p = volume.mnt / "x"
    p.write_bytes(b"")
    os.setxattr(p, "user.one", b"value one")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.bin", bytes(range(256)))
    assert os.getxattr(p, "user.one") == b"value one"
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.bin") == bytes(range(256))
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty", "user.one"]
    with pytest.raises(FileExistsError):
        os.setxattr(p, "user.one", b"x", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.none", b"x", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.removexattr(p, "user.one")
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.one")
    assert e.value.errno == errno.ENODATA
    backing = [n for n in os.listxattr(next(q for q in volume.cipher.iterdir()
                                            if not q.name.startswith("gocryptfs.")))]
    assert backing and all(n.startswith("user.gocryptfs.") for n in backing)
    (volume.mnt / "dir").mkdir()
    os.setxattr(volume.mnt / "dir", "user.d", b"on a directory")
    assert os.getxattr(volume.mnt / "dir", "user.d") == b"on a directory"
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user." + "n" * 200, b"v")
    assert e.value.errno == errno.ERANGE


def test_attributes(volume: PiccoloMount) -> None:
    p = volume.mnt / "a"
    p.write_bytes(b"12345")
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
    os.chown(p, 1000, 1001)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(p)
    assert st.st_atime_ns == 1_500_000_000_123_456_789
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    assert st.st_size == 5


def test_long_names(volume: PiccoloMount) -> None:
    r = volume.mnt
    long = "L" * 255
    (r / long).write_bytes(b"long")
    assert os.listdir(r) == [long]
    backing = _backing_names(volume.cipher)
    assert any(n.startswith("gocryptfs.longname.") and n.endswith(".name") for n in backing)
    os.mkdir(r / ("D" * 200))
    os.rename(r / long, r / ("D" * 200) / ("M" * 254))
    assert (r / ("D" * 200) / ("M" * 254)).read_bytes() == b"long"
    assert sorted(os.listdir(r)) == ["D" * 200]
    os.link(r / ("D" * 200) / ("M" * 254), r / ("K" * 180))
    os.unlink(r / ("D" * 200) / ("M" * 254))
    assert os.listdir(r / ("D" * 200)) == []
    os.unlink(r / ("K" * 180))
    os.rmdir(r / ("D" * 200))
    assert _backing_names(volume.cipher) == ["gocryptfs.conf", "gocryptfs.diriv"]
    with pytest.raises(OSError) as e:
        (r / ("x" * 256)).write_bytes(b"")
    assert e.value.errno == errno.ENAMETOOLONG


def test_inode_numbers_are_stable_across_remount(volume: PiccoloMount) -> None:
    (volume.mnt / "d").mkdir()
    (volume.mnt / "d" / "f").write_bytes(b"x")
    before = {n: os.stat(volume.mnt / n).st_ino for n in ("d", "d/f")}
    volume.stop()
    volume.start()
    after = {n: os.stat(volume.mnt / n).st_ino for n in ("d", "d/f")}
    assert before == after
    assert os.stat(volume.mnt).st_ino == 1


def test_file_larger_than_4gib(volume: PiccoloMount) -> None:
    p = volume.mnt / "huge"
    off = 5 * 1024**3 + 12345
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(off)
        f.write(b"tail-data")
    assert os.stat(p).st_size == off + 9
    with open(p, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(off - 3)
        assert f.read() == b"\0\0\0tail-data"
        f.seek(3 * 1024**3)
        assert f.read(8192) == bytes(8192)


def test_shared_writable_mmap(volume: PiccoloMount) -> None:
    p = volume.mnt / "m"
    p.write_bytes(bytes(3 * 4096))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[100:105] = b"hello"
        mm[5000:5003] = b"abc"
        mm.flush()
    data = p.read_bytes()
    assert data[100:105] == b"hello" and data[5000:5003] == b"abc" and len(data) == 3 * 4096
    volume.stop()
    volume.start()
    assert (volume.mnt / "m").read_bytes() == data


def test_concurrent_writers_never_tear_blocks(volume: PiccoloMount) -> None:
    p = volume.mnt / "c"
    nblocks = 16
    p.write_bytes(bytes(nblocks * 4096))
    patterns = [bytes([i]) * 4096 for i in range(1, 5)]
    errors: list[str] = []
    stop = threading.Event()

    def writer(pat: bytes) -> None:
        fd = os.open(p, os.O_WRONLY)
        rng = random.Random(pat[0])
        for _ in range(300):
            os.pwrite(fd, pat * 2, rng.randrange(nblocks - 1) * 4096)
        os.close(fd)

    def reader() -> None:
        # O_DIRECT: every read reaches the filesystem instead of the kernel's page cache,
        # whose copy of a page can itself be observed mid-update on any filesystem.
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, nblocks * 4096)
        while not stop.is_set():
            n = os.preadv(fd, [buf], 0)
            data = bytes(buf[:n])
            for b in range(nblocks):
                blk = data[b * 4096 : (b + 1) * 4096]
                if blk != bytes(4096) and blk not in patterns:
                    errors.append(f"torn block {b}")
        os.close(fd)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(pat,)) for pat in patterns]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:5]
    volume.stop()
    volume.start()
    data = p.read_bytes()
    for b in range(nblocks):
        assert data[b * 4096 : (b + 1) * 4096] in (*patterns, bytes(4096))


def _as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *cmd], capture_output=True, text=True, timeout=30)


@pytest.fixture
def public_volume(passfile: Path) -> Iterator[PiccoloMount]:
    """A mount other users can reach (pytest's own temp root is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="piccolofs-public-"))
    try:
        base.chmod(0o755)
        init_piccolofs(base / "cipher", passfile)
        with PiccoloMount(base / "cipher", base / "mnt", passfile) as m:
            m.mnt.chmod(0o755)
            yield m
        assert "internal error" not in m.log()
    finally:
        force_unmount(base / "mnt")
        shutil.rmtree(base)


def test_new_files_belong_to_the_caller_and_permissions_are_enforced(
        public_volume: PiccoloMount) -> None:
    volume = public_volume
    shared = volume.mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    res = _as_user(1000, "sh", "-c", f"echo hi > {shared}/mine && mkdir {shared}/mydir")
    assert res.returncode == 0, res.stderr
    for name in ("mine", "mydir"):
        st = os.stat(shared / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    (volume.mnt / "secret").write_bytes(b"root only")
    os.chmod(volume.mnt / "secret", 0o600)
    res = _as_user(1000, "cat", str(volume.mnt / "secret"))
    assert res.returncode != 0 and "Permission denied" in res.stderr
    os.chmod(shared, 0o2777)
    os.chown(shared, 0, 4242)
    res = _as_user(1000, "sh", "-c", f"touch {shared}/sgid")
    assert res.returncode == 0, res.stderr
    assert os.stat(shared / "sgid").st_gid == 4242


def test_names_longer_than_255_bytes_are_refused_everywhere(volume: PiccoloMount) -> None:
    r = volume.mnt
    (r / "f").write_bytes(b"")
    for call in (lambda n: os.mkdir(r / n), lambda n: os.symlink("x", r / n),
                 lambda n: os.rename(r / "f", r / n), lambda n: os.link(r / "f", r / n),
                 lambda n: os.stat(r / n)):
        with pytest.raises(OSError) as e:
            call("n" * 256)
        assert e.value.errno == errno.ENAMETOOLONG


def test_large_directories_do_not_exhaust_file_descriptors(volume: PiccoloMount) -> None:
    import resource

    d = volume.mnt / "many"
    d.mkdir()
    assert volume.proc is not None
    limits = Path(f"/proc/{volume.proc.pid}/limits").read_text().splitlines()
    limit = int(next(ln.split()[3] for ln in limits if ln.startswith("Max open files")))
    budget = max(64, min(16384, limit // 4))
    count = budget + 1000  # more inodes than the fd cache may hold
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 100
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, str(i).encode())
        os.close(fd)
    for i in range(0, count, 7):
        assert (d / f"f{i:05d}").read_bytes() == str(i).encode()
    assert len(os.listdir(d)) == count
    held = len(os.listdir(f"/proc/{volume.proc.pid}/fd"))
    assert held <= budget + 64, (held, budget)


def test_reused_backing_inode_numbers_never_alias(volume: PiccoloMount) -> None:
    """Delete-then-create reuses inode numbers in the backing store; the kernel may still
    know the old node when the new file appears, and must never be handed the same id."""
    r = volume.mnt
    for i in range(300):
        a, b = r / f"a{i % 3}", r / f"b{i % 3}"
        a.write_bytes(b"first %d" % i)
        held = os.open(a, os.O_RDONLY) if i % 2 else None
        assert a.read_bytes() == b"first %d" % i
        os.unlink(a)
        b.write_bytes(b"second file %d" % i)
        assert b.read_bytes() == b"second file %d" % i
        if held is not None:
            assert os.pread(held, 100, 0) == b"first %d" % i  # unlinked but still open
            os.close(held)
        os.unlink(b)


def test_reused_inode_number_of_another_type(volume: PiccoloMount) -> None:
    r = volume.mnt
    for i in range(100):
        (r / "f").write_bytes(b"file")
        os.stat(r / "f")
        os.unlink(r / "f")
        os.mkdir(r / "d")  # the backing store may hand out the number "f" just freed
        (r / "d" / "inner").write_bytes(b"inside %d" % i)
        assert os.listdir(r / "d") == ["inner"]
        os.symlink("target", r / "l")
        assert os.readlink(r / "l") == "target"
        os.unlink(r / "d" / "inner")
        os.rmdir(r / "d")
        os.unlink(r / "l")


def test_unlinked_file_stays_readable_through_what_the_kernel_holds(
        volume: PiccoloMount) -> None:
    r = volume.mnt
    for i in range(50):
        (r / "g").write_bytes(b"OLD %d" % i)
        held = os.open(r / "g", os.O_PATH)
        os.unlink(r / "g")
        (r / "new").write_bytes(b"NEW %d" % i)  # may get the freed backing inode number
        with open(f"/proc/self/fd/{held}", "rb") as f:
            assert f.read() == b"OLD %d" % i
        os.close(held)
        assert (r / "new").read_bytes() == b"NEW %d" % i
        os.unlink(r / "new")


def test_setuid_and_setgid_survive_creation(volume: PiccoloMount) -> None:
    fd = os.open(volume.mnt / "s", os.O_CREAT | os.O_WRONLY, 0o4755)
    os.close(fd)
    assert stat.S_IMODE(os.stat(volume.mnt / "s").st_mode) == 0o4755
    os.mknod(volume.mnt / "n", 0o2644 | stat.S_IFIFO)
    assert stat.S_IMODE(os.stat(volume.mnt / "n").st_mode) == 0o2644


def test_sizes_beyond_the_format_are_efbig_and_change_nothing(volume: PiccoloMount) -> None:
    p = volume.mnt / "f"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        for off in (2**63 - 4096, 2**44):  # beyond the format; beyond the backing ext4/tmpfs
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", off)
            assert e.value.errno == errno.EFBIG
            assert os.fstat(fd).st_size == 3 and os.pread(fd, 10, 0) == b"abc"
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 2**63 - 1)
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert "internal error" not in volume.log()


def test_o_trunc_updates_times_even_when_empty(volume: PiccoloMount) -> None:
    p = volume.mnt / "e"
    p.write_bytes(b"")
    os.utime(p, (1, 1))
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    assert os.stat(p).st_mtime > 1_000_000


def test_dot_entries_and_whiteouts(volume: PiccoloMount) -> None:
    (volume.mnt / "d").mkdir()
    out = subprocess.run(["ls", "-a", str(volume.mnt / "d")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [".", ".."]
    (volume.mnt / "src").write_bytes(b"s")
    from piccolofs.backing.syscalls import RENAME_WHITEOUT

    renameat2(-100, str(volume.mnt / "src").encode(), -100, str(volume.mnt / "dst").encode(),
              RENAME_WHITEOUT)
    st = os.lstat(volume.mnt / "src")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (volume.mnt / "dst").read_bytes() == b"s"


@pytest.fixture
def tiny_volume(tmp_path: Path, passfile: Path) -> Iterator[PiccoloMount]:
    """A volume whose backing store is a 1 MiB tmpfs, to run out of space on purpose."""
    backing = tmp_path / "tiny"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(backing)], check=True)
    try:
        init_piccolofs(backing / "cipher", passfile)
        with PiccoloMount(backing / "cipher", tmp_path / "mnt", passfile) as m:
            yield m
    finally:
        force_unmount(tmp_path / "mnt")
        subprocess.run(["umount", "-l", str(backing)], check=False)


def test_out_of_space_leaves_files_intact(tiny_volume: PiccoloMount, passfile: Path) -> None:
    m = tiny_volume
    written = 0
    chunk = os.urandom(128 * 1024)
    fd = os.open(m.mnt / "fill", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as e:
            while True:
                written += os.write(fd, chunk)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    data = (m.mnt / "fill").read_bytes()  # no EIO: no torn block
    assert len(data) == written == os.stat(m.mnt / "fill").st_size
    assert data == (chunk * (written // len(chunk) + 1))[:written]
    (m.mnt / "other").write_bytes(b"")
    for grow in (3 * 4096 + 5, 200 * 4096 + 7):  # a growing truncate either works or changes
        try:                                       # nothing: never a torn block
            os.truncate(m.mnt / "other", grow)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            assert (m.mnt / "other").read_bytes() == b""
        else:
            assert (m.mnt / "other").read_bytes() == bytes(grow)
    assert (m.mnt / "fill").read_bytes() == data
    m.stop()
    res = fsck_piccolofs(m.cipher, passfile)
    assert res.returncode == 0, res.stdout
    m.start()
