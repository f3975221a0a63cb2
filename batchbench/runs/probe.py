"""Which global batches fit in memory? Compile the train step ahead of time and read it.

``run_probe`` compiles (without running) the train call a trial would run at global
batches ``u, 2u, 4u, ...`` (``u`` = data-parallel devices x accum_steps) up to a
cap, reads XLA's per-device memory figures (argument, output, alias and temp
bytes, and the peak computed from them: ``measure.memory.compiled_memory``) and
FLOPs per step, stops at the first batch whose compiled peak exceeds the budget,
and searches (interpolation, then bisection) between the last batch that fits
and that one, over multiples of ``u``. A least-squares line
``peak = fixed + per_example x global_batch`` summarises the points. The search
spends only compile time; nothing is allocated on the devices (the train state and
data are abstract). Only ``measure`` (below) runs anything.

The search assumes the peak does not shrink as the batch grows. Whatever the
curve, the answer fits and the next multiple of ``u`` was compiled and does not
(both are in the table). The sweep can use the same prediction for one spec with
``compiled_memory`` / ``compiled_peak_bytes``.

Budgets are strings with a unit (``parse_bytes``): ``2GiB``, ``512MiB``, ``1.5GB``.
By default the budget is the device memory the runtime reports
(``memory_stats()["bytes_limit"]``) minus 10%; the CPU runtime reports none, so
there a budget must be given. Where the runtime does report memory (GPU/TPU),
``measure_device_peak`` runs a few real steps at the answer and compares the
runtime's ``peak_bytes_in_use`` with the prediction.

Speed (``measure=True``, the CLI's ``--probe_time``): every batch that fits is then
timed like a throughput point (``runs.throughput.measure``) on the program the probe
compiled (the training set placed once; no second compile), kept short: 1 warm-up
call, 3 windows, the config's ``throughput.min_seconds`` / ``max_seconds`` capped at
0.5 s / 5 s. Each point gets samples/s, TFLOP/s per device and MFU
(``measure.mfu``). Model FLOPs per example and their source are on every point, run
or not.

Remat: a workload that takes a ``remat`` option is probed twice under the same
budget, ladder and search, once with ``remat`` False and once True (the config's own
setting is the primary probe: ``points`` and ``answer``), and the comparison holds
both largest batches, both compiled peaks per batch, and the throughput of both at
the largest batch both fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from batchbench.config import ConfigError, TrialSpec, open_workdir, resolve
from batchbench.config.errors import positive_int
from batchbench.core.mesh import make_mesh
from batchbench.core.program import Program, build
from batchbench.fmt import SIZE_HELP, format_bytes
from batchbench.measure.memory import device_budget_bytes
from batchbench.report.files import write_outputs
from batchbench.report.probe_text import draw_probe, format_probe
from batchbench.runs.probe_ladder import (Ladder, Prober, remat_comparison, timing_settings,
                                          with_remat)
from batchbench.workloads import get_workload, workload_options

PROBE_DIR = "probe"
DEFAULT_MAX_BATCH = 2**16
POINT_COLUMNS = ("global_batch", "remat", "per_device_batch", "num_devices", "accum_steps",
                 "steps_per_call", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                 "generated_code_bytes", "peak_bytes", "flops_per_step", "compile_s", "fits",
                 "phase", "model_flops_per_example", "model_flops_source", "samples_per_sec",
                 "timed_windows", "tflops_per_sec_per_device", "peak_tflops", "mfu",
                 "peak_source", "time_error")
# The timing of a batch that fits: a short look, not a sweep's throughput point.
Log = Callable[[str], None]


def memory_budget(memory_budget_bytes: int | None, config: ml_collections.ConfigDict,
                  devices: Sequence[Any] | None = None) -> tuple[int | None, str | None]:
  """The per-device memory budget and where it came from.

  In order: the argument (``--memory_budget``), ``config.memory_budget_bytes``, and,
  when ``devices`` are given, their reported memory minus 10%; else ``(None, None)``.

  Raises:
    ConfigError: a budget that is not a positive number of bytes.
  """
  for value, source in ((memory_budget_bytes, "--memory_budget"),
                        (config.get("memory_budget_bytes"), "config.memory_budget_bytes")):
    if value is not None:
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError("memory_budget", value, SIZE_HELP)
      return value, source
  budget = device_budget_bytes(devices) if devices else None
  return (budget, "device bytes_limit minus 10%") if budget else (None, None)


def positive(value: Any, field: str) -> int:
  """``value`` if it is a positive int, else a ``ConfigError`` naming ``field``."""
  return positive_int(value, field)


def with_fields(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy of ``config`` (references resolved) with ``fields`` set."""
  c = config.copy_and_resolve_references()
  for name, value in fields.items():
    c[name] = value
  return c


