"""One spec per optimizer: its state lists (and when each exists), hyperparameters and per-tensor scalar. From the
spec come the op's schema (fusedopt/ops/optim_step.py), the state creation and the bucket's list order
(SpecOptimizerMixin below); the kernels of every backend take the same arguments:

    <op>_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round, masters)

with `states` the spec's lists in order (an unused one empty), `scalars` the steps or first-step flags, and `hyper`
a {name: float or bool} dict the C++ bindings fill their struct from by name (csrc/common/optim_binding.h), and
`stochastic_round` None or an int64 [seed, counter] tensor (bf16 params stored by stochastic rounding), and
`masters` empty or one float32 master / int16 remainder per 16-bit param (docs/MASTER_WEIGHTS.md; the states are
then float32).
docs/ADDING_AN_OP.md is the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedopt.optim._base import Bucket, local_tensor
from fusedopt.optim._lowbit import LowBitStateMixin
from fusedopt.optim._master import MasterWeightsMixin


@dataclass(frozen=True)
class StateSpec:
    key: str  # torch's state key ("sum", "exp_avg")
    list_name: str  # the op's list: schema argument and error messages ("state_sums", "exp_avgs")
    fill: str | None = None  # group key whose value starts a new buffer (Adagrad's initial_accumulator_value)
    # hyper -> whether the state exists (Adam's max_exp_avg_sq: amsgrad); None: always. The C++ twin is
    # Op::uses_state; an unused list is passed empty and never read.
    when: Callable[[dict], bool] | None = None
    # The low-bit map of the state (state_dtype="int8" / "int4", docs/LOW_BIT_STATES.md): signed for first moments
    # (exp_avg, momentum_buffer, grad_avg), unsigned for second moments (exp_avg_sq, max_exp_avg_sq, square_avg, sum).
    signed: bool = True


SCALAR_LISTS = {"step": "steps", "first_flag": "first_flags"}


@dataclass(frozen=True)
class OptimizerSpec:
    op: str  # the op is fusedopt::<op>_step; kernels <op>_step on every backend
    hyper: tuple  # the kernel's hyperparameters, by name, in the C++ struct's order
    states: tuple  # StateSpec, in list order
    # The per-tensor float32 scalar: "step" (torch's state 'step', incremented by the engines before the update),
    # "first_flag" (nonzero on a tensor's first step, cleared by the engines after it: SGD), or None.
    scalar: str | None
    flags: tuple = ()  # the names of `hyper` that are bools (`bool name` in the schema)
    # group -> {hyper name: value}; None: group[name] for each name.
    hyper_of: Callable[[dict], dict] | None = None
    serves_masters: bool = True  # False: the op refuses master weights (C++: Op::kServesMasters)

    @property
    def has_step(self) -> bool:
        return self.scalar == "step"

    @property
    def scalar_list(self) -> str | None:
        return SCALAR_LISTS.get(self.scalar)

    def hyper_values(self, group: dict) -> dict:
        if self.hyper_of is not None:
            return self.hyper_of(group)
        return {name: bool(group[name]) if name in self.flags else float(group[name]) for name in self.hyper}

    def used_states(self, hyper: dict) -> tuple:
        return tuple(s.when is None or bool(s.when(hyper)) for s in self.states)

    def schema(self) -> str:
        lists = ["params", "grads", *(s.list_name for s in self.states), self.scalar_list or "steps"]
        alias = "abcdefghijklmnopqrstuvwxyz"
        args = [f"Tensor({alias[i]}!)[] {name}" for i, name in enumerate(lists)]
        args += ["float lr", "Tensor? lr_tensor"]
        args += [f"{'bool' if h in self.flags else 'float'} {h}" for h in self.hyper]
        args += ["bool maximize", "Tensor? grad_divisor", "Tensor? found_inf", "bool write_back_grads",
                 "Tensor? stochastic_round", "Tensor(z!)[] masters", "str backend"]
        return f"{self.op}_step({', '.join(args)}) -> ()"

    def schema_q8(self) -> str:
        """<op>_step_q8: the state lists become codes and absmax lists (docs/LOW_BIT_STATES.md), plus one map per
        state and the format's name (state_dtype: "int8", "int4" or "fp8"); `masters` as in <op>_step."""
        lists = ["params", "grads", *(f"{s.list_name}_codes" for s in self.states),
                 *(f"{s.list_name}_absmax" for s in self.states)]  # fmt: skip
        args = [f"Tensor(m{i}!)[] {name}" for i, name in enumerate(lists)]
        args += ["Tensor[] qmaps", "str state_dtype", f"Tensor(s!)[] {self.scalar_list or 'steps'}", "float lr",
                 "Tensor? lr_tensor"]
        args += [f"{'bool' if h in self.flags else 'float'} {h}" for h in self.hyper]
        args += ["bool maximize", "Tensor? grad_divisor", "Tensor? found_inf", "bool write_back_grads",
                 "Tensor? stochastic_round", "Tensor(z!)[] masters", "str backend"]
        return f"{self.op}_step_q8({', '.join(args)}) -> ()"


