"""Fused drop-ins for torch.nn losses: swap `torch.nn.X` for `fusedopt.nn.X`."""

from fusedopt.nn import functional
from fusedopt.nn.cross_entropy import CrossEntropyLoss

__all__ = ["CrossEntropyLoss", "functional"]
