"""Writing the report: Markdown, self-contained HTML, CSV and PNG plots, atomically.

``write_report`` renders ``<workdir>/report/`` from a workdir's trial rows and
throughput points: the per-batch table (best LR per batch, throughput from the
batch's point), the recommendation and its warnings, the plots, and an appendix
of every trial. It imports no JAX; matplotlib only when it draws.
"""

from __future__ import annotations

import base64
import collections
import csv
import html
import io
import json
import os
from typing import Any

from batchbench.analysis.selection import best_per_batch
from batchbench.fmt import to_jsonable
from batchbench.report import tables
from batchbench.report.answer import answer
from batchbench.report.recommend import recommend, target_text
from batchbench.store.results import (LR_SEARCH_FILE, atomic_write_text, read_jsonl,
                                      read_points, read_results)

Row = dict[str, Any]
REPORT_DIR = "report"


def layout_text(rows: list[dict]) -> str:
  """Where the trials ran: "on 8 devices in 2 processes" (each layout, when several)."""
  layouts = collections.Counter((r.get("num_devices"), r.get("num_processes") or 1)
                                for r in rows)
  parts = [f"{d} device{'s' if d != 1 else ''} in {p} process{'es' if p != 1 else ''}"
           + (f" ({n} trials)" if len(layouts) > 1 else "")
           for (d, p), n in sorted(layouts.items(), key=str)]
  return "on " + ", ".join(parts) if parts else "on no devices"


def markdown(blocks: list[tuple]) -> str:
  def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")

  out = []
  for kind, *args in blocks:
    if kind in ("h1", "h2"):
      out.append(("# " if kind == "h1" else "## ") + args[0])
    elif kind == "p":
      out.append(args[0])
    elif kind == "ul":
      out.append("\n".join(f"- {item}" for item in args[0]))
    elif kind == "table":
      headers, rows = args
      out.append("\n".join("| " + " | ".join(map(cell, line)) + " |" for line in
                           [headers, ["---"] * len(headers)] + rows))
    elif kind == "img":
      out.append(f"![{args[0]}]({args[0]})\n\n*{args[1]}*")
  return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;"
        "color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "th{background:#f3f3f3}td:last-child{text-align:left}"
        "figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555}")


def to_html(blocks: list[tuple], images: dict[str, bytes]) -> str:
  esc = html.escape
  out = []
  for kind, *args in blocks:
    if kind in ("h1", "h2"):
      out.append(f"<{kind}>{esc(args[0])}</{kind}>")
    elif kind == "p":
      out.append(f"<p>{esc(args[0])}</p>")
    elif kind == "ul":
      out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in args[0]) + "</ul>")
    elif kind == "table":
      headers, rows = args
      out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row)
                                     + "</tr>" for row in rows) + "</table>")
    elif kind == "img":
      data = base64.b64encode(images[args[0]]).decode("ascii")
      out.append(f'<figure><img alt="{esc(args[0])}" src="data:image/png;base64,{data}">'
                 f"<figcaption>{esc(args[1])}</figcaption></figure>")
  return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
          f"<title>batchbench report</title><style>{_CSS}</style></head><body>\n"
          + "\n".join(out) + "\n</body></html>\n")


def to_csv(records: list[dict[str, Any]]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["global_batch"],
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in records])
  return buf.getvalue()


