"""The workloads. Each takes a Target and returns {metric: value}; metric names end in
`_per_s` / `_mb_s` (higher is better) or `_s` / `_us` (lower is better)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.targets import Target, drop_caches

MiB = 1024 * 1024
Metrics = dict[str, float]


def higher_is_better(metric: str) -> bool:
    return metric.endswith(("_per_s", "_mb_s"))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- sequential I/O --------------------------------------------------------------------------
def sequential(t: Target, size_mb: int = 512) -> Metrics:
    path = t.root / "seq.bin"
    block = os.urandom(MiB)

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(size_mb):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        while os.read(fd, MiB):
            pass
        os.close(fd)

    w = _timed(write)
    drop_caches(t.root, t.backing)
    r = _timed(read)
    path.unlink()
    return {"seq_write_mb_s": size_mb / w, "seq_read_cold_mb_s": size_mb / r}


# -- random 4 KiB I/O with fio ---------------------------------------------------------------
def _fio(t: Target, rw: str, runtime: int) -> float:
    res = subprocess.run(
        ["fio", "--name=bench", f"--filename={t.root / 'fio.bin'}", f"--rw={rw}", "--bs=4k",
         "--size=64m", "--ioengine=psync", "--iodepth=1", "--direct=0", "--time_based",
         f"--runtime={runtime}", "--output-format=json", "--randrepeat=1"],
        capture_output=True, text=True, check=True, timeout=runtime * 10 + 120)
    job = json.loads(res.stdout)["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


def random_io(t: Target, runtime: int = 5) -> Metrics:
    out = {"rand_read_4k_iops_per_s": 0.0, "rand_write_4k_iops_per_s": 0.0}
    out["rand_write_4k_iops_per_s"] = _fio(t, "randwrite", runtime)
    drop_caches(t.root, t.backing)
    out["rand_read_4k_iops_per_s"] = _fio(t, "randread", runtime)
    (t.root / "fio.bin").unlink()
    return out


# -- small files -----------------------------------------------------------------------------
def small_files(t: Target, count: int = 5000) -> Metrics:
    d = t.root / "small"
    d.mkdir()
    payload = os.urandom(1024)

    def create() -> None:
        for i in range(count):
            fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)

    created = _timed(create)
    drop_caches(t.root, t.backing)
    stat = _timed(lambda: [os.stat(d / f"f{i:05d}") for i in range(count)])
    drop_caches(t.root, t.backing)
    listed = _timed(lambda: os.listdir(d))
    unlinked = _timed(lambda: [os.unlink(d / f"f{i:05d}") for i in range(count)])
    d.rmdir()
    return {"create_files_per_s": count / created, "stat_cold_per_s": count / stat,
            "list_cold_entries_per_s": count / listed, "unlink_files_per_s": count / unlinked}


# -- a real source tree ----------------------------------------------------------------------
def source_tree(t: Target, tarball: Path) -> Metrics:
    dest = t.root / "src"
    dest.mkdir()
    with tarfile.open(tarball) as tf:
        members = tf.getmembers()
    extract = _timed(lambda: subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)],
                                            check=True))
    drop_caches(t.root, t.backing)
    lslr = _timed(lambda: subprocess.run(["ls", "-lR", str(dest)], check=True,
                                         stdout=subprocess.DEVNULL))
    drop_caches(t.root, t.backing)

    def read_all() -> None:
        for root, _, files in os.walk(dest):
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    with open(p, "rb") as fh:
                        while fh.read(MiB):
                            pass

    read = _timed(read_all)
    rm = _timed(lambda: shutil.rmtree(dest))
    return {"tar_x_s": extract, "ls_lR_cold_s": lslr, "read_all_cold_s": read, "rm_rf_s": rm,
            "tree_entries": float(len(members))}


# -- SQLite ----------------------------------------------------------------------------------
def sqlite_wal(t: Target, rows: int = 20000, per_txn: int = 100) -> Metrics:
    path = t.root / "bench.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
    rng = random.Random(1)

    def load() -> None:
        for i in range(0, rows, per_txn):
            db.execute("BEGIN")
            db.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                           [(f"key-{i + j}", rng.randbytes(100)) for j in range(per_txn)])
            db.execute("COMMIT")

    commit_s = _timed(load)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    drop_caches(t.root, t.backing)

    def scan() -> None:
        c = sqlite3.connect(path)
        assert c.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()[0] == rows
        c.close()

    scan_s = _timed(scan)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return {"sqlite_commits_per_s": (rows / per_txn) / commit_s, "sqlite_scan_cold_s": scan_s}


def store_commits(t: Target, commits: int = 500) -> Metrics:
    """The control store's own write path (one transaction + revision bump per commit)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ctl.store.db import ControlDB

    db = ControlDB(t.root / "control.db", read_only=False)

    def run() -> None:
        for i in range(commits):
            payload = json.dumps({"Name": f"app-{i}", "Version": str(i)}).encode()
            db.write(lambda c, i=i, p=payload: c.execute(
                "INSERT INTO apps (name, payload, updated_at) VALUES (?, ?, '') ON CONFLICT "
                "(name) DO UPDATE SET payload = excluded.payload", (f"app-{i % 50}", p)))

    elapsed = _timed(run)
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(t.root / "control.db") + suffix).unlink(missing_ok=True)
    return {"store_commits_per_s": commits / elapsed}


