"""digits_mlp: scikit-learn's bundled 8x8 digits, MLP 64-256-256-10 (needs no network).

  batchbench trial --config=configs/digits_mlp.py --workdir=/tmp/bb --config.global_batch=128
  batchbench sweep --config=configs/digits_mlp.py:batch=64 --workdir=/tmp/sweep

Arg string keys: batch (global batch of a single trial), rule (none|linear|sqrt), pipeline
(device: the dataset on every device, the default; host: the same batches read through the
host input pipeline).
"""

from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=32, rule="linear", pipeline="device")
  c = default_config()
  c.workload = "digits_mlp"
  c.workload_options.hidden = (256, 256)
  if arg.pipeline != "device":  # the default stays out of the trial ids
    c.workload_options.pipeline = arg.pipeline
  c.global_batch = arg.batch
  c.optimizer = "sgd"  # momentum 0.9 (sgd's default here)
  c.base_lr = 0.05
  c.reference_batch = 32
  c.lr_rule = arg.rule
  c.eval_every_examples = 256
  c.max_examples = 100 * 1437  # 100 epochs
  c.target_metric = "accuracy"
  c.target_value = 0.96
  # Train on to the budget after the target: final test metrics and the train-test gap
  # then compare at equal epochs (the report's generalization section).
  c.stop_at_target = False
  c.sweep.global_batches = (8, 16, 32, 64, 128, 256, 512, 1024)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  c.sweep.seeds = (0, 1)
  return c
