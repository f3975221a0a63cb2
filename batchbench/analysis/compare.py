"""Did the candidate regress against the baseline? Matching and statistics; no JAX.

Two sides (a workdir, a JSONL file, or a baseline made from a history's last runs) are
matched by benchmark identity, the ``benchmark`` dict of their rows and points (workload,
batch, split, devices, measurement settings; not the code version, not the trial id).

* **Throughput and step time** are noisy: the test runs on the raw per-window figures
  (``window_samples_per_sec``; a window's step time is ``1000 x global_batch / rate``). A
  regression needs both a significant two-sided Mann-Whitney U (``p < alpha``) and a median
  change worse than the metric's threshold. When the window counts cannot reach ``alpha``
  at all (the smallest p-value a two-sided exact test can give for sizes n, m is
  ``2 / C(n + m, n)``, as asv checks), the verdict is ``insufficient samples``, never
  ``no change``.
* **Deterministic proxies** (XLA FLOPs per step, compiled peak bytes, steps to target at
  the same seed, the probe's largest batch) are compared exactly: any worse value is a
  regression.
* **Time to target over seeds**: the median over the seeds both sides ran, a missed target
  counting as infinitely slow. It is steps to target x the point's median step time, so
  a change beyond the threshold is a regression only if it is not step-time noise: the
  steps rose, or the point's step time regressed significantly.

Verdicts: ``regression``, ``improvement``, ``no change``, ``insufficient samples``,
``missing`` (one side lacks the figure). A point or trial on one side only is listed as
unmatched.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from batchbench.analysis.summaries import (
    MACHINE_FIELDS, SOFTWARE_FIELDS, environment, finite_or_none, point_label, probe_label,
    probe_summary, has_target, steps_or_inf, time_or_inf, trial_label)

Row = dict[str, Any]
DEFAULT_ALPHA = 0.01
DEFAULT_THRESHOLD = 0.05
NOISY_METRICS = ("samples_per_sec", "step_time_ms", "time_to_target_s")
REGRESSION, IMPROVEMENT, NO_CHANGE = "regression", "improvement", "no change"
INSUFFICIENT, MISSING = "insufficient samples", "missing"
VERDICTS = (REGRESSION, IMPROVEMENT, NO_CHANGE, INSUFFICIENT, MISSING)


@dataclasses.dataclass
class Side:
  """One side of a comparison: throughput points, trial rows and probe results."""

  source: str
  points: list[Row] = dataclasses.field(default_factory=list)
  trials: list[Row] = dataclasses.field(default_factory=list)
  probes: list[Row] = dataclasses.field(default_factory=list)
  runs: int = 1  # > 1: combined from this many runs of a history

  @property
  def empty(self) -> bool:
    return not (self.points or self.trials or self.probes)


@dataclasses.dataclass
class Finding:
  """One metric of one matched point, trial, seed group or probe."""

  kind: str  # point | trial | time_to_target | probe
  label: str
  metric: str
  baseline: float | None
  candidate: float | None
  verdict: str
  change: float | None = None  # candidate / baseline - 1
  p_value: float | None = None
  min_p_value: float | None = None
  n_baseline: int | None = None
  n_candidate: int | None = None
  note: str = ""

  def as_dict(self) -> Row:
    return dataclasses.asdict(self)


def key_of(benchmark: Any) -> str:
  """The matching key of a ``benchmark`` dict: its canonical JSON."""
  return json.dumps(benchmark, sort_keys=True, default=str)


def min_p_value(n: int, m: int) -> float:
  """The smallest two-sided p-value an exact Mann-Whitney U test can give for sizes n, m."""
  if n < 1 or m < 1:
    return 1.0
  return min(1.0, 2.0 / math.comb(n + m, n))


def windows_needed(alpha: float) -> int:
  """The fewest windows per side (equal sizes) with which ``p < alpha`` is reachable."""
  k = 1
  while min_p_value(k, k) >= alpha:
    k += 1
  return k


def mann_whitney_p(baseline: Sequence[float], candidate: Sequence[float]) -> float:
  """Two-sided Mann-Whitney U p-value (scipy: exact for small samples without ties)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if len(set(baseline) | set(candidate)) == 1:  # all equal: no evidence either way
    return 1.0
  return float(stats.mannwhitneyu(candidate, baseline, alternative="two-sided").pvalue)


def _direction(change: float, threshold: float, higher_is_better: bool) -> str | None:
  """``worse``/``better`` when ``change`` is beyond ``threshold`` that way, else None."""
  signed = change if higher_is_better else -change
  if signed < -threshold:
    return "worse"
  if signed > threshold:
    return "better"
  return None


