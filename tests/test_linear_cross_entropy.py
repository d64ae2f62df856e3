"""linear_cross_entropy against the unfused expression F.cross_entropy(F.linear(input, weight, bias), target, ...) in
float64: loss and every gradient, on every backend that runs here, in both modes (row-chunked, vocab-blocked), with
chunk and vocabulary-block sizes that cross the boundaries. torch's API (signature, module, layouts, autocast,
torch.func, errors) is tested in test_linear_cross_entropy_api.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, cpu_backends, tol

from fusedopt import reference
from fusedopt.nn.functional import linear_cross_entropy


def make_case(n, h, v, dtype, *, ignore_frac=0.2, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, dtype=torch.float64, generator=gen).to(dtype)
    w = (torch.randn(v, h, dtype=torch.float64, generator=gen) / h**0.5).to(dtype)
    b = torch.randn(v, dtype=torch.float64, generator=gen).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignore_frac] = -100
    return x, w, b, t


class _StoredAs(torch.autograd.Function):
    """Rounds to `dtype` and back, forward and backward: the points where the unfused expression in `dtype` stores
    a tensor (F.linear's logits, and their gradient). Everything else of the reference runs in float64."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).double()

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).double(), None


MODES = ["row_chunked", "vocab_blocked"]


def check(backend, dtype, x, w, b, t, *, reduction="mean", chunk_size=None, requires=(True, True, True),
          mode="row_chunked", vocab_block_size=None, **extras):  # fmt: skip
    """Fused in `dtype` vs the float64 unfused expression on the same (rounded) inputs, with the logits and their
    gradient rounded to `dtype` where F.linear in `dtype` stores them; non-unit grad_output."""
    leaves = [x, w, b]
    fused_in = [None if a is None else a.clone().requires_grad_(r) for a, r in zip(leaves, requires)]
    ref_in = [None if a is None else a.double().requires_grad_(r) for a, r in zip(leaves, requires)]
    out = linear_cross_entropy(fused_in[0], fused_in[1], t, linear_bias=fused_in[2], reduction=reduction,
                               backend=backend, chunk_size=chunk_size, mode=mode, vocab_block_size=vocab_block_size,
                               **extras)  # fmt: skip
    logits = _StoredAs.apply(F.linear(ref_in[0], ref_in[1], ref_in[2]), dtype)
    ref_extras = dict(extras)
    if ref_extras.get("weight") is not None:
        ref_extras["weight"] = ref_extras["weight"].double()
    ref = reference.cross_entropy_formula(logits, t, reduction=reduction, **ref_extras)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tol(dtype, reduction=True))
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 1.5
    wanted = [i for i, a in enumerate(fused_in) if a is not None and a.requires_grad]
    if not wanted:
        return
    got = torch.autograd.grad(out, [fused_in[i] for i in wanted], grad_out.to(dtype))
    exp = torch.autograd.grad(ref, [ref_in[i] for i in wanted], grad_out)
    for i, g, e in zip(wanted, got, exp):
        assert g.dtype == dtype, f"grad {i} dtype"
        # Gradients are sums over rows or classes: reduction tolerances, plus one storage rounding of a logit's
        # gradient landing on the other side (fp32 vs float64 softmax) times the largest factor it multiplies.
        rtol, atol = tol(dtype, reduction=True).values()
        other = max(a.abs().max().item() for a in (x, w) if a.numel())
        flip = 2 * torch.finfo(dtype).eps * other
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol + flip,
                                   msg=lambda m, i=i: f"grad {['input', 'weight', 'bias'][i]}: {m}")  # fmt: skip


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("mode", MODES)
def test_parity_grid(backend, dtype, reduction, bias, chunk_size, mode):
    x, w, b, t = make_case(33, 24, 101, dtype, bias=bias)
    check(backend, dtype, x, w, b, t, reduction=reduction, chunk_size=chunk_size, mode=mode,
          vocab_block_size=None if chunk_size is None else 13)  # fmt: skip


# The vocab-blocked mode's second pass is plain tensor ops: with Triton (interpreted here, slow) only the row pass
# differs from the cpu backend's, and row_chunked covers that.
BACKEND_MODES = [(b, m) for b in cpu_backends() for m in MODES if not (b == "triton" and m == "vocab_blocked")]


