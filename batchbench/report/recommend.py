"""The recommendation and the warnings, each sentence computed from the table it sits under.

The recommendation names the batch that reaches the target soonest on this
machine: its steps to target (median over seeds) x its measured step time (the
throughput phase). Warnings flag what limits that answer: diverged trials,
batches that missed the target at every LR, an optimum at the edge of the LR
grid, a throughput plateau, throughput figures from too few windows, an input
pipeline that holds the device back, failed trials, and rows measured by different
code versions.
"""

from __future__ import annotations

from typing import Any

from batchbench import fmt
from batchbench.analysis.selection import FAILED, group, reached

Row = dict[str, Any]
# Throughput has plateaued at a batch when no batch of twice its size or more
# runs at least this much faster.
PLATEAU_GAIN = 1.10
MIN_TRUSTED_WINDOWS = 3
# Above this fraction of training time spent waiting for input, the report says the
# input pipeline is the bottleneck.
INPUT_BOUND = 0.05


def target_text(target: dict[str, Any] | None) -> str:
  if not target:
    return "no target"
  op = "<=" if str(target.get("direction", "")).lower().startswith(("min", "low")) else ">="
  return f"{target['metric']} {op} {target['value']:g}"


def lr_text(row: Row) -> str:
  mult = row.get("lr_multiplier")
  return fmt.number(row.get("lr")) + (f" (×{mult:g})" if mult is not None else "")


def plateau(best: list[Row]) -> tuple[int, float, list[int]] | None:
  """(batch, its samples/sec, larger batches) where throughput stops growing."""
  points = [(r["global_batch"], r["samples_per_sec"]) for r in best
            if r.get("samples_per_sec") is not None]
  for i, (batch, sps) in enumerate(points):
    beyond = [(b, s) for b, s in points[i + 1:] if b >= 2 * batch]
    if beyond and all(s < PLATEAU_GAIN * sps for _, s in beyond):
      return batch, sps, [b for b, _ in beyond]
  return None


def input_bound(rows: list[Row], points: list[Row]) -> list[tuple[int, float, str]]:
  """``(batch, fraction, what)`` for each batch whose loop waited for input more than
  ``INPUT_BOUND`` of its training time: from the throughput phase's timed windows
  where the batch has a point, else from its trials' time ledgers (summed)."""
  found = {}
  for batch, trials in group(rows, lambda r: r.get("global_batch")).items():
    ledgers = [r.get("time_ledger") or {} for r in trials]
    train = sum(x.get("train", 0.0) for x in ledgers)
    if train > 0:
      wait = sum(x.get("input_wait", 0.0) for x in ledgers)
      found[batch] = (wait / train, f"{len(trials)} trial(s)' training time")
  for p in points:
    if p.get("input_wait_fraction") is not None:
      found[p["global_batch"]] = (p["input_wait_fraction"],
                                  f"the throughput phase's {p.get('timed_windows', 0)} "
                                  "timed windows")
  return [(b, f, what) for b, (f, what) in sorted(found.items(), key=lambda kv: kv[0] or -1)
          if f > INPUT_BOUND]


def warnings(rows: list[Row], best: list[Row], points: list[Row]) -> list[str]:
  """Plain-language warnings about ``rows`` and the per-batch table ``best``."""
  out = []
  workloads = sorted({str(r.get("workload")) for r in rows})
  if len(workloads) > 1:
    out.append(f"The results mix several workloads ({', '.join(workloads)}); use one "
               "workdir per workload, since batches are compared across all rows.")
  versions = sorted({r.get("measurement_version") for r in rows + points}, key=str)
  if len(versions) > 1:
    out.append(f"The rows were measured by different code versions (measurement_version "
               f"{', '.join(map(str, versions))}); numbers from different versions may not "
               "be comparable: rerun in a fresh workdir.")
  for rule, trials in group([r for r in rows if r["status"] == "diverged"],
                            lambda r: r.get("lr_rule")).items():
    listed = "; ".join(
        f"batch {r['global_batch']} at lr {lr_text(r)} seed {r.get('seed')}"
        + (f", step {r['diverged_step']}" if r.get("diverged_step") is not None else "")
        for r in sorted(trials, key=lambda r: (r["global_batch"], r.get("lr") or 0.0)))
    out.append(f"{len(trials)} trial(s) diverged under the '{rule}' LR rule: {listed}.")
  for batch, trials in sorted(group(rows, lambda r: r.get("global_batch")).items(),
                              key=lambda kv: kv[0] or -1):
    if (any(r.get("target") for r in trials) and not any(map(reached, trials))
        and any(r["status"] not in ("oom", "error") for r in trials)):
      lrs = ", ".join(sorted({fmt.number(r.get("lr")) for r in trials}, key=float))
      out.append(f"Batch {batch} missed the target ({target_text(trials[0].get('target'))}) "
                 f"at every LR tried ({lrs}).")
  edge = [f"{b['global_batch']} (×{b['lr_multiplier']:g})" for b in best
          if reached(b) and len(b["lrs_tried"]) >= 2 and not b["lr_interior"]]
  if edge:
    out.append(f"The best LR is at the edge of the LRs tried for batch {', '.join(edge)}: "
               "the optimum may lie outside them, so steps to target may be overstated.")
  flat = plateau(best)
  if flat:
    batch, sps, beyond = flat
    many = len(beyond) > 1
    out.append(f"Throughput plateaus at batch {batch} ({sps:,.0f} samples/sec): "
               f"{'batches' if many else 'batch'} {', '.join(map(str, beyond))} "
               f"{'run' if many else 'runs'} less than {PLATEAU_GAIN - 1:.0%} faster, so "
               f"{'they only pay' if many else 'it only pays'} off if "
               f"{'they cut' if many else 'it cuts'} steps to target.")
  thin = [str(b["global_batch"]) for b in best if b.get("point")
          and b["timed_windows"] < MIN_TRUSTED_WINDOWS]
  if thin:
    out.append(f"Throughput at batch {', '.join(thin)} rests on fewer than "
               f"{MIN_TRUSTED_WINDOWS} timed windows (marked * in the table).")
  waits = input_bound(rows, points)
  if waits:
    listed = "; ".join(f"batch {b}: {f:.0%} of {what}" for b, f, what in waits)
    out.append(f"The input pipeline, not the device, limits the run: the loop waited for "
               f"input more than {INPUT_BOUND:.0%} of its training time ({listed}). Raise "
               "the pipeline's threads, move decoding or augmentation onto the device, or "
               "read a prepared (pre-decoded) copy of the data.")
  missing = [str(b["global_batch"]) for b in best if not b.get("point")]
  if missing:
    out.append(f"No throughput point was measured for batch {', '.join(missing)}, so its "
               "time to target is unknown; rerun the sweep to measure it.")
  for r in rows:
    if r["status"] == "oom":
      out.append(f"Batch {r['global_batch']} ran out of memory (trial {r['trial_id']}, "
                 f"lr {lr_text(r)}); use gradient accumulation or more devices.")
    elif r["status"] == "error":
      out.append(f"Trial {r['trial_id']} (batch {r['global_batch']}, lr {lr_text(r)}) "
                 f"failed with an error: {fmt.first_line(r.get('error'), 120)}")
  return out


