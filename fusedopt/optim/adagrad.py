"""fusedopt.optim.Adagrad: torch.optim.Adagrad with the step done by one fused kernel per bucket."""

from __future__ import annotations

import collections

import torch

from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec

SPEC = OptimizerSpec(
    op="adagrad",
    hyper=("lr_decay", "eps", "weight_decay"),
    states=(StateSpec("sum", "state_sums", fill="initial_accumulator_value", signed=False),),
    scalar="step",
)


class Adagrad(SpecOptimizerMixin, torch.optim.Adagrad):
    """Drop-in for torch.optim.Adagrad. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch",
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`), state_dtype="int8",
    "int4" or "fp8" (block-wise quantized states, docs/LOW_BIT_STATES.md), bf16_stochastic_round (bf16 params stored by
    stochastic rounding, reproducible from stochastic_round_seed), and master_weights=True|"remainder" (exact float32
    masters of 16-bit params, docs/MASTER_WEIGHTS.md)."""

    SPEC = SPEC

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, backend=None,
                 max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        self._constructing = True  # add_param_group: torch's __init__ fills _LowBitSumsAsMade (below)
        super().__init__(
            params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        del self._constructing
        self.state = collections.defaultdict(dict, {p: dict(st) for p, st in self.state.items()})
        self._step_supports_amp_scaling = True
        for group in self.param_groups:  # torch made `sum` in the param's dtype: beside a master, float32 from its fill
            for p in group["params"]:
                if self._master_mode(group, p) and "sum" in self.state[p]:  # (not made low-bit already)
                    self.state[p]["sum"] = self._new_state_buffer(group, p, SPEC.states[0])
        self._after_load_state_dict()  # torch made each 'step' on the CPU: the kernels read it on the param's device

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_constructing", False) and not isinstance(self.state, _LowBitSumsAsMade):
            self.state = _LowBitSumsAsMade(self)


class _LowBitSumsAsMade(collections.defaultdict):
    """Adagrad's state while torch.optim.Adagrad.__init__ makes every param's `sum` (full_like, in full precision):
    a sum that will be low-bit is made low-bit as torch sets it (_new_q8_state: one quantized block, repeated), and
    torch's tensor is dropped. Construction so never holds every full-precision sum at once (it did: 4 bytes per
    param, a model's size, before quantizing them all)."""

    def __init__(self, opt: Adagrad):
        super().__init__()
        self.opt = opt
        self.group_of: dict | None = None  # made at the first param's state: every group is added by then

    def __missing__(self, p):
        if self.group_of is None:
            self.group_of = {id(q): g for g in self.opt.param_groups for q in g["params"]}
        group = self.group_of.get(id(p))
        low_bit = group is not None and not p.is_complex() and self.opt._quantized_state(group, p)
        self[p] = _ParamSumAsMade(self.opt, group, p) if low_bit else {}
        return self[p]


class _ParamSumAsMade(dict):
    """A low-bit param's state during construction: its `sum` made low-bit as torch sets it, any other entry as set."""

    def __init__(self, opt: Adagrad, group: dict, p):
        super().__init__()
        self.opt, self.group, self.p = opt, group, p

    def __setitem__(self, key, value) -> None:
        if key == "sum":  # what the conversion after __init__ would give
            self.opt._new_q8_state(self.group, self.p, SPEC.states[0], self)
        else:
            super().__setitem__(key, value)
