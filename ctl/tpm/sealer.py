"""Seal a small secret to the TPM under a PCR policy, so that it can be recovered at boot
before any password, and only while the measured boot state is unchanged.

Every call is blocking and self-contained: it opens its own ESAPI context on the given
TCTI, re-creates the primary key, does its work and flushes every transient handle it
created, even on error. A TPM without a resource manager (a raw swtpm, /dev/tpm0) keeps
transient objects across connections and has only a few slots, so nothing may leak, and
calls are serialized within the process. An ESAPI context never leaves the thread that
made it: callers run each call in a worker thread of their own.

Without a PIN the sealed object is NODA and its policy is PolicyPCR alone: there is no
password to guess, and unclean power-offs never push the TPM into dictionary-attack
lockout. With a PIN the policy adds PolicyAuthValue and the object is not NODA, so wrong
PINs count toward the TPM's lockout. Parameter encryption on salted sessions keeps the
secret and the PIN off the wire in clear.

tpm2_pytss is imported on first use, so that parsing a sealed file needs no TSS library.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

VERSION = 1
BANK = "sha256"
MAX_SECRET = 64
PCR_MAX = 23
MAX_FILE = 16 * 1024
MAX_PRIVATE = 1024
BUSY_TIMEOUT = 20.0

# One operation at a time in this process: without a resource manager (swtpm, /dev/tpm0)
# concurrent contexts run the TPM out of object slots.
_LOCK = threading.Lock()

# The primary key's template is part of the format: another template is another parent key,
# and every sealed object made under the old one would stop loading.
_PRIMARY_ALG = "ecc256:aes128cfb"
_SESSION_SYM = "aes128cfb"

# TPM constants used to check a sealed object offline (TPM 2.0 Part 2).
_ALG_KEYEDHASH = 0x0008
_ALG_SHA256 = 0x000B
_ALG_NULL = 0x0010
_ATTR_FIXEDTPM = 0x00000002
_ATTR_FIXEDPARENT = 0x00000010
_ATTR_NODA = 0x00000400
_CC_POLICY_PCR = 0x0000017F
_CC_POLICY_AUTH_VALUE = 0x0000016B
_MAX_AUTH = 32  # an authValue is at most the size of the object's name digest (sha256)

# Return-code anatomy (TPM 2.0 Part 2, 6.6; TSS 2.0 layers).
_LAYER_MASK = 0xFF0000
_LAYER_TPM = 0x000000
_LAYER_ESYS = 0x070000
_LAYER_TCTI = 0x0A0000
_LAYER_RESMGR_TPM = 0x0C0000
_RC_FMT1 = 0x080
_BASE_UNREACHABLE = {8, 9, 10, 17, 19}  # no connection, try again, I/O, malformed/short reply
_RC_AUTH_FAIL = 0x08E
_RC_POLICY_FAIL = 0x09D
_RC_INTEGRITY = 0x09F
_RC_BAD_AUTH = 0x0A2
_RC_PCR_CHANGED = 0x128
_RC_LOCKOUT = 0x921
_RC_OBJECT_MEMORY = 0x902
_RC_SESSION_MEMORY = 0x903


class TpmError(Exception):
    """A TPM operation failed; the message is a short reason and never holds a secret."""


class TpmUnavailable(TpmError):
    """No TPM answers at that TCTI (or the TSS library is missing)."""


class PolicyMismatch(TpmError):
    """The PCR values differ from those the secret was sealed to."""


class WrongTpm(TpmError):
    """The sealed object was not made by this TPM (or was altered)."""


class BadPin(TpmError):
    """Wrong PIN, or none given for an object sealed with one."""


class Lockout(TpmError):
    """The TPM is in dictionary-attack lockout."""


class SealedCorrupt(TpmError):
    """The sealed file cannot be parsed, or does not describe a sealed object of ours."""


# -- the sealed file -----------------------------------------------------------------------

def _check_pcrs(pcrs: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique sha256 PCR indices; ValueError when empty or out of range."""
    out = tuple(sorted(set(pcrs)))
    if not out:
        raise ValueError("at least one PCR is needed")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= PCR_MAX
               for p in out):
        raise ValueError(f"PCR indices must be integers 0..{PCR_MAX}")
    return out


