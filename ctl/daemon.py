"""`piccolo-ctld`: the control daemon (foreground; systemd runs it as Type=notify).

Start-up: take the state-dir lock, reconcile every journal with reality, publish the locked
state, start serving the socket, then tell systemd READY=1. SIGTERM/SIGINT: detach every
volume (the journal keeps their intent for the next start), forget the SDEK, exit 0.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ctl.api.bootstrap import bootstrap_routes
from ctl.api.bundles import bundle_routes
from ctl.api.cluster import cluster_routes
from ctl.api.devices import device_routes
from ctl.api.routes import Api
from ctl.api.server import ApiServer
from ctl.bootstrap.assets import Assets
from ctl.bootstrap.tpm import BootstrapTpm
from ctl.bundles.export import Exporter
from ctl.bundles.imports import Importer
from ctl.bundles.jobs import Jobs
from ctl.cluster.registry import EtcdRegistry
from ctl.controller import Controller
from ctl.devices.manager import DeviceManager
from ctl.events import EventBus
from ctl.keys.keyset import KdfParams
from ctl.keys.manager import KeyManager
from ctl.paths import Paths
from ctl.roles import LocalRegistry
from ctl.store.repos import AuditRepo
from ctl.store.store import ControlStore
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


@dataclass(frozen=True)
class Cluster:
    node_id: str
    endpoints: list[str]
    lease_ttl: float


def take_lock(paths: Paths) -> int:
    fd = os.open(paths.state / ".ctld.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another piccolo-ctld serves {paths.state}") from None
    return fd


async def persist_audit(bus: EventBus, store: ControlStore) -> None:
    """Audit events become rows of the append-only audit table. Events that happen while
    the store cannot take them (locked, follower) wait in memory and are written at the
    next unlock; deferred ones wait for the next row that is not."""
    audit = AuditRepo(store)
    pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=1024)
    async for event in bus.subscribe(["audit", "lock_state_changed"], capacity=1024):
        if event.topic == "audit":
            pending.append(dict(event.data))
        elif event.topic == "gap":
            log.warning("%d audit events were dropped before they could be stored",
                        event.data.get("missed", 0))
        # A deferred row (an export's: writing it at once would make the next export of
        # an unchanged device differ) is stored with the next row that is not.
        if all(item.get("deferred") for item in pending):
            continue
        while pending and not store.locked and not store.read_only:
            item = pending[0]
            data = {k: v for k, v in item.items() if k not in ("kind", "client", "deferred")}
            try:
                await audit.append(str(item.get("kind", "unknown")),
                                   str(item.get("client", "")), data)
            except Exception as exc:
                log.warning("could not persist audit event %s: %s", item.get("kind"), exc)
                break
            pending.popleft()


async def serve(paths: Paths, kdf: KdfParams, scrypt_log_n: int, check_interval: float,
                tpm_tcti: str | None = None, cluster: Cluster | None = None,
                health_interval: float = 300.0) -> None:
    bus = EventBus()
    registry: LocalRegistry | EtcdRegistry = LocalRegistry(bus)
    if cluster is not None:
        registry = EtcdRegistry(bus, cluster.node_id, cluster.endpoints, cluster.lease_ttl)
    keys = KeyManager(paths, kdf)
    jobs = Jobs(bus)
    importer = Importer(paths, keys, bus, jobs)
    importer.recover()  # before any journal is read: a half-done swap is rolled back
    volumes = VolumeManager(paths, keys, bus, registry, scrypt_log_n=scrypt_log_n)
    store = ControlStore(paths.control_db, bus, registry, check_interval=check_interval)
    tpm = BootstrapTpm(paths, keys, volumes, bus, tpm_tcti)
    assets = Assets(paths, volumes, store, bus)
    controller = Controller(keys, volumes, bus, registry, store, tpm, assets, importer)
    exporter = Exporter(paths, keys, volumes, store, bus, jobs, tpm.enrolment,
                        importer.pending)
    devices = DeviceManager(paths, volumes, bus, health_interval=health_interval)
    api = Api(controller, volumes, bus, registry, store, devices)
    api.add_routes(bootstrap_routes(controller, tpm, assets, bus))
    api.add_routes(bundle_routes(controller, exporter, importer, jobs))
    api.add_routes(cluster_routes(registry))
    api.add_routes(device_routes(devices, bus))
    server = ApiServer(paths.socket, api.dispatch, uploads=api.accepts_upload)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if isinstance(registry, EtcdRegistry):
                await nursery.start(registry.run)
            await nursery.start(volumes.run)
            await nursery.start(store.run)
            await nursery.start(exporter.run)
            await nursery.start(importer.run)
            # Mount processes an earlier daemon left are ended before their pools are
            # unmounted and checked: then coldplug mounts pools before any unlock.
            await volumes.sweep()
            await nursery.start(devices.run)
            nursery.start_soon(persist_audit, bus, store)
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
    p.add_argument("--store-check-interval", type=float, default=300.0, metavar="S",
                   help="seconds between quick_checks of the control store")
    p.add_argument("--tpm-tcti", metavar="TCTI",
                   help="the TPM for the bootstrap key (default: $PICCOLO_TPM_TCTI, else "
                        "device:/dev/tpmrm0)")
    p.add_argument("--node-id", help="this node's id in a cluster (default: $PICCOLO_NODE_ID)")
    p.add_argument("--etcd", metavar="URL[,URL...]",
                   help="etcd endpoints: leadership of stateful volumes comes from etcd "
                        "(default: $PICCOLO_ETCD; none: a single node)")
    p.add_argument("--lease-ttl", type=float, default=5.0, metavar="S",
                   help="leadership lease TTL in seconds (cluster)")
    p.add_argument("--health-interval", type=float, default=300.0, metavar="S",
                   help="seconds between health readings of the storage pools' disks")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="piccolo-ctld %(levelname)s %(name)s: %(message)s")
    paths = Paths.resolve(args.state_dir, args.run_dir)
    etcd = args.etcd or os.environ.get("PICCOLO_ETCD")
    cluster = None
    if etcd:
        node_id = args.node_id or os.environ.get("PICCOLO_NODE_ID") or socket.gethostname()
        cluster = Cluster(node_id, [e.strip() for e in etcd.split(",") if e.strip()],
                          args.lease_ttl)
    os.umask(0o077)
    paths.ensure()
    try:
        lock_fd = take_lock(paths)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    try:
        trio.run(serve, paths, KdfParams(args.kdf_time, args.kdf_memory, args.kdf_threads),
                 args.volume_scryptn, args.store_check_interval, args.tpm_tcti, cluster,
                 args.health_interval)
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
