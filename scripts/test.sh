#!/usr/bin/env bash
# Set up .venv (see setup_env.sh), lint with ruff, run the test suite on 8 fake CPU devices.
# The tests run in TEST_WORKERS pytest-xdist processes (default: the usable CPUs, at most
# 4): most of a test's time is one thread compiling, so 2 workers on 2 cores nearly halve
# the wall time. TEST_WORKERS=0 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
WORKERS="${TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
.venv/bin/python -m pytest -q -n "$WORKERS" --dist load "$@"
