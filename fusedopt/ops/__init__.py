"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adafactor, bce_loss, cross_entropy, grad_norm, mse_loss, optim_step

__all__ = ["adafactor", "bce_loss", "cross_entropy", "grad_norm", "mse_loss", "optim_step"]
