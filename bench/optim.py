"""Optimizer benches: Adam/AdamW, RMSprop, SGD momentum, Adagrad, Lion, Muon, LAMB, Adafactor, clip_grad_norm_, and
clip + Adam, against torch's for-loop / foreach / fused / torch.compile paths and DeepSpeed's CPUAdam (Lion and
LAMB, which torch lacks: against plain torch foreach implementations of the papers, ForeachLion and ForeachLAMB).

Byte model (per parameter, element size e): Adam reads p, g, m, v and writes p, m, v (7e: 28 B fp32, 14 B bf16);
RMSprop (no momentum, not centered), SGD with momentum, Adagrad and Lion read p, g, one buffer and write p and it
(5e); LAMB with its default global clip reads g for the norm, then p, g, m, v for the per-tensor norms, then p, g,
m, v again and writes p, m, v (12e: the two passes of the fused step); Adafactor (matrices) reads p and g, then g,
then p and g and writes p (6e: its three passes);
clip_grad_norm_ reads g for the norm, then reads and writes g to scale it (3e); clip + Adam is counted at what a
fused step needs: one read of g for the norm plus Adam's 7e (8e), whatever an implementation actually moves.
"""

from __future__ import annotations

import torch

from bench.harness import (
    Case,
    Env,
    Impl,
    Runnable,
    Target,
    accepts,
    compile_note,
    fusedopt_api,
    fusedopt_impls,
    peer_module,
)

LR = 1e-3
MAX_NORM = 1.0


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv: int) -> list[tuple]:
    """The parameter shapes of a Llama-style decoder (embedding, attention, gated MLP, norms, lm_head)."""
    layer = [(hidden,), (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (hidden,), (inter, hidden), (inter, hidden), (hidden, inter)]  # fmt: skip
    return [(vocab, hidden), *(layer * layers), (hidden,), (vocab, hidden)]


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def muon_shapes(d: int, layers: int) -> list[tuple]:
    """Muon's matrices of a Llama-style decoder: per layer 4 x [d, d] attention projections and a [4d, d] / [d, 4d]
    MLP pair (embeddings, head and norms go to AdamW)."""
    return [(d, d)] * 4 * layers + [(4 * d, d), (d, 4 * d)] * layers


def sizes(env: Env) -> dict:
    """Shapes per device. GPU: TARGETS.md's (TinyLlama-1.1B's shapes, 10000 x 4096). CPU: small enough that the
    whole suite, torch's slow for-loop peers included, finishes in under 10 minutes on 2 cores."""
    if env.is_cuda:
        model = llama_shapes(1024, 2816, 8, 32000, 128) if env.quick else llama_shapes(2048, 5632, 22, 32000, 256)
        return {"model": model, "many": [(4096,)] * 10000, "muon": muon_shapes(1024 if env.quick else 2048, 4)}
    model = llama_shapes(256, 704, 4, 8000, 64) if env.quick else llama_shapes(512, 1408, 6, 16000, 128)
    muon = muon_shapes(128 if env.quick else 384, 4)
    return {"model": model, "many": [(4096,)] * (500 if env.quick else 2000), "muon": muon}


def make_params(shapes, dtype, device) -> list:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=device, dtype=dtype, generator=gen)
        params.append(p)
    return params


def _describe(shapes) -> str:
    n = numel(shapes)
    return f"{n / 1e6:.0f}M params in {len(shapes)} tensors" if n >= 1e6 else f"{n / 1e3:.0f}K params"


def _step(opt, compiled: bool = False) -> Runnable:
    if not compiled:
        return Runnable(opt.step)

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return Runnable(step, warmup=2)


def _compile_peer(name: str, env: Env, build, many_tensors: bool) -> Impl:
    note = compile_note(env, "optim")
    if not note and many_tensors:
        note = "skipped: compiling one step over 2000 tensors ran > 10 min on the 2-core CPU"
    return Impl(name, "peer", None if note else build, note)


