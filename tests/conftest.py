"""Shared fixtures: real piccolofs mounts with hygiene checks.

A missing /dev/fuse or gocryptfs binary is an error, not a skip: these tests exist to
exercise the real thing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from piccolofs import mountinfo
from tests.mounts import PiccoloMount, fsck_piccolofs, init_piccolofs, write_passfile


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="the long versions of the repeated and generated tests (more kill "
                          "trials, more generated requests, every CPython module)")


@pytest.fixture
def soak(pytestconfig: pytest.Config) -> bool:
    """True under --soak: a test that repeats or generates cases runs its long version.
    The default run keeps one real instance of each, sized for a 2-core CI."""
    return bool(pytestconfig.getoption("soak"))


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.path.exists("/dev/fuse"):
        raise pytest.UsageError("/dev/fuse is missing: the suite needs real FUSE mounts")
    if shutil.which("gocryptfs") is None or shutil.which("fusermount3") is None:
        raise pytest.UsageError("gocryptfs and fusermount3 must be installed (see README)")


def _fuse_mounts() -> list[str]:
    return [m.mountpoint for m in mountinfo.entries() if m.fstype.startswith("fuse")]


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    left = [m for m in _fuse_mounts() if m.startswith(str(tmp_path))]
    assert not left, f"test left FUSE mounts behind: {left}"


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    return write_passfile(tmp_path)


def assert_clean_log(m: PiccoloMount, allow_integrity: bool = False) -> None:
    log = m.log()
    assert "internal error" not in log and "Traceback" not in log, log
    if not allow_integrity:
        assert "integrity:" not in log, log


@pytest.fixture
def volume(tmp_path: Path, passfile: Path,
           request: pytest.FixtureRequest) -> Iterator[PiccoloMount]:
    """A freshly initialised default tree, mounted; fsck must be clean afterwards."""
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    m = PiccoloMount(cipher, tmp_path / "mnt", passfile)
    with m:
        yield m
    assert_clean_log(m, allow_integrity=bool(request.node.get_closest_marker("integrity")))
    if not request.node.get_closest_marker("integrity"):
        res = fsck_piccolofs(cipher, passfile)
        assert res.returncode == 0, res.stdout + res.stderr
