"""What the articles argue about, measured: final test metrics and the train-test gap.

Many articles claim that large batches generalise worse (Keskar et al. 2017). Per
batch this takes, over the learning rates tried, the one with the best final test
metric (median over seeds, a failed seed counting as the worst), and reports it with
its min-max over seeds; and the train-test gap (train metric - test metric for a
metric to maximise, the other way round for one to minimise) at the same number of
epochs for every batch: the last eval at or before the fewest epochs any batch's
chosen trials trained. A statement compares the smallest and the largest batch only
where the seeds' ranges do not overlap; otherwise it says there is no difference
beyond the seeds' spread.

Trials that stopped at the target (``stop_at_target``) end with the target's metric
by construction and at different epochs: the section says so instead of drawing a
conclusion from them. Reads rows; imports no JAX.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from batchbench.analysis.selection import FAILED, group
from batchbench.fmt import number

Row = dict[str, Any]
_EPS = 1e-9


def _metric(rows: list[Row]) -> tuple[str | None, str]:
  target = next((r["target"] for r in rows if r.get("target")), None)
  if target:
    return target["metric"], target.get("direction", "max")
  finals = next((r["final_eval"] for r in rows if r.get("final_eval")), {})
  return ("accuracy", "max") if "accuracy" in finals else (None, "max")


def _epochs(row: Row, examples: int) -> float | None:
  size = (row.get("spec") or {}).get("train_size")
  return examples / size if size else None


def _gap(row: Row, metric: str, sign: float, epochs: float) -> float | None:
  """The row's train-test gap at its last eval within ``epochs`` (None without one)."""
  within = [h for h in row.get("eval_history") or []
            if h.get("train_metrics") and (_epochs(row, h["examples"]) or math.inf)
            <= epochs + _EPS]
  if not within:
    return None
  h = within[-1]
  return sign * (h["train_metrics"][metric] - h["metrics"][metric])


def _spread(values: list[float]) -> dict[str, float] | None:
  return ({"median": statistics.median(values), "min": min(values), "max": max(values)}
          if values else None)


def generalization(rows: list[Row]) -> dict[str, Any]:
  """The per-batch final metric and train-test gap, and a statement that follows from them.

  Returns:
    ``{"metric", "direction", "epochs" (where the gap is compared), "stopped_at_target",
    "batches": [{global_batch, lr, lr_multiplier, seeds, final: {median, min, max},
    gap: {...} or None, epochs}], "text"}``.
  """
  metric, direction = _metric(rows)
  sign = 1.0 if direction == "max" else -1.0
  out: dict[str, Any] = {"metric": metric, "direction": direction, "epochs": None,
                         "stopped_at_target": any((r.get("spec") or {}).get("stop_at_target")
                                                  and r.get("steps_to_target") is not None
                                                  for r in rows),
                         "batches": [], "text": ""}
  if metric is None:
    out["text"] = "No eval metric to compare: the workload has no evaluation."
    return out
  chosen = {}
  for batch, trials in sorted(group(rows, lambda r: r["global_batch"]).items()):
    lrs = group(trials, lambda r: r.get("lr_multiplier"))
    scored = []
    for mult, seeds in lrs.items():
      finals = [sign * r["final_eval"][metric] if r["status"] not in FAILED
                and (r.get("final_eval") or {}).get(metric) is not None else -math.inf
                for r in seeds]
      scored.append((statistics.median(finals), -(mult or 0), seeds))
    score, _, seeds = max(scored)
    if score == -math.inf:
      continue
    chosen[batch] = seeds
  if not chosen:
    out["text"] = f"No trial recorded a final {metric}."
    return out
  epochs = min(statistics.median(_epochs(r, r["examples"]) or 0.0 for r in seeds)
               for seeds in chosen.values())
  out["epochs"] = epochs
  for batch, seeds in chosen.items():
    finals = [r["final_eval"][metric] for r in seeds
              if r["status"] not in FAILED and (r.get("final_eval") or {}).get(metric)
              is not None]
    gaps = [g for g in (_gap(r, metric, sign, epochs) for r in seeds) if g is not None]
    out["batches"].append({
        "global_batch": batch, "lr": seeds[0].get("lr"),
        "lr_multiplier": seeds[0].get("lr_multiplier"), "seeds": len(seeds),
        "final": _spread(finals), "gap": _spread(gaps),
        "epochs": statistics.median(_epochs(r, r["examples"]) or 0.0 for r in seeds)})
  out["text"] = _statement(out)
  return out


def _compare(small: dict[str, float], large: dict[str, float]) -> str:
  """``"lower"`` or ``"higher"`` when ``large``'s min-max range lies wholly below or above
  ``small``'s, else ``""`` (the ranges overlap)."""
  if large["max"] < small["min"]:
    return "lower"
  if large["min"] > small["max"]:
    return "higher"
  return ""


def _statement(g: dict[str, Any]) -> str:
  metric, batches = g["metric"], g["batches"]
  seeds = sorted({b["seeds"] for b in batches})
  seed_text = (f"{seeds[0]} seed(s)" if len(seeds) == 1
               else f"{seeds[0]}-{seeds[-1]} seeds")
  text = []
  if g["stopped_at_target"]:
    text.append(f"Trials stopped at the target (stop_at_target=True): their final {metric} "
                "is the target's by construction and the batches trained different numbers "
                "of epochs, so this sweep cannot say whether large batches generalise worse; "
                "set stop_at_target=False to train every trial to the budget.")
  small, large = batches[0], batches[-1]
  if len(batches) < 2 or not small["final"] or not large["final"]:
    return " ".join(text + [f"Only one batch has a final {metric}: nothing to compare."])
  fmt_range = lambda s: f"{number(s['median'])} ({number(s['min'])}–{number(s['max'])})"
  worse = _compare(small["final"], large["final"])
  where = (f"at batch {large['global_batch']} than at batch {small['global_batch']}")
  if worse:
    verdict = (f"the final test {metric} is {worse} {where} beyond the spread of the seeds: "
               f"{fmt_range(large['final'])} vs {fmt_range(small['final'])}")
  else:
    verdict = (f"the final test {metric} differs no more between batch "
               f"{small['global_batch']} ({fmt_range(small['final'])}) and batch "
               f"{large['global_batch']} ({fmt_range(large['final'])}) than between seeds")
  text.append(f"Over {seed_text} per batch, at the best LR for the final {metric}, "
              f"{verdict}.")
  if small["gap"] and large["gap"]:
    wider = _compare(small["gap"], large["gap"])
    gap_word = {"higher": "wider", "lower": "narrower"}.get(wider, "")
    text.append(
        f"The train-test gap at {number(g['epochs'])} epochs is "
        f"{fmt_range(large['gap'])} at batch {large['global_batch']} against "
        f"{fmt_range(small['gap'])} at batch {small['global_batch']}"
        + (f": {gap_word} at the larger batch beyond the seeds' spread." if gap_word
           else ", within the seeds' spread."))
  return " ".join(text)
