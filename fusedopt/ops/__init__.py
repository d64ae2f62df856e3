"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adafactor, adam, bce_loss, cross_entropy, grad_norm, mse_loss, optim_step, rmsprop, sgd

__all__ = ["adafactor", "adam", "bce_loss", "cross_entropy", "grad_norm", "mse_loss", "optim_step", "rmsprop", "sgd"]
