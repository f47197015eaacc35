"""`piccoloctl`: the command line for the control daemon.

Secrets come from a prompt, `--password-file F`, or stdin — never from argv. Output is for
people by default and JSON with `--json`. Exit codes tell scripts what happened:
0 ok, 1 failed, 2 usage or invalid input, 3 locked, 4 not found, 5 refused (wrong secret,
conflict, not leader, busy, too many attempts), 6 daemon unreachable; a bundle refused by
an import: 7 malformed or unsafe, 8 damaged (a checksum differs), 9 of an unsupported
format or version, 10 not authentic (its manifest fails the HMAC, or its keys do not open
with its keyset), 11 no space (to stage it, or to write an export).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import http.client
import json
import os
import random
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from ctl.paths import Paths

OK, FAILED, USAGE, LOCKED, NOT_FOUND, REFUSED, UNREACHABLE = range(7)
BAD_BUNDLE, DAMAGED_BUNDLE, UNSUPPORTED_BUNDLE, FORGED_BUNDLE, NO_SPACE = range(7, 12)
_BUNDLE_EXIT = {"bundle_bad_checksum": DAMAGED_BUNDLE, "bundle_size_mismatch": DAMAGED_BUNDLE,
                "bundle_future_version": UNSUPPORTED_BUNDLE,
                "bundle_not_a_bundle": UNSUPPORTED_BUNDLE,
                "bundle_hmac_mismatch": FORGED_BUNDLE, "bundle_key_mismatch": FORGED_BUNDLE,
                "bundle_no_space": NO_SPACE, "no_space": NO_SPACE}
PROGRESS_POLL = 0.25
_STATUS_EXIT = {400: USAGE, 422: USAGE, 431: USAGE, 401: REFUSED, 403: REFUSED,
                404: NOT_FOUND, 405: USAGE, 409: REFUSED, 423: LOCKED, 429: REFUSED,
                503: REFUSED}

# Retrying a daemon that is busy (its accept queue full, or every connection in use): the
# pause starts short and doubles, with jitter so a crowd of clients spreads out.
RETRY_BACKOFF_MIN = 0.005
RETRY_BACKOFF_MAX = 0.5
# How long a refused connect is retried while the socket file exists: a daemon restarting
# (systemd waits RestartSec=2, then start-up) rather than one that is gone for good.
REFUSED_GRACE = 10.0
# The retry budget of a connection without a timeout (an event stream).
UNTIMED_RETRY_BUDGET = 60.0


def _retry_budget(timeout: float | None) -> float:
    return UNTIMED_RETRY_BUDGET if timeout is None else timeout


def _backoff(delay: float) -> float:
    """Sleep about `delay` and return the next one."""
    time.sleep(random.uniform(delay / 2, delay))
    return min(delay * 2, RETRY_BACKOFF_MAX)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        """Connect, retrying while the daemon is busy or restarting. A socket with a
        timeout connects without blocking, so a full accept queue fails at once with EAGAIN;
        that is retried until the timeout. ECONNREFUSED while the socket file exists means
        no one listens on it (yet): a restart, retried for at most REFUSED_GRACE, as is the
        socket vanishing after that, just before the new daemon binds its own."""
        start = time.monotonic()
        budget = _retry_budget(self.timeout)
        delay = RETRY_BACKOFF_MIN
        refused = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EAGAIN:
                    limit = budget
                elif exc.errno == errno.ECONNREFUSED and _is_socket(self._path):
                    refused, limit = True, min(budget, REFUSED_GRACE)
                elif exc.errno == errno.ENOENT and refused:
                    # The stale socket went: a new daemon is about to bind its own.
                    limit = min(budget, REFUSED_GRACE)
                else:
                    raise
                if time.monotonic() - start + delay > limit:
                    raise
                delay = _backoff(delay)
                continue
            self.sock = sock
            return


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        raw = body.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        super().__init__(err.get("message") or f"HTTP {status}")
        self.status = status
        self.code = err.get("code", "")
        self.body = body


def _answer(status: int, data: bytes) -> Any:
    parsed = json.loads(data) if data.strip() else {}
    if status >= 300:
        raise ApiError(status, parsed)
    return parsed


class Client:
    def __init__(self, socket_path: str, timeout: float | None = 300.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _conn(self, timeout: float | None = -1) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket_path, self.timeout if timeout == -1 else timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None,
                 timeout: float | None = -1
                 ) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        """Send one request; return the connection and its response, not yet read. A
        daemon at its connection limit answers 503 too_many_connections without running
        anything, so that is retried with a back-off until the timeout: a busy daemon slows
        its clients down rather than failing them."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        start = time.monotonic()
        delay = RETRY_BACKOFF_MIN
        while True:
            conn = self._conn(timeout)
            try:
                conn.request(method, "/api/v1" + path, body=payload, headers=headers)
                resp = conn.getresponse()
                if resp.status != 503:
                    return conn, resp
                data = resp.read()
            except BaseException:
                conn.close()
                raise
            conn.close()
            parsed = json.loads(data) if data.strip() else {}
            err = parsed.get("error") if isinstance(parsed, dict) else None
            budget = _retry_budget(conn.timeout)
            if (not isinstance(err, dict) or err.get("code") != "too_many_connections"
                    or time.monotonic() - start + delay > budget):
                raise ApiError(503, parsed if isinstance(parsed, dict) else {})
            delay = _backoff(delay)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn, resp = self._request(method, path, body)
        try:
            data = resp.read()
        finally:
            conn.close()
        return _answer(resp.status, data)

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        conn, resp = self._request("GET", path, None, timeout=None)
        try:
            if resp.status >= 300:
                data = resp.read()
                raise ApiError(resp.status, json.loads(data) if data.strip() else {})
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


    def upload(self, path: str, chunks: Iterator[bytes]) -> Any:
        """POST a binary body (a bundle) as it is read, chunked; returns the JSON answer."""
        conn = self._conn(None)
        try:
            # Refused before the body ended: the answer is already waiting to be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request("POST", "/api/v1" + path, body=chunks, encode_chunked=True,
                             headers={"Content-Type": "application/x-tar",
                                      "Transfer-Encoding": "chunked"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return _answer(resp.status, data)

    def download(self, path: str, out: Any) -> int:
        """Copy a binary body (a bundle) to `out`; returns the bytes written."""
        conn, resp = self._request("GET", path, None, timeout=None)
        try:
            if resp.status >= 300:
                data = resp.read()
                raise ApiError(resp.status, json.loads(data) if data.strip() else {})
            total = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                total += len(chunk)
            return total
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------
class Secrets:
    """Reads secrets in order from a file, stdin (one per line) or the terminal."""

    def __init__(self, password_file: str | None) -> None:
        self._lines: list[str] | None = None
        if password_file:
            with open(password_file) as f:
                self._lines = f.read().splitlines()
        elif not sys.stdin.isatty():
            self._lines = sys.stdin.read().splitlines()

    def next(self, prompt: str, confirm: bool = False) -> str:
        if self._lines is not None:
            if not self._lines:
                raise SystemExit(_die(USAGE, f"missing input for: {prompt.rstrip(': ')}"))
            return self._lines.pop(0)
        value = getpass.getpass(prompt)
        if confirm and getpass.getpass("Repeat: ") != value:
            raise SystemExit(_die(USAGE, "the two entries differ"))
        return value


def _die(code: int, message: str) -> int:
    print(f"piccoloctl: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
def _volume_line(v: dict[str, Any]) -> str:
    flags = []
    if v.get("needs_repair"):
        flags.append("NEEDS REPAIR")
    if v.get("read_only"):
        flags.append("read-only")
    err = f"  error: {v['last_error']}" if v.get("last_error") else ""
    if v.get("term") is not None:
        flags.append(f"term {v['term']} led by {v.get('leader_node') or '?'}")
    return (f"{v['id']:<16} {v.get('class') or '?':<12} desired={v['desired_state']:<9} "
            f"observed={v['observed_state']:<9} role={v['role']:<8} gen={v['generation']}"
            f"{'  [' + ', '.join(flags) + ']' if flags else ''}{err}")


def _print(args: argparse.Namespace, data: Any, human: str | None = None) -> None:
    if args.json or human is None:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def cmd_status(c: Client, args: argparse.Namespace) -> int:
    s = c.call("GET", "/crypto/status")
    rk = c.call("GET", "/crypto/recovery-key")
    s["recovery_key"] = rk["present"]
    state = "not initialized" if not s["initialized"] else ("locked" if s["locked"]
                                                            else "unlocked")
    boot = {"tpm": "mounted from the TPM", "unlock": "mounted at unlock"}.get(
        s.get("bootstrap") or "", "not mounted")
    pending = s.get("import")
    note = (f"; import {pending['id']} {pending['phase']}: unlock with the bundle's secret"
            if pending else "")
    _print(args, s, f"{state}; recovery key {'present' if rk['present'] else 'absent'}; "
           f"bootstrap {boot}{note}")
    return OK


def cmd_setup(c: Client, args: argparse.Namespace) -> int:
    pw = Secrets(args.password_file).next("New admin password: ", confirm=True)
    _print(args, c.call("POST", "/crypto/setup", {"password": pw}), "initialized (locked)")
    return OK


def cmd_unlock(c: Client, args: argparse.Namespace) -> int:
    src = Secrets(args.password_file)
    if args.recovery:
        body = {"recovery_key": src.next("Recovery key: ")}
    else:
        body = {"password": src.next("Password: ")}
    _print(args, c.call("POST", "/crypto/unlock", body), "unlocked")
    return OK


def cmd_lock(c: Client, args: argparse.Namespace) -> int:
    _print(args, c.call("POST", "/crypto/lock"), "locked")
    return OK


def cmd_reset_password(c: Client, args: argparse.Namespace) -> int:
    src = Secrets(args.password_file)
    rk = src.next("Recovery key: ")
    pw = src.next("New password: ", confirm=True)
    _print(args, c.call("POST", "/crypto/reset-password",
                        {"recovery_key": rk, "new_password": pw}), "password reset")
    return OK


def cmd_passwd(c: Client, args: argparse.Namespace) -> int:
    src = Secrets(args.password_file)
    old = src.next("Current password: ")
    new = src.next("New password: ", confirm=True)
    _print(args, c.call("POST", "/crypto/password",
                        {"old_password": old, "new_password": new}), "password changed")
    return OK


def cmd_recovery_key(c: Client, args: argparse.Namespace) -> int:
    if args.action == "status":
        rk = c.call("GET", "/crypto/recovery-key")
        _print(args, rk, "present" if rk["present"] else "absent")
        return OK
    body: dict[str, Any] = {}
    if args.password_file or args.with_password:
        body["password"] = Secrets(args.password_file).next("Password: ")
    res = c.call("POST", "/crypto/recovery-key/generate", body)
    _print(args, res, "Recovery key (write it down; it is shown once):\n\n  "
           + "\n  ".join(" ".join(res["words"][i:i + 6]) for i in range(0, 26, 6)))
    return OK


def cmd_volume(c: Client, args: argparse.Namespace) -> int:
    a = args.action
    if a == "list":
        vols = c.call("GET", "/volumes")["volumes"]
        _print(args, vols, "\n".join(_volume_line(v) for v in vols) or "no volumes")
        return OK
    vid = urllib.parse.quote(args.id, safe="")
    if a == "show":
        res = c.call("GET", f"/volumes/{vid}")
    elif a == "ensure":
        res = c.call("POST", "/volumes", {"id": args.id, "class": args.volume_class,
                                          "cluster_mode": args.cluster_mode,
                                          "follower_policy": args.follower_policy,
                                          **({"pool": args.pool} if args.pool else {})})
    elif a == "attach":
        res = c.call("POST", f"/volumes/{vid}/attach", {"role": args.role})
    elif a == "detach":
        res = c.call("POST", f"/volumes/{vid}/detach", {"lazy": args.lazy})
    elif a == "fsck":
        res = c.call("POST", f"/volumes/{vid}/fsck")
        _print(args, res, "\n".join([*res["problems"], f"{args.id}: {res['summary']}"]))
        return OK if res["ok"] else FAILED
    else:
        res = c.call("POST", f"/volumes/{vid}/role", {"role": args.role})
    _print(args, res, _volume_line(res) + f"\n  mountpoint: {res['mountpoint']}")
    return OK


def _pool_line(d: dict[str, Any]) -> str:
    dev = d.get("device") or {}
    size = f"{dev['size_bytes'] / 2**30:.1f} GiB" if dev.get("size_bytes") else "?"
    health = (d.get("health") or {}).get("status")
    extra = f"  health {health}" if health else ""
    extra += f"  error: {d['error']}" if d.get("error") else ""
    return (f"{d['id']}  {d.get('label') or '-':<12} {d['state']:<8} "
            f"{dev.get('node') or '-':<12} {d.get('fs_type') or '?':<5} {size:>9}  "
            f"volumes: {', '.join(d['volumes']) or 'none'}{extra}")


def _pool_details(d: dict[str, Any]) -> str:
    lines = [_pool_line(d)]
    dev = d.get("device") or {}
    if dev:
        lines.append(f"  disk: {dev.get('model') or '?'} serial {dev.get('serial') or '?'}")
    if d.get("mountpoint"):
        lines.append(f"  mounted at {d['mountpoint']}")
    h = d.get("health")
    if h:
        cap = h.get("capacity") or {}
        if cap:
            lines.append(f"  capacity: {cap['free_bytes'] / 2**30:.1f} GiB free of "
                         f"{cap['total_bytes'] / 2**30:.1f} GiB ({cap['used_ratio']:.0%} used)")
        smart = h.get("smart") or {}
        lines.append("  SMART: " + ("passed" if smart.get("passed") else "FAILED")
                     if smart.get("available") else f"  SMART: n/a ({smart.get('reason')})")
        lines += [f"  {h['status']}: {r}" for r in h.get("reasons", [])]
    if d.get("safe_to_remove"):
        lines.append("  safe to remove")
    return "\n".join(lines)


def cmd_device(c: Client, args: argparse.Namespace) -> int:
    a = args.action
    if a == "list":
        res = c.call("GET", "/devices")
        note = "" if res["hotplug"] == "udev" else f"\nhotplug: {res['hotplug']}"
        _print(args, res, ("\n".join(_pool_line(d) for d in res["devices"]) or "no pools")
               + note)
        return OK
    if a == "init":
        res = c.call("POST", "/devices/init", {"device": args.device, "label": args.label,
                                               "fs": args.fs, "yes": args.yes})
    else:
        ident = urllib.parse.quote(args.id, safe="")
        if a == "show":
            res = c.call("GET", f"/devices/{ident}")
        else:
            res = c.call("POST", f"/devices/{ident}/eject", {"lazy": args.lazy})
    _print(args, res, _pool_details(res))
    return OK


def cmd_events(c: Client, args: argparse.Namespace) -> int:
    q: list[tuple[str, str]] = [("topic", t) for t in args.topic or []]
    q.append(("since", str(args.since)))
    if args.follow:
        q.append(("follow", "1"))
    try:
        for event in c.stream("/events?" + urllib.parse.urlencode(q)):
            if args.json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(f"{event['seq']:>6} {event['time']} {event['topic']:<24} "
                      f"{json.dumps(event['data'], sort_keys=True)}", flush=True)
    except KeyboardInterrupt:
        pass
    return OK


def cmd_health(c: Client, args: argparse.Namespace) -> int:
    h = c.call("GET", "/health")
    ch = h["control_health"]
    lines = [f"status: {h['status']}",
             f"crypto: {'locked' if h['crypto']['locked'] else 'unlocked'}",
             f"control store: {ch['status']} ({ch['message']}, checked {ch['checked_at']})"]
    lines += [f"volume {k}: {v}" for k, v in sorted(h["volumes"].items())]
    lines += [f"pool {k}: {v}" for k, v in sorted(h.get("devices", {}).items())]
    if h["needs_repair"]:
        lines.append("needs repair: " + ", ".join(h["needs_repair"]))
    _print(args, h, "\n".join(lines))
    return OK


def cmd_store(c: Client, args: argparse.Namespace) -> int:
    if args.action == "status":
        res = c.call("GET", "/store")
        h = res["health"]
        _print(args, res, f"revision {res['revision']} ({res['checksum'][:16] or '-'}) "
               f"role {res['role']}{' read-only' if res['read_only'] else ''}; "
               f"health {h['status']}: {h['message']}")
    elif args.action == "check":
        res = c.call("POST", "/store/check")
        _print(args, res, f"{res['status']}: {res['message']}")
    else:
        rows = c.call("GET", f"/store/audit?since={args.since}&limit=1000")["audit"]
        _print(args, rows, "\n".join(f"{r['seq']:>6} {r['time']} {r['kind']:<28} {r['source']} "
                                     f"{json.dumps(r['data'], sort_keys=True)}" for r in rows)
               or "no audit records")
    return OK


def cmd_leadership(c: Client, args: argparse.Namespace) -> int:
    if args.resource:
        if not args.role:
            return _die(USAGE, "give RESOURCE and ROLE")
        res = c.call("POST", "/leadership", {"resource": args.resource, "role": args.role})
    else:
        res = c.call("GET", "/leadership")
    _print(args, res, "\n".join(f"{k}: {v}" for k, v in sorted(res["roles"].items()))
           or "all resources: leader (local default)")
    return OK


def cmd_cluster(c: Client, args: argparse.Namespace) -> int:
    s = c.call("GET", "/cluster")
    if s["mode"] != "etcd":
        _print(args, s, "single node: every volume is led here")
        return OK
    lines = [f"node {s['node_id']}; etcd quorum: {'yes' if s['quorum'] else 'NO'}"
             + (f" ({s['reason']})" if s.get("reason") else "")]
    lines += [f"  {m['endpoint']}: " + ("unreachable" if not m["reachable"] else
                                         "leader" if m["leader"] else "member")
              + (f" ({m['error']})" if m.get("error") else "") for m in s["members"]]
    for vid, t in sorted(s["terms"].items()):
        lines.append(f"  volume {vid}: {t['role']}, term {t['token']} held by "
                     f"{t['holder'] or '?'}"
                     + (f" (last step-down: {t['step_down_reason']})"
                        if t.get("step_down_reason") else ""))
    _print(args, s, "\n".join(lines))
    return OK


def _tpm_line(s: dict[str, Any]) -> str:
    if not s["enrolled"]:
        head = "not enrolled"
    elif s.get("error"):
        head = f"enrolled, but unusable: {s['error']}"
    else:
        head = (f"enrolled to PCR {','.join(map(str, s['pcrs']))}"
                + (" with a PIN" if s["pin"] else "")
                + ("; the PCRs changed since (reseal at the next unlock)"
                   if s.get("pcrs_changed") else ""))
    tpm = "TPM available" if s["available"] else \
        f"no usable TPM ({s.get('unavailable_reason', '?')})"
    boot = {"tpm": "mounted from the TPM", "unlock": "mounted at unlock"}.get(
        s.get("bootstrap") or "", "not mounted")
    fail = s.get("last_failure")
    return (f"{head}\n{tpm} at {s['tcti']}\nbootstrap {boot}"
            + (f"\nlast unseal failed ({fail['kind']}): {fail['reason']}" if fail else ""))


def cmd_tpm(c: Client, args: argparse.Namespace) -> int:
    a = args.action
    body: dict[str, Any] = {}
    if a in ("enroll", "reseal", "unseal") and (args.pin or a == "unseal"):
        body["pin"] = Secrets(args.password_file).next(
            "New PIN: " if a == "enroll" else "PIN: ", confirm=a == "enroll")
    if a == "status":
        res = c.call("GET", "/tpm")
    elif a == "enroll":
        if args.pcrs:
            try:
                body["pcrs"] = sorted({int(x) for x in args.pcrs.split(",")})
            except ValueError:
                return _die(USAGE, "--pcrs takes PCR numbers separated by commas, e.g. 7 or 0,7")
        res = c.call("POST", "/tpm/enroll", body)
    elif a == "remove":
        res = c.call("POST", "/tpm/remove")
        _print(args, res, "TPM enrolment removed")
        return OK
    else:
        res = c.call("POST", f"/tpm/{a}", body)
    _print(args, res, _tpm_line(res))
    return OK


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _follow_job(c: Client, args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Wait for a job, drawing a progress bar on a terminal (bytes, files, rate, ETA)."""
    bar = sys.stderr.isatty() and not args.json
    while True:
        job: dict[str, Any] = c.call("GET", path)
        p = job["progress"]
        if bar:
            total = p.get("total_bytes") or 0
            frac = min(p["bytes"] / total, 1.0) if total else 0.0
            eta = f" ETA {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
            print(f"\r{p['phase'][:20]:<20} [{'#' * int(frac * 30):<30}] {frac:4.0%} "
                  f"{_size(p['bytes'])}/{_size(total)} {p['files']} files "
                  f"{_size(p['rate_bytes_per_s'])}/s{eta}   ", end="", file=sys.stderr)
        if job["state"] != "running":
            if bar:
                print(file=sys.stderr)
            return job
        time.sleep(PROGRESS_POLL)


def _job_failed(args: argparse.Namespace, job: dict[str, Any]) -> int:
    err = job.get("error") or {}
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True))
    code = str(err.get("code", ""))
    exit_code = _BUNDLE_EXIT.get(code, BAD_BUNDLE if code.startswith("bundle_") else FAILED)
    return _die(exit_code, f"{err.get('message', 'failed')} ({code})")


def cmd_export(c: Client, args: argparse.Namespace) -> int:
    if args.kind == "list":
        data = c.call("GET", "/exports")
        lines = [f"{e.get('finished_at', '?'):<28} {e.get('kind', '?'):<8} "
                 f"{_size(e.get('size') or 0):>10}  rev {e.get('store_revision')}  "
                 f"{e.get('sha256', '')[:16]}  {e.get('path')}" for e in data["exports"]]
        _print(args, data, "\n".join(lines) or "no exports yet")
        return OK
    to_stdout = args.output == "-"
    body: dict[str, Any] = {"kind": args.kind}
    if args.volume:
        body["volumes"] = args.volume
    if args.output and not to_stdout:
        body["output"] = os.path.abspath(args.output)
    job = c.call("POST", "/exports", body)
    job = _follow_job(c, args, f"/exports/{job['id']}")
    if job["state"] != "done":
        return _job_failed(args, job)
    if to_stdout:
        c.download(f"/exports/{job['id']}/bundle", sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return OK
    r = job["result"]
    held = ", ".join(f"{v} {ms} ms" for v, ms in sorted(r.get("hold_ms", {}).items()) if ms)
    _print(args, job, f"exported {r['path']} ({_size(r['size'])}, sha256 {r['sha256']})"
           + (f"; writes held: {held}" if held else ""))
    return OK


def _stdin_chunks(show: bool) -> Iterator[bytes]:
    sent, t0 = 0, time.monotonic()
    while chunk := sys.stdin.buffer.read(1 << 20):
        sent += len(chunk)
        if show:
            rate = sent / max(time.monotonic() - t0, 1e-6)
            print(f"\rsending {_size(sent)} {_size(rate)}/s   ", end="", file=sys.stderr)
        yield chunk
    if show:
        print(file=sys.stderr)


def cmd_import(c: Client, args: argparse.Namespace) -> int:
    if args.target == "status" and not os.path.exists(args.target):
        data = c.call("GET", "/imports")
        pending = data.get("pending")
        human = ("no import pending" if not pending else
                 f"import {pending['id']} {pending['phase']}: {pending.get('kind')} bundle of "
                 f"{', '.join(pending.get('volumes') or [])}; unlock with its password or "
                 "recovery key, or `piccoloctl import abort`")
        _print(args, data, human)
        return OK
    if args.target == "abort" and not os.path.exists(args.target):
        _print(args, c.call("POST", "/imports/abort"), "import aborted; the previous state stays")
        return OK
    if args.target == "-":  # the bundle arrives on stdin: sent as it is read
        query = {"force": "true" if args.force else "false"}
        if args.keyset:
            query["keyset"] = os.path.abspath(args.keyset)
        job = c.upload("/imports?" + urllib.parse.urlencode(query),
                       _stdin_chunks(sys.stderr.isatty() and not args.json))
    else:
        body: dict[str, Any] = {"path": os.path.abspath(args.target), "force": args.force}
        if args.keyset:
            body["keyset"] = os.path.abspath(args.keyset)
        job = c.call("POST", "/imports", body)
        job = _follow_job(c, args, f"/imports/{job['id']}")
    if job["state"] != "done":
        return _job_failed(args, job)
    _print(args, job, f"imported, locked ({job['result'].get('kind')} bundle of "
           f"{', '.join(job['result'].get('volumes') or [])}): run `piccoloctl unlock` with "
           "the bundle's password or recovery key")
    return OK


def _read_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def cmd_bootstrap(c: Client, args: argparse.Namespace) -> int:
    what, a = args.what, args.action
    if what == "remote":
        if a == "set":
            try:
                config = json.loads(_read_file(args.file))
            except ValueError as exc:
                return _die(USAGE, f"{args.file}: not JSON: {exc}")
            res = c.call("PUT", "/bootstrap/remote", config)
            _print(args, res, "saved" + ("" if res["stored"] else
                                         " (reaches the control store at unlock)"))
        else:
            _print(args, c.call("GET", "/bootstrap/remote"))
    elif what == "acme":
        if a == "set":
            if not args.key or not args.account:
                return _die(USAGE, "give --key FILE and --account FILE")
            try:
                account = json.loads(_read_file(args.account))
            except ValueError as exc:
                return _die(USAGE, f"{args.account}: not JSON: {exc}")
            res = c.call("PUT", "/bootstrap/acme", {"key": _read_file(args.key),
                                                   "account": account})
            _print(args, res, "saved")
        else:
            _print(args, c.call("GET", "/bootstrap/acme"))
    else:
        name = urllib.parse.quote(args.name or "", safe="")
        if a == "list":
            res = c.call("GET", "/bootstrap/certs")
            _print(args, res, "\n".join(res["certs"]) or "no certificates")
        elif not args.name:
            return _die(USAGE, "give the certificate's NAME")
        elif a == "set":
            if not args.cert or not args.key:
                return _die(USAGE, "give --cert FILE and --key FILE")
            _print(args, c.call("PUT", f"/bootstrap/certs/{name}",
                                {"cert": _read_file(args.cert), "key": _read_file(args.key)}),
                   "saved")
        elif a == "delete":
            _print(args, c.call("DELETE", f"/bootstrap/certs/{name}"), "deleted")
        else:
            res = c.call("GET", f"/bootstrap/certs/{name}")
            _print(args, res, f"{res['name']}: {res.get('subject') or '?'}, "
                              f"valid until {res.get('not_after') or '?'}")
    return OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piccoloctl", description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="control socket (default: $PICCOLO_RUN_DIR/ctl.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)

    def secret_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--password-file", metavar="F",
                        help="read secrets from F, one per line (else stdin or a prompt)")

    sub.add_parser("status")
    secret_opts(sub.add_parser("setup"))
    u = sub.add_parser("unlock")
    u.add_argument("--recovery", action="store_true", help="unlock with the recovery key")
    secret_opts(u)
    sub.add_parser("lock")
    secret_opts(sub.add_parser("reset-password", help="new password via the recovery key"))
    secret_opts(sub.add_parser("passwd", help="change the password"))
    rk = sub.add_parser("recovery-key")
    rk.add_argument("action", choices=["generate", "status"])
    rk.add_argument("--with-password", action="store_true",
                    help="authorise with the password (when locked)")
    secret_opts(rk)

    v = sub.add_parser("volume")
    vs = v.add_subparsers(dest="action", required=True)
    vs.add_parser("list")
    for name in ("show", "ensure", "attach", "detach", "role", "fsck"):
        sp = vs.add_parser(name)
        sp.add_argument("id")
        if name == "ensure":
            sp.add_argument("--class", dest="volume_class", default="application",
                            choices=["bootstrap", "control", "application"])
            sp.add_argument("--cluster-mode", default="stateful",
                            choices=["stateful", "stateless_read_only"])
            sp.add_argument("--follower-policy", default="read_only",
                            choices=["read_only", "detached"])
            sp.add_argument("--pool", metavar="POOL",
                            help="put a new volume on this storage pool (id or label)")
        elif name == "attach":
            sp.add_argument("--role", default="leader", choices=["leader", "follower"])
        elif name == "detach":
            sp.add_argument("--lazy", action="store_true", help="detach even if busy")
        elif name == "role":
            sp.add_argument("role", choices=["leader", "follower"])

    dv = sub.add_parser("device", help="storage pools on disks: init, list, show, eject")
    dvs = dv.add_subparsers(dest="action", required=True)
    dvs.add_parser("list")
    di = dvs.add_parser("init", help="make a block device a pool (or adopt the pool on it)")
    di.add_argument("device", metavar="DEV", help="the block device, e.g. /dev/sdb")
    di.add_argument("--label", default="piccolo", help="the pool's name (1-12 of a-z0-9._-)")
    di.add_argument("--fs", default="ext4", choices=["ext4", "xfs", "btrfs"])
    di.add_argument("--yes", action="store_true",
                    help="erase the partition table or filesystem found on DEV")
    for name in ("show", "eject"):
        sp = dvs.add_parser(name)
        sp.add_argument("id", metavar="POOL", help="pool id, label, or device name")
        if name == "eject":
            sp.add_argument("--lazy", action="store_true",
                            help="eject even if files are open (they fail from then on)")

    e = sub.add_parser("events")
    e.add_argument("--follow", "-f", action="store_true")
    e.add_argument("--topic", action="append", help="only this topic (repeatable)")
    e.add_argument("--since", type=int, default=0, help="events after this sequence number")
    sub.add_parser("health")
    st = sub.add_parser("store", help="the control store")
    st.add_argument("action", choices=["status", "check", "audit"])
    st.add_argument("--since", type=int, default=0, help="audit records after this one")
    tp = sub.add_parser("tpm", help="the TPM-sealed bootstrap key")
    tp.add_argument("action", choices=["status", "enroll", "reseal", "remove", "unseal"])
    tp.add_argument("--pcrs", help="PCRs of the policy, e.g. 7 (default) or 0,7")
    tp.add_argument("--pin", action="store_true", help="protect the sealed key with a PIN")
    secret_opts(tp)
    bs = sub.add_parser("bootstrap", help="pre-unlock assets on the bootstrap volume")
    bss = bs.add_subparsers(dest="what", required=True)
    r = bss.add_parser("remote", help="the remote configuration")
    r.add_argument("action", choices=["show", "set"])
    r.add_argument("file", nargs="?", help="JSON file (set)")
    ac = bss.add_parser("acme", help="the ACME account")
    ac.add_argument("action", choices=["show", "set"])
    ac.add_argument("--key", help="PEM private key file (set)")
    ac.add_argument("--account", help="account JSON file (set)")
    ce = bss.add_parser("certs", help="the portal's TLS certificates")
    ce.add_argument("action", choices=["list", "show", "set", "delete"])
    ce.add_argument("name", nargs="?")
    ce.add_argument("--cert", help="PEM certificate chain file (set)")
    ce.add_argument("--key", help="PEM private key file (set)")
    ex = sub.add_parser("export", help="back the device up into a bundle, or list backups")
    ex.add_argument("kind", choices=["control", "full", "list"])
    ex.add_argument("--volume", action="append", metavar="ID",
                    help="only this application volume (full; repeatable)")
    ex.add_argument("--output", metavar="FILE|-",
                    help="where to write the bundle (default: exports/<kind>/ in the state "
                         "dir; - for stdout)")
    im = sub.add_parser("import", help="stage a bundle (then unlock with its secret), or "
                                       "`import status` / `import abort`")
    im.add_argument("target", metavar="FILE|-|status|abort",
                    help="a bundle (- : read it from stdin), or status / abort")
    im.add_argument("--keyset", metavar="FILE",
                    help="the keyset of an envelope from the older daemon (it has none)")
    im.add_argument("--force", action="store_true",
                    help="replace this device's state (kept aside until the import unlocks)")
    cl = sub.add_parser("cluster", help="cluster leadership (etcd)")
    cl.add_argument("action", choices=["status"])
    ld = sub.add_parser("leadership")
    ld.add_argument("resource", nargs="?")
    ld.add_argument("role", nargs="?", choices=["leader", "follower"])
    return p


COMMANDS = {"status": cmd_status, "setup": cmd_setup, "unlock": cmd_unlock,
            "lock": cmd_lock, "reset-password": cmd_reset_password, "passwd": cmd_passwd,
            "recovery-key": cmd_recovery_key, "volume": cmd_volume, "events": cmd_events,
            "health": cmd_health, "store": cmd_store, "leadership": cmd_leadership,
            "tpm": cmd_tpm, "bootstrap": cmd_bootstrap, "cluster": cmd_cluster,
            "export": cmd_export, "import": cmd_import, "device": cmd_device}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sock = args.socket or str(Paths.resolve().socket)
    client = Client(sock)
    try:
        return COMMANDS[args.command](client, args)
    except ApiError as exc:
        if args.json:
            print(json.dumps(exc.body, sort_keys=True))
        exit_code = _BUNDLE_EXIT.get(exc.code) or (
            BAD_BUNDLE if exc.code.startswith("bundle_") else _STATUS_EXIT.get(exc.status, FAILED))
        return _die(exit_code, f"{exc} ({exc.code or exc.status})")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        return _die(UNREACHABLE, f"cannot reach the daemon at {sock}: {exc.strerror}")
    except OSError as exc:
        return _die(FAILED, str(exc))


if __name__ == "__main__":
    raise SystemExit(main())

