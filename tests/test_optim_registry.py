"""The engine-driven optimizers of tests/optim_db.py (Adagrad, Lion) against their float64 references on every
backend that runs here, over their whole option grids, and the contract that keeps the registry complete: every
optimizer of fusedopt.optim has an entry, an op, a kernel on every backend and a reference."""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_DTYPES, cpu_backends
from optim_db import ENGINE_DRIVEN, OPTIM_DB, case_id
from parity_steps import SHAPES, SHAPES_GPU, SMALL_SHAPES, compare, make_params, run_parity, set_grads

import fusedopt
from fusedopt import _backend, reference, reference_optim
from fusedopt.ops import optim_step

BACKENDS = cpu_backends()
FAST = [b for b in BACKENDS if b != "triton"]
GRID_CASES = [pytest.param(i, kw, id=f"{i.name}-{case_id(kw)}") for i in ENGINE_DRIVEN for kw in i.grid]
LOW = torch.bfloat16
FEW_CASES = [pytest.param(i, kw, id=f"{i.name}-{case_id(kw)}") for i in ENGINE_DRIVEN for kw in i.grid_for(LOW)]
INFOS = [pytest.param(i, id=i.name) for i in ENGINE_DRIVEN]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("info", "kwargs"), GRID_CASES)
def test_grid_float64_float32(info, kwargs, backend):
    for dtype in (torch.float64, torch.float32):
        run_parity(info.fused, info.reference, kwargs, dtype, backend, steps=20, shapes=info.shapes(SHAPES),
               update_noise=info.update_noise)  # fmt: skip


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("info", "kwargs"), FEW_CASES)
def test_grid_16bit_one_step(info, kwargs, dtype, backend):
    run_parity(info.fused, info.reference, kwargs, dtype, backend, steps=20, shapes=info.shapes(SHAPES),
               update_noise=info.update_noise)  # fmt: skip


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("info", INFOS)
def test_triton_small(info, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable on CPU tensors here")
    grid = info.grid_for(dtype)
    for kwargs in (grid[0], grid[-1]):
        run_parity(info.fused, info.reference, kwargs, dtype, "triton", steps=20,
                   shapes=info.shapes(SMALL_SHAPES, small=True), update_noise=info.update_noise)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS)
def test_tensor_lr(info, backend):
    kwargs = {**info.cases[0], "lr": torch.tensor(info.cases[0]["lr"], dtype=torch.float64)}
    shapes = info.shapes(SMALL_SHAPES, small=True) if backend == "triton" else info.shapes(SHAPES)
    run_parity(info.fused, info.reference, kwargs, torch.float64, backend, steps=20, shapes=shapes,
               update_noise=info.update_noise)  # fmt: skip


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("direction", ["fused_to_reference", "reference_to_fused"])
@pytest.mark.parametrize("info", INFOS)
def test_state_dict_round_trip(info, direction, backend):
    kwargs = info.cases[0]
    opt_f, opt_r, fused, ref = run_parity(info.fused, info.reference, kwargs, torch.float64, backend, 10,
                                          shapes=info.shapes(SHAPES), update_noise=info.update_noise)  # fmt: skip
    if direction == "fused_to_reference":
        new_r = info.reference(ref, **kwargs)
        new_r.load_state_dict(copy.deepcopy(opt_f.state_dict()))
        opt_r, new_f = new_r, opt_f
    else:
        new_f = info.fused(fused, backend=backend, **kwargs)
        new_f.load_state_dict(copy.deepcopy(opt_r.state_dict()))
    gen = torch.Generator().manual_seed(7)
    for s in range(10):
        set_grads(fused, ref, gen, s)
        new_f.step()
        opt_r.step()
    compare(new_f, opt_r, fused, ref, torch.float64, f"after state_dict {direction}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("info", INFOS)
def test_grad_scaler_inf_skip(info, backend):
    """GradScaler: unscale and inf-skip in the kernel match the reference's unscale_ + skipped step, and .grad is
    left unscaled as torch's fused optimizers leave it."""
    kwargs = info.cases[0]
    fused, ref = make_params(info.shapes([(5,), (300,)], small=True), torch.float64)
    opt_f = info.fused(fused, backend=backend, **kwargs)
    opt_r = info.reference(ref, **kwargs)
    sc_f, sc_r = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for s in range(20):
        set_grads(fused, ref, gen, s, none_every=0, scale=sc_f.get_scale())
        for r, f in zip(ref, fused):
            r.grad = f.grad.detach().clone()
        if s in (0, 4, 5):  # the first step too: no state may move, 'step' included
            fused[1].grad.view(-1)[7] = float("inf") if s != 5 else float("nan")
            ref[1].grad.view(-1)[7] = fused[1].grad.view(-1)[7]
        for sc in (sc_f, sc_r):
            sc.scale(torch.ones(()))
        sc_f.step(opt_f)
        sc_r.step(opt_r)
        sc_f.update()
        sc_r.update()
        assert sc_f.get_scale() == sc_r.get_scale()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"scaler step {s}", skipped_first=True)
        if s not in (0, 4, 5):
            for i, (f, r) in enumerate(zip(fused, ref)):
                torch.testing.assert_close(f.grad, r.grad, msg=f"step {s}: .grad {i} not unscaled as torch's")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS)
