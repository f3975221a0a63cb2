"""The benchmarks run against the current API, and their statistics are right."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import gns_cost  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import overhead  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import real_workloads  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import sweep_compile  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


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


def test_overhead_benchmark_runs_end_to_end(capsys):
  assert overhead.main(["--workloads", "digits_mlp,synthetic_mlp", "--batches", "256",
                        "--repeats", "1", "--windows", "3"]) == 0
  out = capsys.readouterr().out
  rows = [line.split() for line in out.splitlines()
          if line.startswith(("digits_mlp ", "synthetic_mlp "))]
  assert [r[0] for r in rows] == ["digits_mlp", "synthetic_mlp"]
  for row in rows:
    assert row[-1] in ("PASS", "BELOW")
    paired = float(row[-3])
    assert 0.2 < paired < 5.0  # a ratio of two measured throughputs, not NaN or 0
    k_harness, k_fused = row[3].split("/")
    assert k_harness == k_fused  # the hand-fused loop runs the harness's calls
  assert "SUMMARY: harness >= 0.97 x the better hand loop at" in out


def test_harness_spec_times_the_windows_asked_for():
  spec = overhead.harness_spec("digits_mlp", 1024, windows=4)
  settings = spec.throughput_settings
  assert settings["min_windows"] == 4
  assert settings["min_seconds"] == pytest.approx(4 * overhead.WINDOW_SECONDS)
  assert spec.lr == overhead.LR and spec.momentum == overhead.MOMENTUM


@pytest.mark.slow
def test_sweep_compile_benchmark_compiles_once_per_batch_and_keeps_results(capsys):
  assert sweep_compile.main(["--batches", "256,512"]) == 0
  out = capsys.readouterr().out
  table = {line.split()[0]: line.split() for line in out.splitlines()
           if line.startswith(("per_trial ", "per_batch ")) and line.split()[1].isdigit()}
  trials = int(table["per_batch"][1])
  assert trials == 6  # 2 batches x the config's 3 LR multipliers
  # Before: a program per trial and point; after: one per batch, whatever the LRs.
  assert int(table["per_trial"][5]) == trials + 2
  assert int(table["per_batch"][5]) == 2
  assert "steps to target identical in all 6 trials: yes" in out


@pytest.mark.slow
def test_real_workloads_benchmark_runs_end_to_end(capsys):
  assert real_workloads.main(["--tiny", "--quick", "--cases", "resnet18/host,lm/pysrc",
                              "--resnet_batches", "8", "--lm_batches", "4",
                              "--steps_per_call", "1", "--windows", "3"]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line.split() for line in out.splitlines()
          if line.startswith(("resnet18/", "lm/"))}
  assert sorted(rows) == ["lm/pysrc", "resnet18/host"]
  number = lambda text: float(text.replace(",", ""))
  for row in rows.values():
    harness, hand, paired, pairs = number(row[4]), number(row[6]), float(row[8]), int(row[9])
    assert harness > 0 and hand > 0
    assert 0.01 < paired < 100  # a ratio of two measured throughputs, not NaN or 0
    assert pairs >= 3  # one hand window after each timed harness window (3 or more)
    for wait in row[11:13]:
      assert 0.0 <= float(wait.rstrip("%")) < 100.0
  # tokens/s is samples/s x the LM's seq_len; the ResNet has none.
  seq_len = real_workloads.TINY_SIZES["lm"]["seq_len"]
  lm = rows["lm/pysrc"]
  assert number(lm[5]) == pytest.approx(number(lm[4]) * seq_len, abs=seq_len)
  assert rows["resnet18/host"][5] == "-"
  assert "SUMMARY: harness / hand loop, paired" in out


def test_gns_cost_benchmark_compares_the_same_step_with_and_without_the_noise_scale(capsys):
  on, off = gns_cost.specs(dict(gns_cost.CASES[0][1]), windows=3)
  assert (on.gns_source, off.gns_source) == ("groups", None)
  assert on.program_key != off.program_key and on.global_batch == off.global_batch
  every_step, _ = gns_cost.specs(dict(gns_cost.CASES[0][1]), windows=3, every_steps=1)
  assert (on.gns_every, every_step.gns_source, every_step.gns_every) == (8, "groups", 1)
  assert gns_cost.main(["--quick"]) == 0
  out = capsys.readouterr().out
  [row] = [line for line in out.splitlines() if line.startswith(gns_cost.CASES[0][0])]
  fields = row[len(gns_cost.CASES[0][0]):].split()
  assert fields[0] == "groups" and fields[1] == "x8"
  paired, windows, cost = float(fields[4]), int(fields[6]), float(fields[7].rstrip("%"))
  assert 0.2 < paired < 5.0 and windows == 6
  assert cost == pytest.approx((1 - paired) * 100, abs=0.06)
  assert "cost = 1 - paired" in out
  # Beside it, the cost with the norms at every step, and that cost / 8.
  every_cost, per_n = float(fields[8].rstrip("%")), float(fields[-1].rstrip("%"))
  assert per_n == pytest.approx(every_cost / 8, abs=0.06)
