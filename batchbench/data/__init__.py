"""Data: containers, embedded datasets, the per-step example feed and device placement.

Nothing here knows a workload: workloads say which of these they use.
"""

from batchbench.data.arrays import MASK, ArrayData

__all__ = ["MASK", "ArrayData"]
