"""A point-in-time copy of one cipher dir, taken while its volume stays in use.

The copy is made in two steps (see ctl.bundles.export): first the whole tree, walked in
order, with each regular file's bytes appended to the export's spool file; then, while the
mount process holds every mutation, only what changed during the first step is looked at
again — the directories and files the mount process reports as written, plus every file
whose size or times moved while it was being read. A directory that changed is listed again
(new, vanished and replaced entries are found that way) and a file that changed is copied
again. The hold therefore lasts as long as the changes take to copy, not the volume.

Data is kept per backing inode, so hard links share one copy, and the tree is described by
the names that reach them. Only the ciphertext is ever read: nothing here can decrypt.
Everything here blocks; the caller runs it in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ctl.bundles.hashing import Hasher

CHUNK = 1 << 20
MAX_XATTRS = 64


class SnapshotError(Exception):
    """The tree holds something a bundle cannot carry (a name that is not UTF-8), or is
    missing."""


@dataclass
class Blob:
    """One regular file's bytes in the spool, with what they were copied from."""

    offset: int
    size: int
    sha256: str
    sig: tuple[int, int, int, int]  # (st_ino, size, mtime_ns, ctime_ns) at the copy
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: dict[str, str]


@dataclass
class Node:
    kind: str  # "file" | "dir" | "symlink"
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    target: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)


