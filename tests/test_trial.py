"""One trial end to end on 8 fake CPU devices: parallel equivalence, accumulation,
reaching the target, compiling once, divergence, shared programs, device memory,
workloads with model state, per-step keys and integer inputs, and the row it stores."""

import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

import batchbench
from batchbench import config as config_lib
from batchbench.core import steps
from batchbench.core.mesh import batch_sharding
from batchbench.core.program import ProgramCache, build
from batchbench.data import embedded
from batchbench.data.feed import EpochIndexFeeder
from batchbench.measure.memory import PeakTracker
from batchbench.models import MLP
from batchbench.runs import trial
from batchbench.store import checkpoint, meta, results
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


def assert_same_training(a, b, rtol=1e-5, steps=16):
  assert a["status"] == b["status"] == "ok"
  assert a["steps"] == b["steps"] == steps
  np.testing.assert_allclose(a["final_train_loss"], b["final_train_loss"], rtol=rtol)
  assert [h["step"] for h in a["eval_history"]] == [h["step"] for h in b["eval_history"]]
  for ha, hb in zip(a["eval_history"], b["eval_history"], strict=True):
    for metric in ("loss", "accuracy"):
      np.testing.assert_allclose(ha["metrics"][metric], hb["metrics"][metric], rtol=rtol)


def assert_bit_identical(a, b):
  assert a["params_hash"] == b["params_hash"]
  assert a["final_train_loss"] == b["final_train_loss"]
  assert ([(h["step"], h["metrics"]) for h in a["eval_history"]]
          == [(h["step"], h["metrics"]) for h in b["eval_history"]])


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
  program = build(spec, flops=False)
  state = program.init_state(spec.seed, spec.lr)
  initial = jax.device_get(state.params)  # the state is donated to the call
  state, metrics = program.run(state, program.feed(spec.seed)(0))
  return initial, jax.device_get(state.params), np.asarray(metrics["loss"]), spec


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

  # Both equal plain, unsharded SGD (optax.sgd, the Flax module applied directly) on the
  # mean loss of the whole global batch.
  arrays = get_workload(spec1.workload, dict(spec1.workload_options)).data()
  feeder = EpochIndexFeeder(spec1.train_size, 64, 1, 2, spec1.seed)
  model = MLP(hidden=(32,), num_classes=10)
  tx = optax.sgd(spec1.lr, momentum=spec1.momentum)

  @jax.jit
  def sgd_step(params, opt_state, x, y):
    def mean_loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = init1, tx.init(init1)
  expected_losses = []
  for step in range(2):
    idx = feeder.step_indices(step)
    params, opt_state, loss = sgd_step(params, opt_state, arrays.train["inputs"][idx],
                                       arrays.train["labels"][idx])
    expected_losses.append(float(loss))
  np.testing.assert_allclose(losses4, expected_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params4, jax.device_get(params))
  assert not np.allclose(params4["Dense_0"]["kernel"], init4["Dense_0"]["kernel"])


def test_fused_calls_match_single_step_calls_and_stop_at_the_target():
  """64 steps per call (calls cut at each eval) == 1 step per call; either way the trial
  ends at the target's eval."""
  common = dict(eval_every_examples=512, max_steps=64, target_metric="accuracy",
                target_value=0.8, stop_at_target=True)
  fused = run(small_digits(**common))
  stepwise = run(small_digits(**common, steps_per_call=1))
  assert (fused["steps_per_call"], stepwise["steps_per_call"]) == (64, 1)
  assert fused["status"] == stepwise["status"] == "ok"
  target_step = stepwise["steps_to_target"]
  assert 8 < target_step < 64  # not met at the first eval, met before the budget
  assert fused["steps"] == stepwise["steps"] == fused["steps_to_target"] == target_step
  assert_same_training(fused, stepwise, steps=target_step)
  assert [h["step"] for h in fused["eval_history"]] == list(range(8, target_step + 1, 8))
  assert fused["eval_history"][-1]["metrics"]["accuracy"] >= 0.8
  assert all(h["metrics"]["accuracy"] < 0.8 for h in fused["eval_history"][:-1])


