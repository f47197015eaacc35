"""A software TPM (swtpm) on loopback for tests that need a real TPM 2.0.

The libtss2 swtpm TCTI takes the control channel as the server port + 1, so the helper
picks a free pair (P, P+1) and retries on a clash. Every process it starts is stopped by
its pid, with bounded waits, whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 8
_CMD_GET_CAPABILITY = 1  # swtpm control channel command


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free pair of loopback ports")


def _ctrl_answers(port: int) -> bool:
    """True when swtpm's control channel answers CMD_GET_CAPABILITY with success."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(struct.pack(">I", _CMD_GET_CAPABILITY))
            reply = b""
            while len(reply) < 8:
                chunk = s.recv(8 - len(reply))
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return bool(struct.unpack(">I", reply[:4])[0] == 0)


def _listening(pid: int, ports: tuple[int, ...]) -> bool:
    """True when process `pid` itself listens on all `ports` (127.0.0.1), so a foreign
    process that grabbed one of them is never mistaken for ours."""
    want = {f"0100007F:{p:04X}" for p in ports}
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in want and fields[3] == "0A":  # state LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if len(inodes) < len(ports):
        return False
    try:
        owned = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except (FileNotFoundError, ProcessLookupError):
        return False
    return inodes <= owned


class Swtpm:
    """`swtpm socket --tpm2` on 127.0.0.1, state in a directory that survives restarts."""

    def __init__(self, state_dir: Path | None = None) -> None:
        if shutil.which("swtpm") is None:
            raise RuntimeError("swtpm is not installed (apt install swtpm swtpm-tools)")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="swtpm-")
            state_dir = Path(self._tmp.name) / "state"
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.swtpm.log"
        self.port = 0
        self.pids: list[int] = []  # every process started, for leak checks
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("swtpm is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Swtpm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def start(self) -> None:
        """Start on the previous ports when there were some, else (or on a clash) new ones."""
        if self.running:
            raise RuntimeError("swtpm is already running")
        last = ""
        for attempt in range(PORT_ATTEMPTS):
            if attempt or not self.port:
                self.port = free_port_pair()
            if self._spawn():
                return
            last = self.log()[-2000:]
        raise RuntimeError(f"swtpm did not start after {PORT_ATTEMPTS} attempts:\n{last}")

    def _spawn(self) -> bool:
        """One attempt on self.port; False when swtpm exited (a port clash, typically)."""
        cmd = ["swtpm", "socket", "--tpm2",
               "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
               "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
               "--tpmstate", f"dir={self.state_dir}",
               "--flags", "not-need-init,startup-clear",
               "--log", f"file={self.log_path},level=1"]
        with open(self.log_path, "ab") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=err,
                                          start_new_session=True)
        self.pids.append(self._proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    self._proc = None
                    return False
                if (_listening(self._proc.pid, (self.port, self.port + 1))
                        and _ctrl_answers(self.port + 1)):
                    return True
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"swtpm did not answer within {START_TIMEOUT}s:\n{self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by its pid and reap it (SIGKILL if it lingers). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        else:
            proc.wait()

    def restart(self, orderly: bool = True) -> None:
        """Stop and start again on the same state, so the PCRs are back to their reset
        values. Orderly: TPM2_Shutdown(CLEAR) first; otherwise SIGKILL, a power cut."""
        if orderly:
            self.shutdown_clear()
            self.stop()
        else:
            self.stop(signal.SIGKILL)
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- TPM commands (through tpm2-pytss) -------------------------------------------------
    def _esapi(self) -> tuple[Any, Any]:
        from tpm2_pytss import ESAPI
        from tpm2_pytss.TCTILdr import TCTILdr

        tcti = TCTILdr.parse(self.tcti)
        try:
            return tcti, ESAPI(tcti)
        except BaseException:
            tcti.close()
            raise

    def shutdown_clear(self) -> None:
        from tpm2_pytss import TPM2_SU

        tcti, esys = self._esapi()
        try:
            esys.shutdown(TPM2_SU.CLEAR)
        finally:
            esys.close()
            tcti.close()

    def extend_pcr(self, index: int, data: bytes) -> None:
        """Extend sha256 PCR `index` with sha256(data), as a measurement would."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = hashlib.sha256(data).digest()  # a union: set the member
        tcti, esys = self._esapi()
        try:
            esys.pcr_extend(getattr(ESYS_TR, f"PCR{index}"),
                            TPML_DIGEST_VALUES([ha]))
        finally:
            esys.close()
            tcti.close()

    def property(self, name: str) -> int:
        """A TPM2_PT property, e.g. "MAX_AUTH_FAIL" or "LOCKOUT_COUNTER"."""
        from tpm2_pytss import TPM2_CAP, TPM2_PT

        pt = getattr(TPM2_PT, name)
        tcti, esys = self._esapi()
        try:
            _, caps = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, pt, 1)
        finally:
            esys.close()
            tcti.close()
        for prop in caps.data.tpmProperties:
            if prop.property == pt:
                return int(prop.value)
        raise KeyError(name)

    def loaded_handles(self) -> list[int]:
        """Transient objects and loaded sessions in the TPM: what a careless caller leaks."""
        from tpm2_pytss import TPM2_CAP, TPM2_HT

        out: list[int] = []
        tcti, esys = self._esapi()
        try:
            for ht in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION, TPM2_HT.SAVED_SESSION):
                _, caps = esys.get_capability(TPM2_CAP.HANDLES, int(ht) << 24, 64)
                out += [int(h) for h in caps.data.handles]
        finally:
            esys.close()
            tcti.close()
        return out
