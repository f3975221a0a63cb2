"""``batchbench fit``: the critical-batch fit of a sweep's workdir or of a published table.

From a sweep: the steps to target of every batch's best LR, per seed (the report's
table), fitted with bootstrap intervals over seeds or points; with the batches'
throughput points, the time-to-target plan. From a table (``--table``): the values
in its unit, bootstrapped over points (no step times, so no plan). Writes
``fit.json``, ``fit.png`` (and ``time_to_target.png`` with a plan) under
``<workdir>/fit/`` (or beside the table: ``<table>_fit/``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from batchbench.analysis import cost, fit
from batchbench.analysis.selection import best_per_batch
from batchbench.config import ConfigError
from batchbench.fmt import to_jsonable
from batchbench.report.answer import answer
from batchbench.report.files import save_figure
from batchbench.store.results import atomic_write_text, read_points, read_results

FIT_DIR = "fit"


def run_fit(*, workdir: str | None = None, table: str | None = None,
            deadline_s: float | None = None) -> dict[str, Any]:
  """Fits, writes the files, and returns ``{"fit", "plan", "text", "paths"}``.

  Raises:
    ConfigError: no results in the workdir, or a table that cannot be read.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  from batchbench.report import fit_plot  # pylint: disable=g-import-not-at-top

  if table is not None:
    parsed = fit.read_table(table)
    fitted, plan, values = fit.fit_table(parsed), None, parsed.values
    out_dir = (os.path.join(workdir, FIT_DIR) if workdir else
               os.path.splitext(os.path.abspath(table))[0] + "_fit")
  else:
    rows = read_results(workdir)
    if not rows:
      raise ConfigError("workdir", workdir, "has no trial results (results.jsonl): run a "
                        "sweep there first, or pass --table")
    points = read_points(workdir)
    best = best_per_batch(rows, points)
    ans = answer(rows, best, points, deadline_s=deadline_s)
    if ans["fit"] is None:
      raise ConfigError("workdir", workdir, "holds a workload without a target: there are "
                        "no steps to target to fit")
    fitted, plan = ans["fit"], ans["plan"]
    values = {r["global_batch"]: r["seed_steps"] for r in best if r.get("seed_steps")}
    out_dir = os.path.join(workdir, FIT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"fit.json": os.path.join(out_dir, "fit.json"),
           "fit.png": os.path.join(out_dir, "fit.png")}
  fig = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
  fit_plot.draw_fit(fig, fitted, values)
  save_figure(fig, paths["fit.png"])
  text = fit.fit_text(fitted)
  if plan is not None:
    text += " " + cost.plan_text(plan)
    if plan["status"] == "ok":
      paths["time_to_target.png"] = os.path.join(out_dir, "time_to_target.png")
      fig = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
      fit_plot.draw_time_to_target(fig, plan)
      save_figure(fig, paths["time_to_target.png"])
  atomic_write_text(paths["fit.json"], json.dumps(to_jsonable(
      {"fit": fitted, "plan": plan, "text": text}), indent=2, allow_nan=False))
  return {"fit": fitted, "plan": plan, "text": text, "paths": paths}