class ForeachLion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) written with torch's foreach ops: the peer a user without fusedopt would write."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            ms = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            beta1, beta2 = group["betas"]
            update = torch._foreach_sign(torch._foreach_lerp(ms, grads, 1 - beta1))
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_lerp_(ms, grads, 1 - beta2)


class ForeachLAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019; apex FusedLAMB's defaults: adam_w_mode, grad averaging, bias correction, global clip
    at max_grad_norm) with torch's foreach ops: the peer a user without fusedopt or apex would write."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for st, p in zip(states, params):
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
            ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            (beta1, beta2), step = group["betas"], states[0]["step"]
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
            denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(vs, 1 - beta2**step)), group["eps"])
            update = torch._foreach_div(torch._foreach_div(ms, 1 - beta1**step), denom)
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
            p_norms, u_norms = torch._foreach_norm(params), torch._foreach_norm(update)
            ratios = [torch.where((a != 0) & (b != 0), a / b, 1.0) for a, b in zip(p_norms, u_norms)]
            torch._foreach_mul_(update, torch._foreach_mul(ratios, -group["lr"]))
            torch._foreach_add_(params, update)


def optimizer_case(tag, title, fused_cls, torch_cls, shapes, dtype, env, kwargs, peers, targets, bytes_per_elt,
                   byte_model, many=False) -> Case:  # fmt: skip
    """A Case for a fusedopt optimizer vs torch's implementations of the same class. `peers`: a subset of
    "for-loop", "foreach", "fused", "compile", "deepspeed"."""
    dev = env.device

    def build(cls, **extra):
        return lambda: _step(cls(make_params(shapes, dtype, dev), **kwargs, **extra))

    impls = fusedopt_impls(f"optim.{fused_cls}", dev, lambda api, b: _step(api(make_params(shapes, dtype, dev),
                                                                               **kwargs, backend=b)))  # fmt: skip
    if "for-loop" in peers:
        impls.append(Impl("torch for-loop", "peer", build(torch_cls, foreach=False)))
    if "foreach" in peers:
        impls.append(Impl("torch foreach", "peer", build(torch_cls, foreach=True)))
    if "default" in peers:  # torch's class as constructed by default (Muon: a for-loop, no foreach/fused options)
        impls.append(Impl("torch", "peer", build(torch_cls)))
    if "paper-foreach" in peers:
        impls.append(Impl("torch foreach (paper)", "peer", build(torch_cls)))
    if "fused" in peers:
        impls.append(Impl("torch fused", "peer", build(torch_cls, fused=True)))
    if "compile" in peers:
        compiled = lambda: _step(torch_cls(make_params(shapes, dtype, dev), **kwargs), compiled=True)
        impls.append(_compile_peer("torch.compile", env, compiled, many))
    if "deepspeed" in peers and not env.is_cuda:
        impls.append(_deepspeed_peer(shapes, dtype, dev, kwargs, adamw=torch_cls is torch.optim.AdamW))
    n = numel(shapes)
    op = f"{title} {_dtype_name(dtype)}, {_describe(shapes)}"
    return Case(tag, "optim", op, n * bytes_per_elt * dtype.itemsize, byte_model, impls, targets=targets)


