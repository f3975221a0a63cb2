"""Timing arithmetic under a fake clock: exact answers, in isolation and inside a trial."""

import dataclasses
import statistics

import numpy as np
import pytest
from conftest import load_config

from batchbench import config as config_lib
from batchbench.core.program import ProgramCache
from batchbench.data.feed import LookaheadFeed
from batchbench.measure.timing import BUCKETS, TimeLedger, Window, WindowTimer, window_stats
from batchbench.runs import trial


class ManualClock:
  """Reading it costs nothing; only ``advance`` moves it (binary fractions keep sums exact)."""

  def __init__(self, start=100.0):
    self.now = start

  def advance(self, seconds):
    self.now += seconds

  def __call__(self):
    return self.now


class ScriptedClock:
  """Returns the given times in order."""

  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


# --- TimeLedger -------------------------------------------------------------------------

def test_ledger_measures_into_buckets():
  ledger = TimeLedger(ScriptedClock([0.0, 1.5, 2.0, 2.25, 10.0, 13.0]))
  with ledger.measure("compile"):
    pass
  with ledger.measure("train"):
    pass
  with ledger.measure("train"):
    pass
  assert ledger.seconds["compile"] == 1.5
  assert ledger.seconds["train"] == 0.25 + 3.0
  assert set(ledger.as_dict()) == set(BUCKETS)
  assert ledger.wall == 4.75


def test_ledger_input_wait_is_inside_train_and_not_double_counted():
  ledger = TimeLedger(ManualClock())
  ledger.add("train", 10.0)
  ledger.add("input_wait", 4.0)
  ledger.add("eval", 2.0)
  assert ledger.wall == 12.0


def test_ledger_measures_even_when_the_body_raises():
  ledger = TimeLedger(ScriptedClock([5.0, 7.5]))
  with pytest.raises(RuntimeError):
    with ledger.measure("eval"):
      raise RuntimeError("boom")
  assert ledger.seconds["eval"] == 2.5


def test_ledger_keeps_its_seconds_in_a_shared_dict():
  """A trial's loop state owns the dict: a checkpoint saves it, a resumed ledger adds to it."""
  saved = {"train": 3.0, "compile": 1.0}  # as restored from a checkpoint: buckets missing
  first = TimeLedger(ManualClock(), saved)
  assert first.seconds is saved
  assert saved == {**dict.fromkeys(BUCKETS, 0.0), "train": 3.0, "compile": 1.0}
  first.add("train", 2.0)
  assert saved["train"] == 5.0  # written through, not copied
  resumed = TimeLedger(ManualClock(), saved)  # a second ledger on the same dict
  resumed.add("eval", 0.5)
  assert first.seconds["eval"] == 0.5 and resumed.seconds["train"] == 5.0
  assert resumed.wall == first.wall == 6.5
  snapshot = resumed.as_dict()
  resumed.add("train", 1.0)
  assert snapshot["train"] == 5.0  # as_dict is a copy
  own = TimeLedger(ManualClock())
  own.add("train", 1.0)
  assert TimeLedger(ManualClock()).seconds["train"] == 0.0  # no dict shared by default


def test_ledger_rejects_unknown_bucket():
  ledger = TimeLedger(ManualClock())
  with pytest.raises(KeyError, match="'trian'"):
    ledger.add("trian", 1.0)
  with pytest.raises(KeyError, match="'trian'"):
    with ledger.measure("trian"):
      pass


# --- window_stats -----------------------------------------------------------------------

def _expected_stats(windows):
  """The statistics computed directly: stdlib quantiles (inclusive = linear interpolation)."""
  kept = [w for w in windows if w.seconds > 0 and w.steps > 0]
  rates = [w.examples / w.seconds for w in kept]
  q25, q50, q75 = statistics.quantiles(rates, n=4, method="inclusive")
  return {"samples_per_sec": q50, "iqr": [q25, q75],
          "step_time_ms": statistics.median(1e3 * w.seconds / w.steps for w in kept),
          "timed_windows": len(kept), "rates": rates}


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10])
def test_window_stats_against_a_direct_computation(n):
  rng = np.random.default_rng(n)
  windows = [Window(int(rng.integers(64, 4096)), int(rng.integers(1, 9)),
                    float(rng.uniform(0.01, 2.0))) for _ in range(n)]
  stats = window_stats(windows)
  want = _expected_stats(windows)
  assert stats["samples_per_sec"] == pytest.approx(want["samples_per_sec"], rel=1e-12)
  assert stats["samples_per_sec_iqr"] == pytest.approx(want["iqr"], rel=1e-12)
  assert stats["step_time_ms"] == pytest.approx(want["step_time_ms"], rel=1e-12)
  assert stats["timed_windows"] == n
  assert stats["window_samples_per_sec"] == pytest.approx(want["rates"], rel=1e-12)


