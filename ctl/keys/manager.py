"""The key manager: holds the SDEK while unlocked and guards every use of a secret.

- Each Argon2id derivation runs in a worker thread behind a limiter of one, so status
  requests are never blocked by a KDF in progress.
- Wrong secrets are answered with a clear error and a per-client back-off that decays over
  time (`Backoff`): the first few attempts are free, then the wait doubles.
- The SDEK lives in one bytearray that `lock()` overwrites with zeros; callers get copies.
- Every keyset write is atomic (temp, fsync, rename, directory fsync) with mode 0600.
"""

from __future__ import annotations

import logging
import math
import os
import time

import trio

from ctl.errors import (
    AlreadyInitialized,
    InvalidInput,
    Locked,
    NotInitialized,
    TooManyAttempts,
    Unauthorized,
)
from ctl.keys import recovery
from ctl.keys.keyset import SDEK_LEN, BadSecret, KdfParams, Keyset
from ctl.paths import Paths
from piccolofs.atomic import write_atomic

log = logging.getLogger("ctl.keys")


class Backoff:
    """Per-client failure score with exponential decay; waits grow past FREE failures."""

    FREE = 3
    HALF_LIFE = 300.0
    MAX_DELAY = 60.0

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    def _now(self) -> float:
        assert callable(self._clock)
        return float(self._clock())

    def _score(self, client: str) -> tuple[float, float]:
        score, last = self._state.get(client, (0.0, 0.0))
        return score * math.pow(0.5, (self._now() - last) / self.HALF_LIFE), last

    def wait_for(self, client: str) -> float:
        score, last = self._score(client)
        if score < self.FREE:
            return 0.0
        delay = min(2 ** (score - self.FREE), self.MAX_DELAY)
        return max(0.0, last + delay - self._now())

    def failure(self, client: str) -> None:
        score, _ = self._score(client)
        self._state[client] = (score + 1, self._now())

    def success(self, client: str) -> None:
        self._state.pop(client, None)


class KeyManager:
    def __init__(self, paths: Paths, kdf: KdfParams | None = None) -> None:
        self.paths = paths
        self.kdf = kdf or KdfParams()
        self._sdek: bytearray | None = None
        self._kdf_limiter = trio.CapacityLimiter(1)
        self.backoff = Backoff()

    # -- state ---------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.paths.keyset.exists()

    @property
    def locked(self) -> bool:
        return self._sdek is None

    def _load(self) -> Keyset:
        try:
            return Keyset.parse(self.paths.keyset.read_bytes())
        except FileNotFoundError:
            raise NotInitialized("not initialized") from None

    def status(self) -> dict[str, bool]:
        initialized = self.initialized
        present = False
        if initialized:
            try:
                present = self._load().has_recovery
            except Exception:
                present = False
        return {"initialized": initialized, "locked": initialized and self.locked,
                "recovery_key": present}

    def sdek(self) -> bytes:
        """A copy of the SDEK for one use; raises Locked."""
        if self._sdek is None:
            raise Locked("locked")
        return bytes(self._sdek)

    def _hold(self, sdek: bytearray) -> None:
        if self._sdek is not None:
            self._sdek[:] = bytes(len(self._sdek))
        self._sdek = sdek

    def lock(self) -> None:
        if self._sdek is not None:
            self._sdek[:] = bytes(len(self._sdek))
            self._sdek = None

    def _write(self, keyset: Keyset) -> None:
        self.paths.crypto_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.paths.keyset, keyset.to_json(), 0o600)

    async def _kdf(self, fn: object, *args: object) -> object:
        assert callable(fn)
        async with self._kdf_limiter:
            log.info("key derivation started (Argon2id, %d KiB)", self.kdf.memory)
            return await trio.to_thread.run_sync(fn, *args)

    def _gate(self, client: str) -> None:
        wait = self.backoff.wait_for(client)
        if wait > 0:
            raise TooManyAttempts(wait)

    # -- operations ----------------------------------------------------------------------
    async def setup(self, password: bytes) -> None:
        """Create the SDEK sealed under the password. Leaves the manager locked."""
        if not password:
            raise InvalidInput("password required")
        if self.initialized:
            raise AlreadyInitialized("already initialized")
        sdek = os.urandom(SDEK_LEN)
        keyset = await self._kdf(Keyset.create, sdek, password, self.kdf)
        assert isinstance(keyset, Keyset)
        if self.initialized:  # a concurrent setup won the race
            raise AlreadyInitialized("already initialized")
        self._write(keyset)

    async def _open(self, client: str, opener: object, *args: object) -> bytearray:
        self._gate(client)
        try:
            sdek = await self._kdf(opener, *args)
        except BadSecret:
            self.backoff.failure(client)
            raise Unauthorized("invalid password or recovery key") from None
        self.backoff.success(client)
        assert isinstance(sdek, bytearray)
        return sdek

    async def unlock(self, password: bytes, client: str) -> None:
        if not password:
            raise InvalidInput("password required")
        keyset = self._load()
        self._hold(await self._open(client, keyset.open_with_password, password))

    async def unlock_with_recovery(self, text: str, client: str) -> None:
        key = self._normalize(text)
        keyset = self._load()
        if not keyset.has_recovery:
            raise NotInitialized("recovery key not set")
        self._hold(await self._open(client, keyset.open_with_recovery, key))

    @staticmethod
    def _normalize(text: str) -> str:
        try:
            return recovery.normalize(text)
        except recovery.RecoveryKeyError as exc:
            raise InvalidInput(str(exc)) from None

    async def change_password(self, old: bytes, new: bytes, client: str) -> None:
        """Rewrap under `new`; the recovery key stays valid."""
        if not new:
            raise InvalidInput("new password required")
        keyset = self._load()
        sdek = await self._open(client, keyset.open_with_password, old)
        await self._rewrap(sdek, keyset.with_password, new)

    async def reset_password(self, recovery_text: str, new: bytes, client: str) -> None:
        """Set a new password using the recovery key (which stays valid). Lock state kept."""
        if not new:
            raise InvalidInput("new password required")
        key = self._normalize(recovery_text)
        keyset = self._load()
        if not keyset.has_recovery:
            raise NotInitialized("recovery key not set")
        sdek = await self._open(client, keyset.open_with_recovery, key)
        await self._rewrap(sdek, keyset.with_password, new)

    async def generate_recovery_key(self, password: bytes | None, client: str) -> str:
        """Create or rotate the recovery key; needs the manager unlocked or the password."""
        keyset = self._load()
        if self._sdek is not None:
            sdek = bytearray(self._sdek)
        elif password:
            sdek = await self._open(client, keyset.open_with_password, password)
        else:
            raise Locked("unlock required (or give the password)")
        words = recovery.generate()
        await self._rewrap(sdek, keyset.with_recovery, words)
        return words

    async def _rewrap(self, sdek: bytearray, wrap: object, secret: bytes | str) -> None:
        """Seal `sdek` anew with `wrap` (a KDF: off the event loop), zero it, write."""
        try:
            updated = await self._kdf(wrap, bytes(sdek), secret)
        finally:
            sdek[:] = bytes(len(sdek))
        assert isinstance(updated, Keyset)
        self._write(updated)