def _sig(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _text(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise SnapshotError(f"name {name!r} is not UTF-8; a bundle cannot carry it") from None


def _xattrs(fd: int) -> dict[str, str]:
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, str] = {}
    for name in sorted(names):
        if not name.startswith(("user.", "trusted.", "security.")):
            continue
        try:
            out[name] = base64.b64encode(os.getxattr(fd, name)).decode()
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed since the listing
                raise
    if len(out) > MAX_XATTRS:
        raise SnapshotError(f"more than {MAX_XATTRS} extended attributes on one file")
    return out


class Spool:
    """The append-only temp file beside the destination that holds copied file data until
    the bundle is assembled (ciphertext only, mode 0600)."""

    def __init__(self, path: str, stop: Callable[[], str | None] = lambda: None) -> None:
        self.path = path
        self.stop = stop
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.end = 0
        self.hasher = Hasher()

    def append(self, src_fd: int, count: Callable[[int], None]) -> tuple[int, int, str]:
        """Copy `src_fd` to EOF; returns (offset, size, sha256 hex)."""
        offset = self.end
        try:
            with open(src_fd, "rb", buffering=0, closefd=False) as src:
                while self._copy_chunk(src, count):
                    pass
        except BaseException:
            self.hasher.digest()  # the next file starts afresh
            raise
        return offset, self.end - offset, self.hasher.digest()

    def _copy_chunk(self, src: Any, count: Callable[[int], None]) -> bool:
        reason = self.stop()
        if reason:
            raise SnapshotError(f"cancelled: {reason}")
        buf = self.hasher.buffer()
        n = 0
        try:
            n = src.readinto(buf) or 0
            with memoryview(buf) as view:
                done = 0
                while done < n:
                    done += os.pwrite(self.fd, view[done:n], self.end + done)
        finally:
            self.hasher.feed_buffer(buf, n)  # hashed while the next chunk is read, written
        self.end += n
        count(n)
        return n > 0

    def close(self, remove: bool = True) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.hasher.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class TreeCopy:
    """The copy of one cipher dir: its nodes by relative path ("" is the root) and the data
    of its regular files by inode."""

    def __init__(self, root: str, spool: Spool, count: Callable[[int, int], None]) -> None:
        self.root = root
        self.spool = spool
        self.count = count
        self.nodes: dict[str, Node] = {}
        self.children: dict[str, set[str]] = {}
        self.blobs: dict[tuple[int, int], Blob] = {}
        self.suspects: set[str] = set()
        self.recopied = 0
        self.skipped: set[str] = set()

    # -- reading one object ----------------------------------------------------------
    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _copy_file(self, rel: str) -> Node | None:
        try:
            # O_NONBLOCK: a FIFO swapped in since the listing must not block the copy.
            fd = os.open(self._path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ELOOP, errno.ENXIO):
                return None  # gone or replaced: the parent's rescan under hold sees it
            raise
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return None  # replaced since it was listed: the parent's rescan sees it
            key = (before.st_dev, before.st_ino)
            blob = self.blobs.get(key)
            if blob is None or blob.sig != _sig(before):
                offset, size, digest = self.spool.append(fd, lambda n: self.count(n, 0))
                after = os.fstat(fd)
                if _sig(after) != _sig(before) or size != before.st_size:
                    self.suspects.add(rel)  # written while read: copied again under hold
                blob = Blob(offset, size, digest, _sig(before), stat.S_IMODE(after.st_mode),
                            after.st_uid, after.st_gid, after.st_mtime_ns, _xattrs(fd))
                self.blobs[key] = blob
                self.count(0, 1)
            return Node("file", key)
        finally:
            os.close(fd)

    def _read_dir(self, rel: str) -> tuple[Node, list[str]] | None:
        try:
            fd = os.open(self._path(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            st = os.fstat(fd)
            with os.scandir(fd) as entries:
                names = sorted(_text(os.fsencode(e.name)) for e in entries)
            node = Node("dir", (st.st_dev, st.st_ino), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_mtime_ns, xattrs=_xattrs(fd))
            return node, names
        finally:
            os.close(fd)

    def _add(self, rel: str) -> None:
        """Copy the object at `rel` and, for a directory, everything below it."""
        reason = self.spool.stop()
        if reason:
            raise SnapshotError(f"cancelled: {reason}")
        path = self._path(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode):
            node = self._copy_file(rel)
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = _text(os.readlink(os.fsencode(path)))
            except (FileNotFoundError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL:
                    return  # replaced since the lstat: the parent's rescan sees it
                raise
            node = Node("symlink", (st.st_dev, st.st_ino), 0o777, st.st_uid, st.st_gid,
                        st.st_mtime_ns, target=target)
        elif stat.S_ISDIR(st.st_mode):
            listed = self._read_dir(rel)
            if listed is None:
                return
            node, names = listed
            self.nodes[rel] = node
            self.children[rel] = set()
            self.count(0, 1)
            for name in names:
                child = f"{rel}/{name}" if rel else name
                self.children[rel].add(name)
                self._add(child)
            return
        else:
            # A fifo, socket or device node holds no data, and a bundle carries none (an
            # importer must never create one): it is left out, and the result says so.
            self.skipped.add(rel)
            return
        if node is None:
            return
        self.nodes[rel] = node

    def _drop(self, rel: str) -> None:
        self.skipped.discard(rel)
        for name in self.children.pop(rel, set()):
            self._drop(f"{rel}/{name}" if rel else name)
        self.nodes.pop(rel, None)

    # -- the two steps ---------------------------------------------------------------
    def walk(self) -> None:
        """Step one: the whole tree."""
        if not os.path.isdir(self.root) or os.path.islink(self.root):
            raise SnapshotError(f"cipher dir {self.root} is missing")
        self._add("")

    def refresh(self, dirty: Iterable[str] | None) -> None:
        """Step two, under hold: what changed since step one (None: anything may have)."""
        suspects, self.suspects = self.suspects, set()
        targets = set(self.nodes) if dirty is None else set(dirty) | suspects
        # Data is kept per inode, so what changed is dropped by inode: a file written and
        # then moved (or also reached by another hard link) is copied again under whatever
        # name reaches it now, never served from step one. File times are only as fine as
        # the kernel's tick, so an unchanged time proves nothing here.
        for rel in targets:
            node = self.nodes.get(rel)
            if node is not None and node.kind == "file":
                self.blobs.pop(node.key, None)
        for rel in sorted(targets, key=lambda r: (r.count("/"), r)):
            if rel in self.nodes:
                self._refresh_one(rel)  # new paths are found by their parent's rescan
        for rel, node in list(self.nodes.items()):
            if node.kind == "file" and node.key not in self.blobs and rel in self.nodes:
                self._readd(rel)  # another name of a changed file, reached by no rescan

    def _refresh_one(self, rel: str, deep: bool = True) -> None:
        """Bring one node up to date; `deep`: a directory is listed again (it was reported
        changed), otherwise only its identity is checked."""
        node = self.nodes.get(rel)
        try:
            st = os.lstat(self._path(rel))
        except FileNotFoundError:
            self._drop(rel)
            return
        if node is None:
            return
        same_kind = {"file": stat.S_ISREG, "dir": stat.S_ISDIR,
                     "symlink": stat.S_ISLNK}[node.kind](st.st_mode)
        if not same_kind or node.key != (st.st_dev, st.st_ino):
            self._readd(rel)
        elif node.kind == "dir":
            if deep:
                self._rescan(rel)
        elif node.kind == "file":
            blob = self.blobs.get(node.key)
            if blob is None or blob.sig != _sig(st):
                self.blobs.pop(node.key, None)
                self._readd(rel)
        else:
            self._readd(rel)

    def _readd(self, rel: str) -> None:
        self._drop(rel)
        self.recopied += 1
        parent, _, name = rel.rpartition("/")
        self._add(rel)
        if rel in self.nodes and rel:
            self.children.setdefault(parent, set()).add(name)

    def _rescan(self, rel: str) -> None:
        listed = self._read_dir(rel)
        if listed is None:
            self._drop(rel)
            return
        node, names = listed
        self.nodes[rel] = node
        known = self.children.setdefault(rel, set())
        now = set(names)
        for gone in known - now:
            self._drop(f"{rel}/{gone}" if rel else gone)
        for name in sorted(now):
            child = f"{rel}/{name}" if rel else name
            if name not in known:
                self.recopied += 1
                self._add(child)
            else:
                self._refresh_one(child, deep=False)
        self.children[rel] = {n for n in now if (f"{rel}/{n}" if rel else n) in self.nodes}

    def close_blobs_orphaned(self) -> None:
        """Drop data no name reaches any more (its spool bytes are simply not used)."""
        live = {n.key for n in self.nodes.values() if n.kind == "file"}
        for key in set(self.blobs) - live:
            del self.blobs[key]
