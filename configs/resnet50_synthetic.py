"""resnet50_synthetic: ResNet-50 at ImageNet shape (224x224x3, 1000 classes) on synthetic
images drawn on the device; throughput only (samples/s, memory, MFU).

  batchbench trial --config=configs/resnet50_synthetic.py:batch=64 --workdir=/tmp/r50
  batchbench sweep --config=configs/resnet50_synthetic.py:dtype=bfloat16 --workdir=/tmp/s50

Arg string keys: batch, steps (budget), dtype (float32|bfloat16), remat (recompute each
block on the backward pass), bn_group (global|per_device), image_size.
"""

from batchbench.config import default_config, parse_arg
from batchbench.workloads import resnet  # noqa: F401  (registers resnet50_imagenet)


def get_config(arg=None):
  arg = parse_arg(arg, batch=64, steps=16, dtype="float32", remat=False, bn_group="global",
                  image_size=224)
  c = default_config()
  c.workload = "resnet50_imagenet"
  c.compute_dtype = arg.dtype
  c.workload_options.remat = arg.remat
  c.workload_options.bn_group = arg.bn_group
  c.workload_options.image_size = arg.image_size
  c.global_batch = arg.batch
  # One step per call, no loop: XLA on CPU runs convolution gradients inside a loop body
  # about 15x slower (jax-ml/jax#12868, benchmarks/real_workloads.py); a ResNet step is
  # long enough that per-step dispatch costs nothing on any device.
  c.steps_per_call = 1
  c.optimizer = "sgd"
  c.base_lr = 0.1
  c.reference_batch = 256
  c.weight_decay = 5e-5
  c.max_steps = arg.steps
  c.target_metric = "none"
  c.sweep.global_batches = (32, 64, 128, 256, 512)
  return c
