"""Learning-rate scaling rules, and durations in examples turned into steps."""

from __future__ import annotations

import math

LR_RULES = ("none", "linear", "sqrt")
DECAYS = ("constant", "cosine", "linear")


def scaled_lr(base_lr: float, rule: str, global_batch: int, reference_batch: int) -> float:
  """Scales ``base_lr`` (tuned at ``reference_batch``) to ``global_batch``.

  Args:
    base_lr: learning rate at the reference batch.
    rule: ``none`` (lr = base_lr), ``linear`` (base_lr * B / B_ref) or ``sqrt``
      (base_lr * sqrt(B / B_ref)).
    global_batch: examples per optimizer update.
    reference_batch: the batch at which ``base_lr`` holds.

  Returns:
    The scaled learning rate.
  """
  ratio = global_batch / reference_batch
  if rule == "none":
    return base_lr
  if rule == "linear":
    return base_lr * ratio
  if rule == "sqrt":
    return base_lr * math.sqrt(ratio)
  raise ValueError(f"lr_rule={rule!r}: must be one of {LR_RULES}")


def examples_to_steps(examples: int, global_batch: int) -> int:
  """Optimizer steps that cover ``examples`` (rounded up; 0 stays 0)."""
  return -(-examples // global_batch)
