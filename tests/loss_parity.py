"""Shared parity check of the pointwise losses: a fused loss on tensors of the test dtype against torch's function
on float64 copies of the same (rounded) values, forward and backward with a non-unit grad_output."""

from __future__ import annotations

import torch
from conftest import tol

SHAPES = [(), (0,), (1,), (7,), (1023,), (4099,), (3, 5, 7)]
SMALL_SHAPES = [(), (0,), (1,), (7,), (3, 5, 7)]  # Triton's interpreter is slow
REDUCTIONS = ["none", "mean", "sum"]


def assert_close(actual, expected, dtype, msg="", reduction=False):
    """conftest's per-dtype tolerances; NaN where torch gives NaN (the mean of an empty input) counts as equal."""
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype, reduction), equal_nan=True,
                               msg=lambda m: f"{msg}: {m}")  # fmt: skip


def shapes_for(backend: str) -> list:
    return SMALL_SHAPES if backend == "triton" else SHAPES


def check_parity(fused_fn, torch_fn, tensors: dict, *, grad_names=("input",), kwargs=None, ref_kwargs=None,
                 seed: int = 0, where: str = "") -> None:  # fmt: skip
    """tensors: argument name -> tensor in the test dtype (weights may have other dtypes). The reference runs
    torch_fn on float64 copies; torch_fn on the original tensors gives the expected result dtype and shape."""
    kwargs = kwargs or {}
    ref_kwargs = kwargs if ref_kwargs is None else ref_kwargs
    fused_in = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in tensors.items()}
    ref_in = {k: v.detach().double().requires_grad_(k in grad_names) for k, v in tensors.items()}
    out = fused_fn(**fused_in, **kwargs)
    ref = torch_fn(**ref_in, **ref_kwargs)
    expected = torch_fn(**{k: v.detach() for k, v in tensors.items()}, **ref_kwargs)
    assert out.dtype == expected.dtype, f"{where}: dtype {out.dtype}, torch gives {expected.dtype}"
    assert out.shape == expected.shape, f"{where}: shape {tuple(out.shape)}, torch gives {tuple(expected.shape)}"
    reduced = out.dim() == 0 and expected.dim() == 0 and tensors["input"].dim() > 0
    assert_close(out.detach(), ref.detach(), out.dtype, f"{where}: loss", reduction=reduced)
    if not grad_names:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = (torch.rand(out.shape, generator=gen, dtype=torch.float64) * 2 - 0.5).to(out.device, out.dtype)
    leaves = [fused_in[k] for k in grad_names]
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in grad_names], grad_out.double())
    for name, g, rg, leaf in zip(grad_names, grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{where}: grad {name} {g.dtype} {tuple(g.shape)}"
        assert_close(g, rg, leaf.dtype, f"{where}: grad of {name}")
    if out.dim() == 0:  # loss.backward() of a scalar: grad_output 1, a separate path on the CPU
        fresh = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in tensors.items()}
        fused_fn(**fresh, **kwargs).backward()
        ref_unit = torch.autograd.grad(torch_fn(**ref_in, **ref_kwargs), [ref_in[k] for k in grad_names])
        for name, rg in zip(grad_names, ref_unit):
            assert_close(fresh[name].grad, rg, fresh[name].dtype, f"{where}: grad of {name} (backward())")
