"""Trend plots of a benchmark history: one figure per metric, change points marked.

Each series (one benchmark on one machine and software) is drawn relative to its own
median, so series of very different magnitudes share an axis; a change point (a step
that lasted, ``analysis.changepoints``) is a triangle pointing the way the level moved.
Drawn on a standalone ``Figure`` (Agg), like ``report.plots``.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from batchbench.report.files import save_figure

MAX_LEGEND = 12


def draw_trend(fig: Any, metric: str, series: list[dict[str, Any]],
               run_labels: list[str]) -> None:
  """Draws ``series`` (``label``, ``x`` run indices, ``y`` values, ``change_points``)."""
  ax = fig.add_subplot(1, 1, 1)
  for s in series:
    center = sorted(s["y"])[len(s["y"]) // 2] or 1.0
    rel = [v / center for v in s["y"]]
    (line,) = ax.plot(s["x"], rel, marker="o", markersize=3, linewidth=1, label=s["label"])
    for cp in s["change_points"]:
      i = s["x"].index(cp["run_index"])
      up = (cp["change"] or 0) > 0
      ax.plot([s["x"][i]], [rel[i]], marker="^" if up else "v", markersize=11,
              color=line.get_color(), markeredgecolor="black")
      ax.annotate(f"{cp['change']:+.0%}" if cp["change"] is not None else "step",
                  (s["x"][i], rel[i]), textcoords="offset points", xytext=(4, 6), fontsize=7)
  ax.axhline(1.0, color="grey", linewidth=0.5)
  ax.set_ylabel(f"{metric} / series median")
  ax.set_xlabel("run")
  ticks = sorted({x for s in series for x in s["x"]})
  step = max(1, len(ticks) // 12)
  ax.set_xticks(ticks[::step], labels=[run_labels[t] for t in ticks[::step]], rotation=30,
                fontsize=7, ha="right")
  ax.set_title(f"{metric}: history (triangles: change points lasting 3+ runs)", fontsize=9)
  ax.grid(True, alpha=0.3)
  if len(series) <= MAX_LEGEND:
    ax.legend(fontsize=6, loc="best")


def write_trend(path: str, metric: str, series: list[dict[str, Any]],
                run_labels: list[str]) -> None:
  """Draws and saves one metric's trend plot as PNG (atomically)."""
  fig = Figure(figsize=(9, 4.8), dpi=100, layout="constrained")
  draw_trend(fig, metric, series, run_labels)
  save_figure(fig, path)
