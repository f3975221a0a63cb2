"""The sweep: a throughput point and one compiled program per batch, rows per trial,
failure isolation, skip-finished, re-measuring after a version bump, process isolation
with the persistent compilation cache, and the CLI."""

import json
import math
import os
import re
import runpy
import subprocess
import sys
import textwrap

import jax
import jaxlib
import pytest
from conftest import REPO

import batchbench
from batchbench import config as config_lib
from batchbench import version
from batchbench.config import ConfigError
from batchbench.report import render
from batchbench.runs import sweep
from batchbench.runs.trial import run_trial
from batchbench.store import meta, results



def QUIET(_):  # noqa: N802  (a log sink, used like a constant)
  pass


def small_config(batches=(32, 64), multipliers=(1.0,), seeds=(0,), **fields):
  c = config_lib.default_config()
  c.workload = "digits_mlp"
  c.workload_options.hidden = (32,)
  c.base_lr = 0.1
  c.reference_batch = 32
  c.lr_rule = "sqrt"
  c.max_examples = 4096
  c.eval_every_examples = 512
  c.target_metric = "accuracy"
  c.target_value = 0.5
  c.num_devices = 1
  c.steps_per_call = 4  # divides every eval interval here: one program per batch
  c.throughput.min_seconds = 0.05
  c.sweep.global_batches = tuple(batches)
  c.sweep.lr_multipliers = tuple(multipliers)
  c.sweep.seeds = tuple(seeds)
  c.update_from_flattened_dict(fields)
  return c


def run(config, workdir, **kwargs):
  specs = sweep.expand(config, 8)
  os.makedirs(workdir, exist_ok=True)
  return specs, sweep.run_sweep(specs, str(workdir), log=QUIET, **kwargs)


def lines_of(path):
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def assert_provenance(row):
  prov = row["provenance"]
  assert prov["batchbench"] == batchbench.__version__
  assert prov["measurement_version"] == row["measurement_version"] == version.MEASUREMENT_VERSION
  assert (prov["jax"], prov["jaxlib"]) == (jax.__version__, jaxlib.__version__)
  assert isinstance(prov["git_dirty"], bool)
  assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]), prov["git_commit"]
  # A commit of this checkout (robust to commits made since the row was written).
  assert subprocess.run(["git", "cat-file", "-e", f"{prov['git_commit']}^{{commit}}"],
                        cwd=REPO, capture_output=True, check=False).returncode == 0


# --- expanding the sweep section ---------------------------------------------------------

def test_expand_crosses_batches_multipliers_seeds_with_rule():
  c = small_config(batches=(16, 64), multipliers=(0.5, 2.0), seeds=(0, 1))
  specs = sweep.expand(c, 8)
  assert len(specs) == 8 and len({s.trial_id for s in specs}) == 8
  for s in specs:  # sqrt rule from base 0.1 at batch 32, times the multiplier
    assert math.isclose(s.lr, 0.1 * math.sqrt(s.global_batch / 32) * s.lr_multiplier)
  c.sweep.lr_rule = "linear"  # the sweep section's rule overrides the top-level one
  assert all(math.isclose(s.lr, 0.1 * s.global_batch / 32 * s.lr_multiplier)
             for s in sweep.expand(c, 8))


def test_batch_range_is_powers_of_two():
  c = small_config()
  c.sweep.global_batches = None
  c.sweep.batch_range = "8:100"
  assert [s.global_batch for s in sweep.expand(c, 8)] == [8, 16, 32, 64]
  c.sweep.batch_range = "6:64"
  with pytest.raises(ConfigError, match="sweep.batch_range"):
    sweep.expand(c, 8)


def test_bad_batch_in_sweep_names_the_sweep_field():
  c = small_config(batches=(32, 4000))  # larger than the 1437-example training set
  with pytest.raises(ConfigError, match=r"sweep\.global_batches=4000.*training set"):
    sweep.expand(c, 8)


# --- one in-process sweep: 2 batches x 3 LRs x 2 seeds ------------------------------------

@pytest.fixture(scope="module", name="swept")
def fixture_swept(tmp_path_factory):
  """2 batches x 3 LR multipliers x 2 seeds in this process.

  Evals every 2,048 examples: at batch 32 that is every 64 steps, so the trial's calls
  are as long as the throughput phase's (one program serves both); at batch 64 every 32
  steps, so the trial compiles a second program.
  """
  workdir = str(tmp_path_factory.mktemp("swept"))
  c = small_config(batches=(32, 64), multipliers=(0.5, 1.0, 2.0), seeds=(0, 1),
                   eval_every_examples=2048, target_value=0.9, steps_per_call=0)
  specs = sweep.expand(c, 8)
  runner = sweep.InProcess()
  summary = sweep.run_sweep(specs, workdir, log=QUIET, runner=runner)
  return {"workdir": workdir, "specs": specs, "summary": summary, "cache": runner.cache,
          "rows": {r["trial_id"]: r for r in results.read_results(workdir)},
          "points": {p["point_id"]: p for p in results.read_points(workdir)}}


