"""The sweep: global batches x LR multipliers x seeds, run or resumed, failures isolated.

``expand`` turns a config's ``sweep`` section into resolved ``TrialSpec``s, all
validated before anything runs. ``run_sweep`` skips every trial that already has
a row in ``results.jsonl`` (whatever its status: a recorded outcome is final),
runs the rest one by one and appends each row as the trial ends. A trial that
diverges, misses its target, is over the memory budget or raises is recorded
with that status and the sweep goes on. With ``isolation="process"`` each trial
runs in its own Python process, so a native crash or leaked device memory ends
only that trial (recorded as ``error`` with the signal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections

from batchbench import config as config_lib
from batchbench import results
from batchbench.config import ConfigError, TrialSpec

ISOLATIONS = ("none", "process")
CHECKPOINT_ERROR_EXIT_CODE = 3
SWEEP_OVERRIDES = ("lr_rule", "reference_batch", "warmup_examples", "schedule")


def sweep_batches(sweep: ml_collections.ConfigDict, default: int) -> tuple[int, ...]:
  """The global batches of a sweep section: a list, or a power-of-two range "lo:hi"."""
  if sweep.global_batches is not None and sweep.batch_range is not None:
    raise ConfigError("sweep.batch_range", sweep.batch_range,
                      "set either sweep.global_batches or sweep.batch_range, not both")
  if sweep.batch_range is not None:
    lo, _, hi = str(sweep.batch_range).partition(":")
    try:
      lo, hi = int(lo), int(hi)
    except ValueError:
      lo = hi = 0
    if not (lo > 0 and hi >= lo and lo & (lo - 1) == 0):
      raise ConfigError("sweep.batch_range", sweep.batch_range,
                        "must be 'LO:HI' with LO a power of two and HI >= LO, e.g. '8:1024'")
    out, b = [], lo
    while b <= hi:
      out.append(b)
      b *= 2
    return tuple(out)
  batches = sweep.global_batches if sweep.global_batches is not None else (default,)
  if not batches:
    raise ConfigError("sweep.global_batches", batches, "must list at least one global batch")
  return tuple(batches)


def expand(config: ml_collections.ConfigDict, num_devices: int) -> list[TrialSpec]:
  """Resolves every trial of ``config``'s sweep section.

  Raises:
    ConfigError: on the first invalid trial, naming the sweep field and value.
  """
  sweep = config.sweep
  base = ml_collections.ConfigDict(config.to_dict())
  for field in SWEEP_OVERRIDES:
    if sweep[field] is not None:
      base[field] = sweep[field]
  for field in ("lr_multipliers", "seeds"):
    if not sweep[field]:
      raise ConfigError(f"sweep.{field}", sweep[field], "must list at least one value")
  specs, seen = [], set()
  for batch in sweep_batches(sweep, config.global_batch):
    for multiplier in sweep.lr_multipliers:
      for seed in sweep.seeds:
        c = ml_collections.ConfigDict(base.to_dict())
        c.global_batch, c.lr_multiplier, c.seed = batch, float(multiplier), seed
        try:
          spec = config_lib.resolve(c, num_devices)
        except ConfigError as e:
          axis = {"global_batch": "sweep.global_batches", "lr_multiplier":
                  "sweep.lr_multipliers", "seed": "sweep.seeds"}.get(e.field)
          if axis:
            raise ConfigError(axis, e.value, e.valid) from e
          raise
        if spec.trial_id not in seen:
          seen.add(spec.trial_id)
          specs.append(spec)
  return specs


def _error_row(spec: TrialSpec, error: str, wall: float) -> dict[str, Any]:
  from batchbench import trial  # pylint: disable=g-import-not-at-top
  status = "oom" if "RESOURCE_EXHAUSTED" in error or "Out of memory" in error else "error"
  return trial.make_row(spec, status=status, error=error, wall=wall)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How each trial runs, beyond its spec: shared by the in-process and worker paths."""

  config_path: str | None = None  # imported by workers so its workloads register there
  fallback_to_previous_checkpoint: bool = False


def _run_in_process(spec: TrialSpec, workdir: str, log, options: RunOptions, watch):
  from batchbench import trial  # pylint: disable=g-import-not-at-top
  return trial.run_trial(
      spec, log=log, workdir=trial_dir(workdir, spec), preemption=watch,
      fallback_to_previous_checkpoint=options.fallback_to_previous_checkpoint)


