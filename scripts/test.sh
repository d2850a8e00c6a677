#!/usr/bin/env bash
# Create the virtualenv if needed, then run lint, types and the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
echo "== ruff"; "$VENV/bin/ruff" check .
echo "== mypy"; "$VENV/bin/mypy"
echo "== pytest"; exec "$VENV/bin/pytest" -q -n "${DELTASHIP_TEST_WORKERS:-2}" --dist loadgroup "$@"
