"""The critical batch: McCandlish et al. 2018's model fitted to steps (or examples) to target.

Model: steps S(B) = S_min (1 + B_crit/B); examples E(B) = E_min (1 + B/B_crit), E_min =
S_min B_crit, so E = S B and both give the same B_crit. Epochs fit like examples (E_min
in epochs). Fit: weighted least squares (``scipy.optimize.least_squares``) over (log scale,
log B_crit) with residuals log(value) - log(model): relative errors, fit for values that
span decades. A batch's value is the median of its seeds (a missed target counts as
infinite, as in ``analysis.selection``: reached when more than half its seeds did); its
weight is the number of seeds that reached the target.

Intervals (90%): percentile bootstrap over seeds (each batch's seeds resampled, medians
taken, refit) when every batch has at least 3 seeds, else over (batch, value) points; the
RNG seed is fixed. Replicates minimise the same sum of squares by a vectorised profile
search (log scale has a closed form given B_crit), exact to 3e-4 in log B_crit.

Honesty rules (status ``refused`` | ``not_describable`` with a plain reason):
  * fewer than 3 batches reached the target: refused;
  * steps do not fall overall (weighted log-log slope >= 0): not describable;
  * a rise after the minimum (a later batch over 30% above the fewest steps): the model
    lets steps only fall or level off, as Shallue et al. 2018 observe; a rise usually means
    the LR grid or schedule missed the optimum at large batches. Batches from the rise on
    are left out of the fit, with a warning;
  * B_crit must be pinned down: the fit and its whole 90% interval lie within [smallest
    batch / 8, largest * 8], where the model departs from an asymptote by over 12.5% at a
    measured batch; further out the data cannot tell B_crit from its absence (bootstrap
    fits run off to the search bounds, 1024x out).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from batchbench.config.errors import ConfigError, positive_int
from batchbench.fmt import number

UNITS = ("steps", "examples", "epochs")
LEVEL = 0.9
MIN_BATCHES = 3
# Perfect scaling while the steps exceed the perfect-scaling line by at most 10%; maximal
# data parallelism once they exceed S_min by at most 10% (see the regime functions).
PERFECT_SCALING_EXCESS = 0.1
DOUBLING_SAVING = 1 / 3  # "a doubling saves less than a third of the steps" from B_crit/2
RISE_TOLERANCE = 0.3  # a plateau's seed noise (10%) rarely fakes a 30% rise
IDENTIFIABLE_FACTOR = 8.0
SEARCH_FACTOR = 1024.0
SEEDS_FOR_SEED_BOOTSTRAP = 3
LOOSE_FIT = 0.25  # warn above this weighted rms relative residual


# --- the model and its regimes: the one definition the text and the plot share ----------

def predict(unit: str, batch: Any, scale: float, b_crit: float) -> np.ndarray:
  """S_min (1 + B_crit/B) for steps, E_min (1 + B/B_crit) for examples and epochs."""
  b = np.asarray(batch, float)
  return scale * (1 + b_crit / b) if unit == "steps" else scale * (1 + b / b_crit)


def perfect_scaling_line(unit: str, batch: Any, scale: float, b_crit: float) -> np.ndarray:
  """The model's B << B_crit asymptote: steps S_min B_crit / B; examples a constant E_min."""
  b = np.asarray(batch, float)
  return scale * b_crit / b if unit == "steps" else scale * np.ones_like(b)


def perfect_scaling_limit(b_crit: float) -> float:
  """Largest batch whose steps are within 10% of the perfect-scaling line: B_crit / 10.

  S(B) / (S_min B_crit / B) = 1 + B / B_crit <= 1 + 0.1  <=>  B <= 0.1 B_crit. (Measured
  the other way, the line within 10% of S(B), it would be B <= B_crit / 9.)
  """
  return PERFECT_SCALING_EXCESS * b_crit


def max_parallelism_start(b_crit: float) -> float:
  """Smallest batch whose steps are within 10% of S_min: S(B)/S_min = 1 + B_crit/B <= 1.1
  <=> B >= 10 B_crit (maximal data parallelism)."""
  return b_crit / PERFECT_SCALING_EXCESS


