"""The checks every backend makes on an optimizer step's lists, with the same messages as csrc/common/tensor_lists.h
(run by the cpu and cuda backends); the triton and torch backends run these. Order: the params group, then each
list, then the per-param scalars. A kernel reads every tensor with its param's extent, so once these pass nothing
past a tensor is read."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DENSE_ONLY = "fusedopt supports dense tensors only"


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def check_params(params: list, op: str) -> None:
    """Dense tensors of one device and one supported floating dtype (one call handles one group)."""
    first = params[0]
    for i, p in enumerate(params):
        if p is None:
            raise RuntimeError(f"{op}: params[{i}] is undefined (None)")
        if p.layout != torch.strided:
            raise RuntimeError(f"{op}: params[{i}] is not a dense (strided) tensor; {_DENSE_ONLY}")
        if p.device != first.device:
            raise RuntimeError(
                f"{op}: params[{i}] is on {p.device}, params[0] on {first.device} (one call handles one device)"
            )
        if p.dtype != first.dtype:
            raise RuntimeError(f"{op}: params[{i}] is {p.dtype}, params[0] {first.dtype} (one call handles one dtype)")
    if first.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"{op}: params of dtype {first.dtype} are not supported "
            "(torch.float32, torch.float64, torch.bfloat16 and torch.float16 are)"
        )


_OPMATH_STATES = [False]  # set by states_in_opmath


class states_in_opmath:
    """Within it, check_step expects the state lists in the params' opmath dtype (float32 for 16-bit params): the
    torch backend of the 8-bit states (fusedopt/lowbit.py) runs the full-precision reference on dequantized
    float32 states."""

    def __enter__(self):
        _OPMATH_STATES[0] = True

    def __exit__(self, *exc):
        _OPMATH_STATES[0] = False


def check_list(tensors: list, params: list, name: str, op: str, opmath: bool = False, dtype=None) -> None:
    """One tensor per param, matching it in device, shape and dtype (its opmath dtype when `opmath`; `dtype` when
    given: float32 states beside 16-bit params with master weights, int16 remainders)."""
    if len(tensors) != len(params):
        raise RuntimeError(f"{op}: {name} has {len(tensors)} tensors, params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t is None:
            raise RuntimeError(f"{op}: {name}[{i}] is undefined (None)")
        if t.layout != torch.strided:
            raise RuntimeError(f"{op}: {name}[{i}] is not a dense (strided) tensor; {_DENSE_ONLY}")
        if t.device != p.device:
            raise RuntimeError(f"{op}: {name}[{i}] is on {t.device}, its param on {p.device}")
        if t.shape != p.shape:
            raise RuntimeError(f"{op}: {name}[{i}] has shape {_shape(t)}, its param {_shape(p)}")
        if dtype is not None:
            if t.dtype != dtype:
                raise RuntimeError(f"{op}: {name}[{i}] is {t.dtype}, expected {dtype} (master weights)")
            continue
        want = (torch.float64 if p.dtype == torch.float64 else torch.float32) if opmath else p.dtype
        if t.dtype != want:
            raise RuntimeError(f"{op}: {name}[{i}] is {t.dtype}, its param {p.dtype}")


def check_scalars(tensors: list, params: list, name: str, op: str) -> None:
    """One float32 scalar per param, on its device (the state 'step', SGD's first-step flags)."""
    if len(tensors) != len(params):
        raise RuntimeError(f"{op}: {name} has {len(tensors)} tensors, params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        ok = (
            t is not None
            and t.layout == torch.strided
            and t.numel() == 1
            and t.dtype == torch.float32
            and t.device == p.device
        )
        if not ok:
            raise RuntimeError(f"{op}: {name}[{i}] must be a one-element torch.float32 tensor on its param's device")


def check_stochastic_round(op: str, params: list, state: torch.Tensor) -> None:
    """bf16 params, and an int64 [seed, counter] tensor on their device (csrc/common/optim_binding.h's check)."""
    if params[0].dtype != torch.bfloat16:
        raise RuntimeError(f"{op}: stochastic rounding applies to bfloat16 params, got {params[0].dtype}")
    if not (state.dtype == torch.int64 and state.numel() == 2 and state.is_contiguous()
            and state.device == params[0].device):  # fmt: skip
        raise RuntimeError(f"{op}: stochastic_round must be a contiguous int64 tensor [seed, counter] on the params' "
                           "device")  # fmt: skip


def refuse_masters(op: str, masters) -> None:
    """The ops that do not serve master weights (LAMB's two-pass engine, Muon's momentum)."""
    if masters:
        raise RuntimeError(f"{op}: master weights are not supported by this optimizer")


def check_masters(op: str, params: list, masters: list, stochastic_round) -> None:
    """Master weights (docs/MASTER_WEIGHTS.md): 16-bit params, one float32 master or (bf16 params) int16 remainder
    each, no stochastic rounding; csrc/common/optim_binding.h's checks, in its order."""
    pt, mt = params[0].dtype, masters[0].dtype if masters[0] is not None else None
    if pt not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"{op}: master weights apply to bfloat16 and float16 params, got {pt}")
    if not (mt == torch.float32 or (mt == torch.int16 and pt == torch.bfloat16)):
        raise RuntimeError(f"{op}: masters must be float32 copies, or int16 remainders of bfloat16 params; got {mt}")
    check_list(masters, params, "masters", op, dtype=mt)
    if stochastic_round is not None:
        raise RuntimeError(f"{op}: stochastic rounding does not apply with master weights (the params are the "
                           "rounded masters)")  # fmt: skip


def check_step(op: str, params: list, lists: dict, scalars: dict | None = None, masters=(),
               stochastic_round=None) -> None:  # fmt: skip
    """check_params, then check_list for each (name -> list) of `lists` (the grads first; with `masters`, those
    after the grads and the states float32), then check_scalars for `scalars`."""
    check_params(params, op)
    for name, tensors in lists.items():
        if name == "grads":
            check_list(tensors, params, name, op)
            if masters:
                check_masters(op, params, masters, stochastic_round)
        elif masters:
            check_list(tensors, params, name, op, dtype=torch.float32)
        else:
            check_list(tensors, params, name, op, opmath=_OPMATH_STATES[0])
    for name, tensors in (scalars or {}).items():
        check_scalars(tensors, params, name, op)
