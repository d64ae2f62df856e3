"""torch's handling of the loss arguments that every fusedopt loss shares, in one place so that the losses agree with
torch and with each other."""

from __future__ import annotations

from torch.nn import _reduction as _Reduction

REDUCTIONS = ("none", "mean", "sum")


def reduction_name(reduction: str) -> str:
    """torch's reading of `reduction`: "elementwise_mean" is accepted as "mean" with torch's deprecation warning, an
    unknown name raises torch's ValueError."""
    return REDUCTIONS[_Reduction.get_enum(reduction)]


def label_smoothing_value(label_smoothing: float) -> float:
    """torch's F.cross_entropy: a value above 1 raises its RuntimeError; a negative or NaN one means no smoothing
    (its kernel smooths only when label_smoothing > 0)."""
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return float(label_smoothing) if label_smoothing > 0.0 else 0.0

