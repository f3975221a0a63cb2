"""Workload registry; importing it registers the built-in workloads."""

from batchbench.workloads import builtin  # noqa: F401  (registers built-ins)
from batchbench.workloads.base import (ArrayData, Metric, Target, Workload,
                                       classification_workload, get_workload,
                                       register_workload, workload_names,
                                       workload_options)

__all__ = ["ArrayData", "Metric", "Target", "Workload", "classification_workload",
           "get_workload", "register_workload", "workload_names", "workload_options"]
