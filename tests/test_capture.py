"""Point-in-time capture: which backing paths each mutation records, and the hold.

The mount tests drive a real mount over its control channel (the test plays the daemon);
backing paths are found independently, by inode number in the cipher dir. The Capture class
and the protocol's shapes are also tested on their own, where bounds are small enough to hit.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ctl.volumes.child import MountChild, MountFailed
from piccolofs import protocol
from piccolofs.backing.syscalls import RENAME_EXCHANGE, renameat2
from piccolofs.fs.capture import MAX_PATH, Capture, CaptureError
from piccolofs.fs.inodes import Inode
from tests.fds import kinds, open_files
from tests.mounts import PASSWORD, PiccoloMount, init_piccolofs, is_mounted

pytestmark = pytest.mark.timeout(120)

AT_FDCWD = -100
JOIN = 15.0  # seconds a released writer may take to finish before the test fails


# -- helpers ---------------------------------------------------------------------------------
def backing(m: PiccoloMount, plain: str) -> str:
    """The backing path of a plaintext path, found component by component by inode number
    (a node id is the backing inode number), never by the code under test."""
    rel = ""
    cur = m.mnt
    for part in Path(plain).parts:
        cur = cur / part
        ino = os.lstat(cur).st_ino
        here = m.cipher / rel
        found = [n for n in os.listdir(here) if os.lstat(here / n).st_ino == ino]
        assert len(found) == 1, (plain, found)
        rel = f"{rel}/{found[0]}" if rel else found[0]
    return rel


class Writer(threading.Thread):
    """Runs one mutation through the mount; records its errno (None: it succeeded)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.error: int | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            self.fn()
        except OSError as exc:
            self.error = exc.errno
        self.finished_at = time.monotonic()

    def finish(self) -> None:
        self.join(JOIN)
        assert not self.is_alive(), "a writer is still blocked after the hold ended"


def blocked(*writers: Writer, settle: float = 0.5) -> None:
    for w in writers:
        w.start()
    time.sleep(settle)
    for w in writers:
        assert w.is_alive(), "a mutation went through during the hold"


def capture(m: PiccoloMount, action: str, **kw: object) -> dict[str, object]:
    return m.request("capture", action=action, **kw)


def dirty(m: PiccoloMount) -> list[str]:
    paths: list[str] = []
    start: int | None = 0
    while start is not None:
        reply = m.request("capture", action="dirty", **{"from": start})
        assert reply["ok"], reply
        paths += reply["paths"]
        start = reply["next"]
    return paths


@contextlib.contextmanager
def open_fd(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- what each mutation records ----------------------------------------------------------------
def _exchange(b: Path) -> None:
    renameat2(AT_FDCWD, os.fsencode(b / "file"), AT_FDCWD, os.fsencode(b / "other"),
              RENAME_EXCHANGE)


def _write(path: Path, mode: str) -> None:
    with open(path, mode) as f:
        f.write(b"x")


LONG = "L" * 200  # a long name: a hashed entry plus its .name companion
# mutation -> (what it does under a fresh base dir, the plaintext paths whose backing paths
# it must record: "" is the base dir itself)
MUTATIONS: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "create": (lambda b: open(b / "new", "w").close(), ["", "new"]),
    "create_long": (lambda b: open(b / LONG, "w").close(), ["", LONG]),
    "write": (lambda b: _write(b / "file", "r+b"), ["file"]),
    "append": (lambda b: _write(b / "file", "ab"), ["file"]),
    "write_nested": (lambda b: _write(b / "dir" / "g", "r+b"), ["dir/g"]),
    "truncate": (lambda b: os.truncate(b / "file", 1), ["file"]),
    "open_trunc": (lambda b: os.close(os.open(b / "file", os.O_WRONLY | os.O_TRUNC)),
                   ["file"]),
    "mkdir": (lambda b: os.mkdir(b / "nd"), ["", "nd"]),
    "mkdir_long": (lambda b: os.mkdir(b / LONG), ["", LONG]),
    "rmdir": (lambda b: os.rmdir(b / "empty"), ["", "empty"]),
    "unlink": (lambda b: os.unlink(b / "file"), ["", "file"]),
    "rename": (lambda b: os.rename(b / "file", b / "renamed"), ["", "file", "renamed"]),
    "rename_into_dir": (lambda b: os.rename(b / "file", b / "dir" / "moved"),
                        ["", "file", "dir", "dir/moved"]),
    "rename_dir": (lambda b: os.rename(b / "dir", b / "dir2"), ["", "dir", "dir2"]),
    "rename_replace": (lambda b: os.rename(b / "file", b / "other"), ["", "file", "other"]),
    "rename_exchange": (_exchange, ["", "file", "other"]),
    "rename_over_dir": (lambda b: os.rename(b / "empty2", b / "empty"),
                        ["", "empty2", "empty"]),
    "symlink": (lambda b: os.symlink("target", b / "sl"), ["", "sl"]),
    "link": (lambda b: os.link(b / "file", b / "dir" / "hl"), ["dir", "dir/hl"]),
    "mknod": (lambda b: os.mkfifo(b / "fifo"), ["", "fifo"]),
    "chmod": (lambda b: os.chmod(b / "file", 0o600), ["file"]),
    "chmod_dir": (lambda b: os.chmod(b / "dir", 0o700), ["dir"]),
    "chown": (lambda b: os.chown(b / "file", 5, 5), ["file"]),
    "utime": (lambda b: os.utime(b / "file", ns=(1, 1)), ["file"]),
    "setxattr": (lambda b: os.setxattr(b / "file", "user.n", b"v"), ["file"]),
    "removexattr": (lambda b: os.removexattr(b / "file", "user.k"), ["file"]),
}


