#!/usr/bin/env python3
"""
Check that the installed pyfuse3 passes fallocate(2) and lseek(2) with
SEEK_DATA/SEEK_HOLE on to the file system, and report the negotiated FUSE
capabilities (including FUSE_CAP_HANDLE_KILLPRIV_V2).

Mounts a tiny in-memory file system on a temporary directory (needs /dev/fuse
and root or fusermount3), runs the syscalls from this process and prints what
the file system received. Exits with status 1 if a call did not reach it.

Usage: python3 check_fs_calls.py
"""

import errno
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError

BLOCK = 4096
FILE_INODE = pyfuse3.ROOT_INODE + 1


class CheckFs(pyfuse3.Operations):
    """One sparse file "data"; 4 KiB blocks that have been written are data"""

    enable_killpriv_v2 = True

    def __init__(self, events):
        super().__init__()
        self.events = events
        self.size = 0
        self.blocks = set()

    def init(self):
        if hasattr(pyfuse3, "get_capabilities"):
            self.events.put(
                ("capabilities", pyfuse3.get_capabilities(), pyfuse3.get_capabilities(kernel=True))
            )

    async def getattr(self, inode, ctx=None):
        entry = EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
        elif inode == FILE_INODE:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_size = self.size
        else:
            raise FUSEError(errno.ENOENT)
        entry.st_ino = inode
        return entry

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"data":
            raise FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise FUSEError(errno.EISDIR)
        return FileInfo(fh=inode)

    async def read(self, fh, off, size):
        end = min(off + size, self.size)
        return bytes(
            ord("x") if (i // BLOCK) in self.blocks else 0 for i in range(off, max(off, end))
        )

    async def write(self, fh, off, buf):
        self.size = max(self.size, off + len(buf))
        self.blocks.update(range(off // BLOCK, (off + len(buf) - 1) // BLOCK + 1))
        return len(buf)

    async def statfs(self, ctx):
        # Needed by glibc's posix_fallocate() emulation (used without fallocate support)
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = BLOCK
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 20
        return st

    async def getxattr(self, inode, name, ctx):
        self.events.put(("getxattr", name))
        raise FUSEError(pyfuse3.ENOATTR)

    async def fallocate(self, fh, mode, offset, length):
        self.events.put(("fallocate", fh, mode, offset, length))
        if mode != 0:
            raise FUSEError(errno.EOPNOTSUPP)
        # Allocated but unwritten ranges read as zeroes and count as holes
        self.size = max(self.size, offset + length)

    async def lseek(self, fh, offset, whence):
        self.events.put(("lseek", fh, offset, whence))
        if offset >= self.size:
            raise FUSEError(errno.ENXIO)
        want_data = whence == os.SEEK_DATA
        blk = offset // BLOCK
        while blk * BLOCK < self.size:
            if (blk in self.blocks) == want_data:
                return max(offset, blk * BLOCK)
            blk += 1
        if want_data:
            raise FUSEError(errno.ENXIO)
        return self.size


def run_fs(mountpoint, events):
    pyfuse3.init(CheckFs(events), mountpoint, set(pyfuse3.default_options) | {"fsname=checkfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def main():
    print("pyfuse3", pyfuse3.__version__, "from", os.path.dirname(pyfuse3.__file__))
    print(
        "Operations.fallocate:",
        hasattr(pyfuse3.Operations, "fallocate"),
        "/ Operations.lseek:",
        hasattr(pyfuse3.Operations, "lseek"),
        "/ get_capabilities:",
        hasattr(pyfuse3, "get_capabilities"),
    )

    mp = multiprocessing.get_context("fork")
    events = mp.Queue()
    mnt = tempfile.mkdtemp(prefix="pyfuse3-check-")
    proc = mp.Process(target=run_fs, args=(mnt, events))
    proc.start()
    try:
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            if not proc.is_alive():
                sys.exit("file system process died")
            time.sleep(0.1)
        else:
            sys.exit("mount did not come up")

        fd = os.open(os.path.join(mnt, "data"), os.O_RDWR)
        try:
            for i in range(4):
                os.pwrite(fd, b"x" * BLOCK, 4 * i * BLOCK)  # data at blocks 0, 4, 8, 12
            try:
                os.posix_fallocate(fd, 0, 32 * BLOCK)
            except OSError as exc:
                res = errno.errorcode[exc.errno]
            else:
                res = f"st_size={os.fstat(fd).st_size}"
            print(f"posix_fallocate(fd, 0, {32 * BLOCK}) -> {res}")
            for off, whence, name in (
                (BLOCK, os.SEEK_DATA, "SEEK_DATA"),
                (0, os.SEEK_HOLE, "SEEK_HOLE"),
                (14 * BLOCK, os.SEEK_DATA, "SEEK_DATA"),
            ):
                try:
                    res = os.lseek(fd, off, whence)
                except OSError as exc:
                    res = errno.errorcode[exc.errno]
                print(f"lseek(fd, {off}, {name}) -> {res}")
        finally:
            os.close(fd)
    finally:
        fusermount = shutil.which("fusermount3") or "fusermount"
        subprocess.call([fusermount, "-u", "-z", mnt])
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        os.rmdir(mnt)

    received = []
    while not events.empty():
        received.append(events.get())

    print("file system received:")
    getxattrs = 0
    for ev in received:
        if ev[0] == "capabilities":
            print(f"  capabilities: negotiated={sorted(ev[1])}")
            print(f"                kernel offered={sorted(ev[2])}")
            print("  handle_killpriv_v2 negotiated:", "handle_killpriv_v2" in ev[1])
        elif ev[0] == "getxattr":
            getxattrs += 1
        else:
            print(f"  {ev[0]}{ev[1:]}")
    print("  getxattr(security.capability) requests during 4 writes + fallocate:", getxattrs)

    kinds = {ev[0] for ev in received}
    missing = {"fallocate", "lseek"} - kinds
    if missing:
        print("FAILED: not received:", ", ".join(sorted(missing)))
        sys.exit(1)
    print("OK: fallocate and lseek reached the file system")


if __name__ == "__main__":
    main()
