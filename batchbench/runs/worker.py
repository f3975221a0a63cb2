"""One job in its own process: ``python -m batchbench.runs.worker JOB_JSON OUT_JSON``.

Used by ``sweep --isolation=process``: a job is a trial or a throughput point. The
job file holds the resolved spec, the config file path (imported first, so that
workloads it registers exist here too), the trial directory and the JAX
persistent compilation cache directory, which lets every trial of a batch load
the program the first one compiled. The result row is written atomically to
``OUT_JSON``. ``Subprocess`` is the sweep's runner that starts these processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from batchbench.config import TrialSpec
from batchbench.fmt import to_jsonable
from batchbench.store import checkpoint, results



def _die_with_parent() -> None:
  """Asks the kernel to SIGKILL this process when the sweep process dies (Linux)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  parent = os.environ.get("BATCHBENCH_PARENT_PID")
  if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
    sys.exit(1)


def use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at ``directory``, caching every program."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(job_path: str, out_path: str) -> int:
  _die_with_parent()
  with open(job_path, encoding="utf-8") as f:
    job = json.load(f)
  if job.get("compilation_cache_dir"):
    use_compilation_cache(job["compilation_cache_dir"])
  if job.get("config_path"):
    runpy.run_path(job["config_path"])  # registers any workloads the config defines
  from batchbench.runs import throughput, trial  # pylint: disable=g-import-not-at-top

  spec = TrialSpec.from_dict(job["spec"])
  log = lambda s: print(s, flush=True)
  try:
    if job["kind"] == "point":
      row = throughput.measure(spec, log=log)
    else:
      from batchbench.runs import observe  # pylint: disable=g-import-not-at-top
      import jax  # pylint: disable=g-import-not-at-top
      observers = observe.observers_for(job["workdir"], tensorboard=job["tensorboard"],
                                        mllog=job["mllog"],
                                        process_index=jax.process_index())
      row = trial.run_trial(spec, log=log, workdir=job["trial_dir"], point=job.get("point"),
                            fallback_to_previous_checkpoint=job["fallback"],
                            observers=observers, profile_steps=job["profile_steps"])
  except checkpoint.Preempted as e:
    print(f"batchbench: {e}", file=sys.stderr, flush=True)
    if e.row is not None:
      results.atomic_write_text(out_path, json.dumps(to_jsonable(e.row)))
    return checkpoint.PREEMPTED_EXIT_CODE
  except checkpoint.CheckpointError as e:
    print(f"batchbench: error: {e}", file=sys.stderr, flush=True)
    return checkpoint.CHECKPOINT_ERROR_EXIT_CODE
  results.atomic_write_text(out_path, json.dumps(to_jsonable(row)))
  return 0


class Subprocess:
  """The sweep's runner for ``--isolation=process``: every job in a fresh process.

  A crash becomes an ``error`` row. A SIGTERM to the sweep is forwarded to the job,
  which checkpoints and exits with ``PREEMPTED_EXIT_CODE``; a checkpoint error there
  exits with ``checkpoint.CHECKPOINT_ERROR_EXIT_CODE``. Both are re-raised here, never rows.
  """

  def point(self, spec: TrialSpec, workdir: str, log, options, watch) -> dict[str, Any]:
    from batchbench.runs import throughput  # pylint: disable=g-import-not-at-top

    def measure(spec, cache, log):
      del cache
      row, error = self._run({"kind": "point"}, spec, workdir, options, watch, log)
      if error:
        raise RuntimeError(f"measuring the throughput point failed: {error}")
      return row
    return throughput.ensure_point(spec, workdir, log=log, measure_fn=measure)

  def trial(self, spec, workdir, log, options, watch, point) -> dict[str, Any]:
    from batchbench.runs.sweep import error_row, trial_dir  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    row, error = self._run({"kind": "trial", "trial_dir": trial_dir(workdir, spec),
                            "fallback": options.fallback_to_previous_checkpoint,
                            "point": point, "workdir": workdir,
                            "tensorboard": options.tensorboard, "mllog": options.mllog,
                            "profile_steps": options.profile_steps},
                           spec, workdir, options, watch, log)
    if error:
      log(f"  !! {error}")
      return error_row(spec, error, time.perf_counter() - start)
    return row

  def _run(self, job, spec, workdir, options, watch, log):
    """Runs one job; returns ``(row, None)`` or ``(None, why it failed)``."""
    del log
    job = {**job, "spec": spec.to_dict(), "config_path": options.config_path,
           "compilation_cache_dir": options.compilation_cache_dir}
    with tempfile.TemporaryDirectory(prefix="batchbench-job-") as tmp:
      job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "row.json")
      with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
      env = dict(os.environ, BATCHBENCH_PARENT_PID=str(os.getpid()))
      proc = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-m", "batchbench.runs.worker", job_path, out_path], env=env)
      forwarded = False
      while proc.poll() is None:
        if watch is not None and watch.requested and not forwarded:
          proc.send_signal(signal.SIGTERM)
          forwarded = True
        time.sleep(0.05)
      row = None
      if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
          row = json.load(f)
    # Our forwarded SIGTERM may reach a process still starting, before it installs its
    # handler: it dies of the signal. That is a preemption too, not the job's outcome.
    if proc.returncode == checkpoint.PREEMPTED_EXIT_CODE or (
        forwarded and proc.returncode == -signal.SIGTERM):
      raise checkpoint.Preempted(None, job.get("trial_dir"), row, message=(
          f"preempted: trial {spec.trial_id} saved a checkpoint in {job.get('trial_dir')}; "
          "rerun the same command to resume"))
    if proc.returncode == checkpoint.CHECKPOINT_ERROR_EXIT_CODE:
      raise checkpoint.CheckpointError(
          f"trial {spec.trial_id}: checkpoint error in the trial process (message above)")
    if proc.returncode == 0 and row is not None:
      return row, None
    if proc.returncode < 0:
      name = signal.Signals(-proc.returncode).name
      return None, f"process killed by signal {name} ({-proc.returncode})"
    return None, f"process exited with status {proc.returncode}"


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
