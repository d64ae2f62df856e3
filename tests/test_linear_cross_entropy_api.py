"""fusedopt's linear_cross_entropy / LinearCrossEntropyLoss as drop-ins for torch 2.14's F.linear_cross_entropy /
nn.LinearCrossEntropyLoss: the cases of torch's own tests (its OpInfo samples and module inputs) compared with
torch's reference path in float64, forward and backward; fusedopt's layouts (3-D input), options, the deprecated
bias, torch's errors, torch.func, retain_graph and create_graph, and the float32 loss of 16-bit inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import fusedopt
from fusedopt.nn.functional import linear_cross_entropy

LCEO = torch.nn.LinearCrossEntropyOptions
F64 = torch.float64


def _rand(*shape, seed, low=-2.0, high=2.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(tuple(shape), generator=gen, dtype=F64) * (high - low) + low
    return t.requires_grad_(requires_grad)


def _compare(ours, ref, leaves, what):
    """Loss and the grads of every leaf that requires grad, fusedopt vs torch, in float64, non-unit grad_output."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    torch.testing.assert_close(ours, ref, **tol(F64), equal_nan=True, msg=lambda m: f"{what}: loss: {m}")
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    if not wanted or ref.numel() == 0:
        return
    grad_out = _rand(*ref.shape, seed=99, low=0.5, high=1.5)
    got = torch.autograd.grad(ours, wanted, grad_out, allow_unused=True)
    exp = torch.autograd.grad(ref, wanted, grad_out, allow_unused=True)
    for i, (g, e) in enumerate(zip(got, exp)):
        torch.testing.assert_close(g, e, **tol(F64), msg=lambda m, i=i: f"{what}: grad {i}: {m}")


# --- torch's OpInfo samples for nn.functional.linear_cross_entropy -----------------------------------------------
# (in_features, num_classes) x batch shapes, as torch's sample_inputs_linear; a 2-D batch becomes torch's
# K-dimensional case (weight (C, d1, H)). The keyword sets are torch's, for its reference and chunked variants.
FEATURES = [(3, 4), (8, 8)]
BATCHES = [(), (8,), (2, 3)]
KWARGS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"weight": "mean"}, {"weight": "sum"}, {"weight": "none"},
          {"ignore_index": 1}, {"linear_bias": True}, {"linear_bias": True, "weight": "sum"},
          {"options": 2}, {"options": 3}, {"options": 2, "weight": "mean"},
          {"options": 2, "linear_bias": True, "ignore_index": 1}, {"options": 2, "reduction": "none"}]  # fmt: skip


def _opinfo_samples():
    for (h, c), batch, kw, prob in itertools.product(FEATURES, BATCHES, KWARGS, (False, True)):
        if prob and "ignore_index" in kw:
            continue  # torch: ignore_index is not supported with probability targets
        seed = len(batch) * 1000 + h * 100 + c + 7 * KWARGS.index(kw) + prob
        if len(batch) <= 1:
            x, w = _rand(*batch, h, seed=seed), _rand(c, h, seed=seed + 1)
            tshape = (*batch, c) if prob else batch
        else:  # torch swaps the linear sample's input and weight: 2-D input, (C, d1, H) weight
            x, w = _rand(c, h, seed=seed), _rand(*batch, h, seed=seed + 1)
            tshape = (c, *batch) if prob else (c, *batch[1:])
        classes = w.shape[0]
        target = _rand(*tshape, seed=seed + 2, low=0, high=1) if prob else torch.randint(
            0, classes, tshape, generator=torch.Generator().manual_seed(seed + 3))  # fmt: skip
        kwargs = {}
        if "weight" in kw:
            kwargs["weight"], kwargs["reduction"] = _rand(classes, seed=seed + 4, low=0.5, high=2.0), kw["weight"]
        if "linear_bias" in kw:
            kwargs["linear_bias"] = _rand(*w.shape[:-1], seed=seed + 5)
        if "options" in kw:
            kwargs["options"] = LCEO(batch_chunk_size=kw["options"], allow_retain_graph=True)
        kwargs.update({k: v for k, v in kw.items() if k in ("reduction", "ignore_index")})
        ii = kwargs.get("ignore_index")
        if ii is not None and kwargs.get("reduction", "mean") == "mean" and (target == ii).all():
            target.view(-1)[0] = (ii + 1) % classes  # a valid mean needs one kept row
        yield f"h{h}-c{c}-b{batch}-{kw}-{'prob' if prob else 'index'}", x, w, target, kwargs


