"""Tests of the batch-size report on synthetic sweeps (no jax needed)."""

import csv
import os
import re
import statistics

import numpy as np
import pytest
from matplotlib import image as mpimg

from batchbench import report
from batchbench.results import append_row, read_results

TARGET = {"metric": "accuracy", "value": 0.9, "direction": "max"}
BASE_LR, REFERENCE_BATCH, EXAMPLES_PER_EPOCH = 0.1, 64, 10_000


def make_row(batch, mult=1.0, seed=0, status="ok", steps=None, target=TARGET,
             step_ms=None, **overrides):
  """A full result row (every schema key) for a synthetic trial."""
  step_ms = 10 + 0.1 * batch if step_ms is None else step_ms
  sps = batch / step_ms * 1000
  failed = status in ("oom", "error")
  reached = status == "ok" and steps is not None
  run_steps = steps if reached else 2000
  history = [] if failed else [
      {"examples": s * batch, "step": s, "train_s": s * step_ms / 1000,
       "metrics": {"accuracy": 0.9 * s / run_steps, "loss": 2.0 / (1 + s)}}
      for s in np.linspace(run_steps / 4, run_steps, 4, dtype=int).tolist()]
  row = {
      "trial_id": f"b{batch}-m{mult:g}-s{seed}", "workload": "synthetic",
      "status": status, "error": {"oom": "RESOURCE_EXHAUSTED: out of memory | alloc",
                                  "diverged": "loss is nan"}.get(status),
      "global_batch": batch, "per_device_batch": batch, "accum_steps": 1,
      "num_devices": 1, "steps_per_call": 1, "lr": BASE_LR * batch / REFERENCE_BATCH * mult,
      "base_lr": BASE_LR, "lr_rule": "linear", "lr_multiplier": mult,
      "reference_batch": REFERENCE_BATCH, "optimizer": "sgd", "schedule": "constant",
      "seed": seed, "steps": None if failed else run_steps,
      "examples": None if failed else run_steps * batch,
      "epochs": None if failed else run_steps * batch / EXAMPLES_PER_EPOCH,
      "samples_per_sec": None if failed else sps,
      "samples_per_sec_iqr": None if failed else [0.95 * sps, 1.04 * sps],
      "step_time_ms": None if failed else step_ms, "compile_s": None if failed else 2.5,
      "memory": None if failed else {
          "argument_bytes": 1000 * batch, "output_bytes": 1000 * batch, "alias_bytes": 0,
          "temp_bytes": 50_000 * batch, "generated_code_bytes": 4096,
          "peak_bytes": 52_000 * batch, "device_peak_bytes": None},
      "flops_per_step": 1e6 * batch,
      "steps_to_target": steps if reached else None,
      "examples_to_target": steps * batch if reached else None,
      "epochs_to_target": steps * batch / EXAMPLES_PER_EPOCH if reached else None,
      "time_to_target_s": steps * step_ms / 1000 if reached else None,
      "time_to_target_wall_s": steps * step_ms / 1000 + 7.0 if reached else None,
      "final_eval": None if failed else {"accuracy": 0.91 if reached else 0.8,
                                         "loss": 0.3},
      "final_train_loss": None if failed else 0.25 + 1 / batch,
      "target": target, "eval_history": history,
      "time_ledger": {"compile": 2.5, "train": 1.0, "eval": 0.5, "input_wait": 0.0,
                      "checkpoint": 0.0},
      "diverged_step": 57 if status == "diverged" else None,
      "resumes": 0, "wall_s": 20.0,
  }
  row.update(overrides)
  return row


# batch -> {lr multiplier: steps to target per seed (None: target not reached)}.
# At batch 32 the single best seed (x1, 380 steps) is beaten on the median by x2.
SWEEP = {
    8: {0.5: [2000], 1.0: [1600], 2.0: [1700]},
    16: {0.5: [1200], 1.0: [900], 2.0: [800]},
    32: {0.5: [500], 1.0: [380, 600, 390], 2.0: [385]},
    64: {0.5: [320], 1.0: [300], 2.0: [310]},
    128: {0.5: [330], 1.0: [280], 2.0: ["diverged"]},
    256: {0.5: [None], 1.0: [None], 2.0: [None]},
}


