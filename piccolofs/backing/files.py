"""Encrypted file contents on a backing fd: read, write (read-modify-write) and truncate.

Invariants (see docs/concurrency.md): each method runs to completion without yielding to the
event loop, so one FUSE request's block updates are never interleaved with another's; the
cached file ID is per inode and reset whenever the header is removed (truncate to 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from piccolofs.backing import syscalls
from piccolofs.format.content import (
    HEADER_LEN,
    PLAIN_BLOCK,
    BlockCodec,
    new_header,
    parse_header,
)
from piccolofs.format.errors import CorruptHeader

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# The largest plaintext whose backing file still fits a signed 64-bit offset.
MAX_PLAIN_SIZE = (2**63 - 1 - HEADER_LEN) // (PLAIN_BLOCK + 40) * PLAIN_BLOCK


def _pwritev_all(fd: int, parts: list[bytes | bytearray], offset: int) -> None:
    """Write the pieces back to back without joining them first; short writes continue."""
    for start in range(0, len(parts), IOV_MAX):
        chunk = parts[start : start + IOV_MAX]
        want = sum(map(len, chunk))
        done = os.pwritev(fd, chunk, offset)
        if done != want:
            rest = memoryview(b"".join(chunk))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                rest, done = rest[n:], done + n
        offset += want


class CryptFile:
    """Content state of one inode, shared by all its open handles."""

    __slots__ = ("codec", "file_id", "layout")

    def __init__(self, codec: BlockCodec) -> None:
        self.codec = codec
        self.layout = codec.layout
        self.file_id: bytes | None = None

    # -- header --------------------------------------------------------------------------
    def _read_id(self, fd: int) -> bytes:
        if self.file_id is None:
            header = os.pread(fd, HEADER_LEN, 0)
            if len(header) < HEADER_LEN:
                raise CorruptHeader(f"header truncated to {len(header)} bytes")
            self.file_id = parse_header(header)
        return self.file_id

    def _ensure_header(self, fd: int, cipher_size: int) -> bytes:
        """The file ID, writing a fresh header into an empty backing file."""
        if cipher_size == 0:
            header = new_header()
            os.pwrite(fd, header, 0)
            self.file_id = header[2:]
            return self.file_id
        return self._read_id(fd)

    def forget_id(self) -> None:
        self.file_id = None

    # -- sizes ---------------------------------------------------------------------------
    def plain_size(self, fd: int) -> int:
        return self.layout.plain_size(os.fstat(fd).st_size)

    # -- allocation and holes ------------------------------------------------------------
    def allocate(self, fd: int, plain_off: int, length: int, keep_size: bool) -> None:
        """fallocate(2) modes 0 and KEEP_SIZE, as gocryptfs does them: the backing blocks of
        the range are reserved (without changing the backing size); mode 0 then grows the
        file to the range's end, which writes the (encrypted) zeros a grow needs."""
        if plain_off + length > MAX_PLAIN_SIZE:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        start, size = self.layout.cipher_range(plain_off, length)
        syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE, start, size)
        if not keep_size and plain_off + length > self.plain_size(fd):
            self.truncate(fd, plain_off + length)

    def seek(self, fd: int, plain_off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE in plaintext offsets, from the backing file's own holes. A
        block is a hole when all of its backing bytes are (blocks straddle the backing
        filesystem's blocks), and both answers use that one rule, so that a reader
        alternating them (cp --sparse) always moves forward."""
        size = self.plain_size(fd)
        if plain_off < 0 or plain_off >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        lay = self.layout
        block = plain_off // PLAIN_BLOCK
        start = lay.block_offset(block)
        if whence == os.SEEK_DATA:
            found = os.lseek(fd, start, os.SEEK_DATA)  # ENXIO: nothing but holes after
            at = max(plain_off, lay.block_at(found) * PLAIN_BLOCK)
            if at >= size:  # only a fragment too short to be a block: no data
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
            return at
        pos = start
        while True:
            try:
                candidate = lay.block_from(os.lseek(fd, pos, os.SEEK_HOLE))
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return size
                raise
            if candidate * PLAIN_BLOCK >= size:
                return size
            try:
                data = os.lseek(fd, lay.block_offset(candidate), os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = None  # a hole up to the end
            if data is None or data >= lay.block_offset(candidate + 1):
                return max(plain_off, candidate * PLAIN_BLOCK)
            pos = data  # the hole ends inside the candidate: look past the data

    # -- blocks --------------------------------------------------------------------------
    def _read_blocks(self, fd: int, first: int, last: int,
                     cipher_size: int) -> bytes | bytearray:
        """Plaintext of blocks first..last (the last may be short). Raises on a bad tag."""
        lay = self.layout
        start = lay.block_offset(first)
        end = min(lay.block_offset(last + 1), cipher_size)
        if end <= start:
            return b""
        ct = os.pread(fd, end - start, start)
        return self.codec.open_run(first, self._read_id(fd), ct)

    def _old_block(self, fd: int, block: int, plain_size: int,
                   cipher_size: int) -> bytes | bytearray:
        if block * PLAIN_BLOCK >= plain_size:
            return b""
        return self._read_blocks(fd, block, block, cipher_size)

    # -- operations ----------------------------------------------------------------------
    def read(self, fd: int, plain_off: int, size: int) -> bytes | bytearray | memoryview:
        """Plaintext of a range; a view (no copy) when the range starts inside a block."""
        cipher_size = os.fstat(fd).st_size
        plain_size = self.layout.plain_size(cipher_size)
        if size <= 0 or plain_off >= plain_size:
            return b""
        size = min(size, plain_size - plain_off)
        first, last = self.layout.block_range(plain_off, size)
        data = self._read_blocks(fd, first, last, cipher_size)
        skip = plain_off - first * PLAIN_BLOCK
        if skip == 0 and len(data) == size:
            return data
        return memoryview(data)[skip : skip + size]

    def write(self, fd: int, plain_off: int, data: bytes) -> int:
        if not data:
            return 0
        if plain_off + len(data) > MAX_PLAIN_SIZE:
            raise OSError(errno.EFBIG, "file would exceed the largest size the format allows")
        with self._undo_on_failure(fd, plain_off + len(data)) as cipher_size:
            return self._write(fd, plain_off, data, cipher_size)

    @contextlib.contextmanager
    def _undo_on_failure(self, fd: int, plain_end: int) -> Iterator[int]:
        """A write or truncate that reaches the last block or beyond and fails half-way
        (ENOSPC, EFBIG, EIO from the backing store) must not leave a torn block: put the old
        last block back and cut the file to its old length, so it reads as before. Writes
        that stay inside earlier blocks replace whole blocks and change no length.
        Yields the backing size, so the operation does not stat the file again."""
        cipher_size = os.fstat(fd).st_size
        lay = self.layout
        last = max(0, lay.block_count(lay.plain_size(cipher_size)) - 1)
        if plain_end <= last * PLAIN_BLOCK and cipher_size > HEADER_LEN:
            yield cipher_size
            return
        tail_start = lay.block_offset(last) if cipher_size > HEADER_LEN else cipher_size
        tail = os.pread(fd, cipher_size - tail_start, tail_start) if cipher_size else b""
        file_id = self.file_id
        try:
            yield cipher_size
        except OSError:
            with contextlib.suppress(OSError):
                if tail:
                    os.pwrite(fd, tail, tail_start)
                os.ftruncate(fd, cipher_size)
            self.file_id = file_id if cipher_size else None
            raise

    def _write(self, fd: int, plain_off: int, data: bytes, cipher_size: int) -> int:
        lay = self.layout
        plain_size = lay.plain_size(cipher_size)
        end = plain_off + len(data)
        first, last = lay.block_range(plain_off, len(data))
        file_id = self._ensure_header(fd, cipher_size)
        if cipher_size == 0:
            cipher_size = HEADER_LEN

        # Writing past the old last block: complete that block with encrypted zeros first,
        # so every block before the new data is either full or a hole.
        if plain_size % PLAIN_BLOCK and first * PLAIN_BLOCK > plain_size:
            self._pad_last_block(fd, file_id, plain_size, cipher_size)

        start = first * PLAIN_BLOCK
        block_end = min((last + 1) * PLAIN_BLOCK, plain_size)
        old: dict[int, bytes | bytearray] = {}

        def old_block(block: int) -> bytes | bytearray:
            if block not in old:
                old[block] = self._old_block(fd, block, plain_size, cipher_size)
            return old[block]

        head: bytes | bytearray = b""
        if plain_off > start:
            head = old_block(first)[: plain_off - start].ljust(plain_off - start, b"\0")
        tail: bytes | bytearray = b""
        if end < block_end:
            base = last * PLAIN_BLOCK
            tail = old_block(last)[end - base : block_end - base]
        plain = data if not head and not tail else head + bytes(data) + tail
        _pwritev_all(fd, self.codec.seal_parts(first, file_id, plain), lay.block_offset(first))
        return len(data)

    def _pad_last_block(self, fd: int, file_id: bytes, plain_size: int,
                        cipher_size: int, upto: int = PLAIN_BLOCK) -> None:
        last = (plain_size - 1) // PLAIN_BLOCK
        old = self._read_blocks(fd, last, last, cipher_size)
        padded = old.ljust(upto, b"\0")
        os.pwrite(fd, self.codec.seal(last, file_id, padded), self.layout.block_offset(last))

    def truncate(self, fd: int, new_size: int) -> None:
        if new_size > MAX_PLAIN_SIZE:
            raise OSError(errno.EFBIG, "size exceeds the largest the format allows")
        with self._undo_on_failure(fd, MAX_PLAIN_SIZE) as cipher_size:
            self._truncate(fd, new_size, cipher_size)

    def _truncate(self, fd: int, new_size: int, cipher_size: int) -> None:
        lay = self.layout
        plain_size = lay.plain_size(cipher_size)
        if new_size == plain_size and not lay.has_fragment(cipher_size):
            os.ftruncate(fd, cipher_size)  # same size: still marks mtime/ctime, as POSIX says
            return
        if lay.has_fragment(cipher_size):
            cipher_size = lay.cipher_size(plain_size)
            os.ftruncate(fd, cipher_size)
        if new_size == 0:
            os.ftruncate(fd, 0)
            self.file_id = None
            return
        file_id = self._ensure_header(fd, cipher_size)
        if cipher_size == 0:
            cipher_size = HEADER_LEN
        if new_size < plain_size:
            last = (new_size - 1) // PLAIN_BLOCK
            keep = new_size - last * PLAIN_BLOCK
            if keep < PLAIN_BLOCK:
                old = self._read_blocks(fd, last, last, cipher_size)
                os.ftruncate(fd, lay.block_offset(last))
                os.pwrite(fd, self.codec.seal(last, file_id, old[:keep]), lay.block_offset(last))
            else:
                os.ftruncate(fd, lay.cipher_size(new_size))
            return
        # Growing.
        if plain_size % PLAIN_BLOCK:
            last = (plain_size - 1) // PLAIN_BLOCK
            upto = min(PLAIN_BLOCK, new_size - last * PLAIN_BLOCK)
            self._pad_last_block(fd, file_id, plain_size, cipher_size, upto)
            if new_size <= (last + 1) * PLAIN_BLOCK:
                return
        if new_size % PLAIN_BLOCK == 0:
            os.ftruncate(fd, lay.block_offset(new_size // PLAIN_BLOCK))
        else:
            last = new_size // PLAIN_BLOCK
            os.ftruncate(fd, lay.block_offset(last))
            zeros = bytes(new_size - last * PLAIN_BLOCK)
            os.pwrite(fd, self.codec.seal(last, file_id, zeros), lay.block_offset(last))
