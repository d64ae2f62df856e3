"""master_weights=True | "remainder": exact float32 masters of bf16/fp16 params inside every optimizer's fused step.

Checked, per optimizer of the registry that takes the keyword and each of its cases:
- the float32 master (or the bf16 param joined with its int16 remainder) and every state (float32) after 20 steps
  against torch's optimizer in float64 on the same grads, at float32's tolerance (widened where torch's own float32
  run drifts further, as tests/parity_steps.py does); the bf16 param is the master rounded;
- the cpu and torch backends bit for bit, and the remainder mode's master equal to the float32 master's bit for bit
  (the remainder stores the same float32 value in 2 bytes instead of 4);
- the split/join definition, state_dict round trips and conversions, and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_backends
from optim_db import OPTIM_DB
from parity_steps import SMALL_SHAPES, _assert_close, excess, make_params, set_grads

import fusedopt
from fusedopt import master_weights
from fusedopt.ops import optim_step

_TAKES = [i for i in OPTIM_DB if i.takes("master_weights")]
CASES = [pytest.param(i, kw, id=f"{i.name}-{k}") for i in _TAKES for k, kw in enumerate(i.cases)]
FIRST = [pytest.param(i, i.cases[0], id=i.name) for i in _TAKES]
MODES = [True, "remainder"]
SHAPES = [(), (0,), (3,), (33, 17), (1100,)]


def _master(opt, p) -> torch.Tensor:
    st = opt.state[p]
    return st["master_param"] if "master_param" in st else master_weights.join(p.detach(), st["param_remainder"])


def _run(info, kwargs, mode, backend, steps=20, shapes=SHAPES, dtype=torch.bfloat16):
    """The fused optimizer on 16-bit params with masters, torch's in float64 and in float32, on the same grads."""
    fused, ref = make_params(shapes, dtype)
    t32 = [torch.nn.Parameter(f.detach().float().clone()) for f in fused]
    opt_f = info.fused(fused, backend=backend, master_weights=mode, **kwargs)
    opt_r, opt_t32 = info.reference(ref, **kwargs), info.reference(t32, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for s in range(steps):
        set_grads(fused, ref, gen, s)
        for a, f in zip(t32, fused):
            a.grad = None if f.grad is None else f.grad.float()
        opt_f.step()
        opt_r.step()
        opt_t32.step()
    return opt_f, fused, opt_r, ref, opt_t32, t32


def _rounded(master: torch.Tensor, mode, dtype) -> torch.Tensor:
    return master.to(dtype) if mode is True else master_weights.split(master)[0]


@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
@pytest.mark.parametrize("info,kwargs", CASES)
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_masters_and_states_match_torch_in_float64(info, kwargs, mode, backend):
    opt_f, fused, opt_r, ref, opt_t32, t32 = _run(info, kwargs, mode, backend)
    widen = max(1.0, 2.0 * excess(opt_t32, opt_r, t32, ref, torch.float32))
    key = "master_param" if mode is True else "param_remainder"
    for i, (f, r) in enumerate(zip(fused, ref)):
        st_f, st_r = opt_f.state.get(f, {}), opt_r.state.get(r, {})
        if not st_r:  # never had a grad
            continue
        master = _master(opt_f, f)
        _assert_close(master, r.detach(), torch.float32, f"param {i} master", widen)
        assert torch.equal(f.detach(), _rounded(master, mode, f.dtype)), f"param {i} is not its rounded master"
        assert set(st_f) == set(st_r) | {key}, f"param {i} keys {sorted(st_f)} vs torch {sorted(st_r)}"
        for k, v in st_r.items():
            if k == "step":
                assert float(st_f[k]) == float(v)
            elif isinstance(v, torch.Tensor):
                assert st_f[k].dtype == torch.float32, f"param {i} state {k} is {st_f[k].dtype}"
                _assert_close(st_f[k], v, torch.float32, f"param {i} state {k}", widen)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("info,kwargs", FIRST)
def test_masters_equal_a_float32_run_bit_for_bit(info, kwargs, backend):
    """The same backend on float32 params (with the same bf16-valued grads) and on bf16 params with either kind of
    master: one float32 trajectory, bit for bit, states included."""
    base, _ = make_params(SHAPES, torch.bfloat16)
    runs = {}
    for mode in (None, True, "remainder"):
        params = [torch.nn.Parameter(b.detach().float() if mode is None else b.detach().clone()) for b in base]
        opt = info.fused(params, backend=backend, master_weights=mode or False, **kwargs)
        gen = torch.Generator().manual_seed(2)
        for s in range(12):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen).bfloat16()
                p.grad = None if (s + i) % 4 == 0 and i != 1 else (g.float() if mode is None else g)
            opt.step()
        runs[mode] = (opt, params)
    opt32, ps32 = runs[None]
    for mode in MODES:
        opt, params = runs[mode]
        for i, (p, q) in enumerate(zip(params, ps32)):
            if not opt32.state.get(q):
                continue
            assert torch.equal(_master(opt, p).view(torch.int32), q.detach().view(torch.int32)), (mode, i)
            for k, v in opt32.state[q].items():
                assert torch.equal(opt.state[p][k], v), (mode, i, k)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("info,kwargs", FIRST)
