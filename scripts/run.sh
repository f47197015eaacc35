#!/usr/bin/env bash
# The main job, for now: a demo volume under a local state dir, mounted and shown working.
# Idempotent: the volume is created once and mounted if it is not already.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

STATE="${PICCOLO_STATE_DIR:-$REPO/.piccolo-state}"
CIPHER="$STATE/ciphertext/demo"
MNT="$STATE/mounts/demo"
PASSFILE="$STATE/demo.password"   # demo only: the daemon keeps keys sealed, never in a file

umask 077
mkdir -p "$STATE/ciphertext" "$MNT"
if [ ! -f "$PASSFILE" ]; then
    head -c 24 /dev/urandom | base64 > "$PASSFILE"
fi
if [ ! -f "$CIPHER/gocryptfs.conf" ]; then
    piccolofs init --passfile "$PASSFILE" "$CIPHER"
fi
if ! mountpoint -q "$MNT"; then
    piccolofs mount --passfile "$PASSFILE" "$CIPHER" "$MNT"
fi

date -u +"written through piccolofs at %FT%TZ" >> "$MNT/hello.txt"
mkdir -p "$MNT/photos/2026"
echo
echo "Plaintext view ($MNT):"
ls -la "$MNT"
tail -n 3 "$MNT/hello.txt"
echo
echo "What rests on disk ($CIPHER):"
ls -la "$CIPHER"
echo
piccolofs info "$CIPHER"
echo
echo "Mounted. Unmount with: piccolofs umount $MNT   (binary: $VENV/bin/piccolofs)"
