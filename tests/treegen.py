"""A deterministic tree exercising every kind of entry, and a manifest to compare trees."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path
from typing import Any


def build_tree(root: Path, seed: int = 7, long_names: bool = True) -> None:
    rng = random.Random(seed)
    (root / "docs" / "nested" / "deeper").mkdir(parents=True)
    for size in (0, 1, 4095, 4096, 4097, 65536 + 3, 300_000):
        (root / "docs" / f"size-{size}").write_bytes(rng.randbytes(size))
    with open(root / "sparse", "wb") as f:
        f.write(b"start")
        f.seek(5 * 4096 + 17)
        f.write(b"end")
    os.truncate(root / "docs" / "size-4097", 3 * 4096)  # aligned growth: holes at the end
    (root / "docs" / "nested" / "deeper" / "\u00fcn\u00ef c\u00f6de.txt").write_text("unicode")
    (root / "docs" / "nested" / "sp ace & $ymbols!").write_bytes(b"symbols")
    if long_names:
        (root / ("L" * 176)).write_bytes(b"long name at the hashing threshold")
        (root / ("D" * 255)).mkdir()
        (root / ("D" * 255) / ("f" * 255)).write_bytes(b"long in long")
        (root / ("a" * 64)).write_bytes(b"64")
    os.symlink("docs/size-1", root / "rel-link")
    os.symlink("/nowhere/" + "t" * 500, root / "dangling-long-link")
    os.link(root / "docs" / "size-4096", root / "hardlink")
    os.mkfifo(root / "fifo", 0o640)
    (root / "attrs").write_bytes(b"with xattrs")
    os.setxattr(root / "attrs", "user.plain", b"value")
    os.setxattr(root / "attrs", "user.empty", b"")
    os.setxattr(root / "docs", "user.on-dir", rng.randbytes(100))
    os.chmod(root / "docs" / "size-0", 0o600)
    os.utime(root / "docs" / "size-1", ns=(1_000_000_000_123, 1_111_111_111_987_654_321))


def manifest(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            entry: dict[str, Any] = {"mode": st.st_mode, "nlink": st.st_nlink}
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                entry["size"] = st.st_size
                entry["mtime"] = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
                entry["size"] = st.st_size
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
                entry["xattrs"] = {n: os.getxattr(path, n).hex()
                                   for n in sorted(os.listxattr(path))}
            out[rel] = entry
    return out