def test_sweep_writes_one_row_per_trial(swept):
  specs, rows = swept["specs"], swept["rows"]
  assert swept["summary"] == {"total": 12, "skipped": 0, "ran": 12, "points": 2,
                              "statuses": swept["summary"]["statuses"],
                              "planned": [s.trial_id for s in specs]}
  assert sum(swept["summary"]["statuses"].values()) == 12
  assert sorted(rows) == sorted(s.trial_id for s in specs)
  for s in specs:
    r = rows[s.trial_id]
    assert (r["global_batch"], r["lr"], r["seed"]) == (s.global_batch, s.lr, s.seed)
    assert r["status"] in ("ok", "target_not_reached")
    assert r["loop_samples_per_sec"] > 0 and r["traces"]["train"] == 1
    if r["status"] == "ok":
      assert r["steps_to_target"] * r["global_batch"] == r["examples_to_target"]
      assert r["final_eval"]["accuracy"] >= 0.9
      # The trial stops at the first eval that meets the target, and no earlier one did.
      assert r["steps"] == r["steps_to_target"]
      assert [h["step"] for h in r["eval_history"]][-1] == r["steps"]
      assert all(h["metrics"]["accuracy"] < 0.9 for h in r["eval_history"][:-1])
    else:
      assert r["steps"] == s.max_steps and r["steps_to_target"] is None


def test_one_throughput_point_per_batch_gives_time_to_target(swept):
  points, rows = swept["points"], swept["rows"]
  lines = lines_of(os.path.join(swept["workdir"], results.THROUGHPUT_FILE))
  assert len(lines) == 2 == len(points)
  assert sorted(p["global_batch"] for p in points.values()) == [32, 64]
  for s in swept["specs"]:
    r = rows[s.trial_id]
    point = points[r["point_id"]]
    assert point["global_batch"] == s.global_batch and s.point_id == r["point_id"]
    assert point["timed_windows"] >= 5 and point["samples_per_sec"] > 0
    if r["status"] == "ok":
      assert r["time_to_target_s"] == pytest.approx(
          r["steps_to_target"] * point["step_time_ms"] / 1e3, rel=1e-12)
    else:
      assert r["time_to_target_s"] is None


def test_one_compile_per_batch(swept):
  specs, rows, cache = swept["specs"], swept["rows"], swept["cache"]
  batches = {s.global_batch for s in specs}
  assert len(batches) == 2 and len({s.program_key for s in specs}) == 2
  # One train program per batch: its throughput phase compiles it, then every LR and seed
  # of the batch runs it (the call length is a runtime value, so evals need no other).
  assert cache.compiles == len(batches)
  for batch in batches:
    trials = [rows[s.trial_id] for s in specs if s.global_batch == batch]
    assert len(trials) == 6
    assert all(r["compile_cached"] is True and r["traces"]["train"] == 1 for r in trials)


def test_shared_program_gives_the_results_of_a_separately_compiled_trial(swept):
  # The last trial of batch 64 ran on the program the first one compiled, with its own
  # LR and seed set at runtime; compiled alone, it must train to the same bits.
  spec = [s for s in swept["specs"] if s.global_batch == 64][-1]
  shared = swept["rows"][spec.trial_id]
  assert shared["compile_cached"] is True and spec.lr_multiplier == 2.0 and spec.seed == 1
  alone = run_trial(spec, log=None, cache=None)
  assert alone["compile_cached"] is False
  for key in ("params_hash", "status", "steps", "steps_to_target", "final_eval",
              "final_train_loss"):
    assert alone[key] == shared[key], key


def test_every_row_and_point_carries_provenance(swept):
  for row in [*swept["rows"].values(), *swept["points"].values()]:
    assert_provenance(row)


