"""The optimizer: the schedule's *shape* is compiled in, the peak LR is a runtime value.

SGD with momentum, Adam and AdamW are linear in the peak learning rate once the
schedule's shape (warmup, decay, peak 1) is separated from it:
``chain(<optimizer>, scale_by_schedule(shape), scale_by_learning_rate(peak))``.
``optax.inject_hyperparams`` keeps ``peak`` in ``opt_state.hyperparams`` so one
compiled train call serves every learning rate (and seed) of a batch; the shape
depends only on the batch and the budget, which are compiled in.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from batchbench.config import TrialSpec
from batchbench.config.scaling import DECAYS

LR = "learning_rate"


def schedule_shape(warmup_steps: int, decay: str, decay_steps: int | None) -> optax.Schedule:
  """Linear warmup to 1 over ``warmup_steps``, then ``decay`` to 0 at ``decay_steps``.

  shape(s) = min(1, (s + 1) / W) during warmup (step 0 trains at 1/W rather than
  wasting a step at 0), then 1 (constant), (1 + cos(pi t)) / 2 (cosine) or 1 - t
  (linear) with t = (s - W) / (decay_steps - W), clipped to [0, 1].
  """
  if decay not in DECAYS:
    raise ValueError(f"schedule={decay!r}: must be one of {', '.join(DECAYS)}")
  warmup = max(0, int(warmup_steps))
  if decay == "constant":
    after = optax.constant_schedule(1.0)
  else:
    if not decay_steps:
      raise ValueError(f"schedule={decay!r} needs a step budget (max_steps or max_examples)")
    horizon = max(1, decay_steps - warmup)
    after = (optax.cosine_decay_schedule(1.0, horizon) if decay == "cosine"
             else optax.linear_schedule(1.0, 0.0, horizon))
  if warmup == 0:
    return after
  ramp = (optax.linear_schedule(1.0 / warmup, 1.0, warmup - 1) if warmup > 1
          else optax.constant_schedule(1.0))
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(spec: TrialSpec) -> optax.GradientTransformation:
  """The trial's optimizer, with its peak LR (``spec.lr``) held in the optimizer state."""
  shape = schedule_shape(spec.warmup_steps, spec.schedule, spec.max_steps)

  def factory(learning_rate):
    parts = []
    if spec.optimizer == "sgd":
      if spec.weight_decay:
        parts.append(optax.add_decayed_weights(spec.weight_decay))  # L2 on the gradient
      if spec.momentum:
        parts.append(optax.trace(decay=spec.momentum))
    else:
      parts.append(optax.scale_by_adam())
      if spec.optimizer == "adamw":
        parts.append(optax.add_decayed_weights(spec.weight_decay))  # decoupled, x LR
    parts += [optax.scale_by_schedule(shape), optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*parts)

  return optax.inject_hyperparams(factory)(learning_rate=spec.lr)


def with_learning_rate(opt_state: Any, lr: float) -> Any:
  """``opt_state`` with its peak learning rate set to ``lr``."""
  current = opt_state.hyperparams[LR]
  return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                         LR: jnp.asarray(lr, current.dtype)})


def learning_rate(opt_state: Any) -> Any:
  return opt_state.hyperparams[LR]
