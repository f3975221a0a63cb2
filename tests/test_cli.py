"""The ``batchbench`` command in a subprocess: exit status 2 and one clear message on bad
input with the workdir untouched, and a real trial that writes its row and metadata.

Each subprocess imports JAX (a few seconds), so only representative errors run here;
test_config.py checks every field through resolve() directly.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from batchbench import results

REPO = pathlib.Path(__file__).resolve().parent.parent


def _env(extra=None):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra or {})
  return env


def start(*args, env=None):
  return subprocess.Popen([sys.executable, "-m", "batchbench", *args], cwd=REPO,
                          env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=180):
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_usage_error(proc, *fragments):
  """Exit 2 with a single ``batchbench: error:`` line holding every fragment."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("batchbench: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])
  assert "Traceback" not in proc.stderr
  assert "result appended" not in proc.stdout


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """Every bad invocation and one good trial, run at once (on 2 cores they mostly import
  JAX in parallel).

  Returns:
    ``root`` (where the bad ones point), ``good`` (the good one's directory) and
    ``runs``, ``{case: CompletedProcess}``.
  """
  root = tmp_path_factory.mktemp("cli")
  good = tmp_path_factory.mktemp("good")
  (root / "blocker").write_text("not a directory")  # a path under it can never be created
  (root / "empty").mkdir()
  digits = "--config=configs/digits_mlp.py"
  cases = {
      "command": ["trail", digits, f"--workdir={root}/command"],
      "batch": ["trial", digits, f"--workdir={root}/new/wd", "--config.global_batch=0"],
      "workload": ["trial", digits, f"--workdir={root}/workload", "--config.workload=resnet50"],
      "too_big": ["trial", digits, f"--workdir={root}/empty", "--config.global_batch=2048"],
      "unwritable": ["trial", digits, f"--workdir={root}/blocker/wd"],
      "config_arg": ["trial", f"{digits}:batchh=64", f"--workdir={root}/config_arg"],
  }
  procs = {case: start(*args) for case, args in cases.items()}
  procs["mnist1d"] = start(
      "trial", "--config=configs/mnist1d_mlp.py:batch=256,num_train=2000",
      f"--workdir={good}/wd", "--config.max_steps=16", "--config.target_metric=none",
      "--quiet", env={"BATCHBENCH_CACHE": str(good / "cache")})
  runs = {case: finish(proc) for case, proc in procs.items()}
  return types.SimpleNamespace(root=root, good=good, runs=runs)


def test_bad_invocations_leave_every_workdir_untouched(cli):
  root = cli.root
  assert sorted(os.listdir(root)) == ["blocker", "empty"]
  assert os.listdir(root / "empty") == []
  assert (root / "blocker").read_text() == "not a directory"


def test_unknown_command_exits_2(cli):
  runs = cli.runs
  assert_usage_error(runs["command"], "expected one command, got trail")
  assert "usage: batchbench COMMAND" in runs["command"].stderr
  assert "  trial " in runs["command"].stderr


def test_non_positive_global_batch_exits_2(cli):
  assert_usage_error(cli.runs["batch"], "global_batch=0", "must be a positive integer")


def test_unknown_workload_lists_the_known_ones(cli):
  assert_usage_error(cli.runs["workload"], "workload='resnet50'", "known workloads:",
                     "digits_mlp", "mnist1d_mlp", "synthetic_mlp")


def test_batch_larger_than_the_training_set_exits_2(cli):
  assert_usage_error(cli.runs["too_big"], "global_batch=2048", "1437-example training set")


def test_unwritable_workdir_exits_2(cli):
  assert_usage_error(cli.runs["unwritable"], f"workdir='{cli.root}/blocker/wd'",
                     "is not a directory")


def test_bad_config_file_argument_exits_2(cli):
  # BUG (main.py): an error raised by get_config (here an unknown key of the config
  # argument string) surfaces through absl's flag parsing, which exits with status 1 and
  # "FATAL Flags parsing error" around a traceback, instead of status 2 and the
  # ConfigError's one-line message.
  assert_usage_error(cli.runs["config_arg"], "config arg 'batchh'",
                     "known args: ['batch', 'rule']")


def test_mnist1d_trial_writes_its_row_and_run_metadata(cli):
  proc, workdir, cache = cli.runs["mnist1d"], cli.good / "wd", cli.good / "cache"
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"result appended to {workdir / results.RESULTS_FILE}" in proc.stdout
  assert sorted(os.listdir(workdir)) == [results.RESULTS_FILE, results.META_FILE, "trials"]

  (row,) = results.read_results(str(workdir))
  # The trial keeps its spec and final checkpoint under trials/<trial_id>/.
  trial_dir = workdir / "trials" / row["trial_id"]
  assert (trial_dir / "spec.json").exists()
  assert os.listdir(trial_dir / "checkpoints") == ["16"]
  assert row["workload"] == "mnist1d_mlp" and row["status"] == "ok"
  assert (row["global_batch"], row["num_devices"], row["per_device_batch"]) == (256, 8, 32)
  assert row["steps"] == 16 and row["examples"] == 16 * 256
  assert row["epochs"] == 16 * 256 / 2000
  assert row["spec"]["workload_options"]["num_train"] == 2000
  assert row["target"] is None and row["steps_to_target"] is None
  assert 0.0 <= row["final_eval"]["accuracy"] <= 1.0
  assert [h["step"] for h in row["eval_history"]] == [8, 16]  # every 2,048 examples
  assert row["traces"] == {"train": 1, "eval": 1}

  with open(workdir / results.META_FILE, encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["versions"]["jax"] and meta["versions"]["flax"] and meta["versions"]["optax"]
  assert meta["device_count"] == 8 and meta["platform"] == "cpu"
  assert "--xla_force_host_platform_device_count=8" in meta["xla_flags"]
  assert meta["config"]["workload"] == "mnist1d_mlp"
  assert meta["config"]["global_batch"] == 256 and meta["config"]["max_steps"] == 16
  assert any("mnist1d_mlp.py" in a for a in meta["argv"])

  # The generated dataset went to the cache named by BATCHBENCH_CACHE.
  (cached,) = os.listdir(cache)
  assert cached.startswith("mnist1d_") and cached.endswith(".npz")
