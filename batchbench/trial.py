"""One trial: train a workload at one global batch to its target or budget, timed.

The loop, per timing window: build the next call's inputs on the host, dispatch
compiled train calls (each ``steps_per_call`` steps), and close the window with
``jax.block_until_ready``; then check the losses for divergence and, on an eval
boundary, evaluate and check the target. Evals and budgets fall on call
boundaries; a call that spans several eval intervals (``spec.evals_per_call``)
returns the parameters at each, and they are evaluated after it, in order. Every
second goes to a ledger bucket (setup, compile, train, eval, checkpoint).

With a trial directory the loop checkpoints (``batchbench.checkpoint``) every
``checkpoint_every_examples`` at the next call boundary, on SIGTERM, and at the
end, and a rerun resumes from the latest checkpoint. Resume order: the train
state is restored onto the abstract sharded state; the step (which is also the
data position), eval history, target fields, status, time ledger, timing
windows and wall seconds come from the checkpoint's loop state; windows realign
to the grid of eval boundaries, so the resumed run computes exactly what the
uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batchbench import checkpoint, parallel
from batchbench.config import TrialSpec
from batchbench.data import device as device_data
from batchbench.timing import TimeLedger, Window, WindowTimer
from batchbench.workloads import get_workload

# Without evals (throughput-only workloads), close a timing window about every
# this many examples, so there are enough windows for a median and an IQR.
WINDOW_EXAMPLES = 32_768
PROGRESS_EVERY_S = 2.0


def _device_peak_bytes(mesh) -> int | None:
  """The runtime's own peak memory over the mesh devices, where it reports one."""
  peaks = []
  for d in mesh.devices.flat:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def run_trial(spec: TrialSpec, *, mesh=None, clock: Callable[[], float] = time.perf_counter,
              log: Callable[[str], None] | None = print, workdir: str | None = None,
              fallback_to_previous_checkpoint: bool = False,
              preemption: checkpoint.PreemptionWatch | None = None,
              on_window: Callable[[int, Window], None] | None = None) -> dict[str, Any]:
  """Runs one trial, or resumes it from its latest checkpoint, and returns its result row.

  Args:
    spec: the resolved trial.
    mesh: the device mesh; default a ``data`` mesh of ``spec.num_devices``.
    clock: seconds clock (injectable for tests).
    log: progress sink; None for silence.
    workdir: the trial's own directory (a sweep passes ``<workdir>/trials/<trial_id>``)
      for its spec and checkpoints; None: no checkpoints and no SIGTERM handling.
    fallback_to_previous_checkpoint: restore the previous checkpoint when the latest
      is corrupted (recorded in the row) instead of raising.
    preemption: a watch shared with the caller (a sweep watching SIGTERM across
      trials); default one for this trial when it has a ``workdir``.
    on_window: called as ``on_window(step, window)`` after every timing window
      (and its checkpoint) with the window's examples, steps and seconds, outside
      the timed region; tests use it to interrupt a trial, the overhead benchmark
      to interleave its own loops and pair their windows with the trial's.

  Returns:
    The result row. Divergence and a missed target are statuses, not exceptions.

  Raises:
    checkpoint.Preempted: SIGTERM arrived; a checkpoint was saved at the next call
      boundary (its ``row`` is set if the trial had just finished).
    checkpoint.CheckpointError: a spec mismatch, corrupted checkpoint or failed write
      (subclasses say which); the message says how to proceed.
  """
  log = log or (lambda _: None)
  with contextlib.ExitStack() as stack:
    if preemption is None:
      preemption = (stack.enter_context(checkpoint.preemption_watch())
                    if workdir is not None else checkpoint.PreemptionWatch())
    ckpt = None
    if workdir is not None:
      ckpt = checkpoint.TrialCheckpointer(
          workdir, spec, fallback_to_previous=fallback_to_previous_checkpoint, log=log)
    try:
      row = _run_trial(spec, mesh, clock, log, ckpt, preemption, on_window)
    except BaseException:
      if ckpt is not None:  # let a save in flight commit; the first error wins
        with contextlib.suppress(Exception):
          ckpt.close()
      raise
    if ckpt is not None:
      ckpt.close()
    return row