def _selection_bytes(pcrs: Sequence[int]) -> bytes:
    """The marshalled TPML_PCR_SELECTION of the sha256 bank: one bank, a 3-byte bitmap."""
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return struct.pack(">IHB", 1, _ALG_SHA256, 3) + bytes(bitmap)


def _policy(pcrs: Sequence[int], pcr_digest: bytes, pin: bool) -> bytes:
    """The object's authPolicy, computed as the TPM does: PolicyPCR [+ PolicyAuthValue]."""
    digest = hashlib.sha256(bytes(32) + struct.pack(">I", _CC_POLICY_PCR)
                            + _selection_bytes(pcrs) + pcr_digest).digest()
    if pin:
        digest = hashlib.sha256(digest + struct.pack(">I", _CC_POLICY_AUTH_VALUE)).digest()
    return digest


def _attributes(pin: bool) -> int:
    return _ATTR_FIXEDTPM | _ATTR_FIXEDPARENT | (0 if pin else _ATTR_NODA)


def _tpm2b(buf: bytes, at: int, what: str) -> tuple[bytes, int]:
    if at + 2 > len(buf):
        raise SealedCorrupt(f"public area: {what} is truncated")
    (n,) = struct.unpack_from(">H", buf, at)
    if at + 2 + n > len(buf):
        raise SealedCorrupt(f"public area: {what} is truncated")
    return buf[at + 2:at + 2 + n], at + 2 + n


def _check_public(public: bytes, pcrs: tuple[int, ...], pin: bool, pcr_digest: bytes) -> None:
    """The TPM2B_PUBLIC must be our keyed-hash template, bound to exactly this policy."""
    body, end = _tpm2b(public, 0, "size")
    if end != len(public):
        raise SealedCorrupt("public area: its size field does not match its length")
    if len(body) < 8:
        raise SealedCorrupt("public area: too short")
    kind, name_alg, attrs = struct.unpack_from(">HHI", body, 0)
    if kind != _ALG_KEYEDHASH:
        raise SealedCorrupt("public area: not a sealed data object")
    if name_alg != _ALG_SHA256:
        raise SealedCorrupt("public area: name algorithm is not sha256")
    if attrs != _attributes(pin):
        raise SealedCorrupt(f"public area: unexpected object attributes 0x{attrs:08x}")
    auth_policy, at = _tpm2b(body, 8, "authPolicy")
    if at + 2 > len(body) or struct.unpack_from(">H", body, at)[0] != _ALG_NULL:
        raise SealedCorrupt("public area: unexpected keyed-hash scheme")
    unique, at = _tpm2b(body, at + 2, "unique")
    if at != len(body) or len(unique) != 32:
        raise SealedCorrupt("public area: malformed unique field")
    if auth_policy != _policy(pcrs, pcr_digest, pin):
        raise SealedCorrupt("public area: its policy does not match the PCRs and PIN recorded")


def _check_private(private: bytes) -> None:
    """The TPM2B_PRIVATE: a size that matches, an integrity HMAC, encrypted sensitive data."""
    if len(private) < 2 + 2 + 32 + 1:
        raise SealedCorrupt("private area: too short")
    if len(private) > MAX_PRIVATE:
        raise SealedCorrupt("private area: too large")
    (n,) = struct.unpack_from(">H", private, 0)
    if n != len(private) - 2:
        raise SealedCorrupt("private area: its size field does not match its length")
    (hmac_len,) = struct.unpack_from(">H", private, 2)
    if hmac_len != 32:
        raise SealedCorrupt("private area: malformed integrity field")


_FIELDS = ("version", "bank", "pcrs", "pin", "pcr_digest", "public", "private")


