"""Tests of the memory probe: budget parsing, the search, and real (abstract) compiles on CPU."""

import csv
import json
import os
import re
import subprocess
import sys

import jax
import pytest
from conftest import REPO, load_config

from batchbench import config as config_lib
from batchbench import fmt
from batchbench.config import ConfigError
from batchbench.core.mesh import make_mesh
from batchbench.measure.memory import device_budget_bytes
from batchbench.report import probe_text
from batchbench.runs import probe, probe_ladder


def tiny_config():
  """digits_mlp with one hidden layer of 32: compiles fast, activations dominate at B>=256.

  Without the noise scale: its per-device step (shard_map, a cond) adds buffers that XLA
  reuses differently at 256 than at 384-512 (a line through 5 batches' bytes then has
  r^2 0.987 against 0.99999); these tests are about how activations scale."""
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.max_steps = 8
  c.gns.mode = "off"
  return c


class FakeDevice:
  """A device whose runtime reports ``bytes_limit`` (GPU/TPU-like), or nothing."""

  platform = "gpu"

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit}


# --- budgets ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
    ("1000000B", 1_000_000), ("64 KiB", 65_536), ("2gib", 2 * 2**30), (" 3TB ", 3 * 10**12),
    ("0.5KiB", 512),
])
def test_parse_bytes_accepts_sizes_with_units(text, expected):
  assert fmt.parse_bytes(text) == expected


@pytest.mark.parametrize("text,why", [
    ("1000000", "a unit is required"), ("-2GiB", "must be positive"),
    ("0GiB", "must be positive"), ("0.1B", "at least one byte"),
    ("2parsecs", "unknown unit"), ("GiB", "e.g. 2GiB"), ("", "e.g. 2GiB"),
    ("nan GiB", "e.g. 2GiB"), ("2 GiB GiB", "e.g. 2GiB"), (None, "e.g. 2GiB"),
])
def test_parse_bytes_rejects_with_field_value_and_valid(text, why):
  with pytest.raises(ConfigError) as err:
    fmt.parse_bytes(text, "memory_budget")
  assert err.value.field == "memory_budget" and err.value.value == text
  assert why in str(err.value) and "GiB" in str(err.value)


def test_default_budget_is_device_memory_minus_margin():
  assert device_budget_bytes([FakeDevice(10_000), FakeDevice(8_000)]) == 7_200
  assert device_budget_bytes([FakeDevice(None)]) is None
  assert device_budget_bytes(jax.local_devices()) is None  # CPU
  budget, source = probe.memory_budget(None, tiny_config(), [FakeDevice(1000)])
  assert budget == 900 and "minus 10%" in source


def test_budget_sources_in_order_argument_config_devices():
  c = tiny_config()
  devices = [FakeDevice(1000)]
  assert probe.memory_budget(None, c) == (None, None)  # no devices given, none configured
  c.memory_budget_bytes = 5000
  assert probe.memory_budget(None, c, devices) == (5000, "config.memory_budget_bytes")
  assert probe.memory_budget(7000, c, devices) == (7000, "--memory_budget")
  for bad in (0, -1, 1.5, True, "2GiB"):
    with pytest.raises(ConfigError) as err:
      probe.memory_budget(bad, c, devices)
    assert err.value.field == "memory_budget"


