"""Learning-rate scaling rules, and the schedule shape (peak 1) times a runtime peak LR,
against hand-computed values and against optax's own optimizers with the full schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batchbench.config import default_config, resolve, scaling
from batchbench.core import optim


@pytest.mark.parametrize("rule, batch, expected", [
    ("none", 128, 0.1),
    ("linear", 128, 0.4),
    ("sqrt", 128, 0.2),
    ("none", 8, 0.1),
    ("linear", 8, 0.025),
    ("sqrt", 8, 0.05),
    ("linear", 32, 0.1),
    ("sqrt", 32, 0.1),
])
def test_scaled_lr(rule, batch, expected):
  assert scaling.scaled_lr(0.1, rule, batch, 32) == pytest.approx(expected, rel=1e-12)


def test_scaled_lr_rejects_unknown_rule():
  with pytest.raises(ValueError, match=r"lr_rule='cubic'.*none.*linear.*sqrt"):
    scaling.scaled_lr(0.1, "cubic", 64, 32)


@pytest.mark.parametrize("examples, batch, steps", [
    (0, 32, 0), (1, 32, 1), (32, 32, 1), (33, 32, 2), (2048, 256, 8), (2049, 256, 9)])
def test_examples_to_steps_rounds_up(examples, batch, steps):
  assert scaling.examples_to_steps(examples, batch) == steps


def expected_shape(s, warmup, decay, decay_steps):
  """The documented shape, written out: linear warmup to 1 (step 0 at 1/W), then decay to
  0 at ``decay_steps`` with t = (s - W) / (decay_steps - W) clipped to [0, 1]."""
  ramp = min(1.0, (s + 1) / warmup) if warmup else 1.0
  if decay == "constant":
    return ramp
  t = min(max((s - warmup) / (decay_steps - warmup), 0.0), 1.0)
  return ramp * (0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t)


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


@pytest.mark.parametrize("warmup, decay, decay_steps", [
    (0, "constant", None), (4, "constant", None), (1, "constant", None),
    (2, "cosine", 10), (0, "cosine", 7), (1, "cosine", 9),
    (4, "linear", 12), (0, "linear", 4), (1, "linear", 6), (3, "linear", 4),
])
def test_schedule_shape_matches_the_formula(warmup, decay, decay_steps):
  steps = range((decay_steps or 8) + 3)  # past the end of the decay: stays at 0
  got = _values(optim.schedule_shape(warmup, decay, decay_steps), steps)
  want = [expected_shape(s, warmup, decay, decay_steps) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got.max() == pytest.approx(1.0)  # the peak is 1: the LR is a separate factor


def test_schedule_shape_hand_values():
  # Warmup over 4 steps, then linear decay to 0 at step 12 (8 steps of decay).
  np.testing.assert_allclose(
      _values(optim.schedule_shape(4, "linear", 12), range(14)),
      [0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0],
      atol=1e-7)
  cosine = _values(optim.schedule_shape(2, "cosine", 10), range(12))
  assert cosine[0] == pytest.approx(0.5) and cosine[1] == pytest.approx(1.0)
  assert cosine[6] == pytest.approx(0.5, rel=1e-5)  # half way through the decay
  assert cosine[10] == pytest.approx(0.0, abs=1e-7) and cosine[11] == pytest.approx(0.0, abs=1e-7)


def test_schedule_shape_is_jittable_and_matches_python_values():
  shape = optim.schedule_shape(3, "cosine", 20)
  np.testing.assert_allclose(jax.jit(jax.vmap(shape))(jnp.arange(25)),
                             _values(shape, range(25)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_decay_needs_a_step_budget(decay):
  with pytest.raises(ValueError, match="needs a step budget"):
    optim.schedule_shape(0, decay, None)


# --- the optimizer: shape compiled in, peak LR a runtime value ------------------------

def _spec(**fields):
  c = default_config()
  c.workload_options.hidden = (8,)
  c.global_batch, c.num_devices, c.max_steps = 32, 1, 12
  c.warmup_examples, c.schedule = 96, "cosine"  # 3 warmup steps, cosine to 0 at step 12
  for k, v in fields.items():
    c[k] = v
  return resolve(c, 8)


def _reference(spec, lr):
  """optax's own optimizer for ``spec`` with the full schedule lr * shape(s), the shape
  written out with jnp (not the harness's optax composition)."""
  w, d = spec.warmup_steps, spec.max_steps

  def schedule(count):
    ramp = jnp.minimum(1.0, (count + 1) / w)
    t = jnp.clip((count - w) / (d - w), 0.0, 1.0)
    return lr * ramp * 0.5 * (1 + jnp.cos(jnp.pi * t))

  if spec.optimizer == "sgd":
    sgd = optax.sgd(schedule, momentum=spec.momentum)
    return (optax.chain(optax.add_decayed_weights(spec.weight_decay), sgd)
            if spec.weight_decay else sgd)
  if spec.optimizer == "adam":
    return optax.adam(schedule)
  return optax.adamw(schedule, weight_decay=spec.weight_decay)


def _updates(tx, opt_state, grads_seq, params):
  out = []
  update = jax.jit(tx.update)
  for grads in grads_seq:
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


@pytest.mark.parametrize("fields", [
    {"optimizer": "sgd", "momentum": 0.9},
    {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 1e-2},
    {"optimizer": "adam"},
    {"optimizer": "adamw", "weight_decay": 1e-2},
], ids=["sgd_momentum", "sgd_l2", "adam", "adamw"])
def test_injected_peak_lr_times_shape_equals_optax_with_the_full_schedule(fields):
  spec = _spec(**fields)
  assert (spec.warmup_steps, spec.max_steps) == (3, 12)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  grads_seq = [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
                for k, v in params.items()} for _ in range(14)]  # past the end of decay
  tx = optim.make_optimizer(spec)
  state = tx.init(params)
  assert float(optim.learning_rate(state)) == pytest.approx(spec.lr)
  # The same optimizer, its peak LR changed at runtime: what every LR of a batch shares.
  for lr in (spec.lr, 3.7 * spec.lr):
    got = _updates(tx, optim.with_learning_rate(state, lr), grads_seq, params)
    ref = _reference(spec, lr)
    want = _updates(ref, ref.init(params), grads_seq, params)
    for g, w in zip(got, want, strict=True):
      for k in params:
        np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-7)
