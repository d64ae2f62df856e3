"""Adafactor (torch.optim.Adafactor) in Triton: the passes of csrc/cpu/adafactor.cpp (see fusedopt/optim/adafactor.py)
as launches over the whole bucket, no host sync:
  pass 1: matrix tasks (BR rows x all columns of one matrix): ||p||^2, each row's sum of g^2, the task's column sums
          of g^2; vector chunks: the variance update, ||p||^2 and ||u||^2;
  then one program per tensor (alpha) and one per matrix of a batch (the new row_var, col_var, the row mean);
  pass 2: matrix tasks: ||u||^2; then one program per tensor (alpha / max(1, rms(u) / d));
  pass 3: the param update (and the unscaled grad under GradScaler).
Every sum is kept per task and added in task order (deterministic). Task tables are built on the host from shapes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt import reference
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    _to_device,
    opmath,
    scalars_tensor,
    update_scalars,
)

BR, BC, BLOCK = 16, 64, 1024
# rows of the per-tensor table `tab` (int64, [9, n]): addresses, then sizes and task ranges
P, G, ROW, COL, VAR, STEP, NUMEL, ROWS, COLS = range(9)


@triton.jit
def _ptr(tab_ptr, n, row, t, DTYPE: tl.constexpr):
    return tl.load(tab_ptr + row * n + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _coefs(tab_ptr, n, t, hp_ptr):
    """Per tensor, float64: the lerp weight step^beta2_decay and rho = min(lr, 1 / sqrt(step))."""
    step = tl.load(_ptr(tab_ptr, n, STEP, t, tl.float32)).to(tl.float64)
    weight = tl.exp(tl.load(hp_ptr + 1) * tl.log(step))
    inv_root = 1.0 / tl.sqrt(step)
    lr = tl.load(hp_ptr)
    return weight, tl.where(inv_root < lr, inv_root, lr)


@triton.jit
def _grad(g_ptr, offs, mask, div_ptr, OPMATH: tl.constexpr, HAS_DIVISOR: tl.constexpr, MAXIMIZE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(OPMATH)
    if HAS_DIVISOR:
        g = g * (1.0 / tl.load(div_ptr).to(tl.float64)).to(OPMATH)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _update(g, estimate, eps1_sq):
    """g / sqrt(max(estimate, eps1^2)), the max keeping NaN as torch's clamp."""
    return g / tl.sqrt(tl.where(estimate < eps1_sq, eps1_sq, estimate))