@pytest.mark.parametrize("requires_grad", [False, True])
def test_torch_opinfo_samples(requires_grad):
    count = 0
    for what, x, w, target, kwargs in _opinfo_samples():
        leaves = [x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), kwargs.get("linear_bias")]
        if leaves[2] is not None:
            leaves[2].requires_grad_(requires_grad)
        if target.is_floating_point():
            leaves.append(target.requires_grad_(requires_grad))  # torch differentiates probability targets
        torch_kwargs = {k: v for k, v in kwargs.items() if k != "options"}  # torch's reference path
        _compare(linear_cross_entropy(x, w, target, chunk_size=3, vocab_block_size=3, **kwargs),
                 F.linear_cross_entropy(x, w, target, **torch_kwargs), leaves, what)  # fmt: skip
        count += 1
    assert count == 156  # every sample ran


# --- torch's module inputs for nn.LinearCrossEntropyLoss ---------------------------------------------------------
def _module_cases(num_batches, in_features, classes):
    ignore_indices = [None, -100, (classes - 1) // 2, classes + 5]
    grid = itertools.product(["sum", "mean", "none"], ignore_indices, [0.0, 0.1], [False, True], [(), (3, 2, 4)])
    for reduction, ii, ls, weighted, of in grid:
        if (num_batches is None and of) or (ii is not None and reduction == "sum"):
            continue  # torch: a K-dimensional loss needs a batch; fewer sum samples
        for prob in (False, True):
            if prob and ii is not None:
                continue
            yield reduction, ii, ls, weighted, of, prob


@pytest.mark.parametrize("sizes", [(8, 5, 4), (None, 8, 4)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_torch_module_inputs(sizes, bias):
    """fusedopt.nn.LinearCrossEntropyLoss with the state dict of torch's module: same loss, input grad, and grads of
    the module's own linear.weight / linear.bias; targets with ignore_index in and out of range, all ignored."""
    num_batches, in_features, classes = sizes
    batch = () if num_batches is None else (num_batches,)
    for i, (reduction, ii, ls, weighted, of, prob) in enumerate(_module_cases(num_batches, in_features, classes)):
        cw = _rand(classes, seed=i, low=-1, high=1).exp() if weighted else None
        kw = dict(out_features=of, bias=bias, dtype=F64, reduction=reduction, weight=cw, ignore_index=ii,
                  label_smoothing=ls)  # fmt: skip
        theirs = torch.nn.LinearCrossEntropyLoss(in_features, classes, **kw)
        ours = fusedopt.nn.LinearCrossEntropyLoss(in_features, classes, chunk_size=3, vocab_block_size=2, **kw)
        ours.load_state_dict(theirs.state_dict())
        targets = []
        if prob:
            targets.append(_rand(*batch, classes, *of, seed=i + 1, low=0, high=1))
        else:
            t = torch.randint(0, classes, (*batch, *of), generator=torch.Generator().manual_seed(i))
            targets.append(t)
            if ii is not None and batch and num_batches > 1:
                t2 = t.clone()
                t2[num_batches // 2], t2[0] = ii, 0
                targets.append(t2)
            if ii is not None and reduction != "mean":
                targets.append(torch.full_like(t, ii))
        for k, target in enumerate(targets):
            x = _rand(*batch, in_features, seed=100 + i + k, requires_grad=True)
            what = f"case {i} target {k}: reduction={reduction} ii={ii} ls={ls} w={weighted} of={of} prob={prob}"
            _compare(ours(x, target), theirs(x, target), [x], what)
            got = torch.autograd.grad(ours(x, target).sum(), list(ours.parameters()))
            exp = torch.autograd.grad(theirs(x, target).sum(), list(theirs.parameters()))
            for g, e in zip(got, exp):
                torch.testing.assert_close(g, e, **tol(F64), msg=lambda m, what=what: f"{what}: param grad: {m}")


def test_module_is_torchs_class_with_extras():
    m = fusedopt.LinearCrossEntropyLoss(16, 50, bias=True, z_loss=1e-3, softcap=30.0)
    assert isinstance(m, torch.nn.LinearCrossEntropyLoss)
    assert set(m.state_dict()) == set(torch.nn.LinearCrossEntropyLoss(16, 50, bias=True).state_dict())
    assert "softcap=30.0" in repr(m) and "z_loss=0.001" in repr(m)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fusedopt.LinearCrossEntropyLoss(16, 50, label_smoothing=-0.5)  # torch's module checks that


# --- fusedopt's layouts and torch's edge inputs ------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_three_d_input_is_the_flattened_reference(reduction, prob):
    x, w, b = _rand(2, 5, 6, seed=1, requires_grad=True), _rand(11, 6, seed=2, requires_grad=True), _rand(11, seed=3)
    t = _rand(2, 5, 11, seed=4, low=0, high=1) if prob else torch.randint(0, 11, (2, 5))
    if not prob:
        t[1, 2] = -100

    def reference():
        logits = F.linear(x, w, b).flatten(0, -2)
        loss = F.cross_entropy(logits, t.flatten(0, -2) if prob else t.flatten(), reduction=reduction)
        return loss.reshape(2, 5) if reduction == "none" else loss

    _compare(linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=4), reference(), [x, w],
             f"3-D {reduction} prob={prob}")  # fmt: skip


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["row_chunked", "vocab_blocked"])
def test_empty_and_single_rows_and_byte_targets(n, reduction, mode):
    x, w = _rand(n, 4, seed=5, requires_grad=True), _rand(7, 4, seed=6, requires_grad=True)
    t = torch.randint(0, 7, (n,), dtype=torch.uint8)
    _compare(linear_cross_entropy(x, w, t, reduction=reduction, mode=mode, vocab_block_size=3),
             F.linear_cross_entropy(x, w, t, reduction=reduction), [x, w], f"n={n} {mode}")  # fmt: skip


@pytest.mark.parametrize("label_smoothing", [-0.3, float("nan"), 0.0])
def test_label_smoothing_negative_or_nan_means_none_as_in_torch(label_smoothing):
    x, w = _rand(6, 4, seed=7, requires_grad=True), _rand(9, 4, seed=8)
    t = torch.randint(0, 9, (6,))
    _compare(linear_cross_entropy(x, w, t, label_smoothing=label_smoothing),
             F.linear_cross_entropy(x, w, t, label_smoothing=label_smoothing), [x], "smoothing")  # fmt: skip


def test_ignore_index_none_means_minus_100():
    x, w = _rand(6, 4, seed=9, requires_grad=True), _rand(9, 4, seed=10)
    t = torch.randint(0, 9, (6,))
    t[2] = -100
    _compare(linear_cross_entropy(x, w, t, ignore_index=None), F.cross_entropy(F.linear(x, w), t, ignore_index=-100),
             [x], "ignore_index=None")  # fmt: skip


def test_deprecated_bias_still_works_with_a_warning():
    x, w, b = _rand(6, 4, seed=11), _rand(9, 4, seed=12), _rand(9, seed=13)
    t = torch.randint(0, 9, (6,))
    ref = F.cross_entropy(F.linear(x, w, b), t)
    with pytest.warns(DeprecationWarning, match="linear_bias"):
        torch.testing.assert_close(linear_cross_entropy(x, w, t, b), ref)
    with pytest.warns(DeprecationWarning, match="linear_bias"):
        torch.testing.assert_close(linear_cross_entropy(x, w, t, bias=b), ref)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="both"):
        linear_cross_entropy(x, w, t, b, linear_bias=b)


def test_float32_loss_of_bf16_inputs_is_hf_upcast():
    """loss_dtype=torch.float32: HF's loss upcasts the logits (`logits.float()`) before F.cross_entropy."""
    x, w = _rand(12, 8, seed=14).bfloat16().requires_grad_(), _rand(40, 8, seed=15).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (12,))
    for mode in ("row_chunked", "vocab_blocked"):
        loss = linear_cross_entropy(x, w, t, loss_dtype=torch.float32, mode=mode, vocab_block_size=16)
        ref = F.cross_entropy(F.linear(x, w).float(), t)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, **tol(torch.float32, reduction=True))
        for g, r in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref, (x, w))):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), r.float(), **tol(torch.bfloat16, reduction=True))


