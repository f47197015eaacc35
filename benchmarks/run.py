"""piccolofs vs gocryptfs vs securefs vs a plain directory, side by side, in one run.

    python -m benchmarks.run                 # full suite on tmpfs (~20 min)
    python -m benchmarks.run --quick         # smaller sizes, 1 repetition (~3 min)
    python -m benchmarks.run --disk /var/tmp --only sequential,sqlite_wal

Every workload runs on every target in rotating order (A B C D, B C D A, ...) for each
repetition; the report gives medians, the speed ratios piccolofs/gocryptfs and
piccolofs/securefs (>1 = piccolofs faster) and each mount process's peak RSS and CPU seconds
per workload. securefs is left out (and said so) where it is not installed. Results are
also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import workloads as w
from benchmarks.targets import Target, backing_store, target

BASE_TARGETS = ("plain", "piccolofs", "gocryptfs")
PEERS = ("gocryptfs", "securefs")
HERE = Path(__file__).resolve().parent
SDIST = "Django==5.1.4"


def fetch_tarball() -> Path | None:
    cache = HERE / "cache"
    cache.mkdir(exist_ok=True)
    found = sorted(cache.glob("*.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache), SDIST],
                       capture_output=True, timeout=300, check=False)
        found = sorted(cache.glob("*.tar.gz"))
    return found[0] if found else None


def suite(quick: bool, tarball: Path | None) -> dict[str, Callable[[Target], w.Metrics]]:
    s: dict[str, Callable[[Target], w.Metrics]] = {
        "sequential": lambda t: w.sequential(t, 128 if quick else 512),
        "random_io": lambda t: w.random_io(t, 3 if quick else 5),
        "small_files": lambda t: w.small_files(t, 2000 if quick else 5000),
        "sqlite_wal": lambda t: w.sqlite_wal(t, 5000 if quick else 20000),
        "store_commits": lambda t: w.store_commits(t, 200 if quick else 500),
        "dir_scaling": lambda t: w.dir_scaling(t, (1000, 10000) if quick
                                               else (1000, 10000, 100000)),
        "file_scaling": lambda t: w.file_scaling(t, (1, 64, 256) if quick
                                                 else (1, 64, 1024, 8192)),
        "parallel_readers": lambda t: w.parallel_readers(t, 64 if quick else 256),
    }
    if tarball is not None:
        s["source_tree"] = lambda t: w.source_tree(t, tarball)
    return s


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
               platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal"))
    versions = {}
    for name, cmd in (("gocryptfs", ["gocryptfs", "-version"]), ("fio", ["fio", "--version"]),
                      ("securefs", ["dpkg-query", "-W", "-f", "securefs ${Version}",
                                    "securefs"])):
        try:
            versions[name] = subprocess.run(cmd, capture_output=True, text=True
                                            ).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            versions[name] = "?"
    return {"cpu": cpu, "cores": len(__import__("os").sched_getaffinity(0)),
            "memory_gib": round(mem / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), **versions}


def checkout(rev: str, into: Path) -> Path:
    """A worktree of an earlier revision, whose piccolofs runs as target piccolofs@REV."""
    repo = HERE.parent
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-f", str(into),
                    rev], check=True, capture_output=True)
    return into


def run(reps: int, quick: bool, only: set[str] | None, disk: str | None,
        compare: Sequence[str] = ()) -> dict[str, Any]:
    tarball = fetch_tarball()
    sources: dict[str, Path] = {}
    scratch = Path(tempfile.mkdtemp(prefix="piccolofs-bench-src-"))
    for rev in compare:
        sources[rev] = checkout(rev, scratch / rev.replace("/", "_"))
    peers = [p for p in PEERS if shutil.which(p)]
    targets = (*BASE_TARGETS[:2], *[f"piccolofs@{rev}" for rev in compare], *peers)
    try:
        return _run(reps, quick, only, disk, tarball, targets, sources)
    finally:
        for path in sources.values():
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force",
                            str(path)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _run(reps: int, quick: bool, only: set[str] | None, disk: str | None,
         tarball: Path | None, targets: tuple[str, ...], sources: dict[str, Path]
         ) -> dict[str, Any]:
    work = suite(quick, tarball)
    if only:
        work = {k: v for k, v in work.items() if k in only}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    process: dict[str, dict[str, dict[str, float]]] = {}
    with backing_store(disk) as base:
        for name, fn in work.items():
            for rep in range(reps):
                shift = rep % len(targets)
                order = targets[shift:] + targets[:shift]
                for kind in order:
                    with target(kind, base, sources) as tgt:
                        tgt.reset_peak_rss()
                        cpu0 = tgt.cpu_seconds()
                        start = time.perf_counter()
                        metrics = fn(tgt)
                        wall = time.perf_counter() - start
                        rss, cpu1 = tgt.peak_rss(), tgt.cpu_seconds()
                    for metric, value in metrics.items():
                        samples.setdefault(name, {}).setdefault(metric, {}).setdefault(
                            kind, []).append(value)
                    if rss is not None and cpu0 is not None and cpu1 is not None:
                        p = process.setdefault(name, {}).setdefault(kind, {})
                        p["peak_rss_mib"] = max(p.get("peak_rss_mib", 0), rss / 2**20)
                        p["cpu_s"] = p.get("cpu_s", 0) + (cpu1 - cpu0) / reps
                    print(f"  {name:<17} {kind:<10} rep {rep + 1}: {wall:6.1f} s", flush=True)
    results: dict[str, Any] = {"machine": machine(), "reps": reps, "quick": quick,
                               "targets": list(targets),
                               "backing": disk or "tmpfs", "tarball": tarball.name if tarball
                               else None, "workloads": {}, "process": process,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, metrics in samples.items():
        table = {}
        for metric, by_kind in metrics.items():
            med = {k: statistics.median(v) for k, v in by_kind.items()}
            row: dict[str, Any] = {"median": med}
            better = w.higher_is_better(metric)
            for kind in targets:
                for peer in PEERS:
                    if kind.startswith("piccolofs") and med.get(peer) and med.get(kind):
                        row[f"vs_{peer}" + kind[len("piccolofs"):]] = (
                            med[kind] / med[peer] if better else med[peer] / med[kind])
            table[metric] = row
        results["workloads"][name] = table
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    targets = results["targets"]
    pics = [t for t in targets if t.startswith("piccolofs")]
    pairs = [(p, peer) for peer in PEERS if peer in targets for p in pics]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel "
             f"{m['kernel']}, Python {m['python']}, {m['gocryptfs']}, "
             f"{m.get('securefs', 'no securefs')}; backing "
             f"{results['backing']}; medians of {results['reps']} rep(s); {results['date']}.",
             "", "| workload | metric | " + " | ".join(targets) + " | "
             + " | ".join(f"{p} vs {peer}" for p, peer in pairs) + " |",
             "|---|---|" + "---:|" * (len(targets) + len(pairs))]
    for name, table in results["workloads"].items():
        for metric, row in table.items():
            med = row["median"]
            cells = [f"{med[k]:.4g}" if k in med else "-" for k in targets]
            ratios = [row.get(f"vs_{peer}" + p[len("piccolofs"):]) for p, peer in pairs]
            cells += [f"{r:.2f}x" if r else "-" for r in ratios]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Mount process per workload (peak RSS MiB / CPU s):", "",
              "| workload | " + " | ".join(t for t in targets if t != "plain") + " |",
              "|---|" + "---:|" * (len(targets) - 1)]
    for name, kinds in results["process"].items():
        cells = [f"{kinds[k]['peak_rss_mib']:.0f} / {kinds[k]['cpu_s']:.1f}" if k in kinds
                 else "-" for k in targets if k != "plain"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ratios are speed ratios from this one run (>1: piccolofs faster).")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="comma-separated workloads")
    p.add_argument("--disk", help="run on a directory of this disk instead of tmpfs")
    p.add_argument("--json", help="write results here (default benchmarks/results/…)")
    p.add_argument("--markdown", help="also write the table as Markdown here")
    p.add_argument("--compare", action="append", default=[], metavar="REV",
                   help="also run the piccolofs of git revision REV (before/after)")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    only = set(args.only.split(",")) if args.only else None
    results = run(reps, args.quick, only, args.disk, args.compare)
    publish(results, markdown(results), args.json, args.markdown, "")
    return 0


def publish(results: dict[str, Any], table: str, json_path: str | None,
            markdown_path: str | None, prefix: str) -> None:
    """Print the table; keep the JSON (results/<prefix><time>.json unless told where)."""
    out = Path(json_path) if json_path else HERE / "results" / time.strftime(
        f"{prefix}%Y%m%dT%H%M%S.json", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n" + table)
    if markdown_path:
        Path(markdown_path).write_text(table + "\n")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
