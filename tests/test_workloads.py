"""The workload registry, the embedded datasets, synthetic workloads and a user's own."""

import math
import os

import flax.linen as nn
import mnist1d.data
import numpy as np
import pytest

import batchbench
from batchbench import config as config_lib, trial
from batchbench.data import embedded
from batchbench.workloads import (ArrayData, Target, classification_workload, get_workload,
                                  register_workload, workload_names, workload_options)

BUILTINS = ("digits_mlp", "mnist1d_cnn", "mnist1d_mlp", "synthetic_cnn", "synthetic_mlp")


# --- registry ---------------------------------------------------------------------------

def test_builtins_are_registered():
  assert set(BUILTINS) <= set(workload_names())
  assert workload_names() == sorted(workload_names())


def test_unknown_workload_lists_known_ones():
  with pytest.raises(KeyError, match="unknown workload 'nope'") as e:
    get_workload("nope")
  for name in BUILTINS:
    assert name in str(e.value)


def test_unknown_option_lists_the_workload_options():
  with pytest.raises(TypeError, match=r"no option\(s\) \['width'\].*'hidden'"):
    get_workload("digits_mlp", {"width": 3})
  assert workload_options("mnist1d_mlp") == {
      "num_train": 10_000, "num_test": 2_500, "seed": 42, "cache_dir": None,
      "hidden": (256, 256)}


def test_builtin_targets_and_sizes():
  digits = get_workload("digits_mlp")
  assert digits.target == Target("accuracy", 0.96, "max") and digits.train_size == 1437
  assert get_workload("mnist1d_mlp", {"num_train": 3000}).train_size == 3000
  for name in ("synthetic_mlp", "synthetic_cnn"):
    w = get_workload(name)
    assert w.synthetic and w.target is None and w.train_size is None


# --- embedded data ----------------------------------------------------------------------

def test_digits_data():
  d = get_workload("digits_mlp").data()
  assert d.train_x.shape == (1437, 64) and d.test_x.shape == (360, 64)
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
  assert set(np.unique(d.train_y)) == set(range(10))
  np.testing.assert_array_equal(d.train_x, get_workload("digits_mlp").data().train_x)


@pytest.mark.parametrize("num_train, num_test", [(200, 100), (30, 80), (25, 10)])
def test_mnist1d_generates_the_requested_sizes(tmp_path, num_train, num_test):
  # (30, 80) and (25, 10) used to lose examples to mnist1d's per-class rounding
  # (num_samples // 10 per class) and to int(num_samples * train_split) rounding down.
  w = get_workload("mnist1d_mlp", {"num_train": num_train, "num_test": num_test,
                                   "cache_dir": str(tmp_path)})
  d = w.data()
  assert d.train_x.shape == (num_train, 40) and d.train_y.shape == (num_train,)
  assert d.test_x.shape == (num_test, 40) and d.test_y.shape == (num_test,)
  assert w.train_size == d.num_train
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  assert d.train_y.min() >= 0 and d.train_y.max() <= 9


def test_mnist1d_second_load_hits_the_cache(tmp_path, monkeypatch):
  options = {"num_train": 200, "num_test": 100, "cache_dir": str(tmp_path)}
  first = get_workload("mnist1d_mlp", options).data()
  cached = os.listdir(tmp_path)
  assert len(cached) == 1 and cached[0].startswith("mnist1d_") and cached[0].endswith(".npz")

  def no_generation(*args, **kwargs):
    raise AssertionError("regenerated instead of reading the cache")

  monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
  second = get_workload("mnist1d_mlp", options).data()
  for field in ("train_x", "train_y", "test_x", "test_y"):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  # Other generation arguments are another cache entry, so they do generate.
  with pytest.raises(AssertionError, match="regenerated"):
    embedded.mnist1d(num_train=200, num_test=100, seed=7, cache_dir=str(tmp_path))


def test_mnist1d_unreadable_cache_is_regenerated(tmp_path):
  first = embedded.mnist1d(num_train=100, num_test=50, cache_dir=str(tmp_path))
  (name,) = os.listdir(tmp_path)
  (tmp_path / name).write_bytes(b"not an npz")
  again = embedded.mnist1d(num_train=100, num_test=50, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first.train_x, again.train_x)


