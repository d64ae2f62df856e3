"""The only door to the kernels: torch.library custom ops (fusedopt::*) and the backend choice."""

from fusedopt.ops import adam

__all__ = ["adam"]
