"""FLOP counts from XLA's cost analysis of a lowered (not yet optimised) program."""

from __future__ import annotations

from typing import Any


def cost_flops(lowered: Any) -> float | None:
  """``flops`` of ``lowered.cost_analysis()``, or None where the backend gives none.

  The count is of the unoptimised HLO: XLA counts a loop body once whatever its trip
  count, and rematerialisation added later by the compiler is not in it.
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None