def compare_samples(baseline: Sequence[float], candidate: Sequence[float], *, alpha: float,
                    threshold: float, higher_is_better: bool,
                    baseline_center: float | None = None) -> dict[str, Any]:
  """The verdict on two samples of a noisy metric.

  Args:
    baseline, candidate: raw figures (one per timing window).
    alpha: significance level of the two-sided Mann-Whitney U test.
    threshold: the smallest relative change of the medians that counts.
    higher_is_better: direction of the metric.
    baseline_center: the baseline's median when it is not the sample's own (a baseline
      combined from several runs uses the median of their medians).

  Returns:
    ``verdict``, ``change``, ``p_value``, ``min_p_value``, ``baseline``, ``candidate``
    (the medians), ``n_baseline``, ``n_candidate``, ``note``.
  """
  n, m = len(baseline), len(candidate)
  out = {"n_baseline": n, "n_candidate": m, "p_value": None, "change": None,
         "min_p_value": min_p_value(n, m), "baseline": None, "candidate": None, "note": ""}
  if not n or not m:
    return {**out, "verdict": MISSING, "note": "no windows on the "
            + ("baseline" if not n else "candidate") + " side"}
  b = statistics.median(baseline) if baseline_center is None else baseline_center
  c = statistics.median(candidate)
  out.update(baseline=b, candidate=c, change=c / b - 1 if b else None)
  if out["min_p_value"] >= alpha:
    need = windows_needed(alpha)
    return {**out, "verdict": INSUFFICIENT,
            "note": f"{n} vs {m} windows: the smallest reachable p-value is "
                    f"{out['min_p_value']:.3g} >= alpha {alpha:g}; need {need}+ each"}
  p = mann_whitney_p(baseline, candidate)
  out["p_value"] = p
  way = _direction(out["change"], threshold, higher_is_better) if out["change"] is not None \
      else None
  if p < alpha and way == "worse":
    return {**out, "verdict": REGRESSION}
  if p < alpha and way == "better":
    return {**out, "verdict": IMPROVEMENT}
  note = ("significant, within the threshold" if p < alpha else
          "beyond the threshold, not significant" if way else "")
  return {**out, "verdict": NO_CHANGE, "note": note}


def compare_exact(baseline: float | None, candidate: float | None, *,
                  higher_is_better: bool = False) -> dict[str, Any]:
  """The verdict on a deterministic figure: any worse value is a regression.

  ``inf`` stands for a missed target; None for a figure a side does not have.
  """
  if baseline is None or candidate is None:
    return {"verdict": MISSING, "change": None,
            "note": f"no value on the {'baseline' if baseline is None else 'candidate'} side"}
  change = None
  if math.isfinite(baseline) and math.isfinite(candidate) and baseline:
    change = candidate / baseline - 1
  if candidate == baseline:
    return {"verdict": NO_CHANGE, "change": change, "note": ""}
  worse = candidate < baseline if higher_is_better else candidate > baseline
  return {"verdict": REGRESSION if worse else IMPROVEMENT, "change": change, "note": ""}


# -- the comparison ----------------------------------------------------------------------

def _figure(row: Row, metric: str) -> float | None:
  """A point's FLOPs or compiled peak bytes (a full row keeps the peak under ``memory``)."""
  if metric == "peak_bytes" and "peak_bytes" not in row:
    return (row.get("memory") or {}).get("peak_bytes")
  return row.get(metric)


def _by_key(rows: Iterable[Row]) -> dict[str, Row]:
  """Rows by benchmark key (the last row of a key wins: the latest measurement)."""
  return {key_of(r.get("benchmark")): r for r in rows}


def _disambiguate(labels: dict[str, str]) -> dict[str, str]:
  """Adds a short key digest to labels that two different keys share."""
  import hashlib  # pylint: disable=g-import-not-at-top

  counts = collections.Counter(labels.values())
  return {k: v if counts[v] == 1 else f"{v} #{hashlib.sha256(k.encode()).hexdigest()[:6]}"
          for k, v in labels.items()}