def _b64(doc: dict[str, Any], key: str, limit: int) -> bytes:
    value = doc[key]
    if not isinstance(value, str):
        raise SealedCorrupt(f"{key}: not a base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise SealedCorrupt(f"{key}: too large")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SealedCorrupt(f"{key}: not valid base64") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SealedCorrupt(f"duplicate field {k!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class Sealed:
    """A sealed secret: the TPM's object (useless without the same TPM and PCR values)
    and what it was sealed to, so status can be told without touching the secret."""

    pcrs: tuple[int, ...]
    pin: bool
    private: bytes
    public: bytes
    pcr_digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.pin, bool):
            raise SealedCorrupt("pin: not a boolean")
        if not isinstance(self.pcrs, tuple):
            raise SealedCorrupt("pcrs: not a tuple")
        try:
            pcrs = _check_pcrs(self.pcrs)
        except (ValueError, TypeError):
            raise SealedCorrupt(f"pcrs: must be PCR indices 0..{PCR_MAX}") from None
        if pcrs != self.pcrs:
            raise SealedCorrupt("pcrs: must be sorted and without duplicates")
        if not all(isinstance(b, bytes) for b in (self.private, self.public, self.pcr_digest)):
            raise SealedCorrupt("private, public and pcr_digest must be bytes")
        if len(self.pcr_digest) != 32:
            raise SealedCorrupt("pcr_digest: not a sha256 digest")
        _check_private(self.private)
        _check_public(self.public, pcrs, self.pin, self.pcr_digest)

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "bank": BANK, "pcrs": list(self.pcrs), "pin": self.pin,
               "pcr_digest": base64.b64encode(self.pcr_digest).decode(),
               "public": base64.b64encode(self.public).decode(),
               "private": base64.b64encode(self.private).decode()}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Sealed:
        """Strict: anything but what to_json writes raises SealedCorrupt with the reason."""
        if len(data) > MAX_FILE:
            raise SealedCorrupt(f"larger than {MAX_FILE} bytes")
        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise SealedCorrupt("not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise SealedCorrupt(f"not JSON ({exc.msg} at line {exc.lineno})") from None
        except ValueError:  # an integer beyond Python's digit limit
            raise SealedCorrupt("not JSON (a number too large)") from None
        except RecursionError:
            raise SealedCorrupt("not JSON (nested too deeply)") from None
        if not isinstance(doc, dict):
            raise SealedCorrupt("not a JSON object")
        version = doc.get("version")
        if "version" not in doc:
            raise SealedCorrupt("no version field")
        if not isinstance(version, int) or isinstance(version, bool):
            raise SealedCorrupt("version: not an integer")
        if version != VERSION:
            raise SealedCorrupt(f"unsupported version {str(version)[:12]} "
                                f"(this daemon reads {VERSION})")
        for key in _FIELDS:
            if key not in doc:
                raise SealedCorrupt(f"missing field {key!r}")
        for key in doc:
            if key not in _FIELDS:
                raise SealedCorrupt(f"unexpected field {str(key)[:40]!r}")
        if doc["bank"] != BANK:
            raise SealedCorrupt(f"bank: only {BANK} is supported")
        pcrs = doc["pcrs"]
        if not isinstance(pcrs, list) or not pcrs or len(pcrs) > PCR_MAX + 1:
            raise SealedCorrupt("pcrs: must be a non-empty list of PCR indices")
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in pcrs):
            raise SealedCorrupt("pcrs: must be integers")
        if not isinstance(doc["pin"], bool):
            raise SealedCorrupt("pin: not a boolean")
        return cls(pcrs=tuple(pcrs), pin=doc["pin"],
                   pcr_digest=_b64(doc, "pcr_digest", 32),
                   public=_b64(doc, "public", 512),
                   private=_b64(doc, "private", MAX_PRIVATE))


# -- talking to the TPM ----------------------------------------------------------------------