def test_non_finite_grads_as_in_a_float32_run(info, kwargs, backend):
    """inf and NaN grads (and a huge one): every master value as the float32 run's (NaN where it is NaN), each
    param its rounded master; no other element or tensor touched."""
    values = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), 3e38, -1e-30, 0.5, 2.0] * 40)
    runs = {}
    for mode in (None, True, "remainder"):
        p = torch.nn.Parameter(torch.linspace(-2, 2, values.numel()).bfloat16())
        if mode is None:
            p = torch.nn.Parameter(p.detach().float())
        opt = info.fused([p], backend=backend, master_weights=mode or False, **kwargs)
        for s in range(3):
            g = values.roll(s).bfloat16()
            p.grad = g.float() if mode is None else g
            opt.step()
        runs[mode] = (opt, p)
    ref = runs[None][1].detach()
    for mode in MODES:
        opt, p = runs[mode]
        master = _master(opt, p)
        torch.testing.assert_close(master, ref, rtol=0, atol=0, equal_nan=True, msg=str(mode))
        assert torch.equal(p.detach().isnan(), master.isnan())
        finite = ~master.isnan()
        assert torch.equal(p.detach()[finite], _rounded(master, mode, p.dtype)[finite])


@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
@pytest.mark.parametrize("info,kwargs", FIRST)
def test_triton_matches_the_torch_backend(info, kwargs, mode):
    if "triton" not in cpu_backends():
        pytest.skip("triton is not usable on CPU tensors here")
    runs = [_run(info, kwargs, mode, b, steps=4, shapes=SMALL_SHAPES)[:2] for b in ("torch", "triton")]
    (opt_t, ps_t), (opt_x, ps_x) = runs
    for i, (a, b) in enumerate(zip(ps_t, ps_x)):
        torch.testing.assert_close(_master(opt_x, b), _master(opt_t, a), rtol=1e-6, atol=1e-7, msg=f"param {i}")
        assert torch.equal(b.detach(), _rounded(_master(opt_x, b), mode, b.dtype)), i


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_float16_params_with_a_float32_master(backend):
    info = next(i for i in _TAKES if i.name == "AdamW")
    opt_f, fused, opt_r, ref, opt_t32, t32 = _run(info, info.cases[0], True, backend, dtype=torch.float16)
    widen = max(1.0, 2.0 * excess(opt_t32, opt_r, t32, ref, torch.float32))
    for i, (f, r) in enumerate(zip(fused, ref)):
        if opt_r.state.get(r):
            _assert_close(opt_f.state[f]["master_param"], r.detach(), torch.float32, f"param {i}", widen)
            assert torch.equal(f.detach(), opt_f.state[f]["master_param"].half())


