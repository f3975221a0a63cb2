"""The probe's ladders: one configuration's compiled points, the search for its largest
batch, the timing of the batches that fit, and the remat comparison of two ladders.

``runs.probe`` runs them; the memory model, the ladder of batches and the search are
there (imported at call time: ``runs.probe`` imports this module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from batchbench.config import TrialSpec, resolve
from batchbench.core.program import Program, build, utilization
from batchbench.data import placement
from batchbench.fmt import format_bytes
from batchbench.runs import throughput

Log = Callable[[str], None]


def _probe():
  from batchbench.runs import probe  # pylint: disable=g-import-not-at-top
  return probe

# How a batch that fits is timed (never longer than the config's throughput section).
TIMING = {"warmup_calls": 1, "min_windows": 3, "min_seconds": 0.5, "max_seconds": 5.0}
TIMING_FIELDS = ("samples_per_sec", "samples_per_sec_iqr", "timed_windows", "step_time_ms")


def timing_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The throughput settings a batch that fits is timed with: ``TIMING``, never longer
  than the config's ``throughput`` section asks for."""
  t = config.throughput
  return {**TIMING, "min_seconds": min(t.min_seconds, TIMING["min_seconds"]),
          "max_seconds": min(t.max_seconds, TIMING["max_seconds"])}


def with_remat(config: ml_collections.ConfigDict, remat: bool) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``workload_options.remat`` set (a locked config too)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.workload_options.remat = remat
  return c


@dataclasses.dataclass
class Ladder:
  """One configuration probed: the config, or the config with remat flipped.

  Attributes:
    config: the trial config (the probe sets its global batch per point).
    remat: its ``workload_options.remat``; None for a workload without that option.
    points: the compiled points, by global batch.
    programs: compiled programs of points that fit, kept until they are timed.
    largest: the largest batch that fits (None: not even the first).
    over: the next multiple of the unit, which does not fit (None: every batch fits).
    limited_by: ``memory_budget``, or the cap (``max_batch``/``train_size``).
  """

  config: ml_collections.ConfigDict
  remat: bool | None
  points: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
  programs: dict[int, Program] = dataclasses.field(default_factory=dict)
  largest: int | None = None
  over: int | None = None
  limited_by: str | None = None

  def rows(self) -> list[dict[str, Any]]:
    """The points by batch."""
    return [self.points[b] for b in sorted(self.points)]

  def summary(self) -> dict[str, Any]:
    """The ladder's answer and points, for the remat comparison."""
    return {"remat": self.remat, "largest_batch": self.largest,
            "peak_bytes": self.points[self.largest]["peak_bytes"] if self.largest else None,
            "next_batch": self.over,
            "next_peak_bytes": self.points[self.over]["peak_bytes"] if self.over else None,
            "limited_by": self.limited_by, "points": self.rows()}


class _OneProgram:
  """The program cache ``throughput.measure`` asks, holding the one program the probe
  compiled: timing a batch does not compile it again."""

  def __init__(self, program: Program):
    self.program = program

  def get(self, spec: TrialSpec) -> tuple[Program, bool]:
    del spec
    return self.program, True


