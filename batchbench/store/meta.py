"""Provenance: which code, which libraries and which machine produced a number.

``provenance()`` goes into every result row and throughput point; ``run_metadata``
adds the command line and the config for ``<workdir>/run_meta.json``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata as md
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from batchbench import version
from batchbench.fmt import to_jsonable
from batchbench.store.results import atomic_write_text

META_FILE = "run_meta.json"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                         cwd=_PACKAGE_DIR, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def git_state() -> dict[str, Any]:
  """The checkout's commit and whether it has uncommitted changes (None outside git)."""
  commit = _git("rev-parse", "HEAD") or None
  status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
  try:
    return md.version(dist)
  except md.PackageNotFoundError:
    return None


def _host_cpu() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@functools.cache
def provenance() -> dict[str, Any]:
  """Harness and measurement versions, git state, library versions, device, host CPU."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {"batchbench": version.__version__,
          "measurement_version": version.MEASUREMENT_VERSION, **git_state(),
          "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
          "optax": _version("optax"), "python": platform.python_version(),
          "platform": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "host_cpu": _host_cpu(), "cpu_count": os.cpu_count()}


def run_metadata(config: Any, argv: Iterable[str] | None = None) -> dict[str, Any]:
  """The environment record of a run: provenance, versions, XLA flags, command, config."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
      "time_utc": datetime.datetime.now(datetime.UTC).isoformat(),
      **provenance(),
      "versions": {d: _version(d) for d in (
          "batchbench", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
          "ml-collections", "numpy")},
      "local_device_count": jax.local_device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "host": socket.gethostname(),
      "argv": list(argv if argv is not None else sys.argv),
      "config": to_jsonable(config.to_dict() if hasattr(config, "to_dict") else config),
  }


def write_run_meta(workdir: str, meta: dict[str, Any]) -> None:
  atomic_write_text(os.path.join(workdir, META_FILE),
                    json.dumps(to_jsonable(meta), indent=2, sort_keys=True))