def _deepspeed_peer(shapes, dtype, dev, kwargs, adamw: bool) -> Impl:
    mod, why = peer_module("deepspeed.ops.adam")
    if mod is None:
        return Impl("DeepSpeed CPUAdam", "peer", None, why)

    def build():
        ps = make_params(shapes, dtype, dev)
        return Runnable(mod.DeepSpeedCPUAdam(ps, lr=kwargs.get("lr", LR), adamw_mode=adamw,
                                             weight_decay=kwargs.get("weight_decay", 0.0)).step)  # fmt: skip

    return Impl("DeepSpeed CPUAdam", "peer", build)


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def clip_cases(shapes, dtype, env, cuda_targets: bool) -> list[Case]:
    dev = env.device
    n = numel(shapes)
    e = dtype.itemsize
    desc = f"{_dtype_name(dtype)}, {_describe(shapes)}"

    def torch_clip(foreach):
        def build():
            ps = make_params(shapes, dtype, dev)
            return Runnable(lambda: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=foreach))

        return build

    def ours_clip(api, b):
        ps = make_params(shapes, dtype, dev)
        kw = {"backend": b} if accepts(api, "backend") else {}  # else b is "auto"
        return Runnable(lambda: api(ps, MAX_NORM, **kw))

    clip = Case("clip", "optim", f"clip_grad_norm_ {desc}", 3 * n * e,
                "3 B/elt-size per param: read g (norm), read + write g (scale)",
                fusedopt_impls("nn.utils.clip_grad_norm_", dev, ours_clip)
                + [Impl("torch for-loop", "peer", torch_clip(False)), Impl("torch foreach", "peer", torch_clip(True))])

    def torch_clip_adam(fused):
        def build():
            ps = make_params(shapes, dtype, dev)
            opt = torch.optim.Adam(ps, lr=LR, fused=fused, foreach=None if fused else True)

            def run():
                torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)
                opt.step()

            return Runnable(run)

        return build

    def ours_folded(api, b):
        return _step(api(make_params(shapes, dtype, dev), lr=LR, max_grad_norm=MAX_NORM, backend=b))

    def ours_clip_then_adam(clip_api, b):
        ps = make_params(shapes, dtype, dev)
        opt = fusedopt_api("optim.Adam")(ps, lr=LR, backend=b)

        kw = {"backend": b} if accepts(clip_api, "backend") else {}

        def run():
            clip_api(ps, MAX_NORM, **kw)
            opt.step()

        return Runnable(run)

    impls = fusedopt_impls("optim.Adam", dev, ours_folded, label="Adam(max_grad_norm)", needs="max_grad_norm")
    impls += fusedopt_impls("nn.utils.clip_grad_norm_", dev, ours_clip_then_adam, label="clip_grad_norm_ + Adam")
    impls += [Impl("torch clip_grad_norm_ + Adam(fused)", "peer", torch_clip_adam(True)),
              Impl("torch clip_grad_norm_ + Adam(foreach)", "peer", torch_clip_adam(False))]  # fmt: skip
    targets = [Target("vs", 1.4, "torch clip_grad_norm_ + Adam(fused)")] if cuda_targets else []
    clip_adam = Case("clip-adam", "optim", f"clip_grad_norm_ + Adam {desc}", 8 * n * e,
                     "8 B/elt-size per param: one read of g for the norm + Adam's 7", impls, targets=targets)
    return [clip, clip_adam]


ADAM_BYTES = "7 x elt-size per param: read p, g, m, v; write p, m, v (28 B fp32, 14 B bf16)"
FIVE_BYTES = "5 x elt-size per param: read p, g, buf; write p, buf (20 B fp32)"
MUON_BYTES = ("5 x elt-size per param: read p, g, buf; write p, buf (the elementwise traffic; the Newton-Schulz "
              "bfloat16 matmuls, ~30 m^2 n flops per m x n matrix, dominate)")  # fmt: skip
ADAFACTOR_BYTES = (
    "6 x elt-size per param (matrices; their factors are negligible): read p, g (norms, row and column sums); "
    "read g (the update's RMS); read p, g, write p (24 B fp32)"
)
LAMB_BYTES = (
    "12 x elt-size per param: read g (global norm); read p, g, m, v (per-tensor norms); read p, g, m, v, "
    "write p, m, v (48 B fp32)"
)