def test_non_contiguous_and_repeated_params(info, backend):
    """A strided view param and a param listed twice in its group (stepped twice, as torch's loop does)."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    other = torch.randn((5, 7) if info.matrices_only else (37,), generator=gen, dtype=torch.float64)
    fused = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(other.clone())]
    ref = [torch.nn.Parameter(base.clone().t().contiguous()), torch.nn.Parameter(other.clone())]
    with pytest.warns(UserWarning, match="duplicate"):
        opt_f = info.fused([fused[0], fused[1], fused[1]], backend=backend, **info.cases[0])
        opt_r = info.reference([ref[0], ref[1], ref[1]], **info.cases[0])
    for s in range(6):
        set_grads(fused, ref, gen, s, none_every=0)
        opt_f.step()
        opt_r.step()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"step {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_sign_of_zero_and_nan(backend):
    """sign(0) = 0: a zero grad on a zero momentum moves a param by its weight decay alone (+-0 alike); a NaN grad
    makes that element's update, param and momentum NaN (torch.sign(NaN) is 0, which would freeze the element
    silently; a copysign would step by lr)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    opt = fusedopt.Lion([p], lr=0.1, weight_decay=0.5, backend=backend)
    p.grad = torch.tensor([0.0, -0.0, float("nan"), 2.0], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([1.0 * 0.95, -2.0 * 0.95, float("nan"), 0.5 * 0.95 - 0.1], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, equal_nan=True, rtol=1e-15, atol=0)
    m = opt.state[p]["exp_avg"]
    torch.testing.assert_close(m, torch.tensor([0.0, 0.0, float("nan"), 0.02], dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("backend", FAST)
def test_adagrad_matches_torch_fused_cpu(backend):
    """torch's fused Adagrad (CPU only) is the peer the bench measures: the same trajectory."""
    kwargs = {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}
    fused_ref = lambda params, **kw: torch.optim.Adagrad(params, fused=True, **kw)
    run_parity(fusedopt.Adagrad, fused_ref, kwargs, torch.float64, backend, steps=20)


def test_adagrad_state_after_construction():
    """torch.optim.Adagrad makes its state in __init__: so does fusedopt's, with 'step' on the param's device."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedopt.Adagrad([p], initial_accumulator_value=0.25, backend="torch")
    assert set(opt.state[p]) == {"step", "sum"}
    assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 0.0
    assert torch.equal(opt.state[p]["sum"], torch.full((3,), 0.25))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -1.0}, "Invalid learning rate"), ({"betas": (0.9, 1.5)}, "Invalid betas"),
     ({"weight_decay": -0.1}, "Invalid weight_decay"), ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
     ({"backend": "nope"}, "unknown backend")],
)  # fmt: skip
def test_lion_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.Lion([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("info", INFOS)
def test_boundary_errors_same_on_every_backend(info):
    """A state list with a wrong shape, and one with a missing tensor: every backend raises the same message."""
    spec = info.fused.SPEC
    params = [torch.randn(4, 2), torch.randn(3)]
    grads = [torch.randn_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params] if spec.scalar == "step" else []
    one = torch.nn.Parameter(torch.ones(1, 1) if info.matrices_only else torch.ones(1))
    defaults = info.fused([one], backend="torch").defaults
    hyper = spec.hyper_values({**defaults, **info.cases[0]})  # cases[0] uses the first state list
    bad_lists = {
        "has shape [4], its param [4, 2]": [torch.zeros(4), torch.zeros(3)],
        "has 1 tensors, params has 2": [torch.zeros(4, 2)],
    }
    for match, bad in bad_lists.items():
        for backend in BACKENDS:
            name = spec.states[0].list_name
            message = f"fusedopt {spec.op}_step ({backend}): {name}"
            message += "[0] " + match if "shape" in match else " " + match
            with pytest.raises(RuntimeError) as err:
                others = [[torch.zeros_like(p) for p in params] for _ in spec.states[1:]]
                optim_step.step(spec, params, grads, [bad, *others], steps, lr=0.1, hyper=hyper, maximize=False,
                                backend=backend)  # fmt: skip
            assert message in str(err.value), f"{backend}: {err.value}"


# With masters: the ops that serve them (test_master_weights.py checks the others refuse them).
_OPCHECK = [pytest.param(p.values[0], None, id=p.id) for p in INFOS] + [
    pytest.param(p.values[0], "fp32", id=f"{p.id}-masters") for p in INFOS if p.values[0].fused.SPEC.serves_masters
]


@pytest.mark.parametrize("info,masters", _OPCHECK)
def test_op_passes_opcheck(info, masters):
    """The op's schema, fake kernel and aliasing; with masters, on bf16 params beside float32 states and masters."""
    spec = info.fused.SPEC
    gen = torch.Generator().manual_seed(21)
    dtype = torch.bfloat16 if masters else torch.float32
    ps = lambda: [torch.randn(n, generator=gen).to(dtype) for n in (5, 300)]
    states = [[torch.rand(n, generator=gen) for n in (5, 300)] for _ in spec.states]
    scalars = [torch.zeros(()) for _ in range(2)] if spec.scalar == "step" else [torch.ones(()) for _ in range(2)]
    hyper = [True if h in spec.flags else 0.1 for h in spec.hyper]  # every optional state list in use
    params = ps()
    master_list = [p.float() for p in params] if masters else []
    args = (params, ps(), *states, scalars, 0.01, None, *hyper, True, torch.tensor(2.0), torch.tensor(0.0), True,
            None, master_list, "cpu")  # fmt: skip
    result = torch.library.opcheck(getattr(torch.ops.fusedopt, f"{spec.op}_step").default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_lower_isa_parity(capability):
    """The per-ISA CPU copies of the engine: a lower ISA forced in a subprocess, every engine-driven optimizer."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "from optim_db import ENGINE_DRIVEN\n"
        "from parity_steps import SHAPES, run_parity\n"
        "from fusedopt import _backend\n"
        f"assert _backend.cpu_extension()[0].cpu_capability() == {capability!r}\n"
        "for info in ENGINE_DRIVEN:\n"
        "    for dtype in (torch.float32, torch.float64, torch.bfloat16):\n"
        "        for kw in info.grid_for(dtype)[::3]:\n"
        "            run_parity(info.fused, info.reference, kw, dtype, 'cpu', steps=20, shapes=info.shapes(SHAPES),\n"
        "                       update_noise=info.update_noise)\n"
    )
    env = {**os.environ, "FUSEDOPT_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


# --- the contract: the registry, the specs and the backends agree ----------------------------------------------
def test_every_optimizer_has_a_registry_entry():
    names = [n for n in fusedopt.optim.__all__ if isinstance(getattr(fusedopt.optim, n), type)]  # not functions
    classes = {getattr(fusedopt.optim, n) for n in names}
    assert classes == {i.fused for i in OPTIM_DB}, "add the optimizer to tests/optim_db.py"
    for name in names:
        assert getattr(fusedopt, name) is getattr(fusedopt.optim, name), f"fusedopt.{name} is not exported"


def _specs(info) -> list:
    return [
        pytest.param(info, spec, id=f"{info.name}-{spec.op}") for spec in (info.fused.SPEC, *info.fused.EXTRA_SPECS)
    ]


@pytest.mark.parametrize(("info", "spec"), [p for i in ENGINE_DRIVEN for p in _specs(i)])
def test_every_engine_optimizer_has_every_backend(info, spec):
    assert hasattr(torch.ops.fusedopt, f"{spec.op}_step"), "op not registered"
    ext = _backend.cpu_extension()[0]
    assert spec.op in ext.optimizer_info, "not in FUSEDOPT_FOR_EACH_OPTIMIZER (csrc/common/optimizers.h)"
    hyper = [f"{h}:bool" if h in spec.flags else h for h in spec.hyper]
    assert ext.optimizer_info[spec.op] == (hyper, [s.list_name for s in spec.states], spec.scalar_list), (
        "csrc/common/<op>_math.h (Hyper::fields, kStateNames, kScalar) disagrees with the spec"
    )
    assert callable(getattr(ext, f"{spec.op}_step")) and callable(getattr(ext, f"{spec.op}_step_bucket"))
    triton_module = importlib.import_module(f"fusedopt.triton_kernels.{spec.op}")
    assert spec.hyper == triton_module.HYPER, "the Triton kernel's hyperparameter order differs from the spec"
    assert callable(getattr(triton_module, f"{spec.op}_step"))
    assert f"def {spec.op}_step(" in inspect.getsource(reference_optim), "no reference in fusedopt/reference_optim.py"
    assert getattr(reference, f"{spec.op}_step") is getattr(reference_optim, f"{spec.op}_step"), "not re-exported"
    assert (ROOT / "csrc" / "common" / f"{spec.op}_math.h").exists()
    assert info.grid and info.cases, "registry entry without a grid or cases"


FAMILIES = ("compile", "amp", "max_grad_norm", "cuda_graphs", "distributed")


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIM_DB])
def test_every_family_runs_or_says_why_not(info):
    """Each cross-cutting family runs an optimizer's cases, or the registry gives the reason it cannot apply."""
    for family in FAMILIES:
        reason = info.not_applicable.get(family, "")
        assert bool(info.cases_for(family)) != bool(reason), f"{info.name}: {family} has neither cases nor a reason"
    for key, reason in info.not_applicable.items():
        known = (*FAMILIES, "fsdp2", "max_grad_norm_16bit", "int8", "stochastic_round")
        assert key in known and len(reason) > 30, f"{info.name}: {key}: give the reason in words"


def test_all_kernels_inc_is_generated_from_the_glob():
    from fusedopt import _build

    text = (ROOT / "csrc" / "cpu" / "capability" / "all_kernels.inc").read_text()
    assert text == _build.all_kernels_inc(), "run setup.py (it regenerates csrc/cpu/capability/all_kernels.inc)"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("info", "kwargs"), FEW_CASES)
def test_parity_gpu(info, kwargs, dtype, backend):
    run_parity(info.fused, info.reference, kwargs, dtype, backend, steps=20, shapes=info.shapes(SHAPES_GPU),
               device="cuda", update_noise=info.update_noise)  # fmt: skip
