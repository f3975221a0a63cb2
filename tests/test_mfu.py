"""FLOPs and MFU in rows: the peak table and its override, the analytic or XLA source of
model FLOPs, the arithmetic of TFLOP/s and MFU, and compute_dtype's validation."""

import pytest
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config import ConfigError
from batchbench.measure import mfu
from batchbench.runs import trial


@pytest.mark.parametrize("kind,dtype,peak", [
    ("TPU v5 lite", "bfloat16", 197.0), ("TPU v6 lite", "bfloat16", 918.0),
    ("TPU v5", "bfloat16", 459.0), ("TPU v4", "float32", 275.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "float32", 494.5), ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "float32", 156.0)])
def test_peak_table_is_per_device_kind_and_compute_dtype(kind, dtype, peak):
  got, source = mfu.peak_tflops(kind, dtype)
  assert got == peak and source.startswith("table: ")


def test_no_peak_on_cpu_without_an_override_and_the_override_wins():
  peak, note = mfu.peak_tflops("cpu", "float32")
  assert peak is None and "peak_tflops" in note and "'cpu'" in note
  assert mfu.peak_tflops("cpu", "float32", 2.0) == (2.0, "peak_tflops (given)")
  assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", 500.0)[0] == 500.0


def test_utilization_arithmetic_and_sources():
  flops, source = mfu.model_flops(None, 6e9, 1000)  # XLA's count of a step of 1000
  assert (flops, source) == (6e6, "xla")
  assert mfu.model_flops(3e6, 6e9, 1000) == (3e6, "analytic")
  assert mfu.model_flops(None, None, 1000) == (None, None)
  u = mfu.utilization(flops_per_example=1e9, flops_source="analytic", samples_per_sec=4e5,
                      num_devices=4, device_kind="NVIDIA A100", compute_dtype="bfloat16")
  assert u["tflops_per_sec_per_device"] == pytest.approx(100.0)  # 1e9 x 4e5 / 4 / 1e12
  assert u["mfu"] == pytest.approx(100.0 / 312.0) and u["model_flops_source"] == "analytic"
  cpu = mfu.utilization(flops_per_example=1e9, flops_source="xla", samples_per_sec=4e5,
                        num_devices=4, device_kind="cpu", compute_dtype="float32")
  assert cpu["tflops_per_sec_per_device"] == pytest.approx(100.0) and cpu["mfu"] is None


def tiny_trial(**fields):
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.update(max_steps=8, num_devices=2, global_batch=64, **fields)
  return trial.run_trial(config_lib.resolve(c, 8), log=None)


def test_a_cpu_row_has_xla_flops_tflops_and_a_null_mfu_with_its_note():
  row = tiny_trial()
  assert row["model_flops_source"] == "xla"
  assert row["model_flops_per_example"] == pytest.approx(row["flops_per_step"] / 64)
  assert row["mfu"] is None and row["peak_tflops"] is None
  assert "no peak known" in row["peak_source"] and "peak_tflops" in row["peak_source"]
  assert row["mfu_basis"] == "trial_loop"
  assert row["tflops_per_sec_per_device"] == pytest.approx(
      row["model_flops_per_example"] * row["loop_samples_per_sec"] / 2 / 1e12)


def test_peak_tflops_gives_an_mfu_and_does_not_change_the_trial_identity():
  given = tiny_trial(peak_tflops=0.5)
  assert given["peak_tflops"] == 0.5 and given["peak_source"] == "peak_tflops (given)"
  assert given["mfu"] == pytest.approx(given["tflops_per_sec_per_device"] / 0.5)
  c = load_config("digits_mlp")
  ids = {config_lib.resolve(c, 8).trial_id}
  c.peak_tflops = 0.5
  ids.add(config_lib.resolve(c, 8).trial_id)
  assert len(ids) == 1


@pytest.mark.parametrize("fields,field,match", [
    ({"compute_dtype": "float16"}, "compute_dtype", "float32, bfloat16"),
    ({"compute_dtype": "bfloat16"}, "compute_dtype", "float32 only"),
    ({"peak_tflops": -1.0}, "peak_tflops", "positive number"),
    ({"peak_tflops": 0}, "peak_tflops", "positive number")])
def test_bad_compute_dtype_and_peak_are_named(fields, field, match, no_compile):
  c = load_config("digits_mlp")
  c.update(**fields)
  with pytest.raises(ConfigError, match=rf"{field}=.*{match}"):
    config_lib.resolve(c, 8)


def test_compute_dtype_becomes_the_workload_dtype_and_is_not_set_twice(no_compile):
  c = load_config("resnet18_cifar10", "data=synthetic,dtype=bfloat16")
  spec = config_lib.resolve(c, 8)
  assert dict(spec.workload_options)["dtype"] == "bfloat16"
  assert spec.compute_dtype == "bfloat16"
  c = load_config("resnet18_cifar10", "data=synthetic")
  c.workload_options.dtype = "bfloat16"
  with pytest.raises(ConfigError, match="workload_options.dtype=.*compute_dtype"):
    config_lib.resolve(c, 8)
