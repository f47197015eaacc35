#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: system packages, then a virtualenv with the project.
# Sourced by run.sh and test.sh; safe to run again at any time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PICCOLOFS_VENV:-$REPO/.venv}"
# libtss2-dev builds tpm2-pytss (the TPM-sealed bootstrap key); swtpm and tpm2-tools give
# the tests a software TPM; etcd-server is the consensus engine of a cluster (the tests start
# their own members on loopback). Storage pools (ctl.devices): udev (the tests start a
# systemd-udevd), the filesystems' tools and smartmontools; systemd for `systemd-analyze
# verify` of the packaged unit. libssl-dev builds the compiled AES-GCM block runs
# (piccolofs/format/gcm_runs.c).
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config patch gocryptfs gcc python3 python3-venv python3-dev
              fio sqlite3 util-linux procps e2fsprogs libtss2-dev swtpm swtpm-tools tpm2-tools
              etcd-server etcd-client udev systemd smartmontools xfsprogs btrfs-progs libssl-dev)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (FUSE mounts with allow_other and the test suite need it)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing; this machine cannot mount FUSE filesystems" >&2
    exit 1
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: Python 3.11 or newer is required ($("$PY" --version))" >&2
    exit 1
fi
# CPython's own regression tests run against our mounts; Debian ships them separately.
if ! "$PY" -c 'import test.support' 2>/dev/null; then
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt-get install -y -qq "libpython${ver}-testsuite" >/dev/null || true
fi

stamp="$VENV/.piccolofs-installed"
# The install (and the compiled block runs it builds in place) follows these files.
want="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/piccolofs/format/gcm_runs.[ch] \
        "$REPO/piccolofs/format/_gcm_runs_build.py" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
        || ! "$VENV/bin/python" -c 'import piccolofs.format._gcm_runs' 2>/dev/null; then
    echo "setup: installing the project into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c 'import pyfuse3, trio, nacl, piccolofs' 
    echo "$want" > "$stamp"
fi
# pyfuse3 with the fallocate and lseek handlers (packaging/pyfuse3): built from the pinned,
# checked sdist plus the patch. A build that fails keeps the stock pyfuse3, which piccolofs
# detects at run time (fallocate then answers EOPNOTSUPP, as before).
pstamp="$VENV/.pyfuse3-patched"
pwant="$(cat "$REPO/packaging/pyfuse3/build.sh" "$REPO"/packaging/pyfuse3/*.patch \
         | sha256sum | cut -d' ' -f1)"
pfailed="$VENV/.pyfuse3-build-failed"  # this patch failed to build here: not retried each run
if [ "$(cat "$pfailed" 2>/dev/null)" = "$pwant" ] && [ -z "${PICCOLOFS_REBUILD_PYFUSE3:-}" ]; then
    :
elif [ ! -f "$pstamp" ] || [ "$(cat "$pstamp")" != "$pwant" ] \
        || ! "$VENV/bin/python" -c 'import pyfuse3; pyfuse3.Operations.fallocate' 2>/dev/null; then
    out="$(mktemp -d)"
    echo "setup: building pyfuse3 with fallocate/lseek (packaging/pyfuse3)" >&2
    if bash "$REPO/packaging/pyfuse3/build.sh" --python "$VENV/bin/python" "$out" >/dev/null \
            && "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
                --force-reinstall "$out"/pyfuse3-*.whl >&2; then
        echo "$pwant" > "$pstamp"
        rm -f "$pfailed"
    else
        echo "$pwant" > "$pfailed"
        echo "setup: the patched pyfuse3 did not build; keeping the stock one" \
             "(PICCOLOFS_REBUILD_PYFUSE3=1 to try again)" >&2
    fi
    rm -rf "$out"
fi
export PATH="$VENV/bin:$PATH"
