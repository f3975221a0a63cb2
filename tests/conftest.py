"""Tests run on CPU with 8 fake XLA devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name, arg=None):
  """``get_config(arg)`` of ``configs/<name>.py``, loaded by path as the CLI does."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def pytest_collection_modifyitems(config, items):
  """The tests marked slow first (in file order), then the rest: with several xdist
  workers (scripts/test.sh) they then run beside the others instead of alone at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(name="no_compile")
def fixture_no_compile(monkeypatch):
  """Makes any compile an error: proves validation happens before compilation."""
  from batchbench.core import program  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("compiled before validating its input")
  monkeypatch.setattr(program, "aot", refuse)  # every compile goes through it


@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see tests/conftest.py)"
  return jax.device_count()
