"""Unlock and lock as all-or-nothing transitions, in the order the architecture fixes.

    unlock: SDEK in memory -> bootstrap (leader) -> control (leader RW / follower RO)
            -> control store opened -> application volumes whose intent is mounted
            -> lock_state_changed{false}
    lock:   control store closed (TRUNCATE checkpoint) -> detach application volumes and
            control (intent kept) -> zero SDEK -> lock_state_changed{true}; bootstrap stays

A failure while bringing up the core volumes rolls back what this attempt mounted, forgets
the SDEK and reports one error: there is no half-unlocked state. Application volumes that
fail to come back are journaled (needs_repair) without failing the unlock.

With an import pending (ctl.bundles.imports), unlock opens the *imported* keyset, verifies
the bundle under it, takes the live state down, swaps the imported one in and brings it up;
if it does not come up the previous state is swapped back. The rebuild hooks then run and
their outcome goes into `import_result`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ctl import roles
from ctl.bootstrap.assets import Assets
from ctl.bootstrap.tpm import BootstrapTpm
from ctl.bundles.imports import BundleRejected, Importer
from ctl.bundles.jobs import crash_point
from ctl.errors import Conflict, CtlError, Failed, Locked, NotFound, NotInitialized
from ctl.events import EventBus
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, CONTROL
from ctl.store.store import ControlStore
from ctl.volumes.manager import VolumeManager

log = logging.getLogger("ctl.controller")


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, CtlError) else str(exc) or type(exc).__name__

CORE = {BOOTSTRAP: "bootstrap", CONTROL: "control"}


class Controller:
    def __init__(self, keys: KeyManager, volumes: VolumeManager, bus: EventBus,
                 registry: roles.LeadershipRegistry, store: ControlStore,
                 tpm: BootstrapTpm | None = None, assets: Assets | None = None,
                 importer: Importer | None = None) -> None:
        self.keys = keys
        self.volumes = volumes
        self.store = store
        self.tpm = tpm
        self.assets = assets
        self.bus = bus
        self.registry = registry
        self.importer = importer
        self._transition = trio.Lock()
        if importer is not None:
            importer.on_staged.append(self._import_staged)

    def status(self) -> dict[str, Any]:
        """Key state, and how the bootstrap volume came up ("tpm", "unlock" or None)."""
        came_up = self.tpm.came_up if self.tpm else None
        if not self.volumes.mounted(BOOTSTRAP):
            came_up = None
        pending = self.importer.status() if self.importer else None
        return {**self.keys.status(), "bootstrap": came_up, "import": pending}

    def require_unlocked(self) -> None:
        if not self.keys.initialized:
            raise NotInitialized("not initialized: run setup first")
        if self.keys.locked:
            raise Locked("locked: unlock first")

    async def start(self) -> None:
        """Start-up: clear what an earlier daemon left mounted (without ever waiting on a
        dead mount), reconcile journals with reality, then publish the (locked) state."""
        await self.volumes.sweep()
        await self.volumes.reconcile()
        if self.tpm is not None and self.keys.initialized:
            await self.tpm.bring_up()  # bootstrap before any password, when enrolled
        self.bus.publish("lock_state_changed", {"locked": True})

    async def unlock(self, *, password: bytes | None = None, recovery_key: str | None = None,
                     client: str) -> None:
        imported = None
        async with self._transition:
            pending = self.importer.pending() if self.importer else None
            if pending is not None:
                imported = await self._unlock_import(pending, password, recovery_key, client)
            elif not await self._unlock_locked(password, recovery_key, client):
                return  # it was unlocked already: the secret was checked, nothing else
        # Outside the transition: these touch the bootstrap mount, which must never be able
        # to hold lock or shutdown hostage.
        await self._after_unlock(client)
        if imported is not None:
            await self._finish_import(imported, client)

    async def _unlock_locked(self, password: bytes | None, recovery_key: str | None,
                             client: str) -> bool:
        """The plain unlock (no import pending), under the transition lock; False when the
        device was unlocked already."""
        if not self.keys.initialized:
            raise NotInitialized("not initialized: run setup first")
        if not self.keys.locked:
            # Already unlocked: still a check of the secret, never a free "ok".
            await self.keys.verify(password, recovery_key, client)
            return False
        if recovery_key is not None:
            await self.keys.unlock_with_recovery(recovery_key, client)
        else:
            await self.keys.unlock(password or b"", client)
        try:
            await self._come_up()
        except CtlError as exc:
            raise Failed(f"unlock failed, rolled back: {exc.message}") from None
        problems = await self.volumes.reconcile(
            only={v["id"] for v in self.volumes.list()} - set(CORE))
        if problems:
            log.warning("unlocked; volumes needing repair: %s", ", ".join(problems))
        self.bus.publish("lock_state_changed", {"locked": False})
        return True

    async def _after_unlock(self, client: str) -> None:
        """Steps that need the SDEK and the store but must never undo an unlock."""
        if self.tpm is not None:
            await self.tpm.after_unlock(client)
        if self.assets is not None:
            try:
                await self.assets.sync()
            except CtlError as exc:
                log.warning("remote configuration not synchronised: %s", exc.message)

    # -- imports ---------------------------------------------------------------------------
    async def _import_staged(self, pending: dict[str, Any]) -> None:
        """A bundle is staged over a device in use: its control store is read-only from
        now until the imported state unlocks or the import is aborted."""
        async with self._transition:
            self.store.frozen = (f"import {pending['id']} is staged: unlock with the bundle's "
                                 "password or recovery key, or abort the import")
            if not self.keys.locked and self.volumes.is_attached(CONTROL):
                try:
                    await self.volumes.attach(CONTROL, roles.FOLLOWER)  # flips it live
                except CtlError as exc:
                    log.warning("import staged; control not turned read-only: %s", exc.message)

    async def _unlock_import(self, pending: dict[str, Any], password: bytes | None,
                             recovery_key: str | None, client: str) -> dict[str, Any]:
        assert self.importer is not None
        sdek = await self.importer.open_staged(pending, password, recovery_key, client)
        adopted = False
        try:
            if pending["phase"] == "staged":
                try:
                    await self.importer.verify(pending, bytes(sdek))
                except BundleRejected as exc:
                    await self.importer.discard(pending, "failed", exc.message, client)
                    await self._thaw()
                    raise
                if self.importer.jobs.running is not None:
                    raise Conflict(f"an {self.importer.jobs.running.type} is running: unlock "
                                   "the import once it has ended")
                await self._take_down()
                still = [v for v in self.volumes.attached()]
                if still:
                    await self._thaw()
                    raise Failed(f"volumes still attached ({', '.join(still)}): nothing was "
                                 "swapped; the import stays staged")
                try:
                    pending = await self.importer.swap(pending)
                    crash_point("import.swapped")
                    self.volumes.reload()
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self.importer.unswap(pending)
                        self.volumes.reload()
                    raise
            self.keys.adopt(sdek)
            adopted = True
            try:
                await self._come_up()
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self.volumes.detach_all(lazy=True)
                    await self.importer.unswap(pending)
                    self.volumes.reload()
                    self.bus.publish("import_result", {"id": pending["id"], "status": "failed",
                                                       "reason": _message(exc)})
                if isinstance(exc, CtlError):
                    raise Failed(f"the imported state did not come up ({exc.message}); the "
                                 "previous state is back in place, locked, and the import "
                                 "stays staged: unlock again, or `piccoloctl import abort` "
                                 "to drop it") from None
                raise
            await self.volumes.reconcile(only={v["id"] for v in self.volumes.list()} - set(CORE))
            self.bus.publish("lock_state_changed", {"locked": False})
            return pending
        finally:
            if not adopted:
                sdek[:] = bytes(len(sdek))

    async def _take_down(self) -> None:
        """Everything of the live state goes: store, volumes (bootstrap too), the SDEK."""
        with trio.CancelScope(shield=True):
            self.store.frozen = None
            await self.store.close()
            await self.volumes.detach_all(lazy=True)
            if not self.keys.locked:
                self.keys.lock()
                self.bus.publish("lock_state_changed", {"locked": True})

    async def _thaw(self) -> None:
        """The import is gone: the control store takes writes again."""
        self.store.frozen = None
        if (not self.keys.locked and self.volumes.is_attached(CONTROL)
                and self.registry.may_lead(CONTROL)):
            try:
                await self.volumes.attach(CONTROL, roles.LEADER)
            except CtlError as exc:
                log.warning("control not turned writable again: %s", exc.message)

    async def abort_import(self, client: str) -> dict[str, Any]:
        if self.importer is None:
            raise NotFound("no import pending")
        async with self._transition:
            pending = self.importer.pending()
            if pending is None:
                raise NotFound("no import pending")
            if pending["phase"] != "staged":
                await self._take_down()  # the imported state may be up: all of it goes
            await self.importer.discard(pending, "aborted", "aborted by the operator", client)
            if pending["phase"] != "staged":
                self.volumes.reload()
            await self._thaw()
        return {"id": pending["id"], "status": "aborted"}

    async def _finish_import(self, pending: dict[str, Any], client: str) -> None:
        """The rebuild hooks, then the previous state is forgotten."""
        assert self.importer is not None
        crash_point("import.up")
        hooks = [await self._hook_assets(), await self._hook_tpm(pending)]
        for hook in hooks:
            if hook["status"] == "failed":
                log.warning("import rebuild hook %s failed: %s", hook["name"], hook["detail"])
        async with self._transition:
            current = self.importer.pending()
            if (current is None or current["id"] != pending["id"]
                    or current["phase"] != "swapped" or self.keys.locked):
                return  # aborted or locked meanwhile: not ours to complete any more
            await self.importer.finish(pending, hooks, client)

    async def _hook_assets(self) -> dict[str, Any]:
        """The pre-unlock assets, rewritten onto this device's bootstrap volume under its
        rules (the remote config mirrored with the store, every asset re-read)."""
        name = "assets"
        if self.assets is None or not self.volumes.mounted(BOOTSTRAP):
            return {"name": name, "status": "skipped", "detail": "bootstrap is not mounted"}
        try:
            await self.assets.sync()
            certs = await self.assets.certs_list()
            try:
                await self.assets.acme_get()
                acme = "present"
            except NotFound:
                acme = "absent"
        except CtlError as exc:
            return {"name": name, "status": "failed", "detail": exc.message}
        return {"name": name, "status": "ok",
                "detail": f"remote config mirrored; {len(certs)} certificate(s); ACME account "
                          f"{acme}"}

    async def _hook_tpm(self, pending: dict[str, Any]) -> dict[str, Any]:
        """Seal the (imported) bootstrap key to this TPM, with the PCR selection of the
        enrolment the replaced state had, else the one the bundle's source had."""
        assert self.importer is not None
        name = "tpm"
        enrolment = self.importer.previous_tpm(pending) or pending.get("tpm")
        if not enrolment:
            return {"name": name, "status": "skipped", "detail": "no TPM enrolment to carry"}
        if self.tpm is None:
            return {"name": name, "status": "skipped", "detail": "no TPM configured"}
        if enrolment.get("pin"):
            return {"name": name, "status": "skipped",
                    "detail": "the enrolment had a PIN: run `piccoloctl tpm enroll --pin`"}
        pcrs = [int(p) for p in enrolment.get("pcrs") or [7]]
        try:
            await self.tpm.enroll(pcrs)
        except CtlError as exc:
            return {"name": name, "status": "failed", "detail": exc.message}
        return {"name": name, "status": "ok",
                "detail": f"bootstrap key sealed to this TPM (PCRs {pcrs})"}

    async def _come_up(self) -> None:
        """Core volumes, then the store, with the SDEK held; all or nothing: on failure
        what this attempt mounted is rolled back and the SDEK forgotten."""
        attached: list[str] = []
        try:
            await self._bring_up_core(attached)
            await self.store.open()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.store.close()
                await self._roll_back(attached)
            self.keys.lock()
            raise

    async def _bring_up_core(self, attached: list[str]) -> None:
        for vid, cls in CORE.items():
            await self.volumes.ensure(vid, cls)
        if not self.volumes.is_attached(BOOTSTRAP):
            await self.volumes.attach(BOOTSTRAP, roles.LEADER)
            attached.append(BOOTSTRAP)
        role = roles.LEADER if self.registry.may_lead(CONTROL) else roles.FOLLOWER
        was = self.volumes.is_attached(CONTROL)
        await self.volumes.attach(CONTROL, role)
        if not was:
            attached.append(CONTROL)

    async def _roll_back(self, attached: list[str]) -> None:
        with trio.CancelScope(shield=True):
            for vid in reversed(attached):
                try:
                    await self.volumes.detach(vid, lazy=True, keep_intent=True)
                except Exception as exc:
                    log.error("rollback: detaching %s failed: %s", vid, exc)

    def _cancel_job(self, reason: str, *types: str) -> None:
        jobs = self.importer.jobs if self.importer else None
        if jobs is not None and jobs.running is not None and jobs.running.type in types:
            jobs.cancel(reason)

    async def lock(self) -> None:
        # An export signs with the SDEK and holds each volume while copying it: it stops
        # (within one chunk) rather than hold the key in memory past a lock.
        self._cancel_job("the device is locking", "export")
        async with self._transition:
            if not self.keys.initialized:
                raise NotInitialized("not initialized")
            if self.keys.locked:
                return
            with trio.CancelScope(shield=True):
                await self.store.close()
                await self.volumes.detach_all(keep=frozenset({BOOTSTRAP}), lazy=True)
                self.keys.lock()
            self.bus.publish("lock_state_changed", {"locked": True})

    async def shutdown(self) -> None:
        """SIGTERM: detach everything (intent kept for the next start), forget keys."""
        self._cancel_job("the daemon is stopping", "export", "import")
        async with self._transition:
            with trio.CancelScope(shield=True):
                await self.store.close()
                await self.volumes.detach_all(lazy=True)
                if not self.keys.locked:
                    self.keys.lock()
                    self.bus.publish("lock_state_changed", {"locked": True})
