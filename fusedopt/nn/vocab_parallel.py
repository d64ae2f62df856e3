"""Cross-entropy over logits sharded along the class (vocabulary) dimension, as tensor parallelism leaves them after a
column-parallel LM head. The logits are never gathered.

Each rank holds the columns [vocab_start, vocab_start + local) of every row; columns at or past `vocab_size` are
padding (a vocabulary padded to a multiple of the world size): never the max, never in the sum, never a target, and
their gradient is 0. The target (and the class weight, over the whole vocabulary) are the same on every rank.

Per row, each rank computes from its own columns: the max m_r, the sum of exp(z - m_r), the target logit z_t when it
owns the target (0 otherwise), and with label smoothing the weighted sum of (z - m_r) and the weight W_r of its
columns. One all_gather of these few numbers per row (not of the logits) gives every rank every rank's statistics;
each rank combines them into the global max M, sum S = sum_r s_r exp(m_r - M), lse = M + log S and the loss, all
relative to M as the single-process kernels are (robust to huge logits), and writes its columns' gradient locally:

    grad_c = scale * ((Q + 2 z_loss lse) exp(z_c - M) / S - q_c) * (1 - (z_c / softcap)^2)

A gather rather than an all-reduce because the max and the sums need different reductions; an all-reduce of the max
followed by one of the rescaled sums would be two collectives (two latencies) for fewer bytes at large world sizes.
Communication per row (token): each rank contributes 3 opmath values (4 with label smoothing), and receives that from
every other rank: (world - 1) * 12 bytes (16) in float32. See docs/CROSS_ENTROPY.md.

This path is a composition of torch ops (about five passes over the local shard, the gradient built in place in the
exp buffer), not the single-pass fused kernel: the kernels take no external row statistics yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusedopt import reference

__all__ = ["VocabParallelCrossEntropyFunction", "dtensor_cross_entropy", "row_statistics_bytes"]


def row_statistics_bytes(world_size: int, label_smoothing: float, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one rank receives per row in the all_gather of the row statistics (what the docs and bench report)."""
    per_rank = 4 if label_smoothing else 3
    return (world_size - 1) * per_rank * torch.empty((), dtype=reference.opmath_dtype(dtype)).element_size()


