"""bf16_stochastic_round=True: bf16 params stored by stochastic rounding inside every optimizer's fused kernel.

The random bits are a hash of (seed, step counter, tensor position, element index) written once per backend
(csrc/common/stochastic_round.h, triton_kernels/optim_engine.py, fusedopt/reference_optim.py), so the cpu and torch
backends agree bit for bit; Triton under the interpreter converts the bf16 *state* by truncation, not to nearest,
so it is compared after one step and held to one bf16 rounding. The rounding itself is checked for unbiasedness,
and the reason the mode exists is shown: with updates below half a bf16 ulp, plain bf16 AdamW never moves while
stochastic rounding tracks the float32 run; on examples/finetune_gpt.py's tiny GPT, plain bf16 AdamW's loss stays
visibly above the float32 run's while stochastic rounding follows it.
"""

from __future__ import annotations

import re

import gloo
import pytest
import torch
from conftest import cpu_backends
from optim_db import OPTIM_DB
from parity_steps import make_params, set_grads

import fusedopt
from fusedopt.ops import optim_step
from fusedopt.reference import stochastic_round_bf16

# The optimizers that take the keyword (Muon does not yet); those that take it and cannot serve it refuse it.
_TAKES = [i for i in OPTIM_DB if i.takes("bf16_stochastic_round")]
INFOS = [pytest.param(i, id=i.name) for i in _TAKES if "stochastic_round" not in i.not_applicable]
REFUSING = [pytest.param(i, id=i.name) for i in _TAKES if "stochastic_round" in i.not_applicable]
SHAPES = [(), (0,), (3,), (33, 17), (1100,)]


def _run(info, backend, seed=5, steps=6, shapes=SHAPES):
    fused, ref = make_params(shapes, torch.bfloat16)
    opt = info.fused(fused, backend=backend, bf16_stochastic_round=True, stochastic_round_seed=seed, **info.cases[0])
    gen = torch.Generator().manual_seed(3)
    for s in range(steps):
        set_grads(fused, ref, gen, s)
        opt.step()
    return opt, fused


def _bits(t):
    return t.detach().contiguous().view(torch.int16)


@pytest.mark.parametrize("info", INFOS)
def test_cpu_and_torch_backends_agree_bit_for_bit(info):
    opt_c, ps_c = _run(info, "cpu")
    opt_t, ps_t = _run(info, "torch")
    for i, (a, b) in enumerate(zip(ps_c, ps_t)):
        assert torch.equal(_bits(a), _bits(b)), f"param {i}"
        for key, value in opt_t.state[b].items():
            assert torch.equal(opt_c.state[a][key], value), f"param {i} {key}"


@pytest.mark.parametrize("info", INFOS)
def test_triton_within_one_rounding(info):
    if "triton" not in cpu_backends():
        pytest.skip("triton is not usable on CPU tensors here")
    shapes = [(), (3,), (9, 7), (130,)]
    _, ps_c = _run(info, "cpu", shapes=shapes, steps=1)  # one step: the states have not rounded apart yet
    _, ps_r = _run(info, "triton", shapes=shapes, steps=1)
    for i, (a, b) in enumerate(zip(ps_c, ps_r)):
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")


def test_reproducible_and_seeded():
    info = next(i for i in OPTIM_DB if i.name == "AdamW")
    a, b, c = (_run(info, "cpu", seed=s)[1] for s in (5, 5, 6))
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    assert not all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, c)), "the seed does not change the rounding"


RESUME_CASES = [pytest.param(i.values[0], sd, id=f"{i.id}-{sd}") for i in INFOS for sd in (None, "int8")
                if sd is None or "int8" not in i.values[0].not_applicable]  # fmt: skip


