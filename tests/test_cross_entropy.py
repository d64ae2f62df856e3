"""fusedopt cross-entropy against torch.nn.functional.cross_entropy in float64, forward and backward (non-unit
grad_output), on every backend that runs here; z_loss and softcap against reference.cross_entropy_formula."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, cpu_backends, tol

import fusedopt
from fusedopt import reference
from fusedopt.nn import CrossEntropyLoss
from fusedopt.nn.functional import cross_entropy

BACKENDS = cpu_backends()
NATIVE = [b for b in BACKENDS if b != "triton"]  # large shapes: the Triton interpreter is too slow for them
REDUCTIONS = ["none", "mean", "sum"]


def make_case(shape, *, prob=False, weight=False, ignore_frac=0.0, ignore_index=-100, seed=0, scale=3.0):
    """float64 logits, targets (class indices with some rows ignored, or probabilities) and optional weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    if prob:
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=0 if len(shape) == 1 else 1)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, num_classes, tshape, generator=g)
        if ignore_frac and target.dim():
            drop = torch.rand(tshape, generator=g) < ignore_frac
            drop.view(-1)[0] = True
            target[drop] = ignore_index
    w = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.1 if weight else None
    return x, target, w


def check(backend, dtype, x64, target, weight=None, *, reduction="mean", label_smoothing=0.0, ignore_index=-100,
          z_loss=0.0, softcap=None, grad_seed=1):  # fmt: skip
    """Fused loss and input gradient vs the float64 reference, seeing the same rounded inputs."""
    prob = target.is_floating_point()
    x = x64.to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()
    t = target.to(dtype) if prob else target
    tr = t.double() if prob else t
    w = weight.to(dtype) if weight is not None else None
    wr = w.double() if w is not None else None
    if z_loss or softcap is not None:
        expected = reference.cross_entropy_formula(xr, tr, wr, ignore_index, reduction, label_smoothing, z_loss,
                                                   softcap)  # fmt: skip
    else:
        expected = F.cross_entropy(xr, tr, wr, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)  # fmt: skip
    actual = cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           backend=backend, z_loss=z_loss, softcap=softcap)  # fmt: skip
    assert actual.dtype == dtype  # torch's: the input's dtype (probability targets here share it)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, **tol(dtype, reduction != "none"), equal_nan=True)
    go = torch.randn(expected.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    go = go.to(xr.device)
    (g_ref,) = torch.autograd.grad(expected, xr, go)
    (g,) = torch.autograd.grad(actual, x, go.to(actual.dtype))
    assert g.dtype == dtype and g.shape == x.shape
    torch.testing.assert_close(g.double(), g_ref, **tol(dtype), equal_nan=True)


# (id, shape, options): every layout torch accepts, odd class counts, weights, smoothing, ignored rows.
CASES = [
    ("2d", (17, 5), {}),
    ("2d-weight-smooth-ignore", (17, 5), dict(weight=True, ignore_frac=0.3, label_smoothing=0.1)),
    ("2d-ignore-index-in-range", (17, 5), dict(weight=True, ignore_frac=0.3, ignore_index=0, label_smoothing=0.2)),
    ("c2", (17, 2), dict(ignore_frac=0.2, label_smoothing=0.05)),
    ("c37-tails", (17, 37), dict(weight=True, ignore_frac=0.1, label_smoothing=0.3)),
    ("n1", (1, 32), dict(label_smoothing=0.1)),
    ("1d", (5,), dict(weight=True)),
    ("nd", (3, 5, 4, 2), dict(weight=True, ignore_frac=0.25, label_smoothing=0.1)),
    ("prob", (17, 5), dict(prob=True, weight=True, label_smoothing=0.1)),
    ("prob-1d", (5,), dict(prob=True)),
    ("prob-nd", (2, 5, 3), dict(prob=True, label_smoothing=0.2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_grid(backend, dtype, reduction, case):
    _, shape, opts = case
    opts = dict(opts)
    ignore_index = opts.pop("ignore_index", -100)
    ls = opts.pop("label_smoothing", 0.0)
    x, target, w = make_case(shape, ignore_index=ignore_index, **opts)
    check(backend, dtype, x, target, w, reduction=reduction, label_smoothing=ls, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 32003), (2, 32003, 2)], ids=["2d", "nd"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_large_odd_vocab(backend, dtype, shape, reduction):
    x, target, w = make_case(shape, weight=True, ignore_frac=0.2)
    check(backend, dtype, x, target, w, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extras", [dict(z_loss=1e-3), dict(softcap=5.0), dict(z_loss=0.1, softcap=2.0)],
                         ids=["zloss", "softcap", "both"])  # fmt: skip
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_z_loss_softcap_vs_reference_formula(backend, dtype, extras, reduction, prob):
    x, target, w = make_case((17, 37), prob=prob, weight=True, ignore_frac=0.0 if prob else 0.2)
    check(backend, dtype, x, target, w, reduction=reduction, label_smoothing=0.1, **extras)


@pytest.mark.parametrize("backend", NATIVE)
def test_z_loss_softcap_large_vocab(backend):
    x, target, _ = make_case((2, 32003), ignore_frac=0.0)
    check(backend, torch.float32, x, target, reduction="sum", z_loss=1e-4, softcap=30.0)


def test_reference_formula_defaults_to_torch():
    x, target, w = make_case((6, 7), weight=True, ignore_frac=0.3)
    torch.testing.assert_close(reference.cross_entropy_formula(x, target, w, label_smoothing=0.1),
                               F.cross_entropy(x, target, w, label_smoothing=0.1))  # fmt: skip
    # z_loss adds z * lse^2 on the kept rows, softcap replaces the logits.
    kept = target != -100
    lse = torch.logsumexp(x, dim=1)
    want = (F.cross_entropy(x, target, reduction="none") + 0.5 * lse**2 * kept).sum()
    torch.testing.assert_close(reference.cross_entropy_formula(x, target, reduction="sum", z_loss=0.5), want)
    capped = 2.0 * torch.tanh(x / 2.0)
    torch.testing.assert_close(reference.cross_entropy_formula(x, target, softcap=2.0), F.cross_entropy(capped, target))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_rows_ignored_mean_is_nan_with_zero_grad(backend, weight, label_smoothing):
    x, _, w = make_case((4, 5), weight=weight)
    target = torch.full((4,), -100)
    check(backend, torch.float64, x, target, w, reduction="mean", label_smoothing=label_smoothing)
    loss = cross_entropy(x, target, w, backend=backend, label_smoothing=label_smoothing)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_logit_propagates_like_torch(backend, dtype):
    x, target, _ = make_case((6, 37))
    x[2, 7] = float("nan")
    for reduction in ("none", "mean"):
        check(backend, dtype, x, target, reduction=reduction)
    out = cross_entropy(x.to(dtype), target, reduction="none", backend=backend)
    assert torch.isnan(out[2]) and not torch.isnan(out[[0, 1, 3, 4, 5]]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_masked_minus_inf_logits(backend, dtype):
    """-inf logits (a masked vocabulary), whole SIMD lanes of them included, give torch's finite loss."""
    x, _, _ = make_case((9, 37))
    x[:, 8:] = float("-inf")
    x[3, ::2] = float("-inf")
    target = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0])
    target[3] = 1
    for reduction in REDUCTIONS:
        check(backend, dtype, x, target, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse(backend):
    x, target, _ = make_case((3, 7, 4), ignore_frac=0.3)
    loss, lse = cross_entropy(x, target, reduction="none", backend=backend, return_lse=True, softcap=4.0)
    assert lse.shape == loss.shape == target.shape and lse.dtype == torch.float64 and not lse.requires_grad
    want = torch.logsumexp(4.0 * torch.tanh(x / 4.0), dim=1)
    torch.testing.assert_close(lse, torch.where(target != -100, want, 0.0), **tol(torch.float64))
    loss32, lse32 = cross_entropy(x.float(), target, backend=backend, return_lse=True)
    assert loss32.shape == () and lse32.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_detached_inputs(backend):
    x, target, _ = make_case((5, 9))
    want = F.cross_entropy(x, target)
    with torch.no_grad():
        got = cross_entropy(x.requires_grad_(), target, backend=backend)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cross_entropy(x.detach(), target, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_never_modifies_or_corrupts_the_logits(backend):
    """Liger-Kernel #272/#343: another user of the logits must see them unchanged, and get its right gradient."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    wmat = torch.randn(8, 11, generator=g, dtype=torch.float64)
    target = torch.randint(0, 11, (6,), generator=g)
    grads = []
    for fn in (F.cross_entropy, lambda a, b: cross_entropy(a, b, backend=backend)):
        logits = h @ wmat
        before = logits.detach().clone()
        other = (logits.pow(2) * 0.1).sum()  # pow saves the logits for its backward
        loss = fn(logits, target) + other
        loss.backward()
        assert torch.equal(logits.detach(), before)
        grads.append(h.grad.clone())
        h.grad = None
    torch.testing.assert_close(grads[1], grads[0], **tol(torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend, dtype):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    wmat = torch.randn(8, 11, generator=g)
    target = torch.randint(0, 11, (6,), generator=g)
    target[1] = -100
    ref_logits = (h @ wmat).to(dtype)
    (want,) = torch.autograd.grad(F.cross_entropy(ref_logits.double(), target, label_smoothing=0.1) * 3.0, h)
    logits = (h @ wmat).to(dtype)
    loss = cross_entropy(logits, target, label_smoothing=0.1, backend=backend, inplace_backward=True)
    torch.testing.assert_close(loss.double(), F.cross_entropy(ref_logits.double(), target, label_smoothing=0.1),
                               **tol(dtype, True))  # fmt: skip
    assert not torch.equal(logits.detach(), ref_logits.detach())  # the logits now hold the gradient
    (got,) = torch.autograd.grad(loss * 3.0, h)
    torch.testing.assert_close(got.double(), want.double(), **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_with_another_user_fails_loudly(backend):
    """When another op saved the logits for its backward, in-place mode raises instead of corrupting its gradient."""
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    logits = h * 2.0
    other = logits.pow(2).sum()
    loss = cross_entropy(logits, torch.tensor([0, 1, 2, 3]), backend=backend, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_is_refused(backend):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([0, 1, 2, 3]), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x = torch.randn(7, 5, dtype=torch.float64).t()  # (5, 7), column-major
    x.requires_grad_()
    target = torch.tensor([0, 6, 3, -100, 2])
    want = F.cross_entropy(x, target, reduction="sum")
    (g_want,) = torch.autograd.grad(want, x)
    got = cross_entropy(x, target, reduction="sum", backend=backend)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_uint8_target_and_legacy_reduction_args():
    x, target, _ = make_case((5, 9))
    torch.testing.assert_close(cross_entropy(x, target.to(torch.uint8)), F.cross_entropy(x, target.to(torch.uint8)))
    with pytest.warns(UserWarning):
        want = F.cross_entropy(x, target, size_average=False)
    with pytest.warns(UserWarning):  # torch's deprecation warning, as torch
        got = cross_entropy(x, target, size_average=False)
    torch.testing.assert_close(got, want)


def test_probability_target_dtype_promotes_like_torch():
    x, target, _ = make_case((4, 6), prob=True)
    want = F.cross_entropy(x.float(), target)  # float32 input, float64 target: a float64 loss
    got = cross_entropy(x.float(), target)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, **tol(torch.float32, True))


def test_probability_target_requiring_grad_differentiates_through_it():
    x, target, _ = make_case((4, 6), prob=True)
    target.requires_grad_()
    want = F.cross_entropy(x, target, label_smoothing=0.1)
    (gt_want,) = torch.autograd.grad(want, target)
    got = cross_entropy(x, target, label_smoothing=0.1)
    (gt_got,) = torch.autograd.grad(got, target)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gt_got, gt_want)


# --- bad inputs: torch's errors, and ours where torch has none --------------------------------------------------------
BAD = [
    ("int32-target", lambda x: (x, torch.zeros(4, dtype=torch.int32)), {}, RuntimeError, "Long or Byte"),
    ("float-target-wrong-shape", lambda x: (x, torch.zeros(4)), {}, RuntimeError, "Long or Byte"),
    ("batch-mismatch", lambda x: (x, torch.zeros(3, dtype=torch.long)), {}, ValueError, "batch_size"),
    ("2d-target", lambda x: (x, torch.zeros(4, 1, dtype=torch.long)), {}, RuntimeError, "multi-target"),
    ("nd-target-dims", lambda x: (x.reshape(2, 5, 2), torch.zeros(2, dtype=torch.long)), {}, RuntimeError,
     "spatial targets"),
    ("nd-target-size", lambda x: (x.reshape(2, 5, 2), torch.zeros(2, 3, dtype=torch.long)), {}, RuntimeError,
     "target size"),
    ("weight-length", lambda x: (x, torch.zeros(4, dtype=torch.long)), dict(weight=torch.ones(4)), RuntimeError,
     "weight tensor should be defined"),
    ("weight-dtype", lambda x: (x, torch.zeros(4, dtype=torch.long)), dict(weight=torch.ones(5, dtype=torch.float64)),
     RuntimeError, "expected scalar type"),
    ("prob-ignore-index", lambda x: (x, torch.softmax(x, 1)), dict(ignore_index=0), RuntimeError,
     "ignore_index is not supported"),
    ("prob-int-target", lambda x: (x, torch.zeros(4, 5, dtype=torch.long)), {}, RuntimeError, "floating point type"),
    ("label-smoothing", lambda x: (x, torch.zeros(4, dtype=torch.long)), dict(label_smoothing=1.5), RuntimeError,
     "label_smoothing"),
    ("reduction", lambda x: (x, torch.zeros(4, dtype=torch.long)), dict(reduction="avg"), ValueError,
     "not a valid value"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_like_torch(case):
    _, make, kwargs, exc, match = case
    x = torch.randn(4, 5)
    inp, target = make(x)
    with pytest.raises(exc, match=match):
        cross_entropy(inp, target, **kwargs)
    with pytest.raises((RuntimeError, ValueError)):  # torch rejects it too
        F.cross_entropy(inp, target, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_target", [5, -3, 1000])
@pytest.mark.parametrize("weight", [False, True])
def test_out_of_range_target_raises(backend, bad_target, weight):
    x = torch.randn(4, 5)
    target = torch.tensor([0, -100, bad_target, 1])
    w = torch.rand(5) if weight else None
    want = rf"Target {bad_target} is out of bounds\."
    with pytest.raises(IndexError, match=want):  # torch's exception and message, on every backend
        cross_entropy(x, target, w, backend=backend)
    with pytest.raises(IndexError, match=want):
        F.cross_entropy(x, target, w)


def test_extra_argument_errors():
    x, target = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(x, target, softcap=0.0)
    with pytest.raises(RuntimeError, match="floating point input"):
        cross_entropy(torch.zeros(4, 5, dtype=torch.long), target)
    with pytest.raises(RuntimeError, match="class dimension"):
        cross_entropy(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="unknown backend"):
        cross_entropy(x, target, backend="tpu")


# --- the module --------------------------------------------------------------------------------------------------
def test_module_is_torch_drop_in():
    assert fusedopt.CrossEntropyLoss is CrossEntropyLoss
    assert issubclass(CrossEntropyLoss, torch.nn.CrossEntropyLoss)
    ours = inspect.signature(CrossEntropyLoss.__init__).parameters
    theirs = inspect.signature(torch.nn.CrossEntropyLoss.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default
    extras = [p for p in list(ours)[len(theirs) :]]
    assert extras and all(ours[p].kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    fn_ours = inspect.signature(cross_entropy).parameters
    fn_theirs = inspect.signature(F.cross_entropy).parameters
    assert list(fn_ours)[: len(fn_theirs)] == list(fn_theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_forward_and_state_dict(backend):
    w = torch.rand(7, dtype=torch.float64)
    ours = CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum", backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x, target, _ = make_case((9, 7))
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    assert "label_smoothing=0.1" in repr(ours)
    lse_mod = CrossEntropyLoss(backend=backend, return_lse=True, z_loss=1e-4)
    loss, lse = lse_mod(x, target)
    assert loss.shape == () and lse.shape == (9,)


def test_compile_fullgraph_cpu():
    x, target, _ = make_case((6, 9))
    x.requires_grad_()
    fn = torch.compile(lambda a, b: cross_entropy(a, b, backend="cpu", label_smoothing=0.1), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    got = fn(x, target)
    want = F.cross_entropy(x, target, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got * 2.0, x)
    (g_want,) = torch.autograd.grad(want * 2.0, x)
    torch.testing.assert_close(g_got, g_want)


# --- GPU (scripts/gpu_check.sh) -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_parity_grid(backend, dtype, case):
    _, shape, opts = case
    opts = dict(opts)
    ignore_index = opts.pop("ignore_index", -100)
    ls = opts.pop("label_smoothing", 0.0)
    x, target, w = make_case(shape, ignore_index=ignore_index, **opts)
    to = lambda t: None if t is None else t.cuda()
    for reduction in REDUCTIONS:
        check(backend, dtype, x.cuda(), target.cuda(), to(w), reduction=reduction, label_smoothing=ls,
              ignore_index=ignore_index)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,dtype", [((64, 128256), torch.bfloat16), ((32, 32003), torch.float32),
                                         ((8, 262144), torch.bfloat16), ((16, 32000), torch.float32)])  # fmt: skip
def test_gpu_large_vocab(backend, shape, dtype):
    x, target, w = make_case(shape, weight=True, ignore_frac=0.1)
    check(backend, dtype, x.cuda(), target.cuda(), w.cuda(), reduction="mean", label_smoothing=0.1, z_loss=1e-4,
          softcap=30.0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["huge-equal", "huge-unequal", "minus-inf", "offset"])
def test_gpu_large_logits(backend, dtype, kind):
    x, target = large_logits(kind, dtype)
    w = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    prob = torch.softmax(torch.randn(x.shape, generator=torch.Generator().manual_seed(7)), 1)
    for reduction in ("none", "mean"):
        check(backend, dtype, x.cuda(), target.cuda(), reduction=reduction)
        check(backend, dtype, x.cuda(), target.cuda(), w.cuda(), reduction=reduction, label_smoothing=0.1)
        check(backend, dtype, x.cuda(), prob.cuda(), reduction=reduction, label_smoothing=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cap", [30.0, 1000.0])
def test_gpu_softcap_precision(backend, cap):
    """The compiled kernels' tanh (libdevice in Triton, tanhf in CUDA) is as exact as torch's."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 37, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, 37, (16,), generator=g)
    check(backend, torch.float32, x.cuda(), target.cuda(), reduction="none", softcap=cap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_of_ones_and_mixed_rows(backend):
    """The backward skips rows whose grad_output is exactly 1 and scales the others."""
    x, target, _ = make_case((6, 9), ignore_frac=0.2)
    for go in (torch.ones(6, dtype=torch.float64), torch.tensor([1.0, 2.0, 1.0, -0.5, 1.0, 0.0], dtype=torch.float64)):
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(F.cross_entropy(xr, target, reduction="none"), xr, go)
        (got,) = torch.autograd.grad(cross_entropy(xf, target, reduction="none", backend=backend), xf, go)
        torch.testing.assert_close(got, want, **tol(torch.float64))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is not built")
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_kernel_on_lower_isas(isa):
    """Every ISA copy of the CPU kernel (the process picks the best one) against torch, in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        "from fusedopt import _backend\n"
        "from fusedopt.nn.functional import cross_entropy\n"
        f"assert _backend.cpu_extension()[0].cpu_capability() == {isa!r}\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype in (torch.float32, torch.float64, torch.bfloat16):\n"
        "    for C in (2, 37, 1000):\n"
        "        x = (torch.randn(9, C, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()\n"
        "        t = torch.randint(0, C, (9,), generator=g); t[3] = -100\n"
        "        w = torch.rand(C, generator=g, dtype=torch.float64).to(dtype)\n"
        "        xr = x.detach().double().requires_grad_()\n"
        "        a = F.cross_entropy(xr, t, w.double(), label_smoothing=0.1, reduction='none')\n"
        "        b = cross_entropy(x, t, w, label_smoothing=0.1, reduction='none', backend='cpu')\n"
        "        go = torch.rand(9, generator=g, dtype=torch.float64) + 0.5\n"
        "        (ga,) = torch.autograd.grad(a, xr, go); (gb,) = torch.autograd.grad(b, x, go.to(dtype))\n"
        "        rtol, atol = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-10, 1e-12),\n"
        "                      torch.bfloat16: (1.6e-2, 1e-4)}[dtype]\n"
        "        torch.testing.assert_close(b.double(), a, rtol=rtol, atol=atol)\n"
        "        torch.testing.assert_close(gb.double(), ga, rtol=rtol, atol=atol)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEDOPT_CPU_CAPABILITY=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --- large logits: lse - z must not cancel (issue 13) ----------------------------------------------------------------
def large_logits(kind, dtype):
    """float64 logits (already representable in dtype) and targets where max + log(sum) would round log(sum) away."""
    g = torch.Generator().manual_seed(5)
    if kind == "offset":  # a moderate spread on a large offset: 1e4 in fp32 (ulp 1e-3), 1e12 in fp64
        offset = {torch.float64: 1e12, torch.float16: 1e3}.get(dtype, 1e4)
        x = torch.randn(6, 37, generator=g, dtype=torch.float64) * 3 + offset
    else:
        huge = 3e4 if dtype == torch.float16 else 1e30  # fp16: the largest loss (2 huge) stays finite
        x = torch.full((6, 9), huge, dtype=torch.float64)
        if kind == "huge-unequal":
            x[:, 5:] = torch.tensor([huge / 2, -huge, 0.0, -huge / 4])
        elif kind == "minus-inf":
            x[:, 1::3] = float("-inf")
    target = torch.tensor([3, 0, 8, 5, 6, 2]) % x.shape[1]
    return x.to(dtype).double(), target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["huge-equal", "huge-unequal", "minus-inf", "offset"])
@pytest.mark.parametrize("opts", ["plain", "weight-smoothing", "prob"])
def test_large_logits_match_torch(backend, dtype, kind, opts):
    """A row of nine logits equal to 1e30 has loss log(9) and target gradient -8/9 (not 0 and 0 or 1)."""
    x, target = large_logits(kind, dtype)
    weight, ls = None, 0.0
    if opts == "weight-smoothing":
        weight, ls = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5, 0.1
    elif opts == "prob":
        target, ls = torch.softmax(torch.randn(x.shape, generator=torch.Generator().manual_seed(7)), 1), 0.05
    for reduction in ("none", "mean"):
        check(backend, dtype, x, target, weight, reduction=reduction, label_smoothing=ls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_logits_with_z_loss_and_lse(backend, dtype):
    """z_loss adds z * lse^2 with lse itself still max + log(sum), which return_lse gives."""
    x, target = large_logits("offset", dtype)
    target[1] = -100
    check(backend, dtype, x, target, reduction="none", label_smoothing=0.1, z_loss=1e-4)
    _, lse = cross_entropy(x.to(dtype), target, reduction="none", backend=backend, return_lse=True)
    want = torch.where(target != -100, torch.logsumexp(x, dim=1), 0.0)
    torch.testing.assert_close(lse.double(), want, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [30.0, 1000.0])
def test_softcap_precision_vs_float64(backend, cap):
    """cap * tanh(x / cap) to about an ulp of the capped logit, not of cap: with 1 - 2 / (exp(2u) + 1) the capped
    logits were off by ~cap * eps (1000 * 6e-8), which shows in the fp32 loss and gradient."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 37, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, 37, (16,), generator=g)
    check(backend, torch.float32, x, target, reduction="none", softcap=cap)


if "triton" in BACKENDS:
    import triton
    import triton.language as tl

    from fusedopt.triton_kernels.cross_entropy import _softcap

    @triton.jit
    def _capped_logits_kernel(X, Z, cap, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        z = _softcap(tl.load(X + cols, mask=cols < n).to(ACC), cap, True, False, ACC)
        tl.store(Z + cols, z, mask=cols < n)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not usable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_softcap_capped_logits_within_two_ulp(dtype):
    """The Triton kernel's capped logits themselves against long double, relative to the capped value: the tanh the
    interpreter runs (compiled kernels use the device's tanh; test_gpu_softcap_precision checks those)."""
    import numpy as np

    u = torch.cat([torch.logspace(-6, 1.5, 400, dtype=torch.float64), torch.linspace(0.3, 0.5, 101).double()])
    u = torch.cat([u, -u])
    for cap in (1.0, 30.0, 1000.0):
        x = (u * cap).to(dtype)
        z = torch.empty_like(x)
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        _capped_logits_kernel[(1,)](x, z, cap, x.numel(), ACC=acc, BLOCK=1024)
        exact = torch.from_numpy((cap * np.tanh(x.numpy().astype(np.longdouble) / cap)).astype(np.float64))
        ulps = ((z.double() - exact).abs() / (exact.abs() * torch.finfo(dtype).eps)).max().item()
        assert ulps <= 2.0, f"cap {cap}: capped logits off by {ulps:.1f} ulp"


# --- torch's answers at the edges (issue 13) --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [-0.5, -1e-9, float("-inf"), float("nan"), 1.0])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_label_smoothing_outside_0_1_like_torch(backend, label_smoothing, prob):
    """torch smooths only when label_smoothing > 0: a negative or NaN one is no smoothing (1.0 is full smoothing)."""
    x, target, w = make_case((7, 5), prob=prob, weight=True, ignore_frac=0.0 if prob else 0.3)
    for reduction in ("none", "mean"):
        check(backend, torch.float64, x, target, w, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [1.0000001, 1.5, float("inf")])
def test_label_smoothing_above_1_raises_like_torch(label_smoothing):
    x, target, _ = make_case((4, 5))
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
        F.cross_entropy(x, target, label_smoothing=label_smoothing)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
        cross_entropy(x, target, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("zeros", ["all", "targets"])
def test_zero_weight_mean_is_nan_like_torch(backend, label_smoothing, zeros):
    """A mean over rows whose class weights sum to 0: torch's loss is 0/0 and its gradient NaN on the kept rows (an
    ignored row's gradient stays 0)."""
    x, target, _ = make_case((6, 5))
    target[2] = -100
    w = torch.zeros(5, dtype=torch.float64) if zeros == "all" else torch.ones(5, dtype=torch.float64)
    w[target[target != -100]] = 0.0
    check(backend, torch.float64, x, target, w, reduction="mean", label_smoothing=label_smoothing)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(xr, target, w, backend=backend, label_smoothing=label_smoothing), xr)
    assert torch.isnan(g[target != -100]).all() and torch.equal(g[2], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_mean_is_mean_with_torchs_warning(backend):
    x, target, w = make_case((6, 5), weight=True, ignore_frac=0.3)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        want = F.cross_entropy(x, target, w, reduction="elementwise_mean")
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        got = cross_entropy(x, target, w, reduction="elementwise_mean", backend=backend)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        got_module = CrossEntropyLoss(w, reduction="elementwise_mean", backend=backend)(x, target)
    torch.testing.assert_close(got, want, **tol(torch.float64, True))
    torch.testing.assert_close(got_module, want, **tol(torch.float64, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_target_dtype_promotes_with_the_weight(backend):
    """torch multiplies probability targets by the weight in the weight's dtype: float64 weight, float64 loss."""
    x, target, w = make_case((4, 6), prob=True, weight=True)
    for reduction in REDUCTIONS:
        want = F.cross_entropy(x.float(), target.float(), w, reduction=reduction)
        got = cross_entropy(x.float(), target.float(), w, reduction=reduction, backend=backend)
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, **tol(torch.float32, reduction != "none"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64], ids=str)
def test_wide_probability_targets_with_16bit_logits(backend, dtype, target_dtype):
    """torch uses float32/float64 probability targets unrounded next to 16-bit logits and returns the promoted dtype:
    so does fusedopt (in float32, its math precision), instead of rounding the targets to the logits' dtype."""
    x, target, _ = make_case((5, 37), prob=True)
    target = torch.softmax(torch.randn(5, 37, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 4, 1)
    target = target.to(target_dtype)
    x16 = x.to(dtype).requires_grad_()
    xr = x16.detach().double().requires_grad_()
    for reduction in REDUCTIONS:
        got = cross_entropy(x16, target, reduction=reduction, backend=backend)
        assert got.dtype == F.cross_entropy(x16.detach(), target, reduction=reduction).dtype == target_dtype
        want = F.cross_entropy(xr, target.double(), reduction=reduction)
        torch.testing.assert_close(got.double(), want, **tol(torch.float32, reduction != "none"))
        go = torch.rand(want.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) + 0.5
        (g,) = torch.autograd.grad(got, x16, go.to(got.dtype))
        (g_want,) = torch.autograd.grad(want, xr, go)
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), g_want, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,prob", [((0, 0), False), ((0, 5), False), ((0, 0), True), ((3, 0), True),
                                        ((2, 0, 3), True), ((0, 4, 2), False)])  # fmt: skip
def test_empty_inputs_like_torch(backend, shape, prob):
    """Empty batches and empty class dimensions: torch's values (0 for a sum, NaN for a mean), shapes and dtypes."""
    x = torch.zeros(shape)
    target = torch.zeros(shape) if prob else torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    for reduction in REDUCTIONS:
        want = F.cross_entropy(x, target, reduction=reduction)
        got = cross_entropy(x, target, reduction=reduction, backend=backend)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype_grads_are_named_in_the_error(backend):
    """The op layer checks the gradient buffers for every backend, naming the one that is wrong."""
    from fusedopt.ops import cross_entropy as ce_ops

    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, prob_target=False, backend=backend)
    with pytest.raises(RuntimeError, match=r"grad_out must be shaped and typed like the logits \(torch.float32"):
        ce_ops.cross_entropy_fwd(x, target, None, need_grad=True, grad_out=torch.empty(4, 5, dtype=torch.float64),
                                 **opts)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"grad must be float32, float64, bfloat16 or float16, got torch.int32"):
        ce_ops.cross_entropy_scale_grad_(torch.ones(4, 5, dtype=torch.int32), torch.ones(1), backend=backend)
    with pytest.raises(RuntimeError, match=r"grad_output \(scale\) must be torch.float32 for a torch.bfloat16 grad"):
        ce_ops.cross_entropy_scale_grad_(x.bfloat16(), torch.ones(1, dtype=torch.float64), backend=backend)
