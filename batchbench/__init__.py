"""batchbench: measure how large a global batch to train with, and how many batches.

Public API: configs and their resolution, the workload registry and interface, and
the data container. Importing this package runs no JAX computation.
"""

from batchbench.config import ConfigError, TrialSpec, default_config, parse_arg, resolve
from batchbench.data import ArrayData
from batchbench.version import MEASUREMENT_VERSION, __version__
from batchbench.workloads import (LossOutput, Metric, Target, Workload, classification_workload,
                                  get_workload, register_workload, workload_names)

__all__ = ["ArrayData", "ConfigError", "LossOutput", "MEASUREMENT_VERSION", "Metric", "Target",
           "TrialSpec", "Workload", "__version__", "classification_workload", "default_config",
           "get_workload", "parse_arg", "register_workload", "resolve", "workload_names"]
