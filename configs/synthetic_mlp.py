"""synthetic_mlp: random inputs generated on device; throughput only (no target)."""

from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=1024, steps=256)
  c = default_config()
  c.workload = "synthetic_mlp"
  c.global_batch = arg.batch
  c.max_steps = arg.steps
  c.target_metric = "none"
  c.sweep.global_batches = (32, 128, 512, 2048, 8192)
  return c
