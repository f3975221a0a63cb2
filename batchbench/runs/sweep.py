"""The sweep: global batches x LR multipliers x seeds, run or resumed, failures isolated.

``expand`` turns a config's ``sweep`` section into resolved ``TrialSpec``s, all
validated before anything runs. ``run_sweep`` goes batch by batch: it measures
the batch's throughput point (once; ``throughput.jsonl``), then runs every trial
of the batch that has no row in ``results.jsonl`` yet (a recorded outcome is
final), appending each row as the trial ends. Every LR and seed of a batch runs
the same compiled program: in this process from a ``ProgramCache``; with
``isolation="process"`` each trial runs in its own Python process, and JAX's
persistent compilation cache (``<workdir>/xla_cache`` unless given) serves them.
A trial that diverges, misses its target, is over the memory budget or raises is
recorded with that status and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections

from batchbench import fmt
from batchbench.config import ConfigError, TrialSpec, resolve
from batchbench.runs import throughput
from batchbench.runs.rows import make_row
from batchbench.store import checkpoint, results

ISOLATIONS = ("none", "process")
SWEEP_OVERRIDES = ("lr_rule", "reference_batch", "warmup_examples", "schedule")
XLA_CACHE_DIR = "xla_cache"
Log = Callable[[str], None]


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


def sweep_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the sweep section's overrides of top-level fields applied."""
  base = ml_collections.ConfigDict(config.to_dict())
  for field in SWEEP_OVERRIDES:
    if config.sweep[field] is not None:
      base[field] = config.sweep[field]
  return base