@pytest.mark.parametrize(("backend", "mode"), BACKEND_MODES)
@pytest.mark.parametrize(
    "extras",
    [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=5.0), dict(label_smoothing=0.2, z_loss=1e-2,
     softcap=3.0), dict(ignore_index=7), dict(weight=True), dict(weight=True, label_smoothing=0.1, z_loss=1e-2)],
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()),
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options(backend, mode, extras, reduction):
    dtype = torch.float64 if backend != "triton" else torch.float32
    x, w, b, t = make_case(19, 16, 37, dtype)
    extras = dict(extras)
    if "ignore_index" in extras:
        t[t == -100] = 0  # -100 is an ordinary (out-of-range) class when another ignore_index is set
        t[::3] = extras["ignore_index"]
    if extras.get("weight"):  # class weights, in the input's dtype as torch requires
        extras["weight"] = torch.rand(37, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).add(0.5)
        extras["weight"] = extras["weight"].to(dtype)
    check(backend, dtype, x, w, b, t, reduction=reduction, chunk_size=5, mode=mode, vocab_block_size=8, **extras)


@pytest.mark.parametrize("requires", list(itertools.product([False, True], repeat=3)), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_only_some_inputs_require_grad(requires, mode):
    x, w, b, t = make_case(21, 8, 29, torch.float64)
    check("cpu", torch.float64, x, w, b, t, chunk_size=4, requires=requires, mode=mode, vocab_block_size=6)
    check("cpu", torch.float64, x, w, b, t, reduction="none", chunk_size=4, requires=requires, mode=mode,
          vocab_block_size=6)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_all_rows_ignored_mean_is_nan_with_zero_grads(mode):
    x, w, b, t = make_case(6, 4, 9, torch.float64)
    t[:] = -100
    x.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, mode=mode, vocab_block_size=4)
    assert torch.isnan(loss)
    for g in torch.autograd.grad(loss, [x, w]):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_blocked_ignored_rows_with_huge_logits_give_zero_not_nan(dtype):
    """The row kernel reports an ignored row's logsumexp as 0: its huge logits must not reach exp(z - 0), which
    would overflow and give inf * 0 = NaN in the weight gradient."""
    x, w, _, t = make_case(8, 4, 9, dtype, bias=False)
    x[0] = 1e4
    t[0], t[1:] = -100, 3
    w.requires_grad_()
    loss = linear_cross_entropy(x, w, t, mode="vocab_blocked", vocab_block_size=4)
    (gw,) = torch.autograd.grad(loss, [w])
    assert torch.isfinite(gw).all()
    check("cpu", dtype, x, w.detach(), None, t, mode="vocab_blocked", vocab_block_size=4)


def test_vocab_blocked_several_row_tiles(monkeypatch):
    """Rows that do not fit one tile: the block-sized float32 accumulator (16-bit) or d_weight itself (fp32/fp64)."""
    from fusedopt.nn import _linear_ce_engines as engines

    monkeypatch.setattr(engines, "TILE_BYTES", 8 * 5 * 2)  # 5 rows of an 8-column bf16 tile, 2.5 of an fp64 one
    for dtype in (torch.float64, torch.bfloat16):
        x, w, b, t = make_case(23, 8, 29, dtype)
        check("cpu", dtype, x, w, b, t, mode="vocab_blocked", vocab_block_size=8, chunk_size=6)
        check("cpu", dtype, x, w, b, t, reduction="none", mode="vocab_blocked", vocab_block_size=8, chunk_size=6)


def test_auto_mode_picks_vocab_blocked_for_a_large_16_bit_head():
    from fusedopt.nn.linear_cross_entropy import _resolve_mode

    big = torch.empty(32000, 1024, dtype=torch.bfloat16)  # float32 accumulator: 125 MiB
    assert _resolve_mode("auto", big) == "vocab_blocked"
    assert _resolve_mode("auto", big.float()) == "row_chunked"  # the accumulator is the returned gradient
    assert _resolve_mode("auto", big[:100]) == "row_chunked"
    assert _resolve_mode("vocab_blocked", big[:100]) == "vocab_blocked"
    with pytest.raises(ValueError, match="mode must be one of"):
        _resolve_mode("fast", big)


