"""A cipher directory as a whole: creating one, and reading its config."""

from __future__ import annotations

import errno
import os

from piccolofs.atomic import write_atomic
from piccolofs.backing.dirs import write_diriv
from piccolofs.format import config as gconfig
from piccolofs.format.errors import ConfigError
from piccolofs.format.names import CONF_NAME

CONF_MODE = 0o400
CONF_MAX = 64 * 1024


class CipherDirError(Exception):
    """The cipher directory is missing, not a directory, or (at init) not empty."""


def conf_path(cipher_dir: str) -> str:
    return os.path.join(cipher_dir, CONF_NAME.decode())


def load_config(cipher_dir: str) -> gconfig.Config:
    if not os.path.isdir(cipher_dir):
        raise CipherDirError(f"{cipher_dir}: not a directory")
    try:
        fd = os.open(conf_path(cipher_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{conf_path(cipher_dir)} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open {conf_path(cipher_dir)}: {exc.strerror}") from None
    try:
        data = os.read(fd, CONF_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > CONF_MAX:
        raise ConfigError("gocryptfs.conf is implausibly large")
    return gconfig.parse(data)


def init_tree(cipher_dir: str, password: bytes, options: gconfig.InitOptions,
              creator: str = gconfig.CREATOR) -> gconfig.Config:
    """Create a new tree; refuses a non-empty directory so nothing is ever overwritten."""
    try:
        os.mkdir(cipher_dir, 0o700)
    except FileExistsError:
        if not os.path.isdir(cipher_dir):
            raise CipherDirError(f"{cipher_dir}: not a directory") from None
        if os.listdir(cipher_dir):
            raise CipherDirError(f"{cipher_dir}: directory is not empty") from None
    except OSError as exc:
        raise CipherDirError(f"{cipher_dir}: {exc.strerror}") from None
    cfg, master = gconfig.create(password, options, creator=creator)
    del master
    try:
        write_atomic(conf_path(cipher_dir), cfg.to_json(), CONF_MODE)
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO, f"cannot write gocryptfs.conf: {exc.strerror}"
                      ) from None
    if cfg.has(gconfig.F_DIRIV):
        fd = os.open(cipher_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_diriv(fd)
        finally:
            os.close(fd)
    return cfg
