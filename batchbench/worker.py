"""Runs one trial in its own process: ``python -m batchbench.worker SPEC_JSON ROW_JSON``.

Used by ``sweep --isolation=process``. The spec file holds the resolved spec, the
config file path (imported first, so workloads it registers exist here too) and
the trial directory; the row is written atomically to ``ROW_JSON``.
"""

import ctypes
import json
import os
import runpy
import signal
import sys

from batchbench import checkpoint, results, trial
from batchbench.config import TrialSpec
from batchbench.sweep import CHECKPOINT_ERROR_EXIT_CODE


def _die_with_parent() -> None:
  """Asks the kernel to SIGKILL this process when the sweep process dies (Linux)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  parent = os.environ.get("BATCHBENCH_PARENT_PID")
  if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
    sys.exit(1)


def main(spec_path: str, row_path: str) -> int:
  _die_with_parent()
  with open(spec_path, encoding="utf-8") as f:
    job = json.load(f)
  if job.get("config_path"):
    runpy.run_path(job["config_path"])  # registers any workloads the config defines
  spec = TrialSpec.from_dict(job["spec"])
  try:
    row = trial.run_trial(
        spec, log=lambda s: print(s, flush=True), workdir=job["trial_dir"],
        fallback_to_previous_checkpoint=job.get("fallback_to_previous_checkpoint", False))
  except checkpoint.Preempted as e:
    print(f"batchbench: {e}", file=sys.stderr, flush=True)
    if e.row is not None:
      results.atomic_write_text(row_path, json.dumps(results.to_jsonable(e.row)))
    return checkpoint.PREEMPTED_EXIT_CODE
  except checkpoint.CheckpointError as e:
    print(f"batchbench: error: {e}", file=sys.stderr, flush=True)
    return CHECKPOINT_ERROR_EXIT_CODE
  results.atomic_write_text(row_path, json.dumps(results.to_jsonable(row)))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