def test_window_stats_leave_out_windows_without_time_or_steps():
  good = [Window(100, 4, 1.0), Window(100, 4, 2.0), Window(100, 4, 4.0)]
  stats = window_stats([Window(100, 4, 0.0), *good, Window(100, 0, 1.0)])
  assert stats == window_stats(good)
  assert stats["timed_windows"] == 3 and stats["samples_per_sec"] == 50.0
  assert window_stats([Window(100, 4, 0.0)]) == {
      "samples_per_sec": None, "samples_per_sec_iqr": None, "step_time_ms": None,
      "timed_windows": 0, "window_samples_per_sec": []}


# --- WindowTimer ------------------------------------------------------------------------

def _timer_with_windows(durations, examples=100, steps=4, warmup_windows=1):
  times = []
  t = 0.0
  for d in durations:
    times += [t, t + d]
    t += d + 1.0
  timer = WindowTimer(ScriptedClock(times), warmup_windows=warmup_windows)
  for _ in durations:
    timer.start()
    timer.stop(examples, steps)
  return timer


def test_window_timer_returns_window_seconds():
  timer = WindowTimer(ScriptedClock([3.0, 3.75]))
  timer.start()
  assert timer.stop(64, 2) == 0.75
  assert timer.windows == [Window(64, 2, 0.75)]


def test_window_timer_discards_warmup_and_reports_median_and_iqr():
  # Warm-up window 100 s (discarded), then rates 100, 50, 25, 12.5 samples/s.
  timer = _timer_with_windows([100.0, 1.0, 2.0, 4.0, 8.0])
  s = timer.summary()
  assert s["timed_windows"] == 4
  # Linear-interpolated percentiles of [12.5, 25, 50, 100].
  assert s["samples_per_sec"] == pytest.approx(37.5)
  assert s["samples_per_sec_iqr"] == pytest.approx([21.875, 62.5])
  # Step times 250, 500, 1000, 2000 ms -> median 750 ms.
  assert s["step_time_ms"] == pytest.approx(750.0)
  assert s["window_samples_per_sec"] == pytest.approx([100.0, 50.0, 25.0, 12.5])


def test_window_timer_warmup_count_is_respected():
  timer = _timer_with_windows([100.0, 50.0, 1.0, 1.0, 1.0], warmup_windows=2)
  s = timer.summary()
  assert s["timed_windows"] == 3
  assert s["samples_per_sec"] == pytest.approx(100.0)
  assert s["samples_per_sec_iqr"] == pytest.approx([100.0, 100.0])


def test_window_timer_with_only_warmup_windows_uses_them():
  timer = _timer_with_windows([2.0])
  s = timer.summary()
  assert s["timed_windows"] == 1 and s["samples_per_sec"] == pytest.approx(50.0)


def test_window_timer_appends_to_a_given_list():
  """A trial passes its loop state's list: windows restored from a checkpoint count."""
  restored = [Window(100, 4, 100.0), Window(100, 4, 1.0)]  # a warm-up, then 100/s
  clock = ManualClock()
  timer = WindowTimer(clock, windows=restored)
  assert timer.windows is restored
  for seconds in (2.0, 4.0):
    timer.start()
    clock.advance(seconds)
    timer.stop(100, 4)
  assert restored[2:] == [Window(100, 4, 2.0), Window(100, 4, 4.0)]
  assert timer.steady() == restored[1:]
  assert timer.summary()["samples_per_sec"] == pytest.approx(50.0)  # of 100, 50, 25
  assert WindowTimer(clock).windows == []  # a fresh list by default


def test_window_timer_without_windows():
  s = WindowTimer(ManualClock()).summary()
  assert s == {"samples_per_sec": None, "samples_per_sec_iqr": None, "step_time_ms": None,
               "timed_windows": 0, "window_samples_per_sec": []}


def test_window_timer_stop_without_start_raises():
  timer = WindowTimer(ManualClock())
  with pytest.raises(RuntimeError, match="without start"):
    timer.stop(1, 1)
  timer.start()
  timer.stop(1, 1)
  with pytest.raises(RuntimeError, match="without start"):
    timer.stop(1, 1)


# --- run_trial under a fake clock -------------------------------------------------------
# JAX never reads the injected clock. The clock moves only where the work is: compiling,
# setting up the state, building a call's inputs, each train call and each eval, by set
# amounts. Every bucket, window and time to target then has an exact expected value, and a
# window that took in an eval (or compile) would be visibly off.

COMPILE_S, SETUP_S, INPUT_S, CALL_S, EVAL_S = 16.0, 4.0, 0.25, 1.0, 64.0


