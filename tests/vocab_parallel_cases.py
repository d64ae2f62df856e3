"""Named scenarios of tests/test_vocab_parallel.py (run inside vocab_parallel_worker.worker on every rank): the classic
bugs of vocab-parallel cross-entropy (a padding column taken as a target, ignore_index or reduction="none" going
wrong), layouts and edge cases, the communication, and DTensor logits against torch's loss_parallel."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import assert_close
from vocab_parallel_worker import ROWS, VOCAB, check_against_single_process, make_inputs, shard

from fusedopt import reference
from fusedopt.nn import CrossEntropyLoss, vocab_parallel
from fusedopt.nn.functional import cross_entropy


def _rank_world(group):
    return dist.get_rank(group), dist.get_world_size(group)


def _local(x, layout, vocab, group):
    rank, world = _rank_world(group)
    start, stop, _ = shard(layout, vocab, world, rank)
    return x[:, start:stop].clone().requires_grad_(), start


def padded_vocab_target_in_padding_raises(group):
    """A target in the padding columns (vocab <= t < padded vocab) is out of bounds on every rank, as in torch on the
    unpadded logits, instead of being matched on the last rank (an infinite or garbage loss)."""
    _, world = _rank_world(group)
    _, _, padded = shard("padded", VOCAB, world, 0)
    assert padded > VOCAB, "test data too weak: no padding"
    x, target, _ = make_inputs(torch.float32, VOCAB, padded)
    target[5] = VOCAB
    local, start = _local(x, "padded", VOCAB, group)
    with pytest.raises(IndexError, match=f"Target {VOCAB} is out of bounds"):
        cross_entropy(local, target, process_group=group, vocab_start=start, vocab_size=VOCAB)
    with pytest.raises(IndexError, match=f"Target {VOCAB} is out of bounds"):
        F.cross_entropy(x[:, :VOCAB], target)  # torch agrees on the whole logits


def padded_vocab_garbage_never_counted(group):
    """Whatever the padding columns hold (huge, +inf, NaN, -inf), they are neither the max nor in the sum, and their
    gradient is exactly 0; every option and reduction on top."""
    _, world = _rank_world(group)
    _, _, padded = shard("padded", VOCAB, world, 0)
    for pad_value in (1e4, float("inf"), float("nan"), float("-inf")):
        x, target, weight = make_inputs(torch.float32, VOCAB, padded, pad_value=pad_value)
        kwargs = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0}
        for reduction in ("none", "mean", "sum"):
            check_against_single_process(x, target, weight, kwargs, reduction, "padded", VOCAB, group,
                                         f"pad {pad_value} {reduction}")  # fmt: skip


def ignore_index_rows_with_reduction_none(group):
    """reduction="none": ignored rows give a loss of exactly 0 and a gradient of exactly 0 on every rank, the other
    rows their own loss; the mean divides by the kept rows only (checked against torch by the option scenarios)."""
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    target[4] = target[6] = -100
    local, start = _local(x, "chunk", VOCAB, group)
    loss = cross_entropy(local, target, weight, reduction="none", process_group=group, vocab_start=start,
                         vocab_size=VOCAB)  # fmt: skip
    expected = F.cross_entropy(x.double(), target, weight.double(), reduction="none")
    ignored = target == -100
    assert ignored.sum() == 3
    assert torch.all(loss[ignored] == 0) and torch.all(loss[~ignored] > 0)
    assert_close(loss, expected, torch.float32, "per-row loss")
    loss.backward(torch.rand(ROWS) + 0.5)
    assert torch.all(local.grad[ignored] == 0) and torch.all(local.grad[~ignored].abs().sum(-1) > 0)
    module = CrossEntropyLoss(weight, reduction="none", process_group=group, vocab_start=start, vocab_size=VOCAB)
    assert torch.equal(module(local.detach(), target), loss.detach()), "the nn.Module gives the functional's loss"


def local_index_equal_to_ignore_index_is_kept(group):
    """ignore_index compares the global class: a rank whose local column index equals ignore_index (a global class
    owned by another rank) must not drop the row, and a real class used as ignore_index drops only its rows."""
    _, world = _rank_world(group)
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    ignore = 2
    starts = [shard("chunk", VOCAB, world, r)[0] for r in range(world)]
    target[:] = torch.tensor([starts[r % world] + ignore for r in range(ROWS)])  # local index 2 on every rank
    target[0] = 1
    kwargs = {"ignore_index": ignore, "label_smoothing": 0.1}
    for reduction in ("none", "mean", "sum"):
        check_against_single_process(x, target, weight, kwargs, reduction, "chunk", VOCAB, group, reduction)
    local, start = _local(x, "chunk", VOCAB, group)
    loss = cross_entropy(local, target, reduction="none", process_group=group, vocab_start=start, vocab_size=VOCAB,
                         ignore_index=ignore)  # fmt: skip
    assert torch.equal(loss == 0, target == ignore), f"rows dropped: {loss}"


def targets_on_shard_boundaries(group):
    """Targets on the first and last column of every rank's shard (off-by-one in the ownership test)."""
    _, world = _rank_world(group)
    bounds = []
    for r in range(world):
        start, stop, _ = shard("chunk", VOCAB, world, r)
        bounds += [start, stop - 1]
    x, _, weight = make_inputs(torch.bfloat16, VOCAB, VOCAB)
    target = torch.tensor((bounds * ROWS)[:ROWS])
    for reduction in ("none", "mean"):
        check_against_single_process(x, target, weight, {"z_loss": 1e-2}, reduction, "chunk", VOCAB, group, reduction)