def _run_trial(spec: TrialSpec, mesh, clock: Callable[[], float], log: Callable[[str], None],
               ckpt: checkpoint.TrialCheckpointer | None, watch: checkpoint.PreemptionWatch,
               on_window: Callable[[int, Window], None] | None) -> dict[str, Any]:
  trial_start = clock()
  ledger = TimeLedger(clock)
  timer = WindowTimer(clock)
  mesh = mesh or parallel.make_mesh(spec.num_devices)
  workload = get_workload(spec.workload, dict(spec.workload_options))
  resume = ckpt is not None and ckpt.latest_step is not None

  with ledger.measure("setup"):
    tx = parallel.make_optimizer(spec)
    # A resumed trial restores its state onto this abstract one (below), never computes it.
    state = (parallel.abstract_state(workload, spec, mesh, tx) if resume
             else parallel.init_state(workload, spec, mesh, tx))
    if workload.synthetic:
      data, eval_data = (), None
    else:
      arrays = workload.data()
      data = device_data.put_train_data(arrays, mesh)
      eval_data = device_data.put_eval_data(arrays, mesh)
    feed = parallel.make_feed(workload, spec)
    flops = parallel.flops_per_step(workload, spec, mesh, tx, state, data)
  with ledger.measure("compile"):
    train_call = parallel.compile_train_call(workload, spec, mesh, tx, state, data)
    eval_call = (parallel.compile_eval_call(workload, mesh, state.params, eval_data,
                                            spec.evals_per_call)
                 if eval_data is not None else None)
  compile_s = train_call.compile_s + (eval_call.compile_s if eval_call else 0.0)
  peak = train_call.memory.get("peak_bytes")
  if spec.memory_budget_bytes and peak is not None and peak > spec.memory_budget_bytes:
    log(f"[{spec.workload} B={spec.global_batch}] compiled peak {peak:,} bytes exceeds "
        f"memory_budget_bytes {spec.memory_budget_bytes:,}: recorded as oom without running")
    return make_row(spec, status="oom", compile_s=compile_s, memory=train_call.memory,
                    flops=flops, ledger=ledger, wall=clock() - trial_start,
                    error=f"compiled peak {peak} bytes > memory_budget_bytes "
                          f"{spec.memory_budget_bytes}")

  k = spec.steps_per_call
  eval_every = spec.eval_every_steps
  calls_per_window = (max(1, eval_every // k) if eval_every else
                      max(1, WINDOW_EXAMPLES // (k * spec.global_batch)))
  window_steps = calls_per_window * k  # windows end on multiples of this (evals fall there)
  step = 0
  status, diverged_step, last_loss = None, None, None
  history: list[dict[str, Any]] = []
  to_target: dict[str, Any] = {}
  resumes, from_fallback, notes = 0, False, []
  if resume:
    with ledger.measure("checkpoint"):
      restored = ckpt.restore(state)
    state, loop = restored.state, restored.loop
    step, status = loop["step"], loop["status"]
    diverged_step, last_loss = loop["diverged_step"], loop["last_loss"]
    history, to_target = loop["history"], loop["to_target"]
    for bucket, seconds in loop["ledger"].items():  # time accumulates across resumes
      ledger.add(bucket, seconds)
    timer.windows = [Window(*w) for w in loop["windows"]]
    trial_start -= loop["wall_s"]
    resumes, notes = loop["resumes"] + 1, loop["notes"]
    from_fallback = loop["restored_from_fallback"] or bool(restored.skipped_corrupt)
    notes.append(f"resumed from step {step}" + (
        f" after moving aside corrupted step(s) {restored.skipped_corrupt}"
        if restored.skipped_corrupt else ""))
    log(f"  {notes[-1]} ({ckpt.step_path(step)})")
  saved_step = step
  drop_window = resume  # the first window after a restore is a warm-up, like the first
  last_log = clock()

  def evaluate(points: list[tuple[int, float]], params) -> tuple[int, float] | None:
    """Evaluates ``params`` at eval ``points`` ((step, train seconds) each).

    ``params`` are the state's (one point) or the call's stacked eval parameters
    (one per point). Returns the first point that meets the target, if it is the
    trial's first; evaluation stops there.
    """
    with ledger.measure("eval"):
      sums = jax.device_get(eval_call(params, eval_data))
    if spec.evals_per_call == 1:  # one point, unstacked parameters
      sums = jax.tree.map(lambda v: np.asarray(v)[None], sums)
    for i, (at_step, train_s) in enumerate(points):
      count = float(sums["count"][i])
      metrics = {name: float(v[i]) / count for name, v in sums.items() if name != "count"}
      history.append({"examples": at_step * spec.global_batch, "step": at_step,
                      "train_s": train_s, "metrics": metrics})
      if spec.target and not to_target and spec.target.met(metrics[spec.target.metric]):
        return at_step, train_s
    return None

  def save_checkpoint() -> None:
    # Everything the loop needs to continue bit-identically besides the train state.
    # The data position is the step: the feed's indices are a pure function of it.
    loop = {"step": step, "status": status, "diverged_step": diverged_step,
            "last_loss": last_loss, "history": history, "to_target": to_target,
            "ledger": ledger.as_dict(), "wall_s": clock() - trial_start,
            "windows": [[w.examples, w.steps, w.seconds] for w in timer.windows],
            "resumes": resumes, "restored_from_fallback": from_fallback, "notes": notes}
    with ledger.measure("checkpoint"):
      ckpt.save(step, state, loop)

  log(f"[{spec.workload} B={spec.global_batch} lr={spec.lr:.4g} seed={spec.seed}] "
      f"{spec.num_devices} device(s) x {spec.per_device_batch} x accum {spec.accum_steps}, "
      f"{k} steps/call, compiled in {compile_s:.2f}s")
  while status is None:
    losses = []
    window_start_step = step
    window_end = (step // window_steps + 1) * window_steps
    if spec.max_steps:
      window_end = min(window_end, spec.max_steps)
    next_save = _next_checkpoint_step(spec, saved_step) if ckpt is not None else None
    if next_save:
      window_end = min(window_end, next_save)
    preempted = False
    eval_params = []  # per call, its stacked eval parameters (several evals per call)
    timer.start()
    train_start = clock()
    while step < window_end:
      with ledger.measure("input_wait"):
        call_feed = feed(step)
      state, call_losses, call_eval_params = train_call(state, data, call_feed)
      losses.append(call_losses)
      eval_params.append(call_eval_params)
      step += k
      if not spec.max_steps or step < spec.max_steps:
        feed.prefetch(step)  # while the device runs the call just dispatched
      if watch.check(step, k):
        preempted = True
        break
    jax.block_until_ready((state, losses))
    steps = step - window_start_step
    timer.stop(steps * spec.global_batch, steps)
    window = timer.windows.pop() if drop_window else timer.windows[-1]
    drop_window = False
    window_train_s = clock() - train_start
    ledger.add("train", window_train_s)
    # Train seconds when step s of this window was done (steps take equal time).
    train_s_at = lambda s: (ledger.seconds["train"]
                            - window_train_s * (step - s) / max(1, step - window_start_step))

    window_losses = np.concatenate([np.asarray(x) for x in jax.device_get(losses)])
    last_loss = float(window_losses[-1])
    bad = np.flatnonzero(~np.isfinite(window_losses))
    if bad.size:
      diverged_step = window_start_step + int(bad[0]) + 1
      status = "diverged"
      break
    hit = None
    if eval_call is not None and spec.evals_per_call > 1:
      for c, params in enumerate(eval_params):
        ends = [window_start_step + c * k + (j + 1) * eval_every
                for j in range(spec.evals_per_call)]
        hit = evaluate([(s, train_s_at(s)) for s in ends], params)
        if hit:
          break
    elif eval_call is not None and step % eval_every == 0:
      hit = evaluate([(step, ledger.seconds["train"])], state.params)
    if hit:
      at_step, train_s = hit
      to_target = _to_target_fields(spec, at_step, train_s,
                                    clock() - trial_start - (ledger.seconds["train"] - train_s))
      status = "ok"
      break
    if spec.max_steps and step >= spec.max_steps:
      status = "ok" if spec.target is None else "target_not_reached"
    elif spec.max_seconds and ledger.seconds["train"] >= spec.max_seconds:
      status = "ok" if spec.target is None else "target_not_reached"
    if clock() - last_log >= PROGRESS_EVERY_S or status:
      last_log = clock()
      shown = history[-1]["metrics"] if history else {}
      metric = (f" | {spec.target.metric} {shown[spec.target.metric]:.4f}"
                if spec.target and shown else "")
      rate = window.examples / max(window.seconds, 1e-9)
      log(f"  step {step:>7d} | {step * spec.global_batch:>9d} examples | loss "
          f"{last_loss:.4f}{metric} | {rate:,.0f} samples/s")
    if ckpt is not None and status is None and (preempted or step == next_save):
      save_checkpoint()
      saved_step = step
    if on_window is not None:
      on_window(step, window)
    if preempted and status is None:
      if ckpt is not None:
        with ledger.measure("checkpoint"):
          ckpt.wait()
      raise checkpoint.Preempted(step, ckpt.step_path(step) if ckpt else None)

  final_eval_missing = not history or history[-1]["step"] != step
  # The budget ended between evals: this eval counts toward the target too.
  if (eval_call is not None and status != "diverged" and not to_target and final_eval_missing
      and evaluate([(step, ledger.seconds["train"])], state.params)):
    to_target = _to_target_fields(spec, step, ledger.seconds["train"], clock() - trial_start)
    status = "ok"
  if ckpt is not None and saved_step != step:  # the end: a killed sweep need not redo it
    save_checkpoint()
    saved_step = step
  if ckpt is not None:
    with ledger.measure("checkpoint"):
      ckpt.wait()
  perf = timer.summary()
  row = make_row(
      spec, status=status, steps=step, perf=perf, compile_s=compile_s,
      memory={**train_call.memory, "device_peak_bytes": _device_peak_bytes(mesh)},
      flops=flops, history=history, ledger=ledger, wall=clock() - trial_start,
      error=f"non-finite loss at step {diverged_step}" if diverged_step else None,
      final_train_loss=last_loss, diverged_step=diverged_step,
      traces={"train": len(train_call.traces),
              "eval": len(eval_call.traces) if eval_call else 0},
      resumes=resumes, params_hash=checkpoint.params_hash(state.params),
      restored_from_fallback=from_fallback, notes=notes, **to_target)
  _log_summary(row, log)
  if watch.requested:  # SIGTERM in the last window: finished, but stop the sweep
    raise checkpoint.Preempted(step, ckpt.step_path(step) if ckpt else None, row=row)
  return row


def _next_checkpoint_step(spec: TrialSpec, saved_step: int) -> int | None:
  """The first call boundary at or past the next ``checkpoint_every_examples`` multiple."""
  every = spec.checkpoint_every_examples
  if not every:
    return None
  examples = (saved_step * spec.global_batch // every + 1) * every
  steps = -(-examples // spec.global_batch)
  return -(-steps // spec.steps_per_call) * spec.steps_per_call


def make_row(spec: TrialSpec, *, status: str, ledger: TimeLedger | None = None,
             steps: int = 0, perf: dict[str, Any] | None = None, compile_s: float | None = None,
             memory: dict[str, Any] | None = None, flops: float | None = None,
             history: list[dict[str, Any]] | None = None, wall: float | None = None,
             error: str | None = None, **fields: Any) -> dict[str, Any]:
  """A result row for ``spec`` with every schema key (None where not applicable).

  Extra ``fields`` (time-to-target, traces, ...) override the defaults.
  """
  perf = perf or {}
  history = history or []
  row = {
      "trial_id": spec.trial_id, "workload": spec.workload, "status": status, "error": error,
      "global_batch": spec.global_batch, "per_device_batch": spec.per_device_batch,
      "accum_steps": spec.accum_steps, "num_devices": spec.num_devices,
      "steps_per_call": spec.steps_per_call, "lr": spec.lr, "base_lr": spec.base_lr,
      "lr_rule": spec.lr_rule, "lr_multiplier": spec.lr_multiplier,
      "reference_batch": spec.reference_batch, "optimizer": spec.optimizer,
      "schedule": spec.schedule, "seed": spec.seed,
      "steps": steps, "examples": steps * spec.global_batch,
      "epochs": steps * spec.global_batch / spec.train_size if spec.train_size else None,
      "samples_per_sec": perf.get("samples_per_sec"),
      "samples_per_sec_iqr": perf.get("samples_per_sec_iqr"),
      "step_time_ms": perf.get("step_time_ms"), "timed_windows": perf.get("timed_windows", 0),
      "compile_s": compile_s, "memory": memory, "flops_per_step": flops,
      "steps_to_target": None, "examples_to_target": None, "epochs_to_target": None,
      "time_to_target_s": None, "time_to_target_wall_s": None,
      "final_eval": history[-1]["metrics"] if history else None, "final_train_loss": None,
      "target": None if spec.target is None else {
          "metric": spec.target.metric, "value": spec.target.value,
          "direction": spec.target.direction},
      "eval_history": history, "time_ledger": ledger.as_dict() if ledger else None,
      "traces": None, "diverged_step": None, "resumes": 0, "wall_s": wall,
      "params_hash": None, "restored_from_fallback": False, "notes": [],
      "spec": spec.to_dict(),
  }
  row.update(fields)
  return row


def _to_target_fields(spec: TrialSpec, step: int, train_s: float,
                      wall: float) -> dict[str, Any]:
  examples = step * spec.global_batch
  return {"steps_to_target": step, "examples_to_target": examples,
          "epochs_to_target": examples / spec.train_size if spec.train_size else None,
          "time_to_target_s": train_s, "time_to_target_wall_s": wall}


def _log_summary(row: dict[str, Any], log: Callable[[str], None]) -> None:
  rate = row["samples_per_sec"]
  iqr = row["samples_per_sec_iqr"] or [math.nan, math.nan]
  parts = [f"  -> {row['status']} after {row['steps']} steps"]
  if rate:
    parts.append(f"{rate:,.0f} samples/s (IQR {iqr[0]:,.0f}-{iqr[1]:,.0f})")
  if row["steps_to_target"] is not None:
    parts.append(f"target at step {row['steps_to_target']} in {row['time_to_target_s']:.2f}s "
                 f"train / {row['time_to_target_wall_s']:.2f}s wall")
  if row["final_eval"]:
    parts.append(", ".join(f"{k} {v:.4f}" for k, v in sorted(row["final_eval"].items())))
  log("; ".join(parts))
