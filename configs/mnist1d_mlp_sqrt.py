"""mnist1d_mlp sweep preset with square-root LR scaling (Adam's usual rule).

  batchbench sweep --config=configs/mnist1d_mlp_sqrt.py --workdir=/tmp/mnist1d_sqrt
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist1d_mlp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  c = mnist1d_mlp.get_config(arg)
  c.lr_rule = "sqrt"
  return c