@pytest.mark.parametrize(("info", "state_dtype"), RESUME_CASES)
def test_resumed_run_continues_the_random_stream(info, state_dtype):
    """A state_dict carries each bucket's counter (stochastic_round_counters, a group key): 3 steps, save, load into
    a new optimizer, 3 steps give the bits of 6 uninterrupted steps (before, the loaded streams restarted at 0)."""
    import copy

    kw = {"bf16_stochastic_round": True, "stochastic_round_seed": 5, "state_dtype": state_dtype, **info.cases[0]}
    shapes = [*SHAPES, (80, 64)]  # (80, 64): quantized under int8
    runs = []
    for resume in (False, True):
        fused, ref = make_params(shapes, torch.bfloat16)
        opt = info.fused(fused, backend="cpu", **kw)
        gen = torch.Generator().manual_seed(3)
        for s in range(6):
            if resume and s == 3:
                saved = copy.deepcopy(opt.state_dict())
                fused = [p.detach().clone().requires_grad_() for p in fused]
                opt = info.fused(fused, backend="cpu", **kw)
                opt.load_state_dict(saved)
            set_grads(fused, ref, gen, s)
            opt.step()
        runs.append((opt, fused))
    (whole, whole_params), (resumed, resumed_params) = runs
    for i, (p, q) in enumerate(zip(whole_params, resumed_params)):
        assert torch.equal(_bits(p), _bits(q)), f"param {i}"
        for k, v in whole.state[p].items():
            assert torch.equal(resumed.state[q][k], v), f"param {i} {k}"


