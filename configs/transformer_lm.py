"""transformer_lm: a byte-level decoder-only Transformer on the Python stdlib sources (offline).

  batchbench trial --config=configs/transformer_lm.py --workdir=/tmp/lm
  batchbench sweep --config=configs/transformer_lm.py:batch=32 --workdir=/tmp/lm_sweep
  batchbench trial --config=configs/transformer_lm.py:data=synthetic,batch=64 --workdir=/tmp/t

Arg string keys: batch (global batch of a single trial), rule (none|linear|sqrt), data
(pysrc|tfds|synthetic), seq_len, target (bits per byte; pysrc and tfds), steps (synthetic
budget), tfds_name and data_dir (tfds).
"""

from batchbench.config import default_config, parse_arg
from batchbench.workloads import transformer_lm  # noqa: F401  (registers transformer_lm)


def get_config(arg=None):
  arg = parse_arg(arg, batch=32, rule="sqrt", data="pysrc", seq_len=128,
                  target=transformer_lm.PYSRC_TARGET.value, steps=32, tfds_name="lm1b",
                  data_dir="")
  c = default_config()
  c.workload = "transformer_lm"
  c.workload_options.data = arg.data
  c.workload_options.seq_len = arg.seq_len
  c.workload_options.remat = False  # --config.workload_options.remat=True
  if arg.data == "tfds":
    c.workload_options.tfds_name = arg.tfds_name
    c.workload_options.data_dir = arg.data_dir or None
  c.global_batch = arg.batch
  # 4 steps per call (about 1.4 s at batch 32 on a 2-core CPU): the harness's automatic
  # 64 would make each call, and the throughput phase's warm-up, minutes long there.
  c.steps_per_call = 4
  c.optimizer = "adam"
  c.base_lr = 2e-3
  c.reference_batch = 32
  c.lr_rule = arg.rule
  c.warmup_examples = 3_200  # 100 steps at batch 32
  c.sweep.global_batches = (8, 16, 32, 64, 128, 256)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  if arg.data == "synthetic":
    c.max_steps = arg.steps
    c.target_metric = "none"
    return c
  c.eval_every_examples = 3_200
  c.max_examples = 200 * 3_200
  c.target_metric = "bpb"
  c.target_value = arg.target
  return c