class _Comparison:
  """Builds the findings of one baseline/candidate pair."""

  def __init__(self, baseline: Side, candidate: Side, alpha: float,
               thresholds: dict[str, float]):
    self.base, self.cand = baseline, candidate
    self.alpha, self.thresholds = alpha, thresholds
    self.findings: list[Finding] = []
    self.unmatched: dict[str, list[str]] = {"baseline_only": [], "candidate_only": []}
    self.matched = 0
    self.step_time_verdict: dict[str, str] = {}  # candidate point_id -> verdict

  def _match(self, base_rows: list[Row], cand_rows: list[Row], label) -> list[tuple]:
    base, cand = _by_key(base_rows), _by_key(cand_rows)
    labels = _disambiguate({k: label(r) for k, r in {**base, **cand}.items()})
    for k in base:
      if k not in cand:
        self.unmatched["baseline_only"].append(labels[k])
    for k in cand:
      if k not in base:
        self.unmatched["candidate_only"].append(labels[k])
    pairs = [(labels[k], base[k], cand[k]) for k in cand if k in base]
    self.matched += len(pairs)
    return pairs

  def _add(self, kind: str, label: str, metric: str, result: dict[str, Any],
           baseline: float | None = None, candidate: float | None = None) -> Finding:
    fields = {"baseline": baseline, "candidate": candidate, **result}
    finding = Finding(kind=kind, label=label, metric=metric, **{
        k: v for k, v in fields.items() if k in Finding.__dataclass_fields__})
    self.findings.append(finding)
    return finding

  def points(self) -> None:
    for label, b, c in self._match(self.base.points, self.cand.points, point_label):
      bw = [float(x) for x in b.get("window_samples_per_sec") or []]
      cw = [float(x) for x in c.get("window_samples_per_sec") or []]
      center = b.get("baseline_center")
      self._add("point", label, "samples_per_sec", compare_samples(
          bw, cw, alpha=self.alpha, threshold=self.thresholds["samples_per_sec"],
          higher_is_better=True, baseline_center=center))
      batch = c.get("global_batch") or 1
      step_ms = lambda rates: [1e3 * batch / r for r in rates if r > 0]
      found = self._add("point", label, "step_time_ms", compare_samples(
          step_ms(bw), step_ms(cw), alpha=self.alpha,
          threshold=self.thresholds["step_time_ms"], higher_is_better=False,
          baseline_center=1e3 * batch / center if center else None))
      self.step_time_verdict[c.get("point_id")] = found.verdict
      for metric in ("flops_per_step", "peak_bytes"):
        bv, cv = _figure(b, metric), _figure(c, metric)
        self._add("point", label, metric, compare_exact(bv, cv), bv, cv)

  def trials(self) -> None:
    for label, b, c in self._match(self.base.trials, self.cand.trials, trial_label):
      if not (has_target(b) or has_target(c)):
        continue  # a throughput-only trial: its speed is its point's
      bs, cs = steps_or_inf(b), steps_or_inf(c)
      result = compare_exact(bs, cs)
      if b.get("status") != c.get("status"):
        result["note"] = f"status {b.get('status')} -> {c.get('status')}"
      self._add("trial", label, "steps_to_target", result, bs, cs)

  def seed_groups(self) -> None:
    """Time to target: the median over the seeds both sides ran (a miss is inf)."""
    def groups(rows):
      out = collections.defaultdict(dict)
      for r in rows:
        bench = {k: v for k, v in (r.get("benchmark") or {}).items() if k != "seed"}
        out[key_of(bench)][r.get("seed")] = r
      return out

    base, cand = groups(self.base.trials), groups(self.cand.trials)
    for k in cand:
      if k not in base:
        continue
      seeds = sorted(set(base[k]) & set(cand[k]), key=str)
      if not seeds or not any(has_target(side[k][s]) for side in (base, cand) for s in seeds):
        continue
      first = cand[k][seeds[0]]
      label = f"{trial_label(first, seed=False)} ({len(seeds)} seed(s))"
      bt = [time_or_inf(base[k][s]) for s in seeds]
      ct = [time_or_inf(cand[k][s]) for s in seeds]
      if None in bt or None in ct:
        self._add("time_to_target", label, "time_to_target_s", {
            "verdict": MISSING, "note": "no step time (no throughput point) on a side"})
        continue
      b, c = statistics.median(bt), statistics.median(ct)
      steps_b = statistics.median(steps_or_inf(base[k][s]) for s in seeds)
      steps_c = statistics.median(steps_or_inf(cand[k][s]) for s in seeds)
      step_time = self.step_time_verdict.get(first.get("point_id"))
      self._add("time_to_target", label, "time_to_target_s",
                self._time_verdict(b, c, steps_b, steps_c, step_time),
                finite_or_none(b), finite_or_none(c))

  def _time_verdict(self, b: float, c: float, steps_b: float, steps_c: float,
                    step_time: str | None) -> dict[str, Any]:
    if math.isinf(b) or math.isinf(c):
      if math.isinf(b) and math.isinf(c):
        return {"verdict": NO_CHANGE, "note": "the median seed missed the target on both sides"}
      return {"verdict": REGRESSION if math.isinf(c) else IMPROVEMENT,
              "note": "the median seed " + ("missed" if math.isinf(c) else "now reaches")
                      + " the target"}
    change = c / b - 1 if b else None
    way = _direction(change, self.thresholds["time_to_target_s"], False) \
        if change is not None else None
    if way is None:
      return {"verdict": NO_CHANGE, "change": change}
    # Steps are exact; the step time is a median of noisy windows: only a real part counts.
    if way == "worse" and (steps_c > steps_b or step_time == REGRESSION):
      return {"verdict": REGRESSION, "change": change}
    if way == "better" and (steps_c < steps_b or step_time == IMPROVEMENT):
      return {"verdict": IMPROVEMENT, "change": change}
    return {"verdict": NO_CHANGE, "change": change,
            "note": f"beyond the threshold, but steps are unchanged and the step time's "
                    f"change is {step_time or 'untested'}"}

  def probes(self) -> None:
    base = [probe_summary(p) for p in self.base.probes]
    cand = [probe_summary(p) for p in self.cand.probes]
    for label, b, c in self._match(base, cand, probe_label):
      self._add("probe", label, "largest_batch", compare_exact(
          b.get("largest_batch"), c.get("largest_batch"), higher_is_better=True),
          b.get("largest_batch"), c.get("largest_batch"))
      # Only batches both searches compiled: which ones a search visits depends on peaks.
      for batch, cv in sorted((c.get("peaks") or {}).items(), key=lambda kv: int(kv[0])):
        bv = (b.get("peaks") or {}).get(batch)
        if bv is not None and cv is not None and bv != cv:
          self._add("probe", f"{label} B={batch}", "peak_bytes", compare_exact(bv, cv), bv, cv)


