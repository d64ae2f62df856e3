"""Loss benches, forward + backward with peak extra memory: cross-entropy, MSE, BCE, BCE-with-logits and the fused
linear cross-entropy, against torch eager, torch.compile, Liger-Kernel and Cut Cross-Entropy.

Byte model: cross-entropy reads the logits once and writes their grad once (2 x N x V x elt-size); MSE/BCE read
input and target and write the input's grad (3 x n x elt-size). The linear cross-entropy is compute-bound: it is
reported in TFLOP/s of its three matmuls (6 x N x H x V), not GB/s.
Peak extra memory is measured over one forward + backward, above what was allocated before it (inputs); the table
shows it with and without the grads the call returns (listed per case in the footer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Env, Impl, Runnable, Target, accepts, compile_note, fusedopt_impls, peer_module

IGNORE = -100


def _gen(device):
    return torch.Generator(device=device).manual_seed(0)


def _fwd_bwd(leaves: list, loss_fn, warmup: int = 1) -> Runnable:
    """run(): forward, then the grads of `leaves` by torch.autograd.grad, as an upstream layer would receive them.
    Not .backward(): storing them in .grad would add AccumulateGrad's copy whenever a grad aliases its leaf (as an
    in-place backward's does), which no real model pays, since its logits are not leaves."""

    def run():
        return torch.autograd.grad(loss_fn(), leaves)

    return Runnable(run, None, warmup)


def _kw(api, backend: str) -> dict:
    return {"backend": backend} if accepts(api, "backend") else {}


