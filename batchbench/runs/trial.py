"""One trial: train a workload at one global batch to its target or budget.

A trial answers *how many steps* (and examples, epochs) it takes to reach the
target at one (batch, LR, seed); how *fast* a step is comes from the batch's
throughput point (``runs.throughput``), measured apart from evals and
checkpoints. The trial still times its own windows, a secondary figure.

The loop, per window: dispatch compiled train calls (each up to ``steps_per_call``
steps, ending exactly at the next eval, the budget or a checkpoint; the next call's
inputs are built on the host while the device works), close the window with
``jax.block_until_ready``, check the losses for divergence and, at an eval
boundary, evaluate and check the target. Every second goes to a ledger bucket (setup, compile,
train, eval, checkpoint).

With a trial directory the loop checkpoints every ``checkpoint_every_examples``
(at that step), on SIGTERM (at the next call boundary) and at the end; a rerun resumes from the
latest checkpoint. What is saved is the train state and ``LoopState``, the one
dataclass that holds everything else the loop needs (the step, which is also the
data position; the eval history, target fields, status, time ledger, windows).
Resume order: the train state is restored onto the program's abstract sharded
state, the loop state from its JSON, and the first window after a restore is a
warm-up; the resumed run then computes exactly what the uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batchbench.analysis.noise import NoiseScale
from batchbench.config import TrialSpec
from batchbench.core import distributed, optim
from batchbench.core.program import MAX_IN_FLIGHT, Program, ProgramCache, build
from batchbench.measure.memory import PeakTracker
from batchbench.measure.timing import BUCKETS, TimeLedger, Window, WindowTimer
from batchbench.runs.observe import TrialObserver
from batchbench.runs.rows import make_row, target_fields
from batchbench.store import checkpoint

# Without evals (throughput-only workloads), close a window about every this many
# examples, so the in-loop figure has several windows.
WINDOW_EXAMPLES = 32_768
PROGRESS_EVERY_S = 2.0
Log = Callable[[str], None]


@dataclasses.dataclass
class LoopState:
  """Everything the trial loop carries besides the train state: what a checkpoint saves."""

  step: int = 0  # optimizer steps done; also the data position
  status: str | None = None
  diverged_step: int | None = None
  last_loss: float | None = None
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  to_target: dict[str, Any] = dataclasses.field(default_factory=dict)
  ledger: dict[str, float] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
  windows: list[Window] = dataclasses.field(default_factory=list)
  wall_s: float = 0.0  # wall seconds before the current run of the loop (resumes)
  resumes: int = 0
  restored_from_fallback: bool = False
  notes: list[str] = dataclasses.field(default_factory=list)
  noise: NoiseScale | None = None  # the gradient noise scale's moving averages
  profile: dict[str, Any] | None = None  # where the profiled steps' trace is, once taken

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> LoopState:
    noise = d.get("noise")
    return cls(**{**d, "windows": [Window(**w) for w in d["windows"]],
                  "noise": NoiseScale(**noise) if noise else None})


@dataclasses.dataclass
class Obtained:
  """A program as a trial got it: from a cache, or compiled now."""

  program: Program
  seconds: float  # spent getting it in this trial
  cached: bool


def obtain_program(spec: TrialSpec, cache: ProgramCache | None) -> Obtained:
  start = time.perf_counter()
  if cache is None:
    program, hit = build(spec), False
  else:
    program, hit = cache.get(spec)
  return Obtained(program, time.perf_counter() - start, hit or program.train.cached)


class Trial:
  """Runs (or resumes) one trial to its target, budget, divergence or preemption."""

  def __init__(self, spec: TrialSpec, *, clock: Callable[[], float] = time.perf_counter,
               log: Log | None = None, ckpt: checkpoint.TrialCheckpointer | None = None,
               watch: checkpoint.PreemptionWatch | None = None,
               cache: ProgramCache | None = None, point: dict[str, Any] | None = None,
               on_window: Callable[[int, Window], None] | None = None,
               observers: tuple[TrialObserver, ...] = (), profile_steps: int = 0,
               profile_dir: str | None = None):
    self.spec = spec
    self.observers = observers
    self.profile_steps, self.profile_dir = profile_steps, profile_dir
    self.clock = clock
    self.log = log or (lambda _: None)
    self.ckpt = ckpt
    self.watch = watch or checkpoint.PreemptionWatch()
    self.cache = cache
    self.point = point
    self.on_window = on_window
    self.loop = LoopState()
    self.ledger = TimeLedger(clock, self.loop.ledger)
    self.started = clock()

  # -- set-up ------------------------------------------------------------------------

  def _restore(self, program: Program):
    with self.ledger.measure("checkpoint"):
      restored = self.ckpt.restore(program.abstract_state())
    self.loop = LoopState.from_json(restored.loop)
    elapsed = self.ledger.as_dict()  # set-up and compile of this run, before the restore
    self.ledger = TimeLedger(self.clock, self.loop.ledger)
    for bucket, seconds in elapsed.items():
      self.ledger.add(bucket, seconds)
    self.loop.resumes += 1
    self.loop.restored_from_fallback |= bool(restored.skipped_corrupt)
    self.loop.notes.append(f"resumed from step {self.loop.step}" + (
        f" after moving aside corrupted step(s) {restored.skipped_corrupt}"
        if restored.skipped_corrupt else ""))
    self.log(f"  {self.loop.notes[-1]} ({self.ckpt.step_path(self.loop.step)})")
    return restored.state

  def _wall(self) -> float:
    return self.loop.wall_s + self.clock() - self.started

  # -- the loop ----------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Runs the trial; returns its result row.

    Raises:
      checkpoint.Preempted: SIGTERM arrived; a checkpoint was saved at the next call
        boundary (its ``row`` is set if the trial had just finished).
      checkpoint.CheckpointError: the trial directory cannot be used or written.
    """
    spec = self.spec
    with self.ledger.measure("setup"):
      peak = PeakTracker(jax.local_devices()[:spec.num_devices])
      peak.start()
    with self.ledger.measure("compile"):
      got = obtain_program(spec, self.cache)
    program = got.program
    compile_fields = {"compile_s": got.seconds, "compile_cached": got.cached,
                      "program_compile_s": program.train.compile_s,
                      "flops_per_step": program.flops_per_step}
    budget, compiled_peak = spec.memory_budget_bytes, program.train.memory.get("peak_bytes")
    if budget and compiled_peak is not None and compiled_peak > budget:
      self.log(f"[{spec.workload} B={spec.global_batch}] compiled peak {compiled_peak:,} bytes "
               f"exceeds memory_budget_bytes {budget:,}: recorded as oom without running")
      return make_row(spec, status="oom", memory=program.train.memory, ledger=self.ledger,
                      wall=self._wall(), error=f"compiled peak {compiled_peak} bytes > "
                      f"memory_budget_bytes {budget}", **compile_fields)

    with self.ledger.measure("setup"):
      feed = program.feed(spec.seed)
    try:
      return self._train(program, feed, got, compile_fields, peak)
    finally:
      feed.close()  # the host pipeline's threads

  def _train(self, program: Program, feed, got: Obtained, compile_fields: dict[str, Any],
             peak: PeakTracker) -> dict[str, Any]:
    """The loop of ``run``, from the initial (or restored) state to the row."""
    spec, loop = self.spec, self.loop
    resume = self.ckpt is not None and self.ckpt.latest_step is not None
    with self.ledger.measure("setup"):
      state = None if resume else program.init_state(spec.seed, spec.lr)
    if resume:
      state = self._restore(program)
      loop = self.loop
    if spec.gns_batches and loop.noise is None:
      loop.noise = NoiseScale(*spec.gns_batches, decay=spec.gns_ema)
    saved_step = loop.step
    timer = WindowTimer(self.clock, windows=loop.windows)
    drop_window = resume  # the first window after a restore is a warm-up, like the first
    k = program.steps_per_call
    every = spec.eval_every_steps
    no_eval_window = max(1, WINDOW_EXAMPLES // (k * spec.global_batch)) * k

    def evals_due() -> bool:
      # Past the target (trained on to the budget), only the final eval is needed: the
      # final metrics and the train-test gap are compared at the budget.
      return bool(every) and not loop.to_target
    # Evaluates when the workload has test data or its own evaluate (the eval program is
    # compiled on first use, so a workload with its own never compiles it).
    evaluate = program.can_evaluate
    last_log = self.clock()
    lr_at = lambda step: spec.lr * float(optim.schedule_shape(
        spec.warmup_steps, spec.schedule, spec.max_steps)(step))
    for observer in self.observers:
      observer.on_start(spec, loop.step)
    self.log(f"[{spec.workload} B={spec.global_batch} lr={spec.lr:.4g} seed={spec.seed}] "
             f"{spec.num_devices} device(s) x {spec.per_device_batch} x accum "
             f"{spec.accum_steps}, {k} steps/call, program "
             + ("from cache" if got.cached else f"compiled in {got.seconds:.2f}s"))

    def window_end(step: int) -> int:  # the next eval (or window), budget or checkpoint
      window_steps = every if evals_due() else no_eval_window
      end = (step // window_steps + 1) * window_steps
      if spec.max_steps:
        end = min(end, spec.max_steps)
      return min(end, next_save) if next_save else end

    windows_run = 0
    while loop.status is None:
      start_step = loop.step
      next_save = self._next_checkpoint(saved_step) if self.ckpt is not None else None
      end = window_end(loop.step)
      # Profile the first steady-state window (not the warm-up), at most profile_steps
      # long; it is left out of the timing like the warm-up.
      profiling = (self.profile_steps > 0 and loop.profile is None and windows_run >= 1
                   and self.profile_dir is not None)
      if profiling:
        end = min(end, loop.step + self.profile_steps)
        jax.profiler.start_trace(self.profile_dir)
      preempted, losses = False, []
      timer.start()
      train_start = self.clock()
      while loop.step < end:
        n = min(k, end - loop.step)
        with self.ledger.measure("input_wait"):
          call_feed = feed(loop.step, n)
        state, metrics = program.run(state, call_feed, n, step=loop.step)
        losses.append((metrics, n))
        if len(losses) > MAX_IN_FLIGHT:  # a bounded queue of calls (see MAX_IN_FLIGHT)
          jax.block_until_ready(losses[-MAX_IN_FLIGHT - 1][0])
        loop.step += n
        # The next call's inputs, while the device runs this one (a checkpoint that cuts
        # the next window's first call shorter only costs building them again).
        ahead = end if loop.step < end else window_end(loop.step)
        if ahead > loop.step and (not spec.max_steps or loop.step < spec.max_steps):
          feed.prefetch(loop.step, min(k, ahead - loop.step))
        if self.watch.check(loop.step, n):
          preempted = True
          break
      jax.block_until_ready((state, losses))
      steps = loop.step - start_step
      timer.stop(steps * spec.global_batch, steps)
      timed = timer.windows.pop() if drop_window or profiling else timer.windows[-1]
      drop_window = False
      windows_run += 1
      self.ledger.add("profile" if profiling else "train", self.clock() - train_start)
      if profiling:
        jax.profiler.stop_trace()
        loop.profile = {"dir": self.profile_dir, "first_step": start_step,
                        "last_step": loop.step}
        self.log(f"  profiled steps {start_step + 1}-{loop.step}: trace in "
                 f"{self.profile_dir} (tensorboard --logdir, or Perfetto)")

      fetched = jax.device_get(losses)
      window = {name: np.concatenate([np.asarray(m[name])[:n] for m, n in fetched])
                for name in fetched[0][0]}
      window_losses = window["loss"]
      if loop.noise is not None:
        loop.noise.update(window["grad_sq_small"].tolist(), window["grad_sq_big"].tolist())
      loop.last_loss = float(window_losses[-1])
      bad = np.flatnonzero(~np.isfinite(window_losses))
      if bad.size:
        loop.diverged_step = start_step + int(bad[0]) + 1
        loop.status = "diverged"
        break
      if (evaluate and evals_due() and loop.step % every == 0
          and self._evaluate(program, state) and spec.stop_at_target):
        loop.status = "ok"
        break
      done = "ok" if spec.target is None or loop.to_target else "target_not_reached"
      if spec.max_steps and loop.step >= spec.max_steps:
        loop.status = done
      elif spec.max_seconds and distributed.agree_any(
          self.ledger.seconds["train"] >= spec.max_seconds):  # clocks differ by process
        loop.status = done
      if self.clock() - last_log >= PROGRESS_EVERY_S or loop.status:
        last_log = self.clock()
        self._progress(timed)
      if self.ckpt is not None and loop.status is None and (preempted
                                                            or loop.step == next_save):
        self._save(state)
        saved_step = loop.step
      if self.on_window is not None:
        self.on_window(loop.step, timed)
      for observer in self.observers:
        observer.on_window(loop.step, loop.step * spec.global_batch,
                           timed.examples / max(timed.seconds, 1e-12), loop.last_loss,
                           lr_at(loop.step - 1))
      if preempted and loop.status is None:
        if self.ckpt is not None:
          with self.ledger.measure("checkpoint"):
            self.ckpt.wait()
        raise checkpoint.Preempted(loop.step, self._step_path())

    # The budget ended between evals: this eval counts toward the target too.
    if (evaluate and loop.status != "diverged"
        and (not loop.history or loop.history[-1]["step"] != loop.step)
        and self._evaluate(program, state)):
      loop.status = "ok"
    if self.ckpt is not None and saved_step != loop.step:  # a killed sweep need not redo it
      self._save(state)
    if self.ckpt is not None:
      with self.ledger.measure("checkpoint"):
        self.ckpt.wait()
    device_peak, peak_note = peak.stop()
    perf = timer.summary()
    # MFU at the throughput phase's rate (the batch's measured speed), else the loop's.
    basis = "throughput_point" if self.point and self.point.get("samples_per_sec") else (
        "trial_loop" if perf.get("samples_per_sec") else None)
    rate = (self.point["samples_per_sec"] if basis == "throughput_point"
            else perf.get("samples_per_sec"))
    row = make_row(
        spec, status=loop.status, steps=loop.step, perf=perf,
        **program.utilization(rate), mfu_basis=basis,
        memory={**program.train.memory, "device_peak_bytes": device_peak,
                "device_peak_note": peak_note},
        history=loop.history, ledger=self.ledger, wall=self._wall(),
        error=f"non-finite loss at step {loop.diverged_step}" if loop.diverged_step else None,
        final_train_loss=loop.last_loss, diverged_step=loop.diverged_step,
        traces={"train": len(program.train.traces),
                "eval": len(program.eval_slot[0].traces) if program.eval_slot[0] else 0},
        resumes=loop.resumes, params_hash=checkpoint.params_hash(state.params),
        restored_from_fallback=loop.restored_from_fallback, notes=loop.notes,
        profile=loop.profile, **compile_fields, **self._noise_fields(), **loop.to_target)
    self._summary(row)
    for observer in self.observers:
      observer.on_end(row)
    if self.watch.requested:  # SIGTERM in the last window: finished, but stop the sweep
      raise checkpoint.Preempted(loop.step, self._step_path(), row=row)
    return row

  # -- pieces of the loop ------------------------------------------------------------

  def _evaluate(self, program: Program, state) -> bool:
    """Evaluates at the current step; True if this is the trial's first target hit."""
    spec, loop = self.spec, self.loop
    with self.ledger.measure("eval"):
      metrics = program.evaluate(state)
      train_metrics = program.evaluate(state, "train")
    train_s = self.ledger.seconds["train"]
    entry = {"examples": loop.step * spec.global_batch, "step": loop.step,
             "train_s": train_s, "metrics": metrics}
    if train_metrics is not None:
      entry["train_metrics"] = train_metrics
    if loop.noise is not None:
      entry["b_simple"] = loop.noise.b_simple
      entry["gns_steps"] = loop.noise.steps
    loop.history.append(entry)
    for observer in self.observers:
      observer.on_eval(loop.step, entry["examples"], metrics, entry.get("b_simple"))
    if spec.target and not loop.to_target and spec.target.met(metrics[spec.target.metric]):
      loop.to_target = target_fields(spec, loop.step, train_s, self._wall(), self.point)
      return True
    return False

  def _noise_fields(self) -> dict[str, Any]:
    """The row's noise-scale summary: B_simple at the target's eval (else the last)."""
    spec, loop = self.spec, self.loop
    batches = spec.gns_batches or (None, None)
    at = [h for h in loop.history if h.get("step") == loop.to_target.get("steps_to_target")]
    last = (at or loop.history or [{}])[-1]
    return {"gns_source": spec.gns_source, "gns_b_small": batches[0],
            "gns_b_big": batches[1], "gns_note": spec.gns_note,
            "gns_every": spec.gns_every if spec.gns_source else None,
            "b_simple": last.get("b_simple"), "gns_steps": last.get("gns_steps"),
            "b_simple_final": loop.noise.b_simple if loop.noise else None}

  def _save(self, state) -> None:
    self.loop.wall_s = self._wall()
    self.started = self.clock()
    with self.ledger.measure("checkpoint"):
      self.ckpt.save(self.loop.step, state, self.loop)

  def _step_path(self) -> str | None:
    return self.ckpt.step_path(self.loop.step) if self.ckpt is not None else None

  def _next_checkpoint(self, saved_step: int) -> int | None:
    """The first step at or past the next ``checkpoint_every_examples`` multiple."""
    spec = self.spec
    every = spec.checkpoint_every_examples
    if not every:
      return None
    examples = (saved_step * spec.global_batch // every + 1) * every
    return -(-examples // spec.global_batch)

  def _progress(self, window: Window) -> None:
    spec, loop = self.spec, self.loop
    shown = loop.history[-1]["metrics"] if loop.history else {}
    metric = (f" | {spec.target.metric} {shown[spec.target.metric]:.4f}"
              if spec.target and shown else "")
    rate = window.examples / max(window.seconds, 1e-9)
    self.log(f"  step {loop.step:>7d} | {loop.step * spec.global_batch:>9d} examples | loss "
             f"{loop.last_loss:.4f}{metric} | {rate:,.0f} samples/s")

  def _summary(self, row: dict[str, Any]) -> None:
    parts = [f"  -> {row['status']} after {row['steps']} steps"]
    if row["steps_to_target"] is not None:
      parts.append(f"target at step {row['steps_to_target']}")
    if row["final_eval"]:
      parts.append(", ".join(f"{k} {v:.4f}" for k, v in sorted(row["final_eval"].items())))
    self.log("; ".join(parts))


def run_trial(spec: TrialSpec, *, clock: Callable[[], float] = time.perf_counter,
              log: Log | None = print, workdir: str | None = None,
              fallback_to_previous_checkpoint: bool = False,
              preemption: checkpoint.PreemptionWatch | None = None,
              cache: ProgramCache | None = None, point: dict[str, Any] | None = None,
              on_window: Callable[[int, Window], None] | None = None,
              observers: tuple[TrialObserver, ...] = (),
              profile_steps: int = 0) -> dict[str, Any]:
  """Runs one trial, or resumes it from its latest checkpoint, and returns its result row.

  Args:
    spec: the resolved trial.
    clock: seconds clock (injectable for tests).
    log: progress sink; None for silence.
    workdir: the trial's own directory (a sweep passes ``<workdir>/trials/<trial_id>``)
      for its spec and checkpoints; None: no checkpoints and no SIGTERM handling.
    fallback_to_previous_checkpoint: restore the previous checkpoint when the latest
      is corrupted (recorded in the row) instead of raising.
    preemption: a watch shared with the caller (a sweep watching SIGTERM across
      trials); default one for this trial when it has a ``workdir``.
    cache: programs shared with other trials of this process (a sweep's); None
      compiles the trial's own.
    point: the batch's throughput point (``time_to_target_s`` uses its step time).
    on_window: called as ``on_window(step, window)`` after every timing window (and its
      checkpoint), outside the timed region; tests use it to interrupt a trial.
    observers: ``TrialObserver``s (TensorBoard, MLPerf logging).
    profile_steps: trace this many steady-state steps with ``jax.profiler`` into
      ``<workdir>/profile`` (the window after the warm-up, left out of the timing; the
      row's ``profile`` says where). Needs ``workdir``.

  Returns:
    The result row. Divergence and a missed target are statuses, not exceptions.

  Raises:
    checkpoint.Preempted: SIGTERM arrived; a checkpoint was saved at the next call
      boundary (its ``row`` is set if the trial had just finished).
    checkpoint.CheckpointError: a spec mismatch, corrupted checkpoint or failed write
      (subclasses say which); the message says how to proceed.
  """
  with contextlib.ExitStack() as stack:
    if preemption is None:
      preemption = (stack.enter_context(checkpoint.preemption_watch())
                    if workdir is not None else checkpoint.PreemptionWatch())
    ckpt = None
    if workdir is not None:
      ckpt = checkpoint.TrialCheckpointer(
          workdir, spec, fallback_to_previous=fallback_to_previous_checkpoint, log=log)
    trial = Trial(spec, clock=clock, log=log, ckpt=ckpt, watch=preemption, cache=cache,
                  point=point, on_window=on_window, observers=observers,
                  profile_steps=profile_steps,
                  profile_dir=f"{workdir}/profile" if workdir is not None else None)
    try:
      row = trial.run()
    except BaseException:
      if ckpt is not None:  # let a save in flight commit; the first error wins
        with contextlib.suppress(Exception):
          ckpt.close()
      raise
    if ckpt is not None:
      ckpt.close()
    return row
