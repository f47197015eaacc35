"""Randomized model-based test: the same operations on the mount and on a plain directory.

Thousands of mixed operations (writes at random offsets and sizes, truncates, renames, hard
links, unlinks, reopens, fsync) are applied to both; every result, errno and read must agree,
and both trees must be identical at the end and after a remount.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.mounts import PiccoloMount

NAMES = ["a", "b", "c", "d/e", "d/f", "g/h"]
SIZES = [1, 2, 17, 511, 4095, 4096, 4097, 8191, 12288, 20000, 65536, 130000]


class Side:
    """One tree and its open descriptors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[str, int] = {}
        for d in ("d", "g"):
            (root / d).mkdir(exist_ok=True)

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        return self.fds[name]

    def close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for name in list(self.fds):
            self.close(name)


def _apply(side: Side, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    try:
        if kind == "write":
            _, name, off, data = op
            return os.pwrite(side.fd(name), data, off)
        if kind == "read":
            _, name, off, size = op
            return os.pread(side.fd(name), size, off)
        if kind == "truncate":
            _, name, size = op
            os.ftruncate(side.fd(name), size)
            return os.fstat(side.fd(name)).st_size
        if kind == "rename":
            _, src, dst = op
            side.close(src)
            side.close(dst)
            os.rename(side.root / src, side.root / dst)
            return None
        if kind == "link":
            _, src, dst = op
            os.link(side.root / src, side.root / dst)
            return os.stat(side.root / dst).st_nlink
        if kind == "unlink":
            _, name = op
            side.close(name)
            os.unlink(side.root / name)
            return None
        if kind == "reopen":
            side.close(op[1])
            return os.fstat(side.fd(op[1])).st_size
        if kind == "fsync":
            os.fsync(side.fd(op[1]))
            return None
        if kind == "stat":
            st = os.stat(side.root / op[1])
            return (st.st_size, st.st_nlink)
    except OSError as exc:
        return ("errno", exc.errno)
    raise AssertionError(kind)


def _random_op(rng: random.Random) -> tuple[Any, ...]:
    name = rng.choice(NAMES)
    r = rng.random()
    if r < 0.40:
        off = rng.choice([0, rng.randrange(0, 150_000), rng.randrange(0, 4096) * 4096])
        return ("write", name, off, rng.randbytes(rng.choice(SIZES)))
    if r < 0.60:
        return ("read", name, rng.randrange(0, 160_000), rng.choice(SIZES))
    if r < 0.70:
        size = rng.choice([0, rng.randrange(0, 160_000), 4096 * rng.randrange(8)])
        return ("truncate", name, size)
    if r < 0.76:
        return ("rename", name, rng.choice(NAMES))
    if r < 0.80:
        return ("link", name, rng.choice(NAMES))
    if r < 0.84:
        return ("unlink", name)
    if r < 0.92:
        return ("reopen", name)
    if r < 0.95:
        return ("fsync", name)
    return ("stat", name)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for name in NAMES:
        p = root / name
        if p.exists():
            out[name] = (p.read_bytes(), p.stat().st_nlink)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_against_plain_directory(volume: PiccoloMount, tmp_path: Path, seed: int) -> None:
    plain_root = tmp_path / "plain"
    plain_root.mkdir()
    rng = random.Random(seed)
    fs, model = Side(volume.mnt), Side(plain_root)
    try:
        for step in range(2500):
            op = _random_op(rng)
            got, want = _apply(fs, op), _apply(model, op)
            assert got == want, f"step {step}: {op[:3]} -> {got!r:.80} != {want!r:.80}"
            if step % 500 == 499:
                assert _snapshot(volume.mnt) == _snapshot(plain_root), f"step {step}"
    finally:
        fs.close_all()
        model.close_all()
    final = _snapshot(plain_root)
    assert _snapshot(volume.mnt) == final
    volume.stop()
    volume.start()
    assert _snapshot(volume.mnt) == final
