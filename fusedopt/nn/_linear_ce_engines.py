"""The two ways fusedopt computes linear + cross-entropy without the (N, V) logits. Both return the per-row loss
and, on request, the gradients of sum_rows(row_scale * loss) w.r.t. input, weight and bias.

row_chunked: rows in chunks. Per chunk: logits by one matmul, fusedopt's cross-entropy row kernel (loss, and the
    gradient written over the logits), d_input rows = dlogits @ W (complete per chunk), d_weight += dlogits^T @ x
    and d_bias += dlogits.sum(0) across chunks. Three matmuls. The weight gradient is summed in the weight's opmath
    dtype (float32 for 16-bit weights: a 16-bit running sum drifts, Liger #512), so for 16-bit weights it costs an
    extra V x H float32 accumulator; for float32/float64 weights the accumulator is the returned gradient.

vocab_blocked: the same row pass without d_weight (it gives the loss, the per-row logsumexp and d_input), then a
    pass over vocabulary blocks: per block, the logits of every row again (the fourth matmul), their gradient from the
    saved logsumexp (plain tensor ops here), and d_weight[block] = dlogits^T @ x in one matmul over all rows, rounded
    once. Memory beyond the returned gradients: one chunk of logits, one tile, and a block-sized float32 accumulator
    only when the rows do not fit one tile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fusedopt import reference
from fusedopt.ops import cross_entropy as ce_ops

TILE_BYTES = 64 * 2**20  # logits of one row chunk, or of one (rows x vocab block) tile
WORK_BYTES = 2 * 2**20  # the float32 working rows of a 16-bit tile's gradient (cache-sized)
MIN_VOCAB_BLOCK = 256  # below this the rows are split into several tiles instead
UPCAST_COLUMNS = 4096  # row_chunked, 16-bit on the CPU: vocab columns upcast at a time for the fp32 d_weight sum


class Plan(NamedTuple):
    """Everything about one call that is not a tensor (resolved by linear_cross_entropy)."""

    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    prob_target: bool
    backend: str
    mode: str  # "row_chunked" | "vocab_blocked"
    chunk_rows: int
    vocab_block: int
    loss_dtype: torch.dtype
    retain_graph: bool  # backward scales copies of the saved gradients (allows a second backward)


def chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
        return chunk_size
    return max(1, min(n_rows, TILE_BYTES // max(1, vocab * itemsize)))


def vocab_block(n_rows: int, vocab: int, itemsize: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size <= 0:
            raise ValueError(f"linear_cross_entropy: vocab_block_size must be positive, got {block_size}")
        return min(block_size, max(1, vocab))
    fits = TILE_BYTES // max(1, n_rows * itemsize)
    return max(1, min(vocab, max(MIN_VOCAB_BLOCK, fits)))


def _logits(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32/fp64) += a @ b: fp32 accumulation inside one GEMM where cuBLAS offers it, else through an upcast
    of a few columns of `a` at a time (so the upcast copy stays small)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        acc.copy_(torch.addmm(acc, a, b, out_dtype=acc.dtype))
    else:
        b_up = b.to(acc.dtype)
        for lo in range(0, a.shape[0], UPCAST_COLUMNS):
            acc[lo : lo + UPCAST_COLUMNS].addmm_(a[lo : lo + UPCAST_COLUMNS].to(acc.dtype), b_up)


def compute(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, cw: Tensor | None, plan: Plan,
            row_scale: Tensor | None, need_x: bool, need_w: bool, need_b: bool):  # fmt: skip
    """(per-row loss in opmath, d_input, d_weight, d_bias), each gradient None unless asked for. row_scale: None (1),
    one value for every row (1,), or one per row (N,); gradients are those of sum(row_scale * loss)."""
    opmath = reference.opmath_dtype(x.dtype)
    n = x.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocked = plan.mode == "vocab_blocked" and need_w
    losses = x.new_empty((n,), dtype=opmath)
    lses = x.new_empty((n,), dtype=opmath) if blocked else None
    dx = torch.empty_like(x) if need_x else None
    dw_acc = None
    if need_w and not blocked:
        dw_acc = torch.zeros(w.shape, dtype=acc_dtype, device=x.device)
    db_acc = torch.zeros(w.shape[0], dtype=acc_dtype, device=x.device) if need_b else None
    _row_pass(x, w, b, target, cw, plan, row_scale, losses, lses, dx, dw_acc, db_acc)
    dw = None
    if blocked:
        dw = torch.empty_like(w)
        _vocab_pass(x, w, b, target, cw, plan, row_scale, lses, dw)
    elif dw_acc is not None:
        dw = dw_acc if dw_acc.dtype == w.dtype else dw_acc.to(w.dtype)
    db = None if db_acc is None else db_acc.to(b.dtype)
    return losses, dx, dw, db


def _row_pass(x, w, b, target, cw, plan, row_scale, losses, lses, dx, dw_acc, db_acc) -> None:
    """Row chunks over the whole vocabulary: loss (and lse), d_input, and the d_weight / d_bias sums."""
    need_grad = dx is not None or dw_acc is not None or db_acc is not None
    uniform = row_scale if row_scale is not None and row_scale.numel() == 1 else None
    per_row = row_scale if row_scale is not None and row_scale.numel() > 1 else None
    for lo in range(0, x.shape[0], plan.chunk_rows):
        hi = min(x.shape[0], lo + plan.chunk_rows)
        logits = _logits(x[lo:hi], w, b).contiguous()
        loss, lse, grad = ce_ops.cross_entropy_fwd(
            logits, target[lo:hi], cw, need_grad=need_grad, grad_out=logits if need_grad else None,
            grad_scale=uniform, ignore_index=plan.ignore_index, label_smoothing=plan.label_smoothing,
            z_loss=plan.z_loss, softcap=plan.softcap, prob_target=plan.prob_target, backend=plan.backend,
        )  # fmt: skip
        losses[lo:hi] = loss
        if lses is not None:
            lses[lo:hi] = lse
        if need_grad:
            if per_row is not None:
                ce_ops.cross_entropy_scale_grad_(grad, per_row[lo:hi].contiguous(), backend=plan.backend)
            if dx is not None:
                torch.mm(grad, w, out=dx[lo:hi])
            if dw_acc is not None:
                _accumulate_mm(dw_acc, grad.t(), x[lo:hi])
            if db_acc is not None:
                db_acc += grad.sum(0, dtype=db_acc.dtype)
        del logits, grad  # before the next chunk's logits are allocated


class _RowCoefficients(NamedTuple):
    """Per row r, the logits gradient is  (s*a)[r] * softmax[r, c] - s[r] * smooth[c] - hit[r] * [c == t[r]]
    (class targets) or  (s*a)[r] * softmax[r, c] - s[r] * q[r, c]  (probability targets), times the soft-cap
    derivative; s is the row's scale (0 on ignored rows), a = sum_c q[r, c] + 2 z_loss lse[r]."""

    scale: Tensor  # s
    softmax_coef: Tensor | None  # s * a (None once folded into the logsumexp, see _vocab_pass)
    hit: Tensor | None  # s * (1 - ls) * w[t]
    target_col: Tensor | None  # t, or -1 on ignored rows
    smooth: Tensor | None  # (V,) ls / C * w[c], None without smoothing
    class_weight: Tensor | None  # (V,) in opmath: probability targets multiply by it
    num_classes: int


