"""What a process holds open, from /proc: for the tests that check nothing is left open."""

from __future__ import annotations

import os


def open_files(pid: int | str = "self") -> list[str]:
    """The targets of the process's fds ("pipe:[123]", "/a/path", ...), sorted. An fd
    closed while they are listed (the listing's own, for one) is left out."""
    files = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            files.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return sorted(files)


def kinds(files: list[str]) -> list[str]:
    """The files with their numbers left out (socket:[123] -> socket:): numbers change from
    one reading to the next, kinds must not."""
    return sorted(f.split("[")[0] for f in files)
