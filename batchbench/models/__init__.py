"""Flax modules used by the built-in workloads."""

from batchbench.models.cnn import CNN, CNN1D
from batchbench.models.mlp import MLP

__all__ = ["CNN", "CNN1D", "MLP"]
