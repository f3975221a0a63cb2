"""Tests of ``decompose``: the splits offered, their equivalence to the float64 update within
float32 rounding (and a wrong split's failure to be), inference mode, bad input."""

import csv
import json
import math
import os

import jax
import numpy as np
import pytest
from absl import flags
from conftest import REPO, load_config

from batchbench import config as config_lib
from batchbench import main
from batchbench.config import ConfigError
from batchbench.core import steps
from batchbench.core.program import build
from batchbench.runs import decompose
from batchbench.runs.probe import with_fields

EPS32 = float(np.finfo(np.float32).eps)


def tiny_config(num_devices=0):
  """digits_mlp (SGD with momentum) with one hidden layer of 32 units."""
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.max_steps = 8
  c.num_devices = num_devices
  return c


def mnist1d_config(cache_dir, num_devices):
  """configs/mnist1d_mlp.py (Adam, linear LR rule, warmup) on 1,000 examples, hidden (64,).

  One step per throughput call and the smallest windows resolve() accepts keep the timing
  of every split short; none of it changes the update a split computes.
  """
  c = load_config("mnist1d_mlp", "num_train=1000")
  c.workload_options.hidden = (64,)
  c.workload_options.num_test = 100
  c.workload_options.cache_dir = cache_dir
  c.num_devices = num_devices
  c.steps_per_call = 1
  c.throughput.warmup_calls = 1
  c.throughput.min_windows = 3
  c.throughput.min_seconds = 0.01
  return c


def brute_force_splits(batch, max_devices):
  return {(d, a) for d in range(1, max_devices + 1) for a in range(1, batch + 1)
          if batch % (d * a) == 0}


def label(d, p, a):
  return f"{d}dev x {p} x accum {a}"


# --- the splits offered, and the error measure ------------------------------------------

@pytest.mark.parametrize("batch,max_devices", [(12, 8), (7, 8), (1024, 8), (8, 1), (1, 8),
                                               (256, 4)])
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


def test_update_error_measures_the_update_not_the_params():
  before = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
  ref = {"w": before["w"] - 0.01, "b": before["b"] + 0.1}
  assert decompose.update_error(before, ref, ref) == 0.0
  off = {"w": ref["w"] * (1 + 1e-3), "b": ref["b"]}  # 1e-3 of params is 0.1 of the update
  assert decompose.update_error(before, off, ref) == pytest.approx(0.099, rel=0.02)
  scaled = {"w": before["w"] - 0.02, "b": before["b"] + 0.2}  # twice the update
  assert decompose.update_error(before, scaled, ref) == pytest.approx(1.0)
  still = {"w": before["w"], "b": before["b"]}
  # A tensor the reference does not move counts by its absolute difference (no 0/0).
  assert decompose.update_error(before, off, {**ref, "w": still["w"]}) == pytest.approx(
      np.linalg.norm(off["w"] - still["w"]), rel=1e-6)


def test_update_error_is_the_worst_tensors_relative_norm():
  """Against a direct float64 computation, per tensor, on random updates."""
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 2)}
  before = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  ref = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in before.items()}
  noise = {"a": 1e-4, "b": 3e-2, "c": 1e-6}  # "b" is the worst tensor
  after = {k: ref[k] + noise[k] * rng.normal(size=ref[k].shape).astype(np.float32)
           for k in shapes}
  per_tensor = {k: np.linalg.norm(after[k].astype(np.float64) - ref[k])
                / np.linalg.norm(ref[k].astype(np.float64) - before[k]) for k in shapes}
  assert max(per_tensor, key=per_tensor.get) == "b"
  assert decompose.update_error(before, after, ref) == pytest.approx(per_tensor["b"], rel=1e-9)


# --- mnist1d_mlp at B=256 on 4 devices: rounding is not a wrong split --------------------

@pytest.fixture(name="decomposed", scope="module")
def fixture_decomposed(tmp_path_factory):
  """Every split of global batch 256 over up to 4 devices (24 splits), Adam."""
  workdir = str(tmp_path_factory.mktemp("decompose"))
  config = mnist1d_config(str(tmp_path_factory.mktemp("mnist1d")), num_devices=4)
  result = decompose.run_decompose(config, workdir, 256, log=None)
  return {"workdir": workdir, "result": result, "config": config}