def test_live_groups_hold_an_empty_counters_key(tmp_path):
    """Each live group holds stochastic_round_counters as an empty placeholder (DCP's flattened optimizer
    state_dict loads only the group keys the live optimizer has: without it the counters were dropped, 2 ranks in
    tests/master_dist_worker.py); state_dict() alone fills it. A DCP checkpoint saved without the mode loads into an
    optimizer with it under allow_partial_load (the counters then start new streams); DCP's default planner refuses
    the missing key."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from fusedopt.optim._base import ROUND_COUNTERS

    dcp, dsd = gloo.dcp_modules()
    runs = []
    for mode in (False, True):
        model = torch.nn.Linear(16, 8).to(torch.bfloat16)
        runs.append((model, fusedopt.optim.AdamW(model.parameters(), bf16_stochastic_round=mode)))
        model(torch.ones(2, 16, dtype=torch.bfloat16)).float().sum().backward()
        runs[-1][1].step()
        assert (ROUND_COUNTERS in runs[-1][1].param_groups[0]) == mode
    (plain_model, plain), (_, rounding) = runs
    assert rounding.state_dict()["param_groups"][0][ROUND_COUNTERS] == {"0:0,1": 1}
    assert rounding.param_groups[0][ROUND_COUNTERS] == {}
    rounding.load_state_dict(rounding.state_dict())
    assert rounding.param_groups[0][ROUND_COUNTERS] == {}
    flat = dsd.StateDictOptions(flatten_optimizer_state_dict=True)
    gloo.save_checkpoint(plain_model, plain, str(tmp_path), flat)
    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt = fusedopt.optim.AdamW(model.parameters(), bf16_stochastic_round=True)
    missing = "Missing key in checkpoint state_dict: optim.param_groups.weight.stochastic_round_counters.0:0,1"
    with pytest.raises(CheckpointException, match=re.escape(missing)):
        gloo.load_checkpoint(model, opt, str(tmp_path), flat)
    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt, options=flat)}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    dsd.set_optimizer_state_dict(model, opt, state["optim"], options=flat)
    assert torch.equal(opt.state[model.weight]["exp_avg"], plain.state[plain_model.weight]["exp_avg"])


def test_rounding_is_unbiased_and_exact_values_stay():
    state = torch.tensor([11, 4])
    for value, below in ((1.0 + 2**-10, 1.0), (-3.0 - 2**-6, -3.0), (1e-30 * 1.3, None)):
        x = torch.full((200_000,), value, dtype=torch.float32)
        y = stochastic_round_bf16(x, state, 0).float()
        assert abs(y.mean().item() - value) < 2e-3 * abs(value), value  # E[round(x)] = x
        if below is not None:
            up = (y != below).float().mean().item()
            frac = (value - below) / (y[y != below][0].item() - below)
            assert abs(up - frac) < 0.01, (value, up, frac)
    exact = torch.randn(1000).bfloat16().float()  # already bf16: never moves
    assert torch.equal(stochastic_round_bf16(exact, state, 3).float(), exact)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = stochastic_round_bf16(special, state, 0).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and (out[3:] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_small_updates_move_bf16_params_only_with_stochastic_rounding(backend):
    """Updates of 1e-3 on params at 1 (bf16 spacing 2^-8 below 1): round-to-nearest drops every one of them,
    stochastic rounding keeps them on average and tracks the float32 run. (Triton's interpreter converts float32 to
    bf16 by truncation, not to nearest, so its plain bf16 run does move: only its stochastic run is checked.)"""
    steps = 150 if backend != "triton" else 40
    runs = {}
    modes = (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("sr", torch.bfloat16, True))
    for name, dtype, sr in modes:
        p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
        opt = fusedopt.AdamW([p], lr=1e-3, weight_decay=0.0, backend=backend, bf16_stochastic_round=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # Adam's update is then lr exactly
            opt.step()
        runs[name] = p.detach().float().mean().item()
    moved = 1.0 - runs["fp32"]
    assert abs(moved - steps * 1e-3) < 1e-4
    if backend != "triton":
        assert runs["bf16"] == 1.0, "round-to-nearest bf16 was expected to lose every update"
    assert abs(runs["sr"] - runs["fp32"]) < 0.05 * moved, runs


def test_gpt_finetune_bf16_tracks_fp32_only_with_stochastic_rounding():
    """The same on examples/finetune_gpt.py's tiny GPT (150 + 50 steps at lr 3e-4, a fine-tuning learning rate):
    with bf16 params, round-to-nearest drops the updates smaller than half a bf16 ulp and the loss stalls visibly
    above the float32 run's (measured: 7% over the last 10 steps); stochastic rounding follows the float32 curve
    (measured: 0.01%). Both bf16 runs also differ from float32 by the bf16 forward pass (0.3% at step 0)."""
    import gpt_quality

    last10 = lambda losses: sum(losses[-10:]) / 10
    fp32 = last10(gpt_quality.train(lr=3e-4)[0])
    plain = last10(gpt_quality.train(dtype=torch.bfloat16, lr=3e-4)[0])
    sr, opt = gpt_quality.train({"bf16_stochastic_round": True}, torch.bfloat16, lr=3e-4)
    assert opt.param_groups[0]["params"][0].dtype == torch.bfloat16
    assert abs(last10(sr) - fp32) <= 0.01 * fp32, (last10(sr), fp32)
    assert plain >= 1.04 * fp32, f"plain bf16 AdamW was expected to fall visibly behind: {plain} vs {fp32}"


def test_float32_params_are_untouched_and_the_op_refuses_them():
    """The mode applies to bf16 buckets only (a model's float32 norms train as usual); the op itself refuses a
    stochastic_round tensor for float32 params with the same message on every backend."""
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt_a = fusedopt.SGD([p], lr=0.1, backend="cpu", bf16_stochastic_round=True)
    opt_b = fusedopt.SGD([q], lr=0.1, backend="cpu")
    p.grad = q.grad = torch.full((3,), 0.3)
    opt_a.step()
    opt_b.step()
    assert torch.equal(p, q)
    spec = fusedopt.SGD.SPEC
    hyper = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    for backend in cpu_backends():
        with pytest.raises(RuntimeError, match=rf"fusedopt sgd_step \({backend}\): stochastic rounding applies to "
                                               r"bfloat16 params, got torch.float32"):  # fmt: skip
            optim_step.step(spec, [torch.ones(3)], [torch.ones(3)], [[]], [], lr=0.1, hyper=hyper, maximize=False,
                            stochastic_round=torch.tensor([1, 2]), backend=backend)  # fmt: skip


def test_grad_scaler_skip_leaves_params():
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    before = p.detach().clone()
    opt = fusedopt.Adam([p], lr=0.1, backend="cpu", bf16_stochastic_round=True)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    p.grad = torch.randn(300).bfloat16()
    opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("info", INFOS)
def test_gpu_within_one_rounding_of_the_torch_backend(info, backend):
    """On a GPU: the CUDA and Triton param stores against the torch backend's bits after one step (nvcc contracts
    multiply-adds, so the float32 update may differ in its last bit; the rounding of it is the same hash)."""
    shapes = [(), (3,), (33, 17), (70001,)]
    results = []
    for b in ("torch", backend):
        fused, ref = make_params(shapes, torch.bfloat16, device="cuda")
        opt = info.fused(fused, backend=b, bf16_stochastic_round=True, stochastic_round_seed=5, **info.cases[0])
        set_grads(fused, ref, torch.Generator().manual_seed(3), 1, none_every=0)
        opt.step()
        results.append(fused)
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.parametrize("info", REFUSING)
def test_optimizers_without_it_refuse_it(info):
    """An optimizer whose op cannot round stochastically (optim_db's not_applicable) says so instead of ignoring it."""
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        info.fused([p], backend="torch", bf16_stochastic_round=True, **info.cases[0])
    info.fused([p], backend="torch", bf16_stochastic_round=False, stochastic_round_seed=3, **info.cases[0])
