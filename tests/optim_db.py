"""The one table of optimizers the tests run: each entry names the fused class, its float64 reference and its
options. The parity, compile, AMP, CUDA-graph, max_grad_norm, distributed and ISA tests take their optimizers from
here, so a new optimizer is tested everywhere by adding one entry (test_optim_registry.py's contract test fails
when an optimizer of fusedopt.optim has none).

`grid` is every optimizer's parity grid (test_optim_registry.py runs it on every backend); `cases` are the few
configurations every cross-cutting family runs.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fusedopt


class PaperLion(torch.optim.Optimizer):
    """Lion as the paper writes it (Chen et al. 2023, Algorithm 2), plainly, for float64 references:
    c = beta1 * m + (1 - beta1) * g;  theta = theta - lr * (sign(c) + lambda * theta);  m = beta2 * m + (1 - beta2) * g.
    Written independently of fusedopt.reference.lion_step."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, foreach=None):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * g
                sign = torch.where(c.isnan(), c, torch.sign(c))  # NaN stays NaN (torch.sign gives 0)
                p.sub_(lr * (sign + wd * p))
                m.copy_(beta2 * m + (1 - beta2) * g)


class PaperLAMB(torch.optim.Optimizer):
    """LAMB as the paper writes it (You et al. 2019, Algorithm 2, phi = identity), with apex FusedLAMB's options,
    plainly, for float64 references; written independently of fusedopt.reference.lamb_step:
      g = clip(g);  g += wd * x (adam_w_mode=False);  m = beta1 m + beta3 g;  v = beta2 v + (1 - beta2) g^2;
      r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) (+ wd * x with adam_w_mode);
      x -= lr * (||x|| / ||r||) * r, the ratio 1 when a norm is 0, and 1 without weight decay unless use_nvlamb.
    The clip is the global 2-norm of every grad: fusedopt's folded max_grad_norm, clip_grad_norm_'s coefficient
    min(max / (norm + 1e-6), 1), applied as a float32 divisor 1 / coef as the fused kernels carry it."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False, *, maximize=False, foreach=None):  # fmt: skip
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay, "adam_w_mode": adam_w_mode, "grad_averaging": grad_averaging,
                    "use_nvlamb": use_nvlamb, "maximize": maximize}  # fmt: skip
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = {id(p): p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}
        divisor = None
        if self.max_grad_norm is not None and grads:
            norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()]))
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            divisor = coef.reciprocal().float().double()
            for g in grads.values():  # in place, as clip_grad_norm_ (and under GradScaler fusedopt's write-back)
                g.div_(divisor)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = -x.grad if group["maximize"] else x.grad
                state = self.state[x]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(x)
                    state["exp_avg_sq"] = torch.zeros_like(x)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if not group["adam_w_mode"]:
                    g = g + wd * x
                m.copy_(beta1 * m + beta3 * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                c1, c2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
                r = (m / c1) / ((v / c2).sqrt() + eps)
                if group["adam_w_mode"]:
                    r = r + wd * x
                ratio = 1.0
                if wd != 0 or group["use_nvlamb"]:
                    x_norm, r_norm = x.norm(), r.norm()
                    ratio = torch.where((x_norm != 0) & (r_norm != 0), x_norm / r_norm, 1.0)
                x.sub_(lr * ratio * r)


@dataclass(frozen=True)
class OptimInfo:
    name: str
    fused: type
    reference: type  # torch.optim class, or a float64 loop where torch has none
    op: str  # fusedopt::<op>
    cases: tuple  # configurations for the cross-cutting families (compile, AMP, clipping, graphs, distributed)
    # family -> its own cases, where a family must not run them all ("compile", "amp", "max_grad_norm",
    # "cuda_graphs", "distributed")
    family_cases: dict = field(default_factory=dict)
    grid: tuple = field(default=())  # full parity grid (engine-driven optimizers)
    grid_16bit: tuple | None = None  # the bf16/fp16 one-step grid; None: every 5th of `grid`
    matrices_only: bool = False  # takes 2-D params only (Muon): the registry tests use MATRIX_SHAPES
    # (kwargs, shape) -> the absolute precision of one step's update of such a param, where the update is computed
    # in lower precision than the param (Muon); see parity_steps.run_parity
    update_noise: Callable | None = None
    # family -> why the family cannot run this optimizer (and where its check runs instead); cases_for gives ()
    # family ("compile", "amp", "max_grad_norm", "cuda_graphs", "distributed", "int8", "stochastic_round") or
    # distributed kind ("fsdp2") -> why it cannot apply: the family leaves the optimizer out (cases_for gives nothing)
    # and says so; "fsdp2" runs a check that the optimizer refuses DTensor params instead (tests/dist_worker.py);
    # "int8" and "stochastic_round" run a check that the constructor refuses the option (ValueError)
    not_applicable: dict = field(default_factory=dict)

    def takes(self, *keywords: str) -> bool:
        """Whether the fused class's constructor takes every one of `keywords` (state_dtype, master_weights, ...)."""
        parameters = inspect.signature(self.fused.__init__).parameters
        return all(k in parameters for k in keywords)

    def cases_for(self, family: str | None) -> tuple:
        if family in self.not_applicable:
            return ()
        return self.family_cases.get(family, self.cases)

    def shapes(self, default: list, small: bool = False) -> list:
        """The param shapes of a parity run: `default`, or the matrices of a 2-D-only optimizer."""
        if not self.matrices_only:
            return default
        return MATRIX_SMALL_SHAPES if small else MATRIX_SHAPES

    def grid_for(self, dtype: torch.dtype) -> tuple:
        low = dtype in (torch.bfloat16, torch.float16)
        return (self.grid_16bit if self.grid_16bit is not None else self.grid[::5]) if low else self.grid