# --- synthetic workloads run a fixed number of steps ------------------------------------

def _synthetic_row(workload, batch, steps, **options):
  c = config_lib.default_config()
  c.workload = workload
  c.workload_options = options
  c.global_batch = batch
  c.max_steps = steps
  c.target_metric = "none"
  spec = config_lib.resolve(c, 8)
  assert spec.eval_every_steps is None and spec.target is None
  return trial.run_trial(spec, log=None)


@pytest.mark.parametrize("workload, batch, steps, options", [
    ("synthetic_mlp", 64, 12, {"hidden": (32,)}),
    ("synthetic_cnn", 16, 4, {"image_size": 8}),
])
def test_synthetic_trial_runs_its_steps(workload, batch, steps, options):
  row = _synthetic_row(workload, batch, steps, **options)
  assert row["status"] == "ok" and row["error"] is None
  assert row["steps"] == steps and row["examples"] == steps * batch
  assert row["epochs"] is None and row["eval_history"] == [] and row["final_eval"] is None
  assert row["traces"] == {"train": 1, "eval": 0}
  assert math.isfinite(row["final_train_loss"]) and row["final_train_loss"] > 0
  assert row["samples_per_sec"] > 0 and row["timed_windows"] >= 1
  assert row["time_ledger"]["eval"] == 0.0 and row["time_to_target_s"] is None
  assert row["memory"]["peak_bytes"] > 0 and row["flops_per_step"] > 0


# --- a user's own workload --------------------------------------------------------------

class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


def _separable_data(num_train=512, num_test=101, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, 4))
  x = rng.normal(size=(num_train + num_test, dim)).astype(np.float32)
  y = np.argmax(x @ w, axis=1).astype(np.int32)
  return ArrayData(x[:num_train], y[:num_train], x[num_train:], y[num_train:])


@register_workload("test_user_tiny")
def _user_tiny(seed: int = 0):
  # As the base module's docstring shows it: no train_size, so resolve() must learn it.
  return classification_workload(
      "test_user_tiny", model=TinyNet(), input_shape=(8,), num_classes=4,
      data=lambda: _separable_data(seed=seed), target=Target("accuracy", 0.9),
      reference_batch=32)


def _user_config(num_devices):
  c = batchbench.default_config()
  c.workload = "test_user_tiny"
  c.global_batch = 64
  c.num_devices = num_devices
  c.base_lr = 0.2
  c.eval_every_examples = 256
  c.max_steps = 64
  return c


def test_user_registered_workload_runs_a_trial():
  assert "test_user_tiny" in workload_names()
  spec = config_lib.resolve(_user_config(8), 8)
  assert spec.train_size == 512 and spec.steps_per_epoch == 8
  with pytest.raises(config_lib.ConfigError, match=r"global_batch=1024.*512-example"):
    c = _user_config(8)
    c.global_batch = 1024
    config_lib.resolve(c, 8)

  row8 = trial.run_trial(spec, log=None)
  row1 = trial.run_trial(config_lib.resolve(_user_config(1), 8), log=None)
  for row in (row8, row1):
    assert row["status"] == "ok" and row["steps_to_target"] is not None
    assert row["final_eval"]["accuracy"] >= 0.9
    assert row["epochs"] == row["steps"] * 64 / 512
    history = row["eval_history"]
    assert len(history) >= 2 and history[-1]["metrics"]["loss"] < history[0]["metrics"]["loss"]
    assert history[-1]["step"] == row["steps_to_target"]
  # 101 test examples on 8 devices are padded to 104; padding must not count.
  for h in row8["eval_history"]:
    correct = h["metrics"]["accuracy"] * 101
    assert abs(correct - round(correct)) < 1e-6
  assert row8["steps_to_target"] == row1["steps_to_target"]
  for h8, h1 in zip(row8["eval_history"], row1["eval_history"], strict=True):
    for metric in ("accuracy", "loss"):
      np.testing.assert_allclose(h8["metrics"][metric], h1["metrics"][metric], rtol=1e-5)
