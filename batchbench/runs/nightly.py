"""The nightly job: run a fixed suite, compare it with a baseline, say whether it regressed.

A suite config (``configs/nightly.py``) has ``get_config(arg)`` returning a ConfigDict
whose ``suite`` is a list of entries, each a dict with a ``name``, a ``kind`` and a
``config`` (fields over ``default_config()``, dotted names for nested ones):

* ``throughput``: one throughput point per global batch of ``batches``
  (``runs.throughput.ensure_point``), appended to ``<workdir>/throughput.jsonl``;
* ``sweep``: a sweep of the config's ``sweep`` section (``runs.sweep.plan`` and
  ``run_sweep``): trials in ``results.jsonl``, their batches' points beside the others;
* ``probe``: ``runs.probe.run_probe`` with ``memory_budget``, ``min_batch`` and
  ``max_batch``, written to ``<workdir>/probes/<name>/probe/``.

Every entry is validated before anything runs. A finished entry is recorded in
``<workdir>/suite.jsonl`` and skipped when the job is run again on the same workdir (points
and trials are skipped by their own ids too). An entry that fails is recorded with its
error and the suite goes on; the job then exits 1 even without a regression.

``run_nightly`` runs the suite, compares the workdir with the baseline (a previous
workdir, or the last runs of a history store) and writes ``<workdir>/nightly/compare.md``
and ``compare.json``; with a history it records the run there and renders its trends to
``<workdir>/nightly/history/``. Its exit status: 1 on a regression (or a failed entry),
else 0.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections

from batchbench import fmt
from batchbench.config import ConfigError, default_config, digest, open_workdir, resolve
from batchbench.store import results

Log = Callable[[str], None]
KINDS = ("throughput", "sweep", "probe")
SUITE_FILE = "suite.jsonl"
NIGHTLY_DIR = "nightly"
PROBES_DIR = "probes"


def load_suite(path_arg: str) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a suite file given as ``PATH[:ARG]``.

  Raises:
    ConfigError: naming ``suite``: no such file, or no ``suite`` list in its config.
  """
  path, _, arg = path_arg.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("suite", path_arg, "no such file; give a suite config, e.g. "
                      "configs/nightly.py or configs/nightly.py:tiny=True")
  spec = importlib.util.spec_from_file_location("batchbench_suite", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if "suite" not in config or not config.suite:
    raise ConfigError("suite", path_arg, "its get_config() must return a config with a "
                      "non-empty `suite` list")
  return config


def entry_config(entry: dict[str, Any]) -> ml_collections.ConfigDict:
  """``default_config()`` with an entry's ``config`` fields set (dotted names nest)."""
  c = default_config()
  for name, value in (entry.get("config") or {}).items():
    *parents, leaf = name.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ConfigError(f"suite entry {entry.get('name')!r}: config field", name,
                        "not a config field (see batchbench.config.default_config)")
    node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


def _plan(entry: dict[str, Any], num_devices: int) -> Any:
  """What an entry runs, validated: specs (throughput), (specs, search) (sweep), config."""
  from batchbench.runs import sweep  # pylint: disable=g-import-not-at-top

  config = entry_config(entry)
  if entry["kind"] == "throughput":
    batches = entry.get("batches") or ()
    if not batches:
      raise ConfigError(f"suite entry {entry['name']!r}: batches", batches,
                        "list at least one global batch")
    specs = []
    for batch in batches:
      c = ml_collections.ConfigDict(config.to_dict())
      c.global_batch = batch
      specs.append(resolve(c, num_devices))
    return specs
  if entry["kind"] == "sweep":
    return sweep.plan(config, num_devices)
  fmt.parse_bytes(entry.get("memory_budget", ""), f"suite entry {entry['name']!r}: "
                  "memory_budget")
  return config


def validate(suite: Any, num_devices: int) -> list[tuple[dict[str, Any], Any]]:
  """Every entry with its plan, validated before anything runs.

  Raises:
    ConfigError: naming the entry and the field.
  """
  entries, names = [], set()
  for i, entry in enumerate(suite):
    entry = dict(entry)
    name = entry.get("name") or f"#{i}"
    entry["name"] = name
    if entry.get("kind") not in KINDS:
      raise ConfigError(f"suite entry {name!r}: kind", entry.get("kind"),
                        f"must be one of {', '.join(KINDS)}")
    if name in names:
      raise ConfigError("suite entry name", name, "must be unique in the suite")
    names.add(name)
    entries.append((entry, _plan(entry, num_devices)))
  return entries


def _run_entry(entry: dict[str, Any], plan: Any, workdir: str, num_devices: int,
               cache: Any, log: Log) -> None:
  from batchbench.runs import probe, sweep, throughput  # pylint: disable=g-import-not-at-top

  if entry["kind"] == "throughput":
    for spec in plan:
      throughput.ensure_point(spec, workdir, cache=cache, log=log)
  elif entry["kind"] == "sweep":
    specs, search = plan
    sweep.run_sweep(specs, workdir, log=log, search=search)
  else:
    probe.run_probe(plan, os.path.join(workdir, PROBES_DIR, entry["name"].replace("/", "_")),
                    memory_budget_bytes=fmt.parse_bytes(entry["memory_budget"]),
                    min_batch=entry.get("min_batch"),
                    max_batch=entry.get("max_batch", probe.DEFAULT_MAX_BATCH),
                    num_available_devices=num_devices, measure=False, log=log)


def run_suite(suite: Any, workdir: str, *, num_devices: int | None = None,
              log: Log | None = print) -> dict[str, Any]:
  """Runs every entry of ``suite`` not yet done in ``workdir``.

  Args:
    suite: the suite config's ``suite`` list.
    workdir: where results go (created).
    num_devices: local devices available (default: all).
    log: progress sink; None for silence.

  Returns:
    ``{"entries": [{"name", "kind", "status", "seconds", "error"}], "failed": [names]}``.

  Raises:
    ConfigError: an invalid entry, before anything runs.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.core.program import ProgramCache  # pylint: disable=g-import-not-at-top
  from batchbench.store import meta  # pylint: disable=g-import-not-at-top

  log = log or (lambda _: None)
  num_devices = num_devices or jax.local_device_count()
  entries = validate(suite, num_devices)
  workdir = open_workdir(workdir)
  meta.write_run_meta(workdir, meta.run_metadata({"suite": list(suite)}))
  done = {(r["name"], r["digest"]) for r in results.read_jsonl(
      os.path.join(workdir, SUITE_FILE)) if r.get("status") == "ok"}
  cache = ProgramCache()
  out = []
  for entry, plan in entries:
    key = digest(entry)
    if (entry["name"], key) in done:
      log(f"[suite] {entry['name']}: done earlier in this workdir; skipped")
      out.append({"name": entry["name"], "kind": entry["kind"], "status": "skipped"})
      continue
    log(f"[suite] {entry['name']} ({entry['kind']})")
    start, error = time.perf_counter(), None
    try:
      _run_entry(entry, plan, workdir, num_devices, cache, log)
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # pylint: disable=broad-except  (the suite goes on)
      error = "".join(traceback.format_exception_only(type(e), e)).strip()
      log(f"  !! {entry['name']} failed: {fmt.first_line(error, 200)}")
    row = {"name": entry["name"], "kind": entry["kind"], "digest": key,
           "status": "error" if error else "ok", "error": error,
           "seconds": time.perf_counter() - start}
    results.append_jsonl(os.path.join(workdir, SUITE_FILE), row)
    out.append(row)
  return {"entries": out, "failed": [r["name"] for r in out if r["status"] == "error"]}


def run_nightly(suite: Any, workdir: str, *, baseline: str | None = None,
                history: str | None = None, baseline_runs: int = 1,
                alpha: float | None = None, threshold: Any = None,
                num_devices: int | None = None, log: Log | None = print) -> int:
  """Runs the suite, compares it with the baseline, writes the report.

  Args:
    suite: the suite config's ``suite`` list.
    workdir: tonight's workdir.
    baseline: a previous workdir (or JSONL) to compare with; None: the history's.
    history: a history directory: the baseline when ``baseline`` is None, and where
      tonight's run is recorded; its trend plots go to ``<workdir>/nightly/history``.
    baseline_runs: with a history baseline, the median of this many last runs.
    alpha, threshold: the comparison's settings (``runs.compare``); None for defaults.
    num_devices: local devices available (default: all).
    log: progress sink; None for silence.

  Returns:
    1 if the comparison found a regression or a suite entry failed, else 0.
  """
  from batchbench.analysis import compare as stats  # pylint: disable=g-import-not-at-top
  from batchbench.runs import compare  # pylint: disable=g-import-not-at-top
  from batchbench.runs.history import run_history  # pylint: disable=g-import-not-at-top

  log = log or (lambda _: None)
  alpha = stats.DEFAULT_ALPHA if alpha is None else alpha
  threshold = stats.DEFAULT_THRESHOLD if threshold is None else threshold
  # Bad settings fail before the suite runs.
  compare.check_settings(alpha, baseline_runs, baseline, history, require_baseline=False)
  compare.parse_thresholds(threshold)
  if baseline is not None:
    compare.load_side(baseline, "baseline")
  ran = run_suite(suite, workdir, num_devices=num_devices, log=log)
  out_dir = os.path.join(workdir, NIGHTLY_DIR)
  os.makedirs(out_dir, exist_ok=True)
  status = 0
  if baseline is None and history is None:
    log("nightly: no baseline or history given: nothing compared")
  else:
    report = compare.compare_report(baseline, workdir, alpha=alpha, threshold=threshold,
                                    history=history, baseline_runs=baseline_runs, log=log)
    if report is not None:
      for name in ("compare.md", "compare.json"):
        compare.write_report(report, os.path.join(out_dir, name))
      log(compare.to_markdown(report))
      status = compare.exit_status(report)
  if history is not None:
    run_history(history, os.path.join(out_dir, "history"), log=log)
  if ran["failed"]:
    log(f"nightly: suite entries failed: {', '.join(ran['failed'])} (see "
        f"{os.path.join(workdir, SUITE_FILE)})")
    status = 1
  log(f"nightly: {'REGRESSION' if status else 'ok'}; report in {out_dir}")
  return status


def job(args: list[str]) -> int:
  """``scripts/nightly.sh``'s entry: positional strings, empty for "not given".

  Args:
    args: ``WORKDIR BASELINE HISTORY BASELINE_RUNS SUITE ALPHA THRESHOLD``.

  Returns:
    The exit status: ``run_nightly``'s, or 2 for bad input (the message on stderr).
  """
  args = list(args) + [""] * (7 - len(args))
  workdir, baseline, history, runs, suite, alpha, threshold = args[:7]
  try:
    if not workdir:
      raise ConfigError("WORKDIR", workdir, "give the directory for tonight's results")
    try:
      baseline_runs = int(runs or 1)
      alpha_value = float(alpha) if alpha else None
    except ValueError as e:
      raise ConfigError("BASELINE_RUNS / ALPHA", f"{runs} / {alpha}",
                        "BASELINE_RUNS is a positive integer, ALPHA a number in (0, 1)") from e
    config = load_suite(suite or "configs/nightly.py")
    return run_nightly(config.suite, workdir, baseline=baseline or None,
                       history=history or None, baseline_runs=baseline_runs,
                       alpha=alpha_value, threshold=threshold or None)
  except ConfigError as e:
    print(f"batchbench: error: {e}", file=sys.stderr)
    return 2