def resolve_trial(base: ml_collections.ConfigDict, num_devices: int, batch: int,
                  multiplier: float, seed: int) -> TrialSpec:
  """One trial of the sweep; an error names the sweep field that produced it."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.global_batch, c.lr_multiplier, c.seed = batch, float(multiplier), seed
  try:
    return resolve(c, num_devices)
  except ConfigError as e:
    axis = {"global_batch": "sweep.global_batches", "lr_multiplier": "sweep.lr_multipliers",
            "seed": "sweep.seeds"}.get(e.field)
    if axis:
      raise ConfigError(axis, e.value, e.valid) from e
    raise


def expand(config: ml_collections.ConfigDict, num_devices: int) -> list[TrialSpec]:
  """Resolves every trial of ``config``'s sweep section (batch-major order).

  Raises:
    ConfigError: on the first invalid trial, naming the sweep field and value.
  """
  sweep = config.sweep
  for field in ("lr_multipliers", "seeds"):
    if not sweep[field]:
      raise ConfigError(f"sweep.{field}", sweep[field], "must list at least one value")
  base = sweep_base(config)
  specs, seen = [], set()
  for batch, multiplier, seed in itertools.product(
      sweep_batches(sweep, config.global_batch), sweep.lr_multipliers, sweep.seeds):
    spec = resolve_trial(base, num_devices, batch, multiplier, seed)
    if spec.trial_id not in seen:
      seen.add(spec.trial_id)
      specs.append(spec)
  return specs


def _measure_point(runner, spec: TrialSpec, workdir: str, log: Log, options: RunOptions,
                   watch) -> tuple[dict[str, Any] | None, str | None]:
  """``(the batch's throughput point, None)``, or ``(None, why measuring it failed)``.

  A point over the memory budget is not an error: its trials record themselves as
  ``oom`` without running. Any other failure (out of device memory, a crash) is the
  batch's: its trials are recorded with it instead of being run into it again.
  """
  try:
    return runner.point(spec, workdir, log, options, watch), None
  except (KeyboardInterrupt, SystemExit, checkpoint.CheckpointError, checkpoint.Preempted):
    raise
  except throughput.OverBudget as e:
    log(f"  throughput point of batch {spec.global_batch}: {e}")
    return None, None
  except Exception as e:  # pylint: disable=broad-except  (isolate the batch)
    error = "".join(traceback.format_exception_only(type(e), e)).strip()
    log(f"  !! throughput point of batch {spec.global_batch} failed: "
        f"{fmt.first_line(error, 200)}; its trials are recorded with that error")
    return None, f"the throughput point of this batch failed: {error}"


def error_row(spec: TrialSpec, error: str, wall: float) -> dict[str, Any]:
  status = "oom" if "RESOURCE_EXHAUSTED" in error or "Out of memory" in error else "error"
  return make_row(spec, status=status, error=error, wall=wall)


def trial_dir(workdir: str, spec: TrialSpec) -> str:
  return f"{workdir}/trials/{spec.trial_id}"


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How each trial runs, beyond its spec: shared by the in-process and worker paths."""

  config_path: str | None = None  # imported by workers so its workloads register there
  fallback_to_previous_checkpoint: bool = False
  compilation_cache_dir: str | None = None  # workers' JAX persistent cache


class InProcess:
  """Runs points and trials in this process, sharing compiled programs."""

  def __init__(self):
    from batchbench.core.program import ProgramCache  # pylint: disable=g-import-not-at-top
    self.cache = ProgramCache()

  def point(self, spec: TrialSpec, workdir: str, log: Log, options: RunOptions, watch):
    del options, watch
    return throughput.ensure_point(spec, workdir, cache=self.cache, log=log)

  def trial(self, spec, workdir, log, options, watch, point):
    from batchbench.runs.trial import run_trial  # pylint: disable=g-import-not-at-top
    return run_trial(spec, log=log, workdir=trial_dir(workdir, spec), preemption=watch,
                     cache=self.cache, point=point,
                     fallback_to_previous_checkpoint=options.fallback_to_previous_checkpoint)


def run_sweep(specs: list[TrialSpec], workdir: str, *, isolation: str = "none",
              log: Log = print, options: RunOptions | None = None,
              runner: Any = None) -> dict[str, Any]:
  """Measures each batch's throughput point, then runs the trials that have no row yet.

  Trials keep checkpoints under ``<workdir>/trials/<trial_id>/``, so an interrupted
  trial continues from its latest one. A SIGTERM checkpoints the running trial at its
  next call boundary and raises ``checkpoint.Preempted``; a checkpoint that cannot be
  used raises ``checkpoint.CheckpointError``. Neither writes a row.

  Args:
    specs: from ``expand``.
    workdir: the sweep's directory (created by the caller).
    isolation: ``none`` (in this process) or ``process`` (one process per job).
    log: progress sink.
    options: how trials run (config path for workers, checkpoint fallback, cache dir).
    runner: an object with ``point(spec, workdir, log, options, watch)`` and
      ``trial(spec, workdir, log, options, watch, point)``; overrides ``isolation``
      (tests inject failures with it).

  Returns:
    ``{"total", "skipped", "ran", "statuses": {status: count}, "points": n}``.
  """
  if isolation not in ISOLATIONS:
    raise ConfigError("isolation", isolation, f"must be one of {', '.join(ISOLATIONS)}")
  options = options or RunOptions()
  if runner is None:
    if isolation == "process":
      from batchbench.runs.worker import Subprocess  # pylint: disable=g-import-not-at-top
      if options.compilation_cache_dir is None:
        options = dataclasses.replace(options,
                                      compilation_cache_dir=f"{workdir}/{XLA_CACHE_DIR}")
      runner = Subprocess()
    else:
      runner = InProcess()
  wanted = {s.trial_id for s in specs}
  done = {r["trial_id"] for r in results.read_results(workdir)} & wanted
  todo = [s for s in specs if s.trial_id not in done]
  skipped = len(done)
  if skipped:
    log(f"{skipped} of {len(specs)} trials already have results in {workdir}; skipping them")
  statuses: dict[str, int] = {}
  points: dict[str, dict[str, Any]] = {}
  start = time.perf_counter()
  with checkpoint.preemption_watch() as watch:
    for spec in specs:
      if watch.requested:
        raise checkpoint.Preempted(None, None, message=(
            "preempted between trials; every finished trial is recorded; rerun the same "
            "command to run the rest"))
      if spec.point_id not in points:  # also for a batch whose trials are all done
        points[spec.point_id] = _measure_point(runner, spec, workdir, log, options, watch)
      point, point_error = points[spec.point_id]
      if watch.requested:
        raise checkpoint.Preempted(None, None, message=(
            "preempted between trials; every finished trial is recorded; rerun the same "
            "command to run the rest"))
      if spec.trial_id in done:
        continue
      i = sum(statuses.values())  # trials run so far in this invocation
      elapsed = time.perf_counter() - start
      eta = f"~{fmt.duration(elapsed / i * (len(todo) - i))} left" if i else "ETA after 1 trial"
      log(f"[trial {skipped + i + 1}/{len(specs)}] B={spec.global_batch} lr={spec.lr:.4g} "
          f"(x{spec.lr_multiplier:g}) seed={spec.seed} | elapsed {fmt.duration(elapsed)} | "
          f"{eta}")
      trial_start = time.perf_counter()
      try:
        if point_error:
          raise RuntimeError(point_error)
        row = runner.trial(spec, workdir, log, options, watch, point)
      except checkpoint.Preempted as e:
        if e.row is not None:  # the trial finished in the window it was stopped in
          results.append_row(workdir, e.row)
        raise
      except (KeyboardInterrupt, SystemExit, checkpoint.CheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (isolate the trial)
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        log(f"  !! trial raised {error.splitlines()[0]}")
        row = error_row(spec, f"{error}\n{traceback.format_exc(limit=8)}",
                        time.perf_counter() - trial_start)
      results.append_row(workdir, row)
      statuses[row["status"]] = statuses.get(row["status"], 0) + 1
  return {"total": len(specs), "skipped": skipped, "ran": len(todo), "statuses": statuses,
          "points": len(points)}
