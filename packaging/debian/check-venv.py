"""Refuse to package a virtualenv that would not work where it is installed.

Run by debian/rules with the staged venv's own python:
    check-venv.py PKGROOT VENV BUILDDIR
PKGROOT is the package's staging tree (debian/piccolofs), VENV the installed path of the venv
(/usr/lib/piccolofs) and BUILDDIR the build directory, which must appear in no file: a
script or config still naming it would fail once installed (shebangs left unrewritten, the
sh-exec trampoline pip writes for long interpreter paths, pyvenv.cfg).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys

pkgroot, venv, builddir = sys.argv[1:4]
stage = pkgroot + venv
errors: list[str] = []

if sys.version_info[:2] != (3, 11) or sys.base_prefix != "/usr":
    errors.append(f"venv interpreter is {sys.version.split()[0]} from {sys.base_prefix}, "
                  "not Debian's python3.11 in /usr")

for mod in ("piccolofs.cli", "piccolofs.mount", "piccolofs.format._gcm_runs", "ctl.cli",
            "ctl.daemon", "pyfuse3",
            "tpm2_pytss", "pyudev", "cryptography", "nacl", "argon2", "psutil", "httpx"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # every failure is reported, not only the first
        errors.append(f"import {mod}: {exc!r}")

pyfuse3_version = md.version("pyfuse3")
if "+fallocate" not in pyfuse3_version:
    errors.append(f"pyfuse3 {pyfuse3_version} is the stock one, not packaging/pyfuse3's")
if int(md.version("cryptography").split(".")[0]) < 47:
    errors.append(f"cryptography {md.version('cryptography')} < 47")
for gone in ("pip", "setuptools"):
    try:
        md.version(gone)
        errors.append(f"{gone} is still in the venv")
    except md.PackageNotFoundError:
        pass

for name in ("piccolofs", "piccoloctl", "piccolo-ctld"):
    path = os.path.join(stage, "bin", name)
    try:
        with open(path, "rb") as f:
            first = f.readline().rstrip(b"\n")
    except FileNotFoundError:
        errors.append(f"missing entry point {venv}/bin/{name}")
        continue
    if first != f"#!{venv}/bin/python".encode():
        errors.append(f"{venv}/bin/{name} starts with {first!r}")

needle = builddir.encode()
for root, dirs, files in os.walk(pkgroot):
    for d in dirs:
        if d == "__pycache__":
            errors.append(f"bytecode directory {os.path.join(root, d)}")
    for fn in files:
        path = os.path.join(root, fn)
        if os.path.islink(path):
            target = os.readlink(path)
            if target.startswith(builddir):
                errors.append(f"{path} links into the build tree: {target}")
            continue
        with open(path, "rb") as f:
            if needle in f.read():
                errors.append(f"{path} names the build directory {builddir}")

if errors:
    print("check-venv: the packaged virtualenv is not usable:", *errors, sep="\n  ",
          file=sys.stderr)
    sys.exit(1)
print(f"check-venv: {venv} ok (pyfuse3 {pyfuse3_version}, "
      f"cryptography {md.version('cryptography')})")
