"""fusedopt.optim.RMSprop: torch.optim.RMSprop with the step done by one fused kernel per bucket (torch has no
fused RMSprop)."""

from __future__ import annotations

import torch

from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec

SPEC = OptimizerSpec(
    op="rmsprop",
    hyper=("alpha", "eps", "weight_decay", "momentum", "centered"),
    flags=("centered",),
    states=(
        StateSpec("square_avg", "square_avgs", signed=False),
        StateSpec("grad_avg", "grad_avgs", when=lambda h: h["centered"]),
        StateSpec("momentum_buffer", "momentum_buffers", when=lambda h: h["momentum"] > 0),
    ),
    scalar="step",
)


class RMSprop(SpecOptimizerMixin, torch.optim.RMSprop):
    """Drop-in for torch.optim.RMSprop. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch",
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`), state_dtype="int8",
    "int4" or "fp8" (block-wise quantized states, docs/LOW_BIT_STATES.md), bf16_stochastic_round (bf16 params stored by
    stochastic rounding, reproducible from stochastic_round_seed), and master_weights=True|"remainder" (exact float32
    masters of 16-bit params, docs/MASTER_WEIGHTS.md)."""

    SPEC = SPEC

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        super().__init__(
            params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )  # fmt: skip
        self._step_supports_amp_scaling = True
