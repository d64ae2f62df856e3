"""Dtype rules shared by the references and the ops."""

from __future__ import annotations

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64, float32 for everything else (16-bit types included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
