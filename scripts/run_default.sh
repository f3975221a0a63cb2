#!/usr/bin/env bash
# Set up .venv and run the main job: the default batch-size sweep on the embedded digits data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR="${WORKDIR:-/tmp/batchbench_default}"
.venv/bin/batchbench trial --config=configs/digits_mlp.py --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR/results.jsonl"
