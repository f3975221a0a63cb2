"""batchbench: measure how large a global batch to train with, and how many batches.

Public API: configs and their resolution, the workload registry, one trial, and
the results store. Importing this package runs no JAX computation.
"""

from batchbench.config import ConfigError, TrialSpec, default_config, parse_arg, resolve
from batchbench.workloads import (ArrayData, Metric, Target, Workload, classification_workload,
                                  get_workload, register_workload, workload_names)

__all__ = ["ArrayData", "ConfigError", "Metric", "Target", "TrialSpec", "Workload",
           "classification_workload", "default_config", "get_workload", "parse_arg",
           "register_workload", "resolve", "workload_names"]
__version__ = "0.1.0"
