"""fusedopt.optim.Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolated momentum as the update, decoupled weight decay, one state buffer `exp_avg`. torch has no Lion; the
reference is fusedopt.reference.lion_step, and the tests check it against a float64 loop written from the paper."""

from __future__ import annotations

import torch

from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec

SPEC = OptimizerSpec(
    op="lion",
    hyper=("beta1", "beta2", "weight_decay"),
    states=(StateSpec("exp_avg", "exp_avgs"),),
    scalar=None,
    hyper_of=lambda g: {
        "beta1": float(g["betas"][0]),
        "beta2": float(g["betas"][1]),
        "weight_decay": float(g["weight_decay"]),
    },
)


class Lion(SpecOptimizerMixin, torch.optim.Optimizer):
    """Lion: update = sign(beta1 * m + (1 - beta1) * g); p = p * (1 - lr * wd) - lr * update;
    m = beta2 * m + (1 - beta2) * g. Keywords as torch.optim's optimizers plus backend=, max_grad_norm=,
    state_dtype= ("int8" / "int4" / "fp8" states, docs/LOW_BIT_STATES.md) and bf16_stochastic_round= (with
    stochastic_round_seed=)."""

    SPEC = SPEC

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, backend=None,
                 max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):  # fmt: skip
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if len(betas) != 2 or not all(0.0 <= float(b) <= 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (two values in [0, 1])")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self._fusedopt_setup(backend, False, max_grad_norm, state_dtype, bf16_stochastic_round,
                             stochastic_round_seed, master_weights)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize})
        self._step_supports_amp_scaling = True
