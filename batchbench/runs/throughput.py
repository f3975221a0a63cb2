"""The throughput phase: how fast one sweep point trains, measured once, on its own.

A sweep point is (workload, global batch, split, devices, code version). Its
throughput is measured with pure train calls (no evals, no checkpoints), on the
program every trial of the batch runs, each call running its full K steps:

1. ``warmup_calls`` calls are run and discarded (the first may still allocate);
2. one more call is timed alone to size a window: ``min_seconds / min_windows``
   of work, whole calls;
3. windows are timed, each closed by ``jax.block_until_ready`` on the state and
   the losses, until there are at least ``min_windows`` of them *and*
   ``min_seconds`` of timed work (or ``max_seconds`` of it, whichever comes first).

The point's row (``throughput.jsonl``) keeps every window's samples/sec, so
``compare`` can test on the raw figures; the median, IQR and window count are
what the report shows. Time to target is steps to target x this step time.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from typing import Any

import jax

from batchbench.config import TrialSpec
from batchbench.core import distributed
from batchbench.core.program import MAX_IN_FLIGHT, Program, ProgramCache, build
from batchbench.measure.memory import PeakTracker
from batchbench.measure.timing import Window, WindowTimer, window_stats
from batchbench.store import results
from batchbench.store.meta import provenance

Log = Callable[[str], None]
# A figure from fewer timed windows than this is marked wherever it is shown.
MIN_TRUSTED_WINDOWS = 3


class OverBudget(RuntimeError):
  """The point's compiled peak is over the memory budget: it is not run."""


def measure(spec: TrialSpec, *, cache: ProgramCache | None = None,
            clock: Callable[[], float] = time.perf_counter, log: Log | None = None,
            on_window: Callable[[Window], None] | None = None) -> dict[str, Any]:
  """Measures the throughput point of ``spec``'s batch; returns its row.

  Args:
    spec: any trial of the point (its LR and seed are used, not part of the point).
    cache: programs shared with the trials of this process.
    clock: seconds clock.
    log: progress sink.
    on_window: called with each timed window after it closed, outside the timed
      region (the overhead benchmark runs its hand-written loops there).

  Returns:
    The ``throughput.jsonl`` row.
  """
  log = log or (lambda _: None)
  peak = PeakTracker(jax.local_devices()[:spec.num_devices])
  peak.start()
  start = time.perf_counter()
  if cache is None:
    program, hit = build(spec), False
  else:
    program, hit = cache.get(spec)
  obtain_s = time.perf_counter() - start
  budget, peak_bytes = spec.memory_budget_bytes, program.train.memory.get("peak_bytes")
  if budget and peak_bytes is not None and peak_bytes > budget:
    raise OverBudget(f"compiled peak {peak_bytes:,} bytes exceeds memory_budget_bytes "
                     f"{budget:,}: not measured")
  state = program.init_state(spec.seed, spec.lr)
  with program.feed(spec.seed) as feed:
    return _measure(spec, program, state, feed, hit, obtain_s, peak, clock, on_window, log)