def _tss() -> Any:
    """tpm2_pytss, with the TSS's own stderr logging off (our exceptions carry the reason);
    set TSS2_LOG to get it back."""
    os.environ.setdefault("TSS2_LOG", "all+none")
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise TpmUnavailable(f"the TPM library is not available: {exc}") from None
    return tpm2_pytss


def _rc_code(rc: int) -> tuple[int, int]:
    """(layer, error) of a TSS2 return code. For a TPM code of format one, the handle,
    parameter or session number is stripped, so the error compares with TPM_RC_*."""
    layer, low = rc & _LAYER_MASK, rc & 0xFFFF
    if layer in (_LAYER_TPM, _LAYER_RESMGR_TPM):
        return layer, (_RC_FMT1 | (low & 0x3F)) if low & _RC_FMT1 else low & 0xFFF
    return layer, low


class _Tpm:
    """One ESAPI context on its own TCTI; close() flushes every transient handle it
    tracked, then finalizes the context and the TCTI."""

    def __init__(self, tcti: str) -> None:
        if not isinstance(tcti, str) or not tcti:
            raise TpmUnavailable("no TCTI given")
        self.name = tcti
        self.t = _tss()
        self._handles: list[Any] = []
        if not _LOCK.acquire(timeout=BUSY_TIMEOUT):
            raise TpmUnavailable("the TPM is busy: an earlier operation has not finished")
        try:
            self._open()
        except BaseException:
            _LOCK.release()
            raise

    def _open(self) -> None:
        try:
            self._tcti = self.t.TCTILdr.parse(self.name)
        except self.t.TSS2_Exception as exc:
            raise TpmUnavailable(f"no TPM answers at {self.name} ({exc})") from None
        try:
            self.esys = self.t.ESAPI(self._tcti)
        except self.t.TSS2_Exception as exc:
            self._tcti.close()
            raise TpmUnavailable(f"no TPM answers at {self.name} ({exc})") from None
        except BaseException:
            self._tcti.close()
            raise

    def __enter__(self) -> _Tpm:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        # Each step runs however the one before it ended: the TCTI's fd and the lock are
        # let go of even when flushing or finalizing fails.
        with contextlib.ExitStack() as undo:
            undo.callback(_LOCK.release)
            undo.callback(self._tcti.close)
            undo.callback(self.esys.close)
            while self._handles:
                self.flush(self._handles[-1])

    def track(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def flush(self, handle: Any) -> None:
        self._handles.remove(handle)
        # If the TPM went away or already dropped it, nothing more can be done.
        with contextlib.suppress(self.t.TSS2_Exception):
            self.esys.flush_context(handle)

    def error(self, exc: Any, what: str) -> TpmError:
        """The exception for a TSS2_Exception raised while `what` ("reading the PCRs")."""
        rc = int(exc.rc)
        layer, code = _rc_code(rc)
        if layer == _LAYER_TCTI or (layer == _LAYER_ESYS and code in _BASE_UNREACHABLE):
            return TpmUnavailable(f"the TPM at {self.name} stopped answering while {what} "
                                  f"({exc}, rc 0x{rc:x})")
        if layer in (_LAYER_TPM, _LAYER_RESMGR_TPM):
            if code == _RC_LOCKOUT:
                return Lockout(f"the TPM is in dictionary-attack lockout (rc 0x{rc:x})")
            if code in (_RC_OBJECT_MEMORY, _RC_SESSION_MEMORY):
                return TpmError(f"the TPM has no free slot while {what}: concurrent use, or "
                                f"handles left loaded by another program (rc 0x{rc:x})")
        return TpmError(f"{what} failed: {exc} (rc 0x{rc:x})")

    def selection(self, pcrs: Sequence[int]) -> Any:
        sel, _ = self.t.TPML_PCR_SELECTION.unmarshal(_selection_bytes(pcrs))
        return sel

    def read_pcrs(self, pcrs: tuple[int, ...]) -> bytes:
        """sha256 over the selected PCR values in index order (the PolicyPCR digest)."""
        values: dict[int, bytes] = {}
        todo = list(pcrs)
        while todo:  # a TPM returns at most 8 digests per read
            try:
                _, out_sel, digests = self.esys.pcr_read(self.selection(todo))
            except self.t.TSS2_Exception as exc:
                raise self.error(exc, "reading the PCRs") from None
            got = []
            for i in range(out_sel.count):
                s = out_sel.pcrSelections[i]
                if s.hash != _ALG_SHA256:
                    continue
                got += [p for p in range(8 * s.sizeofSelect) if s.pcrSelect[p // 8] >> (p % 8) & 1]
            if not got or len(got) != digests.count:
                raise TpmError("the TPM did not return the sha256 PCR values asked for")
            for p, d in zip(got, (bytes(digests.digests[i]) for i in range(digests.count)),
                            strict=True):
                values[p] = d
            todo = [p for p in todo if p not in values]
        return hashlib.sha256(b"".join(values[p] for p in pcrs)).digest()

    def primary(self) -> Any:
        """The parent key, re-created from the owner seed: same seed, same key."""
        t = self.t
        template = t.TPM2B_PUBLIC.parse(
            _PRIMARY_ALG,
            objectAttributes=t.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
            | t.TPMA_OBJECT.NODA)
        try:
            handle, *_ = self.esys.create_primary(None, template, t.ESYS_TR.OWNER)
        except t.TSS2_Exception as exc:
            raise self.error(exc, "creating the primary key") from None
        return self.track(handle)

    def session(self, primary: Any, kind: Any, attrs: int) -> Any:
        """A session salted by the primary key, with parameter encryption `attrs`."""
        t = self.t
        try:
            s = self.track(self.esys.start_auth_session(
                primary, t.ESYS_TR.NONE, kind, _SESSION_SYM, t.TPM2_ALG.SHA256))
            self.esys.trsess_set_attributes(s, t.TPMA_SESSION.CONTINUESESSION | attrs)
        except t.TSS2_Exception as exc:
            raise self.error(exc, "starting a session") from None
        return s


def _auth_value(pin: bytes) -> bytes:
    """The object's authValue for a PIN: the PIN itself when it fits and is plain, else
    its sha256. Trailing zero bytes are dropped, as the TPM drops them."""
    if len(pin) > _MAX_AUTH or b"\0" in pin:
        pin = hashlib.sha256(pin).digest()
    return pin.rstrip(b"\0")


def seal(tcti: str, secret: bytes, pcrs: Sequence[int] = (7,),
         pin: bytes | None = None) -> Sealed:
    """Seal `secret` (1..64 bytes) to the current values of the sha256 PCRs `pcrs`."""
    if not isinstance(secret, bytes | bytearray) or not 0 < len(secret) <= MAX_SECRET:
        raise ValueError(f"the secret must be 1..{MAX_SECRET} bytes")
    if pin is not None and not pin:
        raise ValueError("an empty PIN: give None for no PIN")
    sel_pcrs = _check_pcrs(pcrs)
    with _Tpm(tcti) as tpm:
        t = tpm.t
        digest = tpm.read_pcrs(sel_pcrs)
        policy = _policy(sel_pcrs, digest, pin is not None)
        primary = tpm.primary()
        try:
            trial = tpm.track(tpm.esys.start_auth_session(
                t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.TRIAL, None, t.TPM2_ALG.SHA256))
            tpm.esys.policy_pcr(trial, digest, tpm.selection(sel_pcrs))
            if pin is not None:
                tpm.esys.policy_auth_value(trial)
            trial_policy = bytes(tpm.esys.policy_get_digest(trial))
        except t.TSS2_Exception as exc:
            raise tpm.error(exc, "computing the policy") from None
        tpm.flush(trial)
        if trial_policy != policy:
            raise TpmError("the TPM computed another policy digest than expected")
        template = t.TPM2B_PUBLIC.parse("keyedhash", objectAttributes=_attributes(pin is not None),
                                        nameAlg="sha256", authPolicy=policy)
        sensitive = t.TPM2B_SENSITIVE_CREATE(t.TPMS_SENSITIVE_CREATE(
            userAuth=t.TPM2B_AUTH(_auth_value(pin) if pin is not None else b""),
            data=t.TPM2B_SENSITIVE_DATA(bytes(secret))))
        hmac = tpm.session(primary, t.TPM2_SE.HMAC, t.TPMA_SESSION.DECRYPT)
        try:
            private, public, *_ = tpm.esys.create(primary, sensitive, template, session1=hmac)
        except t.TSS2_Exception as exc:
            raise tpm.error(exc, "sealing") from None
        return Sealed(pcrs=sel_pcrs, pin=pin is not None, private=private.marshal(),
                      public=public.marshal(), pcr_digest=digest)


def unseal(tcti: str, sealed: Sealed, pin: bytes | None = None) -> bytearray:
    """The sealed secret, as a bytearray the caller zeroes after use. A PIN given for an
    object sealed without one is ignored."""
    if sealed.pin and not pin:
        raise BadPin("this sealed secret needs its PIN")
    with _Tpm(tcti) as tpm:
        t = tpm.t
        try:
            private, _ = t.TPM2B_PRIVATE.unmarshal(sealed.private)
            public, _ = t.TPM2B_PUBLIC.unmarshal(sealed.public)
        except t.TSS2_Exception:
            raise SealedCorrupt("the sealed object cannot be decoded") from None
        primary = tpm.primary()
        try:
            obj = tpm.track(tpm.esys.load(primary, private, public))
        except t.TSS2_Exception as exc:
            rc = int(exc.rc)
            layer, code = _rc_code(rc)
            if layer in (_LAYER_TPM, _LAYER_RESMGR_TPM) and code == _RC_INTEGRITY:
                raise WrongTpm("the sealed object was not made by this TPM, or was altered "
                               f"(rc 0x{rc:x})") from None
            raise tpm.error(exc, "loading the sealed object") from None
        policy = tpm.session(primary, t.TPM2_SE.POLICY, t.TPMA_SESSION.ENCRYPT)
        try:
            tpm.esys.policy_pcr(policy, b"", tpm.selection(sealed.pcrs))
            if sealed.pin and pin:
                tpm.esys.policy_auth_value(policy)
                tpm.esys.tr_set_auth(obj, _auth_value(pin))
            data = tpm.esys.unseal(obj, session1=policy)
        except t.TSS2_Exception as exc:
            rc = int(exc.rc)
            layer, code = _rc_code(rc)
            if layer in (_LAYER_TPM, _LAYER_RESMGR_TPM):
                if code in (_RC_POLICY_FAIL, _RC_PCR_CHANGED):
                    pcrs = ",".join(map(str, sealed.pcrs))
                    raise PolicyMismatch(f"PCR {pcrs} differ from the values sealed to "
                                         f"(rc 0x{rc:x})") from None
                if sealed.pin and code in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
                    raise BadPin(f"wrong PIN (rc 0x{rc:x})") from None
            raise tpm.error(exc, "unsealing") from None
        view = data.buffer
        out = bytearray(view)
        view[:] = bytes(len(view))  # scrub the library's copy
        return out


def pcr_digest(tcti: str, pcrs: Sequence[int]) -> bytes:
    """sha256 over the current values of the sha256 PCRs `pcrs` (as Sealed.pcr_digest)."""
    sel_pcrs = _check_pcrs(pcrs)
    with _Tpm(tcti) as tpm:
        return tpm.read_pcrs(sel_pcrs)


def probe(tcti: str) -> str | None:
    """None when a TPM with a sha256 PCR bank answers at `tcti`, else the reason."""
    try:
        with _Tpm(tcti) as tpm:
            tpm.read_pcrs((0,))
    except TpmError as exc:
        return str(exc)
    return None
