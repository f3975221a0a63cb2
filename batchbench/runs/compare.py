"""The ``compare`` command: did the candidate regress against the baseline?

Each side is a workdir (its ``throughput.jsonl``, ``results.jsonl`` and probe results) or
one JSONL file of points or trial rows. The baseline can instead come from a history
store: the median of each benchmark's last ``baseline_runs`` runs there. With a history,
the candidate is appended to it after the comparison. The statistics are
``analysis.compare``'s; this module reads the inputs, writes Markdown and JSON and turns
the verdict into an exit status: 1 on any regression, else 0 (bad input raises
``ConfigError``, which the command line turns into 2).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable
from typing import Any

from batchbench import fmt
from batchbench.analysis import compare as stats
from batchbench.analysis import summaries
from batchbench.config import ConfigError
from batchbench.store import results
from batchbench.store.history import History, run_id_of
from batchbench.store.meta import META_FILE

Log = Callable[[str], None]
PROBE_FILES = ("probe/probe.json", "probes/*/probe/probe.json")


def _read_probes(workdir: str, env: dict[str, Any]) -> list[dict[str, Any]]:
  out = []
  for pattern in PROBE_FILES:
    for path in sorted(glob.glob(os.path.join(workdir, pattern))):
      try:
        with open(path, encoding="utf-8") as f:
          probe = summaries.probe_summary(json.load(f))
      except (OSError, ValueError):
        continue
      out.append({**probe, "provenance": env})
  return out


def _workdir_env(workdir: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The machine and software of a workdir: from its rows, else its run_meta.json."""
  if rows:
    return summaries.environment(rows[0])
  try:
    with open(os.path.join(workdir, META_FILE), encoding="utf-8") as f:
      return summaries.environment({"provenance": json.load(f)})
  except (OSError, ValueError):
    return summaries.environment({})


def load_side(path: str | None, flag: str) -> stats.Side:
  """Reads a workdir or a JSONL file of points / trial rows.

  Raises:
    ConfigError: naming ``flag``: no path, a path that is neither, or nothing in it.
  """
  valid = "give a workdir, or its throughput.jsonl or results.jsonl"
  if not path:
    raise ConfigError(flag, path, valid)
  side = stats.Side(source=os.path.abspath(path))
  try:
    if os.path.isdir(path):
      side.points = results.read_points(path)
      side.trials = results.read_results(path)
      side.probes = _read_probes(path, _workdir_env(path, side.points + side.trials))
    elif os.path.isfile(path):
      for row in results.read_jsonl(path):
        if "trial_id" in row:
          side.trials.append(row)
        elif "point_id" in row:
          side.points.append(row)
    else:
      raise ConfigError(flag, path, f"no such file or directory; {valid}")
  except OSError as e:
    raise ConfigError(flag, path, f"cannot be read ({e}); {valid}") from e
  if side.empty:
    raise ConfigError(flag, path, "has no throughput points, trial rows or probe results "
                      f"(empty, or not batchbench output); {valid}")
  return side


def parse_thresholds(value: Any) -> dict[str, float]:
  """``0.05`` (every noisy metric) or ``"samples_per_sec=0.03,time_to_target_s=0.1"``.

  Raises:
    ConfigError: naming ``threshold``, for anything else.
  """
  valid = (f"a fraction in (0, 1), e.g. 0.05, or METRIC=FRACTION pairs separated by commas "
           f"with METRIC in {', '.join(stats.NOISY_METRICS)}")
  out = dict.fromkeys(stats.NOISY_METRICS, stats.DEFAULT_THRESHOLD)
  if value is None:
    return out
  items = [("", value)] if isinstance(value, (int, float)) else [
      item.partition("=")[::2] if "=" in item else ("", item)
      for item in str(value).split(",") if item.strip()]
  if not items:
    raise ConfigError("threshold", value, valid)
  for metric, text in items:
    metric = metric.strip()
    try:
      fraction = float(text)
    except ValueError:
      fraction = math.nan
    if not 0 < fraction < 1 or (metric and metric not in stats.NOISY_METRICS):
      raise ConfigError("threshold", value, valid)
    out.update({metric: fraction} if metric else dict.fromkeys(stats.NOISY_METRICS, fraction))
  return out


