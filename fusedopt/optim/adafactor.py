"""fusedopt.optim.Adafactor: torch.optim.Adafactor (Shazeer & Stern 2018, torch's variant) with the step fused per
bucket: torch's signature, state keys (`step`, and `row_var` / `col_var` for params of >= 2 dims, `variance` for
the others) and shapes, so state_dicts load both ways.

Adafactor is not elementwise: the factored second moment needs each matrix's row and column sums of g^2, and the
update's RMS clip needs the norm of the finished update. Passes over a bucket (fusedopt::adafactor_step):
  1. read p and g: ||p||^2 per tensor; per matrix the row sums and column sums of g^2; for other params the
     variance is updated in place and ||update||^2 summed in the same pass;
  (the small factors: row_var, col_var lerped towards the new means, the row means of row_var per matrix)
  2. matrices only: read g again for ||update||^2 (the estimate needs the finished factors of the whole matrix);
  3. read p and g, write p: p * (1 - lr * wd) - alpha / max(1, rms(update) / d) * update.
So a matrix's grad is read three times and a vector's twice; torch's for-loop reads it about eight times.
"""

from __future__ import annotations

import torch

from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor


class Adafactor(FusedOptimizerMixin, torch.optim.Adafactor):
    """Drop-in for torch.optim.Adafactor. Extra keywords: backend="auto"|"cuda"|"triton"|"cpu"|"torch", and
    max_grad_norm (clip_grad_norm_ folded into the step; the last norm is `last_grad_norm`). state_dtype='int8' and
    bf16_stochastic_round=True are accepted as keywords but refused with a ValueError (not supported yet)."""

    OP_NAME = "adafactor_step"
    STATE_KEYS = ()  # the state lists differ per param (factored or not): built by _step_bucket

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False, backend=None, max_grad_norm=None, state_dtype=None,
                 bf16_stochastic_round=False, stochastic_round_seed=0):  # fmt: skip
        # Adafactor has its own op (fusedopt::adafactor_step), outside the spec engines: no 8-bit state path and no
        # stochastic-rounding store yet. Refuse both rather than ignore them.
        if state_dtype is not None:
            raise ValueError(
                f"fusedopt.optim.Adafactor does not support state_dtype={state_dtype!r} yet: its factored states "
                "have no 8-bit path (fusedopt::adafactor_step is not on the spec engine). Use state_dtype=None."
            )
        if bf16_stochastic_round:
            raise ValueError(
                "fusedopt.optim.Adafactor does not support bf16_stochastic_round=True yet: fusedopt::adafactor_step "
                "stores params by round-to-nearest. Keep an fp32 master copy, or use another optimizer."
            )
        self._fusedopt_setup(backend, False, max_grad_norm, None, False, stochastic_round_seed)
        super().__init__(params, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                         foreach=foreach, maximize=maximize)  # fmt: skip
        self._step_supports_amp_scaling = True

    def _init_state(self, group, p, state):
        # torch's _init_group: shapes from the grad (the param's), zeros of the param's dtype
        state["step"] = self._new_step_tensor(p)
        if p.dim() > 1:
            state["row_var"] = p.new_zeros((*p.shape[:-1], 1))
            state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _lists(self, bucket: Bucket) -> tuple:
        """The bucket in kernel order (matrices first) and its state lists, cached with the bucket."""
        cached = bucket.extra.get("adafactor")
        if cached is None:
            if hasattr(bucket.params[0], "_local_tensor"):
                raise NotImplementedError(
                    "fusedopt.optim.Adafactor does not support DTensor (FSDP2) params: its row and column factors and "
                    "the update's RMS need whole matrices, and the kernels see local shards only."
                )
            order = sorted(range(len(bucket.params)), key=lambda i: bucket.params[i].dim() < 2)
            n_f = sum(1 for p in bucket.params if p.dim() >= 2)
            st = [self.state[bucket.params[i]] for i in order]
            for i, s in zip(order, st):  # a loaded state_dict may lack a factor: start it as torch would
                if not (("row_var" in s and "col_var" in s) if bucket.params[i].dim() > 1 else "variance" in s):
                    step = s.get("step")
                    s.clear()
                    self._init_state(None, bucket.params[i], s)
                    if step is not None:
                        s["step"] = step
            cached = (order, [bucket.local_params[i] for i in order], [local_tensor(s["row_var"]) for s in st[:n_f]],
                      [local_tensor(s["col_var"]) for s in st[:n_f]], [local_tensor(s["variance"]) for s in st[n_f:]],
                      [s["step"] for s in st])  # fmt: skip
            bucket.extra["adafactor"] = cached
        return cached

    def _step_bucket(self, group, bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        from fusedopt.ops import adafactor

        order, params, row_vars, col_vars, variances, steps = self._lists(bucket)
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(bucket.dtype).eps
        hyper = {"beta2_decay": group["beta2_decay"], "eps1": eps1, "eps2": eps2, "d": group["d"],
                 "weight_decay": group["weight_decay"]}  # fmt: skip
        adafactor.adafactor_step(params, [grads[i] for i in order], row_vars, col_vars, variances, steps,
                                 lr=group["lr"], hyper=hyper, maximize=bool(group["maximize"]),
                                 grad_divisor=grad_divisor, found_inf=found_inf, write_back_grads=write_back_grads,
                                 backend=bucket.backend)  # fmt: skip
