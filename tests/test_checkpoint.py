"""Checkpoints in the trial loop: bit-exact resume, preemption, corruption, spec checks.

Every resumed trial is compared with one uninterrupted run of the same spec: the
final params (their SHA-256), every eval's metrics, steps to target and the final
loss must be bit-identical on CPU.
"""

import gc
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from batchbench import checkpoint, parallel, trial
from batchbench import config as config_lib
from batchbench.checkpoint import (CheckpointWriteError, CorruptCheckpointError, Preempted,
                                   SpecMismatchError)
from batchbench.config import ConfigError

# Results that must be bit-identical between a resumed and an uninterrupted trial.
RESULT_KEYS = ("status", "steps", "steps_to_target", "examples_to_target", "params_hash",
               "final_eval", "final_train_loss", "diverged_step", "error")


def small_config(**overrides):
  """Digits, a 64-unit MLP, target 0.95 accuracy (about 80 steps at batch 32).

  Two steps per call and four calls per eval window, with a checkpoint every
  three steps: checkpoints fall inside windows, so resuming must realign them.
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


@pytest.fixture(scope="module")
def reference():
  """The uninterrupted trial, without a trial directory (no checkpoints, no handler)."""
  before = signal.getsignal(signal.SIGTERM)
  handlers = []
  row = trial.run_trial(small_spec(), log=None,
                        on_window=lambda *_: handlers.append(signal.getsignal(signal.SIGTERM)))
  assert all(h is before for h in handlers), "no SIGTERM handler without a trial dir"
  assert row["status"] == "ok" and row["steps_to_target"] and row["resumes"] == 0
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
  # Every 3 steps, at the next call boundary (2 steps): 4, 6, 10, 12, 16, 18, 22; the
  # hook runs after the window's checkpoint; max_to_keep 2.
  assert steps == [18, 22]

  row = trial.run_trial(small_spec(), workdir=str(trial_dir), log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1 and not row["restored_from_fallback"]
  assert row["notes"] == ["resumed from step 22"]
  ledger = row["time_ledger"]
  assert ledger["checkpoint"] > 0
  assert ledger["compile"] > row["compile_s"]  # both runs' compile seconds: restored ledger
  assert row["samples_per_sec"] and row["timed_windows"] >= 3

  # The final checkpoint: a trial whose row was lost (sweep killed before appending it)
  # is rebuilt from it without training again.
  again = trial.run_trial(small_spec(), workdir=str(trial_dir), log=None)
  assert_same_result(again, reference)
  assert again["timed_windows"] == row["timed_windows"]
  assert again["notes"][-1] == f"resumed from step {reference['steps']}"


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
  # Flag seen after the window ending at step 8; stopped after the next call (2 steps),
  # inside the next eval window, with that step committed before raising.
  assert stopped.value.step == 10 and stopped.value.row is None
  assert stopped.value.checkpoint == os.path.join(trial_dir, "checkpoints", "10")
  assert checkpoint.committed_steps(os.path.join(trial_dir, "checkpoints"))[-1] == 10

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


def test_resuming_under_a_changed_spec_is_refused_before_any_compute(tmp_path, monkeypatch):
  trial_dir = str(tmp_path / "trial")
  checkpoint.TrialCheckpointer(trial_dir, small_spec()).close()  # writes spec.json

  def no_compute(*args, **kwargs):
    raise AssertionError("computed before checking the spec")

  monkeypatch.setattr(parallel, "init_state", no_compute)
  monkeypatch.setattr(parallel, "abstract_state", no_compute)
  for change, field in [({"global_batch": 64}, "global_batch"), ({"seed": 1}, "seed"),
                        ({"lr_multiplier": 2.0}, "lr"),
                        ({"workload_options": {"hidden": (32,)}}, "workload_options")]:
    with pytest.raises(SpecMismatchError) as err:
      trial.run_trial(small_spec(**change), workdir=trial_dir, log=None)
    assert field in str(err.value) and "Refusing to resume" in str(err.value)
    assert trial_dir in str(err.value)
  # How often a trial is checkpointed is not part of what it computes.
  other = small_spec(checkpoint_every_examples=1024)
  assert other.trial_id == small_spec().trial_id
  checkpoint.TrialCheckpointer(trial_dir, other).close()


def test_unwritable_workdir_is_a_clear_error_before_any_compute(tmp_path, monkeypatch):
  def no_compute(*args, **kwargs):
    raise AssertionError("computed before checking the workdir")

  monkeypatch.setattr(parallel, "init_state", no_compute)
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
  with pytest.raises(ConfigError, match="not a directory"):  # what the commands check first
    config_lib.check_workdir(str(blocker / "sweep"))


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
  replicated = jax.sharding.NamedSharding(parallel.make_mesh(2), jax.sharding.PartitionSpec())
  state = jax.device_put(parallel.TrainState(
      step=np.int32(3), params={"w": np.arange(8, dtype=np.float32)}, opt_state=(),
      rng=jax.random.key(1)), replicated)
  ckpt = checkpoint.TrialCheckpointer(str(tmp_path), spec)
  history = [{"step": 3, "metrics": {"accuracy": 0.5}}]
  loop = {"step": 3, "history": history, "notes": []}
  ckpt.save(3, state, loop)
  history.append({"step": 6, "metrics": {"accuracy": 0.75}})  # the next window's eval
  loop["notes"].append("later")
  ckpt.close()

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  reopened = checkpoint.TrialCheckpointer(str(tmp_path), spec)
  restored = reopened.restore(abstract)
  reopened.close()
  assert restored.loop == {"step": 3, "history": [{"step": 3, "metrics": {"accuracy": 0.5}}],
                           "notes": []}
  assert checkpoint.params_hash(restored.state.params) == checkpoint.params_hash(state.params)
  assert restored.state.rng.dtype == state.rng.dtype  # a typed key again, same impl
  assert np.array_equal(jax.random.key_data(restored.state.rng), jax.random.key_data(state.rng))
  assert restored.state.params["w"].sharding == replicated


def test_resume_is_bit_identical_when_calls_span_several_evals(tmp_path):
  # Evals every 2 steps, 16 steps per call: each call returns 8 sets of eval parameters.
  overrides = dict(steps_per_call=16, eval_every_examples=64)
  assert small_spec(**overrides).evals_per_call == 8
  reference = trial.run_trial(small_spec(**overrides), log=None)
  assert reference["status"] == "ok" and reference["steps_to_target"] % 2 == 0
  trial_dir = str(tmp_path / "trial")
  with pytest.raises(Interrupt):
    trial.run_trial(small_spec(**overrides), workdir=trial_dir, log=None,
                    on_window=interrupt_at(32))
  assert checkpoint.committed_steps(os.path.join(trial_dir, checkpoint.CHECKPOINT_DIR))[-1] == 32
  row = trial.run_trial(small_spec(**overrides), workdir=trial_dir, log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1 and row["notes"] == ["resumed from step 32"]
