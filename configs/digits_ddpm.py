"""digits_ddpm: a small DDPM (noise-prediction MLP) on the embedded 8x8 digits.

  batchbench trial    --config=configs/digits_ddpm.py --workdir=/tmp/ddpm
  batchbench sweep    --config=configs/digits_ddpm.py --workdir=/tmp/ddpm_sweep
  batchbench generate --config=configs/digits_ddpm.py --workdir=/tmp/ddpm --num_images=64 \\
      --batch_sizes=1:64

The target is a Frechet distance (``fd``, lower is better) between 512 generated
images (20 DDIM steps, fixed seed) and the 360 test images, in the features of a
small cached digits classifier; see ``batchbench/workloads/diffusion.py`` and
docs/diffusion.md for the measured figures.

Arg string keys: batch (global batch of a single trial), rule (none|linear|sqrt),
schedule (cosine|linear beta schedule).
"""

import batchbench.workloads.diffusion  # noqa: F401  (registers digits_ddpm in any process)
from batchbench.config import default_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch=64, rule="sqrt", schedule="cosine")
  c = default_config()
  c.workload = "digits_ddpm"
  c.workload_options.width = 256
  c.workload_options.num_blocks = 3
  c.workload_options.num_timesteps = 200
  c.workload_options.schedule = arg.schedule
  c.workload_options.ema_examples = 20_000
  c.global_batch = arg.batch
  c.optimizer = "adam"
  c.base_lr = 2e-3
  c.reference_batch = 64
  c.lr_rule = arg.rule
  c.warmup_examples = 8192
  c.eval_every_examples = 16_384
  c.max_examples = 400_000
  c.target_metric = "fd"
  c.target_value = 1.0
  c.sweep.global_batches = (16, 64, 256, 1024)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  c.sweep.seeds = (0,)
  return c
