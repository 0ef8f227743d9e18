# Sourced by the scripts: create or reuse a virtualenv and install minercore with what it needs.
# MINERCORE_VENV picks the virtualenv (default .venv); MINERCORE_EXTRAS the extras (default "test"; "test,bt10"
# installs bittensor 10.x instead of 11.x); torch==2.13.0 goes in first so that pip never resolves a different
# torch (on a GPU box the same pin gets the CUDA wheel).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${MINERCORE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.minercore-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
        || [ -n "$(find csrc -newer "$stamp" -name '*.pyx' 2>/dev/null)" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==${MINERCORE_TORCH:-2.13.0}"
    python -m pip install -q -e ".[${MINERCORE_EXTRAS:-test}]"
    touch "$stamp"
fi
