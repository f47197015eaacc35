"""Offline consistency check of a cipher directory: every name, xattr, symlink and block.

Read-only: it reports, it never repairs. Each problem is one line naming the plaintext path
where it is known (the backing name otherwise) and what is wrong with it.
"""

from __future__ import annotations

import os
import stat

from piccolofs.backing.dirs import decode_entry, read_diriv
from piccolofs.format.config import Config
from piccolofs.format.content import HEADER_LEN, parse_header
from piccolofs.format.errors import FormatError
from piccolofs.format.names import LONGNAME_SUFFIX, is_longname_companion
from piccolofs.format.volume import VolumeCrypto

RUN_BLOCKS = 256


class Checker:
    def __init__(self, volume: VolumeCrypto) -> None:
        self.v = volume
        self.problems: list[str] = []

    def problem(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def check_dir(self, dfd: int, path: str, in_root: bool) -> None:
        diriv = bytes(16)
        if self.v.dir_iv:
            try:
                diriv = read_diriv(dfd)
            except OSError as exc:
                self.problem(path, f"directory IV unusable ({exc.strerror}); names not checked")
                return
        self.check_xattrs(f"/proc/self/fd/{dfd}", path)
        with os.scandir(dfd) as it:
            names = sorted(os.fsencode(de.name) for de in it)
        present = set(names)
        for backing in names:
            if self.v.names.is_hidden(backing, in_root):
                if is_longname_companion(backing) and \
                        backing[: -len(LONGNAME_SUFFIX)] not in present:
                    self.problem(path, f"orphan long-name file {backing.decode()!r}")
                continue
            try:
                plain = decode_entry(self.v.names, dfd, diriv, backing)
            except (FormatError, OSError) as exc:
                self.problem(path, f"undecryptable name {backing.decode(errors='replace')!r} "
                                   f"({exc})")
                continue
            child = os.path.join(path, plain.decode(errors="replace"))
            st = os.lstat(backing, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                cfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self.check_dir(cfd, child, False)
                finally:
                    os.close(cfd)
            elif stat.S_ISREG(st.st_mode):
                ffd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self.check_file(ffd, child)
                    self.check_xattrs(f"/proc/self/fd/{ffd}", child)
                finally:
                    os.close(ffd)
            elif stat.S_ISLNK(st.st_mode):
                try:
                    self.v.open_symlink(os.readlink(backing, dir_fd=dfd))
                except FormatError as exc:
                    self.problem(child, f"symlink target fails authentication ({exc})")

    def check_file(self, fd: int, path: str) -> None:
        lay = self.v.blocks.layout
        size = os.fstat(fd).st_size
        if size == 0:
            return
        if lay.has_fragment(size):
            self.problem(path, f"trailing fragment: backing size {size} cannot end in a block")
        if size < HEADER_LEN:
            return
        try:
            file_id = parse_header(os.pread(fd, HEADER_LEN, 0))
        except FormatError as exc:
            self.problem(path, f"bad header ({exc})")
            return
        nblocks = lay.block_count(lay.plain_size(size))
        cbs = lay.cipher_block
        for first in range(0, nblocks, RUN_BLOCKS):
            count = min(RUN_BLOCKS, nblocks - first)
            data = os.pread(fd, count * cbs, lay.block_offset(first))
            for i in range(count):
                block = data[i * cbs : (i + 1) * cbs]
                try:
                    self.v.blocks.open(first + i, file_id, block)
                except FormatError:
                    self.problem(path, f"block {first + i} fails authentication")

    def check_xattrs(self, target: str, path: str) -> None:
        try:
            names = os.listxattr(target)
        except OSError:
            return
        for name in names:
            if not name.startswith("user.gocryptfs."):
                continue
            try:
                plain = self.v.names.decrypt_xattr_name(name)
            except FormatError:
                self.problem(path, f"undecryptable xattr name {name!r}")
                continue
            try:
                self.v.open_xattr(os.getxattr(target, name))
            except FormatError:
                self.problem(path, f"xattr {plain!r} fails authentication")


def check_tree(cipher_dir: str, cfg: Config, master_key: bytes) -> list[str]:
    checker = Checker(VolumeCrypto(cfg, master_key))
    dfd = os.open(cipher_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        checker.check_dir(dfd, "/", True)
    finally:
        os.close(dfd)
    return checker.problems
