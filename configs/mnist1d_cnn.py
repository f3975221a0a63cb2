"""mnist1d_cnn: MNIST-1D with a small 1-D CNN, Adam."""

from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=128, rule="linear", num_train=10_000)
  c = default_config()
  c.workload = "mnist1d_cnn"
  c.workload_options.num_train = arg.num_train
  c.global_batch = arg.batch
  c.optimizer = "adam"
  c.base_lr = 2e-3
  c.reference_batch = 128
  c.lr_rule = arg.rule
  c.warmup_examples = 2_048
  c.eval_every_examples = 2_048
  c.max_examples = 60 * arg.num_train
  c.target_metric = "accuracy"
  c.target_value = 0.85
  c.sweep.global_batches = (32, 64, 128, 256, 512)
  return c
