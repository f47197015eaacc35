"""Exceptions become errno values here, and only here.

Handlers raise OSError (from backing syscalls), format errors (from decryption) or
FUSEError; `fuse_op` maps them. An exception of any other type is a bug: it is logged with
its traceback, counted, and answered with EIO so one bad request cannot take the mount down.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from piccolofs.format.errors import (
    AuthenticationError,
    CorruptHeader,
    CorruptName,
    FormatError,
    InvalidName,
    NameTooLong,
)

log = logging.getLogger("piccolofs.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_FORMAT_ERRNO: tuple[tuple[type[FormatError], int], ...] = (
    (NameTooLong, errno.ENAMETOOLONG),
    (InvalidName, errno.EINVAL),
    (AuthenticationError, errno.EIO),
    (CorruptHeader, errno.EIO),
    (CorruptName, errno.EIO),
)


class Counters:
    """Error counts the control channel reports (stats) and tests assert on."""

    internal_errors = 0
    integrity_errors = 0


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, FormatError):
        for cls, code in _FORMAT_ERRNO:
            if isinstance(exc, cls):
                return code
        return errno.EIO
    raise TypeError("not a mapped exception")


def fuse_op(fn: F) -> F:
    """Decorate an Operations method so every failure leaves it as FUSEError."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (OSError, FormatError) as exc:
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except OverflowError:  # an offset or size beyond what the backing syscalls take
            raise pyfuse3.FUSEError(errno.EFBIG) from None
        except Exception:
            Counters.internal_errors += 1
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)
