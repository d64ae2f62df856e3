"""Master weights for 16-bit params (docs/MASTER_WEIGHTS.md), the definitions every backend matches.

- `master_weights=True`: a float32 master copy per param; the step reads and writes the master, and the param is
  the master rounded to nearest (even).
- `master_weights="remainder"` (bf16 params): the float32 master is the bf16 param joined with an int16 remainder,
  (param bits << 16) + remainder in 32-bit wrap-around arithmetic. `split` rounds the master's high half to nearest
  with ties away from zero, which keeps the remainder within int16 (csrc/common/master_bits.h).

`step_with_masters` is the torch backend: the op's float32 reference step (fusedopt/reference_optim.py) run on the
masters, with float32 grads and states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import _checks

_U32 = 0xFFFFFFFF


def _bits(x: Tensor) -> Tensor:
    """float32 x's bit pattern as int64 in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _U32


def _as_int16(v: Tensor) -> Tensor:
    """int64 values in [0, 2^16) as the int16 with the same 16 bits."""
    return (v - ((v >> 15) << 16)).to(torch.int16)


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bf16 param and its int16 remainder. A zero param with a negative remainder, or an
    infinite one with a positive remainder, is no split's output (the param was changed outside the optimizer beside
    a stale remainder; wrapping around would make the master a NaN): the master is the param alone."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.to(torch.int64)
    alone = (((high & 0x7FFF) == 0) & (low < 0)) | (((high & 0x7FFF) == 0x7F80) & (low > 0))
    bits = torch.where(alone, high << 16, ((high << 16) + low) & _U32)
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32).view(param.shape)


def from_param_where_changed(param: Tensor, master: Tensor) -> Tensor:
    """master_weights=True: the master, or the param where the param is no longer the master rounded to nearest
    (a NaN equal to a NaN): changed outside the optimizer (an in-place edit, a model load), the param is the value
    the step starts from."""
    rounded = master.to(param.dtype)
    left = (rounded.view(torch.int16) != param.view(torch.int16)) & ~(rounded.isnan() & param.isnan())
    return torch.where(left, param.float(), master)


def split(master: Tensor) -> tuple:
    """(bf16 param, int16 remainder) of a float32 master; a NaN gives a quiet NaN param and remainder 0."""
    bits = _bits(master)
    nan = master.isnan()
    high = ((bits + 0x8000) >> 16) & 0xFFFF
    low = torch.where(nan, 0, bits - (high << 16))
    high = torch.where(nan, ((bits >> 16) | 0x40) & 0xFFFF, high)
    return _as_int16(high).view(torch.bfloat16).view(master.shape), low.to(torch.int16).view(master.shape)


def step_with_masters(fp_step, spec, params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor,
                      found_inf, write_back_grads, stochastic_round, masters) -> None:  # fmt: skip
    """The torch backend of a step with master weights: the boundary checks of every backend, then `fp_step` (the
    op's reference) on the float32 masters, then the params (and remainders) from them. No host sync."""
    op = f"fusedopt {spec.op}_step (torch)"
    _checks.check_params(params, op)
    if not spec.serves_masters:
        _checks.refuse_masters(op, masters)
    used = spec.used_states(hyper)
    lists = {"grads": grads, **{s.list_name: st for s, st, on in zip(spec.states, states, used) if on}}
    _checks.check_step(op, params, lists, {spec.scalar_list: scalars} if scalars else None, masters=masters,
                       stochastic_round=stochastic_round)  # fmt: skip
    remainder = masters[0].dtype == torch.int16
    if remainder:
        full = [join(p, r) for p, r in zip(params, masters)]
    else:
        full = [from_param_where_changed(p, m) for p, m in zip(params, masters)]
    grads32 = [g.float() for g in grads]
    fp_step(full, grads32, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
            write_back_grads)  # fmt: skip
    keep = None if found_inf is None else found_inf.reshape(()) != 0
    for i, (p, g, g32, value) in enumerate(zip(params, grads, grads32, full)):
        if write_back_grads and grad_divisor is not None:
            g.copy_(g32)  # the unscaled grad (unchanged where found_inf skipped)
        if remainder:
            high, low = split(value)
            p.copy_(torch.where(keep, p, high) if keep is not None else high)
            masters[i].copy_(torch.where(keep, masters[i], low) if keep is not None else low)
        else:
            p.copy_(torch.where(keep, p, value.to(p.dtype)) if keep is not None else value)
            masters[i].copy_(torch.where(keep, masters[i], value) if keep is not None else value)
