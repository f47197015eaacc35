"""File contents: the header, block sealing, holes and the plain<->cipher offset arithmetic.

    backing file = header(18) | block 0 | block 1 | ...
    header       = version (uint16 BE, = 2) | file ID (16 random bytes)
    block k      = sealed(plaintext[k*4096 : (k+1)*4096], aad = uint64_be(k) | file ID)

A zero-length plaintext file has no header at all. Only the last block may be short. A
*full-size* cipher block of zero bytes is a hole and reads as 4096 zero bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from piccolofs.format.aead import ContentCipher
from piccolofs.format.errors import AuthenticationError, CorruptHeader
from piccolofs.format.gcm_runs import REASONS

PLAIN_BLOCK = 4096
HEADER_LEN = 18
HEADER_VERSION = 2
FILE_ID_LEN = 16


def new_header(file_id: bytes | None = None) -> bytes:
    fid = os.urandom(FILE_ID_LEN) if file_id is None else file_id
    return struct.pack(">H", HEADER_VERSION) + fid


def parse_header(header: bytes) -> bytes:
    """Return the file ID, refusing anything gocryptfs would refuse."""
    if len(header) != HEADER_LEN:
        raise CorruptHeader(f"header is {len(header)} bytes, expected {HEADER_LEN}")
    (version,) = struct.unpack(">H", header[:2])
    if version != HEADER_VERSION:
        raise CorruptHeader(f"header version {version}, expected {HEADER_VERSION}")
    file_id = header[2:]
    if not any(file_id):
        raise CorruptHeader("all-zero file ID")
    return file_id


_BLOCK_NO = struct.Struct(">Q")


def block_aad(block_no: int, file_id: bytes) -> bytes:
    return _BLOCK_NO.pack(block_no) + file_id


@dataclass(frozen=True)
class Layout:
    """Offset arithmetic for one cipher: pure integer functions, units in the names."""

    overhead: int

    @property
    def cipher_block(self) -> int:
        return PLAIN_BLOCK + self.overhead

    def cipher_size(self, plain_size: int) -> int:
        """Backing-file size of a plaintext of `plain_size` bytes."""
        if plain_size == 0:
            return 0
        full, rest = divmod(plain_size, PLAIN_BLOCK)
        size = HEADER_LEN + full * self.cipher_block
        if rest:
            size += rest + self.overhead
        return size

    def plain_size(self, cipher_size: int) -> int:
        """Plaintext size of a backing file. A trailing fragment too short to hold a block
        (<= overhead bytes) counts as zero bytes, as gocryptfs does; fsck reports it."""
        if cipher_size <= HEADER_LEN:
            return 0
        body = cipher_size - HEADER_LEN
        full, rest = divmod(body, self.cipher_block)
        size = full * PLAIN_BLOCK
        if rest > self.overhead:
            size += rest - self.overhead
        return size

    def has_fragment(self, cipher_size: int) -> bool:
        """True when the backing file ends in bytes that cannot be a block."""
        if cipher_size <= HEADER_LEN:
            return 0 < cipher_size < HEADER_LEN
        rest = (cipher_size - HEADER_LEN) % self.cipher_block
        return 0 < rest <= self.overhead

    def block_offset(self, block_no: int) -> int:
        """Backing offset where block `block_no` starts."""
        return HEADER_LEN + block_no * self.cipher_block

    def block_range(self, plain_off: int, length: int) -> tuple[int, int]:
        """First and last block numbers touched by a plaintext range (length > 0)."""
        return plain_off // PLAIN_BLOCK, (plain_off + length - 1) // PLAIN_BLOCK

    def cipher_range(self, plain_off: int, length: int) -> tuple[int, int]:
        """Backing (offset, length) holding the blocks of a plaintext range (length > 0);
        from 0 when it starts in the first block, so the header is covered too."""
        first, last = self.block_range(plain_off, length)
        start = 0 if first == 0 else self.block_offset(first)
        return start, self.block_offset(last + 1) - start

    def block_at(self, cipher_off: int) -> int:
        """The block whose backing bytes hold `cipher_off` (the header counts as block 0)."""
        return max(cipher_off - HEADER_LEN, 0) // self.cipher_block

    def block_from(self, cipher_off: int) -> int:
        """The first block that starts at or after `cipher_off`."""
        return -(-max(cipher_off - HEADER_LEN, 0) // self.cipher_block)

    def block_count(self, plain_size: int) -> int:
        return (plain_size + PLAIN_BLOCK - 1) // PLAIN_BLOCK


class BlockCodec:
    """Seals and opens content blocks of one file (identified by its file ID)."""

    def __init__(self, cipher: ContentCipher) -> None:
        self.cipher = cipher
        self.layout = Layout(cipher.overhead)
        self._hole = bytes(self.layout.cipher_block)

    def seal(self, block_no: int, file_id: bytes, plaintext: bytes | bytearray) -> bytes:
        assert 0 < len(plaintext) <= PLAIN_BLOCK
        return self.cipher.seal(plaintext, block_aad(block_no, file_id))

    def open(self, block_no: int, file_id: bytes, sealed: bytes) -> bytes:
        """Return the block's plaintext; a full-size all-zero block is a hole."""
        if len(sealed) == len(self._hole) and sealed == self._hole:
            return bytes(PLAIN_BLOCK)
        return self.cipher.open(sealed, block_aad(block_no, file_id))

    def seal_run(self, first_block: int, file_id: bytes, plaintext: bytes) -> bytes:
        """Seal consecutive blocks starting at `first_block` into one contiguous buffer."""
        return b"".join(self.seal_parts(first_block, file_id, plaintext))

    def seal_parts(self, first_block: int, file_id: bytes,
                   plaintext: bytes | bytearray) -> list[bytes | bytearray]:
        """The sealed run as a list of pieces (nonce, body, nonce, body, ...), or one piece
        from the compiled helper.

        The hot path of every write: one getrandom for all nonces, no per-block copies of
        the plaintext, and no join — the pieces go to pwritev as they are.
        """
        nl = self.cipher.nonce_len
        count = (len(plaintext) + PLAIN_BLOCK - 1) // PLAIN_BLOCK
        nonces = os.urandom(nl * count)
        runs = self.cipher.runs
        if runs is not None:
            return [runs.seal(first_block, file_id, plaintext, nonces)]
        view = memoryview(plaintext)
        seal = self.cipher.raw_seal
        pack = _BLOCK_NO.pack
        out: list[bytes | bytearray] = []
        for i in range(count):
            nonce = nonces[i * nl : (i + 1) * nl]
            out.append(nonce)
            out.append(seal(nonce, view[i * PLAIN_BLOCK : (i + 1) * PLAIN_BLOCK],
                            pack(first_block + i) + file_id))
        return out

    def open_run(self, first_block: int, file_id: bytes, ciphertext: bytes) -> bytearray:
        """Open consecutive blocks read from one contiguous backing range.

        The hot path of every read: each block is decrypted in place into one buffer (no
        per-block allocation, no join, and for AES-GCM no Python frame per block). Raises
        BlockAuthError naming the first block that fails; nothing is returned for a run
        that contains a bad block.
        """
        cbs = self.layout.cipher_block
        nl = self.cipher.nonce_len
        overhead = self.cipher.overhead
        zero_nonce = bytes(nl)
        full, rest = divmod(len(ciphertext), cbs)
        if 0 < rest <= overhead:
            raise BlockAuthError(first_block + full, "block too short")
        out = bytearray(full * PLAIN_BLOCK + max(0, rest - overhead))
        runs = self.cipher.runs
        if runs is not None:
            bad, why = runs.open_into(first_block, file_id, ciphertext, out)
            if bad >= 0:
                raise BlockAuthError(first_block + bad, REASONS[why])
            return out
        plain = memoryview(out)
        view = memoryview(ciphertext)
        open_into = self.cipher.open_into
        pack = _BLOCK_NO.pack
        k = 0
        try:
            for k in range(full + (rest > 0)):
                i = k * cbs
                nonce = ciphertext[i : i + nl]
                if nonce == zero_nonce:
                    if k < full and view[i : i + cbs] == self._hole:
                        continue  # a hole: the buffer is already zeros
                    raise BlockAuthError(first_block + k, "all-zero nonce")
                o = k * PLAIN_BLOCK
                open_into(nonce, view[i + nl : i + cbs], pack(first_block + k) + file_id,
                          plain[o : o + PLAIN_BLOCK])
        except self.cipher.tag_error:
            raise BlockAuthError(first_block + k,
                                 f"{self.cipher.name} tag mismatch") from None
        return out


class BlockAuthError(AuthenticationError):
    """A content block failed to authenticate; carries its number for the warning."""

    def __init__(self, block_no: int, reason: str) -> None:
        super().__init__(f"block {block_no}: {reason}")
        self.block_no = block_no
