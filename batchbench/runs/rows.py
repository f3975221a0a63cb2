"""The result row of a trial: one JSON object per trial in ``results.jsonl``.

Every key is always present (``None`` where not applicable):

=========================  ==================================================
key                        meaning
=========================  ==================================================
trial_id                   stable hash of the trial's identity (spec + code version)
point_id                   the throughput point of this batch (``throughput.jsonl``)
benchmark                  the identity without the code version (``compare``'s key)
workload, workload_options
status                     ok | target_not_reached | diverged | oom | error
error                      error text (status error/oom/diverged), else None
global_batch               examples per optimizer update
per_device_batch           examples per device per micro-batch
accum_steps                micro-batches accumulated per update
num_devices, num_processes data-parallel devices; JAX processes
steps_per_call             train steps fused in one compiled call of the trial
lr                         peak learning rate after scaling and multiplier
base_lr, lr_rule, lr_multiplier, reference_batch, optimizer, momentum, weight_decay,
schedule, seed
steps, examples, epochs    work done when the trial stopped
time_to_target_s           steps_to_target x the batch's measured step time (the
                           throughput point's median); None without a point
steps_to_target, examples_to_target, epochs_to_target
loop_time_to_target_s      the trial's own train seconds at the first eval meeting
                           the target (secondary: its windows are cut by evals)
time_to_target_wall_s      seconds since the trial started: set-up, compile, evals
loop_samples_per_sec       the trial's own median over its timing windows (secondary)
loop_samples_per_sec_iqr, loop_step_time_ms, loop_timed_windows
compile_s                  seconds this trial spent getting its compiled program
                           (0 when an earlier trial of the batch compiled it)
compile_cached             the program came from the in-process or persistent cache
program_compile_s          seconds the program took to compile when it was built
memory                     XLA byte counts of the compiled train call (per device):
                           argument/output/alias/temp/generated_code/peak_bytes, and
                           device_peak_bytes (the runtime's, for this trial only,
                           where knowable) with device_peak_note when it is not
flops_per_step             XLA FLOPs of one optimizer step, all devices
model_flops_per_example    training FLOPs of one example: the workload's analytic
                           count, else flops_per_step / global_batch
model_flops_source         analytic | xla
tflops_per_sec_per_device  model FLOPs x samples/sec / devices, in TFLOP/s
peak_tflops, peak_source   the device's dense peak for compute_dtype and where it came
                           from (the table, or --config.peak_tflops)
mfu                        tflops_per_sec_per_device / peak_tflops; None without a peak
tokens_per_example,        a language model's tokens per example (seq_len) and
tokens_per_sec             samples/sec x it, at the same rate as the MFU; else None
mfu_basis                  the rate it is taken at: throughput_point (the batch's
                           throughput phase) or trial_loop (the trial's own windows)
final_eval                 {metric: value} of the last eval (test set)
final_train_eval           the same metrics on as many training examples (train-test gap)
final_train_loss           mean train loss of the last step
target                     {"metric", "value", "direction"} or None
eval_history               list of {"examples", "step", "train_s", "metrics",
                           "train_metrics", "b_simple", "gns_steps"}
time_ledger                seconds per bucket: setup, compile, train, input_wait,
                           eval, checkpoint
traces                     {"train": n, "eval": n}: times each program was traced
diverged_step              first step with a non-finite loss, else None
resumes                    times this trial was resumed from a checkpoint
restored_from_fallback     a corrupt latest checkpoint was skipped
notes                      plain-language notes
params_hash                sha256 of the final parameters' bytes (resume equality)
wall_s                     wall seconds of the trial (accumulated across resumes)
gns_source                 how the gradient noise scale was measured: micro_batches,
                           groups, or None (then gns_note says why)
gns_b_small, gns_b_big     the two batch sizes of its estimate
gns_every                  the norms were taken at every gns_every-th step
b_simple                   B_simple = tr(Sigma)/|G|^2 at the eval that met the target
                           (else the last eval); every eval's is in eval_history
gns_steps                  measured steps behind that b_simple (its moving averages')
b_simple_final             B_simple at the end of the trial
profile                    {"dir", "first_step", "last_step"} of the jax.profiler trace
                           (--profile_steps), else None
provenance                 harness/measurement version, git commit and dirty flag,
                           jax/jaxlib versions, device kind, host CPU
measurement_version        the code version that measured this row
spec                       the resolved TrialSpec as a dict
=========================  ==================================================
"""

