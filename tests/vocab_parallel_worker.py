"""The body of tests/test_vocab_parallel.py: run in each of `world` spawned processes (gloo on 127.0.0.1). Every
scenario builds the same global logits on every rank, hands each rank its columns, and compares the vocab-parallel
loss and this rank's gradient columns with the single-process results: torch in float64 (the reference) and fusedopt's
own cross_entropy on the whole logits. Each rank writes {scenario: "ok" | traceback} to <out>/<world>-<rank>.json."""

from __future__ import annotations

import os

import gloo
import torch
import torch.distributed as dist
from conftest import assert_close

from fusedopt import reference
from fusedopt.nn.functional import cross_entropy

VOCAB = 13  # prime: no world size divides it
ROWS = 7
REDUCTIONS = ("none", "mean", "sum")


def shard(layout: str, vocab: int, world: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded vocab) of this rank's columns. even: vocab a multiple of world; chunk: torch.chunk's
    uneven split (DTensor's Shard); padded: the vocab padded to a multiple of world, equal shards, the padding on the
    last rank(s)."""
    if layout == "even":
        vocab = world * 5
    per = -(-vocab // world)
    padded = per * world if layout == "padded" else vocab
    start = min(rank * per, padded)
    return start, min(start + per, padded), padded


# option name -> cross_entropy keyword arguments (weight=True: a random class weight over the real vocabulary)
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_index": {"ignore_index": -100},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "all": {"weight": True, "ignore_index": 4, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(dtype, vocab, padded, seed=0, pad_value=1e4):
    """Global logits (ROWS, padded) with garbage in the padding columns, targets hitting the first and last column
    a row ignored by the default ignore_index, and class 4 (what the "all" option ignores)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(ROWS, padded, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x[:, vocab:] = pad_value
    target = torch.randint(0, vocab, (ROWS,), generator=gen)
    target[0], target[1], target[2], target[3] = 0, vocab - 1, -100, 4
    weight = (torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return x, target, weight


def grad_output_for(reduction, gen):
    shape = (ROWS,) if reduction == "none" else ()
    return torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5  # non-unit, per row for "none"


def check_against_single_process(x, target, weight, kwargs, reduction, layout, vocab, group, what):
    """The vocab-parallel loss and gradient columns against torch float64 and fusedopt on the whole logits."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, stop, _ = shard(layout, vocab, world, rank)
    dtype = x.dtype
    go = grad_output_for(reduction, torch.Generator().manual_seed(7))
    local = x[:, start:stop].clone().requires_grad_()
    loss = cross_entropy(local, target, weight, reduction=reduction, process_group=group, vocab_start=start,
                         vocab_size=vocab, **kwargs)  # fmt: skip
    loss.backward(go.to(loss.dtype))

    full = x[:, :vocab].double().requires_grad_()
    weight64 = None if weight is None else weight.double()
    opts = {k: v for k, v in kwargs.items() if k in ("ignore_index", "label_smoothing", "z_loss", "softcap")}
    expected = reference.cross_entropy_formula(full, target, weight64, reduction=reduction, **opts)
    expected.backward(go)
    expected_grad = torch.zeros_like(x, dtype=torch.float64)
    expected_grad[:, :vocab] = full.grad
    assert loss.dtype == dtype, f"{what}: loss dtype {loss.dtype}"
    assert_close(loss, expected, dtype, f"{what} loss vs torch float64", reduction=True)
    got_grad = local.grad
    assert_close(got_grad, expected_grad[:, start:stop], dtype, f"{what} grad vs torch float64")
    padding = got_grad[:, max(0, vocab - start):]
    assert torch.all(padding == 0), f"{what}: padding columns got a gradient: {padding}"

    single = x[:, :vocab].clone().requires_grad_()
    ours = cross_entropy(single, target, weight, reduction=reduction, backend="cpu", **kwargs)
    ours.backward(go.to(ours.dtype))
    assert_close(loss, ours, dtype, f"{what} loss vs single-process fusedopt", reduction=True)
    real = slice(0, max(0, min(stop, vocab) - start))
    expected_single = single.grad[:, start : min(stop, vocab)]
    assert_close(got_grad[:, real], expected_single, dtype, f"{what} grad vs single-process fusedopt")


def scenario_option(layout, dtype_name, option, group):
    vocab = 5 * dist.get_world_size(group) if layout == "even" else VOCAB
    _, _, padded = shard(layout, vocab, dist.get_world_size(group), 0)
    x, target, weight = make_inputs(DTYPES[dtype_name], vocab, padded)
    kwargs = dict(OPTIONS[option])
    w = weight if kwargs.pop("weight", False) else None
    target[2] = kwargs.get("ignore_index", -100)  # one ignored row in every scenario
    for reduction in REDUCTIONS:
        check_against_single_process(x, target, w, kwargs, reduction, layout, vocab, group, f"{reduction}")


def scenarios():
    out = []
    for layout in ("even", "chunk", "padded"):
        for dtype_name in DTYPES:
            for option in OPTIONS:
                name = f"{layout}-{dtype_name}-{option}"
                out.append((name, lambda g, a=layout, b=dtype_name, c=option: scenario_option(a, b, c, g)))
    import vocab_parallel_cases
    import vocab_parallel_linear_cases

    out.extend(vocab_parallel_cases.CASES)
    out.extend(vocab_parallel_linear_cases.CASES)
    return out


def worker(rank, world, rendezvous_file, out_dir):
    gloo.init(rank, world, rendezvous_file)
    gloo.run_scenarios(scenarios(), (dist.group.WORLD,), os.path.join(out_dir, f"{world}-{rank}.json"))
