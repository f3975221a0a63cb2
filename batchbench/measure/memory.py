"""Memory: XLA's compiled figures, the runtime's device peak, and the default budget.

XLA's ``memory_analysis()`` of a compiled program gives per-device argument,
output, alias and temp bytes; the peak is computed from those parts (on CPU the
runtime's own ``peak_memory_in_bytes`` omits temporaries).

The runtime's ``peak_bytes_in_use`` (GPU/TPU) is a high-water mark over the
process's life and cannot be reset, so ``PeakTracker`` attributes it to a trial
only when the trial raised it: otherwise the trial's own peak is unknown (below an
earlier, larger one in the same process) and is left empty, never inherited.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MEMORY_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
               "generated_code_bytes", "peak_bytes")
DEVICE_MEMORY_MARGIN = 0.10  # the default budget leaves this fraction of device memory free


def compiled_memory(compiled: Any) -> dict[str, int | None]:
  """XLA's byte counts for a compiled program (per device); None where not reported.

  ``peak_bytes`` = argument + output + temp - alias.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends may not implement it)
    m = None
  if m is None:
    return dict.fromkeys(MEMORY_KEYS)
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes),
         "generated_code_bytes": int(m.generated_code_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def _stats(device: Any) -> dict[str, Any]:
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    return {}


def device_peaks(devices: Iterable[Any]) -> list[int] | None:
  """Each device's ``peak_bytes_in_use``, or None where the runtime reports none (CPU)."""
  peaks = [_stats(d).get("peak_bytes_in_use") for d in devices]
  return None if any(p is None for p in peaks) or not peaks else [int(p) for p in peaks]


class PeakTracker:
  """The device peak of the work between ``start()`` and ``stop()``, where knowable."""

  def __init__(self, devices: Iterable[Any]):
    self._devices = list(devices)
    self._before: list[int] | None = None

  def start(self) -> None:
    self._before = device_peaks(self._devices)

  def stop(self) -> tuple[int | None, str | None]:
    """Returns ``(peak bytes, None)``, ``(peak bytes, note)`` when only some devices'
    high-water marks rose (the peak is theirs), or ``(None, why not)``."""
    after = device_peaks(self._devices)
    if after is None:
      return None, "the runtime reports no device memory statistics"
    if self._before is None:
      return max(after), None
    risen = [a for a, b in zip(after, self._before, strict=True) if a > b]
    if not risen:
      return None, ("device peak not attributable: this work stayed below the process's "
                    "earlier high-water mark (run with --isolation=process to measure it)")
    if len(risen) < len(after):
      return max(risen), (f"measured on {len(risen)} of {len(after)} devices: the others "
                          "stayed below an earlier high-water mark")
    return max(after), None


def device_budget_bytes(devices: Iterable[Any]) -> int | None:
  """The smallest ``bytes_limit`` the runtime reports over ``devices``, minus 10%.

  Returns None where the runtime reports no memory (CPU).
  """
  limits = [_stats(d).get("bytes_limit") for d in devices]
  limits = [int(x) for x in limits if x]
  return int(min(limits) * (1 - DEVICE_MEMORY_MARGIN)) if limits else None