# --- the default digits trial -----------------------------------------------------------

STEP_TIME_MS = 2.5  # a throughput point's step time (any value: time to target scales it)


@pytest.fixture(scope="module")
def digits_default_row():
  c = load_config("digits_mlp")
  c.stop_at_target = True  # the default config trains on to the budget; stop at the target
  spec = config_lib.resolve(c, 8)
  assert spec.global_batch == 32 and spec.target is not None
  return trial.run_trial(spec, log=None, point={"step_time_ms": STEP_TIME_MS})


def test_digits_reaches_target_within_default_budget(digits_default_row):
  row = digits_default_row
  assert row["status"] == "ok"
  assert row["target"] == {"metric": "accuracy", "value": 0.96, "direction": "max"}
  # Evals every 8 steps (256 examples); the trial stops at the eval that met the target.
  assert row["steps_to_target"] is not None and row["steps_to_target"] % 8 == 0
  assert row["steps"] == row["steps_to_target"]
  assert row["examples_to_target"] == row["steps_to_target"] * 32
  assert row["epochs_to_target"] == pytest.approx(row["examples_to_target"] / 1437)
  assert row["final_eval"]["accuracy"] >= 0.96
  assert row["eval_history"][-1]["metrics"] == row["final_eval"]
  assert row["eval_history"][-1]["step"] == row["steps_to_target"]
  assert all(h["metrics"]["accuracy"] < 0.96 for h in row["eval_history"][:-1])
  assert [h["step"] for h in row["eval_history"]] == list(range(8, row["steps_to_target"] + 1, 8))
  assert row["steps"] <= 100 * 1437 // 32 + 8
  # Time to target is the throughput point's step time x steps; the loop's own figure
  # is its train seconds at the target's eval.
  assert row["time_to_target_s"] == pytest.approx(row["steps_to_target"] * STEP_TIME_MS / 1e3)
  ledger = row["time_ledger"]
  assert 0 < row["loop_time_to_target_s"] <= ledger["train"]
  assert row["loop_time_to_target_s"] == row["eval_history"][-1]["train_s"]
  train_s = [h["train_s"] for h in row["eval_history"]]
  assert train_s == sorted(train_s)
  assert (row["time_to_target_wall_s"]
          >= ledger["compile"] + row["loop_time_to_target_s"] + ledger["eval"] - 1e-9)
  assert row["wall_s"] >= row["time_to_target_wall_s"]
  assert row["loop_samples_per_sec"] > 0 and row["loop_timed_windows"] >= 1
  assert "samples_per_sec" not in row  # a point's figure; the loop's own is loop_*
  assert row["compile_s"] > 0
  if not jax.config.jax_compilation_cache_dir:  # no persistent cache in this process
    assert row["compile_cached"] is False
  assert row["memory"]["peak_bytes"] > 0 and row["flops_per_step"] > 0
  assert row["provenance"]["jax"] == jax.__version__
  assert row["measurement_version"] == batchbench.MEASUREMENT_VERSION


def test_step_is_traced_and_compiled_once_per_trial(digits_default_row):
  assert digits_default_row["traces"] == {"train": 1, "eval": 1}
  assert len(digits_default_row["eval_history"]) > 1  # several calls and evals, one trace


@pytest.fixture(scope="module")
def two_step_program():
  """The small digits trial's program, 2 steps per call."""
  return build(config_lib.resolve(small_digits(steps_per_call=2), 8), flops=False)


def test_train_call_never_retraces(two_step_program):
  program, spec = two_step_program, two_step_program.spec
  traces = []
  chex.clear_trace_counter()
  fn = chex.assert_max_traces(steps.make_train_call(
      program.workload, program.mesh, program.tx, micro_batch=spec.micro_batch,
      traces=traces), n=1)
  step = jax.jit(fn, donate_argnums=0)
  feed = program.feed(spec.seed)
  sharding = batch_sharding(program.mesh, leading=2)
  state = program.init_state(spec.seed, spec.lr)
  first = 0
  for n in (2, 1, 2, 1):  # calls of different lengths: the step count is a runtime value
    state, _ = step(state, program.data, jax.device_put(feed(first, n), sharding), np.int32(n))
    first += n
  assert int(state.step) == 6
  assert len(traces) == 1
  # The guard is live: a feed of another shape retraces, and chex says so.
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, program.data, jax.device_put(feed(8)[:1], sharding), np.int32(1))


