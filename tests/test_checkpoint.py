"""Checkpoints in the trial loop: bit-exact resume, preemption, corruption, spec checks.

Every resumed trial is compared with one uninterrupted run of the same spec: the
final params (their SHA-256), every eval's metrics, steps to target and the final
loss must be bit-identical on CPU.
"""

import copy
import dataclasses
import gc
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from test_trial import bn_config

from batchbench import config as config_lib
from batchbench.config import ConfigError
from batchbench.core.mesh import make_mesh, replicated
from batchbench.core.program import ProgramCache
from batchbench.core.state import TrainState
from batchbench.runs import trial
from batchbench.runs.trial import LoopState
from batchbench.store import checkpoint
from batchbench.store.checkpoint import (CheckpointWriteError, CorruptCheckpointError, Preempted,
                                         SpecMismatchError)

# Results that must be bit-identical between a resumed and an uninterrupted trial.
RESULT_KEYS = ("status", "steps", "steps_to_target", "examples_to_target", "params_hash",
               "final_eval", "final_train_loss", "diverged_step", "error")


def small_config(**overrides):
  """Digits, a 64-unit MLP, target 0.95 accuracy (about 80 steps at batch 32).

  Two steps per call and four calls per eval window, with a checkpoint every
  three steps: checkpoints fall inside eval windows, so resuming must realign them.
  """
  c = config_lib.default_config()
  c.workload = "digits_mlp"
  c.workload_options.hidden = (64,)
  c.global_batch = 32
  c.steps_per_call = 2
  c.eval_every_examples = 256  # 8 steps
  c.max_examples = 32 * 300
  c.target_metric = "accuracy"
  c.target_value = 0.95
  c.checkpoint_every_examples = 96  # 3 steps -> saved at the next call boundary
  for key, value in overrides.items():
    c[key] = value
  return c


def small_spec(**overrides):
  return config_lib.resolve(small_config(**overrides), jax.device_count())


class Interrupt(Exception):
  pass


def interrupt_at(step_at_least):
  def hook(step, window):
    del window
    if step >= step_at_least:
      raise Interrupt(step)
  return hook


def assert_same_result(row, reference):
  for key in RESULT_KEYS:
    assert row[key] == reference[key], key
  assert ([(h["step"], h["metrics"]) for h in row["eval_history"]]
          == [(h["step"], h["metrics"]) for h in reference["eval_history"]])


def restore_latest(trial_dir, spec, program):
  """The latest checkpoint of ``trial_dir``, restored onto ``program``'s abstract state."""
  ckpt = checkpoint.TrialCheckpointer(str(trial_dir), spec)
  try:
    return ckpt.restore(program.abstract_state())
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def reference():
  """The uninterrupted trial, without a trial directory (no checkpoints, no handler)."""
  before = signal.getsignal(signal.SIGTERM)
  handlers = []
  row = trial.run_trial(small_spec(), log=None,
                        on_window=lambda *_: handlers.append(signal.getsignal(signal.SIGTERM)))
  assert all(h is before for h in handlers), "no SIGTERM handler without a trial dir"
  assert row["status"] == "ok" and row["steps_to_target"] and row["resumes"] == 0
  assert row["steps"] == row["steps_to_target"]  # stopped at the eval that met the target
  assert row["time_ledger"]["checkpoint"] == 0.0
  return row


def interrupted_trial(trial_dir, at_step=20):
  """Runs the small trial in ``trial_dir`` until the window ending at ``at_step``."""
  with pytest.raises(Interrupt):
    trial.run_trial(small_spec(), workdir=str(trial_dir), log=None,
                    on_window=interrupt_at(at_step))
  steps = checkpoint.committed_steps(os.path.join(trial_dir, checkpoint.CHECKPOINT_DIR))
  assert 0 < len(steps) <= checkpoint.MAX_TO_KEEP
  return steps