# -- scaling ---------------------------------------------------------------------------------
def dir_scaling(t: Target, sizes: tuple[int, ...] = (1000, 10000, 100000)) -> Metrics:
    out: Metrics = {}
    for n in sizes:
        d = t.root / f"dir{n}"
        d.mkdir()
        for i in range(n):
            os.close(os.open(d / f"entry-{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644))
        drop_caches(t.root, t.backing)
        listed = _timed(lambda d=d: [e.stat() for e in os.scandir(d)])
        drop_caches(t.root, t.backing)
        names = [f"entry-{random.Random(n).randrange(n):06d}" for _ in range(1000)]
        lookups = _timed(lambda d=d, names=names: [os.stat(d / x) for x in names])
        out[f"readdir_stat_{n}_us"] = listed / n * 1e6
        out[f"lookup_{n}_us"] = lookups / len(names) * 1e6
        shutil.rmtree(d)
    return out


def file_scaling(t: Target, sizes_mb: tuple[int, ...] = (1, 64, 1024, 8192)) -> Metrics:
    out: Metrics = {}
    block = os.urandom(MiB)
    for mb in sizes_mb:
        path = t.root / "big.bin"

        def write(path: Path = path, mb: int = mb) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for _ in range(mb):
                os.write(fd, block)
            os.fsync(fd)
            os.close(fd)

        w = _timed(write)
        drop_caches(t.root, t.backing)
        r = _timed(lambda path=path: subprocess.run(["cat", str(path)], check=True,
                                                    stdout=subprocess.DEVNULL))
        out[f"write_{mb}mb_mb_s"] = mb / w
        out[f"read_{mb}mb_mb_s"] = mb / r
        path.unlink()
    return out


def parallel_readers(t: Target, size_mb: int = 256, readers: tuple[int, ...] = (1, 4, 16)
                     ) -> Metrics:
    path = t.root / "shared.bin"
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MiB))
    out: Metrics = {}
    for n in readers:
        drop_caches(t.root, t.backing)
        chunk = size_mb * MiB // n

        def reader(i: int, chunk: int = chunk) -> None:
            fd = os.open(path, os.O_RDONLY)
            off, end = i * chunk, (i + 1) * chunk
            while off < end:
                data = os.pread(fd, min(MiB, end - off), off)
                if not data:
                    break
                off += len(data)
            os.close(fd)

        def run(n: int = n) -> None:
            threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        out[f"readers_{n}_mb_s"] = size_mb / _timed(run)
    path.unlink()
    return out