def _timed_cache(spec, clock):
  """A program cache holding ``spec``'s program, its work advancing ``clock``."""
  cache = ProgramCache()
  program, _ = cache.get(spec)
  get = cache.get

  def timed_get(spec, **kwargs):
    clock.advance(COMPILE_S)
    return get(spec, **kwargs)

  def timed(seconds, fn):
    def run(*args):
      clock.advance(seconds)
      return fn(*args)
    return run

  feed, evaluate = program.feed, program.evaluate
  cache.get = timed_get
  program.train = dataclasses.replace(program.train, fn=timed(CALL_S, program.train.fn))
  program.evaluate = timed(EVAL_S, evaluate)
  program.init_state = timed(SETUP_S, program.init_state)
  # The program's own feed, never prefetched, so every call of it builds inputs.
  program.feed = lambda seed: LookaheadFeed(timed(INPUT_S, feed(seed)))
  return cache


def test_trial_ledger_windows_and_time_to_target_are_exact_under_fake_clock():
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 32
  c.eval_every_examples = 256  # an eval every 8 steps
  c.steps_per_call = 2  # 4 calls per timing window
  c.target_value = 0.8
  c.stop_at_target = True
  spec = config_lib.resolve(c, 8)
  assert (spec.eval_every_steps, spec.steps_per_call) == (8, 2)
  clock = ManualClock()
  row = trial.run_trial(spec, clock=clock, log=None, cache=_timed_cache(spec, clock),
                        point={"step_time_ms": 2.5})

  assert row["status"] == "ok"
  steps = row["steps_to_target"]
  assert steps is not None and steps == row["steps"] and steps % 8 == 0
  windows = steps // 8
  # Each call's inputs are built while the previous call runs (inside the window, not a
  # wait); only the very first call waited for its inputs.
  window_s = 4 * (CALL_S + INPUT_S)
  ledger = row["time_ledger"]
  assert ledger["compile"] == COMPILE_S and ledger["setup"] == SETUP_S
  assert ledger["input_wait"] == INPUT_S
  assert ledger["train"] == windows * window_s + INPUT_S
  # Each eval evaluates the test set and as many training examples (the train-test gap);
  # the target eval ends the trial: no extra eval.
  assert ledger["eval"] == windows * 2 * EVAL_S
  assert ledger["checkpoint"] == 0.0

  # The loop's own time to target is the train bucket at the eval that met the target;
  # the headline one is steps to target x the throughput point's step time.
  assert row["loop_time_to_target_s"] == ledger["train"]
  assert row["time_to_target_s"] == steps * 2.5 / 1e3
  history = row["eval_history"]
  assert [h["step"] for h in history] == list(range(8, steps + 1, 8))
  assert [h["train_s"] for h in history] == [(i + 1) * window_s + INPUT_S
                                             for i in range(windows)]
  assert history[-1]["metrics"]["accuracy"] >= 0.8
  assert all(h["metrics"]["accuracy"] < 0.8 for h in history[:-1])
  assert row["final_eval"] == history[-1]["metrics"]

  # Wall time is every bucket; the target was met at the very end.
  assert row["wall_s"] == COMPILE_S + SETUP_S + ledger["train"] + ledger["eval"]
  assert row["time_to_target_wall_s"] == row["wall_s"]

  # Windows hold train calls only (no eval, no compile); the first (with the one input
  # wait) is a warm-up.
  assert windows >= 2
  rate = 8 * 32 / window_s
  assert row["loop_timed_windows"] == windows - 1
  assert row["loop_samples_per_sec"] == rate
  assert row["loop_samples_per_sec_iqr"] == [rate, rate]
  assert row["loop_step_time_ms"] == 1e3 * window_s / 8


def test_trial_max_seconds_budget_counts_train_seconds_only():
  c = load_config("synthetic_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 512
  c.steps_per_call = 8  # 32768 // (8 * 512) = 8 calls per window: 10 s of train each
  c.max_steps = None
  c.max_seconds = 25.0
  spec = config_lib.resolve(c, 8)
  clock = ManualClock()
  row = trial.run_trial(spec, clock=clock, log=None, cache=_timed_cache(spec, clock))
  # Train after each window: 10.25, 20.25, 30.25 >= 25: three windows. Counting the
  # 20 s of compile and set-up would have stopped it after the second.
  window_s = 8 * (CALL_S + INPUT_S)
  assert row["status"] == "ok"
  assert row["time_ledger"]["train"] == 3 * window_s + INPUT_S
  assert row["time_ledger"]["compile"] == COMPILE_S
  assert row["steps"] == 3 * 8 * 8 and row["examples"] == 3 * 8 * 8 * 512
  assert row["time_ledger"]["eval"] == 0.0 and row["eval_history"] == []
  assert row["loop_timed_windows"] == 2
  assert row["loop_samples_per_sec"] == 64 * 512 / window_s