@pytest.fixture(name="workdir")
def fixture_workdir(tmp_path):
  for batch, by_mult in SWEEP.items():
    for mult, outcomes in by_mult.items():
      for seed, steps in enumerate(outcomes):
        status = ("diverged" if steps == "diverged" else
                  "target_not_reached" if steps is None else "ok")
        append_row(str(tmp_path), make_row(batch, mult, seed, status,
                                           steps if status == "ok" else None))
  append_row(str(tmp_path), make_row(512, 1.0, 0, "oom"))
  append_row(str(tmp_path), make_row(8, 4.0, 0, "error",
                                     error="ValueError: bad shape (8, 3)\nTraceback ..."))
  return str(tmp_path)


def expected_best(rows):
  """Best trial per batch, recomputed plainly: fewest median steps over seeds."""
  best = {}
  for batch in sorted({r["global_batch"] for r in rows}):
    trials = [r for r in rows if r["global_batch"] == batch]
    medians = {}
    for mult in {r["lr_multiplier"] for r in trials}:
      seeds = [r for r in trials if r["lr_multiplier"] == mult]
      if all(r["status"] == "ok" for r in seeds):
        medians[mult] = statistics.median(r["steps_to_target"] for r in seeds)
    if medians:
      mult = min(medians, key=medians.get)
      best[batch] = next(r for r in trials if r["lr_multiplier"] == mult
                         and r["steps_to_target"] == medians[mult])
    else:
      ran = [r for r in trials if r["status"] not in ("diverged", "oom", "error")]
      best[batch] = max(ran, key=lambda r: r["samples_per_sec"]) if ran else trials[0]
  return best


def test_summary_csv_matches_best_trial_per_batch(workdir):
  paths = report.write_report(workdir)
  with open(paths["summary.csv"], newline="") as f:
    table = list(csv.DictReader(f))
  expected = expected_best(read_results(workdir))
  assert [int(r["global_batch"]) for r in table] == sorted(expected)

  def value(cell):
    return None if cell == "" else float(cell)

  for line in table:
    want = expected[int(line["global_batch"])]
    assert line["trial_id"] == want["trial_id"]
    assert line["status"] == want["status"]
    for key in ("lr", "lr_multiplier", "samples_per_sec", "step_time_ms", "compile_s",
                "steps_to_target", "epochs_to_target", "examples_to_target",
                "time_to_target_s", "time_to_target_wall_s", "final_train_loss"):
      assert value(line[key]) == want[key], key
    memory = want["memory"] or {}
    assert value(line["xla_peak_bytes"]) == memory.get("peak_bytes")
    assert value(line["xla_temp_bytes"]) == memory.get("temp_bytes")
    if want["samples_per_sec_iqr"]:
      assert value(line["samples_per_sec_q25"]) == want["samples_per_sec_iqr"][0]
  by_batch = {int(r["global_batch"]): r for r in table}
  assert float(by_batch[32]["lr_multiplier"]) == 2.0  # median over seeds, not best seed
  assert float(by_batch[16]["steps_to_target"]) == 800
  assert by_batch[256]["status"] == "target_not_reached"
  assert by_batch[512]["status"] == "oom"


def test_best_lr_has_fewest_steps(workdir):
  rows = read_results(workdir)
  for best in report.best_per_batch(rows):
    reached = [r for r in rows if r["global_batch"] == best["global_batch"]
               and r["status"] == "ok" and r["lr_multiplier"] == best["lr_multiplier"]]
    others = [r for r in rows if r["global_batch"] == best["global_batch"]
              and r["status"] == "ok" and r["lr_multiplier"] != best["lr_multiplier"]]
    if not reached:
      continue
    median = statistics.median(r["steps_to_target"] for r in reached)
    for mult in {r["lr_multiplier"] for r in others}:
      assert median <= statistics.median(
          r["steps_to_target"] for r in others if r["lr_multiplier"] == mult)