def test_compiled_call_refuses_other_shapes_instead_of_recompiling(two_step_program):
  program = two_step_program
  state = program.init_state(0, program.spec.lr)
  wrong = np.zeros((1, 1, 64), np.int32)  # one step's feed, where the program has two
  with pytest.raises((TypeError, ValueError)):
    program.run(state, wrong, 1)
  assert len(program.train.traces) == 1


# --- one program for every learning rate of a batch -------------------------------------

def test_program_from_a_cache_shared_by_two_lrs_equals_compiling_alone(baseline_row):
  cache = ProgramCache()
  first = run(small_digits(), cache=cache)
  second = run(small_digits(lr_multiplier=2.0), cache=cache)
  alone = run(small_digits(lr_multiplier=2.0))
  assert (cache.compiles, cache.hits) == (1, 1)
  assert_bit_identical(first, baseline_row)
  assert_bit_identical(second, alone)
  assert second["lr"] == 2 * first["lr"]
  assert second["params_hash"] != first["params_hash"]  # the LR is a live runtime value
  assert second["compile_cached"] is True
  if not jax.config.jax_compilation_cache_dir:  # no persistent cache in this process
    assert first["compile_cached"] is False and alone["compile_cached"] is False
  assert second["compile_s"] < first["compile_s"]
  assert second["program_compile_s"] == first["program_compile_s"]  # the same program
  assert second["traces"] == first["traces"] == {"train": 1, "eval": 1}


# --- the device's memory peak: the trial's own, or none ---------------------------------

class FakeDevice:
  """A device whose runtime reports ``peak`` as its high-water mark (None: no stats)."""

  def __init__(self, peak):
    self.peak = peak

  def memory_stats(self):
    if self.peak is None:
      return None
    return {"peak_bytes_in_use": self.peak, "bytes_in_use": 0, "bytes_limit": 1 << 30}


def test_device_peak_is_a_trials_own_high_water_mark_never_an_earlier_one():
  devices = [FakeDevice(1_000), FakeDevice(1_000)]
  first = PeakTracker(devices)
  first.start()
  devices[0].peak, devices[1].peak = 5_000, 4_800  # this trial raised the high-water mark
  assert first.stop() == (5_000, None)

  smaller = PeakTracker(devices)  # a later trial that stays below it
  smaller.start()
  peak, note = smaller.stop()
  assert peak is None and "high-water mark" in note

  larger = PeakTracker(devices)
  larger.start()
  devices[0].peak, devices[1].peak = 7_000, 7_200
  assert larger.stop() == (7_200, None)


def test_device_peak_ignores_devices_whose_high_water_mark_did_not_move():
  # An earlier 1-device run left device 0 at 9,000 bytes; this 2-device trial peaks at
  # 3,000 on each device, which moves device 1's mark only.
  devices = [FakeDevice(9_000), FakeDevice(1_000)]
  tracker = PeakTracker(devices)
  tracker.start()
  devices[1].peak = 3_000
  peak, note = tracker.stop()
  assert peak == 3_000, f"inherited device 0's earlier peak {peak}"
  assert "1 of 2 devices" in note  # and says the other device's peak is unknown


def test_device_peak_is_none_with_a_note_where_the_runtime_reports_none(baseline_row):
  class NoStats:
    def memory_stats(self):
      raise NotImplementedError

  for devices in ([FakeDevice(None)], [FakeDevice(4_000), FakeDevice(None)], [NoStats()]):
    tracker = PeakTracker(devices)
    tracker.start()
    peak, note = tracker.stop()
    assert peak is None and "no device memory statistics" in note
  # CPU devices report no memory statistics, so a CPU trial's row says so.
  assert jax.local_devices()[0].memory_stats() is None
  assert baseline_row["memory"]["device_peak_bytes"] is None
  assert "no device memory statistics" in baseline_row["memory"]["device_peak_note"]


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
  # max_steps (4) is shorter than the eval interval (8): the budget ends before any
  # eval and the trial evaluates once at step 4. That eval meets the (easy) target, so
  # the trial reached it.
  c = small_digits(global_batch=32, max_steps=4, steps_per_call=4, target_metric="accuracy")
  c.target_value = 0.01
  spec = config_lib.resolve(c, 8)
  assert spec.eval_every_steps == 8 and spec.max_steps == 4
  row = trial.run_trial(spec, log=None)
  assert [h["step"] for h in row["eval_history"]] == [4]
  assert row["final_eval"]["accuracy"] >= 0.01
  assert row["status"] == "ok"
  assert row["steps_to_target"] == 4