def _populate(base: Path) -> None:
    base.mkdir()
    (base / "file").write_bytes(b"content")
    os.setxattr(base / "file", "user.k", b"v")
    (base / "other").write_bytes(b"other")
    (base / "dir").mkdir()
    (base / "dir" / "g").write_bytes(b"g")
    (base / "empty").mkdir()
    (base / "empty2").mkdir()


def test_each_mutation_records_exactly_its_backing_paths(volume: PiccoloMount) -> None:
    for i, (name, (mutate, plains)) in enumerate(sorted(MUTATIONS.items())):
        base = volume.mnt / f"t{i}"
        _populate(base)
        wanted = {p: backing(volume, f"t{i}/{p}" if p else f"t{i}") for p in plains
                  if os.path.lexists(base / p)}
        assert capture(volume, "begin") == {"reply": volume._next_id - 1, "ok": True}
        mutate(base)
        wanted |= {p: backing(volume, f"t{i}/{p}") for p in plains if p not in wanted}
        held = capture(volume, "hold")
        assert held["ok"] and not held["overflow"], (name, held)
        got = dirty(volume)
        assert held["dirty_count"] == len(got), name
        assert sorted(got) == sorted(set(wanted.values())), (name, got, wanted)
        released = capture(volume, "release")
        assert released["ok"] and released["waited"] == 0 and not released["expired"], name


def test_the_root_is_the_empty_path(volume: PiccoloMount) -> None:
    assert capture(volume, "begin")["ok"]
    (volume.mnt / "top").write_bytes(b"x")
    capture(volume, "hold")
    assert sorted(dirty(volume)) == sorted(["", backing(volume, "top")])
    capture(volume, "release")


def test_nothing_is_recorded_outside_a_capture(volume: PiccoloMount) -> None:
    (volume.mnt / "before").write_bytes(b"x")
    assert capture(volume, "begin")["ok"]
    (volume.mnt / "before").read_bytes()  # reads record nothing
    os.listdir(volume.mnt)
    os.close(os.open(volume.mnt / "before", os.O_WRONLY))  # nor an open without O_TRUNC
    held = capture(volume, "hold")
    assert held["dirty_count"] == 0 and dirty(volume) == []
    capture(volume, "release")
    (volume.mnt / "after").write_bytes(b"x")
    assert capture(volume, "begin")["ok"]  # a new capture starts empty
    assert capture(volume, "hold")["dirty_count"] == 0
    capture(volume, "release")


def test_out_of_order_requests_are_refused(volume: PiccoloMount) -> None:
    no_begin = capture(volume, "hold")
    assert not no_begin["ok"] and "begin" in str(no_begin["error"])
    assert not volume.request("capture", action="dirty", **{"from": 0})["ok"]
    assert capture(volume, "release")["ok"]  # nothing held: fine
    assert capture(volume, "begin")["ok"]
    assert capture(volume, "hold")["ok"]
    twice = capture(volume, "hold")
    assert not twice["ok"] and "already held" in str(twice["error"])
    for bad in ({"action": "snapshot"}, {"action": "dirty"}, {"action": "dirty", "from": -1},
                {"action": "hold", "max_s": 0}, {"action": "hold", "max_s": 601},
                {"action": "begin", "max_s": 5}, {"action": "release", "from": 0}):
        reply = volume.request("capture", **bad)
        assert not reply["ok"], bad
    assert capture(volume, "release")["ok"]
    assert volume.request("stats")["internal_errors"] == 0


