"""Timing arithmetic under a fake clock: exact answers, in isolation and inside a trial."""


import pytest
from conftest import load_config

from batchbench import config as config_lib, trial
from batchbench.timing import BUCKETS, TimeLedger, WindowTimer





class FakeClock:
  """Advances by ``tick`` seconds on every read (binary fractions keep sums exact)."""

  def __init__(self, tick=1.0, start=100.0):
    self.tick, self.now, self.reads = tick, start, 0

  def __call__(self):
    self.now += self.tick
    self.reads += 1
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
  ledger = TimeLedger(FakeClock())
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


def test_ledger_restores_and_accumulates():
  first = TimeLedger(FakeClock())
  first.add("train", 3.0)
  first.add("compile", 1.0)
  resumed = TimeLedger(FakeClock(), initial=first.as_dict())
  resumed.add("train", 2.0)
  assert resumed.seconds["train"] == 5.0 and resumed.seconds["compile"] == 1.0
  assert resumed.wall == 6.0


def test_ledger_rejects_unknown_bucket():
  ledger = TimeLedger(FakeClock())
  with pytest.raises(KeyError, match="'trian'"):
    ledger.add("trian", 1.0)
  with pytest.raises(KeyError, match="'bogus'"):
    TimeLedger(FakeClock(), initial={"bogus": 1.0})


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
  assert timer.windows[0].examples == 64 and timer.windows[0].steps == 2


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


def test_window_timer_without_windows():
  s = WindowTimer(FakeClock()).summary()
  assert s == {"samples_per_sec": None, "samples_per_sec_iqr": None, "step_time_ms": None,
               "timed_windows": 0}


def test_window_timer_stop_without_start_raises():
  timer = WindowTimer(FakeClock())
  with pytest.raises(RuntimeError, match="without start"):
    timer.stop(1, 1)
  timer.start()
  timer.stop(1, 1)
  with pytest.raises(RuntimeError, match="without start"):
    timer.stop(1, 1)


# --- run_trial under a fake clock -------------------------------------------------------
# JAX itself never reads the injected clock, so every ledger bucket is a count of clock
# reads the trial loop makes: per timing window of n calls, the window and the train
# bucket each span 2n + 2 ticks (window start, train start, n input-wait measures, stop),
# input_wait n ticks; setup, compile and each eval one tick.

def test_trial_ledger_and_time_to_target_are_exact_under_fake_clock():
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 32
  c.eval_every_examples = 256  # an eval every 8 steps
  c.steps_per_call = 2  # 4 calls per timing window
  c.target_value = 0.8
  spec = config_lib.resolve(c, 8)
  assert (spec.eval_every_steps, spec.steps_per_call) == (8, 2)
  tick = 0.25
  clock = FakeClock(tick)
  row = trial.run_trial(spec, clock=clock, log=None)

  assert row["status"] == "ok"
  steps = row["steps_to_target"]
  assert steps is not None and steps == row["steps"] and steps % 8 == 0
  windows = steps // 8
  calls = steps // 2
  ledger = row["time_ledger"]
  assert ledger["setup"] == tick and ledger["compile"] == tick
  assert ledger["train"] == windows * (2 * 4 + 2) * tick
  assert ledger["input_wait"] == calls * tick
  assert ledger["eval"] == windows * tick  # the target eval ends the trial: no extra eval
  assert ledger["checkpoint"] == 0.0

  # Time to target is the train bucket at the eval that met the target.
  assert row["time_to_target_s"] == ledger["train"]
  history = row["eval_history"]
  assert [h["step"] for h in history] == list(range(8, steps + 1, 8))
  assert [h["train_s"] for h in history] == [(i + 1) * 10 * tick for i in range(windows)]
  assert history[-1]["train_s"] == row["time_to_target_s"]
  assert history[-1]["metrics"]["accuracy"] >= 0.8
  assert all(h["metrics"]["accuracy"] < 0.8 for h in history[:-1])
  assert row["final_eval"] == history[-1]["metrics"]

  # Wall time covers every bucket; the target is met just before the trial ends.
  wall_buckets = ledger["setup"] + ledger["compile"] + ledger["train"] + ledger["eval"]
  assert row["time_to_target_wall_s"] >= wall_buckets
  assert row["wall_s"] >= row["time_to_target_wall_s"]
  assert row["wall_s"] == clock.now - 100.0 - tick  # trial_start was the first read

  # Equal windows: the median rate and both quartiles are exactly one window's rate.
  rate = 8 * 32 / (10 * tick)
  assert row["samples_per_sec"] == rate
  assert row["samples_per_sec_iqr"] == [rate, rate]
  assert row["step_time_ms"] == 1e3 * 10 * tick / 8
  assert row["timed_windows"] == max(1, windows - 1)


def test_trial_max_seconds_budget_counts_train_seconds_only():
  c = load_config("synthetic_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 512
  c.steps_per_call = 8  # 32768 // (8 * 512) = 8 calls per window: 18 ticks of train each
  c.max_steps = None
  c.max_seconds = 40.0
  spec = config_lib.resolve(c, 8)
  row = trial.run_trial(spec, clock=FakeClock(1.0), log=None)
  # Train after each window: 18, 36, 54 >= 40 -> stops after the third window.
  assert row["status"] == "ok"
  assert row["time_ledger"]["train"] == 54.0
  assert row["steps"] == 3 * 8 * 8 and row["examples"] == 3 * 8 * 8 * 512
  assert row["time_ledger"]["eval"] == 0.0 and row["eval_history"] == []
  assert row["timed_windows"] == 2
  assert row["samples_per_sec"] == 64 * 512 / 18