# 2-D params for the matrices-only optimizers: tall, wide, square, repeated shapes (one Newton-Schulz batch), empty.
MATRIX_SHAPES = [(33, 17), (17, 33), (8, 8), (8, 8), (0, 5), (1, 40), (40, 1), (8, 8)]
MATRIX_SMALL_SHAPES = [(9, 7), (7, 9), (9, 7), (0, 3)]  # for the Triton interpreter

# Why a family cannot take Muon's registry cases (see _MUON_1D).
_MUON_1D = (
    "the family's params include 1-D tensors (biases), which torch.optim.Muon rejects, and it builds torch's class "
    "with foreach=False, which torch.optim.Muon does not take; tests/test_muon.py runs this family's check for Muon "
    "on 2-D params"
)

# How far torch's own Newton-Schulz output (entries up to ~1) moves when one element of its bfloat16 input moves by
# one bfloat16 rounding: up to ~0.035 on these shapes (the quintic's slope ~3.4 at zero, over 5 iterations,
# amplifies the small singular directions). Wherever float32 or float16 rounding of the momentum moves an input
# element across a bfloat16 rounding boundary (a few elements per 20-step run; torch's own float32 run too), the
# update moves by lr * ratio times that: the precision of Muon's update below float64.
NS_INPUT_ROUNDING_SENSITIVITY = 2.0**-4


def muon_update_noise(kwargs: dict, shape) -> float:
    lr = float(kwargs.get("lr", 1e-3))
    if not shape[0] or not shape[1]:
        return 0.0
    ratio = fusedopt.optim.muon.adjusted_lr_ratio(kwargs.get("adjust_lr_fn"), shape)
    return lr * abs(ratio) * NS_INPUT_ROUNDING_SENSITIVITY


def _grid(keys_values: dict, cycle: list) -> tuple:
    """Every combination of keys_values, with the `cycle` configurations varied along it."""
    combos = itertools.product(*keys_values.values())
    return tuple({**dict(zip(keys_values, c)), **v} for c, v in zip(combos, itertools.cycle(cycle)))


# Adam's betas and eps, varied along its option grid.
ADAM_CYCLE = [{"lr": 0.02}, {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-3},
              {"lr": 0.003, "betas": (0.0, 0.5), "eps": 1e-6}]  # fmt: skip

