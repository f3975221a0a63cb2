"""mnist1d_mlp: MNIST-1D generated procedurally (10,000 / 2,500), MLP 40-256-256-10, Adam.

  batchbench trial --config=configs/mnist1d_mlp.py:batch=256 --workdir=/tmp/bb2
  batchbench sweep --config=configs/mnist1d_mlp.py:rule=sqrt --workdir=/tmp/s2

Arg string keys: batch, rule (none|linear|sqrt), num_train.
"""

from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=128, rule="linear", num_train=10_000)
  c = default_config()
  c.workload = "mnist1d_mlp"
  c.workload_options.num_train = arg.num_train
  c.workload_options.hidden = (256, 256)
  c.global_batch = arg.batch
  c.optimizer = "adam"
  c.base_lr = 4e-3  # measured: 0.80 at ~12 epochs at batch 128; 1e-3 peaks at 0.79
  c.reference_batch = 128
  c.lr_rule = arg.rule
  c.warmup_examples = 2_048
  c.eval_every_examples = 2_048
  c.max_examples = 40 * arg.num_train  # 40 epochs
  c.target_metric = "accuracy"
  c.target_value = 0.80
  c.sweep.global_batches = (32, 64, 128, 256, 512, 1024)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  c.sweep.seeds = (0,)
  # One device has no second batch size for free: split each batch's gradient into 2
  # groups (same FLOPs, summed in another order) to measure the gradient noise scale.
  c.gns.mode = "groups"
  c.gns.groups = 2
  return c