@triton.jit
def matrix_kernel(tab_ptr, n, task_ptr, n_tasks, hp_ptr, div_ptr, found_ptr, row_sum_ptr, col_part_ptr, part_ptr,
                  rmean_ptr, scale_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, PASS: tl.constexpr,
                  HAS_DIVISOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WRITE_BACK_GRADS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """One task: rows [r0, r1) (flattened over the batch) of matrix tensor t. tasks: [t, r0, r1, col_off, row_off,
    rmean_off] per task. PASS 1: sums; 2: ||u||^2; 3: the update."""
    k = tl.program_id(0)
    t = tl.load(task_ptr + k)
    r0, r1 = tl.load(task_ptr + n_tasks + k), tl.load(task_ptr + 2 * n_tasks + k)
    rows, cols = tl.load(tab_ptr + ROWS * n + t), tl.load(tab_ptr + COLS * n + t)
    if HAS_FOUND_INF:  # GradScaler found an inf: no rows
        r1 = tl.where(tl.load(found_ptr) == 0, r1, r0)
    ok = r1 > r0
    r = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = (r < r1) & ok
    p_ptr, g_ptr = _ptr(tab_ptr, n, P, t, DTYPE), _ptr(tab_ptr, n, G, t, DTYPE)
    eps1 = tl.load(hp_ptr + 2).to(OPMATH)
    row_acc = tl.zeros([BR], dtype=OPMATH)
    sq_acc = tl.zeros([BR], dtype=tl.float64)  # ||p||^2 (pass 1), ||u||^2 (pass 2), squared in float64
    if PASS > 1:
        b = r0 // rows
        row = tl.load(_ptr(tab_ptr, n, ROW, t, DTYPE) + r, mask=rmask, other=0).to(OPMATH)
        mean = tl.load(rmean_ptr + tl.load(task_ptr + 5 * n_tasks + k) + b)
        col_base = _ptr(tab_ptr, n, COL, t, DTYPE) + b * cols
        decay = (1.0 - tl.load(hp_ptr) * tl.load(hp_ptr + 5)).to(OPMATH)
        scale = tl.load(scale_ptr + t).to(OPMATH)
    for c0 in range(0, cols, BC):
        c = c0 + tl.arange(0, BC).to(tl.int64)
        mask = rmask[:, None] & (c < cols)[None, :]
        offs = r[:, None] * cols + c[None, :]
        g = _grad(g_ptr, offs, mask, div_ptr, OPMATH, HAS_DIVISOR, MAXIMIZE)
        if PASS == 1:
            p = tl.load(p_ptr + offs, mask=mask, other=0).to(OPMATH)
            g2 = g * g
            p64 = p.to(tl.float64)
            sq_acc += tl.sum(p64 * p64, axis=1)
            row_acc += tl.sum(g2, axis=1)
            col_off = tl.load(task_ptr + 3 * n_tasks + k)
            tl.store(col_part_ptr + col_off + c, tl.sum(g2, axis=0), mask=(c < cols) & ok)
        else:
            col = tl.load(col_base + c, mask=c < cols, other=0).to(OPMATH)
            u = _update(g, (row[:, None] * col[None, :]) / mean, eps1 * eps1)
            if PASS == 2:
                u64 = tl.where(mask, u, 0.0).to(tl.float64)
                sq_acc += tl.sum(u64 * u64, axis=1)
            else:
                p = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
                tl.store(p_ptr + offs, (p * decay - scale * u).to(DTYPE), mask=mask)
                if WRITE_BACK_GRADS:
                    unscaled = tl.load(g_ptr + offs, mask=mask).to(OPMATH) * (1.0 / tl.load(div_ptr).to(tl.float64))
                    tl.store(g_ptr + offs, unscaled.to(DTYPE), mask=mask)
    if PASS == 1:
        row_off = tl.load(task_ptr + 4 * n_tasks + k)
        tl.store(row_sum_ptr + row_off + r, row_acc.to(tl.float64), mask=rmask)
    if PASS < 3:
        tl.store(part_ptr + k, tl.sum(sq_acc))


@triton.jit
def vector_kernel(tab_ptr, n, vt_ptr, n_vtasks, task_base, hp_ptr, div_ptr, found_ptr, p_part_ptr, u_part_ptr,
                  scale_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, PASS: tl.constexpr,
                  HAS_DIVISOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One BLOCK chunk of a param of dim <= 1. PASS 1: variance update, ||p||^2, ||u||^2; PASS 3: the update."""
    k = tl.program_id(0)
    t = tl.load(vt_ptr + k)
    offs = tl.load(vt_ptr + n_vtasks + k) + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(tab_ptr + NUMEL * n + t)
    if HAS_FOUND_INF:  # GradScaler found an inf: nothing
        numel = tl.where(tl.load(found_ptr) == 0, numel, 0)
    mask = offs < numel
    p_ptr, g_ptr, v_ptr = _ptr(tab_ptr, n, P, t, DTYPE), _ptr(tab_ptr, n, G, t, DTYPE), _ptr(tab_ptr, n, VAR, t, DTYPE)
    eps1 = tl.load(hp_ptr + 2).to(OPMATH)
    g = _grad(g_ptr, offs, mask, div_ptr, OPMATH, HAS_DIVISOR, MAXIMIZE)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(OPMATH)
    v = tl.load(v_ptr + offs, mask=mask, other=0).to(OPMATH)
    if PASS == 1:
        weight, _ = _coefs(tab_ptr, n, t, hp_ptr)
        w = weight.to(OPMATH)
        g2 = g * g
        v = tl.where(w < 0.5, v + w * (g2 - v), g2 - (g2 - v) * (1.0 - w))  # torch's lerp
        v = v.to(DTYPE)
        tl.store(v_ptr + offs, v, mask=mask)
        u = _update(g, v.to(OPMATH), eps1 * eps1)  # the stored (rounded) variance, as torch reads it
        p64, u64 = p.to(tl.float64), tl.where(mask, u, 0.0).to(tl.float64)  # squared in float64
        tl.store(p_part_ptr + task_base + k, tl.sum(p64 * p64))
        tl.store(u_part_ptr + task_base + k, tl.sum(u64 * u64))
    else:
        decay = (1.0 - tl.load(hp_ptr) * tl.load(hp_ptr + 5)).to(OPMATH)
        u = _update(g, v, eps1 * eps1)
        tl.store(p_ptr + offs, (p * decay - tl.load(scale_ptr + t).to(OPMATH) * u).to(DTYPE), mask=mask)
        if WRITE_BACK_GRADS:
            unscaled = tl.load(g_ptr + offs, mask=mask).to(OPMATH) * (1.0 / tl.load(div_ptr).to(tl.float64))
            tl.store(g_ptr + offs, unscaled.to(DTYPE), mask=mask)


@triton.jit
def tensor_kernel(tab_ptr, n, range_ptr, hp_ptr, part_ptr, alpha_ptr, scale_ptr, PASS: tl.constexpr,
                  FLOAT_NORM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program per tensor, its task partials in order. PASS 1: alpha = max(eps2, rms(p)) * rho (Python's max:
    a NaN rms gives eps2); PASS 2: scale = alpha / max(1, rms(u) / d) (a NaN gives 1)."""
    t = tl.program_id(0)
    k0, k1 = tl.load(range_ptr + t), tl.load(range_ptr + n + t)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(k0, k1, BLOCK):
        idx = j + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < k1, other=0.0)
    total = tl.sum(acc)
    numel = tl.load(tab_ptr + NUMEL * n + t)
    if FLOAT_NORM:  # torch's float32 norm overflows past float's range (a one-element tensor's norm is its |x|)
        total = tl.where((numel > 1) & (total > 3.4028234663852886e38), float("inf"), total)
    rms = tl.sqrt(total) / tl.sqrt(numel.to(tl.float64))
    if PASS == 1:
        eps2 = tl.load(hp_ptr + 3)
        _, rho = _coefs(tab_ptr, n, t, hp_ptr)
        tl.store(alpha_ptr + t, tl.where(rms > eps2, rms, eps2) * rho)
    else:
        ratio = rms / tl.load(hp_ptr + 4)
        tl.store(scale_ptr + t, tl.load(alpha_ptr + t) / tl.where(ratio > 1.0, ratio, 1.0))


@triton.jit
def factor_kernel(tab_ptr, n, mat_ptr, n_mats, hp_ptr, found_ptr, row_sum_ptr, col_part_ptr, col_off_ptr, rmean_ptr,
                  DTYPE: tl.constexpr, OPMATH: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """One program per matrix of a batch: mats [t, b, first task, tasks, row_sum offset, rmean offset]. row_var and
    col_var lerp towards the new means (stored, then used rounded), rmean = max(mean(row_var), eps1)."""
    i = tl.program_id(0)
    t, b = tl.load(mat_ptr + i), tl.load(mat_ptr + n_mats + i)
    k0, nk = tl.load(mat_ptr + 2 * n_mats + i), tl.load(mat_ptr + 3 * n_mats + i)
    rows, cols = tl.load(tab_ptr + ROWS * n + t), tl.load(tab_ptr + COLS * n + t)
    live = rows + 0
    if HAS_FOUND_INF:  # GradScaler found an inf: nothing stored
        live = tl.where(tl.load(found_ptr) == 0, rows, 0)
    ok = live > 0
    weight, _ = _coefs(tab_ptr, n, t, hp_ptr)
    w = weight.to(OPMATH)
    row_ptr = _ptr(tab_ptr, n, ROW, t, DTYPE) + b * rows
    col_ptr = _ptr(tab_ptr, n, COL, t, DTYPE) + b * cols
    row_base = tl.load(mat_ptr + 4 * n_mats + i)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for r0 in range(0, rows, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        m = r < rows
        mean = (tl.load(row_sum_ptr + row_base + r, mask=m, other=0.0) / cols).to(OPMATH)
        old = tl.load(row_ptr + r, mask=m, other=0).to(OPMATH)
        new = tl.where(w < 0.5, old + w * (mean - old), mean - (mean - old) * (1.0 - w)).to(DTYPE)
        tl.store(row_ptr + r, new, mask=m & ok)
        total += tl.where(m, tl.where(ok, new, old.to(DTYPE)).to(tl.float64), 0.0)
    rm = (tl.sum(total) / rows).to(OPMATH)
    eps1 = tl.load(hp_ptr + 2).to(OPMATH)
    tl.store(rmean_ptr + tl.load(mat_ptr + 5 * n_mats + i), tl.where(rm < eps1, eps1, rm))
    for c0 in range(0, cols, BLOCK):
        c = c0 + tl.arange(0, BLOCK).to(tl.int64)
        m = c < cols
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for k in range(k0, k0 + nk):
            acc += tl.load(col_part_ptr + tl.load(col_off_ptr + k) + c, mask=m, other=0).to(tl.float64)
        mean = (acc / rows).to(OPMATH)
        old = tl.load(col_ptr + c, mask=m, other=0).to(OPMATH)
        new = tl.where(w < 0.5, old + w * (mean - old), mean - (mean - old) * (1.0 - w))
        tl.store(col_ptr + c, new.to(DTYPE), mask=m & ok)


def _tables(params, n_f, device):
    """Host-built task tables (shapes only): matrix tasks, vector chunks, matrices of the batches, tensor ranges."""
    tasks = [[], [], [], [], [], []]  # t, r0, r1, col_off, row_off, rmean_off
    vec = [[], []]  # t, start
    mats = [[], [], [], [], [], []]  # t, b, first task, tasks, row_off, rmean_off
    first, last = [], []
    col_off = row_off = rmean_off = 0
    for t, p in enumerate(params):
        first.append(len(tasks[0]) if t < n_f else None)
        if t < n_f:
            rows, cols = p.shape[-2], p.shape[-1]
            batch = p.numel() // (rows * cols)
            for b in range(batch):
                mats_k0 = len(tasks[0])
                for r in range(0, rows, BR):
                    for lst, v in zip(tasks, (t, b * rows + r, b * rows + min(rows, r + BR), col_off, row_off,
                                              rmean_off)):  # fmt: skip
                        lst.append(v)
                    col_off += cols
                for lst, v in zip(mats, (t, b, mats_k0, len(tasks[0]) - mats_k0, row_off + b * rows, rmean_off + b)):
                    lst.append(v)
            row_off += batch * rows
            rmean_off += batch
        last.append(len(tasks[0]) if t < n_f else None)
    n_mtasks = len(tasks[0])
    for t in range(n_f, len(params)):
        first[t] = n_mtasks + len(vec[0])
        for s in range(0, params[t].numel(), BLOCK):
            vec[0].append(t)
            vec[1].append(s)
        last[t] = n_mtasks + len(vec[0])
    flat = [x for lst in (*tasks, *vec, *mats, first, last) for x in lst]
    allt = _to_device(torch.tensor(flat or [0], dtype=torch.int64), device)
    sizes = [len(tasks[0])] * 6 + [len(vec[0])] * 2 + [len(mats[0])] * 6 + [len(params)] * 2
    parts, at = [], 0
    for s in sizes:
        parts.append(allt[at : at + s])
        at += s
    return (torch.cat(parts[:6]) if n_mtasks else allt, n_mtasks, torch.cat(parts[6:8]) if vec[0] else allt,
            len(vec[0]), torch.cat(parts[8:14]) if mats[0] else allt, len(mats[0]), torch.cat(parts[14:16]),
            col_off, row_off, rmean_off)  # fmt: skip


def adafactor_step(params, grads, row_vars, col_vars, variances, steps, lr, lr_tensor, hyper, maximize, grad_divisor,
                   found_inf, write_back_grads):  # fmt: skip
    if not params:
        return
    reference.check_adafactor("fusedopt adafactor_step (triton)", params, grads, row_vars, col_vars, variances, steps)
    n, n_f = len(params), len(row_vars)
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params = copies.write(params)
    row_vars, col_vars, variances = copies.write(row_vars), copies.write(col_vars), copies.write(variances)
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    rows_ = [p.shape[-2] if i < n_f else 0 for i, p in enumerate(params)]
    cols_ = [p.shape[-1] if i < n_f else 0 for i, p in enumerate(params)]
    addr = lambda ts, off=0: [0] * off + [t.data_ptr() for t in ts] + [0] * (n - off - len(ts))
    host = [addr(params), addr(grads), addr(row_vars), addr(col_vars), addr(variances, n_f), addr(steps),
            [p.numel() for p in params], rows_, cols_]  # fmt: skip
    tab = _to_device(torch.tensor([x for row in host for x in row], dtype=torch.int64), device)
    step_table = TensorTable([params, steps], BLOCK)
    update_scalars(step_table, 1, found_inf, 1.0, 1.0)  # step += 1 unless found_inf
    tasks, n_mt, vtasks, n_vt, mats, n_mats, ranges, n_col, n_rows, n_rmean = _tables(params, n_f, device)
    hp = scalars_tensor([lr, *(float(hyper[k]) for k in ("beta2_decay", "eps1", "eps2", "d", "weight_decay"))],
                        device, lr_tensor)  # fmt: skip
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n_tasks = n_mt + n_vt
    p_part = torch.empty(max(n_tasks, 1), dtype=torch.float64, device=device)
    u_part = torch.empty(max(n_tasks, 1), dtype=torch.float64, device=device)
    row_sum = torch.empty(max(n_rows, 1), dtype=torch.float64, device=device)
    col_part = torch.empty(max(n_col, 1), dtype=acc, device=device)
    rmean = torch.empty(max(n_rmean, 1), dtype=acc, device=device)
    alpha = torch.empty(n, dtype=torch.float64, device=device)
    scale = torch.empty(n, dtype=torch.float64, device=device)
    div = grad_divisor.float() if grad_divisor is not None else hp
    found = found_inf.float() if found_inf is not None else hp
    flags = dict(DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), HAS_DIVISOR=grad_divisor is not None,
                 HAS_FOUND_INF=found_inf is not None, MAXIMIZE=bool(maximize),
                 WRITE_BACK_GRADS=write_back_grads)  # fmt: skip
    mat_args = (tab, n, tasks, n_mt, hp, div, found, row_sum, col_part, p_part)
    vec_args = (tab, n, vtasks, n_vt, n_mt, hp, div, found, p_part, u_part, scale)
    if n_mt:
        matrix_kernel[(n_mt,)](*mat_args, rmean, scale, PASS=1, BR=BR, BC=BC, **flags)
    if n_vt:
        vector_kernel[(n_vt,)](*vec_args, PASS=1, BLOCK=BLOCK, **flags)
    float_norm = dtype != torch.float64
    tensor_kernel[(n,)](tab, n, ranges, hp, p_part, alpha, scale, PASS=1, FLOAT_NORM=float_norm, BLOCK=BLOCK)
    if n_mats:
        col_offsets = tasks[3 * n_mt : 4 * n_mt]
        factor_kernel[(n_mats,)](tab, n, mats, n_mats, hp, found, row_sum, col_part, col_offsets, rmean,
                                 DTYPE=flags["DTYPE"], OPMATH=flags["OPMATH"], HAS_FOUND_INF=found_inf is not None,
                                 BLOCK=BLOCK)  # fmt: skip
        matrix_kernel[(n_mt,)](tab, n, tasks, n_mt, hp, div, found, row_sum, col_part, u_part, rmean, scale, PASS=2,
                               BR=BR, BC=BC, **flags)  # fmt: skip
    tensor_kernel[(n,)](tab, n, ranges, hp, u_part, alpha, scale, PASS=2, FLOAT_NORM=float_norm, BLOCK=BLOCK)
    if n_mt:
        matrix_kernel[(n_mt,)](*mat_args, rmean, scale, PASS=3, BR=BR, BC=BC, **flags)
    if n_vt:
        vector_kernel[(n_vt,)](*vec_args, PASS=3, BLOCK=BLOCK, **flags)
    copies.finish()
