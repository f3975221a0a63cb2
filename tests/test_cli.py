"""The ``batchbench`` command: exit status 2 and one clear message on bad input with the
workdir untouched, help that lists what there is, and a real trial that writes its row,
its throughput point and run metadata.

Each subprocess imports JAX (a few seconds), so only representative errors run in one;
test_config.py checks every field through resolve() directly.
"""

import json
import os
import subprocess
import sys
import types

import ml_collections
import pytest
from absl import flags
from conftest import REPO

from batchbench import config as config_lib
from batchbench import main
from batchbench.store import meta, results


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
  """Exit 2 with a single ``batchbench: error:`` line holding every fragment; returns it."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("batchbench: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])
  assert "Traceback" not in proc.stderr
  assert "result appended" not in proc.stdout
  return errors[0]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """Every bad invocation, the help pages and one good trial, run at once (on 2 cores
  they mostly import JAX in parallel).

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
      "proc": ["trial", digits, "--workdir=/proc/x"],
      "config_arg": ["trial", f"{digits}:batchh=64", f"--workdir={root}/config_arg"],
      "typo": ["trial", digits, f"--workdir={root}/typo", "--config.global_bach=64"],
      "nested_typo": ["trial", digits, f"--workdir={root}/nested_typo",
                      "--config.throughput.min_second=0.1"],
      "help": ["--help"],
      "sweep_help": ["sweep", "--help"],
  }
  procs = {case: start(*args) for case, args in cases.items()}
  procs["mnist1d"] = start(
      "trial", "--config=configs/mnist1d_mlp.py:batch=256,num_train=2000",
      f"--workdir={good}/wd", "--config.max_steps=16", "--config.target_metric=none",
      "--config.workload_options.hidden=(32,)", "--config.throughput.min_seconds=0.05",
      "--config.steps_per_call=8", "--quiet", env={"BATCHBENCH_CACHE": str(good / "cache")})
  runs = {case: finish(proc) for case, proc in procs.items()}
  return types.SimpleNamespace(root=root, good=good, runs=runs)


def test_bad_invocations_leave_every_workdir_untouched(cli):
  root = cli.root
  assert sorted(os.listdir(root)) == ["blocker", "empty"]
  assert os.listdir(root / "empty") == []
  assert (root / "blocker").read_text() == "not a directory"
  assert not os.path.exists("/proc/x")


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
                     "cannot create or write a file there")


def test_workdir_on_a_virtual_filesystem_exits_2_with_one_line(cli):
  proc = cli.runs["proc"]
  assert_usage_error(proc, "workdir='/proc/x'", "cannot create or write a file there")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # nothing else on stderr


def test_bad_config_file_argument_exits_2(cli):
  assert_usage_error(cli.runs["config_arg"], "config arg batchh='64'",
                     "known args: batch, pipeline, rule")


@pytest.mark.parametrize("case, field", [("typo", "global_bach"),
                                         ("nested_typo", "min_second")])
def test_config_field_typo_exits_2_without_stray_quotes(cli, case, field):
  line = assert_usage_error(cli.runs[case], "unknown --config field: ", field)
  message = line.split("unknown --config field: ", 1)[1]
  # The message itself, not the repr of an exception wrapping it.
  assert "''" not in message and not message.startswith('"'), line
  assert not message.endswith(("'", '"')), line