def cases(env: Env) -> list[Case]:
    sz = sizes(env)
    model, many = sz["model"], sz["many"]
    f32, gpu = torch.float32, env.is_cuda
    adam_peers = ("for-loop", "foreach", "fused", "compile", "deepspeed")
    # Compiling a step over 201 tensors of 1.1B params takes minutes on the GPU machine: time it for Adam only there.
    more_peers = ("for-loop", "foreach", "fused", "deepspeed") if gpu else adam_peers
    kw = {"lr": LR}
    t_adam = ([Target("copy", 95), Target("vs", 1.18, "torch fused")] if gpu else [Target("vs", 1.0, "torch fused")])
    out = [
        optimizer_case("adam", "Adam", "Adam", torch.optim.Adam, model, f32, env, kw, adam_peers, t_adam, 7,
                       ADAM_BYTES),
        optimizer_case("adamw", "AdamW", "AdamW", torch.optim.AdamW, model, f32, env, {**kw, "weight_decay": 0.01},
                       more_peers, t_adam, 7, ADAM_BYTES),
        optimizer_case("adam-many", "Adam", "Adam", torch.optim.Adam, many, f32, env, kw, adam_peers,
                       [Target("ms", 1.0)] if gpu else [Target("vs", 2.0, "torch fused")], 7, ADAM_BYTES,
                       many=True),
    ]  # fmt: skip
    if gpu:
        out.append(optimizer_case("adam-bf16", "Adam", "Adam", torch.optim.Adam, model, torch.bfloat16, env, kw,
                                  more_peers, [Target("copy", 90)], 7, ADAM_BYTES))
    out.append(optimizer_case("rmsprop", "RMSprop", "RMSprop", torch.optim.RMSprop, model, f32, env, {"lr": 1e-4},
                              ("for-loop", "foreach"), [Target("vs", 2.5 if gpu else 4.0, "torch foreach")], 5,
                              FIVE_BYTES))  # fmt: skip
    out.append(optimizer_case("sgd", "SGD momentum=0.9", "SGD", torch.optim.SGD, model, f32, env,
                              {"lr": 1e-3, "momentum": 0.9}, ("for-loop", "foreach", "fused"),
                              [Target("vs", 1.05 if gpu else 1.0, "torch fused")], 5, FIVE_BYTES))  # fmt: skip
    # torch's fused Adagrad runs on the CPU only.
    out.append(optimizer_case("adagrad", "Adagrad", "Adagrad", torch.optim.Adagrad, model, f32, env, {"lr": 1e-2},
                              ("foreach",) if gpu else ("foreach", "fused"),
                              [Target("vs", 1.0, "torch foreach" if gpu else "torch fused")], 5, FIVE_BYTES))
    out.append(optimizer_case("lion", "Lion", "Lion", ForeachLion, model, f32, env,
                              {"lr": 1e-4, "weight_decay": 0.01}, ("paper-foreach",),
                              [Target("vs", 1.0, "torch foreach (paper)")], 5, FIVE_BYTES))  # fmt: skip
    # Muon: the elementwise parts fused (momentum + Nesterov, scaled update + decay), the Newton-Schulz products
    # batched per shape; the products dominate (5 x 3 bfloat16 matmuls per matrix), so the byte count is the fused
    # elementwise traffic only.
    out.append(optimizer_case("muon", "Muon", "Muon", torch.optim.Muon, sz["muon"], f32, env, {"lr": 0.02},
                              ("default",), [Target("vs", 2.0, "torch")], 5, MUON_BYTES))  # fmt: skip
    out.append(optimizer_case("lamb", "LAMB (max_grad_norm=1)", "LAMB", ForeachLAMB, model, f32, env,
                              {"lr": 1e-3, "weight_decay": 0.01}, ("paper-foreach",),
                              [Target("vs", 1.0, "torch foreach (paper)")], 12, LAMB_BYTES))  # fmt: skip
    out.append(optimizer_case("adafactor", "Adafactor", "Adafactor", torch.optim.Adafactor, model, f32, env,
                              {"lr": 1e-2}, ("for-loop", "foreach"), [Target("vs", 1.0, "torch foreach")], 6,
                              ADAFACTOR_BYTES))  # fmt: skip
    out += clip_cases(model, f32, env, gpu)
    return out  # the low-bit states' case: bench/optim_lowbit.py (its own family in bench/__main__.py)
