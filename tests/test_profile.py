"""--profile_steps: a jax.profiler trace of steady-state steps, kept out of the timing."""

import os

from conftest import load_config

from batchbench.config import resolve
from batchbench.runs.trial import run_trial


def small(**overrides):
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch, c.num_devices, c.max_steps, c.target_metric = 32, 1, 48, "none"
  c.eval_every_examples = 256  # windows of 8 steps
  c.update_from_flattened_dict(overrides)
  return resolve(c, 8)


def test_profiled_steps_are_traced_and_left_out_of_the_timing(tmp_path):
  spec = small()
  plain = run_trial(spec, log=None)
  row = run_trial(spec, log=None, workdir=str(tmp_path / "trial"), profile_steps=5)
  profile = row["profile"]
  # The first window (steps 1-8) is the warm-up; the next window is profiled, cut to 5.
  assert (profile["first_step"], profile["last_step"]) == (8, 13)
  traces = [f for _, _, files in os.walk(profile["dir"]) for f in files
            if f.endswith(".xplane.pb")]
  assert traces, os.listdir(profile["dir"])
  assert row["time_ledger"]["profile"] > 0 and plain["time_ledger"]["profile"] == 0
  # Untimed like the warm-up. Plain: windows 8, 16, ..., 48, the first dropped: 5 timed.
  # Profiled: 8 (warm-up), 13 (profiled), 16, 24, 32, 40, 48: also 5 timed.
  assert row["steps"] == plain["steps"] == 48
  assert row["loop_timed_windows"] == plain["loop_timed_windows"] == 5
  assert row["params_hash"] == plain["params_hash"]  # profiling changes no result


def test_without_a_trial_directory_nothing_is_profiled():
  row = run_trial(small(), log=None, profile_steps=5)
  assert row["profile"] is None and row["time_ledger"]["profile"] == 0