def _measured_text(r: Row) -> str:
  return (f"{fmt.number(r['steps_to_target'])} steps (median of {r['seeds_at_lr']} seed(s)) "
          f"x {fmt.number(r['step_time_ms'])} ms per step (median of {r['timed_windows']} "
          f"timed windows) = {fmt.number(r['time_to_target_s'])} s of training at lr "
          f"{lr_text(r)}")


def recommend(rows: list[Row], best: list[Row], points: list[Row],
              plan: dict[str, Any] | None = None) -> dict[str, Any]:
  """The batch to train with, from the per-batch table and, when the critical-batch fit
  holds, its time-to-target plan (``analysis.cost``).

  Returns:
    ``fastest_batch`` (the plan's pick; else the least measured time to target; for a
    workload without target, the most samples/sec; None when nothing qualifies),
    ``fastest_basis`` (``fit``, ``time_to_target_s`` or ``samples_per_sec``),
    ``warnings`` and ``text`` (plain language, every figure from ``best`` or ``plan``).
  """
  timed = [r for r in best if reached(r) and r.get("time_to_target_s") is not None]
  has_target = any(r.get("target") for r in rows)
  fastest, basis = None, None
  if timed:
    fastest, basis = min(timed, key=lambda r: r["time_to_target_s"]), "time_to_target_s"
  elif not has_target:
    ran = [r for r in best if r["status"] not in FAILED and r.get("samples_per_sec")]
    if ran:
      fastest, basis = max(ran, key=lambda r: r["samples_per_sec"]), "samples_per_sec"
  text = []
  if plan is not None and plan.get("status") == "ok":
    pick = plan["recommended"]["global_batch"]
    text.append(f"Train with global batch {pick} to reach the target "
                f"({target_text(next(r['target'] for r in rows if r.get('target')))}) soonest "
                f"on this machine. {plan['text']}")
    measured = next((r for r in timed if r["global_batch"] == pick), None)
    if measured:
      text.append(f"Measured at batch {pick}: {_measured_text(measured)}.")
    if fastest is not None and fastest["global_batch"] != pick:
      text.append(f"Measured without the fit, batch {fastest['global_batch']} was fastest: "
                  f"{_measured_text(fastest)}; the fit smooths the seeds' noise.")
    basis, fastest = "fit", next((r for r in best if r["global_batch"] == pick), fastest)
  elif not rows:
    text.append("No results yet.")
  elif basis == "time_to_target_s":
    text.append(
        f"Train with global batch {fastest['global_batch']}: on this machine it reaches the "
        f"target ({target_text(fastest['target'])}) soonest, in {_measured_text(fastest)}"
        + (f". (No critical-batch fit: {plan['reason']}.)" if plan else "."))
  elif basis == "samples_per_sec":
    text.append(f"This workload has no target, so only throughput is compared: global "
                f"batch {fastest['global_batch']} runs the most samples/sec "
                f"({fastest['samples_per_sec']:,.0f}, median of {fastest['timed_windows']} "
                "windows).")
  elif has_target:
    target = next(r["target"] for r in rows if r.get("target"))
    text.append(f"No batch reached the target ({target_text(target)}) with a measured step "
                "time; widen the LR grid or train longer before choosing a batch.")
  found = warnings(rows, best, points)
  if found:
    text.append(f"See the {len(found)} warning(s) below.")
  return {"fastest_batch": fastest["global_batch"] if fastest else None,
          "fastest_basis": basis, "warnings": found, "text": " ".join(text)}
