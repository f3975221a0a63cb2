"""One trial end to end on 8 fake CPU devices: parallel equivalence, accumulation,
reaching the target, compiling once, divergence, and the row it stores."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from batchbench import config as config_lib, parallel, results, trial
from batchbench.data import device as device_data
from batchbench.workloads import get_workload





def small_digits(**overrides):
  """digits_mlp with a 32-wide hidden layer, no target and a 16-step budget."""
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 64
  c.eval_every_examples = 256  # an eval every 4 steps at batch 64
  c.max_steps = 16
  c.target_metric = "none"
  for k, v in overrides.items():
    c[k] = v
  return c


def run(c, num_available=8, **kwargs):
  return trial.run_trial(config_lib.resolve(c, num_available), log=None, **kwargs)


def assert_same_training(a, b, rtol=1e-5):
  assert a["status"] == b["status"] == "ok"
  assert a["steps"] == b["steps"] == 16
  np.testing.assert_allclose(a["final_train_loss"], b["final_train_loss"], rtol=rtol)
  assert [h["step"] for h in a["eval_history"]] == [h["step"] for h in b["eval_history"]]
  for ha, hb in zip(a["eval_history"], b["eval_history"], strict=True):
    for metric in ("loss", "accuracy"):
      np.testing.assert_allclose(ha["metrics"][metric], hb["metrics"][metric], rtol=rtol)


@pytest.fixture(scope="module")
def baseline_row():
  """8 devices, no accumulation, batch 64: the reference the other layouts must match."""
  return run(small_digits())


# --- the same trial on any layout of the same global batch ------------------------------

def test_one_and_eight_devices_train_identically(baseline_row):
  one = run(small_digits(num_devices=1))
  assert (one["num_devices"], one["per_device_batch"]) == (1, 64)
  assert (baseline_row["num_devices"], baseline_row["per_device_batch"]) == (8, 8)
  assert_same_training(one, baseline_row)
  # Training did something, so agreement is not trivial.
  losses = [h["metrics"]["loss"] for h in baseline_row["eval_history"]]
  assert losses[-1] < 0.8 * losses[0]


def test_accumulation_matches_one_big_micro_batch(baseline_row):
  accum = run(small_digits(accum_steps=4))
  assert (accum["accum_steps"], accum["per_device_batch"]) == (4, 2)
  assert (baseline_row["accum_steps"], baseline_row["per_device_batch"]) == (1, 8)
  assert_same_training(accum, baseline_row)


def _one_train_call(c):
  """Runs one compiled train call; returns (initial params, final params, losses, spec)."""
  spec = config_lib.resolve(c, 8)
  workload = get_workload(spec.workload, dict(spec.workload_options))
  mesh = parallel.make_mesh(spec.num_devices)
  tx = parallel.make_optimizer(spec)
  state = parallel.init_state(workload, spec, mesh, tx)
  initial = jax.device_get(state.params)  # the state is donated to the call
  data = device_data.put_train_data(workload.data(), mesh)
  call = parallel.compile_train_call(workload, spec, mesh, tx, state, data)
  feeder = device_data.EpochIndexFeeder(spec.train_size, spec.global_batch, spec.accum_steps,
                                        spec.steps_per_call, spec.seed)
  feed = jax.device_put(feeder.call_indices(0), parallel.feed_sharding_for(workload, mesh))
  state, losses, _ = call(state, data, feed)
  return initial, jax.device_get(state.params), np.asarray(losses), spec


def test_accumulated_update_equals_full_batch_update():
  c1 = small_digits(steps_per_call=2)
  c4 = small_digits(steps_per_call=2, accum_steps=4)
  init1, params1, losses1, spec1 = _one_train_call(c1)
  init4, params4, losses4, spec4 = _one_train_call(c4)
  assert (spec1.per_device_batch, spec4.per_device_batch) == (8, 2)
  jax.tree.map(np.testing.assert_array_equal, init1, init4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params1, params4)
  np.testing.assert_allclose(losses1, losses4, rtol=1e-5)

  # Both equal plain, unsharded SGD on the mean loss of the whole global batch.
  workload = get_workload(spec1.workload, dict(spec1.workload_options))
  arrays = workload.data()
  feeder = device_data.EpochIndexFeeder(spec1.train_size, 64, 1, 2, spec1.seed)
  tx = optax.sgd(spec1.lr, momentum=spec1.momentum)

  @jax.jit
  def sgd_step(params, opt_state, x, y):
    def mean_loss(p):
      total, count = workload.loss(p, x, y, jnp.ones(x.shape[0]))
      return total / count

    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = init1, tx.init(init1)
  expected_losses = []
  for step in range(2):
    idx = feeder.step_indices(step)
    params, opt_state, loss = sgd_step(params, opt_state, arrays.train_x[idx],
                                       arrays.train_y[idx])
    expected_losses.append(float(loss))
  np.testing.assert_allclose(losses4, expected_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params4, jax.device_get(params))
  assert not np.allclose(params4["Dense_0"]["kernel"], init4["Dense_0"]["kernel"])


# --- the default digits trial -----------------------------------------------------------

@pytest.fixture(scope="module")
def digits_default_row():
  spec = config_lib.resolve(load_config("digits_mlp"), 8)
  assert spec.global_batch == 32 and spec.target is not None
  return trial.run_trial(spec, log=None)


def test_digits_reaches_target_within_default_budget(digits_default_row):
  row = digits_default_row
  assert row["status"] == "ok"
  assert row["target"] == {"metric": "accuracy", "value": 0.96, "direction": "max"}
  # Evals every 8 steps, 64 steps per call: the trial stops after the call in which an
  # eval first met the target.
  assert row["steps_to_target"] is not None and row["steps_to_target"] % 8 == 0
  assert row["steps"] % 64 == 0 and 0 <= row["steps"] - row["steps_to_target"] < 64
  assert row["examples_to_target"] == row["steps_to_target"] * 32
  assert row["epochs_to_target"] == pytest.approx(row["examples_to_target"] / 1437)
  assert row["final_eval"]["accuracy"] >= 0.96
  assert row["eval_history"][-1]["metrics"] == row["final_eval"]
  assert row["eval_history"][-1]["step"] == row["steps_to_target"]
  assert all(h["metrics"]["accuracy"] < 0.96 for h in row["eval_history"][:-1])
  assert [h["step"] for h in row["eval_history"]] == list(range(8, row["steps_to_target"] + 1, 8))
  assert row["steps"] <= 100 * 1437 // 32 + 64
  ledger = row["time_ledger"]
  # Within its call, the target step's train time is interpolated (equal step times).
  assert 0 < row["time_to_target_s"] <= ledger["train"]
  assert row["time_to_target_s"] == row["eval_history"][-1]["train_s"]
  train_s = [h["train_s"] for h in row["eval_history"]]
  assert train_s == sorted(train_s)
  assert row["time_to_target_wall_s"] >= row["time_to_target_s"]
  assert (row["time_to_target_wall_s"]
          >= ledger["compile"] + row["time_to_target_s"] + ledger["eval"] - 1e-9)
  assert row["wall_s"] >= row["time_to_target_wall_s"]
  assert row["samples_per_sec"] > 0 and row["compile_s"] > 0
  assert row["memory"]["peak_bytes"] > 0 and row["flops_per_step"] > 0


def _digits_trial(**overrides):
  c = load_config("digits_mlp")
  c.num_devices = 1
  for key, value in overrides.items():
    c[key] = value
  spec = config_lib.resolve(c, num_available_devices=8)
  return spec, trial.run_trial(spec, log=None)


@pytest.mark.parametrize("target", [None, 0.5])
def test_evals_inside_a_call_match_evals_between_calls(target):
  """Several evals per call (params returned for each) == one step per call, eval after each."""
  common = dict(global_batch=256, eval_every_examples=256, max_examples=None, max_steps=32,
                target_metric=config_lib.NO_TARGET if target is None else "accuracy",
                target_value=target)
  fused_spec, fused = _digits_trial(**common)
  step_spec, stepwise = _digits_trial(**common, steps_per_call=1)
  assert (fused_spec.steps_per_call, fused_spec.evals_per_call) == (16, 16)
  assert (step_spec.steps_per_call, step_spec.evals_per_call) == (1, 1)
  assert fused["traces"] == stepwise["traces"] == {"train": 1, "eval": 1}
  steps = [h["step"] for h in stepwise["eval_history"]]
  assert [h["step"] for h in fused["eval_history"]] == steps
  for a, b in zip(fused["eval_history"], stepwise["eval_history"], strict=True):
    for name, value in b["metrics"].items():
      assert a["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
  assert fused["steps_to_target"] == stepwise["steps_to_target"]
  if target is None:
    assert steps == list(range(1, 33)) and fused["steps"] == stepwise["steps"] == 32
    assert fused["final_train_loss"] == pytest.approx(stepwise["final_train_loss"], rel=1e-5)
  else:
    assert 1 <= stepwise["steps_to_target"] < 16  # reached inside the first call
    assert stepwise["steps"] == stepwise["steps_to_target"]
    assert fused["steps"] == 16  # the call that reached it runs to its end


def test_step_is_traced_and_compiled_once_per_trial(digits_default_row):
  assert digits_default_row["traces"] == {"train": 1, "eval": 1}
  assert len(digits_default_row["eval_history"]) > 1  # several calls and evals, one trace


def _two_step_call_parts():
  """A small digits spec fused 2 steps per call, with its workload, mesh, optimizer,
  initial state and device data: what building a train call needs."""
  spec = config_lib.resolve(small_digits(steps_per_call=2), 8)
  workload = get_workload(spec.workload, dict(spec.workload_options))
  mesh = parallel.make_mesh(8)
  tx = parallel.make_optimizer(spec)
  state = parallel.init_state(workload, spec, mesh, tx)
  data = device_data.put_train_data(workload.data(), mesh)
  return spec, workload, mesh, tx, state, data


def test_train_call_never_retraces():
  spec, workload, mesh, tx, state, data = _two_step_call_parts()
  traces = []
  chex.clear_trace_counter()
  fn = chex.assert_max_traces(parallel.make_train_call(workload, spec, mesh, tx, traces), n=1)
  step = jax.jit(fn, donate_argnums=0)
  feeder = device_data.EpochIndexFeeder(spec.train_size, 64, 1, 2, spec.seed)
  sharding = parallel.feed_sharding_for(workload, mesh)
  for first in range(0, 8, 2):
    state, _, _ = step(state, data, jax.device_put(feeder.call_indices(first), sharding))
  assert int(state.step) == 8
  assert len(traces) == 1
  # The guard is live: a feed of another shape retraces, and chex says so.
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, data, jax.device_put(feeder.call_indices(8)[:1], sharding))


def test_compiled_call_refuses_other_shapes_instead_of_recompiling():
  spec, workload, mesh, tx, state, data = _two_step_call_parts()
  call = parallel.compile_train_call(workload, spec, mesh, tx, state, data)
  wrong = jax.device_put(np.zeros((1, 1, 64), np.int32), parallel.feed_sharding_for(workload, mesh))
  with pytest.raises((TypeError, ValueError)):
    call(state, data, wrong)
  assert len(call.traces) == 1


# --- outcomes other than "ok" -----------------------------------------------------------

def test_huge_learning_rate_diverges(tmp_path):
  # lr 0.1 x 1e20 overflows within a few steps (1e6 is not enough: the ReLU net just dies).
  row = run(small_digits(lr_multiplier=1e20, max_steps=64, steps_per_call=1))
  assert row["status"] == "diverged"
  assert row["diverged_step"] is not None and 2 <= row["diverged_step"] <= row["steps"]
  assert row["steps"] < 64  # stopped at the window that diverged
  assert row["error"] == f"non-finite loss at step {row['diverged_step']}"
  assert row["steps_to_target"] is None and row["time_to_target_s"] is None
  # The row, non-finite loss and all, is stored as valid JSON.
  results.append_row(str(tmp_path), row)
  (stored,) = results.read_results(str(tmp_path))
  assert stored["status"] == "diverged" and stored["diverged_step"] == row["diverged_step"]
  assert not np.isfinite(row["final_train_loss"]) and stored["final_train_loss"] is None


def test_target_met_at_the_final_eval_counts():
  # max_steps (4) is not a multiple of the eval interval (8): the budget ends between
  # evals and the trial evaluates once more at step 4. That eval meets the (easy) target,
  # so the trial reached it. BUG (trial.py): the final eval is never checked against the
  # target, giving status target_not_reached with final_eval above the target.
  c = small_digits(global_batch=32, max_steps=4, steps_per_call=4, target_metric="accuracy")
  c.target_value = 0.01
  spec = config_lib.resolve(c, 8)
  assert spec.eval_every_steps == 8 and spec.max_steps == 4
  row = trial.run_trial(spec, log=None)
  assert [h["step"] for h in row["eval_history"]] == [4]
  assert row["final_eval"]["accuracy"] >= 0.01
  assert row["status"] == "ok"
  assert row["steps_to_target"] == 4


# --- the results store ------------------------------------------------------------------

def test_append_and_read_rows(tmp_path):
  workdir = str(tmp_path)
  assert results.read_results(workdir) == []
  results.append_row(workdir, {"trial_id": "a", "x": np.float32(1.5), "v": np.arange(3)})
  results.append_row(workdir, {"trial_id": "b", "loss": float("nan"), "y": np.float32("inf"),
                               "m": {"p": np.array([1.0, np.nan])}})
  rows = results.read_results(workdir)
  assert rows == [{"trial_id": "a", "x": 1.5, "v": [0, 1, 2]},
                  {"trial_id": "b", "loss": None, "y": None, "m": {"p": [1.0, None]}}]


def test_torn_last_line_is_skipped_and_next_append_starts_a_new_line(tmp_path):
  workdir = str(tmp_path)
  results.append_row(workdir, {"trial_id": "a", "status": "ok"})
  path = os.path.join(workdir, results.RESULTS_FILE)
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"trial_id": "torn", "status": "o')  # killed mid-write: no newline
  assert [r["trial_id"] for r in results.read_results(workdir)] == ["a"]
  results.append_row(workdir, {"trial_id": "b", "status": "diverged"})
  assert [r["trial_id"] for r in results.read_results(workdir)] == ["a", "b"]
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) == 3 and lines[1].startswith('{"trial_id": "torn"')
  assert json.loads(lines[2]) == {"status": "diverged", "trial_id": "b"}


def test_last_row_of_a_trial_wins(tmp_path):
  workdir = str(tmp_path)
  for trial_id, status in (("a", "error"), ("b", "ok"), ("a", "ok")):
    results.append_row(workdir, {"trial_id": trial_id, "status": status})
  rows = results.read_results(workdir)
  assert [(r["trial_id"], r["status"]) for r in rows] == [("b", "ok"), ("a", "ok")]


def test_run_meta_records_versions_devices_and_config(tmp_path):
  c = small_digits()
  meta = results.run_metadata(c, argv=["batchbench", "trial"])
  results.write_run_meta(str(tmp_path), meta)
  with open(tmp_path / results.META_FILE, encoding="utf-8") as f:
    stored = json.load(f)
  assert stored["versions"]["jax"] == jax.__version__
  assert stored["versions"]["batchbench"] is not None
  assert stored["device_count"] == 8 and stored["local_device_count"] == 8
  assert stored["platform"] == "cpu" and stored["process_count"] == 1
  assert stored["argv"] == ["batchbench", "trial"]
  assert stored["config"]["workload"] == "digits_mlp"
  assert stored["config"]["global_batch"] == 64
  assert stored["config"]["workload_options"] == {"hidden": [32]}
  assert os.listdir(tmp_path) == [results.META_FILE]  # no temporary file left behind
