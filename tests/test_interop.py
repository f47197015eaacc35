"""Interop with the real gocryptfs binary, both directions, for every flag set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mounts import (
    FLAG_SETS,
    GocryptfsMount,
    PiccoloMount,
    fsck_gocryptfs,
    fsck_piccolofs,
    init_gocryptfs,
    init_piccolofs,
    piccolofs_flags,
)
from tests.treegen import build_tree, manifest


@pytest.mark.parametrize("flag_set", sorted(FLAG_SETS))
def test_gocryptfs_writes_piccolofs_reads(tmp_path: Path, passfile: Path, flag_set: str) -> None:
    cipher = tmp_path / "cipher"
    init_gocryptfs(cipher, passfile, FLAG_SETS[flag_set])
    with GocryptfsMount(cipher, tmp_path / "g", passfile) as g:
        build_tree(g.mnt)
        expected = manifest(g.mnt)
    with PiccoloMount(cipher, tmp_path / "p", passfile) as p:
        assert manifest(p.mnt) == expected
        # and piccolofs can keep writing into the gocryptfs tree
        (p.mnt / "docs" / "added-by-piccolofs").write_bytes(b"hello gocryptfs")
        expected = manifest(p.mnt)
    assert "internal error" not in p.log()
    res = fsck_piccolofs(cipher, passfile)
    assert res.returncode == 0, res.stdout
    with GocryptfsMount(cipher, tmp_path / "g2", passfile) as g:
        assert manifest(g.mnt) == expected


@pytest.mark.parametrize("flag_set", sorted(FLAG_SETS))
def test_piccolofs_writes_gocryptfs_reads(tmp_path: Path, passfile: Path, flag_set: str) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile, piccolofs_flags(FLAG_SETS[flag_set]))
    with PiccoloMount(cipher, tmp_path / "p", passfile) as p:
        build_tree(p.mnt)
        expected = manifest(p.mnt)
    assert "internal error" not in p.log()
    with GocryptfsMount(cipher, tmp_path / "g", passfile) as g:
        assert manifest(g.mnt) == expected
    res = fsck_gocryptfs(cipher, passfile)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no problems found" in res.stdout + res.stderr
