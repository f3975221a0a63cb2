"""Time and cost to target: a critical-batch fit combined with measured throughput.

time_to_target(B) = S(B) x step_time(B). S(B) comes from the fit (``analysis.fit``):
steps directly, examples / B, or epochs x train size / B. The step time comes from the
throughput phase, interpolated linearly in (log batch, log step time) between measured
batches, which is exact for a power law step_time = c B^p; it is never extrapolated
outside the measured batches, and S(B) never outside the fitted ones (past the fitted
batches the model's steps are a guess, e.g. where a rise was left out of the fit), so such
candidates are skipped with the reason. Device-seconds = time x the devices of the
measured batch nearest in log batch (ties go to the smaller batch).

Intervals push the fit's bootstrap replicates through the same formula; the step time's
own spread (a median over timed windows, typically a few percent) is not included.

Recommendation: the candidate with the least time to target, with the share of bootstrap
replicates that pick the same batch and the interval of the replicates' picks. With a
deadline: among candidates whose time to target (fitted value) meets it, the one with
the fewest device-seconds. Only train-step time counts: compile and eval are excluded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchbench.fmt import number

Point = dict[str, Any]


def _measured(throughput: Sequence[Point]) -> dict[int, Point]:
  """Batch -> its throughput point; of several points for one batch, the fastest."""
  best: dict[int, Point] = {}
  for p in throughput:
    if p.get("step_time_ms") is None or not p["step_time_ms"] > 0:
      continue
    b = int(p["global_batch"])
    if b not in best or p["step_time_ms"] < best[b]["step_time_ms"]:
      best[b] = p
  return dict(sorted(best.items()))


def step_time_ms(throughput: Sequence[Point], batch: float) -> float | None:
  """Step time at ``batch``: linear in (log batch, log step time) between the measured
  batches; None outside them (never extrapolated)."""
  measured = _measured(throughput)
  if not measured or not min(measured) <= batch <= max(measured):
    return None
  log_b = np.log(list(measured))
  log_t = np.log([p["step_time_ms"] for p in measured.values()])
  return float(np.exp(np.interp(math.log(batch), log_b, log_t)))


def num_devices(throughput: Sequence[Point], batch: float) -> int:
  """Devices of the measured batch nearest ``batch`` in log batch (ties: the smaller)."""
  measured = _measured(throughput)
  nearest = min(measured, key=lambda b: (abs(math.log(b / batch)), b))
  return int(measured[nearest].get("num_devices") or 1)


def candidate_batches(throughput: Sequence[Point], powers_of_two: bool = False) -> list[int]:
  """The measured batches, plus every power of two between the smallest and largest."""
  measured = list(_measured(throughput))
  if powers_of_two and measured:
    lo, hi = math.ceil(math.log2(measured[0])), math.floor(math.log2(measured[-1]))
    measured = sorted(set(measured) | {2**k for k in range(lo, hi + 1)})
  return measured


def _steps(fit: dict[str, Any], batch: float, train_size: int | None):
  """(fitted steps, per-replicate steps) at ``batch``."""
  unit, bc, rep_bc = fit["unit"], fit["b_crit"], np.asarray(fit["replicates"]["b_crit"])
  if unit == "steps":
    return (fit["s_min"] * (1 + bc / batch),
            np.asarray(fit["replicates"]["s_min"]) * (1 + rep_bc / batch))
  per_step = batch / (train_size if unit == "epochs" else 1)  # examples (epochs) per step
  return (fit["e_min"] * (1 + batch / bc) / per_step,
          np.asarray(fit["replicates"]["e_min"]) * (1 + batch / rep_bc) / per_step)


def _refused(reason: str, deadline_s: float | None) -> dict[str, Any]:
  return {"status": "refused", "reason": reason, "deadline_s": deadline_s, "candidates": [],
          "skipped": [], "recommended": None, "deadline_pick": None,
          "deadline_message": None, "rests_on": [], "text": f"No time to target: {reason}."}


def time_to_target(fit: dict[str, Any], throughput: Sequence[Point], *,
                   candidates: Sequence[int] | None = None, powers_of_two: bool = False,
                   deadline_s: float | None = None,
                   train_size: int | None = None) -> dict[str, Any]:
  """Predicted steps, time to target and device-seconds per candidate batch.

  Args:
    fit: an ``analysis.fit.fit_curve`` result (with its bootstrap replicates).
    throughput: measured points, dicts with ``global_batch``, ``step_time_ms``,
      ``num_devices`` and ``timed_windows``.
    candidates: batches to consider; default ``candidate_batches(throughput,
      powers_of_two)``.
    deadline_s: if given, also pick the fewest device-seconds among batches meeting it.
    train_size: examples per epoch; needed only for a fit in epochs.

  Returns:
    A JSON-able dict: ``status`` (``ok`` | ``refused``), ``reason``, ``candidates`` (per
    batch ``steps``, ``time_to_target_s``, ``device_seconds`` with intervals),
    ``skipped`` (batch and why), ``recommended``, ``deadline_pick``,
    ``deadline_message``, ``rests_on`` and ``text``.
  """
  if fit.get("status") != "ok":
    return _refused(f"the fit is {fit.get('status')}: {fit.get('reason')}", deadline_s)
  if fit["unit"] == "epochs" and not train_size:
    return _refused("the fit is in epochs; pass train_size to turn epochs into steps",
                    deadline_s)
  measured = _measured(throughput)
  if not measured:
    return _refused("no batch has a measured step time", deadline_s)
  lvl = fit["level"]
  q = [(1 - lvl) / 2, (1 + lvl) / 2]
  lo_fit, hi_fit = fit["batches"][0], fit["batches"][-1]
  rows, skipped, rep_times = [], [], []
  for b in candidates or candidate_batches(throughput, powers_of_two):
    t_ms = step_time_ms(throughput, b)
    if t_ms is None:
      skipped.append({"global_batch": b, "reason": f"outside the measured batches "
                      f"{min(measured)}..{max(measured)}: step time is not extrapolated"})
      continue
    if not lo_fit <= b <= hi_fit:
      skipped.append({"global_batch": b, "reason": f"outside the fitted batches "
                      f"{lo_fit}..{hi_fit}: steps are not extrapolated"})
      continue
    steps, rep_steps = _steps(fit, b, train_size)
    devices = num_devices(throughput, b)
    rep_t = rep_steps * t_ms / 1000
    rep_times.append(rep_t)
    rows.append({"global_batch": b, "measured": b in measured, "steps": steps,
                 "steps_interval": np.quantile(rep_steps, q).tolist(),
                 "step_time_ms": t_ms, "num_devices": devices,
                 "time_to_target_s": steps * t_ms / 1000,
                 "time_to_target_interval": np.quantile(rep_t, q).tolist(),
                 "device_seconds": steps * t_ms / 1000 * devices,
                 "device_seconds_interval": (np.quantile(rep_t, q) * devices).tolist(),
                 "meets_deadline": (None if deadline_s is None
                                    else steps * t_ms / 1000 <= deadline_s)})
  if not rows:
    return {**_refused("no candidate batch lies inside both the measured and the fitted "
                       "batches", deadline_s), "skipped": skipped}
  batches = np.array([r["global_batch"] for r in rows])
  times = np.stack(rep_times, axis=1)  # (replicates, candidates)
  best = min(range(len(rows)), key=lambda i: rows[i]["time_to_target_s"])
  picks = batches[times.argmin(1)]
  rec = {"global_batch": int(batches[best]),
         "time_to_target_s": rows[best]["time_to_target_s"],
         "time_to_target_interval": rows[best]["time_to_target_interval"],
         "replicate_agreement": float(np.mean(picks == batches[best])),
         "argmin_interval": [int(np.quantile(picks, q[0], method="lower")),
                             int(np.quantile(picks, q[1], method="higher"))],
         "interior": 0 < best < len(rows) - 1}
  out = {"status": "ok", "reason": None, "unit": fit["unit"], "level": lvl,
         "deadline_s": deadline_s, "candidates": rows, "skipped": skipped,
         "recommended": rec, "deadline_pick": None, "deadline_message": None}
  if deadline_s is not None:
    meeting = [i for i, r in enumerate(rows) if r["meets_deadline"]]
    if meeting:
      i = min(meeting, key=lambda k: rows[k]["device_seconds"])
      out["deadline_pick"] = {
          "global_batch": int(batches[i]), "device_seconds": rows[i]["device_seconds"],
          "device_seconds_interval": rows[i]["device_seconds_interval"],
          "time_to_target_s": rows[i]["time_to_target_s"],
          "meets_deadline_fraction": float(np.mean(times[:, i] <= deadline_s))}
    else:
      out["deadline_message"] = (
          f"no candidate batch reaches the target within the deadline of "
          f"{number(deadline_s)} s; the fastest, batch {rec['global_batch']}, takes "
          f"{number(rec['time_to_target_s'])} s")
  out["rests_on"] = _rests_on(fit, measured, rows, rec)
  out["text"] = plan_text(out)
  return out


def _rests_on(fit, measured, rows, rec) -> list[str]:
  windows = [p.get("timed_windows") for b, p in measured.items()
             if min(r["global_batch"] for r in rows) <= b <= max(r["global_batch"] for r in rows)]
  windows = [w for w in windows if w is not None]
  span = lambda lo, hi: f"{number(lo)}" if lo == hi else f"{number(lo)}..{number(hi)}"
  seeds = fit["weights"]
  edge = "smallest" if rec["global_batch"] == rows[0]["global_batch"] else "largest"
  return [
      f"steps from a fit over {fit['n_points']} batch sizes with {span(min(seeds), max(seeds))}"
      f" seed(s) each ({fit['resamples']} {fit['bootstrap']} bootstrap resamples)",
      f"step times measured at {len(measured)} batch sizes"
      + (f" over {span(min(windows), max(windows))} timed windows each" if windows else "")
      + "; train steps only (compile and eval excluded), their spread not in the intervals",
      (f"the fastest batch is an interior optimum of the {len(rows)} candidates"
       if rec["interior"] else f"the fastest batch is the {edge} candidate: the optimum may "
       "lie beyond the candidates"),
      f"{rec['replicate_agreement']:.0%} of bootstrap replicates pick the same batch "
      f"(their picks span {rec['argmin_interval'][0]}..{rec['argmin_interval'][1]})"]


def plan_text(plan: dict[str, Any]) -> str:
  """The recommendation in words; every number comes from ``plan``."""
  if plan["status"] != "ok":
    return f"No time to target: {plan['reason']}."
  rec, lvl = plan["recommended"], f"{plan['level']:.0%}"
  span = lambda xs: f"[{number(xs[0])}, {number(xs[1])}]"
  text = (f"Least time to target: batch {rec['global_batch']}, "
          f"{number(rec['time_to_target_s'])} s {span(rec['time_to_target_interval'])} "
          f"({lvl} interval).")
  pick = plan["deadline_pick"]
  if pick:
    text += (f" Within the deadline of {number(plan['deadline_s'])} s, the fewest "
             f"device-seconds: batch {pick['global_batch']}, {number(pick['device_seconds'])} "
             f"device-s {span(pick['device_seconds_interval'])}, done in "
             f"{number(pick['time_to_target_s'])} s (meets the deadline in "
             f"{pick['meets_deadline_fraction']:.0%} of bootstrap replicates).")
  elif plan["deadline_message"]:
    text += f" {plan['deadline_message'][0].upper()}{plan['deadline_message'][1:]}."
  if plan["skipped"]:
    text += " Skipped: " + "; ".join(f"{s['global_batch']} ({s['reason']})"
                                     for s in plan["skipped"]) + "."
  return text + " Rests on: " + "; ".join(plan["rests_on"]) + "."
