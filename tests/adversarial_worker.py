"""Runs adversarial cases for tests/test_adversarial.py in a process of its own, where a crash is possible.

Reads one JSON case per line on stdin; prints `start <id>` before running it (so the parent can name the case that
killed the process) and then one JSON result line: {"id", "outcome", "detail"}. Each case runs fusedopt and torch on
the same input and compares what they did:
- both succeed: values equal within the dtype's tolerance, NaN and Inf in the same places;
- both raise: fine (the error types and texts may differ, torch's are not a contract);
- only one raises: a mismatch, unless the case is one where fusedopt documents a clear error instead of torch's
  silent type promotion (a grad whose dtype differs from its param's).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

if not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

import fusedopt
import fusedopt.nn.functional as FF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_db import PaperLion  # tests/ is on the path from here

REFERENCES = {"Lion": PaperLion}  # optimizers torch has no class for

TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (5e-3, 1e-3),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Mismatch(AssertionError):
    pass


def _same(a, b, dtype, what):
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        raise Mismatch(f"{what}: {type(a).__name__} vs torch's {type(b).__name__}")
    if a is None or not isinstance(a, torch.Tensor):
        return
    if a.shape != b.shape:
        raise Mismatch(f"{what}: shape {list(a.shape)} vs torch's {list(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(a.isnan(), b.isnan()):
        raise Mismatch(f"{what}: NaN at other places than torch ({a.isnan().sum()} vs {b.isnan().sum()})")
    finite = b.isfinite() & a.isfinite()
    if not torch.equal(a[~finite].nan_to_num(0.0), b[~finite].nan_to_num(0.0)):
        raise Mismatch(f"{what}: Inf at other places or signs than torch")
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- optimizers -----------------------------------------------------------------------------------------------
def _layout(t, layout):
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _run_optimizer(case, use_fused, exact=False, torch_fused=False):
    """exact: torch in float64 on the same (rounded) values, results rounded back to the dtype. torch_fused: torch's
    fused=True kernel (float32 math for 16-bit, like fusedopt's)."""
    dtype = DTYPES[case["dtype"]]
    widen = (lambda t: t.double()) if exact else (lambda t: t)
    gen = torch.Generator().manual_seed(case["seed"])
    shape = tuple(case["shape"])
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"]
    p = torch.nn.Parameter(widen(_layout(base.to(dtype), case["layout"])))
    params = [p, p] if case["duplicate"] else [p]
    kw = dict(case["options"])
    for key in ("betas", "eps"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    name = case["optimizer"]
    cls = getattr(fusedopt, name) if use_fused else REFERENCES.get(name) or getattr(torch.optim, name)
    if use_fused:
        kw["backend"] = case["backend"]
    elif torch_fused:
        kw["fused"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(params, lr=case["lr"], **kw)
    for step, grad_kind in enumerate(case["grads"]):
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * case["grad_scale"]
        if grad_kind == "none":
            p.grad = None
        else:
            if grad_kind == "nan":
                g.view(-1)[:1] = float("nan")
            elif grad_kind == "inf":
                g.view(-1)[:1] = float("-inf")
            elif grad_kind == "huge":
                g = g * 1e30
            p.grad = widen(_layout(g.to(dtype), case["layout"]).clone())
            if grad_kind == "reshaped" and g.dim() >= 1 and g.numel() > 1:
                p.grad.data = widen(g.to(dtype).reshape(-1))
            elif grad_kind == "float64":
                p.grad.data = g.clone()
        if case["resize_at"] == step:
            larger = tuple(s + 1 for s in shape) or (3,)
            p.data = widen(torch.randn(larger, generator=gen, dtype=torch.float64).to(dtype))
            p.grad = widen(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
        opt.step()
    state = {k: v if k == "step" else v.to(dtype) for k, v in opt.state[p].items()} if p in opt.state else {}
    return p.detach().to(dtype), state


def check_optimizer(case):
    def run(fused):
        try:
            return _run_optimizer(case, fused), None
        except (RuntimeError, ValueError, TypeError, IndexError, ZeroDivisionError, AssertionError) as e:
            # ZeroDivisionError: torch's Adafactor (and fusedopt's) on an empty param; AssertionError: torch's
            # Adafactor when a param's grad changes rank between steps (its state lacks the other factors)
            return None, e

    ours, our_err = run(True)
    theirs, their_err = run(False)
    if our_err is not None and their_err is not None:
        return "both_raise", f"{type(our_err).__name__}: {our_err}"
    if our_err is not None:
        documented = "float64" in case["grads"] and "is torch.float64, its param" in str(our_err)
        if documented:
            return "documented_error", str(our_err)
        raise Mismatch(f"fusedopt raised where torch did not: {type(our_err).__name__}: {our_err}")
    if their_err is not None:
        raise Mismatch(f"torch raised {type(their_err).__name__}: {their_err}; fusedopt did not")
    dtype = DTYPES[case["dtype"]]
    if dtype == torch.float16 and len(case["grads"]) > 1:
        dtype = torch.bfloat16  # a trajectory of float16 roundings: a few ulps apart, compared as bfloat16
    try:
        _same_optimizer_result(ours, theirs, dtype)
    except AssertionError:
        if dtype not in (torch.bfloat16, torch.float16):
            raise
        # torch's 16-bit update rounds every intermediate; fusedopt's rounds once from float32, as the exact one.
        try:
            _same_optimizer_result(ours, _run_optimizer(case, False, exact=True), dtype)
            return "same_as_exact", ""
        except AssertionError:
            if case["optimizer"] != "Adagrad":
                raise
        # Adagrad's sum = g^2 overflows float16 storage where torch's float16 loop overflows earlier (inside the
        # step) and the exact run never: fusedopt then matches torch's own fused kernel, float32 math and all.
        _same_optimizer_result(ours, _run_optimizer(case, False, torch_fused=True), dtype)
        return "same_as_torch_fused", ""
    return "same", ""


def _same_optimizer_result(ours, theirs, dtype):
    (p_f, st_f), (p_t, st_t) = ours, theirs
    _same(p_f, p_t, dtype, "param")
    if set(st_f) != set(st_t):
        raise Mismatch(f"state keys {sorted(st_f)} vs torch's {sorted(st_t)}")
    for k in st_t:
        _same(st_f[k], st_t[k] if k != "step" else torch.as_tensor(st_t[k]).float(), dtype, f"state {k}")


# --- losses ---------------------------------------------------------------------------------------------------
def _loss_inputs(case):
    dtype = DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(case["seed"])
    rows, classes = case["rows"], case["classes"]
    x = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * case["scale"]
    if case["special"] == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif case["special"] == "neg_inf" and x.numel():
        x[:, 0] = float("-inf")
    elif case["special"] == "equal_huge":
        x = torch.full_like(x, 1e30 if dtype != torch.float16 else 6e4)
    if case["transposed"] and rows > 0 and classes > 0:
        x = x.t().contiguous().t()
    x = x.to(dtype)
    if case["target_kind"] == "index":
        t = torch.randint(0, max(classes, 1), (rows,), generator=gen)
        if case["ignore_some"] and rows:
            t[::2] = -100
    else:
        t = torch.rand(rows, classes, generator=gen, dtype=torch.float64).softmax(-1).to(dtype)
    w = torch.rand(classes, generator=gen, dtype=torch.float64).to(dtype) if case["weight"] else None
    return x, t, w


def check_cross_entropy(case):
    kw = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"]}
    dtype = DTYPES[case["dtype"]]

    def run(fused, compute_dtype=None):
        x, t, w = _loss_inputs(case)
        if compute_dtype is not None:
            x = x.to(compute_dtype)
            t = t.to(compute_dtype) if t.is_floating_point() else t
            w = None if w is None else w.to(compute_dtype)
        x.requires_grad_(True)
        if fused:
            loss = FF.cross_entropy(x, t, weight=w, backend=case["backend"], **kw)
        else:
            loss = F.cross_entropy(x, t, weight=w, **kw)
        go = torch.full_like(loss, 0.7)
        (gx,) = torch.autograd.grad(loss, x, go, allow_unused=True)
        return loss.detach().to(dtype), (gx if gx is not None else torch.zeros_like(x)).to(dtype)

    def zero_ignored_nan_rows(theirs):
        # Documented (docs/CROSS_ENTROPY.md): an ignored row's gradient is 0 even where its logits are NaN/Inf;
        # torch's log_softmax backward spreads the row's NaN into it.
        _, t, _ = _loss_inputs(case)
        grad = theirs[1].clone()
        if case["target_kind"] == "index" and grad.numel():
            grad[t == -100] = grad[t == -100].nan_to_num(nan=0.0)
        return theirs[0], grad

    compare_dtype = dtype if dtype != torch.float16 else torch.bfloat16
    try:
        return _compare_runs(lambda: run(True), lambda: run(False), compare_dtype,
                             run_exact=lambda: run(False, torch.float64))  # fmt: skip
    except AssertionError:
        ours = run(True)
        for reference in (run(False), run(False, torch.float64)):
            try:
                for i, (a, b) in enumerate(zip(ours, zero_ignored_nan_rows(reference))):
                    _same(a, b, compare_dtype, f"output {i} (ignored rows' NaN set to 0)")
                return "documented_difference", "NaN logits in ignored rows: 0 gradient there"
            except AssertionError:
                continue
        raise


def _compare_runs(run_fused, run_torch, dtype, run_exact=None, torch_error_ok=None):
    """Runs both; compares their outcomes as the module doc says. Each run returns a tuple of tensors. With
    run_exact (torch in float64 on the same inputs, rounded once to the dtype), values may match either torch run:
    16-bit overflow inside torch's intermediates and inside fusedopt's float32 ones differ at the edge of the range."""
    results = []
    for run in (run_fused, run_torch):
        try:
            results.append((run(), None))
        except (RuntimeError, ValueError, IndexError) as e:
            results.append((None, e))
    (ours, our_err), (theirs, their_err) = results
    if our_err is not None and their_err is not None:
        return "both_raise", f"{type(our_err).__name__}: {our_err}"
    if our_err is not None:
        raise Mismatch(f"fusedopt raised where torch did not: {type(our_err).__name__}: {our_err}")
    if their_err is not None:
        if torch_error_ok is not None and torch_error_ok(str(their_err)):
            return "documented_difference", str(their_err)
        raise Mismatch(f"torch raised {type(their_err).__name__}: {their_err}; fusedopt did not")
    try:
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, dtype, f"output {i}")
    except AssertionError:
        if run_exact is None:
            raise
        for i, (a, b) in enumerate(zip(ours, run_exact())):
            _same(a, b, dtype, f"output {i} (vs torch in float64, rounded)")
        return "same_as_exact", ""
    return "same", ""


def _tensors(case, gen, n):
    dtype = DTYPES[case["dtype"]]
    shape = tuple(case["shape"])
    out = []
    for _ in range(n):
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"]
        if case["special"] == "nan" and t.numel():
            t.view(-1)[0] = float("nan")
        elif case["special"] == "inf" and t.numel():
            t.view(-1)[-1] = float("inf")
        out.append(_layout(t.to(dtype), case["layout"]))
    return out


def check_clip_grad_norm(case):
    dtype = DTYPES[case["dtype"]]

    def run(clip):
        gen = torch.Generator().manual_seed(case["seed"])
        params = [torch.nn.Parameter(g.detach().clone()) for g in _tensors(case, gen, 3)]
        for p, g in zip(params, _tensors(case, gen, 3)):
            p.grad = g
        norm = clip(params)
        return (norm, *[p.grad for p in params])

    kw = {k: case[k] for k in ("max_norm", "norm_type", "error_if_nonfinite")}
    return _compare_runs(
        lambda: run(lambda ps: fusedopt.nn.utils.clip_grad_norm_(ps, backend=case["backend"], **kw)),
        lambda: run(lambda ps: torch.nn.utils.clip_grad_norm_(ps, **kw)),
        dtype if dtype not in (torch.bfloat16, torch.float16) else torch.bfloat16,
        # Documented (docs/ARCHITECTURE.md): an empty grad adds nothing to an inf norm; torch refuses it.
        torch_error_ok=lambda msg: "infinity norm on an empty tensor" in msg,
    )


POINTWISE = {
    "mse": (FF.mse_loss, F.mse_loss),
    "bce": (FF.binary_cross_entropy, F.binary_cross_entropy),
    "bce_logits": (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
}


def check_pointwise(case):
    dtype = DTYPES[case["dtype"]]
    fused_fn, torch_fn = POINTWISE[case["loss"]]

    def run(fn, compute_dtype=None, **extra):
        gen = torch.Generator().manual_seed(case["seed"])
        x, t = _tensors(case, gen, 2)
        if case["loss"] == "bce":
            x, t = x.double().sigmoid().to(dtype), t.double().sigmoid().to(dtype)
        if compute_dtype is not None:
            x, t = x.to(compute_dtype), t.to(compute_dtype)
        x.requires_grad_(True)
        loss = fn(x, t, reduction=case["reduction"], **extra)
        (gx,) = torch.autograd.grad(loss, x, torch.full_like(loss, 0.7))
        return loss.detach().to(dtype), gx.to(dtype)

    return _compare_runs(
        lambda: run(fused_fn, backend=case["backend"]), lambda: run(torch_fn),
        dtype if dtype not in (torch.bfloat16, torch.float16) else torch.bfloat16,
        run_exact=lambda: run(torch_fn, torch.float64),
    )  # fmt: skip


CHECKS = {
    "optimizer": check_optimizer,
    "cross_entropy": check_cross_entropy,
    "clip_grad_norm": check_clip_grad_norm,
    "pointwise": check_pointwise,
}


def main():
    for line in sys.stdin:
        case = json.loads(line)
        print(f"start {case['id']}", flush=True)
        try:
            outcome, detail = CHECKS[case["kind"]](case)
        except Mismatch as e:
            outcome, detail = "mismatch", str(e)
        except AssertionError as e:
            outcome, detail = "mismatch", str(e)
        except Exception:  # an unexpected exception type is a finding too
            outcome, detail = "mismatch", traceback.format_exc(limit=3)
        print(json.dumps({"id": case["id"], "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
