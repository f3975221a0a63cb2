"""The gradient-noise-scale estimators are unbiased where the truth is known."""

import numpy as np
import pytest

from batchbench.analysis.noise import NoiseScale, unbiased


def linear_regression_truth(u, sigma):
  """|G|^2 and tr(Sigma) of per-example gradients of 1/2 (x.w - y)^2 at w = w* + u, for
  x ~ N(0, I_d), y = x.w* + N(0, sigma^2): G = u, Sigma = (|u|^2 + sigma^2) I + u u^T
  (Isserlis' theorem)."""
  d = u.size
  g2 = float(u @ u)
  return g2, d * (g2 + sigma**2) + g2


def squared_norms(rng, u, sigma, b_big, groups):
  """|G_small|^2 (mean over groups of each group's mean-gradient norm^2) and |G_big|^2."""
  x = rng.standard_normal((b_big, u.size))
  residual = x @ u - sigma * rng.standard_normal(b_big)
  grads = x * residual[:, None]  # per-example gradients
  group_means = grads.reshape(groups, b_big // groups, -1).mean(axis=1)
  sq_small = float(np.mean(np.sum(group_means**2, axis=1)))
  sq_big = float(np.sum(grads.mean(axis=0) ** 2))
  return sq_small, sq_big


def test_unbiased_estimators_recover_the_known_gradient_statistics():
  rng = np.random.default_rng(0)
  u, sigma, b_big, groups = np.full(8, 0.5), 1.0, 64, 8
  true_g2, true_trace = linear_regression_truth(u, sigma)
  draws = [unbiased(*squared_norms(rng, u, sigma, b_big, groups), b_big / groups, b_big)
           for _ in range(4000)]
  g2, trace = np.mean(draws, axis=0)
  se = np.std(draws, axis=0) / np.sqrt(len(draws))
  assert abs(g2 - true_g2) < 4 * se[0]
  assert abs(trace - true_trace) < 4 * se[1]
  # The naive estimates are biased: |G_big|^2 overstates |G|^2 by tr(Sigma) / B_big.
  naive = np.mean([squared_norms(rng, u, sigma, b_big, groups)[1] for _ in range(2000)])
  assert naive == pytest.approx(true_g2 + true_trace / b_big, rel=0.05)
  assert naive > true_g2 * 1.15  # (20% here: tr(Sigma) / B_big = 0.41, |G|^2 = 2)


def test_smoothed_ratio_converges_to_b_simple():
  rng = np.random.default_rng(1)
  u, sigma, b_big, groups = np.full(8, 0.5), 1.0, 64, 4
  true_g2, true_trace = linear_regression_truth(u, sigma)
  noise = NoiseScale(b_small=b_big / groups, b_big=b_big, decay=0.99)
  for _ in range(3000):
    small, big = squared_norms(rng, u, sigma, b_big, groups)
    noise.update([small], [big])
  assert noise.b_simple == pytest.approx(true_trace / true_g2, rel=0.15)


def test_bias_correction_and_no_estimate_while_the_signal_is_not_positive():
  noise = NoiseScale(b_small=8, b_big=32, decay=0.9)
  assert noise.b_simple is None and noise.estimates() is None
  g2, trace = 2.0, 100.0  # exact squared norms for these statistics
  small, big = g2 + trace / 8, g2 + trace / 32
  noise.update([small], [big])
  # One step: the bias-corrected EMAs equal the step's estimates exactly.
  assert noise.estimates() == pytest.approx((g2, trace))
  assert noise.b_simple == pytest.approx(trace / g2)
  noisy = NoiseScale(b_small=8, b_big=32)
  noisy.update([1.0], [2.0])  # the big batch's norm above the small one's: |G|^2 > 0 but
  assert noisy.b_simple == 0.0  # tr(Sigma) < 0 is clamped to 0
  negative = NoiseScale(b_small=8, b_big=32)
  negative.update([10.0], [0.5])  # |G|^2 estimate < 0
  assert negative.b_simple is None
  noisy.update([float("nan")], [1.0])  # non-finite steps are skipped
  assert noisy.steps == 1


def test_batch_sizes_must_differ():
  with pytest.raises(ValueError, match="B_small < B_big"):
    unbiased(1.0, 1.0, 32, 32)