def _row_coefficients(target, cw, lse, row_scale, plan: Plan, num_classes: int) -> _RowCoefficients:
    ls, n = plan.label_smoothing, lse.shape[0]
    s = torch.ones(n, dtype=lse.dtype, device=lse.device)
    if row_scale is not None:
        s = s * row_scale.to(lse.dtype)
    w = None if cw is None else cw.to(lse.dtype)
    if plan.prob_target:  # q = (y (1 - ls) + ls / C) * w, summed over the classes in chunks of rows
        total = torch.empty_like(lse)
        for lo in range(0, n, plan.chunk_rows):
            y = target[lo : lo + plan.chunk_rows].to(lse.dtype)
            y = y * (1 - ls) + ls / num_classes if ls else y
            total[lo : lo + plan.chunk_rows] = (y if w is None else y * w).sum(-1)
        return _RowCoefficients(s, s * (total + 2 * plan.z_loss * lse), None, None, None, w, num_classes)
    valid = target != plan.ignore_index
    s = torch.where(valid, s, 0.0)
    t = torch.where(valid, target, 0)
    w_t = torch.ones_like(lse) if w is None else w[t]
    w_sum = num_classes if w is None else w.sum()
    a = (1 - ls) * w_t + ls / num_classes * w_sum + 2 * plan.z_loss * lse
    smooth = None
    if ls:
        smooth = (ls / num_classes) * (torch.ones(num_classes, dtype=lse.dtype, device=lse.device) if w is None else w)
    return _RowCoefficients(s, s * a, s * (1 - ls) * w_t, torch.where(valid, target, -1), smooth, w, num_classes)


