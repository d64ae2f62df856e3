"""fusedopt.optim.Adam and AdamW: torch.optim's classes with the step done by one fused kernel per bucket. AdamW is
Adam with decoupled weight decay: one op, fusedopt::adam_step."""

from __future__ import annotations

import dataclasses

import torch

from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec


def _adam_hyper(group: dict, decoupled: bool) -> dict:
    beta1, beta2 = group["betas"]
    return {"beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]), "amsgrad": bool(group["amsgrad"]),
            "decoupled_weight_decay": decoupled}  # fmt: skip


SPEC = OptimizerSpec(
    op="adam",
    hyper=("beta1", "beta2", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay"),
    flags=("amsgrad", "decoupled_weight_decay"),
    states=(
        StateSpec("exp_avg", "exp_avgs"),
        StateSpec("exp_avg_sq", "exp_avg_sqs", signed=False),
        StateSpec("max_exp_avg_sq", "max_exp_avg_sqs", when=lambda h: h["amsgrad"], signed=False),
    ),
    scalar="step",
    hyper_of=lambda g: _adam_hyper(g, bool(g.get("decoupled_weight_decay", False))),
)
ADAMW_SPEC = dataclasses.replace(SPEC, hyper_of=lambda g: _adam_hyper(g, True))


class Adam(SpecOptimizerMixin, torch.optim.Adam):
    """Drop-in for torch.optim.Adam. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch",
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`), state_dtype="int8",
    "int4" or "fp8" (block-wise quantized states, docs/LOW_BIT_STATES.md), bf16_stochastic_round (bf16 params stored by
    stochastic rounding, reproducible from stochastic_round_seed), and master_weights=True|"remainder" (exact float32
    masters of 16-bit params, docs/MASTER_WEIGHTS.md)."""

    SPEC = SPEC

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
            maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._step_supports_amp_scaling = True


class AdamW(SpecOptimizerMixin, torch.optim.AdamW):
    """Drop-in for torch.optim.AdamW. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch",
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`), state_dtype="int8",
    "int4" or "fp8" (block-wise quantized states, docs/LOW_BIT_STATES.md), bf16_stochastic_round (bf16 params stored by
    stochastic rounding, reproducible from stochastic_round_seed), and master_weights=True|"remainder" (exact float32
    masters of 16-bit params, docs/MASTER_WEIGHTS.md)."""

    SPEC = ADAMW_SPEC

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 backend=None, max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        self._fusedopt_setup(backend, differentiable, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = True
