"""The Debian package, installed on this machine: built by scripts/package.sh (which reuses
a .deb already built from the same tree), installed with dpkg, its programs run from where
they were installed, then purged, after which the machine must be as it was found.

The test changes the real system (/usr/bin, /lib/systemd/system, /etc/systemd, ...): it
refuses to run where piccolofs is already installed, and purges the package even when a
step fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.daemon import PASSWORD, release_mountpoints
from tests.mounts import force_unmount, is_mounted, mounts_under

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
VENV = Path("/usr/lib/piccolofs")
UNIT = "piccolo-ctld.service"
PROGRAMS = ("piccolo-ctld", "piccoloctl", "piccolofs")
# What the package, its maintainer scripts and dpkg touch: compared before and after.
WATCHED = ("/usr/bin", "/usr/sbin", "/usr/lib/systemd/system", "/lib/systemd/system",
           "/usr/lib/udev/rules.d", "/lib/udev/rules.d", "/usr/lib/tmpfiles.d", "/etc", "/opt",
           "/usr/lib/piccolofs", "/usr/share/doc/piccolofs", "/usr/share/man/man1",
           "/var/lib/systemd/deb-systemd-helper-enabled",
           "/var/lib/systemd/deb-systemd-helper-masked")
# Created by the tmpfiles.d entry at install, removed by a purge when empty.
TMPFILES_DIRS = ("/run/piccolo", "/var/lib/piccolod")
# The installed programs see neither the repository's venv nor its sources.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run(argv: list[str], timeout: float = 300, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          env=env, cwd="/")


def package_status() -> str:
    """dpkg's status of piccolofs ("installed", "half-configured", ...), "" if none."""
    res = run(["dpkg-query", "-W", "-f=${db:Status-Status}", "piccolofs"])
    status = res.stdout.strip() if res.returncode == 0 else ""
    return "" if status == "not-installed" else status


def machine_state() -> dict[str, object]:
    """Every path under WATCHED (with a symlink's target and a file's mode), whether each
    TMPFILES_DIRS entry exists, and dpkg's records of the package."""
    state: dict[str, object] = {}
    for top in WATCHED:
        entries = set()
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                p = os.path.join(root, name)
                st = os.lstat(p)
                link = os.readlink(p) if os.path.islink(p) else ""
                entries.add((p, oct(st.st_mode), link))
        state[top] = entries
    for d in TMPFILES_DIRS:
        state[d] = os.path.lexists(d)
    state["dpkg"] = sorted(p.name for p in Path("/var/lib/dpkg/info").glob("piccolofs.*"))
    return state


def diff(before: dict[str, object], after: dict[str, object]) -> list[str]:
    out = []
    for key, was in before.items():
        now = after[key]
        if isinstance(was, set) and isinstance(now, set):
            out += [f"gone: {e}" for e in sorted(was - now)]
            out += [f"new: {e}" for e in sorted(now - was)]
        elif was != now:
            out.append(f"{key}: {was!r} -> {now!r}")
    return out


