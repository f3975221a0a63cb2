"""The train state: everything a train call reads and writes, donated between calls."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """Params, mutable model state, optimizer state (holding the LR) and the RNG."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  model_state: Any  # mutable model variables, e.g. BatchNorm statistics ({} if none)
  opt_state: Any  # optax state; opt_state.hyperparams["learning_rate"] is the peak LR
  rng: jax.Array  # key: per-step keys (dropout) and synthetic inputs derive from it