class SpecOptimizerMixin(MasterWeightsMixin, LowBitStateMixin):
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

    def _load_state_dict(self, state_dict: dict) -> None:
        super()._load_state_dict(state_dict)
        # MasterWeightsMixin puts a master-weight param's float32 states back after LowBitStateMixin converted the
        # loaded ones (torch had cast them to the param's dtype): a quantized param's are quantized now, from float32.
        self._convert_states()

    def _new_state_buffer(self, group: dict, p, spec: StateSpec):
        dtype = self._full_precision_state_dtype(group, p)  # float32 beside a master
        if spec.fill is None:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.full_like(p, group[spec.fill], dtype=dtype, memory_format=torch.preserve_format)

    def _init_state(self, group, p, state):
        if self.SPEC.has_step:
            state["step"] = self._new_step_tensor(p)
        quantized = self._quantized_state(group, p)
        for s, used in zip(self.SPEC.states, self.SPEC.used_states(self.SPEC.hyper_values(group))):
            if used and quantized:
                self._new_q8_state(group, p, s, state)
            elif used:
                state[s.key] = self._new_state_buffer(group, p, s)

    def _state_lists(self, group, bucket: Bucket, used: tuple) -> list:
        """The op's state lists, an unused one empty. A used buffer that does not exist yet (switched on after the
        state was made, e.g. amsgrad, or missing from a loaded state_dict) starts now."""
        lists = []
        for s, on in zip(self.SPEC.states, used):
            if on and s.key not in bucket.state_lists:
                for p in bucket.params:
                    if s.key not in self.state[p]:
                        self.state[p][s.key] = self._new_state_buffer(group, p, s)
                bucket.state_lists[s.key] = [local_tensor(self.state[p][s.key]) for p in bucket.params]
                bucket.extra.pop("cpp_buckets", None)
            lists.append(bucket.state_lists[s.key] if on else [])
        return lists

    def _scalars(self, group, bucket: Bucket) -> list:
        """The per-tensor scalar list: the steps, or none (SGD gives its first-step flags)."""
        return bucket.steps if self.SPEC.has_step else []

    def _step_bucket(self, group, bucket: Bucket, grads, grad_divisor, found_inf, *, write_back_grads):
        from fusedopt.ops import optim_step

        hyper = self.SPEC.hyper_values(group)
        used = self.SPEC.used_states(hyper)
        args = dict(lr=group["lr"], hyper=hyper, maximize=bool(group.get("maximize", False)),
                    grad_divisor=grad_divisor, found_inf=found_inf, write_back_grads=write_back_grads,
                    stochastic_round=self._stochastic_round_state(bucket))  # fmt: skip
        masters = self._masters(group, bucket)  # first: making them turns the states float32
        if bucket.quantized:  # int8 / int4 / fp8 states (fusedopt/optim/_lowbit.py)
            codes, absmax = self._q8_lists(group, bucket, used)
            scalars = self._scalars(group, bucket)
            lists, state_dtype = [*codes, *absmax], group["state_dtype"]
            make = lambda: optim_step.cached_bucket(self.SPEC, bucket.local_params, lists, scalars,
                                                    backend=bucket.backend, state_dtype=state_dtype)  # fmt: skip
            if not self._step_cached(bucket, ("q8", used), masters, scalars, make, args):
                optim_step.step_q8(self.SPEC, bucket.local_params, grads, codes, absmax, scalars, masters=masters,
                                   backend=bucket.backend, state_dtype=state_dtype, **args)  # fmt: skip
            return
        states = self._state_lists(group, bucket, used)
        scalars = self._scalars(group, bucket)
        make = lambda: optim_step.cached_bucket(self.SPEC, bucket.local_params, states, scalars, backend=bucket.backend)
        if self._step_cached(bucket, used, masters, scalars, make, args):
            return
        optim_step.step(self.SPEC, bucket.local_params, grads, states, scalars, masters=masters, backend=bucket.backend,
                        **args)  # fmt: skip

    def _step_cached(self, bucket: Bucket, key, masters, scalars, make, args: dict) -> bool:
        """The eager fast path: the bucket's lists live in C++ (made by `make` once per `key`: the used-state mask)
        and the grads are read there; True if it stepped. torch.compile traces the op instead; first-step flags live
        for one step and master weights are not held there, so those steps take the list path, as do DTensor
        params: the C++ bucket reads grads from the local shards, which hold none."""
        if masters or (self.SPEC.scalar == "first_flag" and scalars) or torch.compiler.is_compiling():
            return False
        if bucket.local_params and bucket.local_params[0] is not bucket.params[0]:  # DTensor params
            return False
        from fusedopt.ops import optim_step

        cpp_buckets = bucket.extra.setdefault("cpp_buckets", {})
        if key not in cpp_buckets:
            cpp_buckets[key] = make()
        cached = cpp_buckets[key]
        return cached is not None and optim_step.step_cached(self.SPEC, cached, **args)
