"""`piccolo-ctld`: the control daemon (foreground; systemd runs it as Type=notify).

Start-up: take the state-dir lock, reconcile every journal with reality, publish the locked
state, start serving the socket, then tell systemd READY=1. SIGTERM/SIGINT: detach every
volume (the journal keeps their intent for the next start), forget the SDEK, exit 0.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from ctl.api.routes import Api
from ctl.api.server import ApiServer
from ctl.controller import Controller
from ctl.events import EventBus
from ctl.keys.keyset import KdfParams
from ctl.keys.manager import KeyManager
from ctl.paths import Paths
from ctl.roles import LocalRegistry
from ctl.volumes.manager import VolumeManager

log = logging.getLogger("ctl.daemon")


def sd_notify(state: str) -> None:
    """Tell systemd about our state when it asked to be told (NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager (%s): %s", state, exc.strerror)


class AlreadyRunning(Exception):
    pass


def take_lock(paths: Paths) -> int:
    fd = os.open(paths.state / ".ctld.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another piccolo-ctld serves {paths.state}") from None
    return fd


async def serve(paths: Paths, kdf: KdfParams, scrypt_log_n: int) -> None:
    bus = EventBus()
    registry = LocalRegistry(bus)
    keys = KeyManager(paths, kdf)
    volumes = VolumeManager(paths, keys, bus, registry, scrypt_log_n=scrypt_log_n)
    controller = Controller(keys, volumes, bus, registry)
    api = Api(controller, volumes, bus, registry)
    server = ApiServer(paths.socket, api.dispatch)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(volumes.run)
            await controller.start()
            await nursery.start(server.serve)
            log.info("serving %s (state %s)", paths.socket, paths.state)
            sd_notify("READY=1")
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                break
            sd_notify("STOPPING=1")
            await controller.shutdown()
            bus.close()
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="piccolo-ctld", description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", help="state root (default: $PICCOLO_STATE_DIR)")
    p.add_argument("--run-dir", help="runtime dir holding ctl.sock (default: $PICCOLO_RUN_DIR)")
    p.add_argument("--kdf-time", type=int, default=3, help="Argon2id passes for new keysets")
    p.add_argument("--kdf-memory", type=int, default=512 * 1024,
                   help="Argon2id memory in KiB for new keysets (default 512 MiB)")
    p.add_argument("--kdf-threads", type=int, default=KdfParams().threads)
    p.add_argument("--volume-scryptn", type=int, default=16,
                   help="scrypt cost (log2 N) for new volumes' gocryptfs.conf")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="piccolo-ctld %(levelname)s %(name)s: %(message)s")
    paths = Paths.resolve(args.state_dir, args.run_dir)
    os.umask(0o077)
    paths.ensure()
    try:
        lock_fd = take_lock(paths)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    try:
        trio.run(serve, paths, KdfParams(args.kdf_time, args.kdf_memory, args.kdf_threads),
                 args.volume_scryptn)
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
