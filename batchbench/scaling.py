"""Learning-rate scaling rules and warmup/decay schedules.

Durations are given in examples, so warmup covers the same amount of data at every
batch size; they are converted to optimizer steps here, once per trial.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

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


def make_schedule(peak_lr: float, warmup_steps: int, decay: str,
                  decay_steps: int | None) -> optax.Schedule:
  """Linear warmup to ``peak_lr`` over ``warmup_steps``, then ``decay``.

  lr(s) = peak_lr * min(1, (s + 1) / warmup_steps) * d(t), with
  t = clip((s - warmup_steps) / (decay_steps - warmup_steps), 0, 1) and
  d = 1 (constant), (1 + cos(pi t)) / 2 (cosine) or 1 - t (linear). Step 0 thus
  trains at peak_lr / warmup_steps rather than wasting a step at 0.

  Args:
    peak_lr: learning rate reached at the end of warmup.
    warmup_steps: steps of linear warmup (0 for none).
    decay: ``constant``, ``cosine`` or ``linear``.
    decay_steps: total steps of the run (the decay horizon), needed unless
      ``decay`` is ``constant``.

  Returns:
    An optax schedule: step -> learning rate.
  """
  if decay not in DECAYS:
    raise ValueError(f"schedule={decay!r}: must be one of {DECAYS}")
  if decay != "constant" and not decay_steps:
    raise ValueError(f"schedule={decay!r} needs a step budget (max_steps or max_examples)")
  warmup = max(0, int(warmup_steps))
  horizon = max(1, (decay_steps or 0) - warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(peak_lr, jnp.float32)
    if warmup:
      lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
    if decay != "constant":
      t = jnp.clip((step - warmup) / horizon, 0.0, 1.0)
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * t)) if decay == "cosine" else 1.0 - t
      lr = lr * factor
    return lr

  return schedule
