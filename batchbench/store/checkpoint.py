"""Per-trial checkpoints (an Orbax ``CheckpointManager``) and preemption.

A trial directory (a sweep uses ``<workdir>/trials/<trial_id>/``) holds:

* ``spec.json``: the trial's identity (``TrialSpec.identity()``), written
  atomically before the first checkpoint. Resuming under another spec is refused
  (``SpecMismatchError``), so two runs are never mixed.
* ``checkpoints/<step>/``: Orbax steps, each with two items committed together:
  ``state``, the sharded ``TrainState`` (params, optimizer state, step, RNG key),
  and ``loop``, JSON with everything else the trial loop needs to continue
  bit-identically (data position, time ledger, eval history, timing windows,
  target fields, status, resumes): ``batchbench.runs.trial.LoopState``.
* ``corrupt/<step>/``: a corrupted step moved aside when falling back to the
  previous one (never deleted: it may be worth a look).

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it only when
every item is complete, so a kill mid-save leaves a temporary folder that is never
restored and is removed when the trial's manager is next opened.

Preemption: on one process a SIGTERM handler sets a flag that the trial loop
reads at every call boundary; on several processes (TPU pods) JAX's own
preemption notifier receives SIGTERM and ``reached_preemption_sync_point`` makes
every process stop at the same call (see ``PreemptionWatch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from batchbench.config import TrialSpec
from batchbench.fmt import to_jsonable
from batchbench.store.results import atomic_write_text

SPEC_FILE = "spec.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt"
MAX_TO_KEEP = 2  # the latest and the one before it, to fall back to
TMP_MARKER = ".orbax-checkpoint-tmp"
# Exit status for a run stopped by preemption after checkpointing: EX_TEMPFAIL
# ("temporary failure; try again"), distinct from success, errors and usage (2).
PREEMPTED_EXIT_CODE = 75
# Exit status for a checkpoint that cannot be used or written.
CHECKPOINT_ERROR_EXIT_CODE = 3


class CheckpointError(RuntimeError):
  """A trial's checkpoints cannot be used or written; the message says what to do."""


class SpecMismatchError(CheckpointError):
  """The trial directory holds checkpoints of a different trial spec."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint step cannot be restored (truncated or damaged files)."""

  def __init__(self, message: str, step: int | None, path: str | None):
    super().__init__(message)
    self.step, self.path = step, path


class CheckpointWriteError(CheckpointError):
  """A checkpoint (or the trial directory) could not be written: full disk, permissions."""


class Preempted(Exception):
  """The trial stopped for preemption after saving a checkpoint at a call boundary.

  Attributes:
    step: the step the trial stopped at.
    checkpoint: the directory of the checkpoint written there (None without one).
    row: the finished result row when the trial ended in that same window, else None.
  """

  def __init__(self, step: int | None, checkpoint: str | None,
               row: dict[str, Any] | None = None, message: str | None = None):
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no trial dir)"
    super().__init__(message or f"preempted at step {step}; saved {where}; rerun the same "
                     "command to resume")
    self.step, self.checkpoint, self.row = step, checkpoint, row


# ---------------------------------------------------------------------------------------
# Preemption


class PreemptionWatch:
  """Asked at every call boundary whether to checkpoint and stop.

  ``requested`` is set by the SIGTERM handler of ``preemption_watch`` (one
  process). With several processes a signal reaches each host at a different
  step, so ``check`` asks JAX's preemption sync point instead, which answers True
  on every process at the same call. Its protocol needs a counter that grows by
  one per call on every host, so a call of ``k`` steps reports the ``k`` step
  numbers it covered (Orbax reports the step it saves at, which then agrees).
  """

  def __init__(self, multiprocess: bool = False):
    self.requested = False
    self._multiprocess = multiprocess

  def check(self, step: int, steps_per_call: int = 1) -> bool:
    if self._multiprocess and not self.requested:
      for s in range(step - steps_per_call + 1, step + 1):
        self.requested = _reached_sync_point(s) or self.requested
    return self.requested


def _reached_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # preemption service disabled (jax_enable_preemption_service)
    return False


@contextlib.contextmanager
def preemption_watch() -> Iterator[PreemptionWatch]:
  """A ``PreemptionWatch`` whose flag a SIGTERM sets, for the ``with`` block.

  On one process this installs a SIGTERM handler (main thread only; elsewhere the
  watch never fires) that says so on stderr, and restores the previous handler on
  exit; a second SIGTERM kills the process as usual. On several processes it
  installs nothing: JAX's preemption notifier owns SIGTERM there.
  """
  if jax.process_count() > 1:
    yield PreemptionWatch(multiprocess=True)
    return
  watch = PreemptionWatch()
  if threading.current_thread() is not threading.main_thread():
    yield watch
    return

  def on_sigterm(signum, frame):
    del frame
    watch.requested = True
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
    print("SIGTERM: saving a checkpoint at the next call boundary, then stopping "
          "(send SIGTERM again to kill now)", file=sys.stderr, flush=True)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield watch
  finally:
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# Checkpoints


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: the train state, the loop's JSON state, and how it went."""

  state: Any
  loop: dict[str, Any]
  step: int
  skipped_corrupt: list[int]  # later steps found corrupted and moved aside (fallback)


