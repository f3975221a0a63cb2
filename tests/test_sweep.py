"""The sweep: rows per trial, failure isolation, skip-finished, LR rules, CLI."""

import json
import math
import os
import runpy
import subprocess
import sys
import textwrap

import pytest

from batchbench import config as config_lib
from batchbench import results, sweep
from batchbench.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(batches=(32, 64), multipliers=(1.0,), seeds=(0,)):
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
  c.sweep.global_batches = tuple(batches)
  c.sweep.lr_multipliers = tuple(multipliers)
  c.sweep.seeds = tuple(seeds)
  return c


def run(config, workdir, **kwargs):
  specs = sweep.expand(config, 8)
  os.makedirs(workdir, exist_ok=True)
  return specs, sweep.run_sweep(specs, str(workdir), log=lambda _: None, **kwargs)


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


def test_small_sweep_writes_one_row_per_trial(tmp_path):
  c = small_config(batches=(32, 64), multipliers=(0.5, 1.0))
  specs, summary = run(c, tmp_path)
  rows = results.read_results(str(tmp_path))
  assert summary == {"total": 4, "skipped": 0, "ran": 4, "statuses": summary["statuses"]}
  assert sorted(r["trial_id"] for r in rows) == sorted(s.trial_id for s in specs)
  by_id = {s.trial_id: s for s in specs}
  for r in rows:
    s = by_id[r["trial_id"]]
    assert (r["global_batch"], r["lr"], r["seed"]) == (s.global_batch, s.lr, s.seed)
    assert r["status"] in ("ok", "target_not_reached")
    assert r["samples_per_sec"] > 0 and r["compile_s"] > 0
    if r["status"] == "ok":
      assert r["steps_to_target"] * r["global_batch"] == r["examples_to_target"]
      assert r["final_eval"]["accuracy"] >= 0.5


def test_failures_are_isolated_and_recorded(tmp_path):
  c = small_config(batches=(32, 64, 128))
  specs = sweep.expand(c, 8)
  # Divergence: a huge LR for the batch-64 trial.
  c_div = small_config(batches=(64,), multipliers=(1e30,))  # overflows to inf
  diverging = sweep.expand(c_div, 8)[0]
  # OOM: a memory budget below the compiled peak for the batch-128 trial.
  c_oom = small_config(batches=(128,))
  c_oom.memory_budget_bytes = 1024
  over_budget = sweep.expand(c_oom, 8)[0]
  raising = specs[0]

  from batchbench import trial

  exhausted = specs[2]

  def runner(spec, workdir, log, options, watch):
    if spec.trial_id == raising.trial_id:
      raise RuntimeError("injected failure")
    if spec.trial_id == exhausted.trial_id:  # what XLA raises when device memory runs out
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")
    return trial.run_trial(spec, log=log)

  all_specs = [raising, diverging, over_budget, exhausted, specs[1]]
  summary = sweep.run_sweep(all_specs, str(tmp_path), log=lambda _: None, runner=runner)
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


def test_rerun_skips_finished_and_reruns_only_deleted_rows(tmp_path):
  c = small_config(batches=(32, 64, 128))
  specs, first = run(c, tmp_path)
  assert first["ran"] == 3
  _, again = run(c, tmp_path)
  assert again["ran"] == 0 and again["skipped"] == 3

  path = tmp_path / results.RESULTS_FILE
  lines = path.read_text().splitlines()
  removed = json.loads(lines[1])["trial_id"]
  path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
  ran = []

  def runner(spec, workdir, log, options, watch):
    ran.append(spec.trial_id)
    from batchbench import trial
    return trial.run_trial(spec, log=log)

  sweep.run_sweep(specs, str(tmp_path), log=lambda _: None, runner=runner)
  assert ran == [removed]
  assert len(results.read_results(str(tmp_path))) == 3


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


CRASHING_CONFIG = textwrap.dedent("""
    import os, signal
    import numpy as np
    import batchbench as bb
    from batchbench.config import default_config
    from batchbench.models import MLP

    def _crash():
      os.kill(os.getpid(), signal.SIGSEGV)

    def data():
      rng = np.random.default_rng(0)
      x = rng.normal(size=(256, 8)).astype(np.float32)
      y = (x[:, 0] > 0).astype(np.int32)
      return bb.ArrayData(x[:192], y[:192], x[192:], y[192:])

    @bb.register_workload("crashy")
    def crashy(crash: bool = False):
      return bb.classification_workload(
          "crashy", model=MLP(hidden=(8,), num_classes=2), input_shape=(8,),
          num_classes=2, train_size=192, data=_crash if crash else data,
          target=bb.Target("accuracy", 0.99))

    def get_config(arg=None):
      c = default_config()
      c.workload = "crashy"
      c.num_devices = 1
      c.max_steps = 8
      c.eval_every_examples = 64
      c.workload_options.crash = False
      c.sweep.global_batches = (32,)
      return c
""")


def test_process_isolation_records_a_native_crash_and_continues(tmp_path):
  path = tmp_path / "crashy_config.py"
  path.write_text(CRASHING_CONFIG)
  module = runpy.run_path(str(path))
  config = module["get_config"]()
  healthy = sweep.expand(config, 8)[0]
  config.workload_options.crash = True
  crash_spec = sweep.expand(config, 8)[0]
  specs = [crash_spec, healthy]
  workdir = tmp_path / "work"
  os.makedirs(workdir)
  summary = sweep.run_sweep(specs, str(workdir), isolation="process",
                            log=lambda _: None,
                            options=sweep.RunOptions(config_path=str(path)))
  rows = {r["trial_id"]: r for r in results.read_results(str(workdir))}
  assert summary["ran"] == 2 and len(rows) == 2
  assert rows[crash_spec.trial_id]["status"] == "error"
  assert "SIGSEGV" in rows[crash_spec.trial_id]["error"]
  other = [r for tid, r in rows.items() if tid != crash_spec.trial_id][0]
  assert other["status"] in ("ok", "target_not_reached") and other["steps"] == 8


def test_sweep_cli_runs_and_writes_report(tmp_path):
  workdir = tmp_path / "cli"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", "batchbench", "sweep", "--config=configs/digits_mlp.py",
         f"--workdir={workdir}", "--config.sweep.global_batches=(64,128)",
         "--config.sweep.lr_multipliers=(1.0,)", "--config.max_examples=2048",
         "--config.workload_options.hidden=(32,)"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "[trial 2/2]" in out.stdout
  assert (workdir / "report" / "report.html").exists()
  assert len(results.read_results(str(workdir))) == 2
  # Re-running runs nothing.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "0 trial(s) run" in again.stdout
