"""Backups: a device's export and import (PCV bundles) against tar of the same ciphertext,
on the same disk, in one run.

    python -m benchmarks.bundles                   # one 4 GiB volume, medians of 3 (~10 min)
    python -m benchmarks.bundles --quick           # 0.5 GiB, 1 repetition (~1 min)
    python -m benchmarks.bundles --size-gib 2 --dir /srv/scratch

A real daemon (tests.daemon) gets one application volume holding N GiB of incompressible
files, written through its mount: one big file and a few thousand small ones. Then, with
caches dropped before every timed step, for each system in alternating order:

- export: `piccoloctl export full --output DIR/x.pcv` (the CLI's wall time; the bundle is
  fsynced) against `tar -cf DIR/peer.tar -C STATE/ciphertext VOL` + `sync`;
- import: `piccoloctl import x.pcv` on a fresh daemon (checked, staged and synced) against
  `tar -xf peer.tar -C FRESH` + `sync`; the `piccoloctl unlock` that swaps the import in is
  timed on its own.

Throughput is the volume's ciphertext bytes over the wall time, for both (the bundle also
carries the small control and bootstrap volumes: a slight handicap for the export). The
daemon's RSS (and the volume's mount process's) is polled every 50 ms during the export and
the import, and cross-checked with the kernel's high-water mark (VmHWM, reset before each
step). Last, a writer appends to a log and rewrites small files in the volume while an
export runs: the export's hold (`hold_ms`, `writes_held`, `recopied`) and the writer's
longest single call during the export, against its longest in the second before it.

Prints a Markdown table; JSON goes to benchmarks/results/. Everything it starts is stopped
and its temp dir removed, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.run import publish
from benchmarks.targets import drop_caches
from piccolofs.atomic import syncfs
from tests.daemon import PASSWORD, Daemon

HERE = Path(__file__).resolve().parent
VOL = "data"
MiB = 1 << 20
SMALL_FILES = 3000
SMALL_MAX = 64 << 10  # small files are 1 byte .. 64 KiB (about 96 MiB in all)
POLL_S = 0.05
CLI_TIMEOUT = 3600


# -- measuring ---------------------------------------------------------------------------
class RssPoller:
    """Peak RSS of some processes: polled every 50 ms (threads included: one address space)
    and the kernel's high-water mark since start (VmHWM, reset on entry)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.polled: dict[str, int] = dict.fromkeys(pids, 0)
        self.hwm: dict[str, int] = dict.fromkeys(pids, 0)
        self.before: dict[str, int] = dict.fromkeys(pids, 0)
        self.cpu: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while True:
            for name, p in procs.items():
                with contextlib.suppress(psutil.Error):
                    self.polled[name] = max(self.polled[name], p.memory_info().rss)
            if self._stop.wait(POLL_S):
                return

    def __enter__(self) -> RssPoller:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, psutil.Error):
                p = psutil.Process(pid)
                self.before[name] = p.memory_info().rss
                t = p.cpu_times()
                self.cpu[name] = -(t.user + t.system)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                self.cpu[name] += t.user + t.system
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.hwm[name] = int(line.split()[1]) * 1024

    def mib(self) -> dict[str, dict[str, float]]:
        return {n: {"polled": self.polled[n] / MiB, "hwm": self.hwm[n] / MiB,
                    "before": self.before[n] / MiB, "cpu_s": self.cpu[n]} for n in self.pids}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ctl_json(d: Daemon, *args: str, input: str | None = None) -> Any:
    res = subprocess.run([*d.ctl_argv(), "--json", *args], capture_output=True, text=True,
                         input=input, timeout=CLI_TIMEOUT)
    if res.returncode != 0:
        raise RuntimeError(f"piccoloctl {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr}{res.stdout}\nlog:\n{d.log()[-3000:]}")
    return json.loads(res.stdout) if res.stdout.strip() else None


def remove_bundle(dest: Path) -> None:
    """A bundle and its sidecar (an export never overwrites either)."""
    for path in (dest, Path(f"{dest}.sha256")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=CLI_TIMEOUT)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def mount_pid(d: Daemon, vid: str) -> int | None:
    want = str(d.state / "ciphertext" / vid)
    for p in d.children():
        if any(c.rstrip("/") == want for c in p.info["cmdline"] or []):
            return int(p.pid)
    return None