def compiled_memory(spec: TrialSpec, mesh=None, *, arrays=None,
                    flops: bool = True) -> dict[str, Any]:
  """Compiles ``spec``'s train call on abstract inputs and returns what XLA reports.

  Nothing is allocated on the devices. This is the probe's prediction for one
  spec; the trial compiles the same call, so the numbers match its row's memory.

  Args:
    spec: the resolved trial.
    mesh: its mesh (default: a ``data`` mesh of ``spec.num_devices``).
    arrays: the loaded dataset, if the caller has it (only shapes are used).
    flops: also lower one step for XLA's FLOP count.

  Returns:
    The compiled call's memory (per-device bytes, ``peak_bytes`` among them) plus
    ``compile_s`` and ``flops_per_step`` (None unless ``flops``).
  """
  return compiled_fields(build(spec, mesh=mesh, abstract=True, flops=flops, arrays=arrays))


def compiled_fields(program: Program) -> dict[str, Any]:
  return {**program.train.memory, "compile_s": program.train.compile_s,
          "flops_per_step": program.flops_per_step}


def compiled_peak_bytes(spec: TrialSpec, mesh=None) -> int | None:
  """The compiled per-device peak of ``spec``'s train call (None if XLA reports none)."""
  return compiled_memory(spec, mesh, flops=False)["peak_bytes"]


def ladder(start: int, cap: int) -> list[int]:
  """``start, 2 start, 4 start, ...`` up to ``cap``, and ``cap`` itself if not on it."""
  batches, b = [], start
  while b <= cap:
    batches.append(b)
    b *= 2
  if batches and batches[-1] != cap:
    batches.append(cap)
  return batches


def search_largest(peak_at: Callable[[int], int], batches: Sequence[int], unit: int,
                   budget: int) -> tuple[int | None, int | None]:
  """Largest batch whose ``peak_at`` fits ``budget``: walk ``batches``, then search between.

  Walks the increasing ``batches`` (multiples of ``unit``) until one does not
  fit, then searches the multiples of ``unit`` between the last that fit and
  it. Compiled memory is close to linear in the batch, so each step first
  interpolates between the bracketing peaks (usually two compiles find the
  answer); after ``log2(width)`` such steps it falls back to bisection, so the
  search ends whatever the curve.

  Returns:
    ``(largest fitting batch, the batch just above it that does not fit)``;
    the first is None when even ``batches[0]`` does not fit, the second None
    when every batch fits.
  """
  fits = over = p_fits = p_over = None
  for b in batches:
    peak = peak_at(b)
    if peak > budget:
      over, p_over = b, peak
      break
    fits, p_fits = b, peak
  if fits is None or over is None:
    return fits, over
  lo, hi = fits // unit, over // unit
  interpolations = max(1, math.ceil(math.log2(hi - lo)))
  while hi - lo > 1:
    if interpolations > 0 and p_over > p_fits:
      interpolations -= 1
      mid = lo + int((budget - p_fits) / (p_over - p_fits) * (hi - lo))
      mid = min(max(mid, lo + 1), hi - 1)
    else:
      mid = (lo + hi) // 2
    peak = peak_at(mid * unit)
    if peak <= budget:
      lo, p_fits = mid, peak
    else:
      hi, p_over = mid, peak
  return lo * unit, hi * unit


def fit_memory(points: Sequence[dict[str, Any]]) -> dict[str, float] | None:
  """Least-squares ``peak_bytes = fixed_bytes + bytes_per_example x global_batch``.

  Returns:
    The coefficients, R^2 and the largest absolute residual, or None with
    fewer than two distinct batches.
  """
  batch = np.array([p["global_batch"] for p in points], np.float64)
  peak = np.array([p["peak_bytes"] for p in points], np.float64)
  if len(set(batch.tolist())) < 2:
    return None
  design = np.stack([np.ones_like(batch), batch], axis=1)
  (fixed, per_example), *_ = np.linalg.lstsq(design, peak, rcond=None)
  residual = peak - design @ np.array([fixed, per_example])
  total = float(np.sum((peak - peak.mean()) ** 2))
  return {"fixed_bytes": float(fixed), "bytes_per_example": float(per_example),
          "r2": 1.0 - float(np.sum(residual**2)) / total if total > 0 else None,
          "max_residual_bytes": float(np.max(np.abs(residual))), "points": int(len(batch))}


