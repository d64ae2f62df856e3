"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adam, cross_entropy, grad_norm, rmsprop, sgd

__all__ = ["adam", "cross_entropy", "grad_norm", "rmsprop", "sgd"]
