"""EME (ECB-Mix-ECB, Halevi-Rogaway), the wide-block tweakable cipher for file names.

Blocks are handled as little-endian 128-bit integers so that EME's doubling (byte 0 is the
least significant byte, feedback 0x87 into byte 0) is a shift and a conditional XOR. The AES
passes over all blocks go through one ECB call each, so a name costs three cipher calls.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from piccolofs.format.errors import FormatError

BLOCK = 16
MAX_BLOCKS = 128
_MASK = (1 << 128) - 1


def _double(x: int) -> int:
    x <<= 1
    if x >> 128:
        x = (x & _MASK) ^ 0x87
    return x


def _ints(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + BLOCK], "little") for i in range(0, len(data), BLOCK)]


def _bytes(blocks: list[int]) -> bytes:
    return b"".join(b.to_bytes(BLOCK, "little") for b in blocks)


class Eme:
    """EME-AES-256 under one key. Not thread-safe: the ECB contexts are reused."""

    def __init__(self, key: bytes) -> None:
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        l0 = _double(int.from_bytes(self._enc.update(bytes(BLOCK)), "little"))
        self._l = [l0]
        for _ in range(MAX_BLOCKS - 1):
            self._l.append(_double(self._l[-1]))

    def encrypt(self, tweak: bytes, data: bytes) -> bytes:
        return self._transform(tweak, data, self._enc.update)

    def decrypt(self, tweak: bytes, data: bytes) -> bytes:
        return self._transform(tweak, data, self._dec.update)

    def _transform(self, tweak: bytes, data: bytes, aes: object) -> bytes:
        if len(tweak) != BLOCK:
            raise FormatError("EME tweak must be 16 bytes")
        if not data or len(data) % BLOCK or len(data) > MAX_BLOCKS * BLOCK:
            raise FormatError(f"EME input of {len(data)} bytes is not 1..128 blocks")
        assert callable(aes)
        lt = self._l
        m = len(data) // BLOCK
        p = _ints(data)
        ppp = _ints(aes(_bytes([p[j] ^ lt[j] for j in range(m)])))
        t = int.from_bytes(tweak, "little")
        mp = t
        for v in ppp:
            mp ^= v
        mc = int.from_bytes(aes(mp.to_bytes(BLOCK, "little")), "little")
        mm = mp ^ mc
        ccc = [0] * m
        acc = mc ^ t
        for j in range(1, m):
            mm = _double(mm)
            ccc[j] = ppp[j] ^ mm
            acc ^= ccc[j]
        ccc[0] = acc
        c = _ints(aes(_bytes(ccc)))
        return _bytes([c[j] ^ lt[j] for j in range(m)])