# --- the search -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["linear", "quadratic", "step"])
def test_search_finds_largest_batch_under_budget(shape):
  """Against brute force over every multiple of the unit, for several curves and budgets."""
  unit, cap = 8, 8 * 700
  peak = {"linear": lambda b: 1000 + 37 * b,
          "quadratic": lambda b: 5000 + 3 * b + b * b // 50,
          "step": lambda b: 2000 + 10 * b + (40_000 if b > 1000 else 0)}[shape]
  batches = probe.ladder(unit, cap)
  assert batches == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 5600]
  for budget in (peak(unit), peak(unit) + 1, peak(1000) + 5, peak(2000) - 1, peak(cap) - 1,
                 peak(cap)):
    compiled = []
    largest, over = probe.search_largest(lambda b: compiled.append(b) or peak(b), batches,
                                         unit, budget)
    expected = max(b for b in range(unit, cap + 1, unit) if peak(b) <= budget)
    assert largest == expected
    if expected == cap:
      assert over is None
    else:
      assert over == expected + unit and peak(over) > budget
    assert len(compiled) <= len(batches) + 2 * 10  # ladder + at most 2 log2(width) steps
  assert probe.search_largest(peak, batches, unit, peak(unit) - 1) == (None, 8)


def test_fit_memory_recovers_a_line():
  points = [{"global_batch": b, "peak_bytes": 4096 + 100 * b} for b in (8, 16, 64, 256)]
  fit = probe.fit_memory(points)
  assert fit["fixed_bytes"] == pytest.approx(4096) and fit["bytes_per_example"] == (
      pytest.approx(100))
  assert fit["r2"] == pytest.approx(1.0) and fit["max_residual_bytes"] == pytest.approx(0, abs=1e-6)
  assert probe.fit_memory(points[:1]) is None


# --- real probes: abstract compiles through the builder ---------------------------------

@pytest.fixture(name="probed", scope="module")
def fixture_probed(tmp_path_factory):
  """One real compile-only probe on 8 devices between batches 256 and 512, its budget
  between them.

  The first probe runs under a transfer guard that refuses every host-to-device copy,
  with ``build`` watched: without ``measure`` it must compile abstract programs and
  place nothing.
  """
  workdir = str(tmp_path_factory.mktemp("probe"))
  config, cache, builds = tiny_config(), {}, []
  real_build = probe.build

  def watched_build(spec, **kwargs):
    builds.append((spec.global_batch, kwargs))
    return real_build(spec, **kwargs)

  live_before = {id(a) for a in jax.live_arrays()}
  with pytest.MonkeyPatch.context() as patch, jax.transfer_guard("disallow_explicit"):
    patch.setattr(probe_ladder, "build", watched_build)
    first = probe.run_probe(config, workdir, memory_budget_bytes=2**30, max_batch=512,
                            min_batch=256, cache=cache, measure=False, log=None)
  new_arrays = [a for a in jax.live_arrays() if id(a) not in live_before]
  peaks = {p["global_batch"]: p["peak_bytes"] for p in first["points"]}
  budget = (peaks[256] + peaks[512]) // 2
  lines = []
  result = probe.run_probe(config, workdir, memory_budget_bytes=budget, max_batch=512,
                           min_batch=256, cache=cache, measure=False, log=lines.append)
  return {"workdir": workdir, "first": first, "result": result, "budget": budget,
          "cache": cache, "config": config, "builds": builds, "new_arrays": new_arrays,
          "lines": lines}


def test_probe_compiles_abstract_programs_and_places_nothing(probed):
  # Every compile went through the one builder, abstract, once per batch.
  assert sorted(b for b, _ in probed["builds"]) == [256, 512]
  assert all(kwargs.get("abstract") is True for _, kwargs in probed["builds"])
  assert probed["new_arrays"] == []  # and the transfer guard saw no host-to-device copy


def test_probe_compiled_bytes_grow_with_batch(probed):
  answer = probed["first"]["answer"]  # a budget of 1 GiB: every batch fits
  assert (answer["global_batch"], answer["limited_by"], answer["next_batch"]) == (
      512, "max_batch", None)
  points = probed["result"]["points"]
  batches = [p["global_batch"] for p in points]
  assert batches == sorted(batches) and batches[0] == 256 and batches[-1] == 512
  assert all(b % 8 == 0 for b in batches)  # 8 devices: only batches they divide
  for small, large in zip(points[:-1], points[1:], strict=True):
    assert large["peak_bytes"] > small["peak_bytes"]
    assert large["temp_bytes"] > small["temp_bytes"]
    assert large["flops_per_step"] > small["flops_per_step"]
  assert points[-1]["flops_per_step"] == pytest.approx(2 * points[0]["flops_per_step"], rel=0.02)
  for p in points:  # the peak is computed from XLA's parts
    assert p["peak_bytes"] == (p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"]
                               - p["alias_bytes"])
  fit = probed["result"]["fit"]
  assert fit["bytes_per_example"] > 0 and fit["r2"] > 0.99


