"""The sweep: global batches x LR multipliers x seeds, run or resumed, failures isolated.

``expand`` turns a config's ``sweep`` section into resolved ``TrialSpec``s, all
validated before anything runs. ``run_sweep`` goes batch by batch: it measures
the batch's throughput point (once; ``throughput.jsonl``), then runs every trial
of the batch that has no row in ``results.jsonl`` yet (a recorded outcome is
final), appending each row as the trial ends, then the batch's LR search
(``runs.rounds``). Every LR and seed of a batch runs the same compiled program:
in this process from a ``ProgramCache``; with ``isolation="process"`` each trial
runs in its own Python process, and JAX's persistent compilation cache
(``<workdir>/xla_cache`` unless given) serves them. A trial that diverges, misses
its target, is over the memory budget or raises is recorded with that status and
the sweep goes on. With a ``shard`` (``runs.shard``) it runs only its slice of the
trials, beside other shards on the same workdir.
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
from batchbench.runs import shard as shard_lib
from batchbench.runs.rounds import POINT_FAILED, BatchSearch, Rounds
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
    return None, error


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
  tensorboard: bool = False  # TensorBoard event files per trial
  mllog: bool = False  # :::MLLOG lines per trial
  profile_steps: int = 0  # jax.profiler trace of this many steady-state steps per trial


class InProcess:
  """Runs points and trials in this process, sharing compiled programs."""

  def __init__(self):
    from batchbench.core.program import ProgramCache  # pylint: disable=g-import-not-at-top
    self.cache = ProgramCache()

  def point(self, spec: TrialSpec, workdir: str, log: Log, options: RunOptions, watch):
    del options, watch
    return throughput.ensure_point(spec, workdir, cache=self.cache, log=log)

  def trial(self, spec, workdir, log, options, watch, point):
    from batchbench.runs import observe  # pylint: disable=g-import-not-at-top
    from batchbench.runs.trial import run_trial  # pylint: disable=g-import-not-at-top
    observers = observe.observers_for(workdir, tensorboard=options.tensorboard,
                                      mllog=options.mllog,
                                      process_index=jax_process_index())
    return run_trial(spec, log=log, workdir=trial_dir(workdir, spec), preemption=watch,
                     cache=self.cache, point=point, observers=observers,
                     profile_steps=options.profile_steps,
                     fallback_to_previous_checkpoint=options.fallback_to_previous_checkpoint)


@dataclasses.dataclass(frozen=True)
class LRSearch:
  """The sweep's LR search (``runs.lr_search``): the grid, how to extend it, and how far."""

  grid: tuple[float, ...]
  extend: Callable[[int, float], list[TrialSpec]]  # (batch, multiplier) -> a spec per seed
  factor: float = 2.0
  max_extensions: int = 3


LR_SEARCH_FILE = results.LR_SEARCH_FILE


def plan(config: ml_collections.ConfigDict,
         num_devices: int) -> tuple[list[TrialSpec], LRSearch | None]:
  """The sweep's grid trials (``expand``) and its LR search (None when it is off).

  Raises:
    ConfigError: an invalid trial or search setting, before anything runs.
  """
  specs = expand(config, num_devices)
  s = config.sweep.lr_search
  if not s.enabled:
    return specs, None
  if not (isinstance(s.factor, (int, float)) and s.factor > 1):
    raise ConfigError("sweep.lr_search.factor", s.factor, "must be a number > 1")
  if not (isinstance(s.max_extensions, int) and s.max_extensions >= 0):
    raise ConfigError("sweep.lr_search.max_extensions", s.max_extensions,
                      "must be an integer >= 0")
  base = sweep_base(config)
  seeds = tuple(config.sweep.seeds)

  def extend(batch: int, multiplier: float) -> list[TrialSpec]:
    return [resolve_trial(base, num_devices, batch, multiplier, seed) for seed in seeds]

  return specs, LRSearch(tuple(float(m) for m in config.sweep.lr_multipliers), extend,
                         float(s.factor), s.max_extensions)


