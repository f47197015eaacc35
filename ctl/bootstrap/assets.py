"""Pre-unlock assets on the bootstrap volume: the remote configuration, the ACME account and
the portal's TLS material, so that remote access and HTTPS work before the control store
unlocks.

Layout (the original daemon's, inside the bootstrap mount):

    remote/config.json              the remote configuration (mirror of the store's)
    remote/acme/account.key         the ACME account key (PEM)
    remote/acme/account.json        the ACME account record
    remote/certs/<name>.crt|.key    a certificate chain and its private key (PEM)

Usable whenever the bootstrap volume is mounted, locked or not; `Locked` otherwise. Every
write is atomic with mode 0600. The remote configuration follows the mirror rules: while
mounted the file wins; a corrupt file is replaced from the store when the store can be read;
a save goes to the store first when the store is open (and is not written to the file if
the store refuses it); a save while locked reaches the store at the next unlock (`sync`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ctl.bootstrap import pem
from ctl.errors import CtlError, Failed, InvalidInput, Locked, NotFound
from ctl.events import EventBus
from ctl.paths import BOOTSTRAP, Paths
from ctl.store.repos import RemoteRepo
from ctl.store.store import ControlStore
from ctl.volumes import mountinfo
from ctl.volumes.manager import VolumeManager
from piccolofs.atomic import fsync_dir, write_atomic

log = logging.getLogger("ctl.bootstrap")

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_PEM = pem.MAX_PEM
MAX_JSON = 256 * 1024
IO_TIMEOUT = 10.0
T = TypeVar("T")


def _key(text: Any, what: str) -> tuple[bytes, PrivateKeyTypes]:
    got = pem.load_private_key(text) if isinstance(text, str) else "must be PEM text"
    if isinstance(got, str):
        raise InvalidInput(f"{what}: {got}")
    return got


class Assets:
    def __init__(self, paths: Paths, volumes: VolumeManager, store: ControlStore,
                 bus: EventBus) -> None:
        self.paths = paths
        self.volumes = volumes
        self.store = store
        self.remote = RemoteRepo(store)
        self.bus = bus
        self._lock = trio.Lock()

    # -- where ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.paths.mount(BOOTSTRAP) / "remote"

    def _require_mounted(self) -> Path:
        if not self.volumes.mounted(BOOTSTRAP):
            raise Locked("the bootstrap volume is not mounted: unlock (or enrol the TPM)")
        return self.root

    def _store_open(self) -> bool:
        return not self.store.locked and not self.store.read_only and self.store.is_open

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """File work on the bootstrap mount, in a thread, bounded: a mount process that
        stopped answering must not hold the caller (or the assets' lock) for ever."""
        try:
            with trio.fail_after(IO_TIMEOUT):
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise Failed("the bootstrap volume does not answer") from None

    def _write(self, path: Path, data: bytes) -> None:
        # Checked again right before writing, through mountinfo only: never onto the bare
        # mountpoint, whatever happened since the request was admitted.
        if not mountinfo.is_mounted(self.paths.mount(BOOTSTRAP)):
            raise Locked("the bootstrap volume is not mounted")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, data, 0o600)

    @staticmethod
    def _read(path: Path, limit: int) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise InvalidInput(f"{path.name} is implausibly large")
        return data

    # -- remote configuration ------------------------------------------------------------
    def _file_config(self) -> dict[str, Any] | None:
        """The file's configuration; None when absent; CorruptAsset when unusable."""
        data = self._read(self._require_mounted() / "config.json", MAX_JSON)
        if data is None:
            return None
        try:
            return RemoteRepo.validate(json.loads(data))
        except (ValueError, CtlError) as exc:
            raise CorruptAsset(str(exc)) from None

    async def remote_get(self) -> dict[str, Any]:
        async with self._lock:
            root = self._require_mounted()
            try:
                config = await self._io(self._file_config)
            except CorruptAsset as exc:
                log.warning("bootstrap remote/config.json is corrupt (%s); replacing it", exc)
                config = None
                await self._io(_unlink, root / "config.json")
            if config is not None:
                return config
            if self.store.locked or not self.store.is_open:
                return {}
            try:
                config = await self.remote.get()
            except NotFound:
                return {}
            await self._io(self._write_config, config)
            return config

    def _write_config(self, config: dict[str, Any]) -> None:
        self._write(self._require_mounted() / "config.json",
                    (json.dumps(config, indent=2) + "\n").encode())

    async def remote_put(self, config: Any) -> bool:
        """Save; returns True when the store has it too (False: it follows at unlock)."""
        clean = RemoteRepo.validate(config)
        async with self._lock:
            self._require_mounted()
            stored = self._store_open()
            if stored:
                await self.remote.save(clean)  # store first: refused there, no file either
            await self._io(self._write_config, clean)
            return stored

    async def sync(self) -> None:
        """At unlock: a configuration saved while locked reaches the store; a missing or
        corrupt file is seeded from the store."""
        if not self.volumes.mounted(BOOTSTRAP) or not self._store_open():
            return
        async with self._lock:
            try:
                config = await self._io(self._file_config)
            except CorruptAsset:
                config = None
            try:
                stored: dict[str, Any] | None = await self.remote.get()
            except NotFound:
                stored = None
            if config is not None and config != stored:
                await self.remote.save(config)
                log.info("remote configuration saved while locked is now in the store")
            elif config is None and stored is not None:
                await self._io(self._write_config, stored)

    # -- ACME account --------------------------------------------------------------------
    async def acme_get(self) -> dict[str, Any]:
        root = self._require_mounted() / "acme"
        key, account = await self._io(
            lambda: (self._read(root / "account.key", MAX_PEM),
                     self._read(root / "account.json", MAX_JSON)))
        if key is None and account is None:
            raise NotFound("no ACME account saved")
        try:
            record = json.loads(account) if account is not None else None
        except ValueError:
            record = None
        return {"key": key.decode() if key else None, "account": record}

    async def acme_put(self, key: Any, account: Any) -> None:
        data, _ = _key(key, "key")
        if not isinstance(account, dict):
            raise InvalidInput("account must be a JSON object")
        record = (json.dumps(account, indent=2, sort_keys=True) + "\n").encode()
        if len(record) > MAX_JSON:
            raise InvalidInput(f"account must be at most {MAX_JSON} bytes as JSON")
        root = self._require_mounted() / "acme"
        async with self._lock:
            await self._io(self._write, root / "account.key", data)
            await self._io(self._write, root / "account.json", record)

    # -- TLS material --------------------------------------------------------------------
    def _certs_dir(self) -> Path:
        return self._require_mounted() / "certs"

    async def certs_list(self) -> list[str]:
        d = self._certs_dir()
        try:
            names = await self._io(os.listdir, d)
        except FileNotFoundError:
            return []
        return sorted({n.rsplit(".", 1)[0] for n in names
                       if n.endswith((".crt", ".key", ".pem")) and NAME.fullmatch(n[:-4])})

    async def cert_get(self, name: str) -> dict[str, Any]:
        return await self._io(self._cert, self._certs_dir(), name)

    def _cert(self, d: Path, name: str) -> dict[str, Any]:
        crt = self._read(d / f"{name}.crt", MAX_PEM) or self._read(d / f"{name}.pem", MAX_PEM)
        key = self._read(d / f"{name}.key", MAX_PEM)
        if crt is None and key is None:
            raise NotFound(f"no certificate {name!r}")
        out: dict[str, Any] = {"name": name, "cert": crt.decode() if crt else None,
                               "key": key.decode() if key else None, "subject": None}
        if crt is not None:
            try:
                leaf = x509.load_pem_x509_certificates(crt)[0]
                out["subject"] = leaf.subject.rfc4514_string()
                out["not_after"] = leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z")
            except ValueError:
                pass
        return out

    async def cert_put(self, name: str, cert: Any, key: Any) -> None:
        """A chain and its key, checked to belong together before either is written."""
        chain = pem.load_certificate_chain(cert) if isinstance(cert, str) else \
            "must be PEM text"
        if isinstance(chain, str):
            raise InvalidInput(f"cert: {chain}")
        key_data, private = _key(key, "key")
        if pem.public_der(private) != pem.public_der(chain[1][0]):
            raise InvalidInput("the key does not belong to the certificate")
        d = self._certs_dir()
        async with self._lock:
            await self._io(self._write, d / f"{name}.key", key_data)
            await self._io(self._write, d / f"{name}.crt", chain[0])

    async def cert_delete(self, name: str) -> None:
        d = self._certs_dir()
        found = False
        async with self._lock:
            for ext in (".crt", ".key", ".pem"):
                found |= await self._io(_unlink, d / f"{name}{ext}")
        if not found:
            raise NotFound(f"no certificate {name!r}")


class CorruptAsset(Exception):
    pass


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