def doubling_saving(batch: Any, b_crit: float) -> Any:
  """Share of the steps a doubling of the batch saves: 1 - S(2B)/S(B) = B_crit/(2(B+B_crit))."""
  return b_crit / (2 * (np.asarray(batch, float) + b_crit))


def diminishing_returns_start(b_crit: float) -> float:
  """The batch from which a doubling saves less than a third of the steps: B_crit / 2.

  S(2B)/S(B) = (2B + B_crit) / (2B + 2B_crit) > 2/3  <=>  6B + 3B_crit > 4B + 4B_crit
  <=>  B > B_crit / 2 (in general B_crit (1 - 2s) / (2s) for a saving s).
  """
  return b_crit * (1 - 2 * DOUBLING_SAVING) / (2 * DOUBLING_SAVING)


def regime(batch: float, b_crit: float) -> str:
  """``perfect scaling`` up to B_crit/10, ``maximal data parallelism`` from 10 B_crit on,
  ``diminishing returns`` between."""
  if batch <= perfect_scaling_limit(b_crit):
    return "perfect scaling"
  if batch >= max_parallelism_start(b_crit):
    return "maximal data parallelism"
  return "diminishing returns"


def scale_key(unit: str) -> str:
  """The name of the fitted scale: ``s_min`` for steps, ``e_min`` for examples and epochs."""
  return "s_min" if unit == "steps" else "e_min"


# --- fitting ----------------------------------------------------------------------------

def _log_shape(unit: str, log_b: np.ndarray, u: Any) -> np.ndarray:
  """log(model / scale) at log batch ``log_b`` for log B_crit ``u``."""
  return np.logaddexp(0.0, u - log_b if unit == "steps" else log_b - u)


def _profile_fit(unit, log_b, log_y, w, bounds):
  """Per row of (log_y, w): the (log scale, log B_crit) minimising sum w (log y - model)^2.

  Given log B_crit the best log scale is the weighted mean residual, so only log B_crit is
  searched: a 129-point grid over the bounds, then three zooms of 33 points around the best.
  """
  lo, hi = bounds
  rows = np.arange(log_y.shape[0])
  center, half = np.full(len(rows), (lo + hi) / 2), np.full(len(rows), (hi - lo) / 2)
  for points in (129, 33, 33, 33):
    u = np.clip(center[:, None] + half[:, None] * np.linspace(-1, 1, points), lo, hi)
    resid = log_y[:, None, :] - _log_shape(unit, log_b, u[:, :, None])
    a = (w[:, None, :] * resid).sum(-1, keepdims=True) / w.sum(-1)[:, None, None]
    center = u[rows, (w[:, None, :] * (resid - a) ** 2).sum(-1).argmin(-1)]
    half = 4 * half / (points - 1)
  resid = log_y - _log_shape(unit, log_b, center[:, None])
  return (w * resid).sum(-1) / w.sum(-1), center


def _least_squares(unit, log_b, log_y, w, bounds):
  """The main fit: ``least_squares`` started from the profile search's optimum."""
  a0, u0 = _profile_fit(unit, log_b, log_y[None], w[None], bounds)
  sw, sign = np.sqrt(w), 1.0 if unit == "steps" else -1.0
  residuals = lambda p: sw * (log_y - p[0] - _log_shape(unit, log_b, p[1]))
  # d/du log(1 + e^(+-(u - log B))) = +-sigmoid(+-(u - log B)).
  jac = lambda p: np.stack(
      [-sw, -sw * sign / (1 + np.exp(-sign * (p[1] - log_b)))], axis=1)
  res = least_squares(residuals, [a0[0], u0[0]], jac=jac, bounds=([-np.inf, bounds[0]],
                      [np.inf, bounds[1]]), xtol=1e-12, ftol=1e-12, gtol=1e-12)
  return res.x[0], res.x[1]


def _median(values: np.ndarray) -> float:
  """The median, inf when half the values or more are inf (missed targets)."""
  return float(np.median(values))


