"""Learning-rate scaling rules and warmup/decay schedules, against hand-computed values."""

import math

import numpy as np
import pytest

from batchbench import scaling


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


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_warmup_then_constant():
  peak, warmup = 0.4, 4
  lr = _values(scaling.make_schedule(peak, warmup, "constant", None), range(10))
  # lr(s) = peak * min(1, (s + 1) / W): step 0 already trains at peak / W.
  expected = [0.1, 0.2, 0.3, 0.4] + [0.4] * 6
  np.testing.assert_allclose(lr, expected, rtol=1e-6)


def test_no_warmup_constant_is_flat():
  lr = _values(scaling.make_schedule(0.3, 0, "constant", None), [0, 1, 100, 10_000])
  np.testing.assert_allclose(lr, 0.3, rtol=1e-7)


def test_warmup_then_cosine():
  peak, warmup, total = 1.0, 2, 10
  steps = list(range(12))
  lr = _values(scaling.make_schedule(peak, warmup, "cosine", total), steps)
  expected = []
  for s in steps:
    t = min(max((s - warmup) / (total - warmup), 0.0), 1.0)
    expected.append(peak * min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t)))
  np.testing.assert_allclose(lr, expected, rtol=1e-5, atol=1e-7)
  assert lr[0] == pytest.approx(0.5) and lr[1] == pytest.approx(1.0)
  assert lr[6] == pytest.approx(0.5, rel=1e-5)  # half way through the decay
  assert lr[10] == pytest.approx(0.0, abs=1e-7) and lr[11] == pytest.approx(0.0, abs=1e-7)


def test_warmup_then_linear_decay():
  peak, warmup, total = 0.8, 4, 12
  lr = _values(scaling.make_schedule(peak, warmup, "linear", total), range(14))
  expected = [0.2, 0.4, 0.6, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0]
  np.testing.assert_allclose(lr, expected, rtol=1e-5, atol=1e-7)


def test_linear_decay_without_warmup():
  lr = _values(scaling.make_schedule(1.0, 0, "linear", 4), range(5))
  np.testing.assert_allclose(lr, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)


def test_schedule_is_jittable_and_matches_python_values():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  schedule = scaling.make_schedule(0.5, 3, "cosine", 20)
  steps = jnp.arange(25)
  np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), _values(schedule, range(25)),
                             rtol=1e-6, atol=1e-7)


def test_schedule_errors():
  with pytest.raises(ValueError, match="schedule='step'"):
    scaling.make_schedule(0.1, 0, "step", 10)
  for decay in ("cosine", "linear"):
    with pytest.raises(ValueError, match="needs a step budget"):
      scaling.make_schedule(0.1, 0, decay, None)