# -- the hold ----------------------------------------------------------------------------------
def test_a_hold_makes_writers_wait_and_reads_go_on(volume: PiccoloMount) -> None:
    mnt = volume.mnt
    (mnt / "w").mkdir()
    (mnt / "w" / "file").write_bytes(b"old contents")
    (mnt / "other").write_bytes(b"other")
    (mnt / "sub").mkdir()
    with open_fd(mnt / "w" / "file", os.O_WRONLY) as fd:
        assert capture(volume, "begin")["ok"]
        assert capture(volume, "hold") == {"reply": volume._next_id - 1, "ok": True,
                                           "dirty_count": 0, "overflow": False}
        held_at = time.monotonic()
        write = Writer(lambda: os.pwrite(fd, b"new", 0))
        mkdir = Writer(lambda: os.mkdir(mnt / "sub" / "nd"))
        blocked(write, mkdir)
        # Reads go on meanwhile. (Not of what the kernel has locked for a waiting request:
        # the directory "sub" for mkdir, and the pages of "w/file" for the write, which a
        # stat or listing of "w" seeing its new mtime would invalidate.)
        assert (mnt / "other").read_bytes() == b"other"
        assert "other" in os.listdir(mnt)
        assert os.stat(mnt / "other").st_size == 5
        assert dirty(volume) == []  # the waiting writers have recorded nothing yet
        released = capture(volume, "release")
        assert released["ok"] and released["waited"] == 2 and not released["expired"]
        assert released["held_ms"] >= 500
        write.finish()
        mkdir.finish()
        assert write.error is None and mkdir.error is None
        assert min(write.finished_at, mkdir.finished_at) - held_at >= 0.5
    assert (mnt / "w" / "file").read_bytes() == b"new contents"
    assert (mnt / "sub" / "nd").is_dir()


def test_a_hold_ends_by_itself_at_its_deadline(volume: PiccoloMount) -> None:
    mnt = volume.mnt
    (mnt / "file").write_bytes(b"old")
    assert capture(volume, "begin")["ok"]
    assert capture(volume, "hold", max_s=1.0)["ok"]
    held_at = time.monotonic()
    writer = Writer(lambda: (mnt / "file").write_bytes(b"written after the deadline"))
    blocked(writer, settle=0.3)
    writer.finish()
    assert writer.error is None
    assert 0.9 <= writer.finished_at - held_at < 10
    events = volume.drain_events(timeout=1.0)
    expired = [e for e in events if e.get("event") == "hold_expired"]
    assert len(expired) == 1 and expired[0]["waited"] == 1 and expired[0]["held_ms"] >= 900
    # Recording goes on after the deadline, so the parent may hold again and re-copy.
    assert backing(volume, "file") in dirty(volume)
    released = capture(volume, "release")
    assert released["ok"] and released["expired"] and released["held_ms"] >= 900
    assert (mnt / "file").read_bytes() == b"written after the deadline"


def test_a_follower_flip_during_a_hold_refuses_the_waiting_writer(
        volume: PiccoloMount) -> None:
    mnt = volume.mnt
    (mnt / "file").write_bytes(b"leader data")
    with open_fd(mnt / "file", os.O_WRONLY) as fd:
        assert capture(volume, "begin")["ok"]
        assert capture(volume, "hold")["ok"]
        writer = Writer(lambda: os.pwrite(fd, b"deposed", 0))
        blocked(writer, settle=0.3)
        assert volume.set_role("follower")["ok"]
        assert capture(volume, "release")["waited"] == 1
        writer.finish()
        assert writer.error == errno.EROFS
    assert (mnt / "file").read_bytes() == b"leader data"
    assert volume.set_role("leader")["ok"]