def _positive_multiple(value: Any, field: str, unit: int, what: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % unit:
    raise ConfigError(field, value, f"must be a positive multiple of data-parallel devices x "
                                    f"accum_steps = {what} = {unit}")
  return value


def run_probe(config: ml_collections.ConfigDict, workdir: str, *,
              memory_budget_bytes: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
              min_batch: int | None = None, num_available_devices: int | None = None,
              cache: dict[str, dict[str, Any]] | None = None, measure: bool = True,
              log: Log | None = print) -> dict[str, Any]:
  """Finds the largest global batch whose compiled train call fits the memory budget.

  Every input is validated before anything is compiled. Results are written to
  ``<workdir>/probe/probe.{json,csv,png}``.

  Args:
    config: the trial config; its ``global_batch`` is ignored, its devices
      (``num_devices``) and ``accum_steps`` set the unit ``u`` of batches.
    workdir: where ``probe/`` is written.
    memory_budget_bytes: per-device budget; default ``config.memory_budget_bytes``,
      else the device memory minus 10%.
    max_batch: largest global batch to try (a multiple of ``u``); also capped at
      the training-set size.
    min_batch: first batch of the ladder (a multiple of ``u``; default ``u``).
    num_available_devices: local devices (default: all).
    cache: trial id -> compiled point; reused and filled, so probing another
      budget compiles only the new batches.
    measure: run real steps: time every batch that fits (samples/s, TFLOP/s per
      device, MFU; ``timing_settings``) and, where the runtime reports device memory,
      compare the answer's peak (``measure_device_peak``). False only compiles:
      nothing is placed on the devices.
    log: progress sink; None for silence.

  Returns:
    A dict with the points (of the config as given), the fit, the answer, the budget,
    the timing settings (None without ``measure``) and ``remat``
    (``remat_comparison``).

  Raises:
    ConfigError: an invalid input, or a budget below the smallest batch's peak.
  """
  log = log or (lambda _: None)
  available = num_available_devices or jax.local_device_count()
  devices, accum = config.num_devices or available, config.accum_steps
  guess = devices * accum if isinstance(devices, int) and isinstance(accum, int) else 1
  base = resolve(with_fields(config, global_batch=max(1, guess)), available)
  unit = base.num_devices * base.accum_steps
  what = f"{base.num_devices} x {base.accum_steps}"
  cap = _positive_multiple(max_batch, "max_batch", unit, what)
  limit = "max_batch"
  if base.train_size is not None and base.train_size // unit * unit < cap:
    cap, limit = base.train_size // unit * unit, "train_size"
  start = unit if min_batch is None else _positive_multiple(min_batch, "min_batch", unit, what)
  if start > cap:
    raise ConfigError("min_batch", start, f"must be at most the largest batch probed ({cap})")
  local = jax.local_devices()[:available]
  budget, source = memory_budget(memory_budget_bytes, config, local)
  if budget is None:
    raise ConfigError("memory_budget", None,
                      f"the {local[0].platform} runtime reports no device memory to default "
                      "to; pass --memory_budget with a unit, e.g. --memory_budget=2GiB")
  workdir = open_workdir(workdir)

  mesh = make_mesh(base.num_devices)
  workload = get_workload(base.workload, dict(base.workload_options))
  arrays = workload.data() if workload.source == "embedded" else None
  batches = ladder(start, cap)
  prober = Prober(available=available, mesh=mesh, workload=workload, arrays=arrays,
                   cache={} if cache is None else cache, budget=budget, batches=batches,
                   unit=unit, cap_limit=limit, timing=timing_settings(config), log=log)
  takes_remat = "remat" in workload_options(base.workload)
  remat = bool(dict(base.workload_options).get("remat", False)) if takes_remat else None
  log(f"[probe {base.workload}] {base.num_devices} device(s) x accum {base.accum_steps}; "
      f"budget {format_bytes(budget)} per device ({source}); batches {start}..{cap}"
      + ("" if remat is None else f"; remat {'on' if remat else 'off'}, then "
                                  f"{'off' if remat else 'on'}"))

  primary = Ladder(config, remat)
  prober.search(primary)
  if primary.largest is None:
    first = primary.points[batches[0]]
    raise ConfigError(
        "memory_budget", format_bytes(budget),
        f"below the compiled peak of the smallest global batch {first['global_batch']} "
        f"({first['per_device_batch']} per device): {format_bytes(first['peak_bytes'])} "
        f"({first['peak_bytes']:,} bytes) per device; give at least that much")
  other = common = None
  if remat is not None:
    other = Ladder(with_remat(config, not remat), not remat)
    prober.search(other)
    common = prober.common_batch(primary, other)
  rows = primary.rows()
  fit = fit_memory(rows)
  largest, over, points = primary.largest, primary.over, primary.points
  answer = {"global_batch": largest, "per_device_batch": points[largest]["per_device_batch"],
            "peak_bytes": points[largest]["peak_bytes"], "limited_by": primary.limited_by,
            "next_batch": over, "next_peak_bytes": points[over]["peak_bytes"] if over else None}
  if fit and fit["bytes_per_example"] > 0:
    answer["fit_global_batch"] = max(
        0, int((budget - fit["fixed_bytes"]) / fit["bytes_per_example"]) // unit * unit)
  result = {"workload": base.workload, "workload_options": dict(base.workload_options),
            "num_devices": base.num_devices, "accum_steps": base.accum_steps, "unit": unit,
            "budget_bytes": budget, "budget_source": source, "max_batch": max_batch,
            "cap": cap, "platform": jax.default_backend(),
            "device_kind": jax.local_devices()[0].device_kind,
            "compute_dtype": base.compute_dtype, "points": rows, "fit": fit,
            "answer": answer, "measured": None,
            "timing": prober.timing if measure else None}
  if measure and device_budget_bytes(mesh.devices.flat) is not None:
    # Before any timing: the runtime's peak is a high-water mark over the process.
    spec = resolve(with_fields(config, global_batch=largest), available)
    try:
      result["measured"] = measure_device_peak(spec, mesh, log=log)
    except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: the prediction was low
      result["measured"] = {"global_batch": largest, "error": str(e).splitlines()[0]}
      log(f"  running batch {largest} failed: {result['measured']['error']}")
  if measure:
    for batch in sorted(primary.points):
      prober.time(primary, batch)
    if other is not None:  # where the two compare, and the other's own answer
      for batch in sorted({common, other.largest} - {None}):
        prober.time(other, batch)
  result["remat"] = remat_comparison(base.workload, primary, other, common)
  if jax.process_index() == 0:
    result["files"] = write_outputs(os.path.join(workdir, PROBE_DIR), "probe", result,
                                    rows + (other.rows() if other else []), POINT_COLUMNS,
                                    lambda fig: draw_probe(fig, result))
  for line in format_probe(result).splitlines():
    log(line)
  return result


def measure_device_peak(spec: TrialSpec, mesh, calls: int = 3,
                        log: Log | None = print) -> dict[str, Any] | None:
  """GPU/TPU only: runs ``calls`` real train calls at ``spec`` and compares peaks.

  The runtime's ``peak_bytes_in_use`` is a high-water mark over the process's
  life, so this is meaningful in a process that has run nothing bigger (the
  probe itself only compiles).

  Returns:
    ``{"predicted_peak_bytes", "measured_peak_bytes", "ratio"}`` (measured /
    predicted), or None where the runtime reports no memory.
  """
  program = build(spec, mesh=mesh, flops=False)
  state = program.init_state(spec.seed, spec.lr)
  with program.feed(spec.seed) as feed:
    for i in range(calls):
      step = i * program.steps_per_call
      state, metrics = program.run(state, feed(step), step=step)
  jax.block_until_ready((state, metrics))
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  peaks = [int(p) for p in peaks if p is not None]
  predicted = program.train.memory.get("peak_bytes")
  if not peaks or not predicted:
    return None
  out = {"global_batch": spec.global_batch, "predicted_peak_bytes": predicted,
         "measured_peak_bytes": max(peaks), "ratio": max(peaks) / predicted}
  if log:
    log(f"  measured at batch {spec.global_batch}: peak_bytes_in_use "
        f"{format_bytes(out['measured_peak_bytes'])} vs predicted "
        f"{format_bytes(out['predicted_peak_bytes'])} (ratio {out['ratio']:.3f})")
  return out
