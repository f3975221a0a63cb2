#!/usr/bin/env bash
# Set up .venv (see setup_env.sh), lint with ruff, run the test suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