def _measure(spec: TrialSpec, program: Program, state, feed, hit: bool, obtain_s: float,
             peak: PeakTracker, clock: Callable[[], float],
             on_window: Callable[[Window], None] | None, log: Log) -> dict[str, Any]:
  """The throughput phase's calls and windows: its point row."""
  settings = spec.throughput_settings
  k = spec.steps_per_call
  step = 0
  wait = [0.0]  # seconds the loop waited for inputs (host data), in timed windows

  def calls(state, n: int):
    nonlocal step
    outs = []
    for _ in range(n):
      start = clock()
      call_feed = feed(step)
      wait[0] += clock() - start
      state, metrics = program.run(state, call_feed, step=step)
      outs.append(metrics)
      if len(outs) > MAX_IN_FLIGHT:  # a bounded queue of calls (see MAX_IN_FLIGHT)
        jax.block_until_ready(outs[-MAX_IN_FLIGHT - 1])
      step += k
      feed.prefetch(step)
    jax.block_until_ready((state, outs))
    return state

  state = calls(state, settings["warmup_calls"])
  sizing = clock()
  state = calls(state, 1)
  call_s = max(clock() - sizing, 1e-9)
  per_window = settings["min_seconds"] / settings["min_windows"]
  # Decisions from clocks are process 0's, so that every process runs the same calls.
  calls_per_window = distributed.from_process_0(max(1, math.ceil(per_window / call_s)))
  timer = WindowTimer(clock, warmup_windows=0)
  timed = 0.0
  wait[0] = 0.0
  while distributed.from_process_0(
      (len(timer.windows) < settings["min_windows"] or timed < settings["min_seconds"])
      and timed < settings["max_seconds"]):
    timer.start()
    state = calls(state, calls_per_window)
    timed += timer.stop(calls_per_window * k * spec.global_batch, calls_per_window * k)
    if on_window is not None:
      on_window(timer.windows[-1])
  stats = window_stats(timer.windows)
  device_peak, peak_note = peak.stop()
  row = {
      "point_id": spec.point_id, "benchmark": spec.point_benchmark(),
      "workload": spec.workload, "workload_options": dict(spec.workload_options),
      "global_batch": spec.global_batch, "per_device_batch": spec.per_device_batch,
      "accum_steps": spec.accum_steps, "num_devices": spec.num_devices,
      "num_processes": spec.num_processes, "steps_per_call": k,
      "optimizer": spec.optimizer, **stats,
      "window_seconds": [w.seconds for w in timer.windows],
      "calls_per_window": calls_per_window, "settings": settings,
      "compile_s": obtain_s, "compile_cached": hit or program.train.cached,
      "program_compile_s": program.train.compile_s,
      "memory": {**program.train.memory, "device_peak_bytes": device_peak,
                 "device_peak_note": peak_note},
      "flops_per_step": program.flops_per_step,
      **program.utilization(stats.get("samples_per_sec")),
      "input_wait_s": wait[0], "input_wait_fraction": wait[0] / max(timed, 1e-12),
      "traces": len(program.train.traces),
      "provenance": provenance(), "measurement_version": spec.measurement_version,
      "time_utc": datetime.datetime.now(datetime.UTC).isoformat(),
  }
  log(f"[throughput {spec.workload} B={spec.global_batch}] {format_rate(row)} "
      f"({k} steps/call, {calls_per_window} call(s)/window, "
      + ("program from cache)" if row["compile_cached"] else f"compiled in {obtain_s:.2f}s)"))
  return row


def format_rate(point: dict[str, Any]) -> str:
  """``"123,456 samples/s (IQR 120,000-125,000, 7 windows)"``, marked when too few windows."""
  rate, iqr, n = point.get("samples_per_sec"), point.get("samples_per_sec_iqr"), point.get(
      "timed_windows", 0)
  if rate is None:
    return "no timed windows"
  mark = "" if n >= MIN_TRUSTED_WINDOWS else f" [only {n} window(s): not a median]"
  spread = f"IQR {_rate(iqr[0])}-{_rate(iqr[1])}, " if iqr else ""
  return f"{_rate(rate)} samples/s ({spread}{n} windows){mark}"


def _rate(x: float) -> str:
  """Whole samples/s, or 3 significant digits below 100 (a ResNet-50 on a CPU)."""
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def ensure_point(spec: TrialSpec, workdir: str, *, cache: ProgramCache | None = None,
                 log: Log | None = None,
                 measure_fn: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
  """The throughput point of ``spec``'s batch: read from ``workdir``, else measured and
  appended to ``throughput.jsonl`` (by process 0)."""
  found = next((p for p in results.read_points(workdir) if p["point_id"] == spec.point_id),
                None)
  # Every process must measure, or none: process 0's file decides (the workdir is
  # shared by all processes, as multi-process checkpoints require).
  if distributed.from_process_0(found is not None):
    if found is None:
      raise RuntimeError(f"process {jax.process_index()} does not see the throughput point "
                         f"{spec.point_id} that process 0 read in {workdir}: the workdir must "
                         "be one filesystem shared by every process (NFS, GCS)")
    return found
  point = (measure_fn or measure)(spec, cache=cache, log=log)
  if jax.process_index() == 0:
    results.append_row(workdir, point, results.THROUGHPUT_FILE)
  return point


def windows_of(point: dict[str, Any]) -> list[Window]:
  """A point's raw windows (for statistics over them)."""
  steps = point["calls_per_window"] * point["steps_per_call"]
  return [Window(steps * point["global_batch"], steps, s) for s in point["window_seconds"]]
