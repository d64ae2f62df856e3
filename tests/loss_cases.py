"""The loss cases shared by test_compile_losses.py and test_amp.py: every fusedopt loss in module and functional
form, next to torch's, and inputs for each kind."""

from __future__ import annotations

import torch

import fusedopt
import fusedopt.nn.functional as FF

F = torch.nn.functional


def make_inputs(kind, dtype, gen, device="cpu"):
    """(input, target) for a loss kind, made on the CPU from `gen`; input is a leaf that requires grad."""
    if kind == "ce":
        x = torch.randn(6, 11, generator=gen, dtype=torch.float64)
        t = torch.randint(0, 11, (6,), generator=gen)
        t[2] = -100  # torch's default ignore_index: one ignored row in every CE case
        return x.to(device, dtype).requires_grad_(), t.to(device)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    t = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    if kind == "bce":
        x = torch.sigmoid(x)
    return x.to(device, dtype).requires_grad_(), t.to(device, dtype)


def _cases():
    """(id, kind, fusedopt callable, torch callable): module and functional forms, with their options."""
    w = torch.rand(5, dtype=torch.float64) + 0.5
    pw = torch.rand(5, dtype=torch.float64) + 0.5
    cases = [
        ("MSELoss", "pointwise", fusedopt.nn.MSELoss(), torch.nn.MSELoss()),
        ("mse_loss-sum", "pointwise", lambda x, t: FF.mse_loss(x, t, reduction="sum"),
         lambda x, t: F.mse_loss(x, t, reduction="sum")),
        ("BCELoss-weight", "bce", fusedopt.nn.BCELoss(weight=w), torch.nn.BCELoss(weight=w)),
        ("binary_cross_entropy-none", "bce", lambda x, t: FF.binary_cross_entropy(x, t, reduction="none"),
         lambda x, t: F.binary_cross_entropy(x, t, reduction="none")),
        ("BCEWithLogitsLoss-pos_weight", "pointwise", fusedopt.nn.BCEWithLogitsLoss(pos_weight=pw),
         torch.nn.BCEWithLogitsLoss(pos_weight=pw)),
        ("binary_cross_entropy_with_logits", "pointwise", FF.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits),
    ]  # fmt: skip
    cw = torch.rand(11, dtype=torch.float64) + 0.5
    cases += [
        ("CrossEntropyLoss-smoothing", "ce", fusedopt.nn.CrossEntropyLoss(label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(label_smoothing=0.1)),
        ("CrossEntropyLoss-weight", "ce", fusedopt.nn.CrossEntropyLoss(weight=cw),
         torch.nn.CrossEntropyLoss(weight=cw)),
        ("cross_entropy-sum", "ce", lambda x, t: FF.cross_entropy(x, t, reduction="sum"),
         lambda x, t: F.cross_entropy(x, t, reduction="sum")),
        ("cross_entropy-none", "ce", lambda x, t: FF.cross_entropy(x, t, reduction="none"),
         lambda x, t: F.cross_entropy(x, t, reduction="none")),
    ]  # fmt: skip
    return cases


CASES = _cases()




def cast_module(fn, dtype, device="cpu"):
    """Loss modules hold float64 weights: give them the test dtype and device (as a user's .to() would)."""
    return fn.to(device, dtype) if isinstance(fn, torch.nn.Module) else fn
