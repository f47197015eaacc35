"""Exit codes of the `piccolofs` command: a stable contract with scripts and the daemon.

Numbers follow gocryptfs where the meaning matches, so operators moving between the two
read them the same way. Documented in docs/cli.md; tested in tests/test_cli.py.
"""

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    OTHER = 1  # unexpected failure (a bug): the message says what
    USAGE = 2  # bad command line
    CIPHERDIR = 6  # cipher dir missing, not a directory, or not empty at init
    INIT = 7  # init could not create the tree
    LOADCONF = 9  # gocryptfs.conf unreadable, malformed or inconsistent
    READPASSWORD = 10  # the password source could not be read
    MOUNTPOINT = 11  # mountpoint missing, not a directory, or already in use
    PASSWORD_INCORRECT = 12  # the password does not unlock the master key
    UNSUPPORTED = 13  # the tree uses a version or feature flag we refuse
    MOUNT_FAILED = 15  # the kernel mount or the mount process failed
    PASSWORD_EMPTY = 22  # an empty password was given
    WRITECONF = 24  # gocryptfs.conf could not be written
    FSCK_ERRORS = 26  # fsck found corruption
    UMOUNT_FAILED = 27  # unmount failed (busy, not mounted)