def test_plots_decode_and_html_is_self_contained(workdir):
  paths = report.write_report(workdir)
  pngs = [name for name in paths if name.endswith(".png")]
  assert sorted(pngs) == sorted(["throughput.png", "steps_to_target.png",
                                 "time_to_target.png", "memory.png", "curves.png"])
  for name in pngs:
    assert os.path.getsize(paths[name]) > 5_000
    pixels = mpimg.imread(paths[name])
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 1
  with open(paths["report.html"], encoding="utf-8") as f:
    page = f.read()
  sources = re.findall(r"""src\s*=\s*["']([^"']*)""", page)
  assert len(sources) == len(pngs)
  assert all(s.startswith("data:image/png;base64,") for s in sources)
  assert not re.search(r"<link|<script|url\(|href=", page)
  leftovers = [n for n in os.listdir(os.path.join(workdir, "report")) if ".tmp" in n]
  assert not leftovers
  with open(paths["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  assert "## Recommendation" in markdown and "## Appendix: every trial" in markdown
  assert markdown.count("b32-m1-s") == 3  # every trial is in the appendix
  assert "RESOURCE_EXHAUSTED: out of memory \\| alloc" in markdown  # escaped pipe


def test_recommendation_and_warnings(workdir):
  rows = read_results(workdir)
  rec = report.recommend(rows)
  table_batches = [r["global_batch"] for r in report.best_per_batch(rows)]
  assert rec["fastest_batch"] in table_batches
  reached = [r for r in rows if r["status"] == "ok"]
  assert rec["fastest_batch"] == min(reached, key=lambda r: r["time_to_target_s"])[
      "global_batch"] == 64
  # 16 -> 32 takes 385/800 of the steps, 32 -> 64 takes 300/385 > 0.6.
  assert rec["largest_perfect_scaling_batch"] == 32
  warnings = rec["warnings"]
  diverged = [w for w in warnings if "diverged" in w]
  assert len(diverged) == 1 and "batch 128" in diverged[0] and "0.4" in diverged[0]
  assert any("Batch 256 missed the target" in w for w in warnings)
  assert any("Batch 512 ran out of memory" in w for w in warnings)
  assert any("b8-m4-s0" in w and w.endswith("ValueError: bad shape (8, 3)")
             for w in warnings)
  assert "64" in rec["text"] and "32" in rec["text"]
  assert "64" in report.format_table(rows).splitlines()[4]


@pytest.mark.parametrize("batches, steps, expected", [
    ([8, 16, 32, 64, 128], [160, 80, 40, 30, 28], 32),
    ([8, 16, 32, 64], [160, 96, 57.6, 34.56], 64),  # exactly 0.6 per doubling
    ([8, 16, 32, 64], [160, 97, 50, 25], 8),  # first doubling already too slow
    ([8, 24, 48], [100, 44, 20], 48),  # gap of 3x: threshold (1/3)**log2(1/0.6)=0.445
    ([8, 24, 48], [100, 46, 20], 8),
    ([8, 16, 32, 64], [None, 100, 50, None], 32),  # walk starts at first result
])
def test_largest_perfect_scaling_batch(batches, steps, expected):
  rows = [make_row(b, status="ok" if s else "target_not_reached", steps=s)
          for b, s in zip(batches, steps, strict=True)]
  assert report.recommend(rows)["largest_perfect_scaling_batch"] == expected


def test_throughput_only_workload_renders(tmp_path):
  sps = {8: 1000, 16: 1900, 32: 3000, 64: 3100, 128: 3150}
  for batch, s in sps.items():
    row = make_row(batch, status="ok", target=None, step_ms=batch / s * 1000)
    append_row(str(tmp_path), row)
  rec = report.recommend(read_results(str(tmp_path)))
  assert rec["fastest_batch"] == 128 and rec["fastest_basis"] == "samples_per_sec"
  assert rec["largest_perfect_scaling_batch"] is None
  assert any("plateaus at batch 32" in w for w in rec["warnings"])
  os.makedirs(tmp_path / "report")
  (tmp_path / "report" / "steps_to_target.png").write_bytes(b"stale plot")
  paths = report.write_report(str(tmp_path))
  assert "throughput.png" in paths and "steps_to_target.png" not in paths
  assert not (tmp_path / "report" / "steps_to_target.png").exists()
  with open(paths["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  assert "steps_to_target.png skipped" in markdown
  assert "time_to_target.png skipped" in markdown
  with open(paths["summary.csv"], newline="") as f:
    assert [int(r["global_batch"]) for r in csv.DictReader(f)] == list(sps)


def test_empty_workdir_writes_a_report(tmp_path):
  paths = report.write_report(str(tmp_path))
  assert not [n for n in paths if n.endswith(".png")]
  assert report.recommend([])["fastest_batch"] is None
  assert os.path.exists(paths["report.html"])


def test_format_bytes():
  assert report.format_bytes(512) == "512 B"
  assert report.format_bytes(12.3 * 2**20) == "12.3 MiB"
  assert report.format_bytes(3 * 2**30) == "3.0 GiB"
  assert report.format_bytes(None) == "-"
