"""Change points of a metric's history: a step in its level that lasts, not one outlier.

A run ``t`` is a change point when each of the ``min_run`` runs from ``t`` on lies beyond
the level of the runs since the previous change point, all on the same side. The level
is their median; "beyond" means further than ``max(threshold x level, z x MAD)`` (MAD
scaled to a standard deviation), so a noisy series needs a larger step. One outlier, or
a step that has lasted fewer than ``min_run`` runs so far, is not a change point. The
search then continues from ``t`` with the new level. No JAX.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MIN_RUN = 3
THRESHOLD = 0.05
Z = 3.0
MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal noise


def change_points(values: Sequence[float], *, min_run: int = MIN_RUN,
                  threshold: float = THRESHOLD, z: float = Z) -> list[dict[str, Any]]:
  """The change points of ``values`` (oldest first).

  Args:
    values: one figure per run, in run order.
    min_run: runs the new level must last, and the fewest runs that set a level.
    threshold: the smallest relative step that counts.
    z: how many noise standard deviations (from the MAD of the current level's runs)
      a step must exceed.

  Returns:
    One dict per change point: ``index`` (the first run at the new level), ``before``
    (the level before), ``after`` (median of the ``min_run`` runs from ``index``) and
    ``change`` (after / before - 1).
  """
  values = [float(v) for v in values]
  out: list[dict[str, Any]] = []
  start, t = 0, min_run
  while t + min_run <= len(values):
    level = statistics.median(values[start:t])
    mad = statistics.median(abs(v - level) for v in values[start:t]) * MAD_TO_SIGMA
    tolerance = max(threshold * abs(level), z * mad)
    after = values[t:t + min_run]
    if all(v > level + tolerance for v in after) or all(v < level - tolerance for v in after):
      new = statistics.median(after)
      out.append({"index": t, "before": level, "after": new,
                  "change": new / level - 1 if level else None})
      start, t = t, t + min_run
    else:
      t += 1
  return out
