"""Tests of the batch-size report on synthetic sweeps (no JAX): the best LR per batch from
the trial rows, speed from the batch's throughput point, and a recommendation and
warnings that follow from the table they sit under."""

import csv
import math
import os
import re
import statistics

import numpy as np
import pytest
from matplotlib import image as mpimg

from batchbench import fmt, version
from batchbench.analysis.selection import best_per_batch
from batchbench.report import recommend, render, tables
from batchbench.store.results import THROUGHPUT_FILE, append_row, read_points, read_results

TARGET = {"metric": "accuracy", "value": 0.9, "direction": "max"}
BASE_LR, REFERENCE_BATCH, EXAMPLES_PER_EPOCH = 0.1, 64, 10_000
MAX_STEPS = 2000


def lr_of(batch, mult):
  return BASE_LR * batch / REFERENCE_BATCH * mult


def step_ms_of(batch):
  return 10 + 0.1 * batch


CPU_PEAK_NOTE = "no peak known for 'cpu' (float32); give --config.peak_tflops for MFU"


def make_point(batch, step_ms=None, windows=7, version_=None, peak=None):
  """A throughput point (``throughput.jsonl`` row) for ``batch``: XLA's 1 MFLOP per
  example, and an MFU only with a ``peak`` (TFLOP/s), as on CPU."""
  step_ms = step_ms_of(batch) if step_ms is None else step_ms
  sps = batch / step_ms * 1000
  tflops = 1e6 * sps / 1e12
  return {
      "point_id": f"pt-{batch}-v{version_ or version.MEASUREMENT_VERSION}",
      "workload": "synthetic", "global_batch": batch, "per_device_batch": batch,
      "accum_steps": 1, "num_devices": 1, "steps_per_call": 4,
      "samples_per_sec": sps, "samples_per_sec_iqr": [0.95 * sps, 1.04 * sps],
      "timed_windows": windows, "step_time_ms": step_ms,
      "window_samples_per_sec": [sps] * windows, "window_seconds": [0.1] * windows,
      "calls_per_window": 3, "compile_s": 2.5, "compile_cached": False,
      "program_compile_s": 2.5,
      "memory": {"argument_bytes": 1000 * batch, "output_bytes": 1000 * batch,
                 "alias_bytes": 0, "temp_bytes": 50_000 * batch, "generated_code_bytes": 4096,
                 "peak_bytes": 51_000 * batch, "device_peak_bytes": None},
      "flops_per_step": 1e6 * batch, "model_flops_per_example": 1e6,
      "model_flops_source": "xla", "tflops_per_sec_per_device": tflops, "peak_tflops": peak,
      "peak_source": "peak_tflops (given)" if peak else CPU_PEAK_NOTE,
      "mfu": tflops / peak if peak else None,
      "measurement_version": version_ or version.MEASUREMENT_VERSION,
  }


