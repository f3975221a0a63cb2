"""The throughput phase: warm-up discarded, windows sized and counted as documented, the
point's row consistent with its raw windows, and a point measured once per workdir.

Time comes from a fake clock that only moves when the program's train call runs: each
call advances it by a duration the test chooses, so the expected windows follow from
the documented rule without timing anything real.
"""

import dataclasses
import math
import statistics

import jax
import jaxlib
import pytest

import batchbench
from batchbench import version
from batchbench.config import default_config, resolve
from batchbench.core.program import ProgramCache
from batchbench.runs import throughput
from batchbench.store import results

WARMUP_S = 100.0  # a first call that allocates: must never land in a window
K = 2  # steps per call of the throughput phase


def tiny_spec(**settings):
  c = default_config()
  c.workload_options.hidden = (32,)
  c.global_batch, c.num_devices, c.steps_per_call = 32, 1, K
  c.max_steps, c.target_metric = 8, "none"
  c.throughput.update(settings)
  return resolve(c, 8)


class FakeClock:
  """Seconds that pass only inside the program's train calls."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture(scope="module", name="cache")
def fixture_cache():
  """One compiled throughput program for every test here (settings are not compiled in)."""
  cache = ProgramCache()
  cache.get(tiny_spec())
  return cache


def measure_with(cache, spec, duration):
  """Runs the phase with call ``i`` taking ``duration(i)`` fake seconds.

  Returns:
    The point's row and the number of train calls made.
  """
  program, _ = cache.get(spec)
  real = program.train
  clock, calls = FakeClock(), []

  def train(*args):
    clock.now += duration(len(calls))
    calls.append(clock.now)
    return real(*args)

  program.train = dataclasses.replace(real, fn=train)
  try:
    row = throughput.measure(spec, cache=cache, clock=clock)
  finally:
    program.train = real
  return row, len(calls)


def expected_windows(settings, duration):
  """The documented rule: warm-up calls discarded; one call sizes a window at
  min_seconds / min_windows of whole calls; windows until there are min_windows of them
  and min_seconds of timed work, or max_seconds of it."""
  w = settings["warmup_calls"]
  calls_per_window = math.ceil(settings["min_seconds"] / settings["min_windows"] / duration(w))
  windows, first = [], w + 1
  while ((len(windows) < settings["min_windows"] or sum(windows) < settings["min_seconds"])
         and sum(windows) < settings["max_seconds"]):
    windows.append(sum(duration(i) for i in range(first, first + calls_per_window)))
    first += calls_per_window
  return calls_per_window, windows


def durations(warmup_calls, sizing, steady):
  """Warm-up calls take WARMUP_S, the sizing call ``sizing``, then ``steady`` in a cycle."""
  def duration(i):
    if i < warmup_calls:
      return WARMUP_S
    if i == warmup_calls:
      return sizing
    return steady[(i - warmup_calls - 1) % len(steady)]
  return duration


# Durations are multiples of 1/64 s, so every sum below is exact in floating point.
SCENARIOS = {
    # Steady calls: min_windows windows of min_seconds / min_windows each.
    "steady": ({"warmup_calls": 2, "min_windows": 4, "min_seconds": 1.0},
               durations(2, 1 / 16, [1 / 16])),
    # Uneven calls: windows differ, so the median and IQR are not trivial.
    "uneven": ({"warmup_calls": 3, "min_windows": 5, "min_seconds": 2.0},
               durations(3, 1 / 16, [1 / 16, 1 / 8, 1 / 32, 3 / 32, 5 / 64])),
    # A slow sizing call makes short windows: min_seconds needs more than min_windows.
    "min_seconds_binds": ({"warmup_calls": 1, "min_windows": 3, "min_seconds": 1.0},
                          durations(1, 1 / 4, [1 / 16])),
    # Calls slow down after sizing: max_seconds stops the phase after one window.
    "max_seconds_caps": ({"warmup_calls": 2, "min_windows": 5, "min_seconds": 1.0,
                          "max_seconds": 1.5}, durations(2, 1 / 64, [1 / 2])),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_windows_follow_the_documented_rule(name, cache):
  settings, duration = SCENARIOS[name]
  spec = tiny_spec(**settings)
  settings = spec.throughput_settings  # with the defaults of what the scenario left out
  row, calls = measure_with(cache, spec, duration)
  calls_per_window, windows = expected_windows(settings, duration)

  assert row["calls_per_window"] == calls_per_window
  assert row["window_seconds"] == pytest.approx(windows, rel=1e-12)
  assert row["timed_windows"] == len(windows)
  # Every call after warm-up and sizing is in exactly one window, and nothing else ran.
  assert calls == settings["warmup_calls"] + 1 + len(windows) * calls_per_window
  # No window holds a warm-up call.
  assert max(row["window_seconds"]) < WARMUP_S
  if name == "max_seconds_caps":
    assert row["timed_windows"] < settings["min_windows"]
    assert sum(row["window_seconds"]) >= settings["max_seconds"]
  else:
    assert row["timed_windows"] >= settings["min_windows"]
    assert sum(row["window_seconds"]) >= settings["min_seconds"]
  if name == "min_seconds_binds":
    assert row["timed_windows"] == 8 > settings["min_windows"]  # 8 windows of 1/8 s


@pytest.mark.parametrize("name", ["uneven", "min_seconds_binds"])
def test_point_row_is_consistent_with_its_windows(name, cache):
  settings, duration = SCENARIOS[name]
  spec = tiny_spec(**settings)
  row, _ = measure_with(cache, spec, duration)

  for field in ("workload", "global_batch", "per_device_batch", "accum_steps",
                "num_devices", "samples_per_sec", "samples_per_sec_iqr", "timed_windows",
                "step_time_ms", "compile_s", "compile_cached", "window_samples_per_sec"):
    assert field in row, field
  assert (row["workload"], row["global_batch"], row["per_device_batch"], row["accum_steps"],
          row["num_devices"]) == ("digits_mlp", 32, 32, 1, 1)
  assert row["point_id"] == spec.point_id and row["steps_per_call"] == K
  assert row["settings"] == spec.throughput_settings

  examples = row["calls_per_window"] * K * spec.global_batch
  rates = [examples / s for s in row["window_seconds"]]
  assert row["window_samples_per_sec"] == pytest.approx(rates, rel=1e-12)
  assert row["timed_windows"] == len(rates)
  assert row["samples_per_sec"] == pytest.approx(statistics.median(rates), rel=1e-12)
  q25, _, q75 = statistics.quantiles(rates, n=4, method="inclusive")
  assert row["samples_per_sec_iqr"] == pytest.approx([q25, q75], rel=1e-12)
  assert q25 <= row["samples_per_sec"] <= q75
  steps = row["calls_per_window"] * K
  assert row["step_time_ms"] == pytest.approx(
      1e3 * statistics.median(row["window_seconds"]) / steps, rel=1e-12)
  if name == "uneven":
    assert len(set(rates)) > 1  # the statistics above were over different windows

  # The program came from the cache, compiled once before; its compile time is kept.
  assert row["compile_cached"] is True and row["compile_s"] >= 0
  assert row["program_compile_s"] > 0 and row["traces"] == 1
  assert row["memory"]["peak_bytes"] > 0
  prov = row["provenance"]
  assert (prov["batchbench"], prov["measurement_version"]) == (
      batchbench.__version__, version.MEASUREMENT_VERSION)
  assert (prov["jax"], prov["jaxlib"]) == (jax.__version__, jaxlib.__version__)
  assert "git_commit" in prov and "git_dirty" in prov
  assert row["measurement_version"] == spec.measurement_version


def test_too_few_windows_are_marked(cache):
  settings, duration = SCENARIOS["max_seconds_caps"]
  row, _ = measure_with(cache, tiny_spec(**settings), duration)
  assert row["timed_windows"] == 1
  assert "[only 1 window(s): not a median]" in throughput.format_rate(row)


@pytest.mark.parametrize("windows, marked", [(1, True), (2, True), (3, False), (7, False)])
def test_format_rate_marks_fewer_than_three_windows(windows, marked):
  point = {"samples_per_sec": 123_456.0, "samples_per_sec_iqr": [120_000.0, 125_000.0],
           "timed_windows": windows}
  text = throughput.format_rate(point)
  assert text.startswith("123,456 samples/s (IQR 120,000-125,000, ")
  assert f"{windows} windows" in text
  assert ("not a median" in text) == marked
  assert throughput.format_rate({"samples_per_sec": None}) == "no timed windows"


def test_ensure_point_measures_once_and_then_reads_it(tmp_path):
  workdir = str(tmp_path)
  a = tiny_spec()
  measured = []

  def fake_measure(spec, cache=None, log=None):
    del cache, log
    measured.append(spec.trial_id)
    return {"point_id": spec.point_id, "samples_per_sec": 1000.0 + len(measured)}

  first = throughput.ensure_point(a, workdir, measure_fn=fake_measure)
  assert measured == [a.trial_id] and first["samples_per_sec"] == 1001.0
  assert results.read_points(workdir) == [first]

  def refuse(*args, **kwargs):
    raise AssertionError("re-measured a point that throughput.jsonl already has")

  # The same point (another LR and seed of the batch share it) is read, not measured.
  again = throughput.ensure_point(a, workdir, measure_fn=refuse)
  assert again == first
  other_lr = dataclasses.replace(a, lr=2 * a.lr, lr_multiplier=2.0, seed=5)
  assert other_lr.point_id == a.point_id
  assert throughput.ensure_point(other_lr, workdir, measure_fn=refuse) == first
  # Another batch is another point: measured and appended.
  c = default_config()
  c.workload_options.hidden = (32,)
  c.global_batch, c.num_devices, c.steps_per_call = 64, 1, K
  c.max_steps, c.target_metric = 8, "none"
  b = resolve(c, 8)
  assert b.point_id != a.point_id
  second = throughput.ensure_point(b, workdir, measure_fn=fake_measure)
  assert second["samples_per_sec"] == 1002.0
  assert [p["point_id"] for p in results.read_points(workdir)] == [a.point_id, b.point_id]
  with open(tmp_path / results.THROUGHPUT_FILE, encoding="utf-8") as f:
    assert len(f.read().splitlines()) == 2
