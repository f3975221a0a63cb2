"""The report's tables: the per-batch summary (raw for CSV, formatted for people) and
the appendix of every trial."""

from __future__ import annotations

from typing import Any

from batchbench import fmt
from batchbench.report.recommend import MIN_TRUSTED_WINDOWS, lr_text

Row = dict[str, Any]
UTILIZATION_FIELDS = ("model_flops_per_example", "model_flops_source",
                      "tflops_per_sec_per_device", "peak_tflops", "peak_source", "mfu",
                      "tokens_per_sec")


def _final_metric(row: Row) -> tuple[str | None, float | None]:
  final = row.get("final_eval") or {}
  name = (row.get("target") or {}).get("metric")
  if name not in final:
    name = "accuracy" if "accuracy" in final else None
  return name, final.get(name) if name else None


def summary_records(best: list[Row],
                    searches: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
  """The per-batch table with raw values (the columns of ``summary.csv``); ``searches``
  maps a batch to its LR search's record (``lr_search.jsonl``)."""
  records = []
  for r in best:
    search = (searches or {}).get(r["global_batch"]) or {}
    point = r.get("point") or {}
    memory = point.get("memory") or r.get("memory") or {}
    iqr = r.get("samples_per_sec_iqr") or (None, None)
    metric, value = _final_metric(r)
    records.append({
        "global_batch": r["global_batch"], "lr": r.get("lr"),
        "lr_multiplier": r.get("lr_multiplier"), "lr_interior": r["lr_interior"],
        "lr_search": search.get("reason"), "lrs_tried": len(r["lrs_tried"]),
        "seeds_at_lr": r["seeds_at_lr"], "seeds_reached": r["seeds_reached"],
        "samples_per_sec": r.get("samples_per_sec"), "samples_per_sec_q25": iqr[0],
        "samples_per_sec_q75": iqr[1], "timed_windows": r.get("timed_windows"),
        "step_time_ms": r.get("step_time_ms"), "compile_s": point.get("program_compile_s"),
        "xla_peak_bytes": memory.get("peak_bytes"), "xla_temp_bytes": memory.get("temp_bytes"),
        "device_peak_bytes": memory.get("device_peak_bytes"),
        "steps_to_target": r.get("steps_to_target"), "steps_min": r.get("steps_min"),
        "steps_max": r.get("steps_max"), "epochs_to_target": r.get("epochs_to_target"),
        "examples_to_target": r.get("examples_to_target"),
        "time_to_target_s": r.get("time_to_target_s"),
        "loop_time_to_target_s": r.get("loop_time_to_target_s"),
        "time_to_target_wall_s": r.get("time_to_target_wall_s"),
        "final_metric": metric, "final_metric_value": value,
        "final_train_loss": r.get("final_train_loss"),
        "b_simple": r.get("b_simple_median"), "status": r["status"],
        "selection": r["selection"], "trial_id": r["trial_id"],
        # At the point's samples/sec, as the table's speed is: never the trial loop's.
        **{k: point.get(k) for k in UTILIZATION_FIELDS},
        "compute_dtype": (r.get("spec") or {}).get("compute_dtype")})
  return records


FLOPS_SOURCES = {
    "analytic": "the workload's analytic count (forward and backward matmuls: 3x the "
                "forward's)",
    "xla": "XLA's cost analysis of the compiled train step divided by the global batch (it "
           "also counts the optimizer update and elementwise work)",
}


def mfu_text(value: float | None) -> str:
  """MFU as a percentage, ``-`` when there is none."""
  return "-" if value is None else f"{value:.1%}"


def _batches(records: list[dict[str, Any]]) -> str:
  return fmt.batches([r["global_batch"] for r in records])


def flops_text(records: list[dict[str, Any]]) -> str:
  """Where the rows' model FLOPs per example come from, their compute dtype, and how
  TFLOP/s per device and MFU are computed from them (with the peaks used)."""
  by_source: dict[str, list[dict[str, Any]]] = {}
  for r in records:
    if r.get("model_flops_source"):
      by_source.setdefault(r["model_flops_source"], []).append(r)
  if not by_source:
    sources = "not recorded"
  elif len(by_source) == 1:
    (source,) = by_source
    sources = FLOPS_SOURCES.get(source, source)
  else:
    sources = "; ".join(f"{_batches(rs)}: {FLOPS_SOURCES.get(s, s)}"
                        for s, rs in by_source.items())
  dtypes = sorted({r["compute_dtype"] for r in records if r.get("compute_dtype")})
  peaks = sorted({(r["peak_tflops"], r["peak_source"]) for r in records
                  if r.get("mfu") is not None})
  return (f"Model FLOPs per example: {sources}. Compute dtype: "
          f"{', '.join(dtypes) or 'not recorded'}. TFLOP/s/dev = model FLOPs per example x "
          "samples/sec / devices / 1e12; MFU = TFLOP/s/dev / the device's dense peak for the "
          "compute dtype"
          + (" (" + "; ".join(f"{fmt.number(p)} TFLOP/s, {s}" for p, s in peaks) + ")"
             if peaks else "") + ".")


def mfu_note(records: list[dict[str, Any]], no_rate: str = "no throughput point") -> str | None:
  """Why MFU is ``-`` where it is (one line), or None when every row has an MFU.

  Args:
    records: rows with ``global_batch``, ``samples_per_sec``, ``model_flops_per_example``,
      ``tflops_per_sec_per_device``, ``peak_source`` and ``mfu``.
    no_rate: why a row without samples/sec has none.
  """
  reasons: dict[str, list[dict[str, Any]]] = {}
  for r in records:
    if r.get("mfu") is not None:
      continue
    if r.get("samples_per_sec") is None:
      why = no_rate
    elif r.get("model_flops_per_example") is None:
      why = "no model FLOP count recorded"
    else:
      why = r.get("peak_source") or "no peak recorded"
    reasons.setdefault(why, []).append(r)
  if not reasons:
    return None
  where = lambda rs: "every batch" if len(rs) == len(records) else _batches(rs)
  return " ".join(f"MFU '-' at {where(rs)}: {why}{'' if why.endswith('.') else '.'}"
                  for why, rs in reasons.items())


def rate_text(r: dict[str, Any]) -> str:
  """Samples/sec with a ``*`` when it rests on fewer than 3 timed windows."""
  if r["samples_per_sec"] is None:
    return "-"
  thin = (r["timed_windows"] or 0) < MIN_TRUSTED_WINDOWS
  return fmt.number(r["samples_per_sec"]) + ("*" if thin else "")


def _steps_text(r: dict[str, Any]) -> str:
  steps = fmt.number(r["steps_to_target"])
  if r["steps_to_target"] is None or r["seeds_at_lr"] < 2:
    return steps
  return f"{steps} ({fmt.number(r['steps_min'])}–{fmt.number(r['steps_max'])})"


def summary_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """Headers and formatted cells of the per-batch table."""
  metrics = {r["final_metric"] for r in records} - {None}
  columns = [
      ("batch", lambda r: fmt.number(r["global_batch"])),
      ("LR", lambda r: lr_text(r) + ("" if r["lr_interior"] else " (edge)")),
      ("search", lambda r: f"{r['lr_search'] or '-'} ({r['lrs_tried']} LRs)"),
      ("seeds", lambda r: f"{r['seeds_reached']}/{r['seeds_at_lr']}"),
      ("samples/sec", rate_text),
      ("tokens/s", lambda r: fmt.number(r.get("tokens_per_sec"))),
      ("IQR", lambda r: "-" if r["samples_per_sec_q25"] is None else
       f"{fmt.number(r['samples_per_sec_q25'])}–{fmt.number(r['samples_per_sec_q75'])}"),
      ("windows", lambda r: fmt.number(r["timed_windows"])),
      ("step ms", lambda r: fmt.number(r["step_time_ms"])),
      ("TFLOP/s/dev", lambda r: fmt.number(r["tflops_per_sec_per_device"])),
      ("MFU", lambda r: mfu_text(r["mfu"])),
      ("compile s", lambda r: fmt.number(r["compile_s"])),
      ("XLA peak", lambda r: fmt.format_bytes(r["xla_peak_bytes"])),
      ("device peak", lambda r: fmt.format_bytes(r["device_peak_bytes"])),
      ("steps to target (min–max)", _steps_text),
      ("epochs to target", lambda r: fmt.number(r["epochs_to_target"])),
      ("s to target", lambda r: fmt.number(r["time_to_target_s"])),
      ("wall s (trial)", lambda r: fmt.number(r["time_to_target_wall_s"])),
      (f"final {metrics.pop()}" if len(metrics) == 1 else "final metric",
       lambda r: fmt.number(r["final_metric_value"])),
      ("B_simple", lambda r: fmt.number(r["b_simple"])),
      ("status", lambda r: r["status"]),
  ]
  for name, key in (("device peak", "device_peak_bytes"), ("B_simple", "b_simple"),
                    ("tokens/s", "tokens_per_sec")):
    if all(r.get(key) is None for r in records):
      columns = [c for c in columns if c[0] != name]
  return [c[0] for c in columns], [[f(r) for _, f in columns] for r in records]


CONSOLE_COLUMNS = ("batch", "LR", "seeds", "samples/sec", "windows", "step ms", "TFLOP/s/dev",
                   "MFU", "XLA peak", "steps to target (min–max)", "s to target", "status")


def console_table(best: list[Row]) -> str:
  """A compact fixed-width text table of the per-batch summary, with the MFU note."""
  records = summary_records(best)
  headers, cells = summary_table(records)
  keep = [headers.index(h) for h in CONSOLE_COLUMNS if h in headers]
  note = mfu_note(records)
  return fmt.format_table([headers[i] for i in keep], [[row[i] for i in keep]
                                                        for row in cells]) + (
                                                            f"\n{note}" if note else "")


def trials_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
  """Every trial, by batch, LR and seed."""
  headers = ["trial_id", "batch", "lr", "lr_multiplier", "seed", "status",
             "steps_to_target", "loop samples/sec", "compile s", "error"]
  ordered = sorted(rows, key=lambda r: (r.get("global_batch") or -1, r.get("lr") or 0.0,
                                        r.get("seed") or -1))
  return headers, [[str(r["trial_id"]), fmt.number(r.get("global_batch")),
                    fmt.number(r.get("lr")), fmt.number(r.get("lr_multiplier")),
                    fmt.number(r.get("seed")), r["status"],
                    fmt.number(r.get("steps_to_target")),
                    fmt.number(r.get("loop_samples_per_sec")),
                    fmt.number(r.get("compile_s")), fmt.first_line(r.get("error"))]
                   for r in ordered]


def generalization_table(g: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """Per batch: the LR with the best final test metric, and the train-test gap."""
  span = lambda s: "-" if not s else (f"{fmt.number(s['median'])} ({fmt.number(s['min'])}"
                                      f"–{fmt.number(s['max'])})")
  headers = ["batch", "LR", "seeds", f"final test {g['metric']} (min–max)", "epochs",
             f"train-test gap at {fmt.number(g['epochs'])} epochs (min–max)"]
  return headers, [[fmt.number(b["global_batch"]), lr_text(b), str(b["seeds"]),
                    span(b["final"]), fmt.number(b["epochs"]), span(b["gap"])]
                   for b in g["batches"]]