def test_closing_the_channel_during_a_hold_releases_writers(volume: PiccoloMount) -> None:
    mnt = volume.mnt
    (mnt / "file").write_bytes(b"old!")
    with open_fd(mnt / "file", os.O_WRONLY) as fd:
        assert capture(volume, "begin")["ok"]
        assert capture(volume, "hold")["ok"]
        writer = Writer(lambda: os.pwrite(fd, b"new", 0))
        blocked(writer, settle=0.3)
        assert volume.sock is not None and volume.proc is not None
        volume.sock.close()  # the parent is gone: the mount releases, then unmounts
        volume.sock = None
        writer.finish()
        assert writer.error is None
        assert volume.proc.wait(timeout=30) == 0
    assert not is_mounted(mnt)
    volume.start()  # the fixture expects a live mount to tear down
    assert (mnt / "file").read_bytes() == b"new!"


# -- the daemon's side -------------------------------------------------------------------------
async def test_mount_children_leave_no_pipe_behind(tmp_path: Path, passfile: Path) -> None:
    """A child's stderr pipe is closed when it exits, whether it failed or served: a daemon
    that remounts all day must not wait for the garbage collector to let go of them."""
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    gc.disable()  # the children stay referenced; only an explicit close frees their pipes
    try:
        before = kinds(open_files())
        failed = MountChild("v1", cipher, mnt, read_only=False)
        with trio.fail_after(60), pytest.raises(MountFailed, match="exited before"):
            await failed.run(b"not the password")
        assert kinds(open_files()) == before
        served = MountChild("v1", cipher, mnt, read_only=False)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(served.run, PASSWORD)
                await served.unmount(lazy=False)
        assert served.returncode == 0 and not is_mounted(mnt)
        assert kinds(open_files()) == before
    finally:
        gc.enable()


async def test_mount_child_fetches_every_page(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = MountChild("v1", cipher, mnt, read_only=False)
    names = [f"file-with-a-longer-name-{i:05d}" for i in range(1500)]

    def create_all() -> None:
        (mnt / "d").mkdir()
        for name in names:
            (mnt / "d" / name).write_bytes(b"")

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run, PASSWORD)
            try:
                await child.capture_begin()
                await trio.to_thread.run_sync(create_all)
                held = await child.capture_hold(max_s=30)
                paths, overflow = await child.capture_dirty()
                released = await child.capture_release()
            finally:
                await child.unmount(lazy=False)
    assert held == {"reply": held["reply"], "ok": True, "dirty_count": 2 + len(names),
                    "overflow": False}
    assert not overflow and len(paths) == len(set(paths)) == 2 + len(names)
    assert all(isinstance(p, bytes) for p in paths) and b"" in paths
    d = next(p for p in paths if p and b"/" not in p)
    assert {p.split(b"/")[1] for p in paths if p.startswith(d + b"/")} == \
        set(os.listdir(os.fsencode(cipher / os.fsdecode(d)))) - {b"gocryptfs.diriv"}
    assert released["ok"] and released["waited"] == 0 and not released["expired"]
    assert child.returncode == 0


# -- unit level: the Capture class and the protocol --------------------------------------------
def _tree() -> tuple[Inode, Inode, Inode]:
    root = Inode(1, (0, 1), stat.S_IFDIR | 0o755, None, b".")
    d = Inode(2, (0, 2), stat.S_IFDIR | 0o755, root, b"d")
    f = Inode(3, (0, 3), stat.S_IFREG | 0o644, d, b"f")
    return root, d, f


def test_capture_records_paths_once_and_only_while_recording() -> None:
    root, d, f = _tree()
    cap = Capture()
    cap.touch(f)
    cap.entry(root, b"x")
    assert cap.paths == []
    cap.begin()
    cap.touch(f)
    cap.entry(root, b"x")
    cap.touch(root)
    cap.entry(d, b"y")
    cap.touch(f)
    assert cap.paths == [b"d/f", b"", b"x", b"d", b"d/y"]
    d.name = b"renamed"  # paths are those of the moment of the change
    cap.touch(f)
    assert cap.paths[-1] == b"renamed/f"
    cap.release()
    assert not cap.recording and cap.paths == []


def test_capture_removed_objects(tmp_path: Path) -> None:
    _, d, _ = _tree()
    cap = Capture()
    cap.begin()
    gone = tmp_path / "gone"
    gone.write_bytes(b"")
    linked = tmp_path / "linked"
    linked.write_bytes(b"")
    with open_fd(gone, os.O_RDONLY) as gfd, open_fd(linked, os.O_RDONLY) as lfd:
        gone.unlink()
        # An open file unlinked: its content is in no tree any more, nothing to record.
        cap.touch(Inode(4, (0, 4), stat.S_IFREG, d, None, fd=gfd))
        assert cap.paths == [] and not cap.overflow
        # Its known name removed but still linked elsewhere: we cannot say where.
        cap.touch(Inode(5, (0, 5), stat.S_IFREG, d, None, fd=lfd))
        assert cap.overflow


