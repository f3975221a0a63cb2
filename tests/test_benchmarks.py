"""The overhead benchmark runs against the current API, and its statistics are right."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import overhead  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _repeat(harness, dispatched, fused):
  return {"windows": {"harness": list(harness), "dispatched": list(dispatched),
                      "fused": list(fused)},
          "harness_row": float(np.median(harness))}


def test_paired_ratio_cancels_load_shared_by_adjacent_windows():
  # Load moves every window's speed by up to 2x; the harness is always 0.9x the fused
  # window run right after it, and the dispatched loop is slower still.
  load = np.array([1.0, 0.5, 0.8, 0.6, 1.0, 0.55, 0.9])
  repeats = [_repeat(0.9 * 100 * load, 70 * load, 100 * load),
             _repeat(0.9 * 100 * load[::-1], 70 * load[::-1], 100 * load[::-1])]
  stats = overhead.summarize(repeats)
  assert stats["better"] == "fused"
  assert stats["paired"] == pytest.approx(0.9)
  assert stats["paired_ci"] == pytest.approx((0.9, 0.9))
  assert stats["pairs"] == 14
  assert stats["ratio"] == pytest.approx(0.9)


def test_paired_ratio_uses_the_better_loop_by_median():
  dispatched = [120.0, 110.0, 130.0]
  repeats = [_repeat([100.0, 100.0, 100.0], dispatched, [90.0, 95.0, 92.0])]
  stats = overhead.summarize(repeats)
  assert stats["better"] == "dispatched"
  assert stats["paired"] == pytest.approx(np.median([100 / d for d in dispatched]))
  low, high = stats["paired_ci"]
  assert 100 / 130 <= low <= stats["paired"] <= high <= 100 / 110


def test_benchmark_runs_end_to_end(capsys):
  assert overhead.main(["--workloads", "digits_mlp,synthetic_mlp", "--batches", "256",
                        "--repeats", "1", "--windows", "2", "--window-examples", "2048"]) == 0
  out = capsys.readouterr().out
  rows = [line.split() for line in out.splitlines()
          if line.startswith(("digits_mlp ", "synthetic_mlp "))]
  assert [r[0] for r in rows] == ["digits_mlp", "synthetic_mlp"]
  for row in rows:
    assert row[-1] in ("PASS", "BELOW")
    paired = float(row[-3])
    assert 0.2 < paired < 5.0  # a ratio of two measured throughputs, not NaN or 0
  assert "SUMMARY: harness >= 0.97 x the better hand loop at" in out


@pytest.mark.parametrize("name", ["digits_mlp", "synthetic_mlp"])
@pytest.mark.parametrize("windows", [3, 8, 10])
def test_window_agrees_with_the_harness_and_keeps_its_steps_per_call(name, windows):
  for batch in (32, 256, 1024):
    window, spec = overhead.matched_window(name, batch,
                                           overhead.window_steps_for(batch, 32768), windows)
    assert overhead.harness_window_steps(spec) == window
    assert spec.max_steps == (windows + 1) * window
    assert window % spec.steps_per_call == 0
    # The automatic K, as in a trial: at most 64 steps and 65,536 examples, dividing the
    # eval interval (one window for digits), not shrunk by the benchmark's budget.
    assert spec.steps_per_call == overhead.fused_steps_for(window, min(64, 65536 // batch))
