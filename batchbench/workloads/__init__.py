"""Workload registry; importing it registers the built-in workloads."""

from batchbench.workloads import builtin  # noqa: F401  (registers built-ins)
from batchbench.workloads import diffusion  # noqa: F401  (registers digits_ddpm)
from batchbench.workloads.base import (Batch, HostData, LossOutput, Metric, Target, Workload,
                                       get_workload, register_workload, workload_names,
                                       workload_options)
from batchbench.workloads.classification import classification_workload

__all__ = ["Batch", "HostData", "LossOutput", "Metric", "Target", "Workload",
           "classification_workload", "get_workload", "register_workload", "workload_names",
           "workload_options"]