def test_every_split_of_mnist1d_reads_equivalent(decomposed):
  """The issue's case: float32 rounding of a different summation order is not flagged."""
  result = decomposed["result"]
  rows = result["rows"]
  assert [(r["num_devices"], r["accum_steps"]) for r in rows] == [
      (s.num_devices, s.accum_steps) for s in decompose.splits(256, 4)]
  assert {(r["num_devices"], r["accum_steps"]) for r in rows} == brute_force_splits(256, 4)
  assert len(rows) == 24 and result["equivalence_checked"] is True
  assert result["not_equivalent"] == []
  for r in rows:
    assert r["status"] == "ok" and r["equivalent"] is True, r
    assert 0 < r["error_vs_x64"] <= result["tolerance"]
    assert r["num_devices"] * r["per_device_batch"] * r["accum_steps"] == 256
    assert r["steps_per_call"] == 1  # the config's throughput calls
    assert r["samples_per_sec"] > 0 and r["timed_windows"] >= 3  # throughput.min_windows
    assert r["samples_per_sec_q25"] <= r["samples_per_sec"] <= r["samples_per_sec_q75"]
    assert r["compile_s"] > 0 and r["peak_bytes"] > 0
  assert result["throughput_settings"]["min_windows"] == 3
  fastest = result["fastest"]
  assert fastest["samples_per_sec"] == max(r["samples_per_sec"] for r in rows)
  assert [r["fastest"] for r in rows].count(True) == 1
  text = decompose.format_decompose(result)
  assert "every split gives the float64 update within float32 rounding" in text
  assert "NOT EQUIVALENT" not in text


def test_tolerance_is_measured_float32_rounding(decomposed):
  result, rows = decomposed["result"], decomposed["result"]["rows"]
  rounding = result["rounding"]
  assert EPS32 * math.sqrt(256) <= rounding <= 1e-3
  assert result["tolerance"] == decompose.ROUNDING_FACTOR * rounding
  assert result["rounding_factor"] == decompose.ROUNDING_FACTOR
  # The 1-device, no-accumulation split is the one whose error sets the rounding.
  assert rounding == max(rows[0]["error_vs_x64"], EPS32 * math.sqrt(256))


def _numpy_float64_update(params, x, y, lr, schedule_scale):
  """One Adam step of the MLP (Dense-ReLU-Dense, mean cross-entropy) in numpy float64.

  Adam's first step from zero moments is ``-lr * scale * g / (|g| + eps)`` (both bias
  corrections are exact at step 1).
  """
  p = {layer: {k: np.asarray(v, np.float64) for k, v in ps.items()}
       for layer, ps in params.items()}
  w0, b0, w1, b1 = (p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["Dense_1"]["kernel"],
                    p["Dense_1"]["bias"])
  x = np.asarray(x, np.float64)
  pre = x @ w0 + b0
  h = np.maximum(pre, 0.0)
  logits = h @ w1 + b1
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  dlogits = (probs - np.eye(logits.shape[1])[y]) / len(x)
  dh = (dlogits @ w1.T) * (pre > 0)
  grads = {"Dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
           "Dense_1": {"kernel": h.T @ dlogits, "bias": dlogits.sum(0)}}
  return {layer: {k: p[layer][k] - lr * schedule_scale * g / (np.abs(g) + 1e-8)
                  for k, g in gs.items()} for layer, gs in grads.items()}


def test_rounding_is_the_float32_updates_distance_from_an_independent_float64_update(
    decomposed):
  """If the reference were not float64 (or not the same step), rounding would not match."""
  config = decomposed["config"]
  spec = config_lib.resolve(with_fields(
      config, num_devices=1, accum_steps=1, global_batch=256, target_metric="none",
      target_value=None, max_examples=None, max_seconds=None, max_steps=1), 8)
  assert spec.optimizer == "adam" and spec.warmup_steps == 2048 // 256
  program = build(spec, flops=False)
  state = program.init_state(spec.seed, spec.lr)
  before = jax.device_get(state.params)
  feed = program.feed(spec.seed)(0, 1)
  after32 = jax.device_get(program.run(state, feed, 1, step=0)[0].params)
  train = program.workload.data().train
  idx = feed[0].reshape(-1)
  # The peak LR is held in the float32 optimizer state, which the float64 update widens;
  # the warmup ramp's first step trains at 1/warmup_steps of it.
  after64 = _numpy_float64_update(before, train["inputs"][idx], train["labels"][idx],
                                  float(np.float32(spec.lr)), 1.0 / spec.warmup_steps)
  error = decompose.update_error(before, after32, after64)
  assert error > EPS32 * math.sqrt(256)  # real rounding, not the floor
  assert decomposed["result"]["rounding"] == pytest.approx(error, rel=1e-3)


