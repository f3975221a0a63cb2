"""Per batch: the best learning rate over seeds, joined with the batch's throughput point.

Choosing the best trial of a batch follows Shallue et al. 2018 ("Measuring the
Effects of Data Parallelism on Neural Network Training"): trials of one batch are
grouped by learning rate; a group's steps to target is the *median* over its
seeds, a seed that did not reach the target counting as infinitely many steps, so
an LR reaches the target when more than half its seeds did (with two seeds: both).
The seed closest to the median (the lower one on a tie) stands for the LR in the
table's other columns. The LR with the fewest steps wins, ties broken by the lower LR. If no LR
reached the target, the non-failed trial with the most steps stands for the batch.

Speed comes from the batch's throughput point (``throughput.jsonl``), not from
the trials: time to target = steps to target x the point's median step time.

This module reads rows and points; it imports no JAX.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]
FAILED = ("diverged", "oom", "error")


def reached(row: Row) -> bool:
  return row["status"] == "ok" and row.get("steps_to_target") is not None


def group(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
  groups = collections.defaultdict(list)
  for row in rows:
    groups[key(row)].append(row)
  return dict(groups)


def _lr_key(row: Row) -> tuple[float, float]:
  return (row.get("lr_multiplier") or 0.0, row.get("lr") or 0.0)


def lr_groups(trials: list[Row]) -> list[dict[str, Any]]:
  """One entry per learning rate of a batch, ascending: its seeds' steps to target.

  Returns:
    Dicts with ``lr``, ``lr_multiplier``, ``rows``, ``seeds``, ``reached`` (seeds that
    reached the target), ``steps`` (the median, inf unless more than half reached),
    ``steps_min``/``steps_max`` over the seeds that reached it, ``diverged`` (seeds
    that diverged) and ``representative`` (the seed closest to the median).
  """
  out = []
  for (mult, lr), rows in sorted(group(trials, _lr_key).items()):
    steps = [r["steps_to_target"] if reached(r) else math.inf for r in rows]
    median = statistics.median(steps)
    hit = [s for s in steps if s != math.inf]
    rep = (min((r for r in rows if reached(r)),
               key=lambda r: (abs(r["steps_to_target"] - median), r["steps_to_target"],
                              r["seed"])) if median != math.inf else
           max(rows, key=lambda r: (r["status"] not in FAILED, r.get("steps") or 0)))
    out.append({"lr": lr, "lr_multiplier": mult, "rows": rows, "seeds": len(rows),
                "reached": len(hit), "steps": median, "steps_min": min(hit, default=None),
                "steps_max": max(hit, default=None),
                "diverged": sum(r["status"] == "diverged" for r in rows),
                "representative": rep})
  return out


def point_of(rows: list[Row], points: dict[str, Row]) -> Row | None:
  """The throughput point the rows of one batch were measured at (latest version)."""
  ids = [r.get("point_id") for r in sorted(rows, key=lambda r: r.get("measurement_version")
                                           or 0)]
  for point_id in reversed(ids):
    if point_id in points:
      return points[point_id]
  return None


def best_per_batch(rows: list[Row], points: list[Row] | None = None) -> list[Row]:
  """The best learning rate of every global batch, with its throughput point.

  Args:
    rows: trial rows (``read_results``).
    points: throughput points (``read_points``).

  Returns:
    One dict per batch, by batch: the representative trial's row plus
    ``selection`` (how it was chosen), ``trials_at_batch``, ``seeds_at_lr``,
    ``seeds_reached``, ``seed_steps`` (per seed, None where missed), ``steps_min``/
    ``steps_max`` over seeds, ``b_simple_median`` (the LR's trials) and the measured
    steps behind each of its values (``b_simple_steps``), ``lr_interior``
    (the chosen LR has a tried LR on both sides), ``lrs_tried``; and from the point:
    ``samples_per_sec``, ``samples_per_sec_iqr``, ``timed_windows``,
    ``step_time_ms``, ``time_to_target_s`` (median steps x step time) and
    ``point`` (the point's row, or None).
  """
  by_id = {p["point_id"]: p for p in points or []}
  out = []
  for batch, trials in sorted(group([r for r in rows if r.get("global_batch")],
                                    lambda r: r["global_batch"]).items()):
    lrs = lr_groups(trials)
    hits = [g for g in lrs if g["steps"] != math.inf]
    if hits:
      best = min(hits, key=lambda g: (g["steps"], g["lr"]))
      how = "fewest steps to target" + (f" (median of {best['seeds']} seeds)"
                                        if best["seeds"] > 1 else "")
    else:
      ran = [g for g in lrs if any(r["status"] not in FAILED for r in g["rows"])]
      best = max(ran or lrs, key=lambda g: g["representative"].get("steps") or 0)
      how = ("no LR reached the target" if any(r.get("target") for r in trials) else
             "no target") if ran else "every trial failed"
    index = lrs.index(best)
    point = point_of(trials, by_id)
    step_ms = (point or {}).get("step_time_ms")
    steps = best["steps"] if best["steps"] != math.inf else None
    rep = best["representative"]
    train_size = (rep.get("spec") or {}).get("train_size") or (
        rep["examples_to_target"] / rep["epochs_to_target"]
        if rep.get("examples_to_target") and rep.get("epochs_to_target") else None)
    examples = steps * batch if steps is not None else None
    seed_steps = [r["steps_to_target"] if reached(r) else None
                  for r in sorted(best["rows"], key=lambda r: r["seed"])]
    b_simple = [r["b_simple"] for r in best["rows"] if r.get("b_simple") is not None]
    b_simple_steps = [r["gns_steps"] for r in best["rows"]
                      if r.get("b_simple") is not None and r.get("gns_steps")]
    out.append({
        **rep, "selection": how, "trials_at_batch": len(trials), "seed_steps": seed_steps,
        "b_simple_median": statistics.median(b_simple) if b_simple else None,
        "b_simple_steps": b_simple_steps,
        "seeds_at_lr": best["seeds"], "seeds_reached": best["reached"],
        "steps_to_target": steps, "examples_to_target": examples,
        "epochs_to_target": examples / train_size if examples and train_size else None,
        "steps_min": best["steps_min"],
        "steps_max": best["steps_max"], "lrs_tried": [g["lr"] for g in lrs],
        "lr_interior": 0 < index < len(lrs) - 1,
        "point": point, "samples_per_sec": (point or {}).get("samples_per_sec"),
        "samples_per_sec_iqr": (point or {}).get("samples_per_sec_iqr"),
        "timed_windows": (point or {}).get("timed_windows"), "step_time_ms": step_ms,
        "time_to_target_s": steps * step_ms / 1e3 if steps and step_ms else None})
  return out
