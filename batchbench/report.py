"""Turns a sweep's result rows into a batch-size recommendation and a report.

The report answers three questions about one workload on one machine: which
global batch reaches the target soonest, up to which batch steps to target still
scale perfectly, and what stops larger batches from paying off (throughput,
memory, divergence).

Choosing the best trial of a batch (Shallue et al. 2018, "Measuring the Effects
of Data Parallelism on Neural Network Training"): trials at one batch are grouped
by learning rate (``lr_multiplier``, ``lr``). A group's steps to target is the
*lower median* over its seeds, counting a seed that did not reach the target as
infinitely many steps; so an LR counts as reaching the target when at least half
its seeds did, and the number reported is that of a real trial (the median seed),
whose row fills the table. The LR with the fewest steps wins, ties broken by that
trial's ``time_to_target_s``. If no LR reached the target, the non-failed trial
with the highest samples/sec stands for the batch; if every trial failed, the
status of a failed one is reported.

This module reads no jax and imports matplotlib only when it draws plots.
"""

import base64
import collections
import csv
import html
import io
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

from batchbench.results import atomic_write_text, read_results

Row = dict[str, Any]

FAILED = ("diverged", "oom", "error")
# A doubling of the batch is "perfect scaling" when it cuts steps to target to at
# most this fraction (40% fewer steps). For a gap of ratio B2/B1 that is not two,
# the same per-doubling rate is required: steps(B2)/steps(B1) <= (B1/B2)**k with
# k = log2(1/0.6), i.e. the 0.6 ratio compounded over log2(B2/B1) doublings.
PERFECT_SCALING_RATIO = 0.6
_SCALING_EXPONENT = math.log2(1 / PERFECT_SCALING_RATIO)
# Throughput has plateaued at a batch when no batch of twice its size or more
# runs at least this much faster.
PLATEAU_GAIN = 1.10
REPORT_DIR = "report"


def _reached(row: Row) -> bool:
  return row["status"] == "ok" and row.get("steps_to_target") is not None


def _or(value: Any, default: float) -> Any:
  return default if value is None else value