def check_settings(alpha: float, baseline_runs: int, baseline: str | None,
                   history: str | None, *, require_baseline: bool = True) -> None:
  """Raises ``ConfigError`` for bad comparison settings (before anything is read)."""
  if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
    raise ConfigError("alpha", alpha, "must be a significance level in (0, 1), e.g. 0.01")
  if not (isinstance(baseline_runs, int) and baseline_runs >= 1):
    raise ConfigError("baseline_runs", baseline_runs, "must be a positive integer")
  if require_baseline and baseline is None and history is None:
    raise ConfigError("baseline", baseline, "give --baseline=WORKDIR (or a JSONL), or "
                      "--history=DIR to compare with the last --baseline_runs runs there")
  if baseline is not None and baseline_runs > 1:
    raise ConfigError("baseline_runs", baseline_runs, "applies to a baseline from --history; "
                      "drop --baseline, or --baseline_runs")


def compare_report(baseline: str | None, candidate: str, *,
                   alpha: float = stats.DEFAULT_ALPHA, threshold: Any = stats.DEFAULT_THRESHOLD,
                   history: str | None = None, baseline_runs: int = 1,
                   log: Log | None = print) -> dict[str, Any] | None:
  """The comparison report (``analysis.compare.compare``) of ``run_compare``'s inputs.

  Returns:
    The report; None when the baseline comes from a history with no earlier run of any
    of the candidate's benchmarks (the candidate is then recorded as the first run).

  Raises:
    ConfigError: bad input (unreadable or empty, bad settings, nothing matched).
  """
  log = log or (lambda _: None)
  check_settings(alpha, baseline_runs, baseline, history)
  thresholds = parse_thresholds(threshold)
  cand = load_side(candidate, "candidate")
  base = load_side(baseline, "baseline") if baseline is not None else None
  if history is None:
    report = stats.compare(base, cand, alpha=alpha, thresholds=thresholds)
    _require_match(report, candidate, base)
    return report
  with History(history, create=True) as store:
    if base is None:
      base = store.baseline(cand, baseline_runs, exclude=run_id_of(cand))
      if base.empty:
        run_id, _ = store.record(cand)
        log(f"compare: the history {history} has no earlier run of these benchmarks on this "
            f"machine and software: recorded this one ({run_id}) as the first; nothing to "
            "compare")
        return None
    report = stats.compare(base, cand, alpha=alpha, thresholds=thresholds)
    _require_match(report, candidate, base)
    report["history"] = {"dir": history, "run_id": store.record(cand)[0]}
  return report


def _require_match(report: dict[str, Any], candidate: str, base: stats.Side) -> None:
  if not report["matched"]:
    raise ConfigError("candidate", candidate, f"matches no point, trial or probe of the "
                      f"baseline {base.source} by benchmark identity (workload, batch, split, "
                      "devices, measurement settings); compare runs of the same config")


def write_report(report: dict[str, Any], path: str) -> None:
  """Writes the report to ``path``: JSON for ``.json``, else Markdown."""
  results.atomic_write_text(path, json.dumps(
      fmt.to_jsonable(report), indent=2, sort_keys=True, allow_nan=False)
      if path.endswith(".json") else to_markdown(report))


def exit_status(report: dict[str, Any] | None) -> int:
  """1 if the report has a regression, else 0."""
  return 1 if report is not None and report["verdict"] == stats.REGRESSION else 0


