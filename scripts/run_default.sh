#!/usr/bin/env bash
# Set up .venv (see setup_env.sh) and run the main job: the default batch-size sweep on the
# embedded digits data (no network). Extra arguments go to `batchbench sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR="${WORKDIR:-/tmp/batchbench_default}"
.venv/bin/batchbench sweep --config=configs/digits_mlp.py --workdir="$WORKDIR" "$@"