from __future__ import annotations

from typing import Any

from batchbench.config import TrialSpec
from batchbench.measure.timing import TimeLedger
from batchbench.store.meta import provenance


def target_fields(spec: TrialSpec, step: int, train_s: float | None, wall_s: float | None,
                  point: dict[str, Any] | None) -> dict[str, Any]:
  """The time-to-target fields of a trial that met its target at ``step``."""
  examples = step * spec.global_batch
  step_ms = (point or {}).get("step_time_ms")
  return {"steps_to_target": step, "examples_to_target": examples,
          "epochs_to_target": examples / spec.train_size if spec.train_size else None,
          "time_to_target_s": step * step_ms / 1e3 if step_ms else None,
          "loop_time_to_target_s": train_s, "time_to_target_wall_s": wall_s}


def make_row(spec: TrialSpec, *, status: str, ledger: TimeLedger | None = None,
             steps: int = 0, perf: dict[str, Any] | None = None,
             history: list[dict[str, Any]] | None = None, wall: float | None = None,
             error: str | None = None, **fields: Any) -> dict[str, Any]:
  """A result row for ``spec`` with every schema key (None where not applicable).

  Args:
    spec: the trial.
    status: its outcome.
    ledger: its time ledger.
    steps: optimizer steps done.
    perf: the trial loop's own window statistics (``measure.timing.window_stats``).
    history: its eval history.
    wall: wall seconds.
    error: error text.
    **fields: any other schema key (they override the defaults).

  Returns:
    The row.
  """
  perf = perf or {}
  history = history or []
  row = {
      "trial_id": spec.trial_id, "point_id": spec.point_id, "benchmark": spec.benchmark(),
      "workload": spec.workload, "workload_options": dict(spec.workload_options),
      "status": status, "error": error, "global_batch": spec.global_batch,
      "per_device_batch": spec.per_device_batch, "accum_steps": spec.accum_steps,
      "num_devices": spec.num_devices, "num_processes": spec.num_processes,
      "steps_per_call": spec.steps_per_call, "lr": spec.lr, "base_lr": spec.base_lr,
      "lr_rule": spec.lr_rule, "lr_multiplier": spec.lr_multiplier,
      "reference_batch": spec.reference_batch, "optimizer": spec.optimizer,
      "momentum": spec.momentum, "weight_decay": spec.weight_decay,
      "schedule": spec.schedule, "seed": spec.seed,
      "steps": steps, "examples": steps * spec.global_batch,
      "epochs": steps * spec.global_batch / spec.train_size if spec.train_size else None,
      "steps_to_target": None, "examples_to_target": None, "epochs_to_target": None,
      "time_to_target_s": None, "loop_time_to_target_s": None, "time_to_target_wall_s": None,
      "loop_samples_per_sec": perf.get("samples_per_sec"),
      "loop_samples_per_sec_iqr": perf.get("samples_per_sec_iqr"),
      "loop_step_time_ms": perf.get("step_time_ms"),
      "loop_timed_windows": perf.get("timed_windows", 0),
      "compile_s": None, "compile_cached": None, "program_compile_s": None,
      "memory": None, "flops_per_step": None, "model_flops_per_example": None,
      "model_flops_source": None, "tflops_per_sec_per_device": None, "peak_tflops": None,
      "peak_source": None, "mfu": None, "mfu_basis": None,
      "tokens_per_example": None, "tokens_per_sec": None,
      "final_eval": history[-1]["metrics"] if history else None,
      "final_train_eval": history[-1].get("train_metrics") if history else None,
      "final_train_loss": None,
      "target": None if spec.target is None else {
          "metric": spec.target.metric, "value": spec.target.value,
          "direction": spec.target.direction},
      "eval_history": history, "time_ledger": ledger.as_dict() if ledger else None,
      "traces": None, "diverged_step": None, "resumes": 0, "wall_s": wall,
      "params_hash": None, "restored_from_fallback": False, "notes": [],
      "profile": None,
      "gns_source": spec.gns_source, "gns_b_small": None, "gns_b_big": None,
      "gns_note": spec.gns_note, "gns_every": None, "b_simple": None, "gns_steps": None,
      "b_simple_final": None,
      "provenance": provenance(), "measurement_version": spec.measurement_version,
      "spec": spec.to_dict(),
  }
  row.update(fields)
  return row