def make_row(batch, mult=1.0, seed=0, status="ok", steps=None, run_steps=None,
             target=TARGET, version_=None, **overrides):
  """A full result row (every schema key) for a synthetic trial.

  Its own (in-loop) speed figures are deliberately not the point's: the report must
  take speed from the throughput point.
  """
  failed = status in ("oom", "error")
  reached = status == "ok" and steps is not None
  run_steps = steps if reached else (run_steps or MAX_STEPS)
  loop_ms = 3 * step_ms_of(batch)
  history = [] if failed else [
      {"examples": s * batch, "step": s, "train_s": s * loop_ms / 1000,
       "metrics": {"accuracy": 0.9 * s / run_steps, "loss": 2.0 / (1 + s)}}
      for s in np.linspace(run_steps / 4, run_steps, 4, dtype=int).tolist()]
  v = version_ or version.MEASUREMENT_VERSION
  row = {
      "trial_id": f"b{batch}-m{mult:g}-s{seed}-v{v}", "point_id": f"pt-{batch}-v{v}",
      "workload": "synthetic", "status": status,
      "error": {"oom": "RESOURCE_EXHAUSTED: out of memory | alloc",
                "diverged": "loss is nan"}.get(status),
      "global_batch": batch, "per_device_batch": batch, "accum_steps": 1,
      "num_devices": 1, "steps_per_call": 1, "lr": lr_of(batch, mult),
      "base_lr": BASE_LR, "lr_rule": "linear", "lr_multiplier": mult,
      "reference_batch": REFERENCE_BATCH, "optimizer": "sgd", "schedule": "constant",
      "seed": seed, "steps": None if failed else run_steps,
      "examples": None if failed else run_steps * batch,
      "epochs": None if failed else run_steps * batch / EXAMPLES_PER_EPOCH,
      "loop_samples_per_sec": None if failed else batch / loop_ms * 1000,
      "loop_samples_per_sec_iqr": None, "loop_step_time_ms": None if failed else loop_ms,
      "loop_timed_windows": 4, "compile_s": None if failed else 0.01,
      "compile_cached": True, "program_compile_s": 2.5,
      "memory": None if failed else {"peak_bytes": 1, "temp_bytes": 1},
      "flops_per_step": 1e6 * batch,
      "steps_to_target": steps if reached else None,
      "examples_to_target": steps * batch if reached else None,
      "epochs_to_target": steps * batch / EXAMPLES_PER_EPOCH if reached else None,
      # What the trial's own loop measured: not what the report shows.
      "time_to_target_s": steps * loop_ms / 1000 if reached else None,
      "loop_time_to_target_s": steps * loop_ms / 1000 if reached else None,
      "time_to_target_wall_s": steps * loop_ms / 1000 + 7.0 if reached else None,
      "final_eval": None if failed else {"accuracy": 0.91 if reached else 0.8, "loss": 0.3},
      "final_train_loss": None if failed else 0.25 + 1 / batch,
      "target": target, "eval_history": history,
      "time_ledger": {"compile": 2.5, "train": 1.0, "eval": 0.5, "input_wait": 0.0,
                      "checkpoint": 0.0},
      "diverged_step": 57 if status == "diverged" else None,
      "resumes": 0, "wall_s": 20.0, "measurement_version": v,
      "spec": {"compute_dtype": "float32"},
  }
  row.update(overrides)
  return row


# batch -> {lr multiplier: per seed, steps to target (int), None (missed it after
# MAX_STEPS steps), ("missed", steps) or "diverged"}.
SWEEP = {
    8: {0.5: [2000], 1.0: [1600], 2.0: [1700]},
    16: {0.5: [1200], 1.0: [900], 2.0: [800]},
    # The single best seed (x1, 380 steps) is beaten on the median by x2.
    32: {0.5: [500], 1.0: [380, 600, 390], 2.0: [385]},
    # x2 has the fewest steps in one seed, but 2 of its 3 seeds missed: not reached.
    64: {0.5: [320], 1.0: [300], 2.0: [250, None, None]},
    # x0.5 reached with only 1 of 2 seeds: its median is infinite, so x1 (280) wins.
    128: {0.5: [270, None], 1.0: [280], 2.0: ["diverged"]},
    # No LR reached: the trial that trained longest stands for the batch.
    256: {0.5: [("missed", 2000)], 1.0: [("missed", 2400)], 2.0: [("missed", 1800)]},
}
THIN_BATCH = 16  # its throughput point has only 2 timed windows


def sweep_rows(sweep, version_=None):
  rows = []
  for batch, by_mult in sweep.items():
    for mult, outcomes in by_mult.items():
      for seed, outcome in enumerate(outcomes):
        if outcome == "diverged":
          rows.append(make_row(batch, mult, seed, "diverged", version_=version_))
        elif outcome is None or isinstance(outcome, tuple):
          run = outcome[1] if outcome else None
          rows.append(make_row(batch, mult, seed, "target_not_reached", run_steps=run,
                               version_=version_))
        else:
          rows.append(make_row(batch, mult, seed, "ok", outcome, version_=version_))
  return rows


@pytest.fixture(name="workdir", scope="module")
def fixture_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  for row in sweep_rows(SWEEP):
    append_row(workdir, row)
  append_row(workdir, make_row(512, 1.0, 0, "oom"))  # no point: it never ran
  append_row(workdir, make_row(8, 4.0, 0, "error",
                               error="ValueError: bad shape (8, 3)\nTraceback ..."))
  for batch in SWEEP:
    append_row(workdir, make_point(batch, windows=2 if batch == THIN_BATCH else 7),
               THROUGHPUT_FILE)
  return workdir


@pytest.fixture(name="out", scope="module")
def fixture_report(workdir):
  """The report of the synthetic sweep (written once; the tests only read it)."""
  return render.write_report(workdir)


