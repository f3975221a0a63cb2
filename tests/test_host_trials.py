"""Trials fed by the host input pipeline: the same batches, updates and evals as the
on-device path, bit for bit; resumed trials read the batches the uninterrupted one read;
the time waited for input is measured and reported."""

import dataclasses
import os
import time

import jax
import pytest
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config import ConfigError
from batchbench.report import recommend
from batchbench.runs import decompose, throughput, trial
from batchbench.store import checkpoint
from batchbench.workloads import get_workload, register_workload

RESULT_KEYS = ("status", "steps", "steps_to_target", "params_hash", "final_eval",
               "final_train_eval", "final_train_loss")


def digits(pipeline, **overrides):
  """digits_mlp with a 32-unit layer, 8 devices x accum 2 at batch 64, target 0.9."""
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.workload_options.pipeline = pipeline
  c.global_batch = 64
  c.num_devices = 8
  c.accum_steps = 2
  c.steps_per_call = 3
  c.eval_every_examples = 64 * 6
  c.max_steps = 60
  c.target_metric = "accuracy"
  c.target_value = 0.9
  for key, value in overrides.items():
    c[key] = value
  return config_lib.resolve(c, jax.device_count())


@pytest.fixture(name="device_row", scope="module")
def fixture_device_row():
  return trial.run_trial(digits("device"), log=None)


@pytest.fixture(name="host_row", scope="module")
def fixture_host_row():
  return trial.run_trial(digits("host"), log=None)


def same_metrics(a, b):
  """Equal up to float32 summation order: the host path sums the eval chunks on the host."""
  return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


def test_host_pipeline_trains_bit_identically_to_the_device_path(device_row, host_row):
  # The host pipeline reads the embedded feed's global indices, so the steps and the
  # parameters agree to the bit, and every eval to float32 rounding.
  assert device_row["status"] == "ok" and device_row["steps_to_target"]
  for key in ("status", "steps", "steps_to_target", "params_hash", "final_train_loss"):
    assert host_row[key] == device_row[key], key
  pairs = list(zip(host_row["eval_history"], device_row["eval_history"], strict=True))
  pairs.append(({"step": 0, "metrics": host_row["final_eval"],
                 "train_metrics": host_row["final_train_eval"]},
                {"step": 0, "metrics": device_row["final_eval"],
                 "train_metrics": device_row["final_train_eval"]}))
  for host, device in pairs:
    assert host["step"] == device["step"]
    assert same_metrics(host["metrics"], device["metrics"])
    assert same_metrics(host["train_metrics"], device["train_metrics"])
  assert host_row["traces"] == {"train": 1, "eval": 1}  # one program, one eval call


def test_host_trial_waits_are_in_the_ledger_inside_train(host_row):
  ledger = host_row["time_ledger"]
  assert 0 < ledger["input_wait"] < ledger["train"]


def test_a_resumed_host_trial_reads_the_batches_the_uninterrupted_one_read(tmp_path):
  class Interrupt(Exception):
    pass

  def stop(step, window):
    del window
    if step >= 24:
      raise Interrupt

  spec = digits("host", checkpoint_every_examples=64 * 9, stop_at_target=True)
  reference = trial.run_trial(spec, log=None)
  with pytest.raises(Interrupt):
    trial.run_trial(spec, workdir=str(tmp_path), log=None, on_window=stop)
  saved = checkpoint.committed_steps(os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR))
  assert saved and max(saved) < reference["steps"]  # it stopped before the end
  resumed = trial.run_trial(spec, workdir=str(tmp_path), log=None)
  assert resumed["resumes"] == 1
  for key in RESULT_KEYS:
    assert resumed[key] == reference[key], key


def test_decompose_checks_host_fed_splits_against_the_float64_update(tmp_path):
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.workload_options.pipeline = "host"
  c.num_devices = 2
  c.steps_per_call = 1
  c.throughput.warmup_calls = 1
  c.throughput.min_windows = 3
  c.throughput.min_seconds = 0.01
  result = decompose.run_decompose(c, str(tmp_path), 4, log=None)
  assert result["equivalence_checked"] is True and result["not_equivalent"] == []
  assert {(r["num_devices"], r["accum_steps"]) for r in result["rows"]} == {
      (1, 1), (1, 2), (1, 4), (2, 1), (2, 2)}
  assert all(0 < r["error_vs_x64"] <= result["tolerance"] for r in result["rows"])


def test_an_unknown_pipeline_is_a_config_error_naming_the_option():
  with pytest.raises(ConfigError, match=r"workload_options\.pipeline.*'tape'.*device, host"):
    get_workload("digits_mlp", {"pipeline": "tape"})


# --- input wait: measured in the throughput phase, reported above 5% ---------------------

SLEEP_S = 0.002


def _slow(example):
  time.sleep(SLEEP_S)  # a decode that takes 2 ms: the device waits for the host
  return example


@register_workload("test_digits_slow_host")
def _digits_slow_host(hidden=(32,)):
  """digits_mlp on the host pipeline with a transform that sleeps per example."""
  base = get_workload("digits_mlp", {"hidden": hidden, "pipeline": "host"})

  def host_data():
    data = base.host_data()
    return dataclasses.replace(data, transform=_slow)
  return dataclasses.replace(base, name="test_digits_slow_host", host_data=host_data)


def point_config(workload, pipeline=None):
  c = load_config("digits_mlp")
  c.workload = workload
  c.workload_options = {"hidden": (32,)}
  if pipeline:
    c.workload_options.pipeline = pipeline
  c.global_batch = 32
  c.num_devices = 1
  c.steps_per_call = 2
  c.throughput.warmup_calls = 1
  c.throughput.min_windows = 3
  c.throughput.min_seconds = 0.05
  return config_lib.resolve(c, jax.device_count())


def test_throughput_phase_measures_the_fraction_spent_waiting_for_input():
  slow = throughput.measure(point_config("test_digits_slow_host"))
  fast = throughput.measure(point_config("digits_mlp", "device"))
  # 64 examples per call at >= 2 ms each, 8 reader threads: >= 16 ms of reading per call
  # against well under a millisecond of compute for a 32-unit MLP.
  assert slow["input_wait_fraction"] > 0.5
  assert 0 < slow["input_wait_s"] <= sum(slow["window_seconds"])
  assert fast["input_wait_fraction"] < 0.05
  (warning,) = [w for w in recommend.warnings([], [], [slow]) if "input pipeline" in w]
  assert f"batch 32: {slow['input_wait_fraction']:.0%}" in warning
  assert "timed windows" in warning
  assert not [w for w in recommend.warnings([], [], [fast]) if "input pipeline" in w]


@pytest.mark.parametrize("wait,warned", [(0.04, False), (0.06, True)])
def test_trials_input_wait_is_warned_about_above_five_percent_of_train(wait, warned):
  rows = [{"global_batch": 8, "status": "ok",
           "time_ledger": {"train": 1.0, "input_wait": wait}}] * 2
  found = recommend.input_bound(rows, [])
  assert bool(found) == warned
  if warned:
    assert found == [(8, pytest.approx(wait), "2 trial(s)' training time")]


def test_a_host_source_of_the_wrong_size_is_refused_before_compute(no_compile):
  base = get_workload("digits_mlp", {"hidden": (32,), "pipeline": "host"})
  data = base.host_data()
  assert data.num_train == len(data.train) == 1437 and len(data.test) == 360
  first = data.train[0]
  assert set(first) == {"inputs", "labels"} and first["inputs"].shape == (64,)
  with pytest.raises(ConfigError, match="global_batch.*1437"):
    digits("host", global_batch=2048, accum_steps=1)
