"""Flax modules used by the built-in workloads."""

from batchbench.models.cnn import CNN, CNN1D
from batchbench.models.mlp import MLP
from batchbench.models.resnet import ResNet, ResNet18, ResNet50
from batchbench.models.transformer import TransformerLM

__all__ = ["CNN", "CNN1D", "MLP", "ResNet", "ResNet18", "ResNet50", "TransformerLM"]
