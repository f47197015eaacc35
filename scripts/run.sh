#!/usr/bin/env bash
# The main job: the control daemon on a local state dir, set up (first run) or unlocked,
# with the bootstrap and control volumes mounted and the CLI pointed at it.
# Idempotent: a running daemon is reused; setup happens once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

BASE="${PICCOLO_DEMO_DIR:-$REPO/.piccolo}"
export PICCOLO_STATE_DIR="${PICCOLO_STATE_DIR:-$BASE/state}"
export PICCOLO_RUN_DIR="${PICCOLO_RUN_DIR:-$BASE/run}"
PASSFILE="$BASE/admin.password"   # local demo only: a real box asks its owner
LOG="$BASE/piccolo-ctld.log"
PIDFILE="$PICCOLO_RUN_DIR/piccolo-ctld.pid"

umask 077
mkdir -p "$BASE" "$PICCOLO_RUN_DIR"
[ -f "$PASSFILE" ] || head -c 18 /dev/urandom | base64 > "$PASSFILE"

if ! piccoloctl status >/dev/null 2>&1; then
    echo "starting piccolo-ctld (state: $PICCOLO_STATE_DIR, log: $LOG)"
    nohup piccolo-ctld >>"$LOG" 2>&1 </dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 100); do
        piccoloctl status >/dev/null 2>&1 && break
        sleep 0.2
    done
fi

status="$(piccoloctl --json status)"
if echo "$status" | grep -q '"initialized": false'; then
    echo "first run: setting up the admin password (saved in $PASSFILE)"
    piccoloctl setup --password-file "$PASSFILE"
    piccoloctl --json recovery-key generate --with-password --password-file "$PASSFILE" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["recovery_key"])' \
        > "$BASE/recovery.key"
    echo "recovery key saved in $BASE/recovery.key (write it down, then delete the file)"
fi
if piccoloctl --json status | grep -q '"locked": true'; then
    piccoloctl unlock --password-file "$PASSFILE"
fi

date -u +"control volume touched at %FT%TZ" >> "$PICCOLO_STATE_DIR/mounts/control/demo.txt"
echo
piccoloctl volume list
echo
piccoloctl health
echo
echo "Daemon pid $(cat "$PIDFILE" 2>/dev/null || echo '?'); socket $PICCOLO_RUN_DIR/ctl.sock"
echo "Try:  export PATH=$VENV/bin:\$PATH PICCOLO_RUN_DIR=$PICCOLO_RUN_DIR"
echo "      piccoloctl events --follow      piccoloctl lock      piccoloctl volume list"
echo "Stop: kill \$(cat $PIDFILE)   (detaches every volume, keeps their intent)"