def test_resume_after_interruption_is_bit_identical(tmp_path, reference):
  trial_dir = tmp_path / "trial"
  before = signal.getsignal(signal.SIGTERM)
  handlers = []

  def hook(step, window):
    handlers.append(signal.getsignal(signal.SIGTERM))
    interrupt_at(20)(step, window)

  with pytest.raises(Interrupt):
    trial.run_trial(small_spec(), workdir=str(trial_dir), log=None, on_window=hook)
  assert handlers and all(h is not before for h in handlers)  # SIGTERM handled in the trial
  assert signal.getsignal(signal.SIGTERM) is before  # and restored after it
  assert (trial_dir / checkpoint.SPEC_FILE).exists()
  steps = checkpoint.committed_steps(str(trial_dir / checkpoint.CHECKPOINT_DIR))
  # Every 3 steps (96 examples), exactly: calls end there (3, 6, ..., 18, 21); the hook
  # runs after the window's checkpoint, so the window ending at 21 saved first; max 2 kept.
  assert steps == [18, 21]

  row = trial.run_trial(small_spec(), workdir=str(trial_dir), log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1 and not row["restored_from_fallback"]
  assert row["notes"] == ["resumed from step 21"]
  ledger = row["time_ledger"]
  assert ledger["checkpoint"] > 0
  assert ledger["compile"] > row["compile_s"]  # both runs' compile seconds: restored ledger
  assert row["loop_samples_per_sec"] and row["loop_timed_windows"] >= 3

  # The final checkpoint: a trial whose row was lost (sweep killed before appending it)
  # is rebuilt from it without training again.
  again = trial.run_trial(small_spec(), workdir=str(trial_dir), log=None)
  assert_same_result(again, reference)
  assert again["loop_timed_windows"] == row["loop_timed_windows"]
  assert again["notes"][-1] == f"resumed from step {reference['steps']}"


def assert_saved_loop_state(saved: LoopState, live: LoopState):
  """``saved`` (restored from a checkpoint) is ``live`` field by field.

  The ledger's checkpoint bucket is the exception: the save in progress is added to
  it after the snapshot was taken, so the saved figure may only be smaller.
  """
  for field in dataclasses.fields(LoopState):
    if field.name != "ledger":
      assert getattr(saved, field.name) == getattr(live, field.name), field.name
  assert set(saved.ledger) == set(live.ledger)
  for bucket, seconds in live.ledger.items():
    if bucket == "checkpoint":
      assert 0 < saved.ledger[bucket] <= seconds
    else:
      assert saved.ledger[bucket] == seconds, bucket


def test_loop_state_is_exactly_what_the_checkpoint_saves(tmp_path, reference):
  spec, trial_dir = small_spec(), str(tmp_path / "trial")
  cache = ProgramCache()
  live = {}
  runs = []

  def capture(step, window):  # called after the window's checkpoint, if it had one
    del window
    live[step] = copy.deepcopy(runs[-1].loop)
    if step >= 12 and not runs[-1].loop.resumes:
      raise Interrupt(step)

  def new_trial():
    ckpt = checkpoint.TrialCheckpointer(trial_dir, spec)
    runs.append(trial.Trial(spec, ckpt=ckpt, cache=cache, on_window=capture))
    return ckpt

  ckpt = new_trial()
  with pytest.raises(Interrupt):
    runs[-1].run()
  ckpt.close()
  program, hit = cache.get(spec)
  assert hit
  restored = restore_latest(trial_dir, spec, program)
  assert restored.step == 12  # checkpoints at 4, 6, 10, 12 (see the test above)
  saved = LoopState.from_json(restored.loop)
  assert saved.history and saved.windows and saved.ledger["train"] > 0  # not trivially equal
  assert all(isinstance(w, type(live[12].windows[0])) for w in saved.windows)
  assert_saved_loop_state(saved, live[12])

  # The final checkpoint holds the finished loop: status, target fields, the resume.
  ckpt = new_trial()
  row = runs[-1].run()
  ckpt.close()
  assert_same_result(row, reference)
  final = restore_latest(trial_dir, spec, program)
  assert final.step == reference["steps"]
  saved = LoopState.from_json(final.loop)
  assert saved.status == "ok" and saved.resumes == 1
  assert saved.to_target["steps_to_target"] == reference["steps_to_target"]
  assert_saved_loop_state(saved, runs[-1].loop)


def test_preemption_checkpoints_at_the_next_call_boundary(tmp_path, reference):
  trial_dir = str(tmp_path / "trial")
  watch = checkpoint.PreemptionWatch()

  def preempt(step, window):  # what the SIGTERM handler does, at a window boundary
    del window
    if step >= 8:
      watch.requested = True

  with pytest.raises(Preempted) as stopped:
    trial.run_trial(small_spec(), workdir=trial_dir, log=None, preemption=watch,
                    on_window=preempt)
  # Flag seen after the window ending at step 8; stopped after the next call, which ends
  # at step 9 (the checkpoint cadence, every 3 steps), with that step committed first.
  assert stopped.value.step == 9 and stopped.value.row is None
  assert stopped.value.checkpoint == os.path.join(trial_dir, "checkpoints", "9")
  assert checkpoint.committed_steps(os.path.join(trial_dir, "checkpoints"))[-1] == 9

  row = trial.run_trial(small_spec(), workdir=trial_dir, log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1


def test_half_written_checkpoint_is_never_restored_and_is_removed(tmp_path, reference):
  trial_dir = tmp_path / "trial"
  steps = interrupted_trial(trial_dir)
  ckpt_dir = trial_dir / checkpoint.CHECKPOINT_DIR
  # What a kill in the middle of saving step 999 leaves: its temporary folder, half full.
  tmp = ckpt_dir / f"999{checkpoint.TMP_MARKER}"
  shutil.copytree(ckpt_dir / str(steps[-1]), tmp)
  for name in ("_CHECKPOINT_METADATA", "loop"):
    shutil.rmtree(tmp / name, ignore_errors=True)
    if (tmp / name).exists():
      os.remove(tmp / name)
  logs = []
  row = trial.run_trial(small_spec(), workdir=str(trial_dir), log=logs.append)
  assert_same_result(row, reference)
  assert row["notes"] == [f"resumed from step {steps[-1]}"]
  assert any("half-written" in line and tmp.name in line for line in logs)
  assert not tmp.exists()
  assert not [n for n in os.listdir(ckpt_dir) if checkpoint.TMP_MARKER in n]


def _truncate_largest_array_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "state")
           for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


# Orbax leaves the reads of the other arrays un-awaited when one fails; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_is_a_named_error_or_falls_back(tmp_path, reference):
  trial_dir = tmp_path / "trial"
  steps = interrupted_trial(trial_dir)
  latest = trial_dir / checkpoint.CHECKPOINT_DIR / str(steps[-1])
  _truncate_largest_array_file(latest)

  with pytest.raises(CorruptCheckpointError) as err:
    trial.run_trial(small_spec(), workdir=str(trial_dir), log=None)
  message = str(err.value)
  assert err.value.step == steps[-1] and err.value.path == str(latest)
  assert str(latest) in message and f"previous checkpoint (step {steps[-2]})" in message
  assert "fallback_to_previous_checkpoint=True" in message and "delete" in message
  assert latest.exists()  # nothing is moved or deleted without the option
  gc.collect()  # (those coroutines, while the warning filter holds)

  row = trial.run_trial(small_spec(), workdir=str(trial_dir), log=None,
                        fallback_to_previous_checkpoint=True)
  assert_same_result(row, reference)
  assert row["restored_from_fallback"] is True
  assert row["notes"] == [f"resumed from step {steps[-2]} after moving aside corrupted "
                          f"step(s) [{steps[-1]}]"]
  assert (trial_dir / checkpoint.CORRUPT_DIR / str(steps[-1])).is_dir()


def test_resuming_under_a_changed_spec_is_refused_before_any_compute(tmp_path, no_compile):
  del no_compile  # any compile (of the program or of its state) fails the test
  trial_dir = str(tmp_path / "trial")
  checkpoint.TrialCheckpointer(trial_dir, small_spec()).close()  # writes spec.json
  for change, field in [({"global_batch": 64}, "global_batch"), ({"seed": 1}, "seed"),
                        ({"lr_multiplier": 2.0}, "lr"),
                        ({"workload_options": {"hidden": (32,)}}, "workload_options"),
                        # How often a trial is checkpointed shapes its timing windows,
                        # so it is part of the trial's identity now.
                        ({"checkpoint_every_examples": 1024}, "checkpoint_every_examples")]:
    with pytest.raises(SpecMismatchError) as err:
      trial.run_trial(small_spec(**change), workdir=trial_dir, log=None)
    assert field in str(err.value) and "Refusing to resume" in str(err.value)
    assert trial_dir in str(err.value)
  assert small_spec(checkpoint_every_examples=1024).trial_id != small_spec().trial_id
  # A run option is not part of the identity: the same trial opens its directory.
  checkpoint.TrialCheckpointer(trial_dir, small_spec(fallback_to_previous_checkpoint=True),
                               fallback_to_previous=True).close()


def test_unwritable_workdir_is_a_clear_error_before_any_compute(tmp_path, no_compile):
  del no_compile
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  # Below a regular file nothing can be created, even by root (chmod does not stop root).
  unwritable = [str(blocker / "trials" / "abc")]
  if os.geteuid() != 0:
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    unwritable.append(str(read_only / "trials" / "abc"))
  for trial_dir in unwritable:
    with pytest.raises(CheckpointWriteError) as err:
      trial.run_trial(small_spec(), workdir=trial_dir, log=None)
    assert "cannot write the trial directory" in str(err.value) and trial_dir in str(err.value)
  with pytest.raises(ConfigError, match="workdir.*Not a directory"):  # what commands check first
    config_lib.open_workdir(str(blocker / "sweep"))


def test_checkpoint_config_fields_are_validated():
  for bad in (0, -96):
    with pytest.raises(ConfigError, match="checkpoint_every_examples"):
      small_spec(checkpoint_every_examples=bad)
  assert small_spec(checkpoint_every_examples=None).checkpoint_every_examples is None
  assert config_lib.default_config().fallback_to_previous_checkpoint is False


def test_params_hash_sees_every_bit():
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
  same = jax.tree.map(np.copy, params)
  assert checkpoint.params_hash(params) == checkpoint.params_hash(same)
  same["w"][1, 2] = np.nextafter(same["w"][1, 2], np.float32(9))
  assert checkpoint.params_hash(params) != checkpoint.params_hash(same)


def test_save_snapshots_the_loop_state_before_the_loop_moves_on(tmp_path):
  """Saving is asynchronous, and the loop keeps appending to its history meanwhile."""
  spec = small_spec()
  sharding = replicated(make_mesh(2))
  state = jax.device_put(TrainState(
      step=np.int32(3), params={"w": np.arange(8, dtype=np.float32)},
      model_state={"batch_stats": {"mean": np.full(4, 0.25, np.float32)}}, opt_state=(),
      rng=jax.random.key(1)), sharding)
  ckpt = checkpoint.TrialCheckpointer(str(tmp_path), spec)
  loop = LoopState(step=3, history=[{"step": 3, "metrics": {"accuracy": 0.5}}])
  ckpt.save(3, state, loop)
  loop.history.append({"step": 6, "metrics": {"accuracy": 0.75}})  # the next window's eval
  loop.notes.append("later")
  ckpt.close()

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  reopened = checkpoint.TrialCheckpointer(str(tmp_path), spec)
  restored = reopened.restore(abstract)
  reopened.close()
  assert LoopState.from_json(restored.loop) == LoopState(
      step=3, history=[{"step": 3, "metrics": {"accuracy": 0.5}}])
  assert checkpoint.params_hash(restored.state.params) == checkpoint.params_hash(state.params)
  np.testing.assert_array_equal(restored.state.model_state["batch_stats"]["mean"],
                                np.full(4, 0.25, np.float32))
  assert restored.state.rng.dtype == state.rng.dtype  # a typed key again, same impl
  assert np.array_equal(jax.random.key_data(restored.state.rng), jax.random.key_data(state.rng))
  assert restored.state.params["w"].sharding == sharding


# --- a workload with model state (BatchNorm statistics) ---------------------------------

def test_batchnorm_statistics_are_checkpointed_and_resume_bit_identically(tmp_path):
  spec = config_lib.resolve(bn_config(checkpoint_every_examples=256), 8)
  assert (spec.eval_every_steps, spec.steps_per_call, spec.max_steps) == (4, 64, 24)
  cache = ProgramCache()  # both runs use one program: this test is about the checkpoint
  ref_dir, dir_ = tmp_path / "reference", tmp_path / "interrupted"
  reference = trial.run_trial(spec, workdir=str(ref_dir), cache=cache, log=None)
  with pytest.raises(Interrupt):
    trial.run_trial(spec, workdir=str(dir_), cache=cache, log=None, on_window=interrupt_at(12))
  program, _ = cache.get(spec)
  at_12 = restore_latest(dir_, spec, program)
  assert at_12.step == 12
  initial = program.init_state(spec.seed, spec.lr).model_state["batch_stats"]
  stats_12 = at_12.state.model_state["batch_stats"]
  # Training moved the running statistics away from their initial 0 / 1, and the
  # checkpoint holds the moved ones.
  for name in ("mean", "var"):
    assert not np.allclose(stats_12["BatchNorm_0"][name], initial["BatchNorm_0"][name])

  row = trial.run_trial(spec, workdir=str(dir_), cache=cache, log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1 and row["steps"] == 24
  final = restore_latest(dir_, spec, program).state.model_state
  expected = restore_latest(ref_dir, spec, program).state.model_state
  assert checkpoint.params_hash(final) == checkpoint.params_hash(expected)
  assert not np.array_equal(final["batch_stats"]["BatchNorm_0"]["mean"],
                            stats_12["BatchNorm_0"]["mean"])  # and kept moving after resume
