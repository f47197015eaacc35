"""Domain errors of the daemon, each with its HTTP status and stable error code.

The API turns any of these into the one JSON error shape
`{"error": {"code": ..., "message": ...}}`; the CLI turns the status into its exit code.
Messages never contain secrets.
"""

from __future__ import annotations


class CtlError(Exception):
    status = 500
    code = "failed"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(CtlError):
    status, code = 400, "invalid_request"


class InvalidInput(CtlError):
    status, code = 422, "invalid_input"


class Unauthorized(CtlError):
    status, code = 401, "unauthorized"


class Forbidden(CtlError):
    status, code = 403, "forbidden"


class NotFound(CtlError):
    status, code = 404, "not_found"


class Conflict(CtlError):
    status, code = 409, "conflict"


class NotLeader(Conflict):
    code = "not_leader"


class Busy(Conflict):
    code = "busy"


class NotInitialized(Conflict):
    code = "not_initialized"


class AlreadyInitialized(Conflict):
    code = "already_initialized"


class PoolAbsent(Conflict):
    """The volume lives on a storage pool whose disk is not present (ctl.devices)."""
    code = "pool_absent"


class ImportPending(Conflict):
    code = "import_pending"


class Locked(CtlError):
    status, code = 423, "locked"


class TooManyAttempts(CtlError):
    status, code = 429, "too_many_attempts"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed attempts; retry in {retry_after:.0f} s",
                         retry_after=round(retry_after, 1))
        self.retry_after = retry_after


class Failed(CtlError):
    status, code = 500, "failed"


class StateCorrupt(Failed):
    """A state file the daemon cannot use as it is. The message names the file and what is
    wrong with it; the file itself is left untouched (or kept aside) for the operator."""

    code = "state_corrupt"

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}", file=str(path), reason=reason)