def _dt(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _compiled(env: Env, fn) -> Impl:
    note = compile_note(env, "losses")
    return Impl("torch.compile", "peer", None if note else fn, note)


def _gpu_peer(env: Env, name: str, module: str, dist: str, build_with) -> Impl:
    if not env.is_cuda:
        return Impl(name, "peer", None, "GPU only")
    mod, why = peer_module(module, dist)
    return Impl(name, "peer", None if mod is None else (lambda: build_with(mod)), why)


# --- cross-entropy -----------------------------------------------------------------------------------------------


def ce_case(tag: str, n: int, v: int, dtype, env: Env, ignore_frac: float, targets: list) -> Case:
    dev = env.device

    def data():
        g = _gen(dev)
        x = torch.randn(n, v, device=dev, dtype=dtype, generator=g).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        if ignore_frac:
            t[torch.rand(n, device=dev, generator=g) < ignore_frac] = IGNORE
        return x, t

    def ours(api, b, **extra):
        x, t = data()
        return _fwd_bwd([x], lambda: api(x, t, ignore_index=IGNORE, **_kw(api, b), **extra))

    def eager():
        x, t = data()
        return _fwd_bwd([x], lambda: F.cross_entropy(x, t, ignore_index=IGNORE))

    def compiled():
        x, t = data()
        f = torch.compile(F.cross_entropy)
        return _fwd_bwd([x], lambda: f(x, t, ignore_index=IGNORE), warmup=2)

    def liger(mod):
        x, t = data()
        loss = mod.LigerCrossEntropyLoss(ignore_index=IGNORE)
        return _fwd_bwd([x], lambda: loss(x, t))

    impls = fusedopt_impls("nn.functional.cross_entropy", dev, ours)
    impls += fusedopt_impls("nn.functional.cross_entropy", dev,
                            lambda api, b: ours(api, b, inplace_backward=True),
                            label="inplace_backward", needs="inplace_backward")  # fmt: skip
    impls += [Impl("torch eager", "peer", eager), _compiled(env, compiled),
              _gpu_peer(env, "Liger CrossEntropy", "liger_kernel.transformers", "liger-kernel", liger)]  # fmt: skip
    ign = f", {ignore_frac:.0%} ignore_index" if ignore_frac else ""
    e = dtype.itemsize
    return Case(tag, "losses", f"cross_entropy fwd+bwd {_dt(dtype)} {n}x{v}{ign}", 2 * n * v * e,
                "2 x N x V x elt-size: one read of the logits, one write of their grad", impls, memory=True,
                targets=targets, grad_bytes=n * v * e)  # fmt: skip


# --- MSE / BCE / BCE-with-logits ---------------------------------------------------------------------------------

POINTWISE = {
    # tag: (fusedopt functional name, torch function, input maker, target maker)
    "mse": ("mse_loss", F.mse_loss, lambda z: z, lambda z: z),
    "bce": ("binary_cross_entropy", F.binary_cross_entropy, torch.sigmoid, lambda z: torch.sigmoid(z)),
    "bce-logits": ("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, lambda z: z,
                   lambda z: torch.sigmoid(z)),
}  # fmt: skip


def pointwise_case(tag: str, n: int, dtype, env: Env, targets: list) -> Case:
    dev = env.device
    fname, torch_fn, make_in, make_target = POINTWISE[tag]

    def data():
        g = _gen(dev)
        x = make_in(torch.randn(n, device=dev, generator=g)).to(dtype).requires_grad_()
        y = make_target(torch.randn(n, device=dev, generator=g)).to(dtype)
        return x, y

    def ours(api, b):
        x, y = data()
        return _fwd_bwd([x], lambda: api(x, y, **_kw(api, b)))

    def eager():
        x, y = data()
        return _fwd_bwd([x], lambda: torch_fn(x, y))

    def compiled():
        x, y = data()
        f = torch.compile(torch_fn)
        return _fwd_bwd([x], lambda: f(x, y), warmup=2)

    impls = fusedopt_impls(f"nn.functional.{fname}", dev, ours)
    impls += [Impl("torch eager", "peer", eager), _compiled(env, compiled)]
    e = dtype.itemsize
    return Case(f"{tag}" + ("" if dtype == torch.float32 else f"-{_dt(dtype)}"), "losses",
                f"{fname} fwd+bwd {_dt(dtype)} n=2^{n.bit_length() - 1}", 3 * n * e,
                "3 x n x elt-size: read input and target, write the input's grad", impls, memory=True,
                targets=targets, grad_bytes=n * e)  # fmt: skip


# --- linear cross-entropy ----------------------------------------------------------------------------------------


def linear_ce_case(n: int, h: int, v: int, dtype, env: Env, targets: list) -> Case:
    dev = env.device

    def data():
        g = _gen(dev)
        x = torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        t[torch.rand(n, device=dev, generator=g) < 0.1] = IGNORE
        return x, w, t

    def ours(api, b, **extra):
        x, w, t = data()
        return _fwd_bwd([x, w], lambda: api(x, w, t, ignore_index=IGNORE, **_kw(api, b), **extra))

    def eager():
        x, w, t = data()
        return _fwd_bwd([x, w], lambda: F.cross_entropy(F.linear(x, w), t, ignore_index=IGNORE))

    def native():  # torch 2.14's own chunked path (options=None would be the plain expression)
        x, w, t = data()
        opts = torch.nn.LinearCrossEntropyOptions()
        return _fwd_bwd([x, w], lambda: F.linear_cross_entropy(x, w, t, ignore_index=IGNORE, options=opts))

    def liger(mod):
        x, w, t = data()
        loss = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        return _fwd_bwd([x, w], lambda: loss(w, x, t))

    def cce(mod):
        x, w, t = data()
        return _fwd_bwd([x, w], lambda: mod.linear_cross_entropy(x, w, t, ignore_index=IGNORE))

    impls = fusedopt_impls("nn.functional.linear_cross_entropy", dev, ours)
    for mode in ("row_chunked", "vocab_blocked"):
        with_mode = lambda api, b, mode=mode: ours(api, b, mode=mode)
        impls += fusedopt_impls("nn.functional.linear_cross_entropy", dev, with_mode, label=mode, needs="mode")
    has_native = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    impls += [Impl("torch eager (linear + cross_entropy)", "peer", eager),
              Impl("torch native F.linear_cross_entropy (chunked)", "peer",
                   native if has_native else None, "" if has_native else "needs torch >= 2.14"),
              _gpu_peer(env, "Liger FusedLinearCrossEntropy", "liger_kernel.transformers", "liger-kernel", liger),
              _gpu_peer(env, "Cut Cross-Entropy", "cut_cross_entropy", "cut-cross-entropy", cce)]  # fmt: skip
    e = dtype.itemsize
    return Case("linear-ce", "losses", f"linear_cross_entropy fwd+bwd {_dt(dtype)} N={n} H={h} V={v}", 0,
                "compute-bound: TFLOP/s of 6 x N x H x V", impls, memory=True, flops=6 * n * h * v,
                targets=targets, grad_bytes=(n * h + v * h) * e)  # fmt: skip


def cases(env: Env) -> list[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    if not env.is_cuda:
        n, v = (1024, 8000) if env.quick else (4096, 32000)
        p = 1 << (22 if env.quick else 24)
        out = [ce_case("ce", n, v, f32, env, 0.0, [Target("vs", 10.0, "torch eager")])]
        out += [pointwise_case(t, p, f32, env, []) for t in POINTWISE]
        lce = (256, 256, 8000) if env.quick else (512, 512, 16000)
        out.append(linear_ce_case(*lce, f32, env, []))
        return out
    liger, comp = "Liger CrossEntropy", "torch.compile"
    if env.quick:
        out = [ce_case("ce-bf16", 4096, 128256, bf16, env, 0.1, [Target("copy", 85), Target("vs", 1.8, liger)]),
               ce_case("ce", 8192, 32000, f32, env, 0.0, [Target("vs", 1.8, liger)])]  # fmt: skip
        out += [pointwise_case(t, 1 << 26, f32, env, [Target("copy", 85), Target("vs", 1.5, comp)]) for t in POINTWISE]
        out.append(linear_ce_case(4096, 2048, 32000, bf16, env, []))
        return out
    out = [
        ce_case("ce-bf16", 8192, 128256, bf16, env, 0.1, [Target("copy", 85), Target("vs", 1.8, liger)]),
        ce_case("ce", 8192, 32000, f32, env, 0.0, [Target("vs", 1.8, liger)]),
        ce_case("ce-256k", 4096, 256000, bf16, env, 0.0, [Target("copy", 85)]),
    ]
    for dtype in (f32, bf16):
        targets = [Target("copy", 85)] + ([Target("vs", 1.5, comp)] if dtype == f32 else [])
        out += [pointwise_case(t, 1 << 28, dtype, env, targets) for t in POINTWISE]
    lce_targets = [Target("vs", 1.0, "torch eager (linear + cross_entropy)"), Target("mem_beyond_grads", 0.6)]
    out.append(linear_ce_case(8192, 4096, 128256, bf16, env, lce_targets))
    return out