def test_decompose_writes_one_row_per_split(decomposed):
  out = os.path.join(decomposed["workdir"], "decompose")
  with open(os.path.join(out, "decompose.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["num_devices"]), int(r["accum_steps"])) for r in rows] == [
      (r["num_devices"], r["accum_steps"]) for r in decomposed["result"]["rows"]]
  assert [float(r["error_vs_x64"]) for r in rows] == pytest.approx(
      [r["error_vs_x64"] for r in decomposed["result"]["rows"]])
  with open(os.path.join(out, "decompose.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["global_batch"] == 256 and len(saved["rows"]) == len(rows) == 24
  assert saved["tolerance"] == decomposed["result"]["tolerance"]
  with open(os.path.join(out, "decompose.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"


# --- a wrong split still reads NOT EQUIVALENT --------------------------------------------

def _drop_last_micro_batch(make_train_call):
  """``make_train_call`` whose calls skip the last micro-batch of every accumulating step."""
  def make(workload, mesh, tx, *, micro_batch, traces=None, **kwargs):
    call = make_train_call(workload, mesh, tx, micro_batch=micro_batch, traces=traces,
                           **kwargs)

    def train_call(state, data, feed, num_steps):
      if feed.shape[1] > 1:  # (steps, accum_steps, micro_batch) indices
        feed = feed[:, :-1]
      return call(state, data, feed, num_steps)
    return train_call
  return make


@pytest.fixture(name="wrong", scope="module")
def fixture_wrong(tmp_path_factory):
  """Every split of global batch 8 over up to 2 devices, with accumulation broken."""
  config = mnist1d_config(str(tmp_path_factory.mktemp("mnist1d")), num_devices=2)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, "make_train_call", _drop_last_micro_batch(steps.make_train_call))
    result = decompose.run_decompose(config, str(tmp_path_factory.mktemp("wrong")), 8,
                                     log=None)
  return result


def test_a_split_that_drops_a_micro_batch_reads_not_equivalent(wrong):
  rows = wrong["rows"]
  assert {(r["num_devices"], r["accum_steps"]) for r in rows} == brute_force_splits(8, 2)
  flagged = [r for r in rows if r["accum_steps"] > 1]
  kept = [r for r in rows if r["accum_steps"] == 1]
  assert len(flagged) == 5 and len(kept) == 2
  for r in flagged:
    assert r["equivalent"] is False and r["error_vs_x64"] > wrong["tolerance"], r
  for r in kept:  # 1 and 2 devices without accumulation still compute the update
    assert r["equivalent"] is True and r["error_vs_x64"] <= wrong["tolerance"], r
  assert wrong["not_equivalent"] == [
      label(r["num_devices"], r["per_device_batch"], r["accum_steps"]) for r in flagged]
  assert not wrong["fastest"]["accum_steps"] > 1  # a flagged split is never named fastest
  text = decompose.format_decompose(wrong)
  assert "NOT EQUIVALENT" in text and all(label(r["num_devices"], r["per_device_batch"],
                                                r["accum_steps"]) in text for r in flagged)


@pytest.fixture(name="cli")
def fixture_cli():
  """Parses absl flags in this process and resets them afterwards."""
  def run(*args):
    argv = flags.FLAGS(["batchbench", *args])
    return main.main(argv)
  yield run
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("case,status", [("wrong", 1), ("decomposed", 0)])
def test_cli_exit_status_says_whether_a_split_is_not_equivalent(case, status, request, cli,
                                                                 monkeypatch, tmp_path, capsys):
  """The CLI's verdict on the two decompositions above (not rerun: their results are used)."""
  fixture = request.getfixturevalue(case)
  result = fixture if case == "wrong" else fixture["result"]
  monkeypatch.setattr(decompose, "run", lambda *args, **kwargs: result)
  assert cli("decompose", f"--config={REPO / 'configs' / 'mnist1d_mlp.py'}",
             f"--workdir={tmp_path}", "--quiet") == status
  out = capsys.readouterr().out
  assert ("NOT EQUIVALENT" in out) == (status == 1)


# --- the fastest pick, inference, bad input ---------------------------

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
    assert r["latency_ms_q25"] <= r["latency_ms_median"] <= r["latency_ms_q75"]
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


@pytest.mark.parametrize("args,message", [
    (["--global_batch=0"], "global_batch=0: must be a positive integer"),
    (["--memory_budget=-1GiB"], "memory_budget='-1GiB': must be positive"),
    (["--mode=inference", "--total=12"], "total=12: must be divisible by the 8"),
])
def test_cli_bad_decompose_input_exits_2(args, message, cli, tmp_path, capsys, no_compile):
  workdir = tmp_path / "wd"
  status = cli("decompose", f"--config={REPO / 'configs' / 'digits_mlp.py'}",
               f"--workdir={workdir}", *args)
  assert status == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()
