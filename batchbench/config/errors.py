"""``ConfigError``: bad input, named by field, value and what would be valid."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """An invalid config field or flag: names the field, the value and what is valid."""

  def __init__(self, field: str, value: Any = None, valid: str | None = None):
    self.field, self.value, self.valid = field, value, valid
    # ``valid`` None: ``field`` is a whole message. ml_collections' config_flags re-raises
    # an error from ``get_config`` as ``type(e)(message)``, and pickling does the same.
    super().__init__(field if valid is None else f"invalid config: {field}={value!r}: {valid}")


def require(ok: bool, field: str, value: Any, valid: str) -> None:
  """Raises ``ConfigError(field, value, valid)`` unless ``ok``."""
  if not ok:
    raise ConfigError(field, value, valid)


def positive_int(value: Any, field: str, *, optional: bool = False) -> int | None:
  """``value`` if it is a positive int (None allowed when ``optional``), else an error."""
  if value is None and optional:
    return None
  require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
          "must be a positive integer")
  return value
