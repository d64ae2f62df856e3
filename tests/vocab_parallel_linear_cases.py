"""Scenarios of tests/test_vocab_parallel.py for the linear + cross-entropy with a vocab-sharded head
(fusedopt/nn/vocab_parallel_linear.py): against F.linear + cross-entropy on the whole head in float64."""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import tol
from vocab_parallel_worker import ROWS, VOCAB, shard

from fusedopt import reference
from fusedopt.nn.vocab_parallel_linear import vocab_parallel_linear_cross_entropy

HIDDEN = 6


def _inputs(dtype, padded, pad_value):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(padded, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(padded, generator=gen, dtype=torch.float64).to(dtype)
    w[VOCAB:], b[VOCAB:] = pad_value, pad_value  # padding rows of the head
    target = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    target[0], target[1], target[2] = 0, VOCAB - 1, -100
    return x, w, b, target


def linear_head_sharded_by_vocab(group):
    """Loss, d_input (complete on every rank), d_weight and d_bias (this rank's rows, 0 on padding rows) against
    torch in float64 on the whole head; several chunks, every reduction, fp32 and bf16, padded and uneven splits."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0}
    checks = []  # compared after every collective ran, so that a mismatch on one rank cannot desynchronise the ranks
    for layout in ("chunk", "padded"):
        start, stop, padded = shard(layout, VOCAB, world, rank)
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b, target = _inputs(dtype, padded, 1e3)
            largest = max(x.abs().max().item(), w[:VOCAB].abs().max().item())
            for reduction in ("none", "mean", "sum"):
                shape = (ROWS,) if reduction == "none" else ()
                go = torch.rand(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
                xi = x.clone().requires_grad_()
                wi, bi = w[start:stop].clone().requires_grad_(), b[start:stop].clone().requires_grad_()
                loss = vocab_parallel_linear_cross_entropy(xi, wi, target, bi, process_group=group, vocab_start=start,
                                                           vocab_size=VOCAB, reduction=reduction, chunk_size=3,
                                                           **opts)  # fmt: skip
                loss.backward(go.to(dtype))
                x64 = x.double().requires_grad_()
                w64, b64 = w[:VOCAB].double().requires_grad_(), b[:VOCAB].double().requires_grad_()
                logits = torch.nn.functional.linear(x64, w64, b64)
                expected = reference.cross_entropy_formula(logits, target, reduction=reduction, **opts)
                expected.backward(go)
                what = f"{layout} {dtype} {reduction}"
                real = max(0, min(stop, VOCAB) - start)
                # Gradients are sums over rows or classes: reduction tolerances, plus (as in
                # tests/test_linear_cross_entropy.py) one storage rounding of a logit's gradient times the largest
                # factor it multiplies.
                flip = 2 * torch.finfo(dtype).eps * largest
                checks += [(loss, expected, dtype, 0.0, f"{what}: loss"),
                           (xi.grad, x64.grad, dtype, flip, f"{what}: d_input"),
                           (wi.grad[:real], w64.grad[start : start + real], dtype, flip, f"{what}: d_weight"),
                           (bi.grad[:real], b64.grad[start : start + real], dtype, flip,
                            f"{what}: d_bias")]  # fmt: skip
                assert torch.all(wi.grad[real:] == 0) and torch.all(bi.grad[real:] == 0), f"{what}: padding grads"
    for got, expected, dtype, flip, what in checks:
        rtol, atol = tol(dtype, reduction=True).values()
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol + flip,
                                   msg=lambda m, w=what: f"{w}: {m}")  # fmt: skip

CASES = [("linear_head_sharded_by_vocab", linear_head_sharded_by_vocab)]