def test_split_and_join_are_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.logspace(-40, 38, 200_000)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 1e-45, 2**-126])
    x = torch.cat([x, special])
    high, low = master_weights.split(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(master_weights.join(high, low).view(torch.int32), x.view(torch.int32))
    finite = high.float().isfinite()
    err = (high.float()[finite] - x[finite]).abs()
    assert (err <= (x.to(torch.bfloat16).float()[finite] - x[finite]).abs() + 1e-45).all(), "not rounded to nearest"
    h, lo = master_weights.split(torch.tensor([float("nan"), -float("nan")]))
    assert h.isnan().all() and (lo == 0).all()


def test_small_updates_move_bf16_params_only_with_a_master():
    """Updates of 1e-3 on params at 1: plain bf16 AdamW loses them all, a master (either kind) keeps the float32
    trajectory exactly and the param follows it."""
    runs = {}
    modes = (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("master", torch.bfloat16, True),
             ("remainder", torch.bfloat16, "remainder"))
    for name, dtype, mode in modes:
        p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
        opt = fusedopt.AdamW([p], lr=1e-3, weight_decay=0.0, backend="cpu", master_weights=mode)
        for _ in range(150):
            p.grad = torch.ones_like(p)
            opt.step()
        runs[name] = (p.detach().float(), _master(opt, p) if mode else p.detach().float())
    assert torch.equal(runs["bf16"][0], torch.ones(4096)), "plain bf16 was expected to lose every update"
    for name, mode in (("master", True), ("remainder", "remainder")):
        assert torch.equal(runs[name][1], runs["fp32"][1]), name
        assert torch.equal(runs[name][0], _rounded(runs["fp32"][1], mode, torch.bfloat16).float()), name
        assert (runs[name][0] - runs["fp32"][1]).abs().max() <= 2**-8


def test_float32_params_in_the_group_step_as_usual():
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    h = torch.nn.Parameter(torch.randn(50).bfloat16())
    b.data.copy_(a.data)
    opt = fusedopt.Adam([a, h], lr=0.01, backend="cpu", master_weights=True)
    plain = fusedopt.Adam([b], lr=0.01, backend="cpu")
    for _ in range(3):
        a.grad = b.grad = torch.randn(50)
        h.grad = torch.randn(50).bfloat16()
        opt.step()
        plain.step()
    assert torch.equal(a, b) and "master_param" not in opt.state[a] and "master_param" in opt.state[h]


@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
def test_state_dict_resumes_bit_exactly(mode):
    info = next(i for i in _TAKES if i.name == "AdamW")
    fused, _ = make_params(SHAPES, torch.bfloat16)
    opt = info.fused(fused, backend="cpu", master_weights=mode, **info.cases[0])
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in fused:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as a checkpoint: no tensor shared with the running optimizer
    copies = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    resumed = info.fused(copies, backend="cpu", master_weights=mode, **info.cases[0])
    resumed.load_state_dict(sd)
    for _ in range(3):
        for p, c in zip(fused, copies):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            c.grad = p.grad.clone()
        opt.step()
        resumed.step()
    for p, c in zip(fused, copies):
        assert torch.equal(_master(opt, p), _master(resumed, c))
        for k, v in opt.state[p].items():
            assert torch.equal(resumed.state[c][k], v) and resumed.state[c][k].dtype == v.dtype, k


def test_state_dicts_convert_between_modes_and_to_torch():
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = fusedopt.AdamW([p], lr=0.01, backend="cpu", master_weights=True)
    for _ in range(3):
        p.grad = torch.randn(300).bfloat16()
        opt.step()
    master = opt.state[p]["master_param"].clone()
    # float32 master -> remainder: the param becomes the master's high half, the value is kept
    q = torch.nn.Parameter(p.detach().clone())
    rem = fusedopt.AdamW([q], lr=0.01, backend="cpu", master_weights="remainder")
    rem.load_state_dict(opt.state_dict())
    assert torch.equal(master_weights.join(q.detach(), rem.state[q]["param_remainder"]), master)
    assert rem.state[q]["exp_avg"].dtype == torch.float32 and "master_param" not in rem.state[q]
    # remainder -> float32 master
    r = torch.nn.Parameter(q.detach().clone())
    back = fusedopt.AdamW([r], lr=0.01, backend="cpu", master_weights=True)
    back.load_state_dict(rem.state_dict())
    assert torch.equal(back.state[r]["master_param"], master)
    # torch.optim (and fusedopt without masters) load it: states in the param's dtype, the master keys dropped
    s = torch.nn.Parameter(p.detach().clone())
    plain = fusedopt.AdamW([s], lr=0.01, backend="cpu")
    plain.load_state_dict(opt.state_dict())
    assert "master_param" not in plain.state[s] and plain.state[s]["exp_avg"].dtype == torch.bfloat16
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.01)
    torch_opt.load_state_dict(opt.state_dict())
    # a torch.optim state_dict into master weights: float32 states, the master from the param
    u = torch.nn.Parameter(p.detach().clone())
    up = fusedopt.AdamW([u], lr=0.01, backend="cpu", master_weights=True)
    up.load_state_dict(plain.state_dict())
    assert torch.equal(up.state[u]["master_param"], u.detach().float())
    assert up.state[u]["exp_avg"].dtype == torch.float32
    u.grad = torch.randn(300).bfloat16()
    up.step()