def _resample(values: list[np.ndarray], method: str, resamples: int, rng):
  """Bootstrap (medians, weights), each (resamples, batches); weight 0 = batch missing."""
  med = np.full((resamples, len(values)), np.inf)
  wts = np.zeros((resamples, len(values)))
  if method == "seeds":
    for j, v in enumerate(values):
      draw = v[rng.integers(0, len(v), (resamples, len(v)))]
      med[:, j], wts[:, j] = np.median(draw, axis=1), np.isfinite(draw).sum(1)
  else:
    flat = np.concatenate(values)
    ids = np.repeat(np.arange(len(values)), [len(v) for v in values])
    idx = rng.integers(0, len(flat), (resamples, len(flat)))
    drawn, drawn_ids = flat[idx], ids[idx]
    for j in range(len(values)):
      member = drawn_ids == j
      count = member.sum(1)
      # A replicate's median over the draws of this batch (NaN marks the other batches').
      m = np.array([np.median(row[keep]) if k else np.inf
                    for row, keep, k in zip(drawn, member, count, strict=True)])
      med[:, j] = m
      wts[:, j] = (member & np.isfinite(drawn)).sum(1)
  wts[~np.isfinite(med)] = 0.0
  return med, wts


def _steps_word(unit: str) -> str:
  return "steps" if unit == "steps" else f"steps ({unit} / batch)"


def fit_curve(values: Mapping[int, Sequence[float | None]], unit: str = "steps", *,
              bootstrap: str = "auto", resamples: int = 1000, seed: int = 0,
              level: float = LEVEL) -> dict[str, Any]:
  """Fits the critical-batch model to per-seed values of each batch, with intervals.

  Args:
    values: global batch -> the per-seed values (steps, examples or epochs to target);
      None or inf for a seed that missed the target.
    unit: ``steps``, ``examples`` or ``epochs``.
    bootstrap: ``seeds``, ``points`` or ``auto`` (seeds when every fitted batch has at
      least 3 seeds, else points).
    resamples: bootstrap replicates. seed: the RNG seed. level: the interval's coverage.

  Returns:
    The JSON-able ``fit.json`` dict (the module docstring gives the rules behind
    ``status``), with ``replicates`` (per replicate ``b_crit`` and the scale) kept so
    callers can derive intervals of anything else.
  """
  if unit not in UNITS:
    raise ConfigError("unit", unit, f"must be one of {', '.join(UNITS)}")
  if bootstrap not in ("auto", "seeds", "points"):
    raise ConfigError("bootstrap", bootstrap, "must be auto, seeds or points")
  positive_int(resamples, "resamples")
  data = {int(b): np.array([math.inf if v is None else float(v) for v in vs], float)
          for b, vs in sorted(values.items()) if len(vs)}
  if any(b <= 0 or np.any(v <= 0) or np.any(np.isnan(v)) for b, v in data.items()):
    raise ValueError("fit_curve: batches and values must be positive (None/inf = missed)")
  out = {"status": "ok", "reason": None, "unit": unit, "level": level, "resamples": resamples,
         "resamples_failed": 0, "bootstrap": None, "seed": seed, "n_points": 0, "n_values": 0,
         "batches": [], "excluded": [], "b_crit": None, "b_crit_interval": None,
         "b_crit_bound": None, "s_min": None, "s_min_interval": None, "e_min": None,
         "e_min_interval": None, "e_min_unit": "epochs" if unit == "epochs" else "examples",
         "weights": [], "weighting": "seeds that reached the target, per batch",
         "residuals": [], "rms_relative_residual": None, "regimes": None, "warnings": [],
         "replicates": {}, "text": ""}
  medians = {b: _median(v) for b, v in data.items()}
  used = _screen(data, medians, out)
  if out["reason"]:
    return _finish(out, out["status"], out["reason"])
  if bootstrap == "auto":
    few = min(len(data[b]) for b in used) < SEEDS_FOR_SEED_BOOTSTRAP
    bootstrap = "points" if few else "seeds"
  if bootstrap == "seeds" and min(len(data[b]) for b in used) < 2:
    out["warnings"].append("batches with a single seed add no spread to the seeds bootstrap")
  log_b = np.log(np.array(used, float))
  bounds = (math.log(used[0] / SEARCH_FACTOR), math.log(used[-1] * SEARCH_FACTOR))
  y = np.array([medians[b] for b in used])
  w = np.array([float(np.isfinite(data[b]).sum()) for b in used])
  log_scale, u = _least_squares(unit, log_b, np.log(y), w, bounds)
  med, wts = _resample([data[b] for b in used], bootstrap, resamples,
                       np.random.default_rng(seed))
  ok = (wts > 0).sum(1) >= MIN_BATCHES
  rep_a, rep_u = _profile_fit(unit, log_b, np.where(wts[ok] > 0, np.log(med[ok]), 0.0),
                              wts[ok], bounds)
  out.update(bootstrap=bootstrap, resamples_failed=int((~ok).sum()), n_points=len(used),
             n_values=int(sum(len(data[b]) for b in used)), batches=used, weights=w.tolist(),
             replicates={"b_crit": np.exp(rep_u).tolist(), scale_key(unit): np.exp(rep_a).tolist()})
  if ok.sum() < resamples / 2:
    return _finish(out, "not_describable", f"too few runs for an interval: only "
                   f"{int(ok.sum())} of {resamples} bootstrap resamples kept {MIN_BATCHES} "
                   "batch sizes that reached the target")
  reason = _pin_down(out, math.exp(u))
  if reason:
    return _finish(out, "not_describable", reason)
  _describe(out, y, w, math.exp(log_scale), math.exp(u))
  return _finish(out, "ok", None)


