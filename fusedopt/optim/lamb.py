"""fusedopt.optim.LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), with apex FusedLAMB's
signature and semantics: Adam's moments, a per-tensor trust ratio ||p|| / ||update|| (1 when either norm is 0),
applied only to tensors with weight decay unless use_nvlamb, and global grad-norm clipping before the update
(max_grad_norm=1.0 by default). torch has no LAMB; the reference is fusedopt.reference.lamb_step, and the tests
check it against a float64 loop written from the paper.

Two passes per bucket (csrc/cpu/norm_engine.h, csrc/cuda/norm_engine.cuh, triton_kernels/lamb.py): the moments and
the per-tensor norms of p and u in one multi-tensor pass, then the param update. The global clip is the project's
folded max_grad_norm (one more read of the grads for the norm, the coefficient folded into the kernels' grad
divisor); its coefficient is clip_grad_norm_'s, max_norm / (norm + 1e-6), where apex divides by norm / max_norm.
"""

from __future__ import annotations

import torch

from fusedopt.optim._spec import OptimizerSpec, SpecOptimizerMixin, StateSpec


def _hyper(g: dict) -> dict:
    return {
        "beta1": float(g["betas"][0]),
        "beta2": float(g["betas"][1]),
        "eps": float(g["eps"]),
        "weight_decay": float(g["weight_decay"]),
        "bias_correction": float(bool(g["bias_correction"])),
        "grad_averaging": float(bool(g["grad_averaging"])),
        "adam_w_mode": float(bool(g.get("adam_w_mode", True))),  # a group loaded from apex lacks the two flags
        "use_nvlamb": float(bool(g.get("use_nvlamb", False))),
    }


SPEC = OptimizerSpec(
    op="lamb",
    serves_masters=False,
    hyper=("beta1", "beta2", "eps", "weight_decay", "bias_correction", "grad_averaging", "adam_w_mode", "use_nvlamb"),
    states=(StateSpec("exp_avg", "exp_avgs"), StateSpec("exp_avg_sq", "exp_avg_sqs", signed=False)),
    scalar="step",
    hyper_of=_hyper,
)


class LAMB(SpecOptimizerMixin, torch.optim.Optimizer):
    """apex.optimizers.FusedLAMB's arguments, plus keyword-only maximize= and backend=. `max_grad_norm` (default
    1.0, apex's) clips by the global 2-norm of every grad of every group before the update; None turns it off; the
    norm is `last_grad_norm`. `bf16_stochastic_round=True` (with `stochastic_round_seed=`) stores bf16 params by
    stochastic rounding in stage 2; `state_dtype='int8'` is refused (no 8-bit path in the two-pass engine yet).
    `set_grad_none` makes zero_grad() set grads to None (torch's default too).
    State per param: `step` (float32 on the param's device), `exp_avg`, `exp_avg_sq`."""

    SERVES_STATE_DTYPE = False  # no 8-bit path: a group's state_dtype is refused
    SPEC = SPEC

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False, *, maximize=False, backend=None, state_dtype=None, bf16_stochastic_round=False,
                 stochastic_round_seed=0):  # fmt: skip
        if amsgrad:
            raise RuntimeError("fusedopt.optim.LAMB does not support the AMSGrad variant (nor does apex's FusedLAMB)")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if state_dtype is not None:
            raise ValueError(
                f"fusedopt.optim.LAMB does not support state_dtype={state_dtype!r} yet: its two-pass engine has no "
                "8-bit state path (only the elementwise optimizers have <op>_step_q8). Use state_dtype=None."
            )
        self._fusedopt_setup(backend, False, max_grad_norm, None, bf16_stochastic_round, stochastic_round_seed)
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay, "grad_averaging": grad_averaging, "adam_w_mode": adam_w_mode,
                    "use_nvlamb": use_nvlamb, "maximize": maximize}  # fmt: skip
        super().__init__(params, defaults)
        self.set_grad_none = set_grad_none
        self._step_supports_amp_scaling = True

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)

    def _step_bucket(self, group, bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        if hasattr(bucket.params[0], "_local_tensor"):
            raise NotImplementedError(
                "fusedopt.optim.LAMB does not support DTensor (FSDP2) params: its trust ratio needs each param's "
                "global norm, and the kernels see local shards only. Use LAMB with DDP or unsharded params."
            )
        super()._step_bucket(group, bucket, grads, grad_divisor, found_inf, write_back_grads=write_back_grads)
