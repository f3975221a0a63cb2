"""The workload registry and interface, the embedded datasets, synthetic workloads and a
user's own."""

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import mnist1d.data
import numpy as np
import optax
import pytest

import batchbench
from batchbench import config as config_lib
from batchbench.core import steps
from batchbench.core.mesh import make_mesh, replicated
from batchbench.core.program import build
from batchbench.core.state import TrainState
from batchbench.data import ArrayData, embedded
from batchbench.data.arrays import MASK
from batchbench.models import MLP
from batchbench.runs import trial
from batchbench.workloads import (LossOutput, Target, classification_workload, get_workload,
                                  register_workload, workload_names, workload_options)

BUILTINS = ("digits_mlp", "mnist1d_cnn", "mnist1d_mlp", "synthetic_cnn", "synthetic_mlp")


def init(workload, seed=0):
  """``workload.init`` on a batch spec of one example, compiled (faster than op by op)."""
  spec = workload.batch_spec(1)
  return jax.jit(lambda key: workload.init(key, spec))(jax.random.key(seed))


def apply(model, params, *args):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)


def cross_entropy_sum(logits, labels, mask):
  """Masked sum of softmax cross-entropy, in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=1, keepdims=True)
  log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  losses = log_z - logits[np.arange(len(labels)), labels]
  return float(np.sum(losses * mask))


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
  with pytest.raises(TypeError, match=r"no option\(s\) width; its options are hidden"):
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
    assert w.synthetic and w.target is None and w.train_size is None and w.data is None


# --- the interface ----------------------------------------------------------------------

class TokenNet(nn.Module):
  """Embeds integer tokens (``nn.Embed`` refuses anything else), averages, classifies."""

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(4)(nn.Embed(16, 8)(tokens).mean(axis=1))


class BatchNormNet(nn.Module):
  """BatchNorm straight on the inputs, so its running mean is easy to compute."""

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


@register_workload("test_int_tokens")
def _int_tokens():
  return classification_workload("test_int_tokens", model=TokenNet(), input_shape=(6,),
                                 num_classes=4, data=None, input_dtype=jnp.int32)


def test_init_takes_the_batch_spec_so_integer_tokens_work():
  w = get_workload("test_int_tokens")
  spec = w.batch_spec(3)
  assert spec == {"inputs": jax.ShapeDtypeStruct((3, 6), jnp.int32),
                  "labels": jax.ShapeDtypeStruct((3,), jnp.int32)}
  params, model_state = init(w)
  assert params["Embed_0"]["embedding"].shape == (16, 8) and model_state == {}
  batch = jax.jit(w.synthetic_batch, static_argnums=1)(jax.random.key(1), 5)
  assert batch["inputs"].dtype == jnp.int32 and MASK not in batch
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  out = jax.jit(w.loss)(params, model_state, {**batch, MASK: mask}, jax.random.key(2))
  logits = apply(TokenNet(), params, batch["inputs"])
  assert float(out.loss_sum) == pytest.approx(
      cross_entropy_sum(logits, np.asarray(batch["labels"]), mask), rel=1e-5)
  assert float(out.count) == 3.0


def test_integer_token_workload_trains_through_the_harness():
  """Compiled train call of the registered int-token workload: two devices, accumulation."""
  c = batchbench.default_config()
  c.workload = "test_int_tokens"
  c.global_batch = 8
  c.accum_steps = 2
  c.num_devices = 2
  c.max_steps = 4
  c.target_metric = "none"
  spec = config_lib.resolve(c, 8)
  program = build(spec, flops=False)
  state = program.init_state(spec.seed, spec.lr)
  state, metrics = program.run(state, program.feed(spec.seed)(0))
  losses = np.asarray(metrics["loss"])
  assert losses.shape == (spec.steps_per_call,) and np.isfinite(losses).all()
  assert int(state.step) == spec.steps_per_call and len(program.train.traces) == 1


@pytest.mark.parametrize("input_shape", [(5,), (3, 4, 2)])
def test_float_inputs_of_any_shape(input_shape):
  model = MLP(hidden=(7,), num_classes=3)
  w = classification_workload("test_shapes", model=model, input_shape=input_shape,
                              num_classes=3, data=None)
  assert w.batch_spec(2)["inputs"] == jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  params, _ = init(w)
  assert params["Dense_0"]["kernel"].shape == (math.prod(input_shape), 7)
  batch = jax.jit(w.synthetic_batch, static_argnums=1)(jax.random.key(1), 4)
  assert batch["inputs"].shape == (4, *input_shape)
  sums = jax.jit(w.eval_sums)(params, {}, {**batch, MASK: np.ones(4, np.float32)})
  assert float(sums["count"]) == 4.0 and 0.0 <= float(sums["accuracy"]) <= 4.0


def test_loss_returns_its_sum_count_and_updated_model_state():
  w = classification_workload("test_bn", model=BatchNormNet(), input_shape=(5,),
                              num_classes=3, data=None, train_flag=True)
  params, model_state = init(w)
  stats = model_state["batch_stats"]["BatchNorm_0"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(5))
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(8, 5)).astype(np.float32)
  y = rng.integers(0, 3, 8).astype(np.int32)
  batch = {"inputs": x, "labels": y, MASK: np.ones(8, np.float32)}
  out = jax.jit(w.loss)(params, model_state, batch, jax.random.key(1))
  assert isinstance(out, LossOutput) and float(out.count) == 8.0
  new = out.model_state["batch_stats"]["BatchNorm_0"]
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(new["mean"], 0.1 * x64.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 + 0.1 * x64.var(0), rtol=1e-5)
  # Evaluation reads the model state and leaves it alone.
  eval_sums = jax.jit(w.eval_sums)
  before, after = (eval_sums(params, s, batch) for s in (model_state, out.model_state))
  assert float(before["loss"]) != float(after["loss"])


def test_loss_sums_only_the_masked_in_examples():
  w = classification_workload("test_tiny", model=TinyNet(), input_shape=(8,), num_classes=4,
                              data=None)
  params, model_state = init(w)
  x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0, 1], np.int32)
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  batch = {"inputs": x, "labels": y, MASK: mask}
  out = jax.jit(w.loss)(params, model_state, batch, jax.random.key(0))
  logits = apply(TinyNet(), params, x)
  assert float(out.loss_sum) == pytest.approx(cross_entropy_sum(logits, y, mask), rel=1e-5)
  assert float(out.count) == 4.0 and out.model_state == {}
  sums = jax.jit(w.eval_sums)(params, model_state, batch)
  correct = (np.argmax(np.asarray(logits), 1) == y) * mask
  assert float(sums["accuracy"]) == correct.sum() and float(sums["count"]) == 4.0


@pytest.mark.parametrize("name", ["digits_mlp", "synthetic_mlp"])
def test_the_harness_adds_the_mask(name):
  """Workloads declare no mask; every micro-batch the train step builds carries one."""
  w = get_workload(name, {"hidden": (8,)})
  assert MASK not in w.example_spec and MASK not in w.batch_spec(4)
  seen = []
  loss = w.loss

  def recording_loss(params, model_state, batch, rng):
    seen.append({k: (v.shape, v.dtype) for k, v in batch.items()})
    return loss(params, model_state, batch, rng)

  recording = dataclasses.replace(w, loss=recording_loss)
  mesh = make_mesh(2)
  tx = optax.sgd(0.1)

  def initial_state():
    params, model_state = w.init(jax.random.key(0), w.batch_spec(1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), rng=jax.random.key(0))

  state = jax.eval_shape(initial_state)
  call = steps.make_train_call(recording, mesh, tx, micro_batch=4)  # 2 micro-batches of 4
  if w.synthetic:
    data, feed = {}, jnp.zeros((1, 2), jnp.int32)
  else:
    data, feed = dict(w.data().train), jnp.zeros((1, 2, 4), jnp.int32)
  jax.eval_shape(call, state, data, feed, 1)  # traces the step: nothing runs
  assert seen and seen[0][MASK] == ((4,), jnp.float32)
  assert set(seen[0]) == {*w.example_spec, MASK}
  # And the mask it adds marks every training example as real.
  prepare, get = steps.micro_batches(w, mesh, 4)
  placed = jax.device_put(data, replicated(mesh))
  batch = jax.jit(lambda d, f: get(prepare(d, f, jax.random.key(0)), f[0, 0]))(placed, feed)
  np.testing.assert_array_equal(np.asarray(batch[MASK]), np.ones(4, np.float32))


def test_array_data_validates_its_fields():
  x, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int32)
  d = ArrayData.classification(x, y, x[:4], y[:4])
  assert (d.num_train, d.num_test) == (10, 4)
  assert set(d.train) == set(d.test) == {"inputs", "labels"}
  with pytest.raises(ValueError, match=r"ArrayData\.train: fields differ in length"):
    ArrayData.classification(x, y[:9], x, y)
  with pytest.raises(ValueError, match=r"ArrayData\.test: fields differ in length"):
    ArrayData({"tokens": x}, {"tokens": x, "labels": y[:3]})
  for split in ("train", "test"):
    fields = {"train": {"inputs": x}, "test": {"inputs": x}}
    fields[split] = {**fields[split], MASK: np.ones(10, np.float32)}
    with pytest.raises(ValueError, match=rf"ArrayData\.{split} may not have a field named "
                                         r"'mask' \(reserved\)"):
      ArrayData(**fields)
  tokens = ArrayData({"tokens": np.arange(100)}, {"tokens": np.arange(10)})  # any fields
  assert (tokens.num_train, tokens.num_test) == (100, 10)


def test_a_workload_has_exactly_one_of_data_and_synthetic_batch():
  embedded_w, synthetic_w = get_workload("digits_mlp"), get_workload("synthetic_mlp")
  assert not embedded_w.synthetic and embedded_w.synthetic_batch is None
  assert synthetic_w.synthetic and synthetic_w.synthetic_batch is not None
  with pytest.raises(ValueError, match="exactly one of data"):
    dataclasses.replace(embedded_w, synthetic_batch=synthetic_w.synthetic_batch)
  with pytest.raises(ValueError, match="exactly one of data"):
    dataclasses.replace(embedded_w, data=None)
  with pytest.raises(ValueError, match="exactly one of data"):
    dataclasses.replace(synthetic_w, data=embedded_w.data)


# --- embedded data ----------------------------------------------------------------------

def test_digits_data():
  d = get_workload("digits_mlp").data()
  train_x, train_y = d.train["inputs"], d.train["labels"]
  assert train_x.shape == (1437, 64) and d.test["inputs"].shape == (360, 64)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert 0.0 <= train_x.min() and train_x.max() <= 1.0
  assert set(np.unique(train_y)) == set(range(10))
  np.testing.assert_array_equal(train_x, get_workload("digits_mlp").data().train["inputs"])


@pytest.mark.parametrize("num_train, num_test", [(200, 100), (30, 80), (25, 10)])
def test_mnist1d_generates_the_requested_sizes(tmp_path, num_train, num_test):
  # (30, 80) and (25, 10) used to lose examples to mnist1d's per-class rounding
  # (num_samples // 10 per class) and to int(num_samples * train_split) rounding down.
  w = get_workload("mnist1d_mlp", {"num_train": num_train, "num_test": num_test,
                                   "cache_dir": str(tmp_path)})
  d = w.data()
  assert d.train["inputs"].shape == (num_train, 40) and d.train["labels"].shape == (num_train,)
  assert d.test["inputs"].shape == (num_test, 40) and d.test["labels"].shape == (num_test,)
  assert w.train_size == d.num_train
  assert d.train["inputs"].dtype == np.float32 and d.train["labels"].dtype == np.int32
  assert d.train["labels"].min() >= 0 and d.train["labels"].max() <= 9


def test_mnist1d_second_load_hits_the_cache(tmp_path, monkeypatch):
  options = {"num_train": 200, "num_test": 100, "cache_dir": str(tmp_path)}
  first = get_workload("mnist1d_mlp", options).data()
  cached = os.listdir(tmp_path)
  assert len(cached) == 1 and cached[0].startswith("mnist1d_") and cached[0].endswith(".npz")

  def no_generation(*args, **kwargs):
    raise AssertionError("regenerated instead of reading the cache")

  monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
  second = get_workload("mnist1d_mlp", options).data()
  for split in ("train", "test"):
    for field in ("inputs", "labels"):
      np.testing.assert_array_equal(getattr(first, split)[field], getattr(second, split)[field])
  # Other generation arguments are another cache entry, so they do generate.
  with pytest.raises(AssertionError, match="regenerated"):
    embedded.mnist1d(num_train=200, num_test=100, seed=7, cache_dir=str(tmp_path))


def test_mnist1d_unreadable_cache_is_regenerated(tmp_path):
  first = embedded.mnist1d(num_train=100, num_test=50, cache_dir=str(tmp_path))
  (name,) = os.listdir(tmp_path)
  (tmp_path / name).write_bytes(b"not an npz")
  again = embedded.mnist1d(num_train=100, num_test=50, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first.train["inputs"], again.train["inputs"])


# --- synthetic workloads run a fixed number of steps ------------------------------------

def _synthetic_row(workload, batch, steps, **options):
  c = batchbench.default_config()
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
  assert row["loop_samples_per_sec"] > 0 and row["loop_timed_windows"] >= 1
  assert row["time_ledger"]["eval"] == 0.0 and row["time_to_target_s"] is None
  assert row["memory"]["peak_bytes"] > 0 and row["flops_per_step"] > 0


# --- a user's own workload --------------------------------------------------------------

def _separable_data(num_train=512, num_test=101, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, 4))
  x = rng.normal(size=(num_train + num_test, dim)).astype(np.float32)
  y = np.argmax(x @ w, axis=1).astype(np.int32)
  return ArrayData.classification(x[:num_train], y[:num_train], x[num_train:], y[num_train:])


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
    assert row["steps"] == row["steps_to_target"]  # the target eval ends the trial
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