def _vocab_pass(x, w, b, target, cw, plan: Plan, row_scale, lses: Tensor, dw: Tensor) -> None:
    """d_weight one vocabulary block at a time, exact per block (see the module docstring). A tile is held
    transposed, (block, rows), so that d_weight[block] = tile @ x is a GEMM of contiguous operands (a transposed
    operand costs the CPU BLAS a packed copy of the tile)."""
    n, vocab = x.shape[0], w.shape[0]
    if n == 0:  # no rows: no tile writes d_weight
        dw.zero_()
        return
    coef = _row_coefficients(target, cw, lses, row_scale, plan, vocab)
    # Rows whose gradient is 0 (ignored, or a zero scale): an infinite lse makes exp(z - lse) exactly 0, where the
    # kernel's lse of 0 could overflow exp and give inf * 0 = NaN.
    lses = torch.where(coef.scale == 0, torch.inf, lses)
    # sa * exp(z - lse) = exp(z - (lse - log sa)) when sa >= 0: one pass less over each tile. Known on the CPU for
    # free; elsewhere asking would be a host sync per call (and a graph break under torch.compile), so the multiply
    # stays there.
    foldable = x.device.type == "cpu" and plan.softcap is None and not torch.compiler.is_compiling()
    if foldable and not bool((coef.softmax_coef < 0).any()):
        lses = lses - coef.softmax_coef.log()
        coef = coef._replace(softmax_coef=None)
    block = plan.vocab_block
    tile_rows = max(1, min(n, TILE_BYTES // max(1, block * x.element_size())))
    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        w_blk = w[v0:v1]
        acc = None  # several row tiles into a 16-bit d_weight: a block-sized fp32 accumulator
        if tile_rows < n and dw.dtype != lses.dtype:
            acc = torch.zeros((v1 - v0, w.shape[1]), dtype=torch.float32, device=x.device)
        for r0 in range(0, n, tile_rows):
            r1 = min(n, r0 + tile_rows)
            xs = x[r0:r1]
            tile = w_blk @ xs.t() if b is None else torch.addmm(b[v0:v1].unsqueeze(1), w_blk, xs.t())
            _tile_gradient_(tile, slice(r0, r1), v0, target, coef, lses, plan)
            if acc is not None:
                _accumulate_mm(acc, tile, xs)
            elif r0 == 0:
                torch.mm(tile, xs, out=dw[v0:v1])
            else:
                dw[v0:v1].addmm_(tile, xs)
            del tile
        if acc is not None:
            dw[v0:v1].copy_(acc)


def _tile_gradient_(tile: Tensor, rows: slice, v0: int, target, coef: _RowCoefficients, lses, plan: Plan) -> None:
    """Overwrites a transposed (classes, rows) tile of logits with their gradient, computed in opmath a few classes
    at a time and rounded once to the tile's dtype."""
    opmath = lses.dtype
    width = tile.shape[1]  # rows
    step = tile.shape[0] if tile.dtype == opmath else max(1, WORK_BYTES // (4 * width))
    cap = plan.softcap
    lse, s = lses[rows].unsqueeze(0), coef.scale[rows]
    sa = None if coef.softmax_coef is None else coef.softmax_coef[rows].unsqueeze(0)  # None: folded into lse
    for a in range(0, tile.shape[0], step):
        z = tile[a : a + step]
        c0, c1 = v0 + a, v0 + a + z.shape[0]  # the classes of these tile rows
        if cap is None:
            g = z if z.dtype == opmath else z.to(opmath)
            g.sub_(lse).exp_()
        else:
            tanh = z.to(opmath, copy=True).div_(cap).tanh_()
            g = z if z.dtype == opmath else torch.empty_like(tanh)
            torch.mul(tanh, cap, out=g).sub_(lse).exp_()
        if sa is not None:
            g.mul_(sa)
        if coef.smooth is not None:
            g.addr_(coef.smooth[c0:c1], s, alpha=-1)
        if plan.prob_target:
            q = target[rows, c0:c1].t().to(opmath)
            if plan.label_smoothing:
                q = q * (1 - plan.label_smoothing) + plan.label_smoothing / coef.num_classes
            if coef.class_weight is not None:
                q = q * coef.class_weight[c0:c1].unsqueeze(1)
            g.addcmul_(q, s.unsqueeze(0), value=-1)
        else:
            col = coef.target_col[rows] - c0
            inside = (col >= 0) & (col < g.shape[0])
            hit = torch.where(inside, -coef.hit[rows], 0.0).unsqueeze(0)
            g.scatter_add_(0, col.clamp(0, g.shape[0] - 1).unsqueeze(0), hit)
        if cap is not None:
            g.mul_(tanh.square_().neg_().add_(1))
        if z.dtype != opmath:  # else g is z
            z.copy_(g)
