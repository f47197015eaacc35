"""Run CPython's own filesystem regression tests on piccolofs, gocryptfs and a plain directory.

    python -m tests.cpython_regrtest [--modules test_os test_shutil ...] [--json OUT]

Three targets are set up in one fresh work directory (outside /tmp, see below):

    plain      a directory on the same backing filesystem (the baseline: what fails anywhere
               on this machine, e.g. root-only quirks, is subtracted from the other two)
    piccolofs  `piccolofs mount` of a fresh default tree (AES-256-GCM, DirIV, long names)
    gocryptfs  `gocryptfs -allow_other` of a fresh default tree (allow_other also turns on
               default_permissions, which is how piccolofs mounts as root: like with like)

Every module runs as its own `python -m test MODULE` process whose cwd, `--tempdir` and
TMPDIR/TEMP/TMP all lie on the target, with a per-module `--timeout` (plus a hard kill a
minute later) and `--junit-xml`, which names every failing or erroring test. Modules run
`--jobs` at a time; the targets run one after the other. After each target the mount is
checked to still be there (a mount that vanished mid-run would silently turn the target
into its plain mountpoint directory), the piccolofs log is scanned for "internal error"
tracebacks, and both trees are fsck'd after unmounting.

The work directory defaults to /var/tmp: scripts/test.sh lazily unmounts every piccolofs and
gocryptfs mount under /tmp when it exits, which would pull the mounts out from under a run
that happens concurrently. Everything is torn down in `finally` blocks (also on SIGTERM and
Ctrl-C): no mount and no process outlives `run_suite`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.mounts import (
    GocryptfsMount,
    PiccoloMount,
    force_unmount,
    fsck_gocryptfs,
    fsck_piccolofs,
    init_gocryptfs,
    init_piccolofs,
    is_mounted,
    mounts_under,
    write_passfile,
)

TARGETS = ("plain", "piccolofs", "gocryptfs")

# Longest first, so that `--jobs` workers finish together. Seconds are for piccolofs on the
# 2-core reference machine; plain is ~2x faster, gocryptfs about the same.
DEFAULT_MODULES: tuple[str, ...] = (
    "test_tarfile",      # 20 s
    "test_logging",      # 20 s, mostly waiting (file handlers: rotating, watched)
    "test_io",           # 12 s
    "test_venv",         # 8 s
    "test_os",           # 7 s
    "test_zipfile",      # 7 s
    "test_compileall",   # 7 s
    "test_pathlib",      # 4 s
    "test_shutil",       # 3 s
    "test_mailbox",      # 2 s
    "test_importlib",    # 2 s
    "test_glob",         # 2 s
    "test_cmd_line_script",
    "test_file_eintr",
    "test_tempfile",
    "test_posix",
    "test_shelve",
    "test_import",
    "test_dbm_dumb",
    "test_py_compile",
    "test_zipimport",
    "test_sqlite3",
    "test_zipapp",
    "test_runpy",
    "test_posixpath",
    "test_mmap",
    "test_bz2",
    "test_gzip",
    "test_lzma",
    "test_fileinput",
    "test_filecmp",
    "test_file",
    "test_fileio",
    "test_genericpath",
    "test_largefile",
    "test_stat",
    "test_fcntl",
    "test_dbm",
    "test_site",
    "test_pkgutil",
    "test_linecache",
    "test_tabnanny",
)

# The default test run's share: the modules that work files and directories themselves.
# The rest (logging, venv, import machinery, command lines, compression codecs) mostly test
# other things on top of the filesystem; they run under `pytest --soak` and by default here.
FS_MODULES: tuple[str, ...] = tuple(m for m in DEFAULT_MODULES if m not in {
    "test_logging", "test_venv", "test_importlib", "test_cmd_line_script", "test_runpy",
    "test_site", "test_pkgutil", "test_zipapp", "test_tabnanny", "test_linecache",
    "test_bz2", "test_lzma", "test_gzip"})

MODULE_TIMEOUT = 240.0
RANDSEED = 20240601
# Tests that reach beyond the target. testNoArgFunctions calls posix.sync(), which flushes
# every filesystem of the machine: it says nothing of the target's, and a hung filesystem
# elsewhere (a dead disk, one a kernel fault left wedged) would hang the whole suite in an
# uninterruptible wait that no timeout can end.
NOT_THE_TARGETS = ("test.test_posix.PosixTester.testNoArgFunctions",)
INTERNAL_ERROR = re.compile(r"internal error in (\w+)")


@dataclass
class ModuleResult:
    module: str
    target: str
    status: str                      # ok | failed | timeout | crashed | mount-lost | not-run
    returncode: int | None = None
    seconds: float = 0.0
    run: int = 0
    skipped: int = 0
    failing: dict[str, str] = field(default_factory=dict)   # test id -> first line of message
    env_changed: bool = False
    tail: str = ""

    def failure_ids(self) -> set[str]:
        """Failing tests, plus one pseudo-id when the module did not complete."""
        ids = set(self.failing)
        if self.status not in ("ok", "failed"):
            ids.add(f"{self.module}::<{self.status}>")
        return ids


@dataclass
class TargetResult:
    name: str
    modules: dict[str, ModuleResult] = field(default_factory=dict)
    seconds: float = 0.0
    mount_lost: bool = False
    internal_errors: list[str] = field(default_factory=list)   # "op: last traceback line"
    fsck_ok: bool | None = None
    fsck_output: str = ""
    setup_error: str = ""

    def failure_ids(self) -> set[str]:
        out: set[str] = set()
        for m in self.modules.values():
            out |= m.failure_ids()
        return out


@dataclass
class SuiteResult:
    modules: list[str]
    targets: dict[str, TargetResult]
    seconds: float
    python: str
    options: dict[str, Any]

    def beyond_baseline(self, target: str) -> set[str]:
        """Failures on `target` that do not also happen on the plain directory."""
        base = self.targets["plain"].failure_ids() if "plain" in self.targets else set()
        return self.targets[target].failure_ids() - base

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["beyond_baseline"] = {t: sorted(self.beyond_baseline(t)) for t in self.targets
                                  if t != "plain"}
        return out


# ---------------------------------------------------------------------------------------
# one module
# ---------------------------------------------------------------------------------------
def parse_junit(path: Path) -> tuple[int, int, dict[str, str]]:
    """(tests run, skipped, {failing test id: message}) from regrtest's --junit-xml."""
    root = ET.parse(path).getroot()
    run = skipped = 0
    failing: dict[str, str] = {}
    for tc in root.iter("testcase"):
        name = tc.get("name") or "?"
        if tc.find("skipped") is not None:
            skipped += 1
            continue
        run += 1
        for kind in ("error", "failure"):
            el = tc.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failing[name] = f"{kind}: {msg[0][:300] if msg else ''}"
                break
    return run, skipped, failing


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


