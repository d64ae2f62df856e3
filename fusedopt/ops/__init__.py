"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adam, bce_loss, mse_loss

__all__ = ["adam", "bce_loss", "mse_loss"]
