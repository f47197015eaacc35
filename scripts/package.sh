#!/usr/bin/env bash
# Build the Debian package into dist/ (see docs/packaging.md), lint it and print its path.
#
# Usage: package.sh [--force]
#
# Idempotent, on Debian 12 as root: installs its build dependencies with apt, builds from a
# copy of the tree's files (tracked and untracked, not ignored) with dpkg-buildpackage, and
# runs lintian. A .deb already built from the very same files is reused (--force rebuilds).
# Everything but the .deb's path goes to stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="$REPO/dist"
WORK="$REPO/build/deb"
FORCE=""
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: package.sh [--force]" >&2; exit 2 ;;
esac

# Debian's own tools and interpreter only: a python first on PATH (pyenv, an active venv)
# must not leak into the package.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV PYENV_VERSION
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

if [ "$(id -u)" -ne 0 ]; then
    echo "package: run as root (apt for the build dependencies, the install test)" >&2
    exit 1
fi

# build-essential: dpkg-buildpackage checks it as an implicit build dependency;
# ca-certificates: pip fetches the dependencies from PyPI.
BUILD_DEPS=(build-essential debhelper dh-virtualenv dpkg-dev fakeroot lintian python3 python3-venv
            python3-dev libfuse3-dev libtss2-dev libssl-dev pkg-config gcc patch help2man
            ca-certificates)
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "package: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "package: $PY must be Python 3.11 (Debian 12); it is $("$PY" --version)" >&2
    exit 1
fi

version="$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
           "$REPO/pyproject.toml")"
debversion="$(dpkg-parsechangelog -l "$REPO/packaging/debian/changelog" -S Version)"
if [ "$version" != "$debversion" ]; then
    echo "package: pyproject.toml says $version, packaging/debian/changelog $debversion:" \
         "add a changelog entry (dch -c packaging/debian/changelog -v $version)" >&2
    exit 1
fi
arch="$(dpkg-architecture -qDEB_HOST_ARCH)"
deb="piccolofs_${debversion}_${arch}.deb"

# The files that make the package, and one digest of their names and contents.
mkdir -p "$WORK" "$DIST"
"$PY" - "$REPO" "$WORK/files" <<'EOF' > "$WORK/tree.new"
import hashlib, os, shutil, subprocess, sys
repo, out = sys.argv[1:3]
# Without git, what .gitignore names is left out by hand.
skip = {".git", ".venv", "build", "dist", ".piccolo", "__pycache__", ".mypy_cache",
        ".ruff_cache", ".pytest_cache", ".hypothesis", "benchmarks/results",
        "benchmarks/cache"}
names = None
if os.path.exists(os.path.join(repo, ".git")) and shutil.which("git"):
    res = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True)
    if res.returncode == 0:
        names = res.stdout.decode().split("\0")
if names is None:  # an unpacked tarball, or no usable git
    names = []
    for d, dirs, files in os.walk(repo):
        rel = os.path.relpath(d, repo)
        dirs[:] = [x for x in dirs if x not in skip and os.path.join(rel, x) not in skip
                   and not x.endswith(".egg-info")]
        names += [os.path.relpath(os.path.join(d, f), repo) for f in files]
names = sorted(n for n in set(names) if n and os.path.lexists(os.path.join(repo, n))
               and not os.path.isdir(os.path.join(repo, n)))
h = hashlib.sha256()
for n in names:
    p = os.path.join(repo, n)
    data = os.readlink(p).encode() if os.path.islink(p) else open(p, "rb").read()
    h.update(n.encode() + b"\0" + hashlib.sha256(data).digest())
with open(out, "wb") as f:
    f.write(b"".join(n.encode() + b"\0" for n in names))
print(h.hexdigest())
EOF
tree="$(cat "$WORK/tree.new")-$arch"
stamp="$DIST/.${deb}.tree"
if [ -z "$FORCE" ] && [ -f "$DIST/$deb" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$tree" ]; then
    echo "package: $deb is up to date with the tree (--force rebuilds)" >&2
    echo "$DIST/$deb"
    exit 0
fi

start=$SECONDS
src="$WORK/piccolofs-$debversion"
rm -rf "$src" "$WORK"/piccolofs_*
mkdir -p "$src"
tar -C "$REPO" --null -T "$WORK/files" -cf - | tar -C "$src" -xf -
rm -rf "$src/debian"
cp -a "$REPO/packaging/debian" "$src/debian"

# Kept between builds, per input that shapes the compiled code (debian/rules and its build
# flags, the pyfuse3 patch and script, python, libfuse): the patched pyfuse3 wheel, which
# debian/rules builds only when none is given, and pip's cache (tpm2-pytss is built from
# its sdist).
ckey="$(cat "$REPO/packaging/debian/rules" "$REPO/packaging/pyfuse3/build.sh" \
        "$REPO"/packaging/pyfuse3/*.patch <("$PY" --version) <(pkg-config --modversion fuse3) \
        | sha256sum | cut -c1-16)"
pcache="$WORK/cache/$ckey/pyfuse3"
export PIP_CACHE_DIR="$WORK/cache/$ckey/pip"
find "$WORK/cache" -mindepth 1 -maxdepth 1 ! -name "$ckey" -exec rm -rf {} + 2>/dev/null || true
if ls "$pcache"/pyfuse3-*.whl >/dev/null 2>&1; then
    mkdir -p "$src/debian/pyfuse3-wheel"
    cp "$pcache"/pyfuse3-*.whl "$src/debian/pyfuse3-wheel/"
fi

echo "package: building $deb (log: ${WORK#"$REPO"/}/build.log)" >&2
if ! (cd "$src" && dpkg-buildpackage -b -us -uc) > "$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log" >&2
    echo "package: dpkg-buildpackage failed (whole log: $WORK/build.log)" >&2
    exit 1
fi
if ! ls "$pcache"/pyfuse3-*.whl >/dev/null 2>&1; then
    mkdir -p "$pcache"
    cp "$src"/debian/pyfuse3-wheel/pyfuse3-*.whl "$pcache/"
fi
rm -f "$DIST"/piccolofs_*.deb "$DIST"/.piccolofs_*.tree
mv "$WORK/$deb" "$DIST/$deb"
rm -rf "$src"
echo "package: built in $((SECONDS - start)) s; lintian:" >&2

# Errors fail the build; warnings are shown (docs/packaging.md lists the expected ones).
lintian --fail-on error --tag-display-limit 0 "$DIST/$deb" >&2
echo "$tree" > "$stamp"
echo "$DIST/$deb"
