"""The one home of small formatting and parsing helpers shared by every command.

Numbers, byte counts and tables for people; byte sizes from people; values for JSON.
Nothing here imports JAX.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Sequence
from typing import Any

# Raised for bad user input; defined in config.errors, re-exported here lazily to keep
# this module free of package imports (config imports fmt).
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = ("a positive size with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
             "e.g. 2GiB or 512MiB")


def number(value: Any) -> str:
  """A number for a table cell: ints with separators, floats to 3 significant digits."""
  if value is None:
    return "-"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if not math.isfinite(value) or value == 0:
    return f"{value:g}"
  return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def batches(values: Sequence[Any]) -> str:
  """``batch 1,024`` or ``batches 32, 64``: global batches named in a sentence."""
  return f"batch{'es' if len(values) > 1 else ''} {', '.join(number(v) for v in values)}"


def format_bytes(n: float | None) -> str:
  """A byte count for people, e.g. ``"12.3 MiB"``; None as ``"-"``."""
  if n is None:
    return "-"
  if abs(n) < 1024:
    return f"{n:.0f} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "TiB":
      break
  return f"{n:.1f} {unit}"


def parse_bytes(text: str, field: str = "memory_budget") -> int:
  """Parses a memory size with a unit, e.g. ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"``.

  Units are case-insensitive: B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB
  (powers of 1024). A bare number is rejected: "1000000" is too easily meant as
  something other than bytes.

  Raises:
    ConfigError: naming ``field``, for anything else (no unit, an unknown unit,
      zero, a negative size, less than one byte, not a size at all).
  """
  from batchbench.config.errors import ConfigError  # pylint: disable=g-import-not-at-top

  match = _SIZE.match(text) if isinstance(text, str) else None
  if match is None:
    raise ConfigError(field, text, SIZE_HELP)
  amount, unit = decimal.Decimal(match.group(1)), match.group(2).lower()
  if not unit:
    raise ConfigError(field, text, f"a unit is required: {SIZE_HELP}")
  if unit not in _BYTE_UNITS:
    raise ConfigError(field, text, f"unknown unit {match.group(2)!r}: {SIZE_HELP}")
  if amount <= 0:
    raise ConfigError(field, text, f"must be positive: {SIZE_HELP}")
  value = int(amount * _BYTE_UNITS[unit])
  if value < 1:
    raise ConfigError(field, text, f"must be at least one byte: {SIZE_HELP}")
  return value


def first_line(text: str | None, limit: int = 80) -> str:
  """The first line of ``text``, cut to ``limit`` characters with an ellipsis."""
  lines = (text or "").strip().splitlines()
  line = lines[0] if lines else ""
  return line if len(line) <= limit else line[:limit - 1] + "…"


def format_table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
  """Right-aligned plain-text columns, two spaces apart, trailing blanks stripped."""
  rows = [[str(c) for c in head]] + [[str(c) for c in r] for r in body]
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                   for r in rows)


def to_jsonable(value: Any) -> Any:
  """``value`` as plain JSON types: numpy/jax scalars and arrays become Python values,
  tuples become lists, and NaN/inf become None (they are not valid JSON)."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # numpy / jax arrays and scalars: convert their elements too
    return to_jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def duration(seconds: float) -> str:
  """``"42s"`` or ``"3m05s"`` for progress lines."""
  seconds = max(0, int(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
