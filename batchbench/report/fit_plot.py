"""Plots of the critical-batch fit and of the time to target built on it.

Both draw on a standalone matplotlib ``Figure`` (no pyplot, so no global state). The
perfect-scaling line and the fitted curve come from ``analysis.fit``'s shared functions,
so the plot shows the same definitions the text states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.ticker import LogFormatter, NullLocator

from batchbench.analysis.fit import perfect_scaling_line, predict, scale_key

Fit = dict[str, Any]


def _batch_axis(ax, batches: Sequence[int]) -> None:
  ax.set_xscale("log", base=2)
  ticks = sorted(set(int(b) for b in batches))
  ax.set_xticks(ticks, labels=[str(b) for b in ticks])
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xlabel("global batch")
  ax.grid(True, which="major", alpha=0.3)


def _reached(values: Sequence[float | None]) -> list[float]:
  return [float(v) for v in values if v is not None and np.isfinite(v)]


def draw_fit(fig: Any, fit_result: Fit, points_for_plot: Mapping[int, Sequence[float | None]]
             ) -> None:
  """Measured points, the fitted curve with its bootstrap band, perfect scaling and B_crit.

  Args:
    fig: a matplotlib ``Figure``.
    fit_result: an ``analysis.fit.fit_curve`` result.
    points_for_plot: global batch -> per-seed values (None or inf = missed the target,
      not plotted), the values the fit was given.
  """
  ax = fig.subplots()
  unit = fit_result["unit"]
  excluded = {e["global_batch"] for e in fit_result.get("excluded", [])}
  batches = sorted(points_for_plot)
  for b in batches:
    seeds = _reached(points_for_plot[b])
    ax.plot([b] * len(seeds), seeds, ".", color="gray", alpha=0.6, markersize=4,
            label="per seed" if b == batches[0] else None)
  medians = {b: float(np.median(v)) for b in batches
             if len(v := [np.inf if x is None else x for x in points_for_plot[b]])}
  kept = [b for b in batches if np.isfinite(medians.get(b, np.inf)) and b not in excluded]
  ax.plot(kept, [medians[b] for b in kept], "o", color="C0", label="median")
  rise = [b for b in batches if b in excluded and np.isfinite(medians.get(b, np.inf))]
  if rise:
    ax.plot(rise, [medians[b] for b in rise], "o", mfc="none", color="C3",
            label="left out (rise)")
  ax.set_yscale("log")
  _batch_axis(ax, batches or [1])
  ax.set_ylabel(f"{unit} to target")
  if fit_result["status"] != "ok":
    ax.set_title(fit_result["reason"] or fit_result["status"], fontsize=8, wrap=True)
    if batches:
      ax.legend(fontsize=8)
    return
  bc, scale = fit_result["b_crit"], fit_result[scale_key(unit)]
  # Only over the fitted batches: the curve is not drawn where points were left out.
  grid = np.geomspace(fit_result["batches"][0], fit_result["batches"][-1], 200)
  ax.plot(grid, predict(unit, grid, scale, bc), color="C1", label="fit")
  reps = fit_result["replicates"]
  if reps.get("b_crit"):
    rep_bc, rep_scale = np.asarray(reps["b_crit"]), np.asarray(reps[scale_key(unit)])
    curves = predict(unit, grid[None, :], rep_scale[:, None], rep_bc[:, None])
    lvl = fit_result["level"]
    lo, hi = np.quantile(curves, [(1 - lvl) / 2, (1 + lvl) / 2], axis=0)
    ax.fill_between(grid, lo, hi, color="C1", alpha=0.2, label=f"{lvl:.0%} band")
  ax.plot(grid, perfect_scaling_line(unit, grid, scale, bc), "--", color="gray",
          label="perfect scaling")
  ax.axvline(bc, color="C2", label=f"B_crit ≈ {bc:.3g}")
  ax.axvspan(*fit_result["b_crit_interval"], color="C2", alpha=0.1)
  ax.set_xlim(min(batches) / 1.5, max(batches) * 1.5)
  ax.set_title(f"{unit} to target: S(B) = S_min (1 + B_crit/B)" if unit == "steps" else
               f"{unit} to target: E(B) = E_min (1 + B/B_crit)", fontsize=9)
  ax.legend(fontsize=8)


def draw_time_to_target(fig: Any, plan: dict[str, Any]) -> None:
  """Time to target per candidate batch with its band, the recommended batch, the deadline.

  Args:
    fig: a matplotlib ``Figure``.
    plan: an ``analysis.cost.time_to_target`` result.
  """
  ax = fig.subplots()
  if plan["status"] != "ok":
    ax.set_axis_off()
    ax.set_title(plan["reason"], fontsize=8, wrap=True)
    return
  rows = plan["candidates"]
  b = [r["global_batch"] for r in rows]
  t = [r["time_to_target_s"] for r in rows]
  lo, hi = zip(*(r["time_to_target_interval"] for r in rows), strict=True)
  ax.plot(b, t, "o-", color="C0", label="time to target (fit x step time)")
  ax.fill_between(b, lo, hi, color="C0", alpha=0.2, label=f"{plan['level']:.0%} band")
  rec = plan["recommended"]
  ax.plot([rec["global_batch"]], [rec["time_to_target_s"]], "*", color="C3", markersize=14,
          label=f"fastest: {rec['global_batch']}")
  if plan["deadline_s"] is not None:
    ax.axhline(plan["deadline_s"], color="C4", linestyle=":",
               label=f"deadline {plan['deadline_s']:g} s")
    if plan["deadline_pick"]:
      pick = plan["deadline_pick"]
      ax.plot([pick["global_batch"]], [pick["time_to_target_s"]], "D", color="C4",
              label=f"fewest device-s: {pick['global_batch']}")
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
  ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
  _batch_axis(ax, b)
  ax.set_ylabel("time to target (s, train steps only)")
  ax.set_title("Time to target", fontsize=9)
  ax.legend(fontsize=8)