def test_help_lists_every_command(cli):
  proc = cli.runs["help"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("usage: batchbench COMMAND")
  listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
  assert listed == list(main.COMMANDS)
  assert {"trial", "sweep", "report", "probe", "decompose"} <= set(listed)
  for name, command in main.COMMANDS.items():
    assert f"  {name:10s} {command.summary}" in proc.stdout


def _flattened_fields(c, prefix=""):
  out = set()
  for key, value in c.items():
    out.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out |= _flattened_fields(value, f"{prefix}{key}.")
  return out


def test_sweep_help_lists_flags_config_fields_and_an_example(cli):
  proc = cli.runs["sweep_help"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
  sections = text.split("\n\n")
  assert sections[0].startswith("batchbench sweep: ")
  flag_lines = [line.strip() for line in sections[1].splitlines()[1:]]
  named = [line.split(":", 1)[0] for line in flag_lines]
  assert set(named) == {"--config", "--workdir", "--quiet", "--isolation", "--memory_budget",
                        "--compilation_cache_dir", "--deadline", "--tensorboard", "--mllog",
                        "--profile_steps", "--shard", "--shard_timeout", "--coordinator_address",
                        "--num_processes", "--process_id", "--initialization_timeout",
                        "--peer_timeout"}
  for line in flag_lines:  # each with its help text
    assert len(line.split(":", 1)[1].strip()) > 10, line
  # Every config field it names exists, and the sweep's own fields are among them.
  known = _flattened_fields(config_lib.default_config())
  field_lines = sections[2].splitlines()
  assert field_lines[0].startswith("config fields that matter")
  fields = {f.split(" (")[0].strip() for line in field_lines[1:]
            for part in line.split(",") for f in part.split(" or ")}
  assert fields <= known, fields - known
  assert {"sweep.global_batches", "sweep.batch_range", "sweep.lr_multipliers", "sweep.seeds",
          "throughput.min_seconds", "global_batch"} <= fields
  # The example is a runnable sweep command: a config file that exists, real fields.
  assert sections[3].startswith("example:")
  example = sections[3].splitlines()[1].split()
  assert example[:2] == ["batchbench", "sweep"]
  args = dict(a.split("=", 1) for a in example[2:])
  assert (REPO / args["--config"]).exists() and "--workdir" in args
  overrides = {k[len("--config."):] for k in args if k.startswith("--config.")}
  assert overrides and overrides <= known


def test_mnist1d_trial_writes_its_row_point_and_run_metadata(cli):
  proc, workdir, cache = cli.runs["mnist1d"], cli.good / "wd", cli.good / "cache"
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"result appended to {workdir / results.RESULTS_FILE}" in proc.stdout
  assert sorted(os.listdir(workdir)) == sorted(
      [results.RESULTS_FILE, results.THROUGHPUT_FILE, meta.META_FILE, "trials"])

  (row,) = results.read_results(str(workdir))
  (point,) = results.read_points(str(workdir))
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
  assert row["time_to_target_s"] is None
  assert 0.0 <= row["final_eval"]["accuracy"] <= 1.0
  assert [h["step"] for h in row["eval_history"]] == [8, 16]  # every 2,048 examples
  assert row["traces"] == {"train": 1, "eval": 1}
  assert row["loop_samples_per_sec"] > 0 and row["loop_timed_windows"] >= 1

  # The batch's throughput point, measured before the trial, is what the CLI prints.
  assert point["point_id"] == row["point_id"]
  assert (point["global_batch"], point["num_devices"]) == (256, 8)
  assert point["timed_windows"] >= 5 and point["samples_per_sec"] > 0
  rate = f"{point['samples_per_sec']:,.0f} samples/s"
  assert f"throughput: {rate}" in proc.stdout
  assert f"step {point['step_time_ms']:.3g} ms" in proc.stdout

  with open(workdir / meta.META_FILE, encoding="utf-8") as f:
    run_meta = json.load(f)
  assert run_meta["versions"]["jax"] and run_meta["versions"]["flax"]
  assert run_meta["versions"]["optax"]
  assert run_meta["device_count"] == 8 and run_meta["platform"] == "cpu"
  assert "--xla_force_host_platform_device_count=8" in run_meta["xla_flags"]
  assert run_meta["config"]["workload"] == "mnist1d_mlp"
  assert run_meta["config"]["global_batch"] == 256 and run_meta["config"]["max_steps"] == 16
  assert any("mnist1d_mlp.py" in a for a in run_meta["argv"])

  # The generated dataset went to the cache named by BATCHBENCH_CACHE.
  (cached,) = os.listdir(cache)
  assert cached.startswith("mnist1d_") and cached.endswith(".npz")


# --- in this process: validation before any compile --------------------------------------

@pytest.fixture(name="run_cli")
def fixture_run_cli(monkeypatch):
  """Parses absl flags in this process, runs ``main.main``, and resets the flags."""
  def run(*args):
    argv = ["batchbench", *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads --config.X overrides there
    return main.main(flags.FLAGS(argv))
  yield run
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the override flags that parsing defined


@pytest.mark.parametrize("command", ["trial", "sweep"])
@pytest.mark.parametrize("config, overrides, field, why", [
    ("digits_mlp", ["--config.optimizer=adam", "--config.momentum=0.9"], "momentum",
     "optimizer adam ignores momentum"),
    ("mnist1d_mlp", ["--config.momentum=0.9"], "momentum", "optimizer adam ignores momentum"),
    ("mnist1d_mlp", ["--config.optimizer=adamw", "--config.momentum=0.5"], "momentum",
     "optimizer adamw ignores momentum"),
    ("mnist1d_mlp", ["--config.weight_decay=0.01"], "weight_decay",
     "optimizer adam ignores weight_decay"),
], ids=["digits_adam", "adam_momentum", "adamw_momentum", "adam_weight_decay"])
def test_options_the_optimizer_ignores_fail_before_compiling(
    command, config, overrides, field, why, run_cli, no_compile, tmp_path, capsys):
  workdir = tmp_path / "wd"
  status = run_cli(command, f"--config={REPO / 'configs' / config}.py",
                   f"--workdir={workdir}", *overrides)
  err = capsys.readouterr().err
  assert status == 2, err
  (line,) = err.strip().splitlines()
  assert line.startswith(f"batchbench: error: invalid config: {field}=") and why in line
  assert not workdir.exists()