def run_compare(baseline: str | None, candidate: str, *, alpha: float = stats.DEFAULT_ALPHA,
                threshold: Any = stats.DEFAULT_THRESHOLD, output: str | None = None,
                history: str | None = None, baseline_runs: int = 1,
                log: Log | None = print) -> int:
  """The ``compare`` command: compares, prints Markdown, writes ``output``.

  Args:
    baseline: a workdir or JSONL; None to take the baseline from ``history``.
    candidate: a workdir or JSONL.
    alpha: significance level of the Mann-Whitney U tests.
    threshold: the smallest relative change that counts (``parse_thresholds``).
    output: also write the report there: ``.json`` or ``.md``.
    history: a history directory: the baseline when ``baseline`` is None; the candidate
      is appended to it after the comparison.
    baseline_runs: with a history baseline, the median of this many last runs.
    log: where the Markdown report and notes go; None for silence.

  Returns:
    1 if anything regressed, else 0. With a history baseline and no earlier run of any
    of the candidate's benchmarks (the first night, or a new machine or software), the
    candidate is recorded and 0 returned, saying so.

  Raises:
    ConfigError: bad input (unreadable or empty, bad settings, nothing matched).
  """
  log = log or (lambda _: None)
  if output is not None and not output.endswith((".json", ".md")):
    raise ConfigError("output", output, "must end in .json or .md")
  report = compare_report(baseline, candidate, alpha=alpha, threshold=threshold,
                          history=history, baseline_runs=baseline_runs, log=log)
  if report is None:
    return 0
  log(to_markdown(report))
  if output is not None:
    write_report(report, output)
  return exit_status(report)


# -- Markdown ----------------------------------------------------------------------------

COLUMNS = ("item", "metric", "baseline", "candidate", "change", "p", "n", "verdict", "note")


def _value(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and math.isinf(value):
    return "missed"
  return fmt.number(value)


def _cells(f: dict[str, Any]) -> list[str]:
  change = f"{f['change']:+.1%}" if f.get("change") is not None else "-"
  p = f"{f['p_value']:.2g}" if f.get("p_value") is not None else "-"
  n = f"{f['n_baseline']}/{f['n_candidate']}" if f.get("n_baseline") is not None else "-"
  verdict = f"**{f['verdict']}**" if f["verdict"] == stats.REGRESSION else f["verdict"]
  return [f["label"], f["metric"], _value(f["baseline"]), _value(f["candidate"]), change, p,
          n, verdict, f.get("note") or ""]


def _table(findings: list[dict[str, Any]]) -> list[str]:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(f)) + " |"
            for f in findings]
  return lines


def to_markdown(report: dict[str, Any]) -> str:
  """The report as Markdown: verdict, regressions first, every finding, unmatched items."""
  counts = ", ".join(f"{n} {v}" for v, n in report["counts"].items() if n)
  b, c = report["baseline"], report["candidate"]
  th = report["thresholds"]
  lines = [
      "# batchbench compare", "",
      f"**Verdict: {report['verdict'].upper()}** ({counts or 'nothing compared'}; "
      f"{report['matched']} matched)", "",
      f"- baseline: `{b['source']}` ({b['points']} points, {b['trials']} trials, "
      f"{b['probes']} probes" + (f", median of {b['runs']} runs" if b["runs"] > 1 else "")
      + ")",
      f"- candidate: `{c['source']}` ({c['points']} points, {c['trials']} trials, "
      f"{c['probes']} probes)",
      f"- test: two-sided Mann-Whitney U on per-window figures, alpha {report['alpha']:g}; "
      "thresholds " + ", ".join(f"{k} {v:.0%}" for k, v in th.items())
      + "; FLOPs, compiled peak bytes, steps to target and the probe's answer compared "
      "exactly; a missed target counts as infinitely slow",
  ]
  lines += [f"- note: {n}" for n in report.get("notes", [])]
  if report.get("history"):
    lines.append(f"- recorded in the history `{report['history']['dir']}` as run "
                 f"{report['history']['run_id']}")
  findings = report["findings"]
  flagged = [f for f in findings if f["verdict"] in (stats.REGRESSION, stats.INSUFFICIENT)]
  if flagged:
    lines += ["", "## Regressions and insufficient samples", "", *_table(flagged)]
  lines += ["", "## All comparisons", "", *_table(findings)]
  unmatched = report["unmatched"]
  if unmatched["baseline_only"] or unmatched["candidate_only"]:
    lines += ["", "## Unmatched (on one side only)", ""]
    lines += [f"- baseline only: {x}" for x in unmatched["baseline_only"]]
    lines += [f"- candidate only: {x}" for x in unmatched["candidate_only"]]
  return "\n".join(lines) + "\n"