def expected_best(rows):
  """Best trial per batch, recomputed plainly from the documented rule: per LR the median
  of steps over seeds (a missed seed counts as infinite); the fewest wins; the seed
  closest to the median stands for it; if none reached, the non-failed trial with the
  most steps."""
  best = {}
  for batch in sorted({r["global_batch"] for r in rows}):
    trials = [r for r in rows if r["global_batch"] == batch]
    medians = {}
    for mult in {r["lr_multiplier"] for r in trials}:
      seeds = [r for r in trials if r["lr_multiplier"] == mult]
      median = statistics.median(
          r["steps_to_target"] if r["status"] == "ok" else math.inf for r in seeds)
      if median != math.inf:
        medians[mult] = median
    if medians:
      mult = min(medians, key=lambda m: (medians[m], m))  # ties: the lower LR
      best[batch] = min((r for r in trials if r["lr_multiplier"] == mult
                         and r["status"] == "ok"),
                        key=lambda r: (abs(r["steps_to_target"] - medians[mult]),
                                       r["steps_to_target"], r["seed"]))
    else:
      ran = [r for r in trials if r["status"] not in ("diverged", "oom", "error")]
      best[batch] = max(ran, key=lambda r: r["steps"]) if ran else trials[0]
  return best


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def value(cell):
  return None if cell == "" else float(cell)


def markdown_tables(text):
  """Each Markdown table of ``text`` as (headers, rows of cells)."""
  out, block = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      block.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    elif block:
      out.append((block[0], block[2:]))
      block = []
  return out


def test_summary_csv_is_the_best_lr_per_batch_with_the_points_speed(workdir, out):
  table = read_csv(out["paths"]["summary.csv"])
  rows, points = read_results(workdir), {p["global_batch"]: p for p in read_points(workdir)}
  expected = expected_best(rows)
  assert [int(r["global_batch"]) for r in table] == sorted(expected)

  for line in table:
    batch = int(line["global_batch"])
    want, point = expected[batch], points.get(batch)
    assert line["trial_id"] == want["trial_id"]
    assert line["status"] == want["status"]
    for key in ("lr", "lr_multiplier", "steps_to_target", "epochs_to_target",
                "examples_to_target", "time_to_target_wall_s", "final_train_loss"):
      assert value(line[key]) == want[key], key
    if point is None:  # no throughput point: no speed, no time to target
      assert line["samples_per_sec"] == line["step_time_ms"] == line["time_to_target_s"] == ""
      continue
    # Speed comes from the throughput point, never from the trial's own loop.
    assert value(line["samples_per_sec"]) == point["samples_per_sec"]
    assert value(line["samples_per_sec"]) != want["loop_samples_per_sec"]
    assert value(line["samples_per_sec_q25"]) == point["samples_per_sec_iqr"][0]
    assert value(line["samples_per_sec_q75"]) == point["samples_per_sec_iqr"][1]
    assert value(line["step_time_ms"]) == point["step_time_ms"]
    assert int(line["timed_windows"]) == point["timed_windows"]
    assert value(line["compile_s"]) == point["program_compile_s"]
    assert value(line["xla_peak_bytes"]) == point["memory"]["peak_bytes"]
    assert value(line["xla_temp_bytes"]) == point["memory"]["temp_bytes"]
    # Time to target = steps to target x the point's step time.
    if want["steps_to_target"] is None:
      assert line["time_to_target_s"] == ""
    else:
      assert value(line["time_to_target_s"]) == pytest.approx(
          want["steps_to_target"] * point["step_time_ms"] / 1e3, rel=1e-12)
      assert value(line["time_to_target_s"]) != want["time_to_target_s"]
  by_batch = {int(r["global_batch"]): r for r in table}
  assert float(by_batch[32]["lr_multiplier"]) == 2.0  # median over seeds, not best seed
  assert float(by_batch[64]["lr_multiplier"]) == 1.0  # x2: only 1 of 3 seeds reached
  # x0.5 reached with 1 of its 2 seeds (median infinite): x1, with its 1 seed, wins.
  assert (float(by_batch[128]["lr_multiplier"]), by_batch[128]["seeds_reached"],
          by_batch[128]["seeds_at_lr"]) == (1.0, "1", "1")
  assert float(by_batch[16]["steps_to_target"]) == 800
  assert (by_batch[256]["status"], value(by_batch[256]["lr_multiplier"])) == (
      "target_not_reached", 1.0)  # the longest-trained of the batch
  assert by_batch[512]["status"] == "oom"


