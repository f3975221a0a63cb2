"""The gradient noise scale measured in the train step: the right squared norms, no
second gradient, no change to training, and an honest 'not measured'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from batchbench.config import ConfigError, resolve
from batchbench.core.program import build
from batchbench.runs.trial import run_trial
from batchbench.workloads import get_workload


def digits(**overrides):
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch, c.max_steps, c.target_metric = 64, 16, "none"
  c.eval_every_examples = 256
  c.update_from_flattened_dict(overrides)
  return c


def independent_norms(workload, params, data, indices, groups):
  """|mean gradient|^2 of each group (averaged) and of the whole batch, by plain jax.grad."""
  def mean_loss(p, idx):
    batch = {k: jnp.asarray(a[idx]) for k, a in data.items()}
    batch["mask"] = jnp.ones(len(idx), jnp.float32)
    out = workload.loss(p, {}, batch, jax.random.key(0))
    return out.loss_sum / out.count

  def sq(tree):
    return float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for x in jax.tree.leaves(tree)))

  grads = [jax.grad(mean_loss)(params, g) for g in np.split(indices, groups)]
  whole = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  return np.mean([sq(g) for g in grads]), sq(whole)


@pytest.mark.parametrize("overrides, source, groups", [
    ({"num_devices": 4}, "groups", 4),  # one group per device
    ({"num_devices": 1, "gns.mode": "groups", "gns.groups": 2}, "groups", 2),
    ({"num_devices": 2, "accum_steps": 2}, "micro_batches", 2),
])
def test_the_step_reports_group_and_batch_gradient_norms(overrides, source, groups):
  spec = resolve(digits(**overrides), 8)
  assert spec.gns_source == source and spec.gns_note is None
  assert spec.gns_batches == (64 // groups, 64)
  program = build(spec, flops=False)
  state = program.init_state(spec.seed, spec.lr)
  params = jax.device_get(state.params)
  feed = program.feed(spec.seed)(0, 1)
  _, metrics = program.run(state, feed, 1)
  small, big = np.asarray(metrics["grad_sq_small"])[0], np.asarray(metrics["grad_sq_big"])[0]
  want_small, want_big = independent_norms(program.workload, params,
                                           program.workload.data().train, feed[0].reshape(-1),
                                           groups)
  assert small == pytest.approx(want_small, rel=1e-4)
  assert big == pytest.approx(want_big, rel=1e-4)
  assert small > big  # smaller batches' gradients are noisier


def test_measuring_the_noise_scale_does_not_change_training():
  on = run_trial(resolve(digits(num_devices=8), 8), log=None)
  off = run_trial(resolve(digits(num_devices=8, **{"gns.mode": "off"}), 8), log=None)
  assert on["gns_source"] == "groups" and off["gns_source"] is None
  for a, b in zip(on["eval_history"], off["eval_history"], strict=True):
    for metric in ("loss", "accuracy"):
      np.testing.assert_allclose(a["metrics"][metric], b["metrics"][metric], rtol=1e-5)
  # Recorded at every eval, summarised in the row.
  assert all(h["b_simple"] is not None and h["b_simple"] > 0 for h in on["eval_history"])
  assert on["b_simple"] == on["eval_history"][-1]["b_simple"]
  assert (on["gns_b_small"], on["gns_b_big"]) == (8, 64)
  assert "b_simple" not in off["eval_history"][0] and off["b_simple"] is None
  assert "gns.mode=off" in off["gns_note"]


@pytest.mark.parametrize("overrides", [
    {"num_devices": 4},  # groups: the plain step between measured ones
    {"num_devices": 1, "accum_steps": 2},  # micro-batches
])
def test_the_norms_are_taken_at_every_nth_step_only(overrides):
  every = {"gns.every_steps": 3, "steps_per_call": 8}
  spec = resolve(digits(**overrides, **every), 8)
  assert spec.gns_every == 3
  program = build(spec, flops=False)
  _, metrics = program.run(program.init_state(spec.seed, spec.lr), program.feed(spec.seed)(0))
  for name in ("grad_sq_small", "grad_sq_big"):
    measured = np.isfinite(np.asarray(metrics[name]))
    assert np.flatnonzero(measured).tolist() == [0, 3, 6], name
  # Training is the same whichever steps are measured.
  always = build(resolve(digits(**overrides, **{**every, "gns.every_steps": 1}), 8), flops=False)
  _, plain = always.run(always.init_state(spec.seed, spec.lr), always.feed(spec.seed)(0))
  np.testing.assert_allclose(metrics["loss"], plain["loss"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics["grad_sq_big"])[::3],
                             np.asarray(plain["grad_sq_big"])[::3], rtol=1e-4)
  # A trial's estimate counts the measured steps: 16 steps, every 3rd -> 6.
  row = run_trial(spec, log=None)
  assert (row["gns_every"], row["gns_steps"]) == (3, 6)
  assert row["eval_history"][-1]["gns_steps"] == 6


@pytest.mark.parametrize("overrides", [
    {"num_devices": 4},  # per-device groups
    {"num_devices": 1, "gns.mode": "groups", "gns.groups": 2},  # a device's batch split
    {"num_devices": 1, "accum_steps": 2},  # micro-batches
])
def test_calls_that_start_between_measured_steps_measure_the_same_steps(overrides):
  """The measured steps are the multiples of every_steps wherever calls begin and end,
  so a resumed or eval-split trial trains bit for bit as one long call does."""
  spec = resolve(digits(**overrides, **{"gns.every_steps": 3, "steps_per_call": 8}), 8)
  program = build(spec, flops=False)
  feed = program.feed(spec.seed)
  whole_state, whole = program.run(program.init_state(spec.seed, spec.lr), feed(0))
  state, measured = program.init_state(spec.seed, spec.lr), {}
  for first, n in ((0, 2), (2, 5), (7, 1)):
    state, metrics = program.run(state, feed(first), n)
    big = np.asarray(metrics["grad_sq_big"])[:n]
    assert not np.asarray(metrics["grad_sq_big"])[n:].any()  # rows past the call: 0
    measured.update({first + i: big[i] for i in np.flatnonzero(np.isfinite(big))})
  assert sorted(measured) == [0, 3, 6]
  np.testing.assert_array_equal([measured[s] for s in (0, 3, 6)],
                                np.asarray(whole["grad_sq_big"])[[0, 3, 6]])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(whole_state.params))


def test_one_step_per_call_runs_the_measured_call_at_the_measured_steps_only():
  """K = 1 (conv models on CPU) has no loop to split: two calls, the host picks."""
  spec = resolve(digits(num_devices=4, **{"gns.every_steps": 3, "steps_per_call": 1}), 8)
  program = build(spec, flops=False)
  assert program.train_measured is not None
  feed, state = program.feed(spec.seed), program.init_state(spec.seed, spec.lr)
  with pytest.raises(ValueError, match="step="):
    program.run(state, feed(0))
  measured, losses = [], []
  for step in range(7):
    state, metrics = program.run(state, feed(step), step=step)
    if np.isfinite(np.asarray(metrics["grad_sq_big"])[0]):
      measured.append(step)
    losses.append(float(np.asarray(metrics["loss"])[0]))
  assert measured == [0, 3, 6]
  # The same training as with the norms at every step (one call, no choice to make).
  every = build(resolve(digits(num_devices=4, **{"gns.every_steps": 1,
                                                 "steps_per_call": 1}), 8), flops=False)
  assert every.train_measured is None
  state = every.init_state(spec.seed, spec.lr)
  for step in range(7):
    state, metrics = every.run(state, feed(step))
    np.testing.assert_allclose(np.asarray(metrics["loss"])[0], losses[step], rtol=1e-5)
  # A trial passes the steps: 16 steps, every 3rd measured.
  row = run_trial(spec, log=None)
  assert (row["gns_every"], row["gns_steps"]) == (3, 6)


def test_no_free_source_says_so_instead_of_guessing():
  one = resolve(digits(num_devices=1), 8)
  assert one.gns_source is None and one.gns_batches is None
  assert "one device without accumulation" in one.gns_note
  synthetic = resolve(load_config("synthetic_mlp"), 8)
  assert synthetic.gns_source is None and "synthetic" in synthetic.gns_note


def test_groups_refuse_models_with_batch_statistics():
  from batchbench.models.resnet import GroupBatchNorm  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from batchbench.workloads import (classification_workload,  # pylint: disable=g-import-not-at-top
                                    register_workload)

  class BNMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(16)(x)
      x = GroupBatchNorm()(x, use_running_average=not train)
      return nn.Dense(10)(nn.relu(x))

  base = get_workload("digits_mlp")
  register_workload("gns_bn_mlp")(lambda: classification_workload(
      "gns_bn_mlp", model=BNMLP(), input_shape=(64,), num_classes=10, data=base.data,
      train_size=base.train_size, train_flag=True))
  c = digits(workload="gns_bn_mlp", num_devices=4)
  c.workload_options = {}
  spec = resolve(c, 8)  # auto: per-device groups would split the statistics, so none
  assert spec.gns_source is None and "BatchNorm" in spec.gns_note
  c.gns.mode = "groups"
  with pytest.raises(ConfigError, match="gns.mode"):
    resolve(c, 8)
  c.accum_steps = 2  # micro-batches keep their statistics: the noise scale is free
  assert resolve(c, 8).gns_source == "micro_batches"


@pytest.mark.parametrize("field, value, message", [
    ("gns.mode", "sometimes", "must be one of auto, groups, off"),
    ("gns.ema", 1.5, "must be a number in (0, 1)"),
    ("gns.groups", 3, "dividing the global batch 64"),
    ("gns.every_steps", 0, "must be a positive integer"),
])
def test_bad_noise_scale_settings_name_the_field(field, value, message):
  overrides = {"num_devices": 1, "gns.mode": "groups", field: value}
  with pytest.raises(ConfigError) as e:
    resolve(digits(**overrides), 8)
  assert e.value.field == field and message in str(e.value)
