#!/usr/bin/env bash
# The whole test suite: lint, types, layer contracts, then every test against real mounts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"

cleanup() {
    # A crashed test run must not leave mounts behind: lazily unmount whatever is left
    # under pytest's temporary directories (and nothing else on the machine).
    awk '$0 ~ / - fuse\.piccolofs / || $0 ~ / - fuse\.gocryptfs / {print $5}' /proc/self/mountinfo \
        | { grep -E '^/tmp/pytest-of-' || true; } \
        | while read -r m; do fusermount3 -uz "$m" 2>/dev/null || true; done
    return 0
}
trap cleanup EXIT

echo "== ruff" && ruff check .
echo "== mypy" && mypy
echo "== import contracts" && lint-imports --no-cache
echo "== pytest"
set +e
python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
