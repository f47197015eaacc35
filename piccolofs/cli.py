"""`piccolofs init | mount | umount | info | fsck`: the standalone command.

Every failure leaves through `_fail` with a stable exit code (piccolofs.exitcodes) and one
line on stderr; secrets never appear in either.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence

from piccolofs import passwords
from piccolofs.backing.tree import CipherDirError, init_tree, load_config
from piccolofs.exitcodes import Exit
from piccolofs.format import config as gconfig
from piccolofs.format.errors import ConfigError, UnsupportedFeature, WrongPassword

MOUNT_WAIT = 60.0
MAX_READ_AHEAD_KIB = 65536


class CliError(Exception):
    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


def _read_ahead_kib(text: str) -> int:
    """0 (the kernel's default) or whole pages: the kernel keeps read-ahead in pages, so
    1-3 KiB would turn it off and other values would be cut down."""
    value = int(text)
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    if value < 0 or value % page_kib or value > MAX_READ_AHEAD_KIB:
        raise argparse.ArgumentTypeError(
            f"{value}: give 0 or a multiple of {page_kib} up to {MAX_READ_AHEAD_KIB}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piccolofs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def password_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--passfile", metavar="FILE", help="read the password from FILE")
        g.add_argument("--passfd", metavar="FD", type=int,
                       help="read the password from inherited file descriptor FD")

    init = sub.add_parser("init", help="create a new encrypted tree")
    init.add_argument("cipherdir")
    init.add_argument("--xchacha", action="store_true", help="XChaCha20-Poly1305 content")
    init.add_argument("--aessiv", action="store_true", help="AES-SIV content")
    init.add_argument("--plaintextnames", action="store_true", help="do not encrypt names")
    init.add_argument("--deterministic-names", action="store_true",
                      help="no per-directory IVs (names encrypt the same everywhere)")
    init.add_argument("--longnamemax", type=int, default=0, metavar="N",
                      help="hash encrypted names longer than N (62..255)")
    init.add_argument("--scryptn", type=int, default=gconfig.DEFAULT_SCRYPT_LOG_N, metavar="N",
                      help="scrypt cost as log2(N) (10..28, default 16)")
    password_args(init)

    mount = sub.add_parser("mount", help="mount a tree")
    mount.add_argument("cipherdir")
    mount.add_argument("mountpoint")
    mount.add_argument("--ro", action="store_true", help="read-only (follower) at start")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--ctl-fd", type=int, metavar="FD", help="control channel socket fd")
    mount.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    mount.add_argument("--master-key-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    mount.add_argument("--attr-timeout", type=float, default=1.0, metavar="S",
                       help="kernel attribute/entry cache time in seconds")
    mount.add_argument("--spin-us", type=int, metavar="US",
                       help="after a request, poll for the next one this long before sleeping "
                            "(0: sleep at once; default 100)")
    mount.add_argument("--read-ahead", type=_read_ahead_kib, metavar="KIB",
                       help="how far the kernel reads ahead of a sequential reader, in KiB "
                            "(root only; 0: the kernel's default of 128; default 1024)")
    mount.add_argument("--lease", type=float, metavar="S",
                       help="start as a leader whose writes stop after S seconds unless "
                            "the parent extends the lease (see --ctl-fd)")
    mount.add_argument("--lease-until", type=float, metavar="T", help=argparse.SUPPRESS)
    mount.add_argument("--token", type=int, default=0, metavar="N",
                       help="the fencing token of this leadership term")
    mount.add_argument("--debug", action="store_true")
    password_args(mount)

    umount = sub.add_parser("umount", help="unmount")
    umount.add_argument("mountpoint")
    umount.add_argument("--lazy", action="store_true", help="detach even if busy")

    info = sub.add_parser("info", help="show a tree's configuration (no password needed)")
    info.add_argument("cipherdir")

    fsck = sub.add_parser("fsck", help="check every name, xattr and block offline")
    fsck.add_argument("cipherdir")
    password_args(fsck)
    return p


def _password(args: argparse.Namespace, confirm: bool = False) -> bytes:
    try:
        return passwords.obtain(args.passfile, args.passfd, confirm)
    except passwords.EmptyPassword as exc:
        raise CliError(Exit.PASSWORD_EMPTY, str(exc)) from None
    except passwords.PasswordError as exc:
        raise CliError(Exit.READPASSWORD, str(exc)) from None


def _load(cipherdir: str) -> gconfig.Config:
    try:
        return load_config(cipherdir)
    except CipherDirError as exc:
        raise CliError(Exit.CIPHERDIR, str(exc)) from None
    except UnsupportedFeature as exc:
        raise CliError(Exit.UNSUPPORTED, str(exc)) from None
    except ConfigError as exc:
        raise CliError(Exit.LOADCONF, str(exc)) from None


def _unlock(args: argparse.Namespace) -> tuple[gconfig.Config, bytearray]:
    cfg = _load(args.cipherdir)
    password = _password(args)
    try:
        return cfg, bytearray(cfg.unwrap(password))
    except WrongPassword:
        raise CliError(Exit.PASSWORD_INCORRECT, "password incorrect") from None
    except UnsupportedFeature as exc:
        raise CliError(Exit.UNSUPPORTED, str(exc)) from None
    except ConfigError as exc:
        raise CliError(Exit.LOADCONF, str(exc)) from None


# ---------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    options = gconfig.InitOptions(
        xchacha=args.xchacha, aessiv=args.aessiv, plaintext_names=args.plaintextnames,
        deterministic_names=args.deterministic_names, longname_max=args.longnamemax,
        scrypt_log_n=args.scryptn,
    )
    try:
        options.feature_flags()
        if not 10 <= args.scryptn <= 28:
            raise ConfigError("--scryptn must be 10..28")
    except ConfigError as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    password = _password(args, confirm=True)
    try:
        init_tree(args.cipherdir, password, options)
    except CipherDirError as exc:
        raise CliError(Exit.CIPHERDIR, str(exc)) from None
    except OSError as exc:
        raise CliError(Exit.WRITECONF, str(exc)) from None
    print(f"created {args.cipherdir}", file=sys.stderr)
    return Exit.OK


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _load(args.cipherdir)
    print(f"Creator:      {cfg.creator}")
    print(f"Version:      {cfg.version}")
    print(f"FeatureFlags: {' '.join(cfg.feature_flags)}")
    print(f"Content:      {cfg.aead_name}")
    names = "plaintext" if cfg.has(gconfig.F_PLAINTEXT_NAMES) else (
        "EME, per-directory IV" if cfg.has(gconfig.F_DIRIV) else "EME, deterministic")
    print(f"Names:        {names}")
    print(f"LongNameMax:  {cfg.effective_longname_max}")
    s = cfg.scrypt
    print(f"Scrypt:       N={s.n} R={s.r} P={s.p} KeyLen={s.key_len}")
    return Exit.OK


def _check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise CliError(Exit.MOUNTPOINT, f"{path}: not a directory")
    if os.path.ismount(path):
        raise CliError(Exit.MOUNTPOINT, f"{path}: already a mount point")


def cmd_mount(args: argparse.Namespace) -> int:
    _check_mountpoint(args.mountpoint)
    if args.master_key_fd is not None:
        cfg = _load(args.cipherdir)
        key = bytearray(os.read(args.master_key_fd, 64))
        os.close(args.master_key_fd)
        if len(key) != 32:
            raise CliError(Exit.READPASSWORD, "master key fd did not carry 32 bytes")
    else:
        cfg, key = _unlock(args)
    if args.foreground:
        return _mount_foreground(args, cfg, key)
    return _mount_background(args, key)


def _mount_foreground(args: argparse.Namespace, cfg: gconfig.Config, key: bytearray) -> int:
    from piccolofs import mount

    mount.setup_logging(args.debug, foreground=args.ready_fd is None)
    opts = mount.MountOptions(
        cipher_dir=args.cipherdir, mountpoint=args.mountpoint, read_only=args.ro,
        timeout=args.attr_timeout, ready_fd=args.ready_fd, ctl_fd=args.ctl_fd, debug=args.debug,
        lease=args.lease, lease_until=args.lease_until, token=args.token,
    )
    if args.spin_us is not None:
        opts.spin_us = args.spin_us
    if args.read_ahead is not None:
        opts.read_ahead_kib = args.read_ahead
    try:
        return mount.run(cfg, key, opts)
    except RuntimeError as exc:
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error: {exc}\n".encode())
        raise CliError(Exit.MOUNT_FAILED, f"mount failed: {exc}") from None


def _mount_background(args: argparse.Namespace, key: bytearray) -> int:
    key_r, key_w = os.pipe()
    ready_r, ready_w = os.pipe()
    cmd = [sys.executable, "-m", "piccolofs", "mount", "--foreground",
           "--master-key-fd", str(key_r), "--ready-fd", str(ready_w),
           "--attr-timeout", str(args.attr_timeout)]
    if args.spin_us is not None:
        cmd += ["--spin-us", str(args.spin_us)]
    if args.read_ahead is not None:
        cmd += ["--read-ahead", str(args.read_ahead)]
    if args.ro:
        cmd.append("--ro")
    if args.debug:
        cmd.append("--debug")
    cmd += ["--", os.path.abspath(args.cipherdir), os.path.abspath(args.mountpoint)]
    # cwd "/": a long-lived mount process must not pin the caller's directory (or import
    # modules from it).
    child = subprocess.Popen(cmd, pass_fds=(key_r, ready_w), start_new_session=True, cwd="/",
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    os.close(key_r)
    os.close(ready_w)
    try:
        os.write(key_w, bytes(key))
    finally:
        key[:] = bytes(len(key))
        os.close(key_w)
    deadline = time.monotonic() + MOUNT_WAIT
    got = b""
    try:
        while b"\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                child.kill()
                raise CliError(Exit.MOUNT_FAILED, "mount process did not become ready")
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(ready_r)
    line = got.decode(errors="replace").strip()
    if line == "ready":
        return Exit.OK
    rc = child.wait(timeout=10)
    raise CliError(Exit(rc) if rc in Exit._value2member_map_ else Exit.MOUNT_FAILED,
                   line.removeprefix("error: ") or f"mount process exited with {rc}")


def cmd_umount(args: argparse.Namespace) -> int:
    cmd = ["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [args.mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip() or f"fusermount3 exited with {res.returncode}"
        raise CliError(Exit.UMOUNT_FAILED, msg)
    return Exit.OK


def cmd_fsck(args: argparse.Namespace) -> int:
    from piccolofs.fsck import check_tree

    cfg, key = _unlock(args)
    try:
        problems = check_tree(args.cipherdir, cfg, bytes(key))
    finally:
        key[:] = bytes(len(key))
    for p in problems:
        print(p, file=sys.stdout)
    if problems:
        print(f"fsck: {len(problems)} problem(s) found", file=sys.stderr)
        return Exit.FSCK_ERRORS
    print("fsck: no problems found", file=sys.stderr)
    return Exit.OK


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "info": cmd_info,
            "fsck": cmd_fsck}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args))
    except CliError as exc:
        print(f"piccolofs: {exc}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        return int(Exit.OTHER)
    except OSError as exc:
        print(f"piccolofs: {exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, '?')})",
              file=sys.stderr)
        return int(Exit.OTHER)