class _Procs:
    """Every regrtest process group started, so an interrupted run can kill them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self.closed = False

    def add(self, p: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._live.add(p)
            closed = self.closed
        if closed:              # started while shutting down: do not let it run
            _kill_group(p)

    def discard(self, p: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._live.discard(p)

    def kill_all(self, close: bool = False) -> None:
        with self._lock:
            live = list(self._live)
            if close:
                self.closed = True
        for p in live:
            _kill_group(p)

    def reopen(self) -> None:
        with self._lock:
            self.closed = False


_PROCS = _Procs()


def run_module(module: str, target: str, root: Path, outdir: Path,
               timeout: float = MODULE_TIMEOUT, resources: str | None = None) -> ModuleResult:
    """`python -m test MODULE` with cwd, --tempdir and TMPDIR under `root`."""
    work = root / module
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    xml = outdir / f"{module}.xml"
    out = outdir / f"{module}.out"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "test", module, "--timeout", str(int(timeout)),
           "--junit-xml", str(xml), "--tempdir", str(work / "rt"), "--randseed", str(RANDSEED)]
    for test in NOT_THE_TARGETS:
        cmd += ["--ignore", test]
    if resources:
        cmd += ["-u", resources]
    env = dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # let imports write .pyc files on the target
    res = ModuleResult(module, target, "ok")
    start = time.monotonic()
    with open(out, "wb") as fout:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=fout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _PROCS.add(proc)
        try:
            res.returncode = proc.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            res.status = "timeout"
        finally:
            # regrtest is done (or hung): nothing it started may keep running on the target.
            _kill_group(proc)
            _PROCS.discard(proc)
    res.seconds = round(time.monotonic() - start, 2)
    text = out.read_text(errors="replace")
    res.tail = "\n".join(text.splitlines()[-15:])
    res.env_changed = "env changed" in text or "altered the execution environment" in text
    have_xml = False
    if xml.exists():
        try:
            res.run, res.skipped, res.failing = parse_junit(xml)
            have_xml = True
        except ET.ParseError as exc:
            res.tail += f"\n(junit xml unreadable: {exc})"
    if res.status != "ok":
        return res
    # regrtest exit codes: 0 ok, 2 a test failed, 3 env changed, 4 no test ran (all skipped)
    if res.returncode not in (0, 2, 3, 4):
        # regrtest's own --timeout (faulthandler) prints "Timeout (h:mm:ss)!" and exits 1
        res.status = "timeout" if "Timeout (" in text else "crashed"
    elif not have_xml:
        res.status = "crashed"
    elif res.failing:
        res.status = "failed"
    elif res.returncode == 2:
        res.status = "crashed"          # regrtest says failed, but no test case did
    return res


# ---------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mounted(name: str, workdir: Path, passfile: Path,
             tres: TargetResult) -> Iterator[tuple[Path, Path | None]]:
    """Yield (directory to test in, mountpoint or None); unmount and fsck afterwards."""
    if name == "plain":
        d = workdir / "plain"
        d.mkdir()
        yield d, None
        return
    cipher = workdir / f"{name}.cipher"
    mnt = workdir / name
    # Create the cipher dir ourselves (0755, as for gocryptfs) so that both mount roots have
    # the same mode; `piccolofs init` would otherwise create it 0700.
    cipher.mkdir(mode=0o755)
    m: PiccoloMount | GocryptfsMount
    if name == "piccolofs":
        init_piccolofs(cipher, passfile)
        m = PiccoloMount(cipher, mnt, passfile)
    else:
        init_gocryptfs(cipher, passfile)
        m = GocryptfsMount(cipher, mnt, passfile, allow_other=True)
    try:
        m.start()
        if not is_mounted(mnt):
            raise RuntimeError(f"{name} did not mount on {mnt}")
        yield mnt, mnt
    finally:
        m.stop()
        force_unmount(mnt)
        if isinstance(m, PiccoloMount):
            log = m.log()
            for match in INTERNAL_ERROR.finditer(log):
                # the line after the traceback's last frame is the exception itself
                after = log[match.end():].split("\npiccolofs[", 1)[0].strip().splitlines()
                tres.internal_errors.append(f"{match.group(1)}: {after[-1] if after else '?'}")
        if not is_mounted(mnt):
            fsck = fsck_piccolofs if name == "piccolofs" else fsck_gocryptfs
            try:
                r = fsck(cipher, passfile)
                tres.fsck_ok = r.returncode == 0
                tres.fsck_output = (r.stdout + r.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                tres.fsck_ok = False
                tres.fsck_output = "fsck timed out"


def run_target(name: str, modules: Sequence[str], workdir: Path, passfile: Path,
               timeout: float, jobs: int, resources: str | None,
               progress: bool = True) -> TargetResult:
    tres = TargetResult(name)
    outdir = workdir / "out" / name
    outdir.mkdir(parents=True)
    start = time.monotonic()
    lost = threading.Event()
    try:
        with _mounted(name, workdir, passfile, tres) as (root, mnt):
            base = root / "regrtest"
            base.mkdir()

            def one(module: str) -> ModuleResult:
                if _PROCS.closed:
                    return ModuleResult(module, name, "not-run")
                if lost.is_set():
                    return ModuleResult(module, name, "mount-lost")
                r = run_module(module, name, base, outdir, timeout, resources)
                if mnt is not None and not is_mounted(mnt):
                    lost.set()
                    r.status = "mount-lost"
                if progress:
                    print(f"  {name:<10} {module:<22} {r.status:<10} {len(r.failing):>3} failing"
                          f"  {r.seconds:6.1f}s", file=sys.stderr, flush=True)
                return r

            pool = ThreadPoolExecutor(max_workers=max(1, jobs))
            try:
                for r in pool.map(one, modules):
                    tres.modules[r.module] = r
            except BaseException:
                # Ctrl-C, SIGTERM, pytest-timeout: stop the workers' processes now rather
                # than waiting for them, so the mounts can go away.
                _PROCS.kill_all(close=True)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(base, ignore_errors=True)
    except Exception as exc:   # a target that cannot be set up still yields a result
        tres.setup_error = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        _PROCS.kill_all()
    tres.mount_lost = lost.is_set()
    for module in modules:
        tres.modules.setdefault(module, ModuleResult(module, name, "not-run"))
    tres.seconds = round(time.monotonic() - start, 1)
    return tres


def run_suite(modules: Sequence[str] = DEFAULT_MODULES, *, targets: Sequence[str] = TARGETS,
              workdir: Path | None = None, timeout: float = MODULE_TIMEOUT, jobs: int = 2,
              resources: str | None = None, keep: bool = False,
              progress: bool = True) -> SuiteResult:
    """Run `modules` on every target, one target after the other; always tear down."""
    modules = list(modules)
    own = workdir is None
    if workdir is None:
        base = "/var/tmp" if os.path.isdir("/var/tmp") else None
        workdir = Path(tempfile.mkdtemp(prefix="cpython-regrtest-", dir=base))
    workdir.mkdir(parents=True, exist_ok=True)
    passfile = write_passfile(workdir)
    start = time.monotonic()
    results: dict[str, TargetResult] = {}
    _PROCS.reopen()
    try:
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}")
            results[t] = run_target(t, modules, workdir, passfile, timeout, jobs, resources,
                                    progress)
    finally:
        _PROCS.kill_all(close=True)
        for m in mounts_under(workdir):
            force_unmount(m)
        if own and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return SuiteResult(modules, results, round(time.monotonic() - start, 1), sys.version,
                       {"timeout": timeout, "jobs": jobs, "resources": resources,
                        "randseed": RANDSEED, "workdir": str(workdir)})


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
_MARK = {"timeout": "T", "crashed": "C", "mount-lost": "L", "not-run": "-"}


def _cell(res: SuiteResult, target: str, module: str) -> str:
    m = res.targets[target].modules[module]
    if m.status in ("not-run", "mount-lost") and not m.failing:
        return _MARK[m.status]
    s = str(len(m.failing))
    if target != "plain" and "plain" in res.targets:
        base = res.targets["plain"].modules[module].failure_ids()
        extra = len(m.failure_ids() - base)
        if extra:
            s += f" (+{extra})"
    return s + _MARK.get(m.status, "")


def format_report(res: SuiteResult, max_per_module: int = 12) -> str:
    targets = list(res.targets)
    lines = [f"{'module':<22}" + "".join(f"{t:>14}" for t in targets)]
    lines.append("-" * len(lines[0]))
    for module in res.modules:
        lines.append(f"{module:<22}" + "".join(f"{_cell(res, t, module):>14}" for t in targets))
    lines.append("-" * len(lines[0]))
    totals = [str(len(res.targets[t].failure_ids())) for t in targets]
    lines.append(f"{'failing tests':<22}" + "".join(f"{x:>14}" for x in totals))
    beyond = ["" if t == "plain" else str(len(res.beyond_baseline(t))) for t in targets]
    lines.append(f"{'beyond plain baseline':<22}" + "".join(f"{x:>14}" for x in beyond))
    secs = [f"{res.targets[t].seconds:.0f}s" for t in targets]
    lines.append(f"{'wall time':<22}" + "".join(f"{x:>14}" for x in secs))
    lines.append("cells: failing tests (+ not failing on plain); T timeout, C crashed, "
                 "L mount lost, - not run")
    lines.append(f"total wall time {res.seconds:.0f}s, {res.options['jobs']} modules at a time")
    for t in targets:
        tr = res.targets[t]
        notes = []
        if tr.setup_error:
            notes.append(f"setup error: {tr.setup_error}")
        if tr.mount_lost:
            notes.append("MOUNT LOST during the run: results after that point are invalid")
        if tr.fsck_ok is False:
            notes.append(f"fsck FAILED: {tr.fsck_output[-500:]}")
        if tr.internal_errors:
            notes.append(f"{len(tr.internal_errors)} internal errors in the mount log: "
                         + "; ".join(sorted(set(tr.internal_errors))))
        for n in notes:
            lines.append(f"[{t}] {n}")
    for t in targets:
        if t == "plain":
            continue
        only = sorted(res.beyond_baseline(t))
        lines.append("")
        lines.append(f"failing on {t} but not on plain ({len(only)}):")
        shown: dict[str, int] = {}
        for tid in only:
            owner = tid.split("::")[0] if "::" in tid else _module_of(tid, res.modules)
            shown[owner or "?"] = shown.get(owner or "?", 0) + 1
            if shown[owner or "?"] > max_per_module:
                continue
            msg = res.targets[t].modules[owner].failing.get(tid, "") if owner else ""
            lines.append(f"  {tid}  {msg[:160]}")
        for owner, count in shown.items():
            if count > max_per_module:
                lines.append(f"  ... and {count - max_per_module} more in {owner}")
    return "\n".join(lines)


def _module_of(test_id: str, modules: Sequence[str]) -> str | None:
    parts = test_id.split(".")
    for m in modules:
        if m in parts:
            return m
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--timeout", type=float, default=MODULE_TIMEOUT, help="seconds per module")
    p.add_argument("--jobs", type=int, default=2, help="modules run at the same time")
    p.add_argument("-u", "--use", dest="resources", help="regrtest -u resources")
    p.add_argument("--workdir", type=Path, help="work here (kept) instead of a temp dir")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = p.parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        res = run_suite(args.modules, targets=args.targets, workdir=args.workdir,
                        timeout=args.timeout, jobs=args.jobs, resources=args.resources,
                        keep=args.keep)
    finally:
        signal.signal(signal.SIGTERM, old)
    print(format_report(res))
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=1, sort_keys=True))
    bad = any(t.setup_error or t.mount_lost for t in res.targets.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
