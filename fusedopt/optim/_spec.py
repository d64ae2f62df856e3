"""One spec per optimizer: its state lists, hyperparameters and step counter. From the spec come the op's schema
(fusedopt/ops/optim_step.py), the state creation and the bucket's list order (SpecOptimizerMixin below); the kernels
of every backend take the same arguments:

    <op>_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads)

with `states` the spec's lists in order and `hyper` a {name: float} dict the C++ bindings fill their struct from
by name (csrc/common/optim_binding.h). docs/ADDING_AN_OP.md is the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor


@dataclass(frozen=True)
class StateSpec:
    key: str  # torch's state key ("sum", "exp_avg")
    list_name: str  # the op's list: schema argument and error messages ("state_sums", "exp_avgs")
    fill: str | None = None  # group key whose value starts a new buffer (Adagrad's initial_accumulator_value)


@dataclass(frozen=True)
class OptimizerSpec:
    op: str  # the op is fusedopt::<op>_step; kernels <op>_step on every backend
    hyper: tuple  # the kernel's hyperparameters (floats), by name, in the C++ struct's order
    states: tuple  # StateSpec, in list order
    has_step: bool  # state carries torch's float32 'step', incremented by the engines
    # group -> {hyper name: value}; None: group[name] for each name.
    hyper_of: Callable[[dict], dict] | None = None

    def hyper_values(self, group: dict) -> dict:
        if self.hyper_of is not None:
            return self.hyper_of(group)
        return {name: float(group[name]) for name in self.hyper}

    def schema(self) -> str:
        lists = ["params", "grads", *(s.list_name for s in self.states), "steps"]
        alias = "abcdefghijklmnopqrstuvwxyz"
        args = [f"Tensor({alias[i]}!)[] {name}" for i, name in enumerate(lists)]
        args += ["float lr", "Tensor? lr_tensor", *(f"float {h}" for h in self.hyper)]
        args += ["bool maximize", "Tensor? grad_divisor", "Tensor? found_inf", "bool write_back_grads", "str backend"]
        return f"{self.op}_step({', '.join(args)}) -> ()"


class SpecOptimizerMixin(FusedOptimizerMixin):
    """The step of an optimizer described by SPEC: state made from the spec (also for a key missing from a loaded
    state_dict), one fused op call per bucket, the bucket's lists held in C++ on the cpu/cuda backends."""

    SPEC: OptimizerSpec
    EXTRA_SPECS: tuple = ()  # further engine ops the step calls (Muon's muon_update after muon_momentum)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from fusedopt.ops import optim_step

        for spec in (cls.SPEC, *cls.EXTRA_SPECS):  # fusedopt::<op>_step exists once the class does (opcheck, compile)
            optim_step.op_for(spec)

    @property
    def STATE_KEYS(self) -> tuple:
        return tuple(s.key for s in self.SPEC.states)

    @property
    def OP_NAME(self) -> str:
        return self.SPEC.op

    @property
    def HAS_STEP(self) -> bool:
        return self.SPEC.has_step

    def _new_state_buffer(self, group: dict, p, spec: StateSpec):
        if spec.fill is None:
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        return torch.full_like(p, group[spec.fill], memory_format=torch.preserve_format)

    def _init_state(self, group, p, state):
        if self.SPEC.has_step:
            state["step"] = self._new_step_tensor(p)
        for s in self.SPEC.states:
            state[s.key] = self._new_state_buffer(group, p, s)

    def _state_lists(self, group, bucket: Bucket) -> list:
        lists = []
        for s in self.SPEC.states:
            if s.key not in bucket.state_lists:  # a loaded state_dict without this key: start the buffer now
                for p in bucket.params:
                    if s.key not in self.state[p]:
                        self.state[p][s.key] = self._new_state_buffer(group, p, s)
                bucket.state_lists[s.key] = [local_tensor(self.state[p][s.key]) for p in bucket.params]
                bucket.extra.pop("cpp_bucket", None)
            lists.append(bucket.state_lists[s.key])
        return lists

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        from fusedopt.ops import optim_step

        states = self._state_lists(group, bucket)
        hyper = self.SPEC.hyper_values(group)
        args = dict(lr=group["lr"], hyper=hyper, maximize=bool(group.get("maximize", False)),
                    grad_divisor=grad_divisor, found_inf=found_inf, write_back_grads=write_back_grads)  # fmt: skip
        # Eager fast path: the lists live in C++ and the grads are read there; torch.compile traces the op instead.
        if not torch.compiler.is_compiling():
            if "cpp_bucket" not in bucket.extra:
                bucket.extra["cpp_bucket"] = optim_step.cached_bucket(
                    self.SPEC, bucket.local_params, states, bucket.steps, backend=bucket.backend
                )
            cached = bucket.extra["cpp_bucket"]
            if cached is not None and optim_step.step_cached(self.SPEC, cached, **args):
                return
        optim_step.step(self.SPEC, bucket.local_params, grads, states, bucket.steps, backend=bucket.backend, **args)
