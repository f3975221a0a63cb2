"""synthetic_cnn: the Flax examples' MNIST CNN on random 28x28x1 inputs; throughput only."""

from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=128, steps=32)
  c = default_config()
  c.workload = "synthetic_cnn"
  c.global_batch = arg.batch
  c.max_steps = arg.steps
  c.target_metric = "none"
  c.sweep.global_batches = (16, 32, 64, 128, 256)
  return c
