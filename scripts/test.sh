#!/usr/bin/env bash
# Runs the whole test suite (and every benchmark once, untimed). Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
python -m minercore info
python -m ruff check .
exec python -m pytest -q "$@"