def test_two_seeds_take_their_mean_not_the_faster_seed():
  # x0.5's seeds took 300 and 400 steps: a median of 350, so x1 (340 at both) is better,
  # though x0.5 has the single fastest seed.
  rows = sweep_rows({64: {0.5: [300, 400], 1.0: [340, 340]}})
  (best,) = best_per_batch(rows, [])
  assert best["lr_multiplier"] == 1.0 and best["steps_to_target"] == 340
  (best,) = best_per_batch(sweep_rows({64: {0.5: [300, 400], 1.0: [360, 360]}}), [])
  assert best["lr_multiplier"] == 0.5 and best["steps_to_target"] == 350
  assert (best["steps_min"], best["steps_max"]) == (300, 400)
  assert best["examples_to_target"] == 350 * 64


def test_best_lr_has_fewest_median_steps(workdir):
  rows = read_results(workdir)
  for best in best_per_batch(rows, read_points(workdir)):
    trials = [r for r in rows if r["global_batch"] == best["global_batch"]]

    def median(mult, trials=trials):
      return statistics.median(r["steps_to_target"] if r["status"] == "ok" else math.inf
                                   for r in trials if r["lr_multiplier"] == mult)

    if best["steps_to_target"] is None:
      assert all(median(r["lr_multiplier"]) == math.inf for r in trials)
      continue
    assert best["steps_to_target"] == median(best["lr_multiplier"])
    assert all(best["steps_to_target"] <= median(r["lr_multiplier"]) for r in trials)


def test_thin_point_is_marked_in_the_table_and_warned_about(workdir, out):
  with open(out["paths"]["report.md"], encoding="utf-8") as f:
    headers, cells = markdown_tables(f.read())[0]
  rate, windows = headers.index("samples/sec"), headers.index("windows")
  points = {p["global_batch"]: p for p in read_points(workdir)}
  for line in cells:
    batch = int(line[0].replace(",", ""))
    if batch not in points:
      assert line[rate] == "-"
      continue
    assert line[windows] == str(points[batch]["timed_windows"])
    assert line[rate].endswith("*") == (points[batch]["timed_windows"] < 3), line
  assert any(line[rate].endswith("*") for line in cells)
  thin = [w for w in out["recommendation"]["warnings"] if "fewer than 3 timed windows" in w]
  assert thin == [f"Throughput at batch {THIN_BATCH} rests on fewer than 3 timed windows "
                  "(marked * in the table)."]
  console = tables.console_table(out["best"])
  (line16,) = [ln for ln in console.splitlines() if ln.split()[0] == str(THIN_BATCH)]
  assert "*" in line16


def test_edge_label_means_no_lr_was_tried_on_one_side(workdir, out):
  # The table's legend: "(edge): no LR was tried on one side of it".
  with open(out["paths"]["report.md"], encoding="utf-8") as f:
    headers, cells = markdown_tables(f.read())[0]
  rows = read_results(workdir)
  table = {int(r["global_batch"]): r for r in read_csv(out["paths"]["summary.csv"])}
  for line in cells:
    batch = int(line[0].replace(",", ""))
    tried = sorted({r["lr"] for r in rows if r["global_batch"] == batch})
    lr = value(table[batch]["lr"])
    at_edge = lr in (tried[0], tried[-1])
    assert line[headers.index("LR")].endswith("(edge)") == at_edge, (batch, lr, tried)