def test_weight_gradient_accumulates_in_fp32():
    """bf16, 64 chunks vs one chunk: with the weight gradient summed in fp32 and rounded once, the two agree to one
    bf16 rounding. A bf16 running sum over the same 64 chunk contributions (what drifted in Liger #512) does not:
    the check below is shown to fail for it."""
    x, w, _, t = make_case(256, 16, 64, torch.bfloat16, ignore_frac=0.0)
    w.requires_grad_()

    def weight_grad(chunk_size):
        loss = linear_cross_entropy(x, w, t, chunk_size=chunk_size, reduction="sum", backend="cpu",
                                    mode="row_chunked")  # fmt: skip
        return torch.autograd.grad(loss, [w])[0]

    one_rounding = dict(rtol=2**-7, atol=1e-6)
    many, single = weight_grad(4), weight_grad(256)
    torch.testing.assert_close(many, single, **one_rounding)

    # The same contributions summed in bf16, chunk by chunk:
    running = torch.zeros_like(w, dtype=torch.bfloat16)
    for lo in range(0, 256, 4):
        logits = (x[lo : lo + 4] @ w.detach().t()).float()
        dlogits = (torch.softmax(logits, 1) - F.one_hot(t[lo : lo + 4], 64)).to(torch.bfloat16)
        running += (dlogits.float().t() @ x[lo : lo + 4].float()).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(running, single, **one_rounding)


# --- bad options (torch's argument errors are in test_linear_cross_entropy_api.py) ---------------------------------
def test_bad_options():
    x, w, _, t = make_case(5, 4, 7, torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_block_size"):
        linear_cross_entropy(x, w, t, vocab_block_size=0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(x, w, t, softcap=0.0)
    t[0] = 7
    with pytest.raises((RuntimeError, IndexError)):
        linear_cross_entropy(x, w, t, backend="cpu")
    x, w, b, t = make_case(5, 4, 7, torch.float64)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        linear_cross_entropy(x, w, t, linear_bias=b, reduction="avg")
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):  # torch's exception
        linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
        F.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=1.5)



@pytest.mark.parametrize("backend", cpu_backends())
def test_out_of_range_target_raises_torchs_index_error(backend):
    x, w, b, t = make_case(5, 4, 7, torch.float64)
    t[1] = 7
    with pytest.raises(IndexError, match=r"Target 7 is out of bounds\."):
        F.linear_cross_entropy(x, w, t, linear_bias=b)
    with pytest.raises(IndexError, match=r"Target 7 is out of bounds\."):
        linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_argument_semantics(backend, reduction):
    """As torch's F.linear_cross_entropy: ignore_index=None is -100, a negative or NaN label_smoothing is none."""
    x, w, b, t = make_case(9, 6, 11, torch.float64)
    for kwargs, torch_kwargs in [
        (dict(ignore_index=None), dict(ignore_index=None)),
        (dict(label_smoothing=-0.5), dict(label_smoothing=-0.5)),
        (dict(label_smoothing=float("nan")), dict(label_smoothing=float("nan"))),
    ]:
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = linear_cross_entropy(xs, ws, t, linear_bias=b, reduction=reduction, backend=backend, chunk_size=4,
                                   **kwargs)
        want = F.linear_cross_entropy(xr, wr, t, linear_bias=b, reduction=reduction, **torch_kwargs)
        torch.testing.assert_close(got, want, **tol(torch.float64, reduction=True))
        go = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
        for g, r in zip(torch.autograd.grad(got, [xs, ws], go), torch.autograd.grad(want, [xr, wr], go)):
            torch.testing.assert_close(g, r, **tol(torch.float64, reduction=True))


def test_elementwise_mean_is_mean_with_torchs_warning():
    x, w, b, t = make_case(9, 6, 11, torch.float64)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        got = linear_cross_entropy(x, w, t, linear_bias=b, reduction="elementwise_mean", backend="cpu")
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        want = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction="elementwise_mean")
    torch.testing.assert_close(got, want, **tol(torch.float64, reduction=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_parity_gpu(backend, dtype, reduction, mode):
    x, w, b, t = make_case(300, 64, 1000, dtype)
    check(backend, dtype, x.cuda(), w.cuda(), b.cuda(), t.cuda(), reduction=reduction, chunk_size=128, mode=mode,
          vocab_block_size=384)  # fmt: skip