# --- workloads with model state, per-step keys and integer inputs -----------------------

class BatchNormMLP(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.width)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x))


class DropoutMLP(nn.Module):
  width: int = 32
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(nn.Dropout(self.rate, deterministic=not train)(x))


class TokenBag(nn.Module):
  """Embeds int32 tokens, mean-pools them over the sequence, and classifies."""

  vocab: int = 16
  width: int = 16

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(2)(nn.Embed(self.vocab, self.width)(tokens).mean(axis=1))


DIGITS = functools.partial(embedded.digits, 1437)


@batchbench.register_workload("test_bn_mlp")
def bn_mlp(width: int = 32):
  return batchbench.classification_workload(
      "test_bn_mlp", model=BatchNormMLP(width), input_shape=(64,), num_classes=10, data=DIGITS,
      train_size=1437, train_flag=True)


@batchbench.register_workload("test_dropout_mlp")
def dropout_mlp(width: int = 32, rate: float = 0.5):
  return batchbench.classification_workload(
      "test_dropout_mlp", model=DropoutMLP(width, rate), input_shape=(64,), num_classes=10,
      data=DIGITS, train_size=1437, train_flag=True)


def token_data(num_train=512, num_test=256, length=8, vocab=16):
  """Label 1 when the tokens sum to more than half their maximum: mean-pooling sees it."""
  tokens = np.random.default_rng(0).integers(0, vocab, (num_train + num_test, length),
                                              dtype=np.int32)
  labels = (tokens.sum(axis=1) > (vocab - 1) * length / 2).astype(np.int32)
  return batchbench.ArrayData.classification(tokens[:num_train], labels[:num_train],
                                             tokens[num_train:], labels[num_train:])


@batchbench.register_workload("test_token_bag")
def token_bag():
  return batchbench.classification_workload(
      "test_token_bag", model=TokenBag(), input_shape=(8,), num_classes=2, data=token_data,
      train_size=512, input_dtype=jnp.int32)


def bn_config(**overrides):
  """The BatchNorm MLP on digits: batch 64, an eval every 4 steps, 24 steps."""
  c = small_digits(max_steps=24)
  c.workload = "test_bn_mlp"
  c.workload_options = {}
  for k, v in overrides.items():
    c[k] = v
  return c


def run_and_restore(spec, trial_dir, cache):
  """Runs ``spec`` with checkpoints in ``trial_dir``; returns its row and final state."""
  row = trial.run_trial(spec, workdir=str(trial_dir), cache=cache, log=None)
  program, _ = cache.get(spec)
  ckpt = checkpoint.TrialCheckpointer(str(trial_dir), spec)
  try:
    restored = ckpt.restore(program.abstract_state())
  finally:
    ckpt.close()
  assert restored.step == row["steps"]
  return row, restored.state, program


def test_batchnorm_statistics_are_global_so_one_and_eight_devices_agree(tmp_path):
  cache = ProgramCache()
  rows, states = {}, {}
  for n in (1, 8):
    spec = config_lib.resolve(bn_config(num_devices=n), 8)
    rows[n], states[n], program = run_and_restore(spec, tmp_path / str(n), cache)
  initial = program.init_state(0, spec.lr).model_state["batch_stats"]["BatchNorm_0"]
  stats = {n: s.model_state["batch_stats"]["BatchNorm_0"] for n, s in states.items()}
  for name in ("mean", "var"):
    # Training moved the running statistics; per-device statistics (the mean of 8
    # shards' variances) would have moved them differently on 8 devices than on 1.
    assert not np.allclose(stats[8][name], initial[name], atol=1e-3)
    np.testing.assert_allclose(stats[8][name], stats[1][name], rtol=1e-4, atol=1e-6)
  # Evaluation uses the running statistics: the eval history agrees too.
  assert_same_training(rows[1], rows[8], rtol=1e-4, steps=24)
  losses = [h["metrics"]["loss"] for h in rows[8]["eval_history"]]
  assert losses[-1] < 0.8 * losses[0]