def test_recommendation_follows_from_the_table(workdir, out):
  # Without a critical-batch plan, the recommendation is the table's least time to target.
  rows, points = read_results(workdir), read_points(workdir)
  rec = recommend.recommend(rows, best_per_batch(rows, points), points)
  table = {int(r["global_batch"]): r for r in read_csv(out["paths"]["summary.csv"])}
  timed = {b: value(r["time_to_target_s"]) for b, r in table.items()
           if r["time_to_target_s"] != ""}
  fastest = min(timed, key=timed.get)
  # Independently: steps x (10 + 0.1 B) ms: 64 at 300 steps x 16.4 ms beats 32 at 385 x 13.2.
  assert fastest == 64 == rec["fastest_batch"] and rec["fastest_basis"] == "time_to_target_s"

  r = table[fastest]
  sentences = [s for s in re.split(r"(?<=[.)])\s+(?=[A-Z])", rec["text"]) if s]
  assert len(sentences) == 2, sentences
  first, last = sentences
  steps, step_ms, seconds = (value(r[k]) for k in ("steps_to_target", "step_time_ms",
                                                    "time_to_target_s"))
  for claim in (f"Train with global batch {fastest}:", "accuracy >= 0.9",
                f"in {fmt.number(int(steps))} steps", f"(median of {r['seeds_at_lr']} seed(s))",
                f"x {fmt.number(step_ms)} ms per step", f"= {fmt.number(seconds)} s",
                f"at lr {fmt.number(value(r['lr']))} (×{value(r['lr_multiplier']):g})",
                f"median of {r['timed_windows']} timed windows"):
    assert claim in first, (claim, first)
  # The arithmetic it shows holds for the numbers it shows.
  shown = re.search(r"in ([\d,]+) steps .* x ([\d.]+) ms per step .*\) = ([\d.]+) s", first)
  n, ms, s = (float(g.replace(",", "")) for g in shown.groups())
  assert n * ms / 1e3 == pytest.approx(s, rel=5e-3)
  assert last == f"See the {len(rec['warnings'])} warning(s) below."
  # The report's own recommendation comes from the fit's plan when it has one, and then
  # names the plan's batch and the measured figures of that batch.
  report_rec, plan = out["recommendation"], out["answer"]["plan"]
  with open(out["paths"]["report.md"], encoding="utf-8") as f:
    assert report_rec["text"] in f.read()
  if plan["status"] == "ok":
    pick = plan["recommended"]["global_batch"]
    assert report_rec["fastest_batch"] == pick and report_rec["fastest_basis"] == "fit"
    assert report_rec["text"].startswith(f"Train with global batch {pick} ")
    assert plan["text"] in report_rec["text"]
  else:
    assert report_rec["fastest_batch"] == rec["fastest_batch"]


def test_every_warning_is_true_of_the_rows_and_the_table(workdir, out):
  rows = read_results(workdir)
  table = {int(r["global_batch"]): r for r in read_csv(out["paths"]["summary.csv"])}
  warnings = out["recommendation"]["warnings"]
  checked = set()

  def find(pattern):
    hits = [w for w in warnings if re.search(pattern, w)]
    checked.update(hits)
    return hits

  (diverged,) = find("diverged")
  bad = [r for r in rows if r["status"] == "diverged"]
  assert diverged.startswith(f"{len(bad)} trial(s) diverged under the 'linear' LR rule")
  for r in bad:
    assert (f"batch {r['global_batch']} at lr {fmt.number(r['lr'])}" in diverged
            and f"step {r['diverged_step']}" in diverged)
  missed = find("missed the target")
  never = sorted(b for b in table if b in SWEEP
                 and not any(r["status"] == "ok" for r in rows if r["global_batch"] == b))
  assert [int(re.search(r"Batch (\d+)", w).group(1)) for w in missed] == never == [256]
  assert all(fmt.number(lr_of(256, m)) in missed[0] for m in SWEEP[256])
  (edge,) = find("edge of the LRs tried")
  at_edge = sorted(b for b, r in table.items()
                   if r["lr_interior"] == "False" and r["steps_to_target"] != "")
  assert sorted(int(b) for b in re.findall(r"(\d+) \(×", edge)) == at_edge == [16, 32]
  (thin,) = find("fewer than 3 timed windows")
  assert [b for b, r in table.items() if r["timed_windows"] not in ("", "7")] == [THIN_BATCH]
  (missing,) = find("No throughput point")
  assert [b for b, r in table.items() if r["samples_per_sec"] == ""] == [512]
  assert "batch 512" in missing
  (oom,) = find("ran out of memory")
  assert oom.startswith("Batch 512 ran out of memory (trial b512-m1-s0")
  (error,) = find("failed with an error")
  assert "b8-m4-s0" in error and error.endswith("ValueError: bad shape (8, 3)")
  # Throughput grows by more than 10% from every batch to every batch of twice its size,
  # so there is no plateau to warn about.
  rates = {b: value(r["samples_per_sec"]) for b, r in table.items() if r["samples_per_sec"]}
  plateau = [b for b in rates if any(c >= 2 * b for c in rates)
             and all(rates[c] < 1.1 * rates[b] for c in rates if c >= 2 * b)]
  assert plateau == [] and not find("plateau")
  assert not find("code versions")  # one measurement version throughout
  assert set(warnings) == checked  # nothing else was claimed