class _Run:
  """One invocation of a sweep (or of its shard): runs points and trials, keeps the rows
  (all shards') and the counts."""

  def __init__(self, workdir: str, runner, log: Log, options: RunOptions, watch,
               shard: shard_lib.Shard = shard_lib.UNSPLIT):
    self.workdir, self.runner, self.log, self.options, self.watch = (
        workdir, runner, log, options, watch)
    self.shard = shard
    self.rows = {r["trial_id"]: r for r in results.read_results(workdir)}
    self.points: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    self.statuses: dict[str, int] = {}
    self.skipped = 0
    self.total = 0
    self.start = time.perf_counter()

  def check_preempted(self) -> None:
    if self.watch.requested:
      raise checkpoint.Preempted(None, None, message=(
          "preempted between trials; every finished trial is recorded; rerun the same "
          "command to run the rest"))

  def refresh(self) -> int:
    """Reads the rows other shards appended (unsplit, every row is this process's)."""
    if self.shard.split:
      self.rows = {r["trial_id"]: r for r in results.read_results(self.workdir)}
    return len(self.rows)

  def point(self, spec: TrialSpec) -> tuple[dict[str, Any] | None, str | None]:
    if spec.point_id not in self.points:  # also for a batch whose trials are all done
      with shard_lib.point_lock(self.workdir, spec.point_id, self.shard, self.log):
        self.points[spec.point_id] = _measure_point(self.runner, spec, self.workdir,
                                                    self.log, self.options, self.watch)
    self.check_preempted()
    return self.points[spec.point_id]

  def _append(self, row: dict[str, Any]) -> None:
    if jax_process_index() == 0:
      results.append_row(self.workdir, row)

  def trials(self, specs: list[TrialSpec]) -> None:
    """Runs those of ``specs`` in this shard's slice that have no row yet, appending
    each row as it ends."""
    specs = self.shard.mine(specs)
    self.total += len(specs)
    where = f" of shard {self.shard.label}" if self.shard.split else ""
    for spec in specs:
      self.check_preempted()
      point, point_error = self.point(spec)
      if spec.trial_id in self.rows:
        self.skipped += 1
        continue
      ran = sum(self.statuses.values())
      elapsed = time.perf_counter() - self.start
      self.log(f"[trial {self.skipped + ran + 1}/{self.total}{where}] B={spec.global_batch} "
               f"lr={spec.lr:.4g} (x{spec.lr_multiplier:g}) seed={spec.seed} | elapsed "
               f"{fmt.duration(elapsed)}")
      trial_start = time.perf_counter()
      try:
        if point_error:
          raise RuntimeError(f"{POINT_FAILED}: {point_error}")
        row = self.runner.trial(spec, self.workdir, self.log, self.options, self.watch, point)
      except checkpoint.Preempted as e:
        if e.row is not None:  # the trial finished in the window it was stopped in
          self._append(e.row)
        raise
      except (KeyboardInterrupt, SystemExit, checkpoint.CheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (isolate the trial)
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        self.log(f"  !! trial raised {error.splitlines()[0]}")
        row = error_row(spec, f"{error}\n{traceback.format_exc(limit=8)}",
                        time.perf_counter() - trial_start)
      self._append(row)
      self.rows[spec.trial_id] = row
      self.statuses[row["status"]] = self.statuses.get(row["status"], 0) + 1


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def run_sweep(specs: list[TrialSpec], workdir: str, *, isolation: str = "none",
              log: Log = print, options: RunOptions | None = None, runner: Any = None,
              search: LRSearch | None = None,
              shard: shard_lib.Shard = shard_lib.UNSPLIT) -> dict[str, Any]:
  """Batch by batch: the throughput point, the trials without a row, the LR search.

  Trials keep checkpoints under ``<workdir>/trials/<trial_id>/``, so an interrupted
  trial continues from its latest one. A SIGTERM checkpoints the running trial at its
  next call boundary and raises ``checkpoint.Preempted``; a checkpoint that cannot be
  used raises ``checkpoint.CheckpointError``. Neither writes a row.

  Args:
    specs: the grid trials, from ``expand`` (or ``plan``).
    workdir: the sweep's directory (created by the caller).
    isolation: ``none`` (in this process) or ``process`` (one process per job).
    log: progress sink.
    options: how trials run (config path for workers, checkpoint fallback, cache dir).
    runner: an object with ``point(spec, workdir, log, options, watch)`` and
      ``trial(spec, workdir, log, options, watch, point)``; overrides ``isolation``
      (tests inject failures with it).
    search: the LR search (``plan``); None runs the grid only.
    shard: the slice of the trials to run (``runs.shard``); default all of them.

  Returns:
    ``{"total", "skipped", "ran", "statuses": {status: count}, "points": n,
    "planned": [trial_id, ...]}``: counts of this shard's trials; ``planned`` is every
    trial of the sweep, all shards' and every LR-search round's.

  Raises:
    shard_lib.ShardTimeout: a split sweep waited too long for other shards' rows.
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
  mine = shard.mine(specs)
  done = sum(s.trial_id in {r["trial_id"] for r in results.read_results(workdir)}
             for s in mine)
  if done:
    log(f"{done} of {len(mine)} trials already have results in {workdir}; skipping them")
  batches = [BatchSearch([s for s in specs if s.global_batch == b])
             for b in dict.fromkeys(s.global_batch for s in specs)]
  with checkpoint.preemption_watch() as watch:
    run = _Run(workdir, runner, log, options, watch, shard)
    rounds = Rounds(run, search) if search is not None else None
    for i, batch in enumerate(batches):
      run.trials(batch.specs)
      if rounds:  # unsplit, this takes the batch's search to its end
        rounds.advance(batches[:i + 1])
    if rounds:
      rounds.settle(batches)
  ran = sum(run.statuses.values())
  return {"total": run.total, "skipped": run.skipped, "ran": ran, "statuses": run.statuses,
          "points": len(run.points), "planned": [s.trial_id for b in batches for s in b.specs]}