def _screen(data, medians, out) -> list[int]:
  """The batches to fit; sets ``out``'s status and reason when there is nothing to fit."""
  unit, word = out["unit"], _steps_word(out["unit"])
  reached = [b for b in data if math.isfinite(medians[b])]
  if len(reached) < MIN_BATCHES:
    out.update(status="refused", reason=f"only {len(reached)} batch size(s) reached the "
               f"target ({', '.join(map(str, reached)) or 'none'}); a fit needs at least "
               f"{MIN_BATCHES}")
    return []
  # Proportional to steps: examples / B and epochs / B (the train size a constant factor).
  steps = {b: medians[b] / (1 if unit == "steps" else b) for b in reached}
  slope = np.polyfit(np.log(reached), np.log([steps[b] for b in reached]), 1,
                     w=np.sqrt([np.isfinite(data[b]).sum() for b in reached]))[0]
  if slope >= 0:
    first, last = reached[0], reached[-1]
    out.update(status="not_describable", reason=f"{word} do not fall with batch size: "
               f"{number(steps[first])} at batch {first}, {number(steps[last])} at batch "
               f"{last} (log-log slope {slope:+.2f}); the model needs them to fall or level "
               "off")
    return []
  best = min(reached, key=lambda b: steps[b])
  rising = [b for b in reached if b > best and steps[b] > (1 + RISE_TOLERANCE) * steps[best]]
  if not rising:
    return reached
  tail = [b for b in reached if b >= rising[0]]
  out["excluded"] = [{"global_batch": b, "value": medians[b], "reason": "rise"} for b in tail]
  out["warnings"].append(
      f"{word} rise after batch {best} ({number(steps[best])}): "
      + ", ".join(f"{number(steps[b])} at {b}" for b in tail) + ". The model lets them only "
      "fall or level off (Shallue et al. 2018 see them level off); a rise usually means the "
      "learning-rate grid or schedule missed the optimum at large batches, so batches "
      f"{', '.join(map(str, tail))} are left out of the fit; widen the LR grid there")
  used = [b for b in reached if b < rising[0]]
  if len(used) < MIN_BATCHES:
    out.update(status="not_describable", reason=f"{word} rise from batch {rising[0]} on, "
               f"which leaves {len(used)} batch size(s) before the rise; a fit needs "
               f"{MIN_BATCHES}")
  return used