def test_mixed_measurement_versions_are_warned_about(tmp_path):
  old = version.MEASUREMENT_VERSION - 1
  rows = sweep_rows({32: {1.0: [400]}, 64: {1.0: [300]}}, version_=old)
  rows += sweep_rows({32: {1.0: [380]}, 64: {1.0: [310]}})
  points = [make_point(b, version_=v) for b in (32, 64)
            for v in (old, version.MEASUREMENT_VERSION)]
  best = best_per_batch(rows, points)
  rec = recommend.recommend(rows, best, points)
  (mixed,) = [w for w in rec["warnings"] if "different code versions" in w]
  assert f"measurement_version {old}, {version.MEASUREMENT_VERSION}" in mixed
  # One version alone: no warning.
  current = [r for r in rows if r["measurement_version"] == version.MEASUREMENT_VERSION]
  same = recommend.recommend(current, best_per_batch(current, points[1::2]), points[1::2])
  assert not [w for w in same["warnings"] if "code versions" in w]


def test_plots_decode_and_html_is_self_contained(workdir, out):
  paths = out["paths"]
  pngs = [name for name in paths if name.endswith(".png")]
  fitted = out["answer"]["fit"]["status"] == "ok"
  assert sorted(pngs) == sorted(["throughput.png", "fit.png", "time_to_target.png",
                                 "memory.png", "curves.png"]
                                + (["time_to_target_fit.png"] if fitted else []))
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
  trials = markdown_tables(markdown)[-1][1]  # the appendix is the last table
  assert len(trials) == len(read_results(workdir))  # every trial is in the appendix
  assert markdown.count("b32-m1-s") == 3
  assert "RESOURCE_EXHAUSTED: out of memory \\| alloc" in markdown  # escaped pipe