def test_bad_options_are_refused():
    bf, half = torch.nn.Parameter(torch.ones(3).bfloat16()), torch.nn.Parameter(torch.ones(3).half())
    with pytest.raises(ValueError, match="needs bfloat16 params"):
        fusedopt.AdamW([half], master_weights="remainder")
    with pytest.raises(ValueError, match="Invalid master_weights value"):
        fusedopt.AdamW([bf], master_weights="fp64")
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.AdamW([bf], master_weights=True, bf16_stochastic_round=True)
    for cls in (fusedopt.optim.Muon, fusedopt.optim.LAMB, fusedopt.optim.Adafactor):
        with pytest.raises(TypeError):
            cls([torch.nn.Parameter(torch.ones(3, 3).bfloat16())], master_weights=True)


def _op_args():
    spec = fusedopt.SGD.SPEC
    hyper = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    return spec, hyper


@pytest.mark.parametrize("backend", cpu_backends())
def test_the_op_checks_masters_at_its_boundary(backend):
    """Each backend refuses bad masters with the same message (a crash or a read past a tensor would be the bug)."""
    spec, hyper = _op_args()
    p16, g16 = [torch.ones(3).bfloat16()], [torch.ones(3).bfloat16()]
    name = rf"fusedopt sgd_step \({backend}\)"
    bad = [
        ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], "master weights apply to bfloat16 and float16 params"),
        (p16, g16, [torch.ones(3, dtype=torch.float64)], "masters must be float32 copies"),
        ([torch.ones(3).half()], [torch.ones(3).half()], [torch.zeros(3, dtype=torch.int16)],
         "masters must be float32 copies"),
        (p16, g16, [torch.ones(4)], r"masters\[0\] has shape"),
        (p16, g16, [torch.ones(3), torch.ones(3)], "masters has 2 tensors, params has 1"),
    ]  # fmt: skip
    for params, grads, masters, msg in bad:
        with pytest.raises(RuntimeError, match=f"{name}: {msg}"):
            optim_step.step(spec, params, grads, [[]], [], lr=0.1, hyper=hyper, maximize=False, masters=masters,
                            backend=backend)  # fmt: skip
    hyper_m = {**hyper, "momentum": 0.9}
    with pytest.raises(RuntimeError, match=rf"{name}: momentum_buffers\[0\] is torch.bfloat16, expected torch.float32"):
        optim_step.step(spec, p16, g16, [[torch.zeros(3).bfloat16()]], [], lr=0.1, hyper=hyper_m, maximize=False,
                        masters=[torch.ones(3)], backend=backend)  # fmt: skip
    with pytest.raises(RuntimeError, match=f"{name}: stochastic rounding does not apply with master weights"):
        optim_step.step(spec, p16, g16, [[]], [], lr=0.1, hyper=hyper, maximize=False, masters=[torch.ones(3)],
                        stochastic_round=torch.tensor([1, 2]), backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
def test_lamb_op_refuses_masters(backend):
    spec = fusedopt.optim.LAMB.SPEC
    p = [torch.ones(3).bfloat16()]
    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True,
             "grad_averaging": True, "adam_w_mode": True, "use_nvlamb": False}  # fmt: skip
    with pytest.raises(RuntimeError, match="master weights are not supported by this optimizer"):
        optim_step.step(spec, p, [torch.ones(3).bfloat16()], [[torch.zeros(3)], [torch.zeros(3)]],
                        [torch.zeros(())], lr=0.1, hyper=hyper, maximize=False, masters=[torch.ones(3)],
                        backend=backend)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