def test_probe_answer_checked_against_direct_compiles(probed):
  result, budget = probed["result"], probed["budget"]
  answer = result["answer"]
  assert answer["limited_by"] == "memory_budget" and 256 <= answer["global_batch"] < 512
  assert answer["next_batch"] == answer["global_batch"] + 8
  assert [p["fits"] for p in result["points"]] == [
      p["peak_bytes"] <= budget for p in result["points"]]

  def direct_peak(batch):  # a fresh compile, not the probe's cache
    spec = config_lib.resolve(probe.with_fields(probed["config"], global_batch=batch), 8)
    return probe.compiled_peak_bytes(spec)

  assert direct_peak(answer["global_batch"]) == answer["peak_bytes"] <= budget
  assert direct_peak(answer["global_batch"] + 8) == answer["next_peak_bytes"] > budget


def test_probe_writes_table_json_and_plot(probed):
  out = os.path.join(probed["workdir"], "probe")
  with open(os.path.join(out, "probe.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["answer"] == probed["result"]["answer"]
  assert saved["budget_bytes"] == probed["budget"]
  with open(os.path.join(out, "probe.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["global_batch"]) for r in rows] == [
      p["global_batch"] for p in probed["result"]["points"]]
  with open(os.path.join(out, "probe.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_budget_below_smallest_batch_is_a_clear_error(probed, tmp_path, no_compile):
  smallest = next(p for p in probed["result"]["points"] if p["global_batch"] == 256)
  with pytest.raises(ConfigError) as err:  # the cache holds batch 256: nothing compiles
    probe.run_probe(probed["config"], str(tmp_path / "wd"),
                    memory_budget_bytes=smallest["peak_bytes"] - 1, max_batch=512,
                    min_batch=256, cache=probed["cache"], log=None)
  assert err.value.field == "memory_budget"
  assert "smallest global batch 256" in str(err.value)
  assert f"{smallest['peak_bytes']:,} bytes" in str(err.value)
  # Known only from a compiled peak, so after open_workdir made the directory: nothing in it.
  assert os.listdir(tmp_path / "wd") == []


@pytest.mark.parametrize("field,kwargs", [
    ("max_batch", {"max_batch": 0}), ("max_batch", {"max_batch": -64}),
    ("max_batch", {"max_batch": 12}),  # not divisible by the 8 devices
    ("min_batch", {"min_batch": 4}), ("memory_budget", {"memory_budget_bytes": -1}),
    ("memory_budget", {}),  # CPU reports no device memory: a budget is required
])
def test_bad_probe_input_fails_before_compiling(field, kwargs, tmp_path, no_compile):
  with pytest.raises(ConfigError) as err:
    probe.run_probe(tiny_config(), str(tmp_path / "wd"), **kwargs, log=None)
  assert err.value.field == field
  assert not (tmp_path / "wd").exists()


def test_cli_bad_budget_exits_2_before_creating_anything(tmp_path):
  workdir = tmp_path / "wd"
  cmd = [sys.executable, "-m", "batchbench", "probe",
         f"--config={REPO / 'configs' / 'digits_mlp.py'}",
         f"--workdir={workdir}", "--memory_budget=1000000"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode == 2, out.stderr
  assert "memory_budget='1000000'" in out.stderr and "unit is required" in out.stderr
  assert "e.g. 2GiB" in out.stderr
  assert not workdir.exists()


def test_measure_device_peak_runs_real_steps_but_reports_none_on_cpu():
  """The GPU/TPU comparison path runs its steps on CPU too; CPU reports no peak to compare."""
  spec = config_lib.resolve(probe.with_fields(tiny_config(), global_batch=16), 8)
  assert probe.measure_device_peak(spec, make_mesh(8), calls=2, log=None) is None


# --- speed: TFLOP/s and MFU of the batches that fit -------------------------------------

def speed_table(lines, points):
  """The cells of the probe's speed table (one row per point that fits), by batch."""
  start = next(i for i, line in enumerate(lines) if line.startswith("speed at the batches"))
  header = lines[start + 1].split()
  assert header[:2] == ["global_batch", "model"] and header[-2:] == ["TFLOP/s/dev", "MFU"]
  rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 2:start + 2 + len(points)]]
  return {int(r[0].replace(",", "")): r for r in rows}


def test_untimed_points_carry_flops_but_no_rate(probed):
  points = probed["result"]["points"]
  for p in points:
    assert p["model_flops_source"] == "xla"  # digits_mlp has no analytic count
    assert p["model_flops_per_example"] == pytest.approx(p["flops_per_step"] / p["global_batch"])
    assert p["samples_per_sec"] is p["tflops_per_sec_per_device"] is p["mfu"] is None
  notes = [line for line in probed["lines"] if line.startswith("MFU '-'")]
  assert notes == ["MFU '-' at every batch: not timed (--noprobe_time)."]


def timed_config(num_devices=2, **fields):
  c = tiny_config()
  c.num_devices = num_devices
  c.throughput.min_seconds, c.throughput.max_seconds = 0.05, 0.5
  c.update(fields)
  return c


@pytest.fixture(name="timed", scope="module")
def fixture_timed(tmp_path_factory):
  """A probe that times the batches that fit (64 and 128, on 2 devices), every compile
  watched: timing must run the programs the probe compiled, not compile them again."""
  from batchbench.core import program  # pylint: disable=g-import-not-at-top

  workdir, lines, compiles = str(tmp_path_factory.mktemp("timed")), [], []
  real_aot = program.aot

  def watched_aot(fn, args, *rest, **kwargs):
    compiles.append(fn)
    return real_aot(fn, args, *rest, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(program, "aot", watched_aot)
    result = probe.run_probe(timed_config(), workdir, memory_budget_bytes=2**30,
                             min_batch=64, max_batch=128, log=lines.append)
  return {"result": result, "lines": lines, "compiles": compiles, "workdir": workdir}


def test_probe_times_each_batch_that_fits_on_the_program_it_compiled(timed):
  result = timed["result"]
  assert [p["global_batch"] for p in result["points"]] == [64, 128]
  assert len(timed["compiles"]) == 2  # one compile per batch; timing reused them
  assert result["timing"] == {"warmup_calls": 1, "min_windows": 3, "min_seconds": 0.05,
                              "max_seconds": 0.5}  # the config's, under the probe's caps
  for p in result["points"]:
    assert p["fits"] and p["samples_per_sec"] > 0 and p["timed_windows"] >= 1
    assert p["time_error"] is None
    # The step time is the same windows' work: batch / rate, to the spread of the windows.
    q25, q75 = p["samples_per_sec_iqr"]
    assert q25 <= p["global_batch"] / (p["step_time_ms"] / 1e3) * 1.0001
    assert p["global_batch"] / (p["step_time_ms"] / 1e3) <= q75 * 1.0001


def test_probe_tflops_is_flops_times_rate_per_device_and_mfu_null_on_cpu(timed):
  for p in timed["result"]["points"]:
    assert p["model_flops_source"] == "xla"
    assert p["model_flops_per_example"] == pytest.approx(p["flops_per_step"] / p["global_batch"])
    assert p["tflops_per_sec_per_device"] == pytest.approx(
        p["model_flops_per_example"] * p["samples_per_sec"] / 2 / 1e12, rel=1e-12)
    assert p["mfu"] is None and p["peak_tflops"] is None
    assert "no peak known for 'cpu'" in p["peak_source"]
    assert "--config.peak_tflops" in p["peak_source"]
  lines, points = timed["lines"], timed["result"]["points"]
  cells = speed_table(lines, points)
  for p in points:
    assert cells[p["global_batch"]][-2] == fmt.number(p["tflops_per_sec_per_device"])
    assert cells[p["global_batch"]][-1] == "-"
  # One note line, carrying the peak_source note.
  notes = [line for line in lines if line.startswith("MFU '-'")]
  assert notes == [f"MFU '-' at every batch: {points[0]['peak_source']}."]
  assert any(line.startswith("Model FLOPs per example: XLA's cost analysis") and
             "Compute dtype: float32." in line for line in lines)
  assert lines.count("remat is not available for workload digits_mlp (it takes no remat "
                     "option)") == 1


def test_probe_files_carry_the_speed_fields(timed):
  out = os.path.join(timed["workdir"], "probe")
  with open(os.path.join(out, "probe.json"), encoding="utf-8") as f:
    saved = json.load(f)
  with open(os.path.join(out, "probe.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for p, s, row in zip(timed["result"]["points"], saved["points"], rows, strict=True):
    for key in ("model_flops_per_example", "model_flops_source", "samples_per_sec",
                "tflops_per_sec_per_device", "peak_tflops", "peak_source", "mfu"):
      assert s[key] == p[key], key
      assert row[key] == ("" if p[key] is None else str(p[key])), key
  assert saved["remat"] == {"available": False, "note": "remat is not available for workload "
                            "digits_mlp (it takes no remat option)"}


def test_given_peak_gives_mfu_and_no_note(tmp_path):
  lines = []
  result = probe.run_probe(timed_config(peak_tflops=0.5), str(tmp_path),
                           memory_budget_bytes=2**30, min_batch=64, max_batch=64,
                           log=lines.append)
  (p,) = result["points"]
  assert (p["peak_tflops"], p["peak_source"]) == (0.5, "peak_tflops (given)")
  assert p["mfu"] == pytest.approx(p["tflops_per_sec_per_device"] / 0.5, rel=1e-12)
  assert speed_table(lines, [p])[64][-1] == f"{p['mfu']:.1%}"
  assert not [line for line in lines if line.startswith("MFU '-'")]
  assert any("0.5 TFLOP/s, peak_tflops (given)" in line for line in lines)


# --- remat: the largest batch with and without, under the same budget -------------------

class CurveProber(probe.Prober):
  """A prober whose compiles read a given memory curve per remat setting (no XLA)."""

  def __init__(self, curves, budget, batches, unit):
    super().__init__(available=8, mesh=None, workload=None, arrays=None, cache={},
                     budget=budget, batches=batches, unit=unit, cap_limit="max_batch",
                     timing={}, log=lambda _: None)
    self.curves, self.compiled = curves, []

  def compile(self, ladder, batch, phase):
    self.compiled.append((ladder.remat, batch))
    peak = self.curves[ladder.remat](batch)
    ladder.points[batch] = {"global_batch": batch, "remat": ladder.remat, "peak_bytes": peak,
                            "fits": peak <= self.budget, "phase": phase,
                            "samples_per_sec": None, "samples_per_sec_iqr": None}
    return peak


def test_remat_ladders_search_one_budget_and_compare_at_a_batch_both_fit():
  """Both settings searched under one budget, on a memory curve where remat keeps a
  third of the activations: the comparison's batches and text follow from the points."""
  unit, budget = 8, 1_000_000
  curves = {False: lambda b: 100_000 + 3_000 * b, True: lambda b: 100_000 + 1_000 * b}
  prober = CurveProber(curves, budget, probe.ladder(unit, 2048), unit)
  off, on = probe.Ladder(None, False), probe.Ladder(None, True)
  prober.search(off)
  prober.search(on)
  for ladder in (off, on):  # the largest multiple of 8 within budget, the next one over
    expected = max(b for b in range(unit, 2049, unit) if curves[ladder.remat](b) <= budget)
    assert (ladder.largest, ladder.over, ladder.limited_by) == (
        expected, expected + unit, "memory_budget")
  assert (off.largest, on.largest) == (296, 896)
  assert 296 not in on.points  # so the comparison compiles it with remat
  common = prober.common_batch(off, on)
  assert common == 296 and prober.compiled[-1] == (True, 296)
  off.points[296].update(samples_per_sec=1000.0, samples_per_sec_iqr=[990.0, 1010.0],
                         timed_windows=3)
  on.points[296].update(samples_per_sec=800.0, samples_per_sec_iqr=[790.0, 810.0],
                        timed_windows=3)
  comparison = probe.remat_comparison("w", off, on, common)
  assert comparison["throughput_cost"] == pytest.approx(0.2)
  lines = probe_text.remat_lines({"budget_bytes": budget, "remat": comparison,
                                  "timing": {"min_windows": 3}})
  assert "largest global batch: 296 without remat, 896 with remat (remat fits 600 more)" in lines
  assert ("at batch 296 (both fit): 1,000 (IQR 990-1,010) samples/s without remat, 800 (IQR "
          "790-810) with remat: remat costs 20.0% of throughput (medians; compare the IQRs)"
          in lines)


def tiny_lm_config():
  c = load_config("transformer_lm", "data=synthetic,seq_len=8")
  c.workload_options.update(d_model=16, num_layers=1, num_heads=1, d_ff=32, dropout_rate=0.0)
  c.update(num_devices=2, steps_per_call=1)
  c.throughput.min_seconds, c.throughput.max_seconds = 0.05, 0.5
  return c


def test_remat_probe_of_a_tiny_transformer(tmp_path):
  """Both settings compiled and timed at the same batch; on CPU, XLA removes remat's
  recomputation (it is a no-op there), so the largest batches are equal, not larger."""
  built, lines = [], []
  real_build = probe.build

  def watched_build(spec, **kwargs):
    built.append((spec.global_batch, dict(spec.workload_options).get("remat", False)))
    return real_build(spec, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(probe_ladder, "build", watched_build)
    result = probe.run_probe(tiny_lm_config(), str(tmp_path), memory_budget_bytes=2**30,
                             min_batch=16, max_batch=16, log=lines.append)
  assert sorted(built) == [(16, False), (16, True)]  # one compile each, reused for timing
  remat = result["remat"]
  off, on = remat["without"], remat["with"]
  assert remat["config_remat"] is False and result["points"] == off["points"]
  assert [p["remat"] for p in off["points"] + on["points"]] == [False, True]
  assert on["largest_batch"] >= off["largest_batch"] == 16
  assert remat["common_batch"] == 16
  rates = [s["points"][0]["samples_per_sec"] for s in (off, on)]
  assert [remat["samples_per_sec_without"], remat["samples_per_sec_with"]] == rates
  assert remat["throughput_cost"] == pytest.approx(1 - rates[1] / rates[0])
  for p in off["points"] + on["points"]:
    assert p["model_flops_source"] == "analytic"  # the same count with or without remat
    assert p["tflops_per_sec_per_device"] == pytest.approx(
        p["model_flops_per_example"] * p["samples_per_sec"] / 2 / 1e12, rel=1e-12)
  assert "largest global batch: 16 without remat, 16 with remat (the same)" in lines
  with open(tmp_path / "probe" / "probe.csv", encoding="utf-8") as f:
    assert [r["remat"] for r in csv.DictReader(f)] == ["False", "True"]