def _fit_figures(ans: dict[str, Any], best: list[Row], out_dir: str) -> dict[str, str]:
  """fit.png (points, fitted curve and band, perfect scaling, B_crit) and
  time_to_target_fit.png (the plan's curve and the recommended batch)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  from batchbench.report import fit_plot  # pylint: disable=g-import-not-at-top
  from batchbench.report.files import save_figure  # pylint: disable=g-import-not-at-top
  written = {}
  if ans["fit"] is not None:
    fig = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
    fit_plot.draw_fit(fig, ans["fit"], {r["global_batch"]: r["seed_steps"] for r in best
                                         if r.get("seed_steps")})
    written["fit.png"] = os.path.join(out_dir, "fit.png")
    save_figure(fig, written["fit.png"])
  if ans["plan"] is not None and ans["plan"]["status"] == "ok":
    fig = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
    fit_plot.draw_time_to_target(fig, ans["plan"])
    written["time_to_target_fit.png"] = os.path.join(out_dir, "time_to_target_fit.png")
    save_figure(fig, written["time_to_target_fit.png"])
  return written


FIT_CAPTIONS = {
    "fit.png": "Steps to target vs global batch: each seed (dots), the median (markers), the "
               "fitted S(B) = S_min (1 + B_crit/B) with its 90% bootstrap band, the "
               "perfect-scaling line S_min B_crit / B the text uses, and B_crit with its "
               "interval.",
    "time_to_target_fit.png": "Time to target = fitted steps x measured step time "
                              "(interpolated in log space between measured batches), with "
                              "its 90% band; the recommended batch is marked.",
}


def _answer_blocks(ans: dict[str, Any]) -> list[tuple]:
  from batchbench.analysis.fit import fit_text  # pylint: disable=g-import-not-at-top
  if ans["fit"] is None:
    return []
  gen = ans["generalization"]
  blocks = [("h2", "The critical batch size"), ("p", fit_text(ans["fit"])),
            ("h2", "Time and cost to target"), ("p", ans["plan"]["text"]),
            ("h2", "Gradient noise scale"), ("p", ans["noise"]["text"]),
            ("h2", "Generalization: what the articles argue about"), ("p", gen["text"])]
  if gen["batches"]:
    blocks.append(("table", *tables.generalization_table(gen)))
  return blocks


def write_report(workdir: str, rows: list[Row] | None = None,
                 points: list[Row] | None = None, *,
                 deadline_s: float | None = None) -> dict[str, Any]:
  """Writes the batch-size report of a sweep into ``<workdir>/report/``.

  Writes ``report.md``, a self-contained ``report.html`` (plots inlined as base64
  PNGs, inline CSS), ``summary.csv`` (the per-batch table, raw values), ``fit.json``
  (the critical-batch fit, the time/cost plan, the noise scale and generalization) and
  one PNG per plot that has data; every file is written atomically.

  Args:
    workdir: the sweep's workdir.
    rows: trial rows; read from ``<workdir>/results.jsonl`` when None.
    points: throughput points; read from ``<workdir>/throughput.jsonl`` when None.
    deadline_s: recommend the fewest device-seconds that reach the target within it.

  Returns:
    ``{"paths", "best", "recommendation", "answer"}``.
  """
  from batchbench.report import plots  # pylint: disable=g-import-not-at-top  (matplotlib)

  rows = read_results(workdir) if rows is None else rows
  points = read_points(workdir) if points is None else points
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  best = best_per_batch(rows, points)
  ans = answer(rows, best, points, deadline_s=deadline_s)
  rec = recommend(rows, best, points, plan=ans["plan"])
  searches = {d["global_batch"]: d for d in read_jsonl(os.path.join(workdir, LR_SEARCH_FILE))}
  records = tables.summary_records(best, searches)
  written, skipped = plots.write_plots(best, out_dir)
  written.update(_fit_figures(ans, best, out_dir))

  statuses = collections.Counter(r["status"] for r in rows)
  workloads = ", ".join(sorted({str(r.get("workload")) for r in rows})) or "-"
  targets = ", ".join(sorted({target_text(r.get("target")) for r in rows})) or "-"
  seeds = sorted({r.get("seed") for r in rows}, key=str)
  blocks: list[tuple] = [
      ("h1", f"batchbench report: {workloads}"),
      ("p", f"{len(rows)} trials at {len(best)} global batches, {len(seeds)} seed(s), "
            f"{layout_text(rows)}; target: {targets}; statuses: "
            + (", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none") + "."),
      ("h2", "Recommendation"),
      ("p", rec["text"]),
      ("h2", "Best learning rate per global batch"),
      ("p", "One row per batch. Steps to target: the learning rate with the fewest steps "
            "(median over seeds, a seed that missed counting as infinite; min–max "
            "over the seeds that reached it); seeds: reached / run at that LR; (edge): no "
            "LR was tried on one side of it; search: why the LR search stopped. "
            "Samples/sec, its IQR and step time: the batch's throughput phase (pure train "
            "calls, median over the timed windows counted in 'windows'; * marks fewer "
            "than 3). TFLOP/s/dev and MFU: at that samples/sec. s to target = steps to target "
            "x step time; wall s (trial): the median trial's own seconds to the target, "
            "with compile and evals."),
      ("table", *tables.summary_table(records)),
      *([("p", tables.flops_text(records))] if records else []),
      *[("p", note) for note in [tables.mfu_note(records)] if note],
      *_answer_blocks(ans),
  ]
  if rec["warnings"]:
    blocks += [("h2", "Warnings"), ("ul", rec["warnings"])]
  blocks.append(("h2", "Plots"))
  for name, caption in {**FIT_CAPTIONS, **plots.CAPTIONS}.items():
    if name in written:
      blocks.append(("img", name, caption))
    elif name in skipped:
      blocks.append(("p", f"{name} skipped: {skipped[name]}."))
  blocks += [("h2", "Appendix: every trial"), ("table", *tables.trials_table(rows))]

  paths = dict(written)
  images = {}
  for name, path in written.items():
    with open(path, "rb") as f:
      images[name] = f.read()
  payload = json.dumps(to_jsonable({k: v for k, v in ans.items()}), indent=2,
                       allow_nan=False)
  for name, text in (("summary.csv", to_csv(records)), ("report.md", markdown(blocks)),
                     ("report.html", to_html(blocks, images)), ("fit.json", payload)):
    paths[name] = os.path.join(out_dir, name)
    atomic_write_text(paths[name], text)
  return {"paths": paths, "best": best, "recommendation": rec, "answer": ans}