def test_throughput_only_workload_renders(tmp_path):
  sps = {8: 1000, 16: 1900, 32: 3000, 64: 3100, 128: 3150}
  for batch, s in sps.items():
    append_row(str(tmp_path), make_row(batch, status="ok", target=None))
    append_row(str(tmp_path), make_point(batch, step_ms=batch / s * 1000), THROUGHPUT_FILE)
  rows, points = read_results(str(tmp_path)), read_points(str(tmp_path))
  rec = recommend.recommend(rows, best_per_batch(rows, points), points)
  assert rec["fastest_batch"] == max(sps, key=sps.get) and rec["fastest_basis"] == (
      "samples_per_sec")
  assert f"global batch 128 runs the most samples/sec ({sps[128]:,.0f}" in rec["text"]
  # 64 and 128 run less than 10% faster than 32; 32 runs 58% faster than 16.
  (flat,) = [w for w in rec["warnings"] if "plateaus" in w]
  assert flat.startswith("Throughput plateaus at batch 32 (3,000 samples/sec): batches 64, 128 "
                         "run less than 10% faster, so they only pay off")
  # One batch beyond the plateau reads in the singular.
  one = [r for r in rows if r["global_batch"] <= 64]
  (flat,) = [w for w in recommend.recommend(one, best_per_batch(one, points), points)[
      "warnings"] if "plateaus" in w]
  assert flat.startswith("Throughput plateaus at batch 32 (3,000 samples/sec): batch 64 runs "
                         "less than 10% faster, so it only pays off if it cuts steps")
  os.makedirs(tmp_path / "report")
  (tmp_path / "report" / "time_to_target.png").write_bytes(b"stale plot")
  paths = render.write_report(str(tmp_path))["paths"]
  assert "throughput.png" in paths and "time_to_target.png" not in paths
  assert "fit.png" not in paths  # no target, no fit
  assert not (tmp_path / "report" / "time_to_target.png").exists()
  with open(paths["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  assert "time_to_target.png skipped" in markdown
  assert "## The critical batch size" not in markdown
  table = read_csv(paths["summary.csv"])
  assert [int(r["global_batch"]) for r in table] == list(sps)
  assert [value(r["samples_per_sec"]) for r in table] == pytest.approx(list(sps.values()))


def test_empty_workdir_writes_a_report(tmp_path):
  paths = render.write_report(str(tmp_path))["paths"]
  assert not [n for n in paths if n.endswith(".png")]
  rec = recommend.recommend([], [], [])
  assert rec["fastest_batch"] is None and rec["text"] == "No results yet."
  assert os.path.exists(paths["report.html"])


def summary_of(markdown):
  """The per-batch table of a report (its first table): headers and rows by batch."""
  headers, rows = markdown_tables(markdown)[0]
  return headers, {int(r[0].replace(",", "")): dict(zip(headers, r, strict=True)) for r in rows}


def test_tflops_and_mfu_columns_come_from_the_point(workdir, out):
  points = {p["global_batch"]: p for p in read_points(workdir)}
  for line in read_csv(out["paths"]["summary.csv"]):
    point = points.get(int(line["global_batch"]))
    if point is None:
      assert line["tflops_per_sec_per_device"] == line["mfu"] == ""
      continue
    # TFLOP/s per device = model FLOPs per example x the point's samples/sec / devices.
    assert value(line["tflops_per_sec_per_device"]) == pytest.approx(
        point["model_flops_per_example"] * point["samples_per_sec"] / point["num_devices"]
        / 1e12, rel=1e-12)
    assert line["model_flops_source"] == "xla" and line["mfu"] == ""
    assert line["peak_source"] == CPU_PEAK_NOTE and line["compute_dtype"] == "float32"
  with open(out["paths"]["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  headers, rows = summary_of(markdown)
  assert headers.index("MFU") == headers.index("TFLOP/s/dev") + 1
  for batch, row in rows.items():
    point = points.get(batch)
    assert row["TFLOP/s/dev"] == fmt.number(point and point["tflops_per_sec_per_device"])
    assert row["MFU"] == "-"


def test_mfu_note_names_why_and_flops_line_names_the_source(workdir, out):
  with open(out["paths"]["report.md"], encoding="utf-8") as f:
    lines = f.read().splitlines()
  with_point = sorted(p["global_batch"] for p in read_points(workdir))
  without = sorted({r["global_batch"] for r in read_results(workdir)} - set(with_point))
  assert without == [512]
  notes = [line for line in lines if line.startswith("MFU '-'")]
  assert notes == [f"MFU '-' at batches {', '.join(map(str, with_point))}: {CPU_PEAK_NOTE}. "
                   "MFU '-' at batch 512: no throughput point."]
  (flops,) = [line for line in lines if line.startswith("Model FLOPs per example")]
  assert flops.startswith("Model FLOPs per example: XLA's cost analysis of the compiled train "
                          "step divided by the global batch")
  assert "Compute dtype: float32." in flops and "TFLOP/s, " not in flops  # no peak: none named
  console = tables.console_table(out["best"]).splitlines()
  assert console[-1] == notes[0] and "MFU" in console[0].split()


def test_mfu_note_appears_exactly_when_an_mfu_is_null(tmp_path):
  workdir = str(tmp_path)
  for batch in (8, 16):
    append_row(workdir, make_row(batch, status="ok", steps=100))
    append_row(workdir, make_point(batch, peak=0.5), THROUGHPUT_FILE)
  report = render.write_report(workdir)
  with open(report["paths"]["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  points = {p["global_batch"]: p for p in read_points(workdir)}
  _, rows = summary_of(markdown)
  for batch, row in rows.items():  # MFU = TFLOP/s per device / the peak given
    mfu = points[batch]["tflops_per_sec_per_device"] / 0.5
    assert row["MFU"] == f"{mfu:.1%}"
  assert "MFU '-'" not in markdown
  assert "(0.5 TFLOP/s, peak_tflops (given))" in markdown
  assert "\nMFU" not in tables.console_table(report["best"])

  append_row(workdir, make_row(32, status="ok", steps=100))
  append_row(workdir, make_point(32), THROUGHPUT_FILE)  # no peak known for this one
  report = render.write_report(workdir)
  with open(report["paths"]["report.md"], encoding="utf-8") as f:
    markdown = f.read()
  _, rows = summary_of(markdown)
  assert [row["MFU"] == "-" for row in rows.values()] == [False, False, True]
  assert [line for line in markdown.splitlines() if "MFU '-'" in line] == [
      f"MFU '-' at batch 32: {CPU_PEAK_NOTE}."]


def test_format_bytes():
  assert fmt.format_bytes(512) == "512 B"
  assert fmt.format_bytes(12.3 * 2**20) == "12.3 MiB"
  assert fmt.format_bytes(3 * 2**30) == "3.0 GiB"
  assert fmt.format_bytes(None) == "-"
