"""Unlock and lock as all-or-nothing transitions, in the order the architecture fixes.

    unlock: SDEK in memory -> bootstrap (leader) -> control (leader RW / follower RO)
            -> control store opened -> application volumes whose intent is mounted
            -> lock_state_changed{false}
    lock:   control store closed (TRUNCATE checkpoint) -> detach application volumes and
            control (intent kept) -> zero SDEK -> lock_state_changed{true}; bootstrap stays

A failure while bringing up the core volumes rolls back what this attempt mounted, forgets
the SDEK and reports one error: there is no half-unlocked state. Application volumes that
fail to come back are journaled (needs_repair) without failing the unlock.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ctl import roles
from ctl.bootstrap.assets import Assets
from ctl.bootstrap.tpm import BootstrapTpm
from ctl.errors import CtlError, Failed, Locked, NotInitialized
from ctl.events import EventBus
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, CONTROL
from ctl.store.store import ControlStore
from ctl.volumes.manager import VolumeManager

log = logging.getLogger("ctl.controller")

CORE = {BOOTSTRAP: "bootstrap", CONTROL: "control"}


class Controller:
    def __init__(self, keys: KeyManager, volumes: VolumeManager, bus: EventBus,
                 registry: roles.LeadershipRegistry, store: ControlStore,
                 tpm: BootstrapTpm | None = None, assets: Assets | None = None) -> None:
        self.keys = keys
        self.volumes = volumes
        self.store = store
        self.tpm = tpm
        self.assets = assets
        self.bus = bus
        self.registry = registry
        self._transition = trio.Lock()

    def status(self) -> dict[str, Any]:
        """Key state, and how the bootstrap volume came up ("tpm", "unlock" or None)."""
        came_up = self.tpm.came_up if self.tpm else None
        if not self.volumes.mounted(BOOTSTRAP):
            came_up = None
        return {**self.keys.status(), "bootstrap": came_up}

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
        async with self._transition:
            if not self.keys.initialized:
                raise NotInitialized("not initialized: run setup first")
            if not self.keys.locked:
                # Already unlocked: still a check of the secret, never a free "ok".
                await self.keys.verify(password, recovery_key, client)
                return
            if recovery_key is not None:
                await self.keys.unlock_with_recovery(recovery_key, client)
            else:
                await self.keys.unlock(password or b"", client)
            attached: list[str] = []
            try:
                await self._bring_up_core(attached)
                await self.store.open()
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self.store.close()
                await self._roll_back(attached)
                self.keys.lock()
                if isinstance(exc, CtlError):
                    raise Failed(f"unlock failed, rolled back: {exc.message}") from None
                raise
            problems = await self.volumes.reconcile(
                only={v["id"] for v in self.volumes.list()} - set(CORE))
            if problems:
                log.warning("unlocked; volumes needing repair: %s", ", ".join(problems))
            self.bus.publish("lock_state_changed", {"locked": False})
        # Outside the transition: these touch the bootstrap mount, which must never be able
        # to hold lock or shutdown hostage.
        await self._after_unlock(client)

    async def _after_unlock(self, client: str) -> None:
        """Steps that need the SDEK and the store but must never undo an unlock."""
        if self.tpm is not None:
            await self.tpm.after_unlock(client)
        if self.assets is not None:
            try:
                await self.assets.sync()
            except CtlError as exc:
                log.warning("remote configuration not synchronised: %s", exc.message)

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

    async def lock(self) -> None:
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
        async with self._transition:
            with trio.CancelScope(shield=True):
                await self.store.close()
                await self.volumes.detach_all(lazy=True)
                if not self.keys.locked:
                    self.keys.lock()
                    self.bus.publish("lock_state_changed", {"locked": True})