def _group(rows: list[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
  groups = collections.defaultdict(list)
  for row in rows:
    groups[key(row)].append(row)
  return groups


def _choose(trials: list[Row]) -> tuple[Row, str, int]:
  """Returns (representative trial, how it was chosen, trials at its LR)."""
  candidates = []
  for group in _group(trials, lambda r: (r.get("lr_multiplier"), r.get("lr"))).values():
    steps = statistics.median_low(
        [r["steps_to_target"] if _reached(r) else math.inf for r in group])
    if steps == math.inf:
      continue
    rep = min((r for r in group if _reached(r) and r["steps_to_target"] == steps),
              key=lambda r: _or(r.get("time_to_target_s"), math.inf))
    candidates.append(((steps, _or(rep.get("time_to_target_s"), math.inf),
                        _or(rep.get("lr"), 0.0)), rep, len(group)))
  if candidates:
    _, rep, n = min(candidates, key=lambda c: c[0])
    how = "fewest steps to target" + (f" (median of {n} seeds)" if n > 1 else "")
    return rep, how, n
  ran = [r for r in trials if r["status"] not in FAILED]
  has_target = any(r.get("target") for r in trials)
  if ran:
    rep = max(ran, key=lambda r: _or(r.get("samples_per_sec"), -math.inf))
    how = "highest samples/sec" + (" (target not reached)" if has_target else "")
  else:
    rep = max(trials, key=lambda r: _or(r.get("samples_per_sec"), -math.inf))
    how = "every trial failed"
  return rep, how, sum(r.get("lr") == rep.get("lr") for r in trials)


def best_per_batch(rows: list[Row]) -> list[Row]:
  """Picks the best trial of every global batch (see the module docstring).

  Args:
    rows: result rows as returned by ``read_results``.

  Returns:
    One row per global batch, sorted by batch: a copy of the chosen trial's row
    plus ``selection`` (how it was chosen), ``trials_at_batch`` and
    ``seeds_at_lr`` (trials sharing the chosen LR).
  """
  by_batch = _group([r for r in rows if r.get("global_batch") is not None],
                    lambda r: r["global_batch"])
  best = []
  for batch in sorted(by_batch):
    rep, how, n = _choose(by_batch[batch])
    best.append({**rep, "selection": how, "trials_at_batch": len(by_batch[batch]),
                 "seeds_at_lr": n})
  return best


def _largest_perfect_scaling_batch(best: list[Row]) -> int | None:
  """Walks up from the smallest batch that reached the target; see the constants."""
  points = [(r["global_batch"], r["steps_to_target"] if _reached(r) else None)
            for r in best]
  start = next((i for i, (_, s) in enumerate(points) if s is not None), None)
  if start is None:
    return None
  largest = points[start][0]
  for (b1, s1), (b2, s2) in zip(points[start:], points[start + 1:], strict=False):
    if s2 is None or s2 > s1 * (b1 / b2) ** _SCALING_EXPONENT * (1 + 1e-9):
      break
    largest = b2
  return largest


def _plateau(best: list[Row]) -> tuple[int, float, list[int]] | None:
  """(batch, its samples/sec, larger batches) where throughput stops growing."""
  points = [(r["global_batch"], r["samples_per_sec"]) for r in best
            if r.get("samples_per_sec") is not None]
  for i, (batch, sps) in enumerate(points):
    beyond = [(b, s) for b, s in points[i + 1:] if b >= 2 * batch]
    if beyond and all(s < PLATEAU_GAIN * sps for _, s in beyond):
      return batch, sps, [b for b, _ in beyond]
  return None


def _target_text(target: dict[str, Any] | None) -> str:
  if not target:
    return "no target"
  op = "<=" if str(target.get("direction", "")).lower().startswith(("min", "low")) else ">="
  return f"{target['metric']} {op} {target['value']:g}"


def _lr_text(row: Row) -> str:
  mult = row.get("lr_multiplier")
  return _fmt(row.get("lr")) + (f" (×{mult:g})" if mult is not None else "")


def _warnings(rows: list[Row], best: list[Row]) -> list[str]:
  out = []
  workloads = sorted({str(r.get("workload")) for r in rows})
  if len(workloads) > 1:
    out.append(f"The results mix several workloads ({', '.join(workloads)}); use one "
               "workdir per workload, since batches are compared across all rows.")
  for rule, group in _group([r for r in rows if r["status"] == "diverged"],
                            lambda r: r.get("lr_rule")).items():
    trials = "; ".join(
        f"batch {r['global_batch']} at lr {_lr_text(r)}"
        + (f", step {r['diverged_step']}" if r.get("diverged_step") is not None else "")
        for r in sorted(group, key=lambda r: (r["global_batch"], _or(r.get("lr"), 0.0))))
    out.append(f"{len(group)} trial(s) diverged under the '{rule}' LR rule: {trials}. "
               "Lower the LR multiplier or lengthen warmup at these batches.")
  for batch, trials in sorted(_group(rows, lambda r: r.get("global_batch")).items(),
                              key=lambda kv: _or(kv[0], -1)):
    if (any(r.get("target") for r in trials) and not any(map(_reached, trials))
        and any(r["status"] not in ("oom", "error") for r in trials)):
      lrs = ", ".join(_lr_text(r) for r in {r.get("lr"): r for r in sorted(
          trials, key=lambda r: _or(r.get("lr"), 0.0))}.values())
      out.append(f"Batch {batch} missed the target "
                 f"({_target_text(trials[0].get('target'))}) at every LR tried ({lrs}); "
                 "widen the LR grid or train longer before trusting this batch.")
  plateau = _plateau(best)
  if plateau:
    batch, sps, beyond = plateau
    out.append(f"Throughput plateaus at batch {batch} ({sps:,.0f} samples/sec): batches "
               f"{', '.join(map(str, beyond))} run less than {PLATEAU_GAIN - 1:.0%} "
               "faster, so they only pay off if they cut steps to target.")
  for r in rows:
    if r["status"] == "oom":
      out.append(f"Batch {r['global_batch']} ran out of memory (trial {r['trial_id']}, "
                 f"lr {_lr_text(r)}); use gradient accumulation or more devices.")
    elif r["status"] == "error":
      out.append(f"Trial {r['trial_id']} (batch {r['global_batch']}, lr {_lr_text(r)}) "
                 f"failed with an error: {_short(r.get('error'), 120)}")
  edge = []
  for b in best:
    mults = {r.get("lr_multiplier") for r in rows
             if r.get("global_batch") == b["global_batch"]} - {None}
    if _reached(b) and len(mults) >= 3 and b.get("lr_multiplier") in (min(mults),
                                                                        max(mults)):
      edge.append(f"{b['global_batch']} (×{b['lr_multiplier']:g})")
  if edge:
    out.append(f"The best LR is at the edge of the LR grid for batch {', '.join(edge)}; "
               "the optimum may lie outside it, so steps to target may be overstated.")
  return out


def recommend(rows: list[Row]) -> dict[str, Any]:
  """Recommends a global batch from the sweep's rows.

  Args:
    rows: result rows as returned by ``read_results``.

  Returns:
    A dict with ``fastest_batch`` (shortest ``time_to_target_s``; for a workload
    without target, highest samples/sec; None when nothing qualifies),
    ``fastest_basis`` (which of the two), ``largest_perfect_scaling_batch``
    (walking up from the smallest batch that reached the target, the last batch
    up to which every step kept ``PERFECT_SCALING_RATIO`` per doubling; None
    without a target), ``warnings`` (plain-language strings) and ``text`` (a
    short plain-language recommendation).
  """
  best = best_per_batch(rows)
  reached = [r for r in best if _reached(r) and r.get("time_to_target_s") is not None]
  has_target = any(r.get("target") for r in rows)
  fastest, basis = None, None
  if reached:
    fastest, basis = min(reached, key=lambda r: r["time_to_target_s"]), "time_to_target_s"
  elif not has_target:
    ran = [r for r in best if r["status"] not in FAILED and r.get("samples_per_sec")]
    if ran:
      fastest, basis = max(ran, key=lambda r: r["samples_per_sec"]), "samples_per_sec"
  perfect = _largest_perfect_scaling_batch(best)
  warnings = _warnings(rows, best)
  text = []
  if not rows:
    text.append("No results yet.")
  elif basis == "time_to_target_s":
    text.append(
        f"Train with global batch {fastest['global_batch']}: on this machine it reached "
        f"the target ({_target_text(fastest['target'])}) soonest, after "
        f"{_fmt(fastest['time_to_target_s'])} s of training "
        f"({_fmt(fastest.get('time_to_target_wall_s'))} s wall, with compile and eval) "
        f"and {_fmt(fastest['steps_to_target'])} steps at lr {_lr_text(fastest)}.")
  elif basis == "samples_per_sec":
    text.append(f"This workload has no target, so only throughput is compared: global "
                f"batch {fastest['global_batch']} runs the most samples/sec "
                f"({fastest['samples_per_sec']:,.0f}).")
  else:
    target = next(r["target"] for r in rows if r.get("target"))
    text.append(f"No batch reached the target ({_target_text(target)}); "
                "widen the LR grid or train longer before choosing a batch.")
  if perfect is not None:
    last = max(r["global_batch"] for r in best if _reached(r))
    text.append(
        f"Steps to target scale perfectly (each doubling cuts them by at least "
        f"{1 - PERFECT_SCALING_RATIO:.0%}) up to batch {perfect}"
        + (", the largest batch that reached the target; try larger batches to find "
           "where this stops." if perfect == last else
           "; beyond it a larger batch needs more examples, i.e. more compute, to reach "
           "the target, and pays off only through higher throughput."))
  if warnings:
    text.append(f"See the {len(warnings)} warning(s) below.")
  return {"fastest_batch": fastest["global_batch"] if fastest else None,
          "fastest_basis": basis, "largest_perfect_scaling_batch": perfect,
          "warnings": warnings, "text": " ".join(text)}


# ----------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if not math.isfinite(value) or value == 0:
    return f"{value:g}"
  return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_bytes(n: float | None) -> str:
  """Formats a byte count for people, e.g. ``"12.3 MiB"``; None as ``"-"``."""
  if n is None:
    return "-"
  if abs(n) < 1024:
    return f"{n:.0f} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}"


def _short(text: str | None, limit: int = 80) -> str:
  lines = (text or "").strip().splitlines()
  line = lines[0] if lines else ""
  return line if len(line) <= limit else line[:limit - 1] + "…"


def _final_metric(row: Row) -> tuple[str | None, float | None]:
  final = row.get("final_eval") or {}
  name = (row.get("target") or {}).get("metric")
  if name not in final:
    name = "accuracy" if "accuracy" in final else None
  return name, final.get(name) if name else None


def _summary_records(best: list[Row]) -> list[dict[str, Any]]:
  """The per-batch table with raw values (the columns of ``summary.csv``)."""
  records = []
  for r in best:
    memory = r.get("memory") or {}
    iqr = r.get("samples_per_sec_iqr") or (None, None)
    metric, value = _final_metric(r)
    records.append({
        "global_batch": r["global_batch"], "lr": r.get("lr"),
        "lr_multiplier": r.get("lr_multiplier"), "seeds_at_lr": r["seeds_at_lr"],
        "samples_per_sec": r.get("samples_per_sec"), "samples_per_sec_q25": iqr[0],
        "samples_per_sec_q75": iqr[1], "step_time_ms": r.get("step_time_ms"),
        "compile_s": r.get("compile_s"), "xla_peak_bytes": memory.get("peak_bytes"),
        "xla_temp_bytes": memory.get("temp_bytes"),
        "device_peak_bytes": memory.get("device_peak_bytes"),
        "steps_to_target": r.get("steps_to_target"),
        "epochs_to_target": r.get("epochs_to_target"),
        "examples_to_target": r.get("examples_to_target"),
        "time_to_target_s": r.get("time_to_target_s"),
        "time_to_target_wall_s": r.get("time_to_target_wall_s"),
        "final_metric": metric, "final_metric_value": value,
        "final_train_loss": r.get("final_train_loss"), "status": r["status"],
        "selection": r["selection"], "trial_id": r["trial_id"]})
  return records


def _summary_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  metrics = {r["final_metric"] for r in records} - {None}
  columns = [
      ("batch", lambda r: _fmt(r["global_batch"])),
      ("LR", _lr_text),
      ("samples/sec", lambda r: _fmt(r["samples_per_sec"])),
      ("samples/sec IQR", lambda r: "-" if r["samples_per_sec_q25"] is None else
       f"{_fmt(r['samples_per_sec_q25'])}–{_fmt(r['samples_per_sec_q75'])}"),
      ("step ms", lambda r: _fmt(r["step_time_ms"])),
      ("compile s", lambda r: _fmt(r["compile_s"])),
      ("XLA peak", lambda r: format_bytes(r["xla_peak_bytes"])),
      ("XLA temp", lambda r: format_bytes(r["xla_temp_bytes"])),
      ("device peak", lambda r: format_bytes(r["device_peak_bytes"])),
      ("steps to target", lambda r: _fmt(r["steps_to_target"])),
      ("epochs to target", lambda r: _fmt(r["epochs_to_target"])),
      ("examples to target", lambda r: _fmt(r["examples_to_target"])),
      ("train s to target", lambda r: _fmt(r["time_to_target_s"])),
      ("wall s to target", lambda r: _fmt(r["time_to_target_wall_s"])),
      (f"final {metrics.pop()}" if len(metrics) == 1 else "final metric",
       lambda r: _fmt(r["final_metric_value"])),
      ("final train loss", lambda r: _fmt(r["final_train_loss"])),
      ("status", lambda r: r["status"]),
  ]
  if all(r["device_peak_bytes"] is None for r in records):
    columns = [c for c in columns if c[0] != "device peak"]
  return [c[0] for c in columns], [[f(r) for _, f in columns] for r in records]


def _trials_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
  headers = ["trial_id", "batch", "lr", "lr_multiplier", "seed", "status",
             "steps_to_target", "time_to_target_s", "samples_per_sec", "error"]
  ordered = sorted(rows, key=lambda r: (_or(r.get("global_batch"), -1),
                                        _or(r.get("lr"), 0.0), _or(r.get("seed"), -1)))
  return headers, [[str(r["trial_id"]), _fmt(r.get("global_batch")), _fmt(r.get("lr")),
                    _fmt(r.get("lr_multiplier")), _fmt(r.get("seed")), r["status"],
                    _fmt(r.get("steps_to_target")), _fmt(r.get("time_to_target_s")),
                    _fmt(r.get("samples_per_sec")), _short(r.get("error"))]
                   for r in ordered]


def format_table(rows: list[Row]) -> str:
  """A compact fixed-width text table of ``best_per_batch(rows)`` for the console."""
  headers, cells = _summary_table(_summary_records(best_per_batch(rows)))
  keep = [headers.index(h) for h in headers if h in (
      "batch", "LR", "samples/sec", "step ms", "XLA peak", "steps to target",
      "train s to target", "status")]
  table = [[headers[i] for i in keep]] + [[row[i] for i in keep] for row in cells]
  widths = [max(len(line[i]) for line in table) for i in range(len(keep))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                   for line in table)


# ---------------------------------------------------------------------- writing


def _markdown(blocks: list[tuple]) -> str:
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


def _html(blocks: list[tuple], images: dict[str, bytes]) -> str:
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


def _csv(records: list[dict[str, Any]]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["global_batch"],
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in records])
  return buf.getvalue()


def write_report(workdir: str, rows: list[Row] | None = None) -> dict[str, str]:
  """Writes the batch-size report of a sweep into ``<workdir>/report/``.

  Writes ``report.md``, a self-contained ``report.html`` (plots inlined as base64
  PNGs, inline CSS), ``summary.csv`` (the per-batch table, raw values) and one PNG
  per plot that has data; every file is written atomically.

  Args:
    workdir: the sweep's workdir.
    rows: result rows; read from ``<workdir>/results.jsonl`` when None.

  Returns:
    File name -> path of every file written.
  """
  from batchbench import plots  # pylint: disable=g-import-not-at-top  (matplotlib)

  rows = read_results(workdir) if rows is None else rows
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  best = best_per_batch(rows)
  rec = recommend(rows)
  records = _summary_records(best)
  written, skipped = plots.write_plots(best, out_dir, rec["largest_perfect_scaling_batch"])

  statuses = collections.Counter(r["status"] for r in rows)
  workloads = ", ".join(sorted({str(r.get("workload")) for r in rows})) or "-"
  targets = ", ".join(sorted({_target_text(r.get("target")) for r in rows})) or "-"
  blocks: list[tuple] = [
      ("h1", f"batchbench report: {workloads}"),
      ("p", f"{len(rows)} trials at {len(best)} global batches; target: {targets}; "
            "statuses: " + (", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
                            or "none") + "."),
      ("h2", "Best trial per global batch"),
      ("p", ("One row per batch: the LR with the fewest steps to target (lower median "
             "over seeds; ties broken by time to target), else the non-failed trial with "
             "the highest samples/sec.")),
      ("table", *_summary_table(records)),
      ("h2", "Recommendation"),
      ("p", rec["text"]),
  ]
  if rec["warnings"]:
    blocks += [("h2", "Warnings"), ("ul", rec["warnings"])]
  blocks.append(("h2", "Plots"))
  for name, caption in plots.CAPTIONS.items():
    blocks.append(("img", name, caption) if name in written
                  else ("p", f"{name} skipped: {skipped[name]}."))
  blocks += [("h2", "Appendix: every trial"), ("table", *_trials_table(rows))]

  paths = dict(written)
  images = {}
  for name, path in written.items():
    with open(path, "rb") as f:
      images[name] = f.read()
  for name, text in (("summary.csv", _csv(records)), ("report.md", _markdown(blocks)),
                     ("report.html", _html(blocks, images))):
    paths[name] = os.path.join(out_dir, name)
    atomic_write_text(paths[name], text)
  return paths
