"""PNG plots of a batch-size sweep, one figure per question the report answers.

Every plot takes the per-batch rows of ``report.best_per_batch`` (one trial per
global batch) and puts the global batch on a log2 x-axis. Figures are drawn on a
standalone ``matplotlib.figure.Figure`` and rendered by the Agg canvas, so no
display is needed and pyplot's global state (and the caller's chosen backend, e.g.
in a notebook) is left alone. ``report`` imports this module only when it draws,
so building tables stays free of matplotlib. A plot with nothing to draw is
skipped with a reason instead of producing an empty image.
"""

import os
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from batchbench.report.files import save_figure

Row = dict[str, Any]

CAPTIONS = {
    "throughput.png": "Samples/sec vs global batch, from each batch's throughput phase "
                      "(median over its timed windows; error bars span the interquartile "
                      "range).",
    "time_to_target.png": "Time to target vs global batch: steps to target x measured step "
                          "time, and the median trial's own wall seconds including compile "
                          "and evals.",
    "memory.png": "Memory of the compiled train step vs global batch (throughput program).",
    "curves.png": "Eval metric and loss vs examples seen, one line per batch (best "
                  "trial). The loss axis says whether it is the train or the eval loss.",
}
_MIB = 2.0**20


def _batch_axis(ax, batches: list[int]) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(batches, labels=[str(b) for b in batches])
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xlabel("global batch")
  ax.grid(True, which="major", alpha=0.3)


def _reached(row: Row) -> bool:
  return row["status"] == "ok" and row.get("steps_to_target") is not None


def _throughput(fig, best: list[Row], _) -> str | None:
  rows = [r for r in best if r.get("samples_per_sec") is not None]
  if not rows:
    return "no trial measured samples/sec"
  batches = [r["global_batch"] for r in rows]
  med = [r["samples_per_sec"] for r in rows]
  iqr = [r.get("samples_per_sec_iqr") or (m, m) for r, m in zip(rows, med, strict=True)]
  yerr = [[max(m - q[0], 0.0) for m, q in zip(med, iqr, strict=True)],
          [max(q[1] - m, 0.0) for m, q in zip(med, iqr, strict=True)]]
  ax = fig.subplots()
  ax.errorbar(batches, med, yerr=yerr, marker="o", capsize=3)
  _batch_axis(ax, batches)
  ax.set_ylabel("samples/sec")
  ax.set_title("Throughput")
  return None


def _time_to_target(fig, best: list[Row], _) -> str | None:
  rows = [r for r in best if _reached(r) and r.get("time_to_target_s") is not None]
  if not rows:
    return "no batch reached the target (or the workload has no target)"
  batches = [r["global_batch"] for r in rows]
  ax = fig.subplots()
  ax.plot(batches, [r["time_to_target_s"] for r in rows], marker="o",
          label="steps x step time")
  wall = [(r["global_batch"], r["time_to_target_wall_s"]) for r in rows
          if r.get("time_to_target_wall_s") is not None]
  if wall:
    ax.plot(*zip(*wall, strict=True), marker="s", label="wall (incl. compile and eval)")
  ax.set_yscale("log")
  _batch_axis(ax, batches)
  ax.set_ylabel("seconds to target")
  ax.set_title("Time to target")
  ax.legend(fontsize="small")
  return None


def _memory(fig, best: list[Row], _) -> str | None:
  series = {"XLA peak": "peak_bytes", "XLA temp": "temp_bytes",
            "device peak": "device_peak_bytes"}
  memory = {r["global_batch"]: (r.get("point") or {}).get("memory") or r.get("memory") or {}
            for r in best}
  points = {label: [(b, m[key] / _MIB) for b, m in memory.items() if m.get(key) is not None]
            for label, key in series.items()}
  points = {label: p for label, p in points.items() if p}
  if not points:
    return "no trial recorded memory"
  ax = fig.subplots()
  for label, p in points.items():
    ax.plot(*zip(*p, strict=True), marker="o", label=label)
  _batch_axis(ax, sorted({b for p in points.values() for b, _ in p}))
  ax.set_ylabel("MiB")
  ax.set_title("Memory of the train step")
  ax.legend(fontsize="small")
  return None


