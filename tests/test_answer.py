"""The report's answer: generalization, the noise scale, the fit-based recommendation, the
fit command, and trials that train on past the target."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, load_config

from batchbench.analysis.generalization import generalization
from batchbench.config import resolve
from batchbench.report.answer import answer, noise_scale
from batchbench.report.fit_command import run_fit
from batchbench.report.recommend import recommend
from batchbench.runs.trial import run_trial
from batchbench.analysis.selection import best_per_batch
from batchbench.store.results import THROUGHPUT_FILE, append_row

TARGET = {"metric": "accuracy", "value": 0.9, "direction": "max"}
TRAIN_SIZE = 1000


def row(batch, mult, seed, final, gap, epochs=10.0, steps_to_target=50, stop=False,
        status="ok", b_simple=None):
  """A trial row whose last eval (at ``epochs``) has test accuracy ``final`` and train
  accuracy ``final + gap``; an earlier eval at half the epochs has a gap of 0."""
  examples = int(epochs * TRAIN_SIZE)
  history = [{"examples": examples // 2, "step": 1,
              "metrics": {"accuracy": final - 0.1}, "train_metrics": {"accuracy": final - 0.1}},
             {"examples": examples, "step": 2, "metrics": {"accuracy": final},
              "train_metrics": {"accuracy": final + gap}}]
  return {"trial_id": f"{batch}-{mult}-{seed}", "point_id": f"p{batch}", "global_batch": batch,
          "lr_multiplier": mult, "lr": 0.1 * mult, "seed": seed, "status": status,
          "steps_to_target": steps_to_target if status == "ok" else None,
          "examples": examples, "final_eval": history[-1]["metrics"], "eval_history": history,
          "target": TARGET, "spec": {"train_size": TRAIN_SIZE, "stop_at_target": stop},
          "b_simple": b_simple, "gns_note": None if b_simple else "not measured: one device"}


def test_large_batches_reported_worse_only_beyond_the_seeds_spread():
  rows = [row(8, 1.0, s, f, 0.02 + s * 0.001) for s, f in enumerate((0.95, 0.96, 0.955))]
  rows += [row(8, 2.0, s, 0.5, 0.0) for s in range(3)]  # a worse LR: not the one compared
  rows += [row(512, 1.0, s, f, 0.08 + s * 0.001) for s, f in enumerate((0.90, 0.91, 0.905))]
  g = generalization(rows)
  assert [b["global_batch"] for b in g["batches"]] == [8, 512]
  small, large = g["batches"]
  assert small["lr_multiplier"] == 1.0  # the LR with the best final accuracy
  assert small["final"] == {"median": 0.955, "min": 0.95, "max": 0.96}
  assert large["final"]["max"] == pytest.approx(0.91)
  assert large["gap"]["median"] == pytest.approx(0.081)
  assert "lower at batch 512 than at batch 8 beyond the spread of the seeds" in g["text"]
  assert "wider at the larger batch beyond the seeds' spread" in g["text"]
  assert "Over 3 seed(s) per batch" in g["text"]


def test_overlapping_seeds_give_no_verdict_and_gaps_compare_at_equal_epochs():
  rows = [row(8, 1.0, s, f, 0.02) for s, f in enumerate((0.94, 0.96))]
  # Batch 256 trained only 5 epochs: the gap of every batch is read at 5 epochs, where
  # this row builder puts a gap of 0.
  rows += [row(256, 1.0, s, f, 0.03, epochs=5.0) for s, f in enumerate((0.95, 0.97))]
  g = generalization(rows)
  assert g["epochs"] == 5.0
  assert "differs no more between batch 8" in g["text"] and "than between seeds" in g["text"]
  small, large = g["batches"]
  assert small["gap"]["median"] == 0.0  # batch 8's eval at 5 epochs (its first eval)
  assert large["gap"]["median"] == pytest.approx(0.03)


def test_trials_that_stopped_at_the_target_draw_no_conclusion():
  rows = [row(b, 1.0, 0, 0.9, 0.0, stop=True) for b in (8, 512)]
  assert "cannot say whether large batches generalise worse" in generalization(rows)["text"]


def test_noise_scale_is_set_beside_the_fit_or_said_to_be_missing():
  best = [{"global_batch": b, "b_simple_median": v, "gns_note": None, "gns_every": 8,
           "b_simple_steps": n, "steps_to_target": s}
          for b, v, n, s in ((32, 100.0, [40, 44], 50), (64, 140.0, [20], 30),
                             (128, 120.0, [9, 12], None))]
  out = noise_scale(best, {"status": "ok", "b_crit": 60.0})
  assert out["median"] == 120.0 and out["ratio_to_b_crit"] == pytest.approx(2.0)
  assert "about 120" in out["text"] and "a ratio of 2" in out["text"]
  # Its sample beside it: the fewest and most measured steps behind a value.
  assert "each from 9 to 44 measured steps, one step in 8)" in out["text"]
  assert "the last eval at batch 128, which missed it" in out["text"]
  missing = noise_scale([{"global_batch": 8, "b_simple_median": None,
                          "gns_note": "not measured: one device"}], {"status": "ok"})
  assert missing["median"] is None and "not measured (one device)" in missing["text"]


def model_sweep(workdir, b_crit=100.0, s_min=20.0, seeds=3):
  """Rows whose steps follow S(B) = S_min (1 + B_crit/B) (x seed noise) and their points,
  with step time 0.1 ms x sqrt(B): time to target is least near B = B_crit."""
  rng = np.random.default_rng(0)
  for b in (8, 16, 32, 64, 128, 256, 512, 1024):
    for s in range(seeds):
      steps = round(s_min * (1 + b_crit / b) * float(np.exp(rng.normal(0, 0.05))))
      r = row(b, 1.0, s, 0.95, 0.01, steps_to_target=steps)
      r["global_batch"], r["point_id"] = b, f"p{b}"
      append_row(workdir, r)
    append_row(workdir, {"point_id": f"p{b}", "global_batch": b, "num_devices": 1,
                         "step_time_ms": 0.1 * math.sqrt(b), "timed_windows": 5,
                         "samples_per_sec": b / (0.1e-3 * math.sqrt(b))}, THROUGHPUT_FILE)


def test_fit_command_on_a_workdir_recovers_b_crit_and_writes_its_files(tmp_path):
  workdir = str(tmp_path)
  model_sweep(workdir)
  out = run_fit(workdir=workdir, deadline_s=10.0)
  fitted, plan = out["fit"], out["plan"]
  assert fitted["status"] == "ok" and fitted["b_crit_interval"][0] <= 100 <= \
      fitted["b_crit_interval"][1]
  # time = S_min (1 + Bc/B) x 0.1 sqrt(B) ms is least at B = Bc: the candidate nearest 100.
  assert plan["recommended"]["global_batch"] in (64, 128)
  for name in ("fit.json", "fit.png", "time_to_target.png"):
    assert os.path.getsize(out["paths"][name]) > 0
  saved = json.load(open(out["paths"]["fit.json"], encoding="utf-8"))
  assert saved["fit"]["b_crit"] == pytest.approx(fitted["b_crit"])
  assert "B_crit ≈ " in out["text"] and "Least time to target: batch" in out["text"]


def test_the_recommendation_follows_the_fit_and_mentions_a_measured_disagreement(tmp_path):
  workdir = str(tmp_path)
  model_sweep(workdir)
  from batchbench.store.results import read_points, read_results  # pylint: disable=g-import-not-at-top
  rows, points = read_results(workdir), read_points(workdir)
  best = best_per_batch(rows, points)
  ans = answer(rows, best, points)
  rec = recommend(rows, best, points, plan=ans["plan"])
  pick = ans["plan"]["recommended"]["global_batch"]
  assert rec["fastest_batch"] == pick and rec["fastest_basis"] == "fit"
  assert rec["text"].startswith(f"Train with global batch {pick} ")
  measured = min((r for r in best if r["time_to_target_s"]),
                 key=lambda r: r["time_to_target_s"])["global_batch"]
  assert (f"Measured without the fit, batch {measured} was fastest" in rec["text"]) == (
      measured != pick)


def test_fit_cli_refuses_bad_input_with_one_line(tmp_path):
  bad = tmp_path / "t.csv"
  bad.write_text("batch,seconds\n8,1\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for args in ([], [f"--table={bad}"], [f"--workdir={tmp_path / 'empty'}"]):
    out = subprocess.run([sys.executable, "-m", "batchbench", "fit", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("batchbench: error:")


def test_a_trial_trains_on_past_the_target_with_only_a_final_eval():
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch, c.num_devices, c.max_steps = 64, 2, 64
  c.eval_every_examples, c.target_value, c.stop_at_target = 256, 0.8, False
  r = run_trial(resolve(c, 8), log=None)
  assert r["status"] == "ok" and r["steps"] == 64
  hit = r["steps_to_target"]
  assert hit is not None and hit < 64
  # Evals every 4 steps until the target, then only at the budget.
  assert [h["step"] for h in r["eval_history"]] == [*range(4, hit + 1, 4), 64]
  assert all("train_metrics" in h for h in r["eval_history"])
  assert r["final_eval"] == r["eval_history"][-1]["metrics"]
  assert r["final_train_eval"] == r["eval_history"][-1]["train_metrics"]
