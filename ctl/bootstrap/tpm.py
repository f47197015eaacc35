"""The bootstrap volume's passphrase sealed to the TPM, so that bootstrap mounts at boot,
before any password.

The sealed copy opens the bootstrap volume and nothing else: the SDEK never depends on the
TPM, and the password or recovery key always works. The file `crypto/bootstrap.tpm.json`
(mode 0600, written atomically) holds the TPM's sealed object and the PCR selection of its
policy (PCR 7, Secure Boot state, by default). Without a PIN the object is NODA and the
PCR policy is its only guard; with a PIN, wrong PINs count toward the TPM's
dictionary-attack lockout, and bootstrap mounts only once the PIN is given.

Nothing here ever fails the daemon's start: no TPM, no enrolment, a corrupt sealed file, a
changed PCR — each leaves bootstrap to mount at unlock, with the reason published as
`tpm_unseal_failed`. After a firmware or Secure Boot change, the next unlock reseals to the
current PCR values by itself (`tpm_resealed`, an audit row).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ctl import roles
from ctl.errors import Conflict, CtlError, Failed, InvalidInput, Locked, NotFound, Unauthorized
from ctl.events import EventBus
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, Paths
from ctl.volumes.manager import VolumeManager
from ctl.volumes.metadata import MetadataCorrupted, VolumeMeta
from piccolofs.atomic import write_atomic

log = logging.getLogger("ctl.bootstrap")

DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_PCRS = (7,)
MAX_SEALED = 16 * 1024
TPM_TIMEOUT = 30.0  # a TPM that does not answer must not hold the daemon's start


def _sealer() -> Any:
    """The sealer, imported on first use: a machine without the TSS libraries still runs
    the daemon, with the TPM reported unavailable."""
    from ctl.tpm import sealer

    return sealer


class BootstrapTpm:
    def __init__(self, paths: Paths, keys: KeyManager, volumes: VolumeManager, bus: EventBus,
                 tcti: str | None = None) -> None:
        self.paths = paths
        self.keys = keys
        self.volumes = volumes
        self.bus = bus
        self.tcti = tcti or os.environ.get("PICCOLO_TPM_TCTI") or DEFAULT_TCTI
        self.came_up: str | None = None  # how bootstrap was mounted: "tpm" or "unlock"
        self.last_failure: dict[str, str] | None = None
        self._limiter = trio.CapacityLimiter(1)  # one ESAPI context at a time

    @property
    def sealed_path(self) -> Any:
        return self.paths.crypto_dir / "bootstrap.tpm.json"

    async def _tpm(self, fn: Callable[..., Any], *args: Any) -> Any:
        with trio.fail_after(TPM_TIMEOUT):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                 abandon_on_cancel=True)

    def _load(self) -> Any:
        """The sealed object, or None when not enrolled; Failed when it cannot be used."""
        try:
            data = self.sealed_path.read_bytes()[:MAX_SEALED + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Failed(f"{self.sealed_path}: cannot be read: {exc.strerror}") from None
        try:
            return _sealer().Sealed.parse(data)
        except ImportError as exc:
            raise Failed(f"the TPM library is not available: {exc}") from None
        except Exception as exc:  # SealedCorrupt, with its reason
            raise Failed(f"{self.sealed_path}: {exc}") from None

    # -- status --------------------------------------------------------------------------
    def enrolment(self) -> dict[str, Any] | None:
        """The PCR selection and PIN flag of the enrolment (what an export records so that
        the importing device can seal to its own TPM alike); None when not enrolled."""
        try:
            sealed = self._load()
        except Failed:
            return None
        return None if sealed is None else {"pcrs": list(sealed.pcrs), "pin": sealed.pin}

    async def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tcti": self.tcti, "enrolled": False, "pcrs": None,
                               "pin": None, "bootstrap": self.came_up,
                               "last_failure": self.last_failure}
        try:
            sealed = self._load()
        except Failed as exc:
            out["enrolled"], out["error"] = True, exc.message
            sealed = None
        try:
            reason = await self._tpm(_sealer().probe, self.tcti)
        except (ImportError, trio.TooSlowError) as exc:
            reason = str(exc) or "the TPM did not answer"
        out["available"] = reason is None
        if reason is not None:
            out["unavailable_reason"] = reason
        if sealed is not None:
            out.update(enrolled=True, pcrs=list(sealed.pcrs), pin=sealed.pin)
            if reason is None:
                try:
                    now = await self._tpm(_sealer().pcr_digest, self.tcti, sealed.pcrs)
                    out["pcrs_changed"] = now != sealed.pcr_digest
                except Exception as exc:
                    out["pcrs_changed"] = None
                    log.warning("cannot read the PCRs: %s", exc)
        return out

    # -- enrolment (needs the SDEK: unlocked) ----------------------------------------------
    def _passphrase(self) -> bytearray:
        try:
            meta = VolumeMeta.parse(self.paths.volume_meta(BOOTSTRAP).read_bytes())
            return meta.unseal(self.keys.sdek())
        except FileNotFoundError:
            raise NotFound("the bootstrap volume does not exist yet: unlock once") from None
        except MetadataCorrupted as exc:
            raise Failed(f"bootstrap volume key: {exc}") from None

    async def enroll(self, pcrs: Sequence[int] = DEFAULT_PCRS, pin: bytes | None = None
                     ) -> dict[str, Any]:
        if self.keys.locked:
            raise Locked("unlock first: enrolment seals the bootstrap key")
        pcrs = tuple(sorted(set(pcrs)))
        if not pcrs or not all(0 <= p <= 23 for p in pcrs):
            raise InvalidInput("pcrs must be PCR indices 0..23")
        secret = self._passphrase()
        try:
            sealed = await self._call(_sealer().seal, self.tcti, bytes(secret), pcrs, pin)
        finally:
            secret[:] = bytes(len(secret))
        await trio.to_thread.run_sync(self._write, sealed)
        self.last_failure = None
        log.info("bootstrap key sealed to the TPM (PCRs %s%s)",
                 ",".join(map(str, pcrs)), ", with a PIN" if pin else "")
        return await self.status()

    def _write(self, sealed: Any) -> None:
        self.paths.crypto_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.sealed_path, sealed.to_json(), 0o600)

    async def reseal(self, pin: bytes | None = None) -> dict[str, Any]:
        """Seal again to the current PCR values, with the same selection and PIN choice."""
        sealed = self._load()
        if sealed is None:
            raise Conflict("the TPM is not enrolled")
        if sealed.pin and not pin:
            raise InvalidInput("this enrolment has a PIN: give it to reseal")
        return await self.enroll(sealed.pcrs, pin if sealed.pin else None)

    async def remove(self) -> None:
        if self.sealed_path.exists():
            await trio.to_thread.run_sync(self.sealed_path.unlink)
            log.info("the TPM enrolment was removed")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A TPM operation with its failures as the daemon's errors."""
        try:
            return await self._tpm(fn, *args)
        except ImportError as exc:
            raise Conflict(f"no TPM support on this machine: {exc}") from None
        except trio.TooSlowError:
            raise Failed("the TPM did not answer") from None
        except Exception as exc:
            raise _as_ctl_error(exc) from None

    # -- unsealing (while locked) ---------------------------------------------------------
    async def bring_up(self, pin: bytes | None = None) -> bool:
        """Mount bootstrap from the sealed key; True when it is mounted. Never raises for a
        TPM reason (that is published instead), unless a PIN was given and is wrong."""
        if self.volumes.mounted(BOOTSTRAP):
            return True
        try:
            sealed = self._load()
        except Failed as exc:
            self._failed("corrupt", exc.message)
            return False
        if sealed is None:
            return False
        if sealed.pin and pin is None:
            self._failed("pin_required", "the sealed bootstrap key needs its PIN")
            return False
        try:
            secret = await self._tpm(_sealer().unseal, self.tcti, sealed, pin)
        except ImportError as exc:
            self._failed("unavailable", f"no TPM support on this machine: {exc}")
            return False
        except trio.TooSlowError:
            self._failed("unavailable", "the TPM did not answer")
            return False
        except Exception as exc:
            kind = _kind(exc)
            self._failed(kind, str(exc))
            if pin is not None and kind in ("bad_pin", "lockout"):
                raise _as_ctl_error(exc) from None
            return False
        try:
            await self.volumes.attach(BOOTSTRAP, roles.LEADER, passphrase=bytes(secret))
        except CtlError as exc:
            self._failed("mount_failed", exc.message)
            return False
        finally:
            secret[:] = bytes(len(secret))
        self.came_up, self.last_failure = "tpm", None
        log.info("bootstrap mounted from the TPM-sealed key, before any password")
        return True

    def _failed(self, kind: str, reason: str) -> None:
        self.last_failure = {"kind": kind, "reason": reason}
        log.warning("bootstrap not mounted from the TPM (%s): %s", kind, reason)
        self.bus.publish("tpm_unseal_failed", {"kind": kind, "reason": reason})

    async def after_unlock(self, client: str) -> None:
        """Bootstrap came up with the password: note it, and if the TPM refused the sealed
        key because the PCRs changed or because it was sealed by another TPM (the disk or
        a restored state dir moved here), seal it to this TPM's current values, with the
        enrolment's PCR selection."""
        if self.came_up is None:
            self.came_up = "unlock"
        failure = self.last_failure
        if failure is None or failure["kind"] not in ("policy_mismatch", "wrong_tpm"):
            return
        try:
            sealed = self._load()
            if sealed is None or sealed.pin:
                return  # a PIN enrolment reseals only with its PIN
            await self.enroll(sealed.pcrs)
        except CtlError as exc:
            log.warning("could not reseal the bootstrap key: %s", exc.message)
            return
        self.bus.publish("tpm_resealed", {"pcrs": list(sealed.pcrs), "after": failure["kind"]})
        self.bus.publish("audit", {"kind": "tpm.reseal", "client": client,
                                   "pcrs": list(sealed.pcrs), "after": failure["kind"]})


def _kind(exc: BaseException) -> str:
    return {"PolicyMismatch": "policy_mismatch", "WrongTpm": "wrong_tpm", "BadPin": "bad_pin",
            "Lockout": "lockout", "TpmUnavailable": "unavailable",
            "SealedCorrupt": "corrupt"}.get(type(exc).__name__, "failed")


def _as_ctl_error(exc: BaseException) -> CtlError:
    kind = _kind(exc)
    if kind == "bad_pin":
        return Unauthorized("wrong PIN")
    if kind == "lockout":
        return Conflict("the TPM is in dictionary-attack lockout: wait, or clear it")
    if kind == "unavailable":
        return Conflict(f"no usable TPM: {exc}")
    return Failed(f"TPM: {exc}")