def _pin_down(out, b_crit: float) -> str | None:
  """None when B_crit and its interval lie within [smallest / 8, largest * 8], else why not."""
  used, level, word = out["batches"], out["level"], _steps_word(out["unit"])
  bc_lo, bc_hi = np.quantile(out["replicates"]["b_crit"], [(1 - level) / 2, (1 + level) / 2])
  low_edge, high_edge = used[0] / IDENTIFIABLE_FACTOR, used[-1] * IDENTIFIABLE_FACTOR
  too_high = b_crit > high_edge or bc_hi > high_edge
  too_low = b_crit < low_edge or bc_lo < low_edge
  if too_high and too_low:
    return (f"B_crit cannot be pinned down by these batches: its {level:.0%} interval "
            f"[{number(bc_lo)}, {number(bc_hi)}] reaches beyond both {number(low_edge)} and "
            f"{number(high_edge)}")
  if too_high:
    side, bound, edge = "above", min(bc_lo, high_edge), high_edge
    why = ("still in the perfect-scaling regime at the largest batch" if b_crit > high_edge
           else "no upper limit on B_crit from these batches")
  elif too_low:
    side, bound, edge = "below", max(bc_hi, low_edge), low_edge
    why = (f"{word} have already levelled off at the smallest batch" if b_crit < low_edge
           else "no lower limit on B_crit from these batches")
  else:
    return None
  out["b_crit_bound"] = {"side": side, "value": float(bound)}
  return (f"{why}: B_crit is {side} about {number(bound)} and cannot be pinned down by "
          f"these batches ({used[0]}..{used[-1]}; its {level:.0%} interval reaches past "
          f"{number(edge)})")


def _describe(out, y, w, scale: float, b_crit: float) -> None:
  """Fills the parameters, intervals, residuals and regimes of a fit that pinned B_crit."""
  unit, level = out["unit"], out["level"]
  q = [(1 - level) / 2, (1 + level) / 2]
  rep_bc = np.asarray(out["replicates"]["b_crit"])
  rep_scale = np.asarray(out["replicates"][scale_key(unit)])
  steps_form = unit == "steps"
  out.update(b_crit=b_crit, b_crit_interval=np.quantile(rep_bc, q).tolist(),
             e_min=scale * b_crit if steps_form else scale,
             e_min_interval=np.quantile(rep_scale * (rep_bc if steps_form else 1), q).tolist())
  if unit != "epochs":
    out.update(s_min=scale if steps_form else scale / b_crit,
               s_min_interval=np.quantile(rep_scale / (1 if steps_form else rep_bc), q).tolist())
  used = out["batches"]
  fitted = predict(unit, used, scale, b_crit)
  rel = y / fitted - 1
  out["residuals"] = [{"global_batch": b, "value": float(v), "fitted": float(f),
                       "relative_residual": float(r)}
                      for b, v, f, r in zip(used, y, fitted, rel, strict=True)]
  out["rms_relative_residual"] = float(np.sqrt(np.average(rel**2, weights=w)))
  if out["rms_relative_residual"] > LOOSE_FIT:
    out["warnings"].append(f"the model fits loosely: weighted rms relative residual "
                           f"{out['rms_relative_residual']:.0%}")
  out["regimes"] = {
      "perfect_scaling_up_to": perfect_scaling_limit(b_crit),
      "doubling_saves_under_a_third_from": diminishing_returns_start(b_crit),
      "max_parallelism_from": max_parallelism_start(b_crit),
      "batches": {str(b): regime(b, b_crit) for b in used}}


def _finish(out: dict[str, Any], status: str, reason: str | None) -> dict[str, Any]:
  out.update(status=status, reason=reason)
  out["text"] = fit_text(out)
  return out


