"""The key manager: holds the SDEK while unlocked and guards every use of a secret.

- Each Argon2id derivation runs in a worker thread behind a limiter of one, so status
  requests are never blocked by a KDF in progress.
- Wrong secrets are answered with a clear error and a per-client back-off that decays over
  time (`Backoff`): one budget for every route that checks a secret, charged before the
  KDF starts; the first few attempts are free, then the wait doubles.
- A keyset that cannot be used is a StateCorrupt error naming the file and the fault; the
  file itself is never touched.
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
    StateCorrupt,
    TooManyAttempts,
    Unauthorized,
)
from ctl.keys import recovery
from ctl.keys.keyset import SDEK_LEN, BadSecret, KdfParams, Keyset, KeysetError
from ctl.paths import Paths
from piccolofs.atomic import write_atomic

log = logging.getLogger("ctl.keys")
MAX_KEYSET = 64 * 1024


class Backoff:
    """One budget of attempts at a secret per client, shared by every route that checks one.

    An attempt is charged when it is admitted, *before* its KDF starts, so concurrent
    guesses cannot all slip through while the first ones are still being checked; a right
    secret clears the client's score, an attempt that checked nothing is refunded. Scores
    decay with a half-life. Attempt n (counting the one being admitted) is free while
    n <= FREE; after that it is admitted only 2^(n - FREE) s (at most MAX_DELAY) after the
    previous one.
    """

    FREE = 3
    HALF_LIFE = 300.0
    MAX_DELAY = 60.0
    MAX_CLIENTS = 4096

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
        """Seconds until `client` may make its next attempt (0: now)."""
        score, last = self._score(client)
        n = score + 1
        if n <= self.FREE:
            return 0.0
        return max(0.0, last + min(2 ** (n - self.FREE), self.MAX_DELAY) - self._now())

    def admit(self, client: str) -> None:
        """Charge one attempt, or raise TooManyAttempts saying how long to wait."""
        wait = self.wait_for(client)
        if wait > 0:
            raise TooManyAttempts(wait)
        score, _ = self._score(client)
        if client not in self._state and len(self._state) >= self.MAX_CLIENTS:
            self._forget_settled()
        self._state[client] = (score + 1, self._now())

    def refund(self, client: str) -> None:
        score, last = self._score(client)
        self._state[client] = (max(0.0, score - 1), last)

    def success(self, client: str) -> None:
        self._state.pop(client, None)

    def _forget_settled(self) -> None:
        """Bound the table: drop the clients whose score has decayed the most."""
        ranked = sorted(self._state, key=lambda c: self._score(c)[0])
        for c in ranked[: len(ranked) // 2]:
            del self._state[c]


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
        path = self.paths.keyset
        try:
            if path.stat().st_size > MAX_KEYSET:
                raise StateCorrupt(path, "implausibly large for a keyset")
            return Keyset.parse(path.read_bytes())
        except FileNotFoundError:
            raise NotInitialized("not initialized") from None
        except OSError as exc:
            raise StateCorrupt(path, f"cannot be read: {exc.strerror}") from None
        except KeysetError as exc:
            raise StateCorrupt(path, str(exc)) from None

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
        """Every check of a secret goes through here, and so through the one budget."""
        self.backoff.admit(client)
        try:
            sdek = await self._kdf(opener, *args)
        except BadSecret:
            raise Unauthorized("invalid password or recovery key") from None
        except KeysetError as exc:
            self.backoff.refund(client)
            raise StateCorrupt(self.paths.keyset, str(exc)) from None
        except BaseException:
            self.backoff.refund(client)
            raise
        self.backoff.success(client)
        assert isinstance(sdek, bytearray)
        return sdek

    async def verify(self, password: bytes | None, recovery_text: str | None,
                     client: str) -> None:
        """Check a secret without changing anything (unlock while already unlocked)."""
        keyset = self._load()
        if recovery_text is not None:
            key = self._normalize(recovery_text)
            if not keyset.has_recovery:
                raise NotInitialized("recovery key not set")
            sdek = await self._open(client, keyset.open_with_recovery, key)
        else:
            if not password:
                raise InvalidInput("password required")
            sdek = await self._open(client, keyset.open_with_password, password)
        sdek[:] = bytes(len(sdek))

    async def open_keyset(self, path: object, data: bytes, password: bytes | None,
                          recovery_text: str | None, client: str) -> bytearray:
        """The SDEK of another keyset (an imported one), checked through the same budget of
        attempts as every other secret; the caller owns (and zeroes) the copy."""
        try:
            if len(data) > MAX_KEYSET:
                raise KeysetError("implausibly large for a keyset")
            keyset = Keyset.parse(data)
        except KeysetError as exc:
            raise StateCorrupt(path, str(exc)) from None
        if recovery_text is not None:
            key = self._normalize(recovery_text)
            if not keyset.has_recovery:
                raise NotInitialized("the imported keyset has no recovery key")
            return await self._open(client, keyset.open_with_recovery, key)
        if not password:
            raise InvalidInput("password required")
        return await self._open(client, keyset.open_with_password, password)

    def adopt(self, sdek: bytearray) -> None:
        """Hold `sdek` as this device's (the keyset it opens has just been put in place)."""
        self._hold(sdek)

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