def _run_subprocess(spec: TrialSpec, workdir: str, log, options: RunOptions, watch):
  """Runs one trial in a fresh Python process; a crash becomes an ``error`` row.

  A SIGTERM to the sweep is forwarded to the trial process, which checkpoints and
  exits with ``PREEMPTED_EXIT_CODE``; a checkpoint error there exits with
  ``CHECKPOINT_ERROR_EXIT_CODE``. Both are re-raised here, never recorded as rows.
  """
  from batchbench import checkpoint  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="batchbench-trial-") as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "row.json")
    with open(spec_path, "w", encoding="utf-8") as f:
      json.dump({"spec": spec.to_dict(), "config_path": options.config_path,
                 "trial_dir": trial_dir(workdir, spec),
                 "fallback_to_previous_checkpoint": options.fallback_to_previous_checkpoint}, f)
    cmd = [sys.executable, "-m", "batchbench.worker", spec_path, out_path]
    start = time.perf_counter()
    env = dict(os.environ, BATCHBENCH_PARENT_PID=str(os.getpid()))
    proc = subprocess.Popen(cmd, env=env)  # pylint: disable=consider-using-with
    forwarded = False
    while proc.poll() is None:
      if watch.requested and not forwarded:
        proc.send_signal(signal.SIGTERM)
        forwarded = True
      time.sleep(0.05)
    row = None
    if os.path.exists(out_path):
      with open(out_path, encoding="utf-8") as f:
        row = json.load(f)
    if proc.returncode == checkpoint.PREEMPTED_EXIT_CODE:
      raise checkpoint.Preempted(None, trial_dir(workdir, spec), row, message=(
          f"preempted: trial {spec.trial_id} saved a checkpoint in {trial_dir(workdir, spec)};"
          " rerun the same command to resume"))
    if proc.returncode == CHECKPOINT_ERROR_EXIT_CODE:
      raise checkpoint.CheckpointError(
          f"trial {spec.trial_id}: checkpoint error in the trial process (message above)")
    if proc.returncode == 0 and row is not None:
      return row
    if proc.returncode < 0:
      name = signal.Signals(-proc.returncode).name
      error = f"trial process killed by signal {name} ({-proc.returncode})"
    else:
      error = f"trial process exited with status {proc.returncode}"
    log(f"  !! {error}")
    return _error_row(spec, error, time.perf_counter() - start)


def trial_dir(workdir: str, spec: TrialSpec) -> str:
  return os.path.join(workdir, "trials", spec.trial_id)


def _fmt_s(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_sweep(specs: list[TrialSpec], workdir: str, *, isolation: str = "none",
              log: Callable[[str], None] = print, options: RunOptions | None = None,
              runner: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
  """Runs the trials of ``specs`` that have no row yet, appending rows as they end.

  Trials keep checkpoints under ``<workdir>/trials/<trial_id>/``, so an interrupted
  trial continues from its latest one. A SIGTERM checkpoints the running trial at
  its next call boundary and raises ``checkpoint.Preempted``; a checkpoint that
  cannot be used raises ``checkpoint.CheckpointError``. Neither writes a row.

  Args:
    specs: from ``expand``.
    workdir: the sweep's directory (created by the caller).
    isolation: ``none`` (trials in this process) or ``process`` (one process each).
    log: progress sink.
    options: how trials run (config path for workers, checkpoint fallback).
    runner: ``(spec, workdir, log, options, watch) -> row``; overrides ``isolation``
      (tests inject failures with it).

  Returns:
    ``{"total", "skipped", "ran", "statuses": {status: count}}``.
  """
  from batchbench import checkpoint  # pylint: disable=g-import-not-at-top
  if isolation not in ISOLATIONS:
    raise ConfigError("isolation", isolation, f"must be one of {', '.join(ISOLATIONS)}")
  options = options or RunOptions()
  runner = runner or (_run_subprocess if isolation == "process" else _run_in_process)
  done = {r["trial_id"]: r for r in results.read_results(workdir)}
  todo = [s for s in specs if s.trial_id not in done]
  skipped = len(specs) - len(todo)
  if skipped:
    log(f"{skipped} of {len(specs)} trials already have results in {workdir}; skipping them")
  statuses: dict[str, int] = {}
  best = _best_time_to_target(done.values())
  start = time.perf_counter()
  with checkpoint.preemption_watch() as watch:
    for i, spec in enumerate(todo):
      if watch.requested:
        raise checkpoint.Preempted(None, None, message=(
            "preempted between trials; every finished trial is recorded; rerun the same "
            "command to run the rest"))
      elapsed = time.perf_counter() - start
      eta = f"~{_fmt_s(elapsed / i * (len(todo) - i))} left" if i else "ETA after first trial"
      best_text = f" | best time to target {best[0]:.2f}s at B={best[1]}" if best else ""
      log(f"[trial {skipped + i + 1}/{len(specs)}] B={spec.global_batch} lr={spec.lr:.4g} "
          f"(x{spec.lr_multiplier:g}) seed={spec.seed} | elapsed {_fmt_s(elapsed)} | {eta}"
          f"{best_text}")
      trial_start = time.perf_counter()
      try:
        row = runner(spec, workdir, log, options, watch)
      except checkpoint.Preempted as e:
        if e.row is not None:  # the trial finished in the window it was stopped in
          results.append_row(workdir, e.row)
        raise
      except (KeyboardInterrupt, SystemExit, checkpoint.CheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (isolate the trial)
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        log(f"  !! trial raised {error.splitlines()[0]}")
        row = _error_row(spec, f"{error}\n{traceback.format_exc(limit=8)}",
                         time.perf_counter() - trial_start)
      results.append_row(workdir, row)
      statuses[row["status"]] = statuses.get(row["status"], 0) + 1
      best = _best_time_to_target([row] + ([{"time_to_target_s": best[0],
                                              "global_batch": best[1]}] if best else []))
  return {"total": len(specs), "skipped": skipped, "ran": len(todo), "statuses": statuses}


def _best_time_to_target(rows) -> tuple[float, int] | None:
  timed = [(r["time_to_target_s"], r["global_batch"]) for r in rows
           if r.get("time_to_target_s") is not None]
  return min(timed) if timed else None
