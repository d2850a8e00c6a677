# Sourced by the scripts: make sure ./.venv exists with deltaship and its test extras.
VENV="${DELTASHIP_VENV:-$PWD/.venv}"
stamp="$VENV/.deltaship-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating virtualenv in $VENV" >&2
    python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing deltaship and its test dependencies" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e '.[test]' >&2
    touch "$stamp"
fi
