"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, from two batch sizes at once.

McCandlish et al. 2018, appendix A.1. With squared norms of gradient *means* over
batches of two sizes B_small < B_big taken at the same step,

  E|G_B|^2 = |G|^2 + tr(Sigma) / B,

so the unbiased estimators are

  |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big).

In a train step both come free: |G_small|^2 is the mean over the step's groups
(devices, or accumulation micro-batches) of each group's squared norm, |G_big|^2
the squared norm of the step's whole gradient. Each estimator is smoothed with its
own exponential moving average (bias-corrected, as Adam's moments are) and the
ratio is taken after smoothing: a ratio of noisy per-step estimates, or an average
of such ratios, is biased (|G|^2 is often near zero in one step). While the smoothed
|G|^2 is not positive (the noise swamps the signal at these batch sizes), there is
no estimate (None) rather than a huge ratio. The plain estimator assumes SGD-like
updates; it is reported for any optimizer as a property of the gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

DEFAULT_EMA = 0.95
_TINY = 1e-30


def unbiased(sq_small: float, sq_big: float, b_small: float,
             b_big: float) -> tuple[float, float]:
  """One step's unbiased estimates ``(|G|^2, tr(Sigma))`` from the two squared norms."""
  if not b_big > b_small > 0:
    raise ValueError(f"need 0 < B_small < B_big, got {b_small} and {b_big}")
  g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
  trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
  return g2, trace


@dataclasses.dataclass
class NoiseScale:
  """Bias-corrected EMAs of |G|^2 and tr(Sigma); ``b_simple`` is their ratio.

  JSON-able (a trial's loop state holds one, so it survives a resume).
  """

  b_small: float
  b_big: float
  decay: float = DEFAULT_EMA
  g2: float = 0.0  # raw (not bias-corrected) EMAs
  trace: float = 0.0
  steps: int = 0

  def update(self, sq_small: Iterable[float], sq_big: Iterable[float]) -> None:
    """Adds steps' squared norms (parallel sequences, one entry per step)."""
    for small, big in zip(sq_small, sq_big, strict=True):
      if not (math.isfinite(small) and math.isfinite(big)):
        continue
      g2, trace = unbiased(small, big, self.b_small, self.b_big)
      self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
      self.trace = self.decay * self.trace + (1 - self.decay) * trace
      self.steps += 1

  def estimates(self) -> tuple[float, float] | None:
    """Bias-corrected ``(|G|^2, tr(Sigma))``, or None before the first step."""
    if not self.steps:
      return None
    correction = 1 - self.decay ** self.steps
    return self.g2 / correction, self.trace / correction

  @property
  def b_simple(self) -> float | None:
    """tr(Sigma) / |G|^2 of the smoothed estimates; None before any step or while the
    smoothed |G|^2 is not positive."""
    est = self.estimates()
    if est is None or est[0] <= _TINY:
      return None
    g2, trace = est
    return max(trace, 0.0) / g2