def test_report_takes_speed_and_time_to_target_from_the_points(swept):
  out = render.write_report(swept["workdir"])
  with open(out["paths"]["summary.csv"], encoding="utf-8") as f:
    header, *lines = f.read().splitlines()
  columns = header.split(",")
  table = [dict(zip(columns, line.split(","), strict=True)) for line in lines]
  by_batch = {p["global_batch"]: p for p in swept["points"].values()}
  assert [int(r["global_batch"]) for r in table] == [32, 64]
  for r in table:
    point = by_batch[int(r["global_batch"])]
    assert float(r["samples_per_sec"]) == point["samples_per_sec"]
    assert float(r["step_time_ms"]) == point["step_time_ms"]
    if r["steps_to_target"]:
      assert float(r["time_to_target_s"]) == pytest.approx(
          float(r["steps_to_target"]) * point["step_time_ms"] / 1e3, rel=1e-12)
  timed = {int(r["global_batch"]): float(r["time_to_target_s"]) for r in table
           if r["time_to_target_s"]}
  if timed:
    assert out["recommendation"]["fastest_batch"] == min(timed, key=timed.get)


# --- failures, reruns, versions -----------------------------------------------------------

class Failing(sweep.InProcess):
  """The in-process runner, with chosen points or trials raising."""

  def __init__(self, trials=None, points=None):
    super().__init__()
    self.fail_trials, self.fail_points = trials or {}, points or {}
    self.ran = []

  def point(self, spec, workdir, log, options, watch):
    if spec.point_id in self.fail_points:
      raise self.fail_points[spec.point_id]
    return super().point(spec, workdir, log, options, watch)

  def trial(self, spec, workdir, log, options, watch, point):
    self.ran.append(spec.trial_id)
    if spec.trial_id in self.fail_trials:
      raise self.fail_trials[spec.trial_id]
    return super().trial(spec, workdir, log, options, watch, point)


