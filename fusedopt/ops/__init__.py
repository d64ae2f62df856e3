"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adam, grad_norm, rmsprop, sgd

__all__ = ["adam", "grad_norm", "rmsprop", "sgd"]