def fit_text(fit: dict[str, Any]) -> str:
  """The plain-language summary; every number in it comes from ``fit``."""
  warnings = "".join(f" Warning: {w}." for w in fit["warnings"])
  if fit["status"] == "refused":
    return f"No fit: {fit['reason']}.{warnings}"
  if fit["status"] == "not_describable":
    return f"The model does not describe this curve: {fit['reason']}.{warnings}"
  unit, lvl, reg = fit["unit"], f"{fit['level']:.0%}", fit["regimes"]
  excess = f"{PERFECT_SCALING_EXCESS:.0%}"
  interval = lambda k: f"[{number(fit[k][0])}, {number(fit[k][1])}]"
  scale = (f"S_min ≈ {number(fit['s_min'])} {interval('s_min_interval')} steps, E_min ≈ "
           if fit["s_min"] is not None else "E_min ≈ ")
  by_regime = {}
  for b, name in reg["batches"].items():
    by_regime.setdefault(name, []).append(b)
  measured = "; ".join(f"{name}: {', '.join(bs)}" for name, bs in by_regime.items())
  return (f"Fit of {unit} to target over {fit['n_points']} batch sizes "
          f"({fit['batches'][0]}..{fit['batches'][-1]}, {fit['n_values']} runs; weight = "
          f"{fit['weighting']}; {lvl} intervals from {fit['resamples']} {fit['bootstrap']} "
          f"bootstrap resamples): B_crit ≈ {number(fit['b_crit'])} "
          f"{interval('b_crit_interval')}; {scale}{number(fit['e_min'])} "
          f"{interval('e_min_interval')} {fit['e_min_unit']}. Perfect scaling (steps within "
          f"{excess} of S_min·B_crit/B) up to about {number(reg['perfect_scaling_up_to'])}; from "
          f"about {number(reg['doubling_saves_under_a_third_from'])} on, a doubling of the "
          f"batch saves less than a third of the steps; from about "
          f"{number(reg['max_parallelism_from'])} on, steps are within {excess} of S_min (maximal "
          f"data parallelism). Measured batches by regime: {measured}.{warnings}")


# --- tables -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Table:
  """A published-style table: ``values`` maps batch -> its runs' values in ``unit``."""
  path: str
  unit: str
  values: dict[int, list[float]]


def _table_error(path: str, message: str) -> ConfigError:
  return ConfigError(f"table {path}: {message}")


def read_table(path: str) -> Table:
  """Reads a CSV with a ``batch`` column and exactly one of ``steps``, ``examples``,
  ``epochs`` (other columns ignored; a repeated batch is several runs of that batch).

  Raises:
    ConfigError: naming the file, the column and what is valid, for a missing file, no
      ``batch`` column, none or several value columns, or a value that is not positive.
  """
  if not os.path.isfile(path):
    raise _table_error(path, "no such file; give a CSV with columns batch and one of "
                       + ", ".join(UNITS))
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    rows = [{k.strip(): v for k, v in r.items() if k} for r in reader]
  if "batch" not in columns:
    raise _table_error(path, f"no column 'batch' (columns: {', '.join(columns) or 'none'})")
  value_columns = [c for c in UNITS if c in columns]
  if len(value_columns) != 1:
    raise _table_error(path, f"needs exactly one of the columns {', '.join(UNITS)}; found "
                       f"{', '.join(value_columns) or 'none'}")
  unit = value_columns[0]
  values: dict[int, list[float]] = {}
  for line, row in enumerate(rows, start=2):
    batch = _positive(path, line, "batch", row.get("batch"))
    if batch != int(batch):
      raise _table_error(path, f"line {line}, column 'batch': {row['batch']!r} is not a "
                         "whole number; batches must be positive integers")
    values.setdefault(int(batch), []).append(_positive(path, line, unit, row.get(unit)))
  if not values:
    raise _table_error(path, "has no rows")
  return Table(path=path, unit=unit, values=dict(sorted(values.items())))


def _positive(path: str, line: int, column: str, raw: str | None) -> float:
  try:
    value = float(raw)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise _table_error(path, f"line {line}, column {column!r}: {raw!r} is not a positive "
                       "number; values must be positive numbers")
  return value


def fit_table(table: Table, **kwargs: Any) -> dict[str, Any]:
  """``fit_curve`` of a table, bootstrapped over its (batch, value) points."""
  kwargs.setdefault("bootstrap", "points")
  return {**fit_curve(table.values, table.unit, **kwargs), "source": table.path}