# --- torch's errors ----------------------------------------------------------------------------------------------
def _bad_cases():
    x, w, t = _rand(2, 3, seed=1), _rand(2, 3, seed=2), torch.tensor([0, 1])
    probs = _rand(2, 2, seed=3, low=0, high=1)
    return [  # (name, args, kwargs): torch's error inputs, then cross_entropy's checks reached through it
        ("1-D weight", (x, _rand(2, seed=4), probs), {}),
        ("in_features", (x, _rand(2, 4, seed=5), probs), {}),
        ("prob + ignore_index", (x, w, probs), {"ignore_index": 0}),
        ("K-dim unbatched", (_rand(3, seed=6), _rand(2, 4, 3, seed=7), _rand(2, 4, seed=8)), {}),
        ("bias shape", (x, w, t), {"linear_bias": _rand(3, seed=9)}),
        ("int32 target", (x, w, t.int()), {}),
        ("batch mismatch", (x, w, t[:1]), {}),
        ("2-D target", (x, w, t[:, None]), {}),
        ("class weight shape", (x, w, t), {"weight": _rand(3, seed=10)}),
        ("class weight dtype", (x, w, t), {"weight": _rand(2, seed=11).float()}),
        ("label_smoothing > 1", (x, w, t), {"label_smoothing": 1.5}),
        ("reduction", (x, w, t), {"reduction": "avg"}),
        ("dtypes", (x.float(), w, t), {}),
    ]