def _when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def job_seconds(job: dict[str, Any]) -> float | None:
    try:
        return (_when(job["finished_at"]) - _when(job["started_at"])).total_seconds()
    except (KeyError, AttributeError, ValueError):
        return None


def copy_seconds(d: Daemon, job: dict[str, Any]) -> float | None:
    """How long an export spent copying the volumes into its spool, before it began to
    write the bundle: from its progress events (published every 0.5 s, so up to 0.5 s
    late)."""
    for e in d.events(topic="export_progress"):
        if e["data"].get("id") == job["id"] and e["data"].get("phase") == "writing":
            return (_when(e["time"]) - _when(job["started_at"])).total_seconds()
    return None


# -- the device ------------------------------------------------------------------------------
def fill(root: Path, size: int, seed: int = 1) -> None:
    """`size` bytes of incompressible files: a few thousand small ones, the rest one file."""
    rng = random.Random(seed)
    small = 0
    for i in range(SMALL_FILES):
        folder = root / "small" / f"d{i // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        n = rng.randint(1, SMALL_MAX)
        (folder / f"f{i:04d}.bin").write_bytes(os.urandom(n))
        small += n
    left = size - small
    with open(root / "big.bin", "wb") as f:
        while left > 0:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    syncfs(root)


@dataclass
class Writer:
    """Appends numbered records to a log and rewrites four small files, timing every call
    (open, write, close) as it goes."""

    root: Path
    calls: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    stop: threading.Event = field(default_factory=threading.Event)

    def _timed(self, t0: float) -> None:
        self.calls.append((t0, time.monotonic() - t0))

    def run(self) -> None:
        self.root.mkdir(exist_ok=True)
        t = time.monotonic()
        log = os.open(self.root / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._timed(t)
        try:
            n = 0
            while not self.stop.is_set():
                t = time.monotonic()
                os.write(log, f"record {n:08d}\n".encode())
                self._timed(t)
                data = f"{n:08d}".encode() + bytes([n % 251]) * 50_000
                t = time.monotonic()
                fd = os.open(self.root / f"gen-{n % 4}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o644)
                self._timed(t)
                try:
                    t = time.monotonic()
                    os.write(fd, data)
                    self._timed(t)
                finally:
                    t = time.monotonic()
                    os.close(fd)
                    self._timed(t)
                n += 1
        finally:
            os.close(log)

    def longest(self, t0: float, t1: float) -> tuple[float, float]:
        """The longest call that overlapped [t0, t1]: (seconds, when it began after t0)."""
        d, s = max(((d, s) for s, d in list(self.calls) if s < t1 and s + d > t0),
                   default=(0.0, t0))
        return d, s - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the run ---------------------------------------------------------------------------------
PARTS = ("export", "import", "writer")


def run(size: int, reps: int, base: Path, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    dest, peer = base / "x.pcv", base / "peer.tar"
    (base / "a").mkdir()
    a = Daemon(base / "a")
    samples: dict[str, list[Any]] = {k: [] for k in (
        "export_s", "export_job_s", "export_copy_s", "tar_c_s", "import_s", "import_job_s",
        "tar_x_s", "unlock_s", "rss_export", "rss_import", "rss_unlock", "hold")}
    try:
        a.start()
        a.setup_and_unlock()
        ctl_json(a, "volume", "ensure", VOL)
        ctl_json(a, "volume", "attach", VOL)
        t, _ = timed(lambda: fill(a.mount(VOL), size))
        cipher = a.state / "ciphertext" / VOL
        cbytes = tree_bytes(cipher)
        print(f"  filled {size / MiB:.0f} MiB through the mount in {t:.1f} s "
              f"({cbytes / MiB:.0f} MiB of ciphertext)", flush=True)
        assert a.proc is not None
        pids = {"daemon": a.proc.pid}
        mp = mount_pid(a, VOL)
        if mp is not None:
            pids["mount"] = mp

        def ours_export() -> None:
            remove_bundle(dest)
            drop_caches(base)
            with RssPoller(pids) as rss:
                t, job = timed(lambda: ctl_json(a, "export", "full", "--output", str(dest)))
            samples["export_s"].append(t)
            samples["export_job_s"].append(job_seconds(job))
            samples["export_copy_s"].append(copy_seconds(a, job))
            samples["rss_export"].append(rss.mib())
            print(f"  export      {t:6.2f} s  {cbytes / MiB / t:7.1f} MiB/s  "
                  f"bundle {job['result']['size'] / MiB:.0f} MiB", flush=True)

        def tar_create() -> None:
            with contextlib.suppress(FileNotFoundError):
                peer.unlink()
            drop_caches(base)

            def go() -> None:
                sh("tar", "-cf", str(peer), "-C", str(cipher.parent), VOL)
                syncfs(base)
            t, _ = timed(go)
            samples["tar_c_s"].append(t)
            print(f"  tar -c+sync {t:6.2f} s  {cbytes / MiB / t:7.1f} MiB/s", flush=True)

        for rep in range(reps if "export" in parts else 0):
            for step in ((ours_export, tar_create) if rep % 2 == 0
                         else (tar_create, ours_export)):
                step()

        def ours_import(rep: int) -> None:
            where = base / f"b{rep}"
            where.mkdir()
            b = Daemon(where)
            try:
                b.start()
                assert b.proc is not None
                drop_caches(base)
                with RssPoller({"daemon": b.proc.pid}) as rss:
                    t, job = timed(lambda: ctl_json(b, "import", str(dest)))
                samples["import_s"].append(t)
                samples["import_job_s"].append(job_seconds(job))
                samples["rss_import"].append(rss.mib())
                with RssPoller({"daemon": b.proc.pid}) as rss:
                    tu, _ = timed(lambda: ctl_json(b, "unlock", input=PASSWORD + "\n"))
                samples["unlock_s"].append(tu)
                samples["rss_unlock"].append(rss.mib())
                got = tree_bytes(b.state / "ciphertext" / VOL)
                if got != cbytes:
                    raise RuntimeError(f"imported {got} bytes of ciphertext, not {cbytes}")
                print(f"  import      {t:6.2f} s  {cbytes / MiB / t:7.1f} MiB/s  "
                      f"unlock {tu:.2f} s", flush=True)
            finally:
                b.stop()
                shutil.rmtree(where, ignore_errors=True)
                syncfs(base)

        def tar_extract(rep: int) -> None:
            where = base / f"t{rep}"
            where.mkdir()
            try:
                drop_caches(base)

                def go() -> None:
                    sh("tar", "-xf", str(peer), "-C", str(where))
                    syncfs(base)
                t, _ = timed(go)
                samples["tar_x_s"].append(t)
                print(f"  tar -x+sync {t:6.2f} s  {cbytes / MiB / t:7.1f} MiB/s", flush=True)
            finally:
                shutil.rmtree(where, ignore_errors=True)
                syncfs(base)

        for rep in range(reps if "import" in parts else 0):
            for restore in ((ours_import, tar_extract) if rep % 2 == 0
                            else (tar_extract, ours_import)):
                restore(rep)
        with contextlib.suppress(FileNotFoundError):
            peer.unlink()

        for _ in range(reps if "writer" in parts else 0):
            remove_bundle(dest)
            drop_caches(base)
            w = Writer(a.mount(VOL) / "busy")
            thread = threading.Thread(target=w.run)
            thread.start()
            try:
                time.sleep(1.0)
                t0 = time.monotonic()
                job = ctl_json(a, "export", "full", "--output", str(dest))
                t1 = time.monotonic()
            finally:
                w.stop.set()
                thread.join(timeout=60)
            r = job["result"]
            longest, at = w.longest(t0, t1)
            hold = {"hold_ms": r["hold_ms"].get(VOL, 0), "writes_held": r["writes_held"],
                    "recopied": r["recopied"].get(VOL, 0),
                    "writer_max_ms": longest * 1e3, "writer_max_at_s": at,
                    "writer_max_before_ms": w.longest(t0 - 1.0, t0)[0] * 1e3,
                    "copy_s": copy_seconds(a, job), "job_s": job_seconds(job),
                    "writer_calls": sum(1 for s, _ in w.calls if t0 <= s < t1),
                    "export_s": t1 - t0}
            samples["hold"].append(hold)
            print(f"  under a writer: hold {hold['hold_ms']} ms, {hold['writes_held']} held, "
                  f"{hold['recopied']} recopied, writer's longest call "
                  f"{hold['writer_max_ms']:.0f} ms at +{at:.1f} s of {t1 - t0:.1f} s, "
                  f"copy until ≈+{hold['copy_s'] or float('nan'):.1f} s (before: "
                  f"{hold['writer_max_before_ms']:.0f} ms)", flush=True)
        remove_bundle(dest)
    finally:
        a.stop()
    return {"cipher_bytes": cbytes, "size": size, "reps": reps, "parts": list(parts),
            "samples": samples}


# -- the report ------------------------------------------------------------------------------
def machine(where: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
               platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal"))
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(where)],
                        capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "filesystem": " ".join(fs) or "?", "dir": str(where)}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    s, cb = res["samples"], int(res["cipher_bytes"])

    def rate(key: str) -> float:
        return cb / MiB / med(s[key])

    def known(key: str) -> list[float]:
        return [float(x) for x in s[key] if x is not None]

    def peak(step: str, who: str, kind: str) -> float:
        rows = [float(r[who][kind]) for r in s[f"rss_{step}"] if who in r]
        if not rows:
            return float("nan")
        return max(rows) if kind in ("polled", "hwm") else med(rows)

    hold = s["hold"]
    return {
        "export_mib_s": rate("export_s"), "tar_c_mib_s": rate("tar_c_s"),
        "import_mib_s": rate("import_s"), "tar_x_mib_s": rate("tar_x_s"),
        "export_s": med(s["export_s"]), "tar_c_s": med(s["tar_c_s"]),
        "import_s": med(s["import_s"]), "tar_x_s": med(s["tar_x_s"]),
        "export_job_s": med(known("export_job_s")), "export_copy_s": med(known("export_copy_s")),
        "import_job_s": med(known("import_job_s")), "unlock_s": med(s["unlock_s"]),
        "rss": {f"{step}_{who}_{kind}": peak(step, who, kind)
                for step in ("export", "import", "unlock") for who in ("daemon", "mount")
                for kind in ("polled", "hwm", "before", "cpu_s")},
        "hold": {k: (med([float(h[k]) for h in hold]), max((float(h[k]) for h in hold),
                                                           default=float("nan")))
                 for k in ("hold_ms", "writes_held", "recopied", "writer_max_ms",
                           "writer_max_before_ms", "writer_calls", "export_s")},
    }


def markdown(res: dict[str, Any]) -> str:
    m, x, reps, parts = res["machine"], res["summary"], res["reps"], res["parts"]
    rss, hold = x["rss"], x["hold"]

    def mib(step: str, who: str) -> str:
        p, h, b = (rss[f"{step}_{who}_{k}"] for k in ("polled", "hwm", "before"))
        cpu = rss[f"{step}_{who}_cpu_s"]
        return "-" if p != p else f"{p:.0f} ({h:.0f}); {b:.0f} before; {cpu:.1f} s CPU"

    def mm(key: str, fmt: str = "{:.0f}") -> str:
        a, b = hold[key]
        return f"{fmt.format(a)} ({fmt.format(b)})"

    gib = res["size"] / (1 << 30)
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel "
        f"{m['kernel']}, Python {m['python']}; {m['filesystem']} at {m['dir']}; one volume "
        f"of {gib:g} GiB ({res['cipher_bytes'] / MiB:.0f} MiB of ciphertext: one big file "
        f"and {SMALL_FILES} small ones); medians of {reps}; {res['date']}.",
    ]
    if "export" in parts:
        lines += [
            "",
            "| step | piccolofs | tar + sync (peer) | piccolofs / tar | goal |",
            "|---|---:|---:|---:|---|",
            f"| export (MiB/s) | {x['export_mib_s']:.0f} | {x['tar_c_mib_s']:.0f} | "
            f"{x['export_mib_s'] / x['tar_c_mib_s']:.2f}x | ≥ 0.8x |",
        ]
        if "import" in parts:
            lines.append(
                f"| import, staged (MiB/s) | {x['import_mib_s']:.0f} | "
                f"{x['tar_x_mib_s']:.0f} | {x['import_mib_s'] / x['tar_x_mib_s']:.2f}x "
                "| ≥ 0.8x |")
        lines += [
            f"| export wall (s) | {x['export_s']:.2f} | {x['tar_c_s']:.2f} | | |",
            f"| … the daemon's job / of which copying into the spool (s) | "
            f"{x['export_job_s']:.2f} / ≈{x['export_copy_s']:.1f} | | | |",
        ]
        if "import" in parts:
            lines += [
                f"| import wall (s) | {x['import_s']:.2f} | {x['tar_x_s']:.2f} | | |",
                f"| … the daemon's job (s) | {x['import_job_s']:.2f} | | | |",
                f"| unlock that swaps the import in (s) | {x['unlock_s']:.2f} | | | |",
            ]
        lines += [
            "",
            "| process, step | peak RSS MiB, polled (VmHWM); RSS before; CPU | goal |",
            "|---|---|---|",
            f"| daemon, export | {mib('export', 'daemon')} | ≤ 100 MiB |",
            f"| volume's mount process, export | {mib('export', 'mount')} | |",
        ]
        if "import" in parts:
            lines += [f"| daemon, import | {mib('import', 'daemon')} | ≤ 100 MiB |",
                      f"| daemon, unlock | {mib('unlock', 'daemon')} | |"]
    if "writer" in parts:
        lines += [
            "",
            f"| export under a writer (median (max) of {reps}) | value |",
            "|---|---:|",
            f"| export wall (s) | {mm('export_s', '{:.2f}')} |",
            f"| hold_ms | {mm('hold_ms')} |",
            f"| writes_held | {mm('writes_held')} |",
            f"| recopied | {mm('recopied')} |",
            f"| writer's calls during the export | {mm('writer_calls')} |",
            f"| writer's longest call during the export (ms) | "
            f"{mm('writer_max_ms', '{:.1f}')} |",
            f"| writer's longest call in the second before (ms) | "
            f"{mm('writer_max_before_ms', '{:.1f}')} |",
        ]
    lines += [
        "",
        "Throughput: the volume's ciphertext bytes over wall time (the CLI's, from its start "
        "to its exit; tar's including `sync`), caches dropped before each. Peak RSS: polled "
        "every 50 ms, the kernel's high-water mark in brackets.",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def scratch(parent: str) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="piccolo-bundles-", dir=parent))
    try:
        yield base
    finally:
        from tests.daemon import release_mountpoints

        for d in base.iterdir():
            if (d / "state").is_dir():
                release_mountpoints(d / "state")
        shutil.rmtree(base, ignore_errors=True)
        left = [ln for ln in Path("/proc/mounts").read_text().splitlines()
                if str(base) in ln]
        if left:
            print(f"warning: mounts left under {base}: {left}", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bundles",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="0.5 GiB, 1 repetition")
    p.add_argument("--size-gib", type=float, help="the volume's size (default 4, quick 0.5)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the state dirs, bundles and tars go (one disk; not tmpfs "
                        "unless that is what you want to measure)")
    p.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)} (import needs "
                                  "export)")
    p.add_argument("--json", help="write results here (default benchmarks/results/…)")
    p.add_argument("--markdown", help="also write the table as Markdown here")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root (FUSE mounts with allow_other, drop_caches)")
    size = int((args.size_gib or (0.5 if args.quick else 4.0)) * (1 << 30))
    reps = args.reps or (1 if args.quick else 3)
    parts = tuple(args.only.split(",")) if args.only else PARTS
    if not set(parts) <= set(PARTS) or ("import" in parts and "export" not in parts):
        p.error(f"--only takes parts of {','.join(PARTS)}; import needs export")
    free = shutil.disk_usage(args.dir).free
    if free < 5 * size + (2 << 30):
        p.error(f"{args.dir}: {free / 2**30:.1f} GiB free, about {5 * size / 2**30:.1f} GiB "
                "needed (volume, spool, bundle, tar, staged import)")
    with scratch(args.dir) as base:
        res = run(size, reps, base, parts)
    res["machine"] = machine(Path(args.dir))
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["summary"] = summary(res)
    publish(res, markdown(res), args.json, args.markdown, "bundles-")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