def params_hash(params: Any) -> str:
  """SHA-256 of the params' paths, dtypes, shapes and bytes: equal iff bit-identical."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # replicated params: any local copy is the value
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _array_handler_registry():
  """Orbax's jax.Array handler, replica-parallel only with several processes.

  Replica-parallel saving (Orbax's default on CPU and TPU) splits each replicated
  array over its replicas, one compiled slice per piece: worth it when several
  hosts share the writing, on one process only seconds of compiles at the first
  save. The state holds nothing but jax.Arrays (typed PRNG keys unwrapped).
  """
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  return ocp.type_handlers.create_type_handler_registry((jax.Array, handler))


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree: Any) -> Any:
  """Typed PRNG keys (arrays or abstract) as their uint32 key data, same sharding."""
  def unwrap(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)
  return jax.tree.map(unwrap, tree)


def _wrap_keys(tree: Any, like: Any) -> Any:
  """Inverse of ``_unwrap_keys``: key data back into keys of ``like``'s impl."""
  def key_impl(ref):
    impls = []  # key_impl takes arrays, not abstract values: read it while tracing
    jax.eval_shape(lambda k: impls.append(jax.random.key_impl(k)) or k, ref)
    return impls[0]
  return jax.tree.map(
      lambda x, ref: jax.random.wrap_key_data(x, impl=key_impl(ref)) if _is_key(ref) else x,
      tree, like)


def _first_line(e: BaseException, limit: int = 400) -> str:
  """The first line of an error, its middle elided: OS errors come last in TensorStore's."""
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ""
  return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def committed_steps(directory: str) -> list[int]:
  """Committed steps under a checkpoints folder, read from disk, ascending."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class TrialCheckpointer:
  """The checkpoints of one trial, in its own directory.

  Opening checks that the directory can be written and that it belongs to
  ``spec`` (before any compute), and clears half-written steps. ``save`` is
  asynchronous: it returns once the state is copied off the devices; ``close``
  waits for the last write to commit.
  """

  def __init__(self, trial_dir: str, spec: TrialSpec, *, max_to_keep: int = MAX_TO_KEEP,
               fallback_to_previous: bool = False, log: Callable[[str], None] | None = None):
    self.trial_dir = os.path.abspath(trial_dir)
    self.directory = os.path.join(self.trial_dir, CHECKPOINT_DIR)
    self._fallback = fallback_to_previous
    self._log = log or (lambda _: None)
    try:
      os.makedirs(self.directory, exist_ok=True)
      self._check_spec(spec)
      probe = os.path.join(self.directory, f".write-probe-{os.getpid()}")
      with open(probe, "w", encoding="utf-8") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise CheckpointWriteError(
          f"cannot write the trial directory {self.trial_dir}: {e}. Use a writable workdir "
          "with free space.") from e
    leftovers = sorted(n for n in os.listdir(self.directory) if TMP_MARKER in n)
    if leftovers:
      self._log(f"removing half-written checkpoint(s) {', '.join(leftovers)} in "
                f"{self.directory} (never restored)")
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "loop"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(
                           type_handler_registry=_array_handler_registry()),
                       "loop": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True,
            cleanup_tmp_directories=True, create=True))

  # -- spec ---------------------------------------------------------------------------

  def _check_spec(self, spec: TrialSpec) -> None:
    path = os.path.join(self.trial_dir, SPEC_FILE)
    want = to_jsonable(spec.identity())
    if not os.path.exists(path):
      if committed_steps(self.directory):
        raise SpecMismatchError(
            f"{self.directory} holds checkpoints but {path} is missing, so they cannot be "
            f"checked against this trial; delete {self.trial_dir} to start the trial afresh")
      if jax.process_index() == 0:
        atomic_write_text(path, json.dumps({"trial_id": spec.trial_id, "spec": want},
                                           indent=2, sort_keys=True))
      return
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)["spec"]
    except (ValueError, KeyError, TypeError) as e:
      raise SpecMismatchError(f"{path} is unreadable ({e}); delete {self.trial_dir} to start "
                              "the trial afresh") from e
    if saved != want:
      diffs = [f"{k}: checkpointed {saved.get(k)!r}, now {want.get(k)!r}"
               for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
      raise SpecMismatchError(
          f"{self.trial_dir} belongs to another trial spec ({'; '.join(diffs)}). Refusing to "
          "resume it under this spec, which would mix two runs: use another workdir, or "
          f"delete {self.trial_dir} to start this trial afresh.")

  # -- restore ------------------------------------------------------------------------

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, abstract_state: Any) -> Restored:
    """Restores the latest committed step onto ``abstract_state`` (shapes + shardings).

    Raises:
      CorruptCheckpointError: the latest step cannot be read (or, falling back,
        no step can), naming it and how to proceed.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    skipped: list[int] = []
    for i, step in enumerate(steps):
      try:
        state, loop = self._restore(step, abstract_state)
        state_step = int(np.asarray(state.step.addressable_data(0)))
        if not loop.get("step") == step == state_step:
          raise ValueError(f"inconsistent step: directory {step}, loop state "
                           f"{loop.get('step')}, train state {state_step}")
      except Exception as e:  # pylint: disable=broad-except  (any failure: unusable step)
        previous = steps[i + 1] if i + 1 < len(steps) else None
        reason = f"{type(e).__name__}: {_first_line(e)}"
        if not self._fallback:
          raise CorruptCheckpointError(self._corrupt_message(step, previous, reason),
                                       step, self.step_path(step)) from e
        moved = self._move_aside(step)
        skipped.append(step)
        self._log(f"checkpoint {self.step_path(step)} is unreadable ({reason}); moved to "
                  f"{moved}; falling back to "
                  f"{'step ' + str(previous) if previous is not None else 'nothing'}")
        continue
      return Restored(state, loop, step, skipped)
    raise CorruptCheckpointError(
        f"no readable checkpoint remains in {self.directory} (unreadable steps "
        f"{skipped} moved to {os.path.join(self.trial_dir, CORRUPT_DIR)}). Delete "
        f"{self.trial_dir} to restart the trial from step 0.", None, self.directory)

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    abstract = _unwrap_keys(abstract_state)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), abstract)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
        loop=ocp.args.JsonRestore()))
    return _wrap_keys(out["state"], abstract_state), out["loop"]

  def _corrupt_message(self, step: int, previous: int | None, reason: str) -> str:
    how = (f"To resume from the previous checkpoint (step {previous}) instead, rerun with "
           "--config.fallback_to_previous_checkpoint=True (the damaged step is moved to "
           f"{os.path.join(self.trial_dir, CORRUPT_DIR)}); to restart the trial from step "
           f"0, delete {self.trial_dir}." if previous is not None else
           f"There is no earlier checkpoint; delete {self.trial_dir} to restart the trial "
           "from step 0.")
    return (f"the latest checkpoint of this trial, step {step} at {self.step_path(step)}, "
            f"cannot be restored ({reason}). {how}")

  def _move_aside(self, step: int) -> str:
    dest = os.path.join(self.trial_dir, CORRUPT_DIR, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      if os.path.exists(dest):
        dest = f"{dest}-{int(time.time())}"
      os.replace(self.step_path(step), dest)
    self._manager.reload()
    return dest

  # -- save ---------------------------------------------------------------------------

  def save(self, step: int, state: Any, loop: Any) -> None:
    """Starts saving ``state`` and ``loop`` as ``step``; returns once off the devices.

    ``loop`` is the trial loop's state, a dataclass of JSON-able fields; ``restore``
    gives it back as a dict of those fields.

    Raises:
      CheckpointWriteError: this or the previous (asynchronous) save failed.
    """
    # The JSON is written in the background while the loop goes on (and appends to its
    # history): save a snapshot (asdict copies). The arrays are copied off the devices
    # before returning.
    loop = to_jsonable(dataclasses.asdict(loop))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(_unwrap_keys(state)), loop=ocp.args.JsonSave(loop)),
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e
    if not saved:
      raise CheckpointWriteError(f"Orbax declined to save step {step} in {self.directory} "
                                 f"(latest is {self._manager.latest_step()})")

  def wait(self) -> None:
    """Blocks until pending saves are committed. Raises ``CheckpointWriteError``."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def close(self) -> None:
    """Waits for pending saves and releases the manager (idempotent)."""
    try:
      self.wait()
    finally:
      with contextlib.suppress(Exception):
        self._manager.close()

  def _write_error(self, e: Exception) -> CheckpointWriteError:
    steps = committed_steps(self.directory)
    last = (f"The last committed checkpoint, step {steps[-1]}, is intact and a rerun resumes "
            "from it" if steps else "No checkpoint of this trial was committed yet")
    return CheckpointWriteError(
        f"writing a checkpoint under {self.directory} failed ({type(e).__name__}: "
        f"{_first_line(e)}): is the disk full or the directory read-only? {last}.")
