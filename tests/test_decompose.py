"""Tests of ``decompose``: the splits offered, their equivalence, inference mode, bad input."""

import csv
import json
import os

import numpy as np
import pytest
from absl import flags

from batchbench import config as config_lib
from batchbench import decompose, main
from batchbench.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_devices=0):
  """digits_mlp (SGD with momentum) with one hidden layer of 32 units."""
  c = config_lib.default_config()
  c.workload = "digits_mlp"
  c.workload_options.hidden = (32,)
  c.max_steps = 8
  c.num_devices = num_devices
  return c




def brute_force_splits(batch, max_devices):
  return {(d, a) for d in range(1, max_devices + 1) for a in range(1, batch + 1)
          if batch % (d * a) == 0}


@pytest.mark.parametrize("batch,max_devices", [(12, 8), (7, 8), (1024, 8), (8, 1), (1, 8)])
def test_splits_are_exactly_those_that_divide(batch, max_devices):
  offered = decompose.splits(batch, max_devices)
  assert {(s.num_devices, s.accum_steps) for s in offered} == brute_force_splits(
      batch, max_devices)
  assert len(offered) == len(set(offered))
  assert (offered[0].num_devices, offered[0].accum_steps) == (1, 1)  # the reference first
  for s in offered:
    assert s.num_devices * s.accum_steps * s.per_device_batch == batch


def test_splits_never_offer_a_degree_that_does_not_divide():
  degrees = {s.num_devices for s in decompose.splits(12, 8)}
  assert degrees == {1, 2, 3, 4, 6}  # 5, 7 and 8 do not divide 12
  assert {(s.num_devices, s.accum_steps) for s in decompose.splits(7, 8)} == {
      (1, 1), (1, 7), (7, 1)}


def test_update_rel_diff_measures_the_update_not_the_params():
  before = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
  ref = {"w": before["w"] - 0.01, "b": before["b"] + 0.1}
  assert decompose.update_rel_diff(before, ref, ref) == 0.0
  off = {"w": ref["w"] * (1 + 1e-3), "b": ref["b"]}  # 1e-3 of params is 0.1 of the update
  assert decompose.update_rel_diff(before, off, ref) == pytest.approx(0.099, rel=0.02)
  scaled = {"w": before["w"] - 0.02, "b": before["b"] + 0.2}  # twice the update
  assert decompose.update_rel_diff(before, scaled, ref) == pytest.approx(1.0)
  still = {"w": before["w"], "b": before["b"]}
  assert decompose.update_rel_diff(before, off, {**ref, "w": still["w"]}) > 0  # no div by 0


@pytest.fixture(name="decomposed", scope="module")
def fixture_decomposed(tmp_path_factory):
  """Every split of global batch 4 over up to 2 devices, one-step windows."""
  workdir = str(tmp_path_factory.mktemp("decompose"))
  result = decompose.run_decompose(tiny_config(num_devices=2), workdir, 4, window_steps=1,
                                   windows=2, log=None)
  return {"workdir": workdir, "result": result}


def test_all_splits_give_the_same_update(decomposed):
  result = decomposed["result"]
  rows = result["rows"]
  assert {(r["num_devices"], r["accum_steps"]) for r in rows} == brute_force_splits(4, 2)
  assert result["reference"] == {"num_devices": 1, "accum_steps": 1}
  assert rows[0]["max_rel_diff"] == 0.0
  for r in rows:
    assert r["status"] == "ok" and r["equivalent"] is True, r
    assert r["max_rel_diff"] <= decompose.EQUIVALENCE_TOLERANCE
    assert r["num_devices"] * r["per_device_batch"] * r["accum_steps"] == 4
    assert r["samples_per_sec"] > 0 and r["timed_windows"] == 2
    assert r["compile_s"] > 0 and r["peak_bytes"] > 0
  assert result["not_equivalent"] == []
  fastest = result["fastest"]
  assert fastest["samples_per_sec"] == max(r["samples_per_sec"] for r in rows)
  assert [r["fastest"] for r in rows].count(True) == 1


def test_decompose_writes_one_row_per_split(decomposed):
  out = os.path.join(decomposed["workdir"], "decompose")
  with open(os.path.join(out, "decompose.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["num_devices"]), int(r["accum_steps"])) for r in rows] == [
      (r["num_devices"], r["accum_steps"]) for r in decomposed["result"]["rows"]]
  with open(os.path.join(out, "decompose.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["global_batch"] == 4 and len(saved["rows"]) == len(rows)
  with open(os.path.join(out, "decompose.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_fastest_skips_over_budget_and_not_equivalent_splits():
  rows = [{"status": "ok", "equivalent": True, "samples_per_sec": 10.0},
          {"status": "over_budget", "equivalent": None, "samples_per_sec": None},
          {"status": "ok", "equivalent": False, "samples_per_sec": 99.0},
          {"status": "ok", "equivalent": True, "samples_per_sec": 20.0}]
  assert decompose.pick_fastest(rows) is rows[3]
  assert [r["fastest"] for r in rows] == [False, False, False, True]
  assert decompose.pick_fastest(rows[1:3]) is None


def test_inference_writes_one_row_per_size_and_count(tmp_path):
  result = decompose.run(tiny_config(num_devices=1), str(tmp_path), mode="inference",
                         total=12, log=None)
  pairs = [(r["batch_size"], r["batch_count"]) for r in result["rows"]]
  assert pairs == [(1, 12), (2, 6), (4, 3)]  # powers of two dividing 12
  for r in result["rows"]:
    assert r["samples_per_sec"] > 0 and r["latency_ms_median"] > 0 and r["peak_bytes"] > 0
  with open(tmp_path / "decompose" / "inference.csv", encoding="utf-8") as f:
    saved = [(int(r["batch_size"]), int(r["batch_count"])) for r in csv.DictReader(f)]
  assert saved == pairs
  assert (tmp_path / "decompose" / "inference.png").exists()


@pytest.mark.parametrize("field,kwargs", [
    ("global_batch", {"global_batch": 0}), ("global_batch", {"global_batch": -4}),
    ("global_batch", {"global_batch": 4096}),  # more than digits' 1,437 training examples
    ("mode", {"mode": "train2"}),
    ("total", {"mode": "inference"}), ("total", {"mode": "inference", "total": 0}),
    ("total", {"mode": "inference", "total": 12}),  # 8 devices do not divide 12
])
def test_bad_decompose_input_fails_before_compiling(field, kwargs, tmp_path, no_compile):
  with pytest.raises(ConfigError) as err:
    decompose.run(tiny_config(), str(tmp_path / "wd"), log=None, **kwargs)
  assert err.value.field == field
  assert not (tmp_path / "wd").exists()


@pytest.fixture(name="cli")
def fixture_cli():
  """Parses absl flags in this process and resets them afterwards."""
  def run(*args):
    argv = flags.FLAGS(["batchbench", *args])
    return main.main(argv)
  yield run
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("args,message", [
    (["--global_batch=0"], "global_batch=0: must be a positive integer"),
    (["--memory_budget=-1GiB"], "memory_budget='-1GiB': must be positive"),
    (["--mode=inference", "--total=12"], "total=12: must be divisible by the 8"),
])
def test_cli_bad_decompose_input_exits_2(args, message, cli, tmp_path, capsys, no_compile):
  workdir = tmp_path / "wd"
  status = cli("decompose", f"--config={os.path.join(REPO, 'configs', 'digits_mlp.py')}",
               f"--workdir={workdir}", *args)
  assert status == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()