def test_failures_are_isolated_and_recorded(tmp_path):
  specs = sweep.expand(small_config(batches=(32, 64, 128)), 8)
  diverging = sweep.expand(small_config(batches=(64,), multipliers=(1e30,)), 8)[0]
  c_oom = small_config(batches=(128,))
  c_oom.memory_budget_bytes = 1024  # below the compiled peak
  over_budget = sweep.expand(c_oom, 8)[0]
  raising, exhausted = specs[0], specs[2]
  runner = Failing(trials={
      raising.trial_id: RuntimeError("injected failure"),
      # What XLA raises when device memory runs out.
      exhausted.trial_id: RuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")})
  all_specs = [raising, diverging, over_budget, exhausted, specs[1]]
  summary = sweep.run_sweep(all_specs, str(tmp_path), log=QUIET, runner=runner)
  rows = {r["trial_id"]: r for r in results.read_results(str(tmp_path))}
  assert len(rows) == 5 and summary["ran"] == 5
  assert rows[exhausted.trial_id]["status"] == "oom"
  assert "RESOURCE_EXHAUSTED" in rows[exhausted.trial_id]["error"]
  assert rows[raising.trial_id]["status"] == "error"
  assert "injected failure" in rows[raising.trial_id]["error"]
  assert rows[diverging.trial_id]["status"] == "diverged"
  assert rows[diverging.trial_id]["diverged_step"] >= 1
  oom = rows[over_budget.trial_id]
  assert oom["status"] == "oom" and oom["steps"] == 0
  assert oom["memory"]["peak_bytes"] > 1024
  assert rows[specs[1].trial_id]["status"] in ("ok", "target_not_reached")
  for r in rows.values():  # error rows carry the schema and provenance too
    assert r["point_id"] and r["measurement_version"] == version.MEASUREMENT_VERSION
    assert_provenance(r)


def test_a_failed_throughput_point_is_recorded_and_the_sweep_goes_on(tmp_path):
  # The throughput phase of a batch too large for the device fails first, before any of
  # its trials: that batch's trials are recorded, and the other batches still run.
  specs = sweep.expand(small_config(batches=(32, 64), multipliers=(1.0, 2.0)), 8)
  big = [s for s in specs if s.global_batch == 64]
  runner = Failing(points={big[0].point_id: RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")})
  summary = sweep.run_sweep(specs, str(tmp_path), log=QUIET, runner=runner)
  rows = {r["trial_id"]: r for r in results.read_results(str(tmp_path))}
  assert summary["total"] == 4 and sorted(rows) == sorted(s.trial_id for s in specs)
  for s in big:
    assert rows[s.trial_id]["status"] == "oom"
    assert "RESOURCE_EXHAUSTED" in rows[s.trial_id]["error"]
  for s in specs:
    if s.global_batch == 32:
      assert rows[s.trial_id]["status"] in ("ok", "target_not_reached")


def test_rerun_skips_finished_and_reruns_only_deleted_rows(tmp_path):
  c = small_config(batches=(32, 64), multipliers=(1.0, 2.0))
  specs, first = run(c, tmp_path)
  assert first["ran"] == 4
  points_file = tmp_path / results.THROUGHPUT_FILE
  measured = lines_of(points_file)
  assert len(measured) == 2

  again = Failing()
  _, summary = run(c, tmp_path, runner=again)
  assert summary["ran"] == 0 and summary["skipped"] == 4
  assert again.ran == [] and again.cache.compiles == 0  # points read, nothing compiled
  assert lines_of(points_file) == measured

  path = tmp_path / results.RESULTS_FILE
  lines = path.read_text().splitlines()
  removed = json.loads(lines[1])["trial_id"]
  path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
  third = Failing()
  sweep.run_sweep(specs, str(tmp_path), log=QUIET, runner=third)
  assert third.ran == [removed]
  assert len(results.read_results(str(tmp_path))) == 4
  assert lines_of(points_file) == measured  # the point was not measured again


def test_torn_last_line_is_ignored_and_that_trial_rerun(tmp_path):
  c = small_config(batches=(32, 64))
  specs, _ = run(c, tmp_path)
  path = tmp_path / results.RESULTS_FILE
  text = path.read_text()
  last = text.rstrip("\n").rsplit("\n", 1)[1]
  path.write_text(text[:len(text) - len(last) // 2 - 1])  # tear the last row mid-line
  assert len(results.read_results(str(tmp_path))) == 1
  _, summary = run(c, tmp_path)
  assert summary["ran"] == 1
  assert len(results.read_results(str(tmp_path))) == 2


def test_a_version_bump_reruns_trials_and_points(tmp_path, monkeypatch):
  c = small_config(batches=(64,))
  (old,), first = run(c, tmp_path)
  assert first["ran"] == 1
  try:
    monkeypatch.setattr(version, "MEASUREMENT_VERSION", version.MEASUREMENT_VERSION + 1)
    meta.provenance.cache_clear()  # it is read once per process
    (new,), second = run(c, tmp_path)
  finally:
    monkeypatch.undo()
    meta.provenance.cache_clear()
  # Rows and the point measured by other code are not reused.
  assert (second["ran"], second["skipped"]) == (1, 0)
  assert new.trial_id != old.trial_id and new.point_id != old.point_id
  rows = results.read_results(str(tmp_path))
  assert sorted(r["measurement_version"] for r in rows) == [old.measurement_version,
                                                            new.measurement_version]
  points = results.read_points(str(tmp_path))
  assert [p["point_id"] for p in points] == [old.point_id, new.point_id]
  assert {r["point_id"] for r in rows} == {old.point_id, new.point_id}
  for row in rows + points:  # each says which code measured it
    assert row["provenance"]["measurement_version"] == row["measurement_version"]
  # The report says that it mixes versions.
  warnings = render.write_report(str(tmp_path))["recommendation"]["warnings"]
  assert any(f"measurement_version {old.measurement_version}, {new.measurement_version}" in w
             for w in warnings)


# --- process isolation ---------------------------------------------------------------------

CRASHING_CONFIG = textwrap.dedent("""
    import dataclasses, os, signal
    import numpy as np
    import batchbench as bb
    from batchbench.config import default_config
    from batchbench.models import MLP

    def _crash(*args):
      os.kill(os.getpid(), signal.SIGSEGV)

    def data():
      rng = np.random.default_rng(0)
      x = rng.normal(size=(256, 8)).astype(np.float32)
      y = (x[:, 0] > 0).astype(np.int32)
      return bb.ArrayData.classification(x[:192], y[:192], x[192:], y[192:])

    @bb.register_workload("crashy")
    def crashy(crash: bool = False):
      w = bb.classification_workload(
          "crashy", model=MLP(hidden=(8,), num_classes=2), input_shape=(8,),
          num_classes=2, train_size=192, data=data, target=bb.Target("accuracy", 0.99))
      # Only a trial evaluates (the throughput phase never does): a native crash there.
      return dataclasses.replace(w, eval_sums=_crash) if crash else w

    def get_config(arg=None):
      c = default_config()
      c.workload = "crashy"
      c.num_devices = 1
      c.max_steps = 8
      c.eval_every_examples = 64
      c.workload_options.crash = False
      c.throughput.min_seconds = 0.05
      c.sweep.global_batches = (32,)
      c.sweep.lr_multipliers = (1.0, 2.0)
      return c
""")


@pytest.fixture(scope="module", name="isolated")
def fixture_isolated(tmp_path_factory):
  """A crashing trial, then 2 LRs of a healthy batch, each trial in its own process."""
  root = tmp_path_factory.mktemp("isolated")
  path = root / "crashy_config.py"
  path.write_text(CRASHING_CONFIG)
  config = runpy.run_path(str(path))["get_config"]()
  healthy = sweep.expand(config, 8)
  config.workload_options.crash = True
  config.sweep.lr_multipliers = (1.0,)
  (crashing,) = sweep.expand(config, 8)
  workdir = root / "work"
  os.makedirs(workdir)
  # The crashing batch's throughput point is taken as measured (one process fewer): the
  # crash under test is the trial's.
  results.append_row(str(workdir), {"point_id": crashing.point_id, "global_batch": 32,
                                    "samples_per_sec": 1.0, "step_time_ms": 1.0,
                                    "timed_windows": 5}, results.THROUGHPUT_FILE)
  summary = sweep.run_sweep([crashing, *healthy], str(workdir), isolation="process",
                            log=QUIET, options=sweep.RunOptions(config_path=str(path)))
  return {"workdir": workdir, "summary": summary, "crashing": crashing, "healthy": healthy,
          "rows": {r["trial_id"]: r for r in results.read_results(str(workdir))}}


def test_process_isolation_records_a_native_crash_and_continues(isolated):
  rows, crashing = isolated["rows"], isolated["crashing"]
  assert isolated["summary"]["ran"] == 3 and len(rows) == 3
  assert rows[crashing.trial_id]["status"] == "error"
  assert "SIGSEGV" in rows[crashing.trial_id]["error"]
  for spec in isolated["healthy"]:
    r = rows[spec.trial_id]
    assert r["status"] in ("ok", "target_not_reached") and r["steps"] == 8
    assert_provenance(r)


def test_process_isolation_shares_programs_through_the_persistent_cache(isolated):
  cache = isolated["workdir"] / sweep.XLA_CACHE_DIR
  assert cache.is_dir() and os.listdir(cache)
  first, *later = [isolated["rows"][s.trial_id] for s in isolated["healthy"]]
  assert later and all(r["compile_cached"] is True for r in later)
  assert first["traces"] == {"train": 1, "eval": 1}
  # One point for the healthy batch, measured in its own process, used by both trials.
  points = results.read_points(str(isolated["workdir"]))
  healthy_point = isolated["healthy"][0].point_id
  (point,) = [p for p in points if p["point_id"] == healthy_point]
  assert point["timed_windows"] >= 5 and point["samples_per_sec"] > 0
  assert_provenance(point)
  for r in [first, *later]:
    assert r["point_id"] == healthy_point
    assert r["time_to_target_s"] is None or r["time_to_target_s"] == pytest.approx(
        r["steps_to_target"] * point["step_time_ms"] / 1e3, rel=1e-12)


# --- the command -------------------------------------------------------------------------

def test_sweep_cli_runs_searches_lrs_and_writes_report(tmp_path):
  workdir = tmp_path / "cli"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", "batchbench", "sweep", "--config=configs/digits_mlp.py",
         f"--workdir={workdir}", "--config.sweep.global_batches=(64,128)",
         "--config.sweep.lr_multipliers=(1.0,)", "--config.sweep.seeds=(0,)",
         "--config.sweep.lr_search.max_extensions=1", "--config.max_examples=2048",
         "--config.workload_options.hidden=(32,)", "--config.throughput.min_seconds=0.05",
         "--config.steps_per_call=2"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "2 throughput point(s)" in out.stdout
  assert (workdir / "report" / "report.html").exists()
  rows = results.read_results(str(workdir))
  # One LR per batch is at both edges: the search tried one step beyond, up and/or down.
  decisions = {d["global_batch"]: d for d in results.read_jsonl(
      str(workdir / sweep.LR_SEARCH_FILE))}
  assert sorted(decisions) == [64, 128]
  for batch, d in decisions.items():
    tried = sorted({r["lr_multiplier"] for r in rows if r["global_batch"] == batch})
    assert d["lr_multipliers"] == tried and len(tried) >= 2
    assert set(tried) <= {0.5, 1.0, 2.0}  # one extension per direction at most
    assert d["reason"] in ("interior", "diverged_beyond", "limit", "none_reached")
  points = lines_of(workdir / results.THROUGHPUT_FILE)
  assert len(points) == 2
  # Re-running runs nothing and measures nothing: the search retraces the same path.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "0 trial(s) run" in again.stdout
  assert lines_of(workdir / results.THROUGHPUT_FILE) == points
  assert len(results.read_results(str(workdir))) == len(rows)
