#!/usr/bin/env bash
# Benchmarks (docs/performance.md), each side by side with its peer in one run:
#   piccolofs vs gocryptfs vs securefs vs a plain directory (`python -m benchmarks.run`; a
#   tmpfs backing store by default, --disk DIR for a disk), then backups: export and import of a device
#   against tar of the same ciphertext (`python -m benchmarks.bundles`, on /var/tmp's disk,
#   or the --disk given).
# Arguments go to `python -m benchmarks.run` (e.g. --quick, --disk /var/tmp, --compare REV);
# --quick and --disk also reach the backup benchmark.
#   bash scripts/bench.sh bundles [ARGS]   the backup benchmark alone (--quick, --size-gib N,
#                                          --dir DIR, --only export,import,writer)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"
# securefs (C++) is the second peer beside gocryptfs.
if ! dpkg-query -W -f='${Status}' securefs 2>/dev/null | grep -q "install ok installed"; then
    apt-get install -y -qq securefs >/dev/null || echo "bench: securefs not installed" >&2
fi
if [ "${1:-}" = bundles ]; then
    shift
    exec python -m benchmarks.bundles "$@"
fi
python -m benchmarks.run "$@"
bundles=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --quick) bundles+=(--quick) ;;
        --disk) bundles+=(--dir "$2"); shift ;;
        --disk=*) bundles+=(--dir "${1#--disk=}") ;;
    esac
    shift
done
exec python -m benchmarks.bundles "${bundles[@]}"