@pytest.mark.parametrize("case", range(13))
def test_torch_error_types(case):
    name, args, kwargs = _bad_cases()[case]
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        linear_cross_entropy(*args, **kwargs)
    if name != "dtypes":  # torch's message there comes from its matmul; ours names the three tensors
        assert str(ours.value).split(",")[0] == str(theirs.value).split(",")[0], name


# --- autograd: torch.func, retain_graph, create_graph ------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["row_chunked", "vocab_blocked"])
def test_torch_func_grad(reduction, mode):
    x, w, b = _rand(7, 4, seed=20), _rand(13, 4, seed=21), _rand(13, seed=22)
    t = torch.randint(0, 13, (7,))

    def loss_of(fn):
        return lambda x, w, b: fn(x, w, t, b).sum()

    ours = loss_of(lambda x, w, t, b: linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, mode=mode,
                                                           chunk_size=3, vocab_block_size=5))  # fmt: skip
    theirs = loss_of(lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction))
    got = torch.func.grad(ours, argnums=(0, 1, 2))(x, w, b)
    exp = torch.func.grad(theirs, argnums=(0, 1, 2))(x, w, b)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **tol(F64))


def test_higher_order_gradients_raise_a_clear_error():
    x, w = _rand(5, 4, seed=23, requires_grad=True), _rand(9, 4, seed=24, requires_grad=True)
    t = torch.randint(0, 9, (5,))
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(linear_cross_entropy(x, w, t), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(linear_cross_entropy(x, w, t, reduction="none").sum(), [x], create_graph=True)
    fn = lambda x: linear_cross_entropy(x, w.detach(), t)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.func.grad(lambda x: torch.func.grad(fn)(x).sum())(x.detach())


def test_second_backward_needs_allow_retain_graph():
    x, w = _rand(5, 4, seed=25, requires_grad=True), _rand(9, 4, seed=26, requires_grad=True)
    t = torch.randint(0, 9, (5,))
    loss = linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph=True"):
        loss.backward()
    x.grad = w.grad = None
    loss = linear_cross_entropy(x, w, t, options=LCEO(allow_retain_graph=True))
    (2 * loss).backward(retain_graph=True)
    loss.backward()
    ref = F.cross_entropy(F.linear(x, w), t)
    for p, g in zip((x, w), torch.autograd.grad(3 * ref, (x, w))):
        torch.testing.assert_close(p.grad, g, **tol(F64))


def test_options_batch_chunk_size_is_the_chunk_size(monkeypatch):
    from fusedopt.nn import _linear_ce_engines as engines

    seen = []
    real = engines.compute
    monkeypatch.setattr(engines, "compute", lambda *a: seen.append(a[5].chunk_rows) or real(*a))
    x, w = _rand(10, 4, seed=27), _rand(9, 4, seed=28)
    t = torch.randint(0, 9, (10,))
    linear_cross_entropy(x, w, t, options=LCEO(batch_chunk_size=3))
    linear_cross_entropy(x, w, t, options=LCEO(batch_chunk_size=3), chunk_size=4)  # fusedopt's keyword wins
    assert seen == [3, 4]


def test_autocast_leaves_float64_alone():
    """As F.linear under autocast: float64 operands are not cast (a float32 input with a float64 weight is then a
    dtype error, in torch too); an all-float64 call is exact."""
    x, w, t = _rand(4, 3, seed=30), _rand(5, 3, seed=31, requires_grad=True), torch.tensor([0, 1, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            F.linear_cross_entropy(x.float(), w, t)
        with pytest.raises(RuntimeError, match="share a dtype"):
            linear_cross_entropy(x.float(), w, t)
        ours = linear_cross_entropy(x, w, t)
        ref = F.cross_entropy(F.linear(x, w), t)
    assert ours.dtype == ref.dtype == F64
    _compare(ours, ref, [w], "float64 under autocast")
