"""Muon's param update in Triton through the optimizer engine (optim_engine.py); the math of
csrc/common/muon_update_math.h. The engine's grad row holds the orthogonalized momentum."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import program_block
from fusedopt.triton_kernels.optim_engine import commit_param, launch, load_grad, load_param

HYPER = ("weight_decay", "lr_ratio")  # hp_ptr[1:], after lr; the spec's order


@triton.jit
def muon_update_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, 0, DTYPE, OPMATH, MASTER, QUANT)
    ortho = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                      WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- torch.optim.Muon's update: decoupled decay, then the shape-adjusted lr ---
    lr = tl.load(hp_ptr)
    decay = (1.0 - lr * tl.load(hp_ptr + 1)).to(OPMATH)
    neg_lr = (-(lr * tl.load(hp_ptr + 2))).to(OPMATH)
    param = param * decay
    param = param + ortho * neg_lr

    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, 0, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)


def muon_update_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                     write_back_grads, stochastic_round=None, masters=()):  # fmt: skip
    launch(muon_update_kernel, ("muon_update", (), HYPER, None), params, grads, states, steps, lr, lr_tensor, hyper,
           maximize, grad_divisor, found_inf, write_back_grads,
           stochastic_round=stochastic_round, masters=masters)  # fmt: skip