def _curve_metric(row: Row) -> str | None:
  """The metric to plot for a row: its target metric, else the first non-loss one."""
  if row.get("target"):
    return row["target"]["metric"]
  for item in row.get("eval_history") or []:
    for name in item.get("metrics") or {}:
      if "loss" not in name:
        return name
  return None


def _curves(fig, best: list[Row], _) -> str | None:
  """Eval metric and loss vs examples.

  The loss is ``metrics["train_loss"]`` when the eval history records it, else
  ``metrics["loss"]``, which is the eval loss; the axis label says which.
  """
  metric_lines, loss_lines, loss_names = [], [], set()
  for r in best:
    history = r.get("eval_history") or []
    metric = _curve_metric(r)
    m = [(h["examples"], h["metrics"][metric]) for h in history
         if metric and h.get("metrics", {}).get(metric) is not None]
    loss_key = "train_loss" if any("train_loss" in h.get("metrics", {})
                                   for h in history) else "loss"
    loss = [(h["examples"], h["metrics"][loss_key]) for h in history
            if h.get("metrics", {}).get(loss_key) is not None]
    if m:
      metric_lines.append((r["global_batch"], metric, m))
    if loss:
      loss_lines.append((r["global_batch"], loss))
      loss_names.add("train loss" if loss_key == "train_loss" else "eval loss")
  if not metric_lines and not loss_lines:
    return "no trial recorded an eval history"
  panels = [p for p in (metric_lines, loss_lines) if p]
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, lines in zip(axes, panels, strict=True):
    for line in lines:
      ax.plot(*zip(*line[-1], strict=True), label=f"batch {line[0]}")
    ax.set_xlabel("examples")
    ax.grid(True, alpha=0.3)
  if metric_lines:
    names = sorted({name for _, name, _ in metric_lines})
    axes[0].set_ylabel(" / ".join(names))
    axes[0].set_title("Eval metric")
    targets = {r["target"]["value"] for r in best if r.get("target")}
    if len(targets) == 1:
      axes[0].axhline(targets.pop(), color="gray", linestyle="--", label="target")
    axes[0].legend(fontsize="x-small")
  if loss_lines:
    axes[-1].set_ylabel(" / ".join(sorted(loss_names)))
    axes[-1].set_title(" / ".join(sorted(loss_names)).capitalize())
    axes[-1].set_yscale("log")
    axes[-1].legend(fontsize="x-small")
  return None


_DRAW: dict[str, Callable[..., str | None]] = {
    "throughput.png": _throughput,
    "time_to_target.png": _time_to_target,
    "memory.png": _memory,
    "curves.png": _curves,
}


def write_plots(best: list[Row], out_dir: str,
                extra: Any = None) -> tuple[dict[str, str], dict[str, str]]:
  """Draws every plot that has data into ``out_dir``, each PNG written atomically.

  Args:
    best: per-batch rows from ``report.best_per_batch``, sorted by global batch.
    out_dir: existing directory to write the PNGs into.
    extra: passed to every drawing function (reserved for the critical-batch fit).

  Returns:
    ``(written, skipped)``: file name -> path of each PNG written, and file
    name -> reason for each plot skipped for lack of data (an older PNG of
    that name is removed).
  """
  written, skipped = {}, {}
  for name, draw in _DRAW.items():
    fig = Figure(figsize=(11, 4) if name == "curves.png" else (6.5, 4.2), dpi=100,
                 layout="constrained")
    reason = draw(fig, best, extra)
    path = os.path.join(out_dir, name)
    if reason:
      skipped[name] = reason
      if os.path.exists(path):  # a stale plot from an earlier report would mislead
        os.remove(path)
      continue
    save_figure(fig, path)
    written[name] = path
  return written, skipped
