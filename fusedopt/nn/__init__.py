"""Fused drop-ins for torch.nn losses: swap `torch.nn.X` for `fusedopt.nn.X`."""

from fusedopt.nn import functional
from fusedopt.nn.bce_loss import BCELoss, BCEWithLogitsLoss
from fusedopt.nn.mse_loss import MSELoss

__all__ = ["BCELoss", "BCEWithLogitsLoss", "MSELoss", "functional"]