class Prober:
  """Compiles, searches and times the ladders of one probe (one mesh, one budget)."""

  def __init__(self, *, available: int, mesh, workload, arrays, cache: dict[str, Any],
               budget: int, batches: list[int], unit: int, cap_limit: str,
               timing: dict[str, Any], log: Log):
    self.available, self.mesh, self.workload, self.arrays = available, mesh, workload, arrays
    self.cache, self.budget, self.batches, self.unit = cache, budget, batches, unit
    self.cap_limit, self.timing, self.log = cap_limit, timing, log
    self._placed = None

  def compile(self, ladder: Ladder, batch: int, phase: str) -> int:
    """Compiles ``ladder`` at ``batch`` (unless the cache has it); its peak bytes."""
    spec = resolve(_probe().with_fields(ladder.config, global_batch=batch), self.available)
    if spec.trial_id not in self.cache:
      program = build(spec, mesh=self.mesh, abstract=True, flops=True, arrays=self.arrays)
      self.cache[spec.trial_id] = _probe().compiled_fields(program)
      ladder.programs[batch] = program
    point = {"global_batch": batch, "remat": ladder.remat,
             "per_device_batch": spec.per_device_batch, "num_devices": spec.num_devices,
             "accum_steps": spec.accum_steps, "steps_per_call": spec.steps_per_call,
             **self.cache[spec.trial_id]}
    if point["peak_bytes"] is None:
      raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis "
                         "for compiled programs; the probe cannot predict memory here")
    point["fits"] = point["peak_bytes"] <= self.budget
    if not point["fits"]:
      ladder.programs.pop(batch, None)
    point["phase"] = phase
    point.update(dict.fromkeys(TIMING_FIELDS), time_error=None,
                 **self.utilization(spec, point, None))
    ladder.points[batch] = point
    label = "" if ladder.remat is None else f", remat {'on' if ladder.remat else 'off'}"
    self.log(f"  batch {batch:>8,d}{label}: peak {format_bytes(point['peak_bytes']):>10s} "
             f"({'fits' if point['fits'] else 'over budget'}), compiled in "
             f"{point['compile_s']:.2f}s")
    return point["peak_bytes"]

  def search(self, ladder: Ladder) -> None:
    """The ladder's largest batch within the budget (``search_largest``)."""
    peak_at = lambda b: self.compile(ladder, b, "ladder" if b in self.batches else "search")
    ladder.largest, ladder.over = _probe().search_largest(peak_at, self.batches, self.unit,
                                                 self.budget)
    ladder.limited_by = "memory_budget" if ladder.over else self.cap_limit

  def common_batch(self, a: Ladder, b: Ladder) -> int | None:
    """The largest batch both ladders compiled and fit: the smaller of their answers,
    compiled in the other ladder where it is missing."""
    if a.largest is None or b.largest is None:
      return None
    batch = min(a.largest, b.largest)
    for ladder in (a, b):
      if batch not in ladder.points:
        self.compile(ladder, batch, "compare")
    both = [x for x, p in a.points.items()
            if p["fits"] and x in b.points and b.points[x]["fits"]]
    return max(both, default=None)

  def utilization(self, spec: TrialSpec, point: dict[str, Any],
                  samples_per_sec: float | None) -> dict[str, Any]:
    """The point's FLOPs and MFU fields at ``samples_per_sec``."""
    return utilization(self.workload, spec, point["flops_per_step"],
                       self.mesh.devices.flat[0].device_kind, samples_per_sec)

  def time(self, ladder: Ladder, batch: int) -> None:
    """Times ``ladder``'s point at ``batch`` (it fits) with the throughput phase."""
    point = ladder.points[batch]
    if not point["fits"] or point["samples_per_sec"] is not None:
      return
    spec = resolve(_probe().with_fields(ladder.config, global_batch=batch,
                               memory_budget_bytes=self.budget,
                               throughput=ml_collections.ConfigDict(self.timing)),
                   self.available)
    program = ladder.programs.pop(batch, None)
    if program is None:  # compiled by an earlier probe sharing the cache
      program = build(spec, mesh=self.mesh, abstract=True, flops=False, arrays=self.arrays)
    if self.arrays is not None:  # the abstract program's dataset, now on the devices
      if self._placed is None:
        self._placed = placement.put_train_data(self.arrays.train, self.mesh)
      program = dataclasses.replace(program, data=self._placed)
    try:
      row = throughput.measure(spec, cache=_OneProgram(program))
    except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: over the device
      point["time_error"] = str(e).splitlines()[0]
      self.log(f"  timing batch {batch:,} failed: {point['time_error']}")
      return
    point.update({k: row.get(k) for k in TIMING_FIELDS})
    point.update(self.utilization(spec, point, row.get("samples_per_sec")))
    label = "" if ladder.remat is None else f", remat {'on' if ladder.remat else 'off'}"
    tflops = point["tflops_per_sec_per_device"]
    self.log(f"  timed batch {batch:>8,d}{label}: {throughput.format_rate(row)}"
             + ("" if tflops is None else f", {tflops:.3g} TFLOP/s per device"))


def remat_comparison(workload: str, primary: Ladder, other: Ladder | None,
                     common: int | None) -> dict[str, Any]:
  """Both ladders' answers and the throughput of both at the largest batch both fit."""
  if other is None:
    return {"available": False,
            "note": f"remat is not available for workload {workload} (it takes no remat "
                    "option)"}
  off, on = (other, primary) if primary.remat else (primary, other)
  rate = lambda ladder: ladder.points[common]["samples_per_sec"] if common else None
  without, with_ = rate(off), rate(on)
  return {"available": True, "config_remat": primary.remat, "without": off.summary(),
          "with": on.summary(), "common_batch": common, "samples_per_sec_without": without,
          "samples_per_sec_with": with_,
          "throughput_cost": 1 - with_ / without if without and with_ is not None else None}