def compare(baseline: Side, candidate: Side, *, alpha: float = DEFAULT_ALPHA,
            thresholds: dict[str, float] | None = None) -> dict[str, Any]:
  """Compares ``candidate`` with ``baseline``.

  Args:
    baseline, candidate: the two sides.
    alpha: significance level of the Mann-Whitney U tests.
    thresholds: the smallest relative change that counts, per noisy metric
      (``NOISY_METRICS``; default 5% each).

  Returns:
    A JSON-able report: ``verdict`` (``regression`` or ``no regression``), ``counts`` per
    verdict, ``findings`` (one per metric of each matched item), ``unmatched``
    (``baseline_only``, ``candidate_only`` labels), ``matched`` (items matched),
    ``alpha``, ``thresholds``, and each side's ``source`` and sizes.
  """
  thresholds = {**dict.fromkeys(NOISY_METRICS, DEFAULT_THRESHOLD), **(thresholds or {})}
  run = _Comparison(baseline, candidate, alpha, thresholds)
  run.points()
  run.trials()
  run.seed_groups()
  run.probes()
  counts = collections.Counter(f.verdict for f in run.findings)
  return {
      "notes": environment_notes(baseline, candidate),
      "verdict": REGRESSION if counts[REGRESSION] else "no regression",
      "counts": {v: counts[v] for v in VERDICTS},
      "alpha": alpha, "thresholds": thresholds, "matched": run.matched,
      "baseline": _side_info(baseline), "candidate": _side_info(candidate),
      "findings": [f.as_dict() for f in run.findings], "unmatched": run.unmatched,
  }


def environment_notes(baseline: Side, candidate: Side) -> list[str]:
  """What differs between the machines and software of the two sides (not the code)."""
  def seen(side: Side) -> dict[str, set]:
    out = collections.defaultdict(set)
    for row in (*side.points, *side.trials):
      for k, v in environment(row).items():
        if v is not None and k != "git_commit":
          out[k].add(str(v))
    return out

  b, c = seen(baseline), seen(candidate)
  return [f"{k} differs: baseline {', '.join(sorted(b[k]))}, candidate "
          f"{', '.join(sorted(c[k]))}" for k in (*MACHINE_FIELDS, *SOFTWARE_FIELDS)
          if b.get(k) and c.get(k) and b[k] != c[k]]


def _side_info(side: Side) -> dict[str, Any]:
  return {"source": side.source, "points": len(side.points), "trials": len(side.trials),
          "probes": len(side.probes), "runs": side.runs}