def our_processes(marker: str) -> list[psutil.Process]:
    """Processes of the installed package, or any naming the test's directory."""
    found = []
    for p in psutil.process_iter(["cmdline", "pid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != os.getpid() and (str(VENV) in cmd or marker in cmd
                                             or any(f"/usr/bin/{x}" in cmd for x in PROGRAMS)):
            found.append(p)
    return found


@pytest.fixture
def deb() -> Path:
    res = run(["bash", str(REPO / "scripts" / "package.sh")], timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr[-6000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == REPO / "dist", res.stdout
    return path


@pytest.fixture
def system(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The machine's state before the install; afterwards, whatever the test did, no
    daemon of ours runs, nothing stays mounted and the package is purged."""
    assert package_status() == "", (
        "piccolofs is installed on this machine: this test installs and purges it, so it "
        "only runs where it is not installed")
    before = machine_state()
    try:
        yield before
    finally:
        for p in our_processes(str(tmp_path)):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(our_processes(str(tmp_path)), timeout=10)
        for m in sorted(mounts_under(tmp_path), reverse=True):
            force_unmount(m)
        release_mountpoints(tmp_path / "state")
        if package_status():
            run(["dpkg", "--purge", "piccolofs"])


def start_daemon(base: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The installed /usr/bin/piccolo-ctld, ready when it says so on NOTIFY_SOCKET."""
    notify_path = base / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    log = base / "ctld.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["/usr/bin/piccolo-ctld", "--state-dir", str(base / "state"),
             "--run-dir", str(base / "run"), "--kdf-memory", "8192", "--kdf-time", "1",
             "--kdf-threads", "1", "--volume-scryptn", "10"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
            env={**CLEAN_ENV, "NOTIFY_SOCKET": str(notify_path)})
    try:
        msg = notify.recv(4096)
    except TimeoutError:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"the daemon never became ready:\n{log.read_text()}") from None
    finally:
        notify.close()
    assert msg == b"READY=1", msg
    return proc, log


def test_install_run_and_purge(deb: Path, system: dict[str, object], tmp_path: Path) -> None:
    res = run(["dpkg", "-i", str(deb)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert package_status() == "installed"

    # What was installed, and where the programs run from.
    for name in PROGRAMS:
        exe = Path("/usr/bin", name)
        assert exe.resolve() == VENV / "bin" / name
        assert exe.read_bytes().startswith(f"#!{VENV}/bin/python\n".encode())
    assert (VENV / "bin" / "python").resolve() == Path("/usr/bin/python3.11")
    res = run([f"{VENV}/bin/python", "-c",
               "import importlib.metadata as m, pyfuse3, cryptography.hazmat.bindings._rust, "
               "nacl.bindings, argon2, psutil, tpm2_pytss, pyudev, piccolofs, ctl.daemon; "
               "pyfuse3.Operations.fallocate; print(m.version('pyfuse3'), "
               "m.version('cryptography'))"], env=CLEAN_ENV)
    assert res.returncode == 0, res.stderr
    pyfuse3_version, cryptography_version = res.stdout.split()
    assert "+fallocate" in pyfuse3_version
    assert int(cryptography_version.split(".")[0]) >= 47
    rules = Path("/lib/udev/rules.d/61-piccolo-pool.rules")
    assert rules.read_bytes() == (REPO / "udev" / "61-piccolo-pool.rules").read_bytes()
    assert Path("/usr/lib/tmpfiles.d/piccolofs.conf").is_file()
    assert Path(f"/etc/systemd/system/multi-user.target.wants/{UNIT}").resolve() == \
        Path(f"/lib/systemd/system/{UNIT}").resolve()
    for d, mode in zip(TMPFILES_DIRS, (0o750, 0o700), strict=True):
        if not system[d]:  # made by the install: the mode is the tmpfiles.d entry's
            assert Path(d).stat().st_mode & 0o777 == mode, d
    assert Path("/usr/share/doc/piccolofs/docs/daemon.md").is_file()

    # systemd reads the unit as installed: every key known, ExecStart= executable.
    res = run(["systemd-analyze", "verify", f"/lib/systemd/system/{UNIT}"], timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), \
        res.stdout + res.stderr

    # The installed daemon and CLI: setup, unlock (bootstrap and control mounted by the
    # installed piccolofs), lock. Secrets go on stdin.
    proc, log = start_daemon(tmp_path)
    state = tmp_path / "state"
    try:
        ctl = ["/usr/bin/piccoloctl", "--socket", str(tmp_path / "run" / "ctl.sock")]

        def piccoloctl(*args: str, secret: str | None = None) -> str:
            res = run([*ctl, *args], input=secret, env=CLEAN_ENV, timeout=120)
            assert res.returncode == 0, f"piccoloctl {' '.join(args)}: {res.stderr}\n" + \
                log.read_text()[-3000:]
            return res.stdout

        piccoloctl("setup", secret=PASSWORD + "\n")
        piccoloctl("unlock", secret=PASSWORD + "\n")
        assert json.loads(piccoloctl("--json", "status"))["locked"] is False
        assert is_mounted(state / "mounts" / "bootstrap")
        assert is_mounted(state / "mounts" / "control")
        children = [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True)]
        mounters = [c for c in children if "piccolofs" in c and "mount" in c]
        assert len(mounters) >= 2, children
        assert {c[0] for c in mounters} == {f"{VENV}/bin/python"}, mounters
        piccoloctl("lock")
        assert json.loads(piccoloctl("--json", "status"))["locked"] is True
        assert not is_mounted(state / "mounts" / "control")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
    psutil.wait_procs(our_processes(str(tmp_path)), timeout=20)
    assert not our_processes(str(tmp_path))
    assert not mounts_under(tmp_path)
    release_mountpoints(state)

    res = run(["dpkg", "--purge", "piccolofs"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert package_status() == ""
    changed = diff(system, machine_state())
    assert not changed, "the purge left the machine changed:\n" + "\n".join(changed)
