#!/usr/bin/env bash
# The nightly benchmark job: run the fixed suite (configs/nightly.py), compare it with a
# baseline, write the report, and exit 1 on a regression (or a failed suite entry), 2 on
# bad input, else 0.
#
# Environment (all optional):
#   WORKDIR        tonight's results (default /tmp/batchbench_nightly/<UTC date-time>)
#   BASELINE       a previous night's workdir (or its throughput.jsonl / results.jsonl)
#   HISTORY        a history directory: the baseline when BASELINE is unset (the median of
#                  its last BASELINE_RUNS runs), and where tonight's run is recorded
#   BASELINE_RUNS  how many of the history's last runs make the baseline (default 1)
#   SUITE          the suite config, PATH[:ARG] (default configs/nightly.py)
#   ALPHA, THRESHOLD  the comparison's significance level (0.01) and minimum change (0.05,
#                  or per metric: samples_per_sec=0.05,step_time_ms=0.05,time_to_target_s=0.1)
#   PY             a Python with batchbench installed (default: set up and use .venv)
#
# Report: $WORKDIR/nightly/compare.md and compare.json (and history/ with HISTORY).
# Cron, every night at 02:00, against the history of earlier nights:
#   0 2 * * * cd /path/to/batchbench && HISTORY=$HOME/bb_history bash scripts/nightly.sh \
#       >> $HOME/bb_nightly.log 2>&1 || mail -s "batchbench regression" me@example.com < /dev/null
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  bash scripts/setup_env.sh
  PY=.venv/bin/python
fi
WORKDIR="${WORKDIR:-/tmp/batchbench_nightly/$(date -u +%Y%m%d_%H%M%S)}"
status=0
"$PY" -c 'import sys
from batchbench.runs.nightly import job
sys.exit(job(sys.argv[1:]))' "$WORKDIR" "${BASELINE:-}" "${HISTORY:-}" "${BASELINE_RUNS:-1}" \
  "${SUITE:-configs/nightly.py}" "${ALPHA:-}" "${THRESHOLD:-}" || status=$?
echo "nightly: exit status $status; workdir $WORKDIR"
exit "$status"
