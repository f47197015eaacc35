"""Reading passwords: from a file, an inherited fd, stdin, or the terminal.

A password never comes from argv or the environment. Like gocryptfs, a file or stream
contributes its first line without the newline; an empty password is refused.
"""

from __future__ import annotations

import getpass
import os
import sys

MAX_PASSWORD = 2048


class PasswordError(Exception):
    """The password source could not be read or gave nothing usable."""


class EmptyPassword(PasswordError):
    pass


def _first_line(data: bytes) -> bytes:
    line = data.split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        raise EmptyPassword("password is empty")
    if len(line) > MAX_PASSWORD:
        raise PasswordError(f"password longer than {MAX_PASSWORD} bytes")
    return line


def read_fd(fd: int, close: bool = True) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_PASSWORD + 2 and b"\n" in b"".join(chunks):
                break
    except OSError as exc:
        raise PasswordError(f"cannot read password fd {fd}: {exc.strerror}") from None
    finally:
        if close:
            os.close(fd)
    return _first_line(b"".join(chunks))


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return _first_line(f.read(MAX_PASSWORD + 2))
    except OSError as exc:
        raise PasswordError(f"cannot read password file {path}: {exc.strerror}") from None


def prompt(confirm: bool = False) -> bytes:
    if not sys.stdin.isatty():
        return read_fd(sys.stdin.fileno(), close=False)
    pw = getpass.getpass("Password: ").encode()
    if confirm and getpass.getpass("Repeat: ").encode() != pw:
        raise PasswordError("passwords do not match")
    return _first_line(pw)


def obtain(passfile: str | None, passfd: int | None, confirm: bool = False) -> bytes:
    if passfile is not None:
        return read_file(passfile)
    if passfd is not None:
        return read_fd(passfd)
    return prompt(confirm)
