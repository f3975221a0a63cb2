"""resnet18_cifar10: ResNet-18 (CIFAR stem, BatchNorm) on CIFAR-10 from TFDS, SGD + cosine.

  batchbench trial --config=configs/resnet18_cifar10.py --workdir=/tmp/r18 \
      --config.workload_options.data_dir=/data/tfds
  batchbench sweep --config=configs/resnet18_cifar10.py:bn_group=per_device --workdir=/tmp/s
  batchbench trial --config=configs/resnet18_cifar10.py:data=synthetic,batch=64 --workdir=/tmp/t

CIFAR-10 must be prepared as ArrayRecord in data_dir (README, "Embedded or host-fed data");
the sources open when the trial starts, not when the config is read. Training images are
cropped (4-pixel padding) and flipped on the device.

Arg string keys: batch, rule (none|linear|sqrt), data (tfds|synthetic), target (test
accuracy), bn_group (global|per_device), dtype (float32|bfloat16), steps (synthetic budget).
Overridable workload options: --config.workload_options.data_dir=DIR (TFDS data_dir; unset:
$TFDS_DATA_DIR or ~/tensorflow_datasets) and --config.workload_options.remat=True.
"""

from ml_collections import config_dict

from batchbench.config import default_config, parse_arg
from batchbench.workloads import resnet  # noqa: F401  (registers resnet18_cifar10)

CIFAR10_TRAIN = 50_000


def get_config(arg=None):
  arg = parse_arg(arg, batch=128, rule="linear", data="tfds", target=0.8, bn_group="global",
                  dtype="float32", steps=16)
  c = default_config()
  c.workload = "resnet18_cifar10"
  c.workload_options.data = arg.data
  c.workload_options.bn_group = arg.bn_group
  c.workload_options.remat = False
  if arg.data == "tfds":
    c.workload_options.data_dir = config_dict.placeholder(str)
  c.compute_dtype = arg.dtype
  c.global_batch = arg.batch
  # One step per call, no loop: XLA on CPU runs convolution gradients inside a loop body
  # about 15x slower (jax-ml/jax#12868, benchmarks/real_workloads.py); a ResNet step is
  # long enough that per-step dispatch costs nothing on any device.
  c.steps_per_call = 1
  c.optimizer = "sgd"  # momentum 0.9
  c.base_lr = 0.1
  c.reference_batch = 128
  c.lr_rule = arg.rule
  c.weight_decay = 5e-4
  c.sweep.global_batches = (32, 64, 128, 256, 512, 1024)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  if arg.data == "synthetic":
    c.max_steps = arg.steps
    c.target_metric = "none"
    return c
  c.warmup_examples = 2 * CIFAR10_TRAIN
  c.schedule = "cosine"
  c.max_examples = 30 * CIFAR10_TRAIN
  c.eval_every_examples = CIFAR10_TRAIN // 2
  c.target_metric = "accuracy"
  c.target_value = arg.target
  return c
