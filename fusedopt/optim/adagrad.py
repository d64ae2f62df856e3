"""fusedopt.optim.Adagrad: torch.optim.Adagrad with the step done by one fused kernel per bucket."""

from __future__ import annotations

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
        super().__init__(
            params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = True
        for group in self.param_groups:  # torch made `sum` in the param's dtype: beside a master, float32 from its fill
            for p in group["params"]:
                if self._master_mode(group, p):
                    self.state[p]["sum"] = self._new_state_buffer(group, p, SPEC.states[0])
        self._after_load_state_dict()  # torch made each 'step' on the CPU: the kernels read it on the param's device
