"""What compare reads of a point, a trial and a probe, how a person recognises each, and
one baseline made from the same benchmark in several runs (a history's last K). No JAX.

A *summary* keeps the fields of a ``throughput.jsonl`` point or a ``results.jsonl`` row
that compare and the history need (raw windows, FLOPs, compiled peak, steps and time to
target, the machine and software it ran on); a full row works wherever a summary does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]
INF = math.inf


def _options(row: Row) -> str:
  opts = row.get("workload_options") or {}
  return ",".join(f"{k}={v}" for k, v in sorted(opts.items()))


def point_label(row: Row) -> str:
  """``digits_mlp[hidden=[32]] B=64 (1x64)``: what a person recognises a point by."""
  opts = _options(row)
  accum = row.get("accum_steps") or 1
  split = f"{row.get('num_devices')}x{row.get('per_device_batch')}" + (
      f" accum {accum}" if accum > 1 else "")
  return f"{row.get('workload')}{f'[{opts}]' if opts else ''} B={row.get('global_batch')} " \
         f"({split})"


def trial_label(row: Row, seed: bool = True) -> str:
  mult = row.get("lr_multiplier")
  lr = f" lr x{mult:g}" if isinstance(mult, (int, float)) else ""
  return point_label(row) + lr + (f" seed {row.get('seed')}" if seed else "")


def probe_label(probe: Row) -> str:
  b = probe["benchmark"]
  opts = ",".join(f"{k}={v}" for k, v in sorted((b.get("workload_options") or {}).items()))
  return f"probe {b.get('workload')}{f'[{opts}]' if opts else ''} " \
         f"budget {b.get('budget_bytes')} B"


POINT_FIELDS = ("point_id", "benchmark", "workload", "workload_options", "global_batch",
                "per_device_batch", "num_devices", "accum_steps", "window_samples_per_sec",
                "samples_per_sec", "step_time_ms", "timed_windows", "flops_per_step",
                "time_utc")
TRIAL_FIELDS = ("trial_id", "point_id", "benchmark", "workload", "workload_options",
                "global_batch", "per_device_batch", "num_devices", "accum_steps", "lr",
                "lr_multiplier", "seed", "status", "target", "steps_to_target", "time_to_target_s")


MACHINE_FIELDS = ("device_kind", "device_count", "host_cpu")
SOFTWARE_FIELDS = ("jax", "jaxlib", "flax", "optax", "python", "measurement_version")


def environment(row: Row) -> Row:
  """The machine and software a row was measured on (from its provenance)."""
  prov = row.get("provenance") or {}
  return {k: prov.get(k) for k in (*MACHINE_FIELDS, *SOFTWARE_FIELDS, "git_commit")}


def point_summary(row: Row) -> Row:
  """The fields of a throughput point that compare reads (compiled peak bytes flattened)."""
  out = {k: row.get(k) for k in POINT_FIELDS}
  out["peak_bytes"] = row.get("peak_bytes", (row.get("memory") or {}).get("peak_bytes"))
  out["provenance"] = environment(row)
  return out


def trial_summary(row: Row) -> Row:
  """The fields of a trial row that compare reads."""
  return {**{k: row.get(k) for k in TRIAL_FIELDS}, "provenance": environment(row)}


def probe_summary(probe: Row) -> Row:
  """A probe result (``probe/probe.json``): its identity, answer and per-batch peaks."""
  if "benchmark" in probe:  # already a summary
    return probe
  bench = {k: probe.get(k) for k in ("workload", "workload_options", "num_devices",
                                     "accum_steps", "unit", "budget_bytes", "cap")}
  answer = probe.get("answer") or {}
  return {"benchmark": bench, "largest_batch": answer.get("global_batch"),
          "peaks": {str(p["global_batch"]): p.get("peak_bytes")
                    for p in probe.get("points", []) if "global_batch" in p}}


def _median(values: Iterable[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def finite_or_none(value: float | None) -> float | None:
  return value if value is not None and math.isfinite(value) else None


def combine_points(runs: Sequence[Row]) -> Row:
  """One baseline point from the same point in several runs (oldest first).

  The windows are pooled for the test; the center is the median of the runs' medians;
  FLOPs and peak bytes are the median over the runs.
  """
  latest = dict(runs[-1])
  pooled = [w for r in runs for w in (r.get("window_samples_per_sec") or [])]
  medians = [statistics.median(r["window_samples_per_sec"]) for r in runs
             if r.get("window_samples_per_sec")]
  latest.update(window_samples_per_sec=pooled, runs=len(runs),
                baseline_center=statistics.median(medians) if medians else None,
                flops_per_step=_median(r.get("flops_per_step") for r in runs),
                peak_bytes=_median(r.get("peak_bytes") for r in runs))
  return latest


def has_target(row: Row) -> bool:
  """Whether the trial had a target (throughput-only trials have none)."""
  return row.get("target") is not None or row.get("steps_to_target") is not None


def steps_or_inf(row: Row) -> float | None:
  """Steps to target; ``inf`` when the trial ended without reaching it."""
  if row.get("steps_to_target") is not None:
    return float(row["steps_to_target"])
  return INF if row.get("status") else None


def time_or_inf(row: Row) -> float | None:
  """Time to target; ``inf`` for a missed target; None when it has no step time."""
  if row.get("steps_to_target") is None:
    return INF if row.get("status") else None
  return row.get("time_to_target_s")


def combine_trials(runs: Sequence[Row]) -> Row:
  """One baseline trial from the same trial in several runs: medians, a miss as inf."""
  latest = dict(runs[-1])
  steps = _median(steps_or_inf(r) for r in runs)
  time_s = _median(time_or_inf(r) for r in runs)
  reached = steps is not None and math.isfinite(steps)
  status = latest.get("status")
  latest.update(steps_to_target=finite_or_none(steps), runs=len(runs),
                time_to_target_s=finite_or_none(time_s),
                status="ok" if reached else "target_not_reached" if status == "ok" else status)
  return latest