# (momentum, dampening, nesterov) that torch's SGD accepts.
SGD_MOMENTA = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.8, 0.0, True)]

OPTIM_DB = (
    # Adam, AdamW, RMSprop and SGD: each family keeps the configurations it ran before the registry. Some others fail
    # test_amp's float32 tolerance with clipping, and were triaged as ill-conditioned, not wrong: fusedopt's
    # clip_grad_norm_ (and the folded clip) sums the norm in another order than torch's _foreach_norm, so the clip
    # coefficient differs in its last bit, and an element where g + wd * p nearly cancels (RMSprop with weight
    # decay: g / (sqrt((1 - alpha) g^2) + eps) is +-10 whatever g's size, until eps decides) or where AMSGrad's max
    # switches sides turns that bit into a 1e-4 relative difference. With torch's clip on both sides the cpu
    # backend matches them all; the plain-torch backend still differs there, from addcmul's order of rounding.
    OptimInfo("Adam", fusedopt.Adam, torch.optim.Adam, "adam_step",
              cases=({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 1e-2, "amsgrad": True, "maximize": True}),
              family_cases={"amp": ({"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},),
                            "max_grad_norm": ({"lr": 1e-2, "weight_decay": 0.01},),
                            "cuda_graphs": ({"lr": 1e-2, "weight_decay": 0.1},),
                            "distributed": ({"lr": 1e-2, "weight_decay": 0.1},)},
              grid=_grid({"weight_decay": [0.0, 0.1], "amsgrad": [False, True], "maximize": [False, True],
                          "decoupled_weight_decay": [False, True]}, ADAM_CYCLE)),
    OptimInfo("AdamW", fusedopt.AdamW, torch.optim.AdamW, "adam_step",
              cases=({"lr": 1e-2, "amsgrad": True},),
              family_cases={"compile": ({"lr": 1e-2, "weight_decay": 0.05},), "amp": ({"lr": 1e-2},)},
              grid=_grid({"weight_decay": [0.0, 0.1], "amsgrad": [False, True], "maximize": [False, True]},
                         ADAM_CYCLE)),
    OptimInfo("RMSprop", fusedopt.RMSprop, torch.optim.RMSprop, "rmsprop_step",
              cases=({"lr": 1e-2, "momentum": 0.5, "centered": True},),
              grid=_grid({"momentum": [0.0, 0.9], "centered": [False, True], "weight_decay": [0.0, 0.05],
                          "maximize": [False, True]},
                         [{"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}, {"lr": 3e-3, "alpha": 0.9, "eps": 1e-6},
                          {"lr": 2e-2, "alpha": 0.95, "eps": 1e-3}]),
              family_cases={"compile": ({"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 0.1},
                                        {"lr": 1e-2}),
                            "amp": ({"lr": 1e-3, "momentum": 0.5, "centered": True}, {"lr": 1e-3}),
                            "distributed": ({"lr": 1e-3, "momentum": 0.5, "centered": True},)}),
    OptimInfo("SGD", fusedopt.SGD, torch.optim.SGD, "sgd_step",
              cases=({"lr": 1e-2, "momentum": 0.9, "nesterov": True},),
              grid=tuple({"momentum": m, "dampening": d, "nesterov": n, "weight_decay": wd, "maximize": mx, "lr": lr}
                         for ((m, d, n), wd, mx), lr in zip(itertools.product(SGD_MOMENTA, [0.0, 0.05], [False, True]),
                                                            itertools.cycle([0.01, 0.003]))),
              family_cases={"compile": ({"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
                                        {"lr": 1e-2, "momentum": 0.5, "dampening": 0.3}, {"lr": 1e-2}),
                            "amp": ({"lr": 1e-2, "momentum": 0.9, "nesterov": True}, {"lr": 1e-2}),
                            "cuda_graphs": ({"lr": 1e-2, "momentum": 0.9, "nesterov": True}, {"lr": 1e-2})}),
    OptimInfo(
        "Adagrad", fusedopt.Adagrad, torch.optim.Adagrad, "adagrad_step",
        cases=(
            {"lr": 1e-1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
            {"lr": 1e-2, "maximize": True},
        ),
        # max_grad_norm's 16-bit check compares one step of folded vs plain clipping, where the plain path rounds
        # the clipped grad to 16 bits once more: `sum` = g^2 would double that rounding. A large initial
        # accumulator keeps it below one rounding of `sum` (and of the update).
        family_cases={"max_grad_norm": ({"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1,
                                         "initial_accumulator_value": 10.0},)},
        grid=_grid(
            {"weight_decay": [0.0, 0.1], "lr_decay": [0.0, 0.05], "maximize": [False, True]},
            [{"lr": 0.1, "eps": 1e-10, "initial_accumulator_value": 0.0},
             {"lr": 0.03, "eps": 1e-6, "initial_accumulator_value": 0.5},
             {"lr": 0.2, "eps": 1e-3, "initial_accumulator_value": 0.1}],
        ),
    ),
    OptimInfo(
        "Lion", fusedopt.Lion, PaperLion, "lion_step",
        cases=(
            {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
            {"lr": 3e-3, "betas": (0.95, 0.98), "maximize": True},
        ),
        # Under bf16 autocast the two models' grads differ by bf16 roundings (up to a few % per element) once their
        # params differ at all, and a sign update flips where c is near 0. Without weight decay the fused and the
        # paper's updates are the same float operations, the models stay identical, and the test stays exact.
        # GradScaler itself is tested in float64 in test_optim_registry.py.
        family_cases={"amp": ({"lr": 3e-3, "betas": (0.95, 0.98), "maximize": True},)},
        grid=_grid(
            {"weight_decay": [0.0, 0.1], "maximize": [False, True], "betas": [(0.9, 0.99), (0.0, 0.5), (1.0, 0.9)]},
            [{"lr": 1e-3}, {"lr": 3e-2}, {"lr": 1e-4}],
        ),
        # 16-bit inputs make exact ties likely when beta1 / (1 - beta1) is a short binary number: with beta1 = 0.9,
        # g = -9 m is exact in bf16 and beta1 m + (1 - beta1) g is exactly 0, so the sign is decided by how
        # 1 - beta1 and the interpolation round (float32 vs float64, fma or not): +-lr either way, a legitimate
        # difference.
        # beta1 = 0.93 keeps every tie at least ~1e-5 relative away from 0, far above float32's rounding.
        grid_16bit=_grid(
            {"weight_decay": [0.0, 0.1], "maximize": [False, True], "betas": [(0.93, 0.99), (0.0, 0.5), (1.0, 0.9)]},
            [{"lr": 1e-3}, {"lr": 3e-2}],
        )[::2],
    ),
    OptimInfo(
        "Muon", fusedopt.Muon, torch.optim.Muon, "muon_momentum_step",
        cases=({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 2e-2, "momentum": 0.5, "nesterov": False,
                                                   "adjust_lr_fn": "match_rms_adamw"}),
        grid=_grid(
            {"nesterov": [True, False], "weight_decay": [0.0, 0.1],
             "adjust_lr_fn": [None, "original", "match_rms_adamw", "spectral_unclamped"]},
            [{"lr": 1e-2}, {"lr": 3e-2, "momentum": 0.5, "ns_steps": 3},
             {"lr": 1e-3, "momentum": 0.0, "ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-4}],
        ),
        matrices_only=True,
        update_noise=muon_update_noise,
        not_applicable={"compile": _MUON_1D, "amp": _MUON_1D, "max_grad_norm": _MUON_1D,
                        "cuda_graphs": _MUON_1D},
    ),
    OptimInfo(
        "LAMB", fusedopt.LAMB, PaperLAMB, "lamb_step",
        # max_grad_norm=1.0 (apex's default, folded) is on in every case: the reference clips the same way.
        cases=(
            {"lr": 1e-2, "weight_decay": 0.1},
            {"lr": 3e-3, "betas": (0.8, 0.99), "adam_w_mode": False, "weight_decay": 0.05, "maximize": True},
        ),
        grid=_grid(
            {"weight_decay": [0.0, 0.1], "adam_w_mode": [True, False], "maximize": [False, True]},
            [{"lr": 1e-2},
             {"lr": 3e-2, "bias_correction": False, "use_nvlamb": True, "eps": 1e-8, "max_grad_norm": None},
             {"lr": 1e-3, "grad_averaging": False, "betas": (0.8, 0.99), "max_grad_norm": 5.0},
             {"lr": 2e-2, "betas": (0.0, 0.5), "eps": 1e-3, "use_nvlamb": True}],
        ),
        # FSDP2: the trust ratio needs each param's global norm, and the kernels see local shards.
        not_applicable={"fsdp2": "LAMB's trust ratio needs each param's global norm and fusedopt's kernels see "
                                 "FSDP2's local shards: LAMB raises NotImplementedError on DTensor params (checked)",
                        "int8": "the two-pass engine has no 8-bit state path (no lamb_step_q8): LAMB refuses "
                                "state_dtype with ValueError (checked in test_lowbit_errors.py)"},
    ),
    OptimInfo(
        "Adafactor", fusedopt.Adafactor, torch.optim.Adafactor, "adafactor_step",
        # Not on the spec engine (row and column factors, the update's RMS): its grid is in test_adafactor.py.
        cases=({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-2, "beta2_decay": -0.5, "d": 1.5, "maximize": True}),
        not_applicable={
            "fsdp2": "the row and column factors and the update's RMS need whole matrices, and fusedopt's kernels see "
                     "FSDP2's local shards: Adafactor raises NotImplementedError on DTensor params (checked)",
            # test_max_grad_norm's one-step 16-bit check (folded clip vs clip_grad_norm_ then step)
            "int8": "fusedopt::adafactor_step has no 8-bit path for its factored states: Adafactor refuses "
                    "state_dtype with ValueError (checked in test_lowbit_errors.py)",
            "stochastic_round": "fusedopt::adafactor_step stores params by round-to-nearest (not on the spec engine): "
                                "Adafactor refuses bf16_stochastic_round=True with ValueError (checked in "
                                "test_stochastic_round.py)",
            "max_grad_norm_16bit": "at step 1 the factors and variance are g^2 itself (weight 1^beta2_decay = 1), "
                                   "stored in 16 bits; the plain path squares a grad already rounded by 16-bit "
                                   "clipping (torch rounds the coefficient to 16 bits too), the fold does not: 2-3 "
                                   "roundings apart, not one (float32/float64 run)",
        },
    ),
)  # fmt: skip

BY_NAME = {info.name: info for info in OPTIM_DB}
ENGINE_DRIVEN = tuple(info for info in OPTIM_DB if info.grid)


def cases(family: str | None = None) -> list:
    """(fused class, reference class, kwargs) for every case of every optimizer in `family`."""
    return [(i.fused, i.reference, kw) for i in OPTIM_DB for kw in i.cases_for(family)]


def first_cases(family: str | None = None) -> list:
    """One (fused class, reference class, kwargs) per optimizer: its first case in `family`."""
    return [(i.fused, i.reference, i.cases_for(family)[0]) for i in OPTIM_DB if i.cases_for(family)]


def one_case_per_op(family: str | None = None) -> list:
    """The first case of one optimizer per op (AdamW shares Adam's op): for the slow families (inductor)."""
    seen, out = set(), []
    for i in OPTIM_DB:
        if i.op not in seen and i.cases_for(family):
            seen.add(i.op)
            out.append((i.fused, i.reference, i.cases_for(family)[0]))
    return out


def info_of(cls) -> OptimInfo:
    return next(i for i in OPTIM_DB if i.fused is cls)


def op_of(cls) -> str:
    return next(i.op for i in OPTIM_DB if i.fused is cls)


def case_id(x) -> str:
    if isinstance(x, type):
        return x.__name__
    return "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else ""
