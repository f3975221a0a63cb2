"""Byte-token language-model examples: fixed windows of a token stream, and text as bytes.

An example is a window of ``seq_len + 1`` consecutive tokens; the model reads the first
``seq_len`` (``inputs``) and predicts the last ``seq_len`` (``targets``, the same tokens
shifted by one). Windows of a stream are cut at a fixed stride of ``seq_len``: window
``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]``, so consecutive windows
share one token (the last target of window ``i`` is the first input of ``i + 1``) and
every token but the first is predicted exactly once per epoch.
"""

from __future__ import annotations

import numpy as np

from batchbench.data.transforms import Example, Transform

# End-of-text token appended to each text, as in ``data.pysrc`` (NUL between files).
END_OF_TEXT = 0


def num_windows(stream_length: int, seq_len: int) -> int:
  """How many full windows (``seq_len + 1`` tokens at stride ``seq_len``) a stream holds."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be at least 1")
  return max(0, (stream_length - 1) // seq_len)


def window_offsets(indices, seq_len: int, xp=np):
  """Positions in the stream of the tokens of windows ``indices``: shape (..., seq_len + 1).

  ``xp`` is ``numpy`` or ``jax.numpy`` (on the device, inside a compiled step).
  """
  return indices[..., None] * seq_len + xp.arange(seq_len + 1)


def split_window(window, xp=np) -> dict:
  """``{"inputs": window[..., :-1], "targets": window[..., 1:]}``, as int32."""
  window = window.astype(xp.int32)
  return {"inputs": window[..., :-1], "targets": window[..., 1:]}


def windows(stream: np.ndarray, seq_len: int, count: int | None = None) -> dict[str, np.ndarray]:
  """The first ``count`` windows of ``stream`` (all full windows when None), on the host.

  Returns:
    ``{"inputs", "targets"}``: int32 arrays of shape (count, seq_len).
  """
  n = num_windows(len(stream), seq_len)
  n = n if count is None else min(n, count)
  return split_window(np.asarray(stream)[window_offsets(np.arange(n), seq_len)])


def byte_window(seq_len: int, field: str = "text") -> Transform:
  """A host transform: a text (``str`` or UTF-8 ``bytes``) -> one window of byte tokens.

  The text's bytes followed by ``END_OF_TEXT``, cut to ``seq_len + 1`` tokens and padded
  with zeros; ``weights`` is 1 for each target that is a real token (padding is not
  predicted). The text's first byte is never a target (there is no start token).

  Returns:
    ``example -> {"inputs", "targets"}`` (int32, shape (seq_len,)) and ``"weights"``
    (float32, shape (seq_len,)).
  """
  def apply(example: Example) -> Example:
    text = example[field]
    if isinstance(text, np.ndarray):
      text = text.item()
    if isinstance(text, str):
      text = text.encode("utf-8")
    tokens = np.frombuffer(bytes(text) + bytes([END_OF_TEXT]), np.uint8)[:seq_len + 1]
    window = np.zeros(seq_len + 1, np.int32)
    window[:len(tokens)] = tokens
    weights = np.zeros(seq_len, np.float32)
    weights[:len(tokens) - 1] = 1.0
    return {**split_window(window), "weights": weights}
  return apply