def all_rows_ignored(group):
    """No kept row: torch's mean is NaN with a zero gradient, the sum 0."""
    x, target, _ = make_inputs(torch.float32, VOCAB, VOCAB)
    target[:] = -100
    for reduction in ("mean", "sum", "none"):
        local, start = _local(x, "chunk", VOCAB, group)
        loss = cross_entropy(local, target, reduction=reduction, process_group=group, vocab_start=start,
                             vocab_size=VOCAB)  # fmt: skip
        expected = F.cross_entropy(x.double(), target, reduction=reduction)
        torch.testing.assert_close(loss.double(), expected, equal_nan=True)
        loss.sum().backward()
        assert torch.all(local.grad == 0), reduction


def huge_logits(group):
    """Logits near 1e4 in fp32 and 1e30: everything relative to the global max, as the single-process kernels."""
    x, target, _ = make_inputs(torch.float32, VOCAB, VOCAB)
    for offset in (1e4, 1e30):
        shifted = x.double() + offset
        shifted[1] = offset  # one row of equal logits: loss log(VOCAB)
        check_against_single_process(shifted.float(), target, None, {"label_smoothing": 0.1}, "none", "chunk", VOCAB,
                                     group, f"offset {offset}")  # fmt: skip


def one_dim_and_spatial_inputs(group):
    """(C,) logits with a 0-d target, and (N, C, 1) logits with (N, 1) targets: torch's layouts, class dim sharded."""
    rank, world = _rank_world(group)
    start, stop, _ = shard("chunk", VOCAB, world, rank)
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    row = x[1, start:stop].clone().requires_grad_()
    loss = cross_entropy(row, target[1], weight, process_group=group, vocab_start=start, vocab_size=VOCAB)
    loss.backward(torch.tensor(0.7))
    full = x[1].double().requires_grad_()
    F.cross_entropy(full, target[1], weight.double()).backward(torch.tensor(0.7, dtype=torch.float64))
    assert_close(loss, F.cross_entropy(x[1].double(), target[1], weight.double()), torch.float32, "1-d loss")
    assert_close(row.grad, full.grad[start:stop], torch.float32, "1-d grad")

    spatial = x[:, start:stop].unsqueeze(-1).clone().requires_grad_()
    loss = cross_entropy(spatial, target.unsqueeze(-1), reduction="none", process_group=group, vocab_start=start,
                         vocab_size=VOCAB, label_smoothing=0.1)  # fmt: skip
    go = torch.rand(ROWS, 1, dtype=torch.float64) + 0.5
    loss.backward(go.float())
    full = x.double().unsqueeze(-1).requires_grad_()
    expected = F.cross_entropy(full, target.unsqueeze(-1), reduction="none", label_smoothing=0.1)
    expected.backward(go)
    assert loss.shape == (ROWS, 1)
    assert_close(loss, expected, torch.float32, "spatial loss")
    assert_close(spatial.grad, full.grad[:, start:stop], torch.float32, "spatial grad")


def empty_shard(group):
    """torch.chunk of 4 classes over 3 ranks leaves the last one none: it still takes part and gives the loss."""
    x, target, weight = make_inputs(torch.float32, 4, 4)
    target[3] = 3
    for reduction in ("none", "mean"):
        check_against_single_process(x, target, weight, {"label_smoothing": 0.1, "z_loss": 1e-2}, reduction, "chunk",
                                     4, group, reduction)  # fmt: skip