def _all_gather_flat(out: Tensor, local: Tensor, group) -> None:
    """out (world * n, ...) <- every rank's local (n, ...), in rank order: one collective."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the new name since 2.12)
    gather(out, local, group=group)


def _gather_rows(local: Tensor, group) -> Tensor:
    """(k, rows) from this rank -> (world, k, rows) from every rank."""
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    _all_gather_flat(out, local.contiguous(), group)
    return out.view(world, *local.shape)


def vocab_parallel_rows(logits: Tensor, target: Tensor, weight: Tensor | None, *, need_grad: bool,
                        grad_scale: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                        softcap: float | None, vocab_start: int, vocab_size: int,
                        group) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Per-row (loss, lse) in opmath over the whole vocabulary, and this rank's columns of the gradient (times
    grad_scale) in the logits' dtype. logits (rows, local) this rank's shard; target (rows,) global class indices;
    weight (vocab_size,) in opmath or None."""
    ot = reference.opmath_dtype(logits.dtype)
    rows, local = logits.shape
    ls = label_smoothing
    bad = reference.check_targets(target, ignore_index, vocab_size)  # a padding column is out of bounds
    valid = (target != ignore_index) & ~bad
    n_real = max(0, min(local, vocab_size - vocab_start))  # the columns past these are padding: never read
    z = reference.softcap_logits(logits[:, :n_real].to(ot), softcap)
    w_local = None if weight is None else weight[vocab_start : vocab_start + n_real].to(ot)

    # This rank's statistics, each relative to its own max (0 when it has only -inf or no columns).
    m = z.amax(-1) if n_real else z.new_full((rows,), float("-inf"))
    shift = torch.where(m == float("-inf"), 0.0, m).unsqueeze(-1)
    e = (z - shift).exp_()  # becomes the gradient buffer
    local_sum = e.sum(-1)
    t_local = target - vocab_start
    owns = valid & (t_local >= 0) & (t_local < n_real)
    t_index = torch.where(owns, t_local, 0).unsqueeze(-1)
    z_t = torch.where(owns, z.gather(-1, t_index).squeeze(-1), 0.0) if n_real else z.new_zeros(rows)
    stats = [m, local_sum, z_t]
    if ls:
        zs = z - shift
        stats.append((zs if w_local is None else zs * w_local).sum(-1))
    local_stats = torch.stack(stats) if rows else z.new_zeros((len(stats), 0))
    if ls:  # W_r, this rank's column weight: one number per rank, sent as one extra column
        weight_here = z.new_full((), float(n_real)) if w_local is None else w_local.sum()
        local_stats = torch.cat([local_stats, weight_here.expand(len(stats), 1)], dim=1)
    gathered = _gather_rows(local_stats, group)
    if ls:
        weight_r, gathered = gathered[:, 3, -1], gathered[..., :-1]
    m_r, s_r, z_t_r = gathered[:, 0], gathered[:, 1], gathered[:, 2]

    big_m = m_r.amax(0)
    big_shift = torch.where(big_m == float("-inf"), 0.0, big_m)
    shift_r = torch.where(m_r == float("-inf"), 0.0, m_r)
    # A rank with nothing (s_r = 0) adds 0, even where exp(shift_r - M) overflows.
    rescale_r = torch.where(s_r == 0, 0.0, torch.exp(shift_r - big_shift))
    sum_exp = (s_r * rescale_r).sum(0)
    log_sum = torch.log(sum_exp)
    lse = big_shift + log_sum
    z_t_rel = z_t_r.sum(0) - big_shift  # exactly one rank owns a kept row's target, the others sent 0

    t_safe = torch.where(valid, target, 0)
    w_t = torch.ones_like(lse) if weight is None else weight.to(ot)[t_safe]
    w_sum = float(vocab_size) if weight is None else weight.to(ot).sum()
    ls_over_c = ls / vocab_size if vocab_size else 0.0
    loss = (1 - ls) * w_t * (log_sum - z_t_rel)
    if ls:
        weighted_zs = (gathered[:, 3] + weight_r.unsqueeze(-1) * (shift_r - big_shift)).sum(0)
        loss = loss + ls_over_c * (w_sum * log_sum - weighted_zs)
    loss = loss + z_loss * lse * lse
    flagged = torch.where(bad, float("nan"), 0.0)  # out-of-bounds rows past a device assert: NaN, as the kernels
    loss = torch.where(valid, loss, flagged)
    lse = torch.where(valid, lse, flagged)
    if not need_grad:
        return loss, lse, None

    big_q = (1 - ls) * w_t + ls_over_c * w_sum
    # exp(z - M) / S = e * exp(m_r - M) / S; a rank whose columns are all -inf has e = 0 (and may overflow the factor).
    to_global = torch.where(local_sum > 0, torch.exp(shift.squeeze(-1) - big_shift) / sum_exp, 0.0)
    g = e.mul_(((big_q + 2 * z_loss * lse) * to_global).unsqueeze(-1))
    if ls:
        g.sub_(ls_over_c * (1.0 if w_local is None else w_local))
    if n_real:
        g.scatter_add_(-1, t_index, torch.where(owns, -(1 - ls) * w_t, 0.0).unsqueeze(-1))
    if softcap is not None:
        g.mul_(1 - (z / softcap) ** 2)
    if grad_scale is not None:
        g.mul_(grad_scale.to(ot))
    # After the scale: ignored rows stay exactly 0 (also when the scale is torch's NaN mean).
    g.masked_fill_(~valid.unsqueeze(-1), 0.0)
    if logits.device.type != "cpu":  # (on the CPU an out-of-bounds target has raised already)
        g.masked_fill_(bad.unsqueeze(-1), float("nan"))
    if n_real == local:
        return loss, lse, g.to(logits.dtype)
    grad = logits.new_zeros((rows, local))  # padding columns: 0
    grad[:, :n_real] = g
    return loss, lse, grad


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """logits (M, local) this rank's shard -> (loss reduced as asked, lse). The forward writes the local gradient for
    grad_output = 1; the backward scales it by grad_output (the same on every rank: the loss is replicated)."""

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, denom, ignore_index, label_smoothing, z_loss, softcap,
                vocab_start, vocab_size, group, need_grad, out_dtype, out_shape):  # fmt: skip
        grad_scale = None
        if reduction == "mean":
            grad_scale = torch.where(denom == 0, float("nan"), 1.0 / denom).reshape(1)
        loss, lse, grad = vocab_parallel_rows(
            logits.detach(), target, weight, need_grad=need_grad, grad_scale=grad_scale, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, vocab_start=vocab_start,
            vocab_size=vocab_size, group=group,
        )  # fmt: skip
        if reduction == "none":
            out = loss.to(out_dtype).reshape(out_shape)
        elif reduction == "sum":
            out = loss.sum().to(out_dtype)
        else:
            out = torch.where(denom == 0, float("nan"), loss.sum() / denom).to(out_dtype)
        ctx.save_for_backward(grad)
        ctx.consumed = False
        lse = lse.reshape(out_shape)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        nones = (None,) * 14
        if ctx.consumed:
            raise RuntimeError("fusedopt cross_entropy: backward ran twice through the same graph (retain_graph=True); "
                               "the saved gradient is scaled in place by the first backward")  # fmt: skip
        ctx.consumed = True
        if grad_loss is None:
            return (None, *nones)
        (grad,) = ctx.saved_tensors
        # In place, in opmath and rounded once, as the fused kernels' backward (the buffer is this Function's own).
        return (grad.mul_(grad_loss.reshape(-1, 1).to(reference.opmath_dtype(grad.dtype))), *nones)


def dtensor_cross_entropy(cross_entropy, input, target, weight, **kwargs):
    """cross_entropy on a DTensor `input` on a 1-D mesh: sharded along the class dim (Shard(-1) of (N, C) logits,
    what ColwiseParallel(use_local_output=False) gives), it runs the vocab-parallel path on the local shards with the
    mesh's group; replicated, the local (full) tensor. Returns Replicate DTensors, as torch's loss_parallel does."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("fusedopt cross_entropy: DTensor logits on a multi-dimensional mesh are not "
                                  "supported yet; pass the local shards with process_group= instead")  # fmt: skip
    to_local = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # replicated: no traffic
    target, weight = to_local(target), to_local(weight)
    class_dim = 0 if input.dim() == 1 else 1
    placement = input.placements[0]
    if placement.is_shard() and placement.dim % input.dim() == class_dim:
        _, offset = compute_local_shape_and_global_offset(input.shape, mesh, input.placements)
        out = cross_entropy(input.to_local(), target, weight, process_group=mesh.get_group(),
                            vocab_start=offset[class_dim], vocab_size=input.shape[class_dim], **kwargs)  # fmt: skip
    elif placement.is_replicate():
        out = cross_entropy(input.to_local(), target, weight, **kwargs)
    else:
        raise NotImplementedError(f"fusedopt cross_entropy: DTensor logits must be sharded along the class dim "
                                  f"({class_dim}) or replicated, got {placement}")  # fmt: skip
    wrap = lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False)
    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)
