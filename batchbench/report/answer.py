"""The answer: the critical batch, time and cost to target, the noise scale, generalization.

``answer`` turns a sweep's per-batch table (``analysis.selection.best_per_batch``)
and throughput points into the report's headline: the fit of steps to target
(``analysis.fit``; its regime statement, never one noisy ratio), the batch that
minimises time to target with its interval (``analysis.cost``; with a deadline, the
fewest device-seconds that meet it), B_simple beside B_crit (``analysis.noise``,
measured in the trials), and what the sweep measured about generalization
(``analysis.generalization``). Every sentence is computed from the numbers it cites.
"""

from __future__ import annotations

import statistics
from typing import Any

from batchbench.analysis import cost, fit
from batchbench.analysis.generalization import generalization
from batchbench import fmt
from batchbench.fmt import number

Row = dict[str, Any]


def fit_sweep(best: list[Row], **kwargs: Any) -> dict[str, Any]:
  """The critical-batch fit of steps to target over the best LR of every batch's seeds."""
  values = {r["global_batch"]: r["seed_steps"] for r in best if r.get("seed_steps")}
  return fit.fit_curve(values, "steps", **kwargs)


def noise_scale(best: list[Row], fitted: dict[str, Any]) -> dict[str, Any]:
  """B_simple per batch (median over the best LR's trials, at the target) beside B_crit."""
  per_batch = {r["global_batch"]: r["b_simple_median"] for r in best
               if r.get("b_simple_median") is not None}
  notes = sorted({r["gns_note"].removeprefix("not measured: ") for r in best
                  if r.get("gns_note")})
  out = {"per_batch": per_batch, "median": None, "ratio_to_b_crit": None, "text": ""}
  if not per_batch:
    out["text"] = ("The gradient noise scale was not measured"
                   + (f" ({'; '.join(notes)})" if notes else "") + ".")
    return out
  median = statistics.median(per_batch.values())
  out["median"] = median
  lo, hi = min(per_batch.values()), max(per_batch.values())
  missed = [r["global_batch"] for r in best
            if r["global_batch"] in per_batch and r.get("steps_to_target") is None]
  at = "the eval that met the target" + (
      f" (the last eval at {fmt.batches(missed)}, which missed it)" if missed else "")
  text = (f"The gradient noise scale B_simple, measured online in the train step at "
          f"{at}, is about {number(median)} (median over "
          f"{len(per_batch)} batch sizes; {number(lo)} to {number(hi)}")
  # Its sample: the measured steps behind each batch's moving averages.
  counts = [n for r in best if r.get("b_simple_median") is not None
            for n in r.get("b_simple_steps") or ()]
  every = sorted({r["gns_every"] for r in best if r.get("gns_every")})
  if counts:
    span = (number(min(counts)) if min(counts) == max(counts)
            else f"{number(min(counts))} to {number(max(counts))}")
    text += f"; each from {span} measured steps"
    if every == [1]:
      text += ", every step"
    elif len(every) == 1:
      text += f", one step in {every[0]}"
  text += ")"
  if fitted.get("status") == "ok":
    ratio = median / fitted["b_crit"]
    out["ratio_to_b_crit"] = ratio
    text += (f", against the fitted B_crit of {number(fitted['b_crit'])}: a ratio of "
             f"{number(ratio)}. B_simple estimates B_crit (McCandlish et al. 2018) from a "
             "different measurement, so a ratio within about 3 is agreement")
  out["text"] = text + "."
  return out


def answer(rows: list[Row], best: list[Row], points: list[Row], *,
           deadline_s: float | None = None) -> dict[str, Any]:
  """The fit, the time/cost plan, the noise scale and generalization, with their texts.

  Returns:
    ``{"fit", "plan", "noise", "generalization"}``; ``fit`` and ``plan`` are None for a
    workload without a target.
  """
  if not any(r.get("target") for r in rows):
    return {"fit": None, "plan": None, "noise": None, "generalization": None}
  fitted = fit_sweep(best)
  throughput = [{"global_batch": p["global_batch"], "step_time_ms": p["step_time_ms"],
                 "num_devices": p.get("num_devices", 1),
                 "timed_windows": p.get("timed_windows")}
                for p in {r["point"]["point_id"]: r["point"] for r in best
                          if r.get("point")}.values() if p.get("step_time_ms")]
  plan = cost.time_to_target(fitted, throughput, deadline_s=deadline_s)
  return {"fit": fitted, "plan": plan, "noise": noise_scale(best, fitted),
          "generalization": generalization(rows)}
