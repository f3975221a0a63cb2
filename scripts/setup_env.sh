#!/usr/bin/env bash
# Creates (or reuses) .venv with Python 3.11+ and installs batchbench into it.
# Usage: source-free; prints nothing on success but pip's summary. Env: PYTHON, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"batchbench needs Python 3.11+, the venv has {sys.version.split()[0]}")
PY
"$VENV/bin/python" -m pip install -q -e ".[test]"
