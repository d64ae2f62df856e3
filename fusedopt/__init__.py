"""fusedopt: fused optimizer and loss kernels for PyTorch (CUDA C++, Triton, CPU SIMD), drop-in for torch.optim
and torch.nn. Swap `torch.optim.Adam` for `fusedopt.optim.Adam` (or `fusedopt.Adam`) and nothing else changes."""

from fusedopt import nn, ops, optim
from fusedopt._backend import BACKENDS
from fusedopt.nn import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, LinearCrossEntropyLoss, MSELoss
from fusedopt.optim import (
    LAMB,
    SGD,
    Adafactor,
    Adagrad,
    Adam,
    AdamW,
    Lion,
    Muon,
    MuonWithAdamW,
    RMSprop,
    muon_param_groups,
)

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "LAMB",
    "SGD",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "Lion",
    "MSELoss",
    "Muon",
    "MuonWithAdamW",
    "RMSprop",
    "muon_param_groups",
    "nn",
    "ops",
    "optim",
]
