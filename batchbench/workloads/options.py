"""Checks for workload options shared by several workload families (precision, BN groups).

A bad value raises ``ConfigError`` naming ``workload_options.<option>``, so that
``resolve()`` reports it like any other invalid field, before anything compiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from batchbench.config.errors import ConfigError, require

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_GROUP_MODES = ("global", "per_device")


def choice(option: str, value: Any, valid: Sequence[Any]) -> Any:
  """``value`` if it is one of ``valid``, else a ``ConfigError`` naming the option."""
  require(value in valid, f"workload_options.{option}", value,
          f"must be one of {', '.join(repr(v) for v in valid)}")
  return value


def compute_dtype(dtype: str) -> Any:
  """The jnp dtype of the ``dtype`` option: ``"float32"`` or ``"bfloat16"`` (compute only;
  parameters stay float32)."""
  return DTYPES[choice("dtype", dtype, tuple(DTYPES))]


def batch_norm_groups(bn_group: str, bn_groups: int) -> int:
  """Ghost batch norm groups from the ``bn_group`` and ``bn_groups`` options.

  ``bn_group="global"``: one group, statistics over the whole (global) batch, which
  under ``jit`` with the batch sharded is a cross-device reduction. ``"per_device"``:
  ``bn_groups`` groups, one per device's shard (``resolve()`` sets ``bn_groups`` to the
  number of devices), as ``pmap``-era batch norm computed them.

  Raises:
    ConfigError: an unknown mode, ``bn_groups`` not a positive integer, or
      ``bn_groups != 1`` with the global mode (it would be silently ignored).
  """
  choice("bn_group", bn_group, BN_GROUP_MODES)
  if isinstance(bn_groups, bool) or not isinstance(bn_groups, int) or bn_groups < 1:
    raise ConfigError("workload_options.bn_groups", bn_groups, "must be a positive integer")
  if bn_group == "global":
    require(bn_groups == 1, "workload_options.bn_groups", bn_groups,
            "applies only with bn_group='per_device' (global batch norm has one group)")
    return 1
  return bn_groups