def dropout_config(**overrides):
  c = small_digits()
  c.workload = "test_dropout_mlp"
  c.workload_options = {}
  for k, v in overrides.items():
    c[k] = v
  return c


def test_dropout_draws_a_fresh_mask_every_step_and_call():
  spec = config_lib.resolve(dropout_config(steps_per_call=4), 8)
  program = build(spec, flops=False)
  state = program.init_state(spec.seed, 0.0)  # learning rate 0: the params never move
  initial = jax.device_get(state.params)
  one_step = program.feed(spec.seed)(0)[:1]
  same = np.repeat(one_step, 4, axis=0)  # every step of a call sees the same 64 examples
  losses = []
  for _ in range(2):
    state, metrics = program.run(state, same)
    losses.extend(np.asarray(metrics["loss"]).tolist())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), initial)
  # Same params, same examples: only the dropout mask can change a step's loss, and it
  # does at every step, within a call and across calls (a key per global step).
  assert len(set(losses)) == 8, losses


def test_dropout_trials_are_reproducible_by_seed():
  cache = ProgramCache()
  a = run(dropout_config(), cache=cache)
  b = run(dropout_config(), cache=cache)
  other = run(dropout_config(seed=1), cache=cache)
  assert cache.compiles == 1  # the seed is a runtime value
  assert_bit_identical(a, b)
  assert other["params_hash"] != a["params_hash"]
  assert other["final_train_loss"] != a["final_train_loss"]


def test_integer_token_inputs_initialise_from_their_spec_and_train():
  workload = get_workload("test_token_bag")
  inputs = workload.batch_spec(4)["inputs"]
  assert (inputs.shape, inputs.dtype) == ((4, 8), jnp.int32)
  params, model_state = workload.init(jax.random.key(0), workload.batch_spec(1))
  assert params["Embed_0"]["embedding"].shape == (16, 16) and model_state == {}

  # An eval every 8 steps; plain SGD needs a larger step for the embeddings to move.
  c = small_digits(max_steps=32, eval_every_examples=512, lr_multiplier=10.0)
  c.workload, c.workload_options = "test_token_bag", {}
  spec = config_lib.resolve(c, 8)
  cache = ProgramCache()
  row = trial.run_trial(spec, cache=cache, log=None)
  program, _ = cache.get(spec)
  assert program.data["inputs"].dtype == jnp.int32  # tokens stay integers on the devices
  before = program.evaluate(program.init_state(spec.seed, spec.lr))
  assert row["status"] == "ok" and row["steps"] == 32
  losses = [before["loss"]] + [h["metrics"]["loss"] for h in row["eval_history"]]
  assert losses[-1] < 0.5 * losses[0], losses
  assert row["final_eval"]["accuracy"] > max(0.8, before["accuracy"])


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
  record = meta.run_metadata(c, argv=["batchbench", "trial"])
  meta.write_run_meta(str(tmp_path), record)
  with open(tmp_path / meta.META_FILE, encoding="utf-8") as f:
    stored = json.load(f)
  assert stored["versions"]["jax"] == jax.__version__
  assert stored["versions"]["batchbench"] is not None
  assert stored["device_count"] == 8 and stored["local_device_count"] == 8
  assert stored["platform"] == "cpu" and stored["process_count"] == 1
  assert stored["argv"] == ["batchbench", "trial"]
  assert stored["config"]["workload"] == "digits_mlp"
  assert stored["config"]["global_batch"] == 64
  assert stored["config"]["workload_options"] == {"hidden": [32]}
  assert os.listdir(tmp_path) == [meta.META_FILE]  # no temporary file left behind
