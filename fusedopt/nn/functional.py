"""torch.nn.functional-style fused losses: torch's exact signatures plus keyword-only extras (`backend`)."""

from __future__ import annotations

from torch import Tensor

# --- Pointwise losses: MSE, BCE, BCE with logits (implemented in fusedopt/nn/mse_loss.py and bce_loss.py) ---------
from fusedopt.nn import bce_loss as _bce
from fusedopt.nn import mse_loss as _mse


def mse_loss(input: Tensor, target: Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: Tensor | None = None, *,
             backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.mse_loss, fused (one pass: loss and input gradient)."""
    return _mse.mse_loss(input, target, size_average, reduce, reduction, weight, backend=backend)


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                         reduce: bool | None = None, reduction: str = "mean", *,
                         backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy, fused (one pass: loss and input gradient)."""
    return _bce.binary_cross_entropy(input, target, weight, size_average, reduce, reduction, backend=backend)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: Tensor | None = None, *,
                                     backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy_with_logits, fused (one pass: loss and input gradient)."""
    return _bce.binary_cross_entropy_with_logits(input, target, weight, size_average, reduce, reduction, pos_weight,
                                                 backend=backend)  # fmt: skip