def test_capture_overflows_past_its_bound() -> None:
    root, _, _ = _tree()
    cap = Capture(max_dirty=3)
    cap.begin()
    for name in (b"a", b"b", b"c", b"d"):
        cap.touch(Inode(9, (0, 9), stat.S_IFREG, root, name))
    assert cap.overflow and cap.paths == [b"a", b"b", b"c"]
    cap.begin()  # a new capture starts over
    assert not cap.overflow and cap.paths == []
    cap.touch(Inode(9, (0, 9), stat.S_IFREG, root, b"x" * (MAX_PATH + 1)))
    assert cap.overflow  # a path that could not be sent in one reply


async def test_capture_hold_release_and_deadline() -> None:
    events: list[dict[str, object]] = []
    cap = Capture(report=events.append)
    with pytest.raises(CaptureError):
        cap.hold()
    cap.begin()
    done: list[float] = []

    async def mutation() -> None:
        await cap.wait()
        done.append(time.monotonic())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap.run)
            cap.hold()
            with pytest.raises(CaptureError):
                cap.hold()
            nursery.start_soon(mutation)
            nursery.start_soon(mutation)
            await trio.sleep(0.2)
            assert done == []
            held_ms = cap.release()
            await trio.testing.wait_all_tasks_blocked()
            assert len(done) == 2 and held_ms >= 200 and cap.waited == 2

            cap.begin()
            cap.hold(max_s=0.3)
            started = time.monotonic()
            nursery.start_soon(mutation)
            while len(done) < 3:
                await trio.sleep(0.01)
            assert 0.3 <= done[-1] - started < 5
            assert cap.expired and not cap.held
            assert events == [{"event": "hold_expired", "held_ms": cap.held_ms, "waited": 1}]
            assert cap.release() >= 300 and cap.expired

            cap.begin()
            cap.hold()
            nursery.start_soon(mutation)
            await trio.testing.wait_all_tasks_blocked()
            cap.close()  # the session ends: nothing may wait any more
            await trio.testing.wait_all_tasks_blocked()
            assert len(done) == 4
            nursery.cancel_scope.cancel()


def test_protocol_validates_capture_requests() -> None:
    good = [{"action": "begin"}, {"action": "hold"}, {"action": "hold", "max_s": 0.5},
            {"action": "hold", "max_s": 600}, {"action": "dirty", "from": 0},
            {"action": "dirty", "from": 12}, {"action": "release"}]
    for msg in good:
        protocol.validate_request({"op": "capture", "id": 1, **msg})
    bad = [{}, {"action": "Begin"}, {"action": "dirty"}, {"action": "dirty", "from": True},
           {"action": "dirty", "from": 1.5}, {"action": "dirty", "from": "0"},
           {"action": "hold", "max_s": 0}, {"action": "hold", "max_s": 600.5},
           {"action": "hold", "max_s": True}, {"action": "hold", "from": 0},
           {"action": "release", "max_s": 1}]
    for msg in bad:
        with pytest.raises(protocol.ProtocolError):
            protocol.validate_request({"op": "capture", "id": 1, **msg})


def test_dirty_pages_stay_under_the_message_bound() -> None:
    worst = b"\xff" * MAX_PATH  # every byte escaped as \udcff in JSON
    paths = [worst, b"", b"a/b", *(os.urandom(40) for _ in range(3000)), worst]
    got: list[bytes] = []
    start: int | None = 0
    pages = 0
    while start is not None:
        page, after = protocol.dirty_page(paths, start)
        assert page, "a page always makes progress"
        reply = {"reply": 2**53, "ok": True, "paths": page, "next": after, "overflow": False}
        assert len(protocol.encode(reply)) < protocol.MAX_MESSAGE
        got += [os.fsencode(p) for p in json.loads(protocol.encode(reply))["paths"]]
        start, pages = after, pages + 1
    assert got == paths and pages > 2
    assert protocol.dirty_page(paths, len(paths)) == ([], None)
