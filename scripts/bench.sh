#!/usr/bin/env bash
# Benchmarks: piccolofs vs gocryptfs vs a plain directory, in one run (docs/performance.md).
# Arguments go to `python -m benchmarks.run` (e.g. --quick, --disk /var/tmp, --compare REV).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"
exec python -m benchmarks.run "$@"
