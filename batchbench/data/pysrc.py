"""An offline byte-level LM corpus: the running interpreter's own standard library sources.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (none from ``site-packages`` or
``dist-packages``, nothing outside that directory), in sorted relative-path order, read as
bytes. Tokens are the raw bytes (vocabulary 256). Each file is followed by one NUL byte
(``SEPARATOR``), an end-of-file token: NUL never occurs in the stdlib's sources (0 of 1,790
files on CPython 3.11.7), so it marks file boundaries unambiguously at one byte per file.

The train/test split is by file and depends only on the file's relative path, so it does not
move when files are added or removed: a file is in the test split iff the first 8 bytes of
sha256(relative path), read as a big-endian integer and divided by 2**64, are below
``test_fraction``.

The same interpreter always gives the same corpus; a different Python version gives a
different one (``info["python_version"]`` and ``info["digest"]`` record which).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
import tempfile
import zipfile

import numpy as np

from batchbench.data.embedded import default_cache_dir

SEPARATOR = b"\x00"
EXCLUDED_DIRS = ("site-packages", "dist-packages")
# Bump when the corpus layout changes, so that old cache files are not reused.
FORMAT_VERSION = 1


def stdlib_dir() -> str:
  """The running interpreter's standard library directory."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[tuple[str, int]]:
  """The corpus's files, sorted by relative path.

  Args:
    root: the directory to list; default ``stdlib_dir()``.

  Returns:
    (relative path with "/" separators, size in bytes) for every ``*.py`` file.
  """
  root = root or stdlib_dir()
  real_root = os.path.realpath(root)
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    for name in filenames:
      path = os.path.join(dirpath, name)
      # A symlink could lead outside the stdlib (e.g. into a site directory): skip it.
      if not name.endswith(".py") or not os.path.realpath(path).startswith(real_root + os.sep):
        continue
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      files.append((rel, os.path.getsize(path)))
  files.sort()
  return files


def is_test_file(relpath: str, test_fraction: float) -> bool:
  """Whether a file belongs to the test split (see the module docstring).

  Args:
    relpath: the file's path relative to the stdlib directory, "/"-separated.
    test_fraction: expected fraction of files in the test split.

  Returns:
    True for the test split.
  """
  h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
  return h / 2**64 < test_fraction


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _concatenate(root: str, relpaths: list[str], cap: int | None) -> tuple[np.ndarray, list[str]]:
  """Concatenates files + SEPARATOR in order, stopping once ``cap`` bytes are reached."""
  chunks, used, total = [], [], 0
  for rel in relpaths:
    if cap is not None and total >= cap:
      break
    data = _read_bytes(os.path.join(root, *rel.split("/"))) + SEPARATOR
    chunks.append(data)
    used.append(rel)
    total += len(data)
  stream = b"".join(chunks)[:cap]
  return np.frombuffer(stream, np.uint8).copy(), used


def _build(root: str, files: list[tuple[str, int]], test_fraction: float,
           max_bytes: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
  train_paths = [rel for rel, _ in files if not is_test_file(rel, test_fraction)]
  test_paths = [rel for rel, _ in files if is_test_file(rel, test_fraction)]
  train, train_used = _concatenate(root, train_paths, max_bytes)
  test, test_used = _concatenate(root, test_paths, None if max_bytes is None else max_bytes // 10)
  digest = hashlib.sha256()
  digest.update(train.tobytes())
  digest.update(test.tobytes())
  info = {
      "python_version": f"{platform.python_implementation()} {platform.python_version()}",
      "stdlib_dir": root,
      "num_files": len(train_used) + len(test_used),
      "num_train_files": len(train_used),
      "num_test_files": len(test_used),
      "bytes": int(train.size + test.size),
      "train_bytes": int(train.size),
      "test_bytes": int(test.size),
      "test_fraction": test_fraction,
      "max_bytes": max_bytes,
      "separator": SEPARATOR.hex(),
      "digest": digest.hexdigest(),
      "train_files": train_used,
      "test_files": test_used,
  }
  return train, test, info


def _load(path: str, key: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
  try:
    with np.load(path) as z:
      train, test = z["train"], z["test"]
      info = json.loads(z["info"].tobytes().decode())
  except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile):
    return None  # unreadable cache: the caller rebuilds and overwrites it
  if train.dtype != np.uint8 or test.dtype != np.uint8 or info.get("cache_key") != key:
    return None
  return train, test, info


def _save(path: str, train: np.ndarray, test: np.ndarray, info: dict) -> None:
  cache_dir = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
      np.savez(f, train=train, test=test,
               info=np.frombuffer(json.dumps(info).encode(), np.uint8))
    # Readers see either the old file or the complete new one, never a partial write.
    os.replace(tmp, path)
  except OSError:
    # A cache we cannot write only costs rebuild time.
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def stdlib_corpus(cache_dir: str | None = None, test_fraction: float = 0.05,
                  max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """The stdlib corpus as byte tokens, built once and cached.

  With ``max_bytes``, the train stream is the first ``max_bytes`` bytes of the full train
  stream (the first train files in sorted order, the last one possibly cut short) and the test
  stream likewise the first ``max_bytes // 10`` bytes of the full test stream. Only the files
  needed are read.

  The result is cached as ``pysrc_<key>.npz`` in ``cache_dir`` (default
  ``default_cache_dir()``), where the key digests the Python version, the stdlib path, every
  file's relative path and size, ``test_fraction`` and ``max_bytes``. The file is written
  atomically; an unreadable one is rebuilt; a directory that cannot be written only costs
  rebuild time.

  Args:
    cache_dir: where the ``.npz`` lives.
    test_fraction: expected fraction of files held out, in [0, 1].
    max_bytes: cap on the train stream's length (None: the whole stdlib).

  Returns:
    (train tokens, test tokens, info): 1-D uint8 arrays and a dict with ``python_version``,
    ``stdlib_dir``, ``num_files``, ``num_train_files``, ``num_test_files``, ``bytes``,
    ``train_bytes``, ``test_bytes``, ``digest`` (sha256 of train then test tokens),
    ``cache_key``, ``train_files`` and ``test_files`` (relative paths used by each split).
  """
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"test_fraction={test_fraction} must be in [0, 1].")
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f"max_bytes={max_bytes} must be positive, or None for the whole stdlib.")
  root = stdlib_dir()
  files = stdlib_files(root)
  key_fields = {
      "format": FORMAT_VERSION,
      "python_version": f"{platform.python_implementation()} {platform.python_version()}",
      "stdlib_dir": root,
      "files": files,
      "test_fraction": test_fraction,
      "max_bytes": max_bytes,
  }
  key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir or default_cache_dir(), f"pysrc_{key}.npz")
  if os.path.exists(path):
    cached = _load(path, key)
    if cached is not None:
      return cached
  train, test, info = _build(root, files, test_fraction, max_bytes)
  info["cache_key"] = key
  _save(path, train, test, info)
  return train, test, info
