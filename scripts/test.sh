#!/usr/bin/env bash
# Create the virtualenv if needed, then run lint, types and the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
# System tools some tests drive for real (unit files, a process as another user, mounts,
# a clock moved forward, nginx as the benchmarks' CDN stand-in).
missing=()
for tool in systemd-analyze:systemd setpriv:util-linux unshare:util-linux mount:mount faketime:faketime nginx:nginx-light; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${missing[*]}" >&2
        apt-get install -y -q "${missing[@]}" >&2
    else
        echo "scripts/test.sh: install ${missing[*]} (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
        exit 2
    fi
fi
echo "== ruff"; "$VENV/bin/ruff" check .
echo "== mypy"; "$VENV/bin/mypy"
echo "== pytest"; exec "$VENV/bin/pytest" -q -n "${DELTASHIP_TEST_WORKERS:-2}" --dist loadgroup "$@"
