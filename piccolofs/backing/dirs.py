"""Directory-level backing operations: directory IVs, long-name companions, listings."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from piccolofs.backing.syscalls import read_small, write_new_file
from piccolofs.format.errors import FormatError
from piccolofs.format.names import (
    DIRIV_LEN,
    DIRIV_NAME,
    BackingName,
    NameCodec,
    check_diriv,
    is_longname,
)

log = logging.getLogger(__name__)

COMPANION_MAX = 4096
META_MODE = 0o444


def read_diriv(dir_fd: int) -> bytes:
    """The directory's IV; a missing or malformed one is an I/O error for its names."""
    try:
        return check_diriv(read_small(dir_fd, DIRIV_NAME, DIRIV_LEN))
    except FileNotFoundError:
        raise OSError(errno.EIO, "directory has no gocryptfs.diriv") from None
    except FormatError as exc:
        raise OSError(errno.EIO, f"bad gocryptfs.diriv: {exc}") from None


def write_diriv(dir_fd: int) -> bytes:
    iv = os.urandom(DIRIV_LEN)
    write_new_file(dir_fd, DIRIV_NAME, iv, META_MODE)
    return iv


def write_companion(dir_fd: int, bn: BackingName) -> None:
    """Write the .name file of a long name first, as gocryptfs orders it."""
    if bn.companion is not None and bn.long_cipher is not None:
        # A leftover companion for the same hash holds the same name (collision-free hash).
        with contextlib.suppress(FileExistsError):
            write_new_file(dir_fd, bn.companion, bn.long_cipher, META_MODE)


def remove_companion(dir_fd: int, bn: BackingName) -> None:
    if bn.companion is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bn.companion, dir_fd=dir_fd)


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed entry: its names, and the backing inode number and file type bits as
    getdents gave them (a listing without attributes needs nothing else; type 0 where the
    backing store did not say)."""

    plain: bytes
    backing: bytes
    inode: int = 0
    kind: int = 0


def _kind(de: os.DirEntry[str]) -> int:
    """The entry's file type bits from d_type (lstat only where the backing store did not
    fill it in)."""
    if de.is_symlink():
        return stat.S_IFLNK
    if de.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if de.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return 0  # a device, fifo or socket: reported as unknown, the caller stats it


def decode_entry(codec: NameCodec, dir_fd: int, diriv: bytes, backing: bytes) -> bytes:
    """Plaintext name of one backing entry; raises FormatError/OSError when it has none."""
    if codec.plaintext_names:
        return backing
    cipher = backing
    if is_longname(backing):
        cipher = codec.check_companion(
            backing, read_small(dir_fd, backing + b".name", COMPANION_MAX)
        )
    return codec.decrypt(diriv, cipher)


def list_entries(codec: NameCodec, dir_fd: int, diriv: bytes, in_root: bool,
                 on_bad: object = None) -> Iterator[Entry]:
    """Decrypted entries of a directory, skipping metadata and undecodable names.

    Undecodable names are logged once per listing (never the plaintext) and skipped, as
    gocryptfs does: one bad entry must not hide a whole directory.
    """
    with os.scandir(dir_fd) as it:
        for de in it:
            name = os.fsencode(de.name)
            if codec.is_hidden(name, in_root):
                continue
            try:
                plain = decode_entry(codec, dir_fd, diriv, name)
            except (FormatError, OSError) as exc:
                log.warning("skipping undecodable backing entry %r: %s", name, exc)
                if callable(on_bad):
                    on_bad(name, exc)
                continue
            yield Entry(plain, name, de.inode(), _kind(de))
