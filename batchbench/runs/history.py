"""The ``history`` command: a history store's trends, one plot per metric, change points.

For each series (a fingerprint: benchmark + machine + software) and metric it takes
the value of every recorded run (a point's median samples/sec and step time, FLOPs,
compiled peak bytes; a trial's steps and time to target; a probe's largest batch),
finds its change points (``analysis.changepoints``: a step that lasted at least 3 runs)
and writes ``history_<metric>.png``, ``history.md`` and ``history.json`` to ``out_dir``.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from typing import Any

from batchbench import fmt
from batchbench.analysis import changepoints
from batchbench.config import ConfigError
from batchbench.store.history import History
from batchbench.store.results import atomic_write_text

Log = Callable[[str], None]
REPORT_DIR = "report"
# Per kind: metric -> how to read it from a summary.
def _rate(s: dict[str, Any]) -> float | None:
  """A point's median samples/sec over its windows."""
  windows = s.get("window_samples_per_sec")
  return statistics.median(windows) if windows else s.get("samples_per_sec")


def _step_ms(s: dict[str, Any]) -> float | None:
  """A point's step time at its median rate (what compare tests, window by window)."""
  rate = _rate(s)
  return 1e3 * s["global_batch"] / rate if rate and s.get("global_batch") else \
      s.get("step_time_ms")


METRICS: dict[str, dict[str, Callable[[dict[str, Any]], float | None]]] = {
    "point": {
        "samples_per_sec": _rate,
        "step_time_ms": _step_ms,
        "flops_per_step": lambda s: s.get("flops_per_step"),
        "peak_bytes": lambda s: s.get("peak_bytes"),
    },
    "trial": {
        "steps_to_target": lambda s: s.get("steps_to_target"),
        "time_to_target_s": lambda s: s.get("time_to_target_s"),
    },
    "probe": {"largest_batch": lambda s: s.get("largest_batch")},
}


def trends(series: list[dict[str, Any]], *, min_run: int = changepoints.MIN_RUN,
           threshold: float = changepoints.THRESHOLD) -> dict[str, list[dict[str, Any]]]:
  """Per metric, each series' values by run and its change points.

  Args:
    series: ``History.series()``.
    min_run, threshold: see ``analysis.changepoints.change_points``.

  Returns:
    metric -> list of ``{"label", "fingerprint", "x" (run indices), "y", "change_points"}``
    (each change point with ``run_index``, ``run_id``, ``time_utc``, ``git_commit``).
  """
  out: dict[str, list[dict[str, Any]]] = {}
  for s in series:
    for metric, read in METRICS[s["kind"]].items():
      points = [(e, read(e["summary"])) for e in s["entries"]]
      points = [(e, float(v)) for e, v in points if v is not None]
      if not points:
        continue
      values = [v for _, v in points]
      cps = []
      for cp in changepoints.change_points(values, min_run=min_run, threshold=threshold):
        entry = points[cp["index"]][0]
        cps.append({**cp, "run_index": entry["run_index"], "run_id": entry["run_id"],
                    "time_utc": entry["time_utc"], "git_commit": entry["git_commit"]})
      out.setdefault(metric, []).append({
          "label": s["label"], "fingerprint": s["fingerprint"],
          "x": [e["run_index"] for e, _ in points], "y": values, "change_points": cps})
  return out


def _markdown(history_dir: str, runs: list[dict[str, Any]],
              by_metric: dict[str, list[dict[str, Any]]]) -> str:
  lines = ["# batchbench history", "",
           f"`{history_dir}`: {len(runs)} run(s), "
           + (f"{runs[0]['time_utc']} to {runs[-1]['time_utc']}" if runs else "none"), "",
           "A change point is a step in a series' level that lasted at least "
           f"{changepoints.MIN_RUN} runs (one outlier is not one).", "",
           "| metric | series | runs | last | change points (run, commit, change) |",
           "|---|---|---|---|---|"]
  for metric, series in by_metric.items():
    for s in series:
      cps = "; ".join(f"{cp['time_utc'][:16]} {(cp['git_commit'] or '?')[:8]} "
                      + (f"{cp['change']:+.1%}" if cp["change"] is not None else "step")
                      for cp in s["change_points"]) or "none"
      lines.append(f"| {metric} | {s['label']} | {len(s['y'])} | {fmt.number(s['y'][-1])} "
                   f"| {cps} |")
  lines += ["", *[f"![{m}](history_{m}.png)" for m in by_metric]]
  return "\n".join(lines) + "\n"


def run_history(history_dir: str, out_dir: str | None = None, *, log: Log | None = print,
                min_run: int = changepoints.MIN_RUN,
                threshold: float = changepoints.THRESHOLD) -> int:
  """Renders the trends of the history in ``history_dir``.

  Args:
    history_dir: the history store's directory.
    out_dir: where the plots and tables go (default ``<history_dir>/report``).
    log: progress sink; None for silence.
    min_run, threshold: change-point settings (``analysis.changepoints``).

  Returns:
    0.

  Raises:
    ConfigError: no history there, or one without runs.
  """
  from batchbench.report.trends import write_trend  # pylint: disable=g-import-not-at-top

  log = log or (lambda _: None)
  if not history_dir:
    raise ConfigError("history", history_dir, "give the directory of a history store")
  with History(history_dir) as store:
    runs, series = store.runs(), store.series()
  if not runs:
    raise ConfigError("history", history_dir, "has no recorded runs yet")
  out_dir = out_dir or os.path.join(history_dir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  by_metric = trends(series, min_run=min_run, threshold=threshold)
  labels = [f"{r['time_utc'][:10]} {(r['git_commit'] or '')[:7]}".strip() for r in runs]
  for metric, s in by_metric.items():
    write_trend(os.path.join(out_dir, f"history_{metric}.png"), metric, s, labels)
  atomic_write_text(os.path.join(out_dir, "history.md"),
                    _markdown(history_dir, runs, by_metric))
  atomic_write_text(os.path.join(out_dir, "history.json"), json.dumps(
      fmt.to_jsonable({"runs": runs, "metrics": by_metric}), indent=2, allow_nan=False))
  found = sum(len(s["change_points"]) for v in by_metric.values() for s in v)
  log(f"history: {len(runs)} run(s), {sum(len(v) for v in by_metric.values())} series x "
      f"metric, {found} change point(s); plots and history.md in {out_dir}")
  return 0
