"""Model FLOPs utilisation: the model's FLOPs per second against the device's peak.

``mfu = model_flops_per_example x samples_per_sec / num_devices / peak``. The model
FLOPs of an example are the workload's analytic count where it defines one (the
forward and backward matmuls: 3x the forward's; for a Transformer 6 N T plus the
attention term), else XLA's cost analysis of the compiled train step divided by the
global batch (which also counts the optimizer update and elementwise work), labelled
with its source either way.

The peak is the device's dense matmul peak for the compute dtype, from vendor data
sheets (per chip; no sparsity). float32 matmuls run on GPUs at TF32 and on TPUs as one
bfloat16 pass under JAX's default matmul precision, so those are the float32 peaks.
Where the table has no entry (CPUs, other devices) MFU is None with a note, unless
``peak_tflops`` is given.
"""

from __future__ import annotations

from typing import Any

# (lower-case substring of jax's device_kind, {compute dtype: dense peak TFLOP/s per
# device}). First match wins: more specific kinds come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("tpu v6 lite", {"bfloat16": 918.0, "float32": 918.0}),  # v6e (Trillium)
    ("tpu v6e", {"bfloat16": 918.0, "float32": 918.0}),
    ("tpu v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
    ("tpu v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("tpu v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("tpu v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p reports "TPU v5"
    ("tpu v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("h100 pcie", {"bfloat16": 756.0, "float32": 378.0}),
    ("h100", {"bfloat16": 989.0, "float32": 494.5}),  # SXM
    ("h200", {"bfloat16": 989.0, "float32": 494.5}),
    ("a100", {"bfloat16": 312.0, "float32": 156.0}),
)


def peak_tflops(device_kind: str, compute_dtype: str,
                override: float | None = None) -> tuple[float | None, str]:
  """``(peak dense TFLOP/s per device, where it came from)``; None with the reason."""
  if override is not None:
    return float(override), "peak_tflops (given)"
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(compute_dtype), f"table: {key} {compute_dtype}"
  return None, (f"no peak known for {device_kind!r} ({compute_dtype}); give "
                "--config.peak_tflops for MFU")


def model_flops(flops_per_example: float | None, flops_per_step: float | None,
                global_batch: int) -> tuple[float | None, str | None]:
  """``(model FLOPs per training example, source)``: ``analytic`` or ``xla``."""
  if flops_per_example:
    return float(flops_per_example), "analytic"
  if flops_per_step:
    return flops_per_step / global_batch, "xla"
  return None, None


def utilization(*, flops_per_example: float | None, flops_source: str | None,
                samples_per_sec: float | None, num_devices: int, device_kind: str,
                compute_dtype: str, peak_override: float | None = None) -> dict[str, Any]:
  """The FLOPs and MFU fields of a row."""
  peak, peak_source = peak_tflops(device_kind, compute_dtype, peak_override)
  tflops = (flops_per_example * samples_per_sec / num_devices / 1e12
            if flops_per_example and samples_per_sec else None)
  return {"model_flops_per_example": flops_per_example,
          "model_flops_source": flops_source,
          "tflops_per_sec_per_device": tflops,
          "peak_tflops": peak, "peak_source": peak_source,
          "mfu": tflops / peak if tflops is not None and peak else None}