def one_collective_of_row_statistics(group):
    """The only communication is one all_gather of a few numbers per row: never the logits."""
    _, world = _rank_world(group)
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    calls = []
    original = vocab_parallel._all_gather_flat

    def recording(out, local, group):
        calls.append((out.numel(), local.numel(), out.element_size()))
        original(out, local, group)

    def forbidden(*args, **kwargs):
        raise AssertionError("an unexpected collective")

    others = ("all_reduce", "all_gather", "broadcast", "all_to_all_single", "reduce_scatter_tensor")
    saved = {name: getattr(dist, name) for name in others}
    for ls, per_row in ((0.0, 3), (0.1, 4)):
        calls.clear()
        local, start = _local(x, "chunk", VOCAB, group)
        vocab_parallel._all_gather_flat = recording
        for name in others:
            setattr(dist, name, forbidden)
        try:
            loss = cross_entropy(local, target, weight, process_group=group, vocab_start=start, vocab_size=VOCAB,
                                 label_smoothing=ls)  # fmt: skip
            loss.backward()  # the backward communicates nothing
        finally:
            vocab_parallel._all_gather_flat = original
            for name, fn in saved.items():
                setattr(dist, name, fn)
        assert len(calls) == 1, f"{len(calls)} collectives"
        sent = calls[0][1] - (per_row if ls else 0)  # (with smoothing, one extra column carries W_r once)
        assert sent == per_row * ROWS, f"sent {calls[0][1]} values for {ROWS} rows"
        assert calls[0][0] == world * calls[0][1]
        received_per_row = (world - 1) * per_row * calls[0][2]
        assert vocab_parallel.row_statistics_bytes(world, ls) == received_per_row


def bad_arguments(group):
    """Clear errors: a weight over the local shard only, probability targets, inplace_backward, a second backward."""
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    local, start = _local(x, "chunk", VOCAB, group)
    kw = {"process_group": group, "vocab_start": start, "vocab_size": VOCAB}
    with pytest.raises(RuntimeError, match="all 13 classes of the vocabulary"):
        cross_entropy(local, target, weight[: local.shape[1]] if local.shape[1] != VOCAB else weight[:2], **kw)
    with pytest.raises(NotImplementedError, match="probability targets"):
        cross_entropy(local, torch.softmax(local.detach(), -1), **kw)
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        cross_entropy(local, target, inplace_backward=True, **kw)
    loss = cross_entropy(local, target, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):  # the saved gradient was scaled in place
        loss.backward()


def dtensor_matches_loss_parallel(group):
    """DTensor logits Shard(-1) (ColwiseParallel(use_local_output=False)'s output), inside and outside torch's
    loss_parallel(): the loss and the sharded gradient of torch's loss_parallel, as Replicate / Shard DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    _, world = _rank_world(group)
    mesh = init_device_mesh("cpu", (world,))
    x, target, weight = make_inputs(torch.float32, VOCAB, VOCAB)
    go_gen = torch.Generator().manual_seed(3)
    kept = target.clone()
    kept[2] = 5  # torch 2.14's loss_parallel backward indexes the weight at ignored targets (-100) and fails
    for dtype in (torch.float32, torch.bfloat16):
        for w in (None, weight):
            for reduction in ("none", "mean", "sum"):
                go = torch.rand((ROWS,) if reduction == "none" else (), generator=go_gen) + 0.5
                rows = target if w is None else kept
                results = []
                for use_ours, in_context in ((False, True), (True, True), (True, False)):
                    logits = distribute_tensor(x.to(dtype), mesh, [Shard(-1)]).requires_grad_()
                    wt = None if w is None else w.to(dtype)
                    fn = cross_entropy if use_ours else F.cross_entropy
                    with loss_parallel() if in_context else _nothing():
                        loss = fn(logits, rows, wt, reduction=reduction)
                        loss.backward(DTensor.from_local(go.to(dtype), mesh, [Replicate()]))
                    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
                    assert isinstance(logits.grad, DTensor) and logits.grad.placements[0].is_shard(), logits.grad
                    results.append((loss.to_local(), logits.grad.to_local()))
                torch_loss, torch_grad = results[0]
                for (loss, grad), where in zip(results[1:], ("inside", "outside")):
                    what = f"{dtype} weight={w is not None} {reduction} {where} loss_parallel()"
                    assert_close(loss, torch_loss, dtype, f"{what}: loss", reduction=True)
                    assert_close(grad, torch_grad, dtype, f"{what}: grad")
    # Where torch's loss_parallel fails (weight and ignored rows), against torch on the whole logits in float64.
    rank, world = _rank_world(group)
    start, stop, _ = shard("chunk", VOCAB, world, rank)
    logits = distribute_tensor(x, mesh, [Shard(-1)]).requires_grad_()
    loss = cross_entropy(logits, target, weight, label_smoothing=0.1, z_loss=1e-2)
    loss.backward(DTensor.from_local(torch.tensor(0.7), mesh, [Replicate()]))
    full = x.double().requires_grad_()
    expected = reference.cross_entropy_formula(full, target, weight.double(), label_smoothing=0.1, z_loss=1e-2)
    expected.backward(torch.tensor(0.7, dtype=torch.float64))
    assert_close(loss.to_local(), expected, torch.float32, "weight + ignored rows: loss", reduction=True)
    assert_close(logits.grad.to_local(), full.grad[:, start:stop], torch.float32, "weight + ignored rows: grad")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CASES = [
    (name, fn)
    for name, fn in globals().copy().items()
    if callable(fn) and not name.startswith("_") and fn.__module__ == __name__ and name != "CASES"
]