@pytest.mark.parametrize("info,kwargs", FIRST)
def test_gpu_matches_the_torch_backend(info, kwargs, mode, backend):
    """On a GPU: masters within float32 rounding of the torch backend (nvcc contracts multiply-adds), the params
    exactly the rounded masters."""
    shapes = [(), (3,), (33, 17), (70001,)]
    results = []
    for b in ("torch", backend):
        fused, _ = make_params(shapes, torch.bfloat16, device="cuda")
        opt = info.fused(fused, backend=b, master_weights=mode, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for s in range(5):
            set_grads(fused, fused, gen, s, none_every=0)
            opt.step()
        results.append((opt, fused))
    (opt_t, ps_t), (opt_x, ps_x) = results
    for i, (a, b) in enumerate(zip(ps_t, ps_x)):
        torch.testing.assert_close(_master(opt_x, b), _master(opt_t, a), rtol=1e-5, atol=1e-6, msg=f"param {i}")
        assert torch.equal(b.detach(), _rounded(_master(opt_x, b), mode, b.dtype)), i


def test_an_int8_checkpoint_loads_into_master_weights():
    """8-bit states (state_dtype="int8") are dequantized on load; beside a master they become float32."""
    p = torch.nn.Parameter(torch.randn(64, 80).bfloat16())
    q8 = fusedopt.AdamW([p], lr=0.01, backend="cpu", state_dtype="int8")
    p.grad = torch.randn(64, 80).bfloat16()
    q8.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = fusedopt.AdamW([q], lr=0.01, backend="cpu", master_weights=True)
    opt.load_state_dict(q8.state_dict())
    st = opt.state[q]
    assert sorted(st) == ["exp_avg", "exp_avg_sq", "master_param", "step"]
    expected = fusedopt.optim.to_full_precision_state_dict(q8)["state"][0]["exp_avg"]
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], expected.float())
    q.grad = torch.randn(64, 80).bfloat16()
    opt.step()


def eager_and_compiled_runs(make, sizes, fullgraph: bool) -> list:
    """[(optimizer, params)] of 4 steps on bf16 params of `sizes` with the same grads: eager, then its step under
    torch.compile (aot_eager: the custom op through functionalization, as inductor)."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, n).bfloat16()) for n in sizes]
        opt = make(params)
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=fullgraph) if compiled else opt.step
        gen = torch.Generator().manual_seed(8)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            step()
        runs.append((opt, params))
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
def test_compiled_step_equals_eager(mode):
    """torch.compile (aot_eager: the custom op through functionalization, as inductor) of a master-weight step: the
    op with its masters list in the graph, the same bits as eager."""
    make = lambda params: fusedopt.AdamW(params, lr=0.01, backend="cpu", master_weights=mode)
    (opt_e, ps_e), (opt_c, ps_c) = eager_and_compiled_runs(make, (7, 300), fullgraph=False)
    for a, b in zip(ps_e, ps_c):
        assert torch.equal(a, b) and torch.equal(_master(opt_e, a), _master(opt_c, b))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
def test_grad_scaler_unscale_and_skip(mode, backend):
    """GradScaler's scale in the kernel (the grads left unscaled, as torch's fused optimizers leave them) gives the
    float32 run's master; a step with found_inf set changes nothing: param, master, states, step."""
    runs = {}
    for m in (None, mode):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 300).bfloat16())
        if m is None:
            p = torch.nn.Parameter(p.detach().float())
        opt = fusedopt.AdamW([p], lr=0.01, backend=backend, master_weights=m or False)
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        g = (torch.linspace(-3, 2, 300) * 1024).bfloat16()
        p.grad = g.float() if m is None else g.clone()
        opt.step()
        runs[m] = (opt, p)
        assert torch.equal(p.grad.float(), (g.float() / 1024).to(p.dtype).float()), "the grad was not unscaled"
    opt, p = runs[mode]
    assert torch.equal(_master(opt, p), runs[None][1].detach())
    before = {k: v.clone() for k, v in opt.state[p].items()}
    param_before = p.detach().clone()
    opt.found_inf = torch.tensor(1.0)
    p.grad = torch.full((300,), float("inf")).bfloat16()
    opt.step()
    assert torch.equal(p.detach(), param_before)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES, ids=["fp32", "remainder"])
def test_resized_param_raises_instead_of_reading_past_it(mode, backend):
    """A param resized after its master was made: the step refuses (master shape), it never reads past the master."""
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    opt = fusedopt.AdamW([p], backend=backend, master_weights=mode)
    p.grad = torch.randn(4).bfloat16()
    opt.step()
    p.data = torch.randn(4096).bfloat16()
    p.grad = torch.randn(4096).bfloat16()
    with pytest.raises(RuntimeError, match=r"masters\[0\] has shape \[4\], its param \[4096\]"):
        opt.step()
