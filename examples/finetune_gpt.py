"""Pre-train a small character-level GPT on Python's own docstrings, then fine-tune it on the Zen of Python, twice:
once with plain PyTorch (F.cross_entropy, torch.optim.AdamW, clip_grad_norm_) and once with fusedopt (fused
cross-entropy, fused AdamW with the gradient clipping folded into the step). No downloads: the corpora ship with
Python. It writes the two loss curves overlaid in a PNG and prints tokens/s and peak memory of each run: on CUDA the
peak of torch's allocator, on the CPU the peak resident set size (RSS) of the process, which counts the interpreter,
torch's libraries, the corpora and every allocation, not just tensors. Each run has a fresh worker process, so its
peak is its own.

`--optimizer NAME` trains with another optimizer than AdamW (examples/optimizers.py: the fusedopt class, its plain
counterpart, the hyperparameters). `--compare-optimizers a,b,c` trains the fusedopt run once per optimizer on the
same seed and data and plots the curves on one axis (examples/optimizers.png), with a table of final losses.

    python examples/finetune_gpt.py                       # CPU, a few minutes
    python examples/finetune_gpt.py --device cuda
    python examples/finetune_gpt.py --tiny --check         # what the tests run: seconds, and asserts agreement
    python examples/finetune_gpt.py --optimizer lion --tiny --check
    python examples/finetune_gpt.py --compare-optimizers adamw,lion,sgd
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import math
import multiprocessing
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import optimizers
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

PRETRAIN_MODULES = ["collections", "functools", "itertools", "json", "re", "os", "pathlib", "typing", "argparse",
                    "dataclasses", "string", "textwrap", "statistics", "heapq", "bisect", "enum", "abc"]  # fmt: skip


def pretrain_corpus() -> str:
    """Docstrings of stdlib modules and their public members; deprecated members (typing.io, typing.re, ...), which
    warn when touched, are left out."""
    parts = []
    for name in PRETRAIN_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                try:
                    doc = getattr(getattr(mod, attr, None), "__doc__", None)
                except DeprecationWarning:
                    continue
            if isinstance(doc, str):
                parts.append(doc)
    return "\n".join(parts)


def finetune_corpus() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13") * 20


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        yield x, y


def peak_memory_mib(device: str) -> float:
    """CUDA: the peak of torch's allocator. CPU: the process's peak RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def train(impl: str, cfg, corpora, vocab: int, device: str, progress: bool = True, optimizer: str = "adamw",
          extra: dict | None = None, dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """One run; `extra`: more keywords for the fusedopt optimizer (state_dtype="int8", bf16_stochastic_round=True),
    `dtype`: the params' dtype (the tests' quality runs)."""
    torch.manual_seed(0)
    model = GPT(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.context).to(device=device, dtype=dtype)
    # adamw: torch.optim.AdamW(lr, weight_decay=0.1) + clip_grad_norm_, or fusedopt.optim.AdamW with max_grad_norm
    opt = optimizers.make(optimizer, impl, model, cfg.lr, weight_decay=0.1, clip=cfg.clip, head=model.head,
                          extra=extra)  # fmt: skip
    if impl == "torch":
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
    else:
        import fusedopt

        clip_grad_norm_ = fusedopt.nn.utils.clip_grad_norm_
    folded = getattr(opt, "max_grad_norm", None) is not None  # the clip is then inside opt.step()
    losses, tokens, start, warmup = [], 0, time.perf_counter(), 2  # the first steps pay one-time costs: untimed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=sum(steps for _, steps in corpora), desc=f"{impl:8s} {optimizer}", unit="step",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    for phase, (data, steps) in enumerate(corpora):
        for x, y in batches(data, steps, cfg.batch, cfg.context, seed=phase):
            x, y = x.to(device), y.to(device)
            logits = model(x).flatten(0, 1)
            if impl == "torch":
                loss = F.cross_entropy(logits, y.flatten())
            else:
                loss = fusedopt.nn.functional.cross_entropy(logits, y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not folded:
                clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(phase="pre" if phase == 0 else "fine", loss=f"{losses[-1]:.3f}", refresh=False)
            if len(losses) == warmup:
                start, tokens = time.perf_counter(), 0
            elif len(losses) > warmup:
                tokens += x.numel()
    seconds = time.perf_counter() - start
    bar.close()
    return {"losses": losses, "tokens_per_s": tokens / seconds, "peak_mib": peak_memory_mib(device)}


def train_in_fresh_process(*args) -> dict:
    """train() in a new worker process: its peak memory (RSS on the CPU) is then this run's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train, *args).result()


SIGN_CHECK_STEPS = 5  # sign-based optimizers (Lion): --check compares the first steps only; see check_steps()


def check_steps(optimizer: str, n: int) -> int:
    """How many leading steps --check compares. All of them, except for a sign-based update: there an element whose
    interpolated momentum is within float32 rounding of 0 takes sign +1 in one run and -1 in the other (fused and
    reference round in a different order), a 2 * lr difference in that weight, and the curves part a little more at
    every step after; the first steps still agree to rounding."""
    return min(n, SIGN_CHECK_STEPS) if optimizers.TABLE[optimizer].sign_based else n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (what the tests use)")
    p.add_argument("--small", action="store_true", help="a 0.43M-param model, 120 + 40 steps: a minute or less a run")
    p.add_argument("--check", action="store_true", help="assert the two loss curves agree")
    p.add_argument("--optimizer", default="adamw", choices=optimizers.NAMES, metavar="NAME",
                   help=optimizers.help_text())  # fmt: skip
    p.add_argument("--compare-optimizers", metavar="A,B,...",
                   help="train the fusedopt run once per optimizer (same seed and data) and plot the loss curves on "
                        "one axis; names not in this build are skipped with a note")  # fmt: skip
    p.add_argument("--steps", metavar="PRE,FINE", help="pre-training and fine-tuning steps instead of the defaults")
    p.add_argument("--out", help="the PNG (default examples/finetune_gpt.png; examples/optimizers.png with "
                                 "--compare-optimizers)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--same-process", action="store_true",
                   help="train in this process instead of a fresh one per run: starts faster, but a run's peak memory "
                        "is then the largest so far")  # fmt: skip
    args = p.parse_args(argv)
    cfg = argparse.Namespace(dim=256, layers=4, heads=4, context=64, batch=16, lr=1e-3, clip=1.0, pre=150, fine=50)
    if args.small:
        cfg = argparse.Namespace(dim=128, layers=2, heads=4, context=64, batch=16, lr=2e-3, clip=1.0, pre=120, fine=40)
    if args.tiny:
        cfg = argparse.Namespace(dim=32, layers=2, heads=2, context=32, batch=4, lr=3e-3, clip=0.5, pre=12, fine=8)
    if args.steps:
        cfg.pre, cfg.fine = (int(n) for n in args.steps.split(","))
    if args.compare_optimizers:
        names = [n.strip() for n in args.compare_optimizers.split(",") if n.strip()]
        unknown = [n for n in names if n not in optimizers.TABLE]
        if unknown or not names:
            p.error(f"--compare-optimizers: unknown {unknown} (choose from {', '.join(optimizers.NAMES)})")
    else:
        names = [args.optimizer]
        why = optimizers.missing(args.optimizer, "fusedopt") or optimizers.missing(args.optimizer, "torch")
        if why:
            raise SystemExit(f"--optimizer {args.optimizer}: {why}")
    pre_text, fine_text = pretrain_corpus(), finetune_corpus()
    chars = sorted(set(pre_text) | set(fine_text))
    index = {c: i for i, c in enumerate(chars)}
    encode = lambda s: torch.tensor([index[c] for c in s], dtype=torch.long)
    corpora = [(encode(pre_text), cfg.pre), (encode(fine_text), cfg.fine)]
    n_params = sum(p.numel() for p in GPT(len(chars), cfg.dim, cfg.layers, cfg.heads, cfg.context).parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(chars)}; {cfg.pre} + {cfg.fine} steps")
    what = "peak allocated" if args.device == "cuda" else "peak RSS (whole process)"
    train_args = (cfg, corpora, len(chars), args.device, not args.no_progress)
    run = train if args.same_process else train_in_fresh_process

    if args.compare_optimizers:
        runs = {}
        for name in names:
            why = optimizers.missing(name, "fusedopt")
            if why:
                print(f"skipped {name}: {why}")
                continue
            runs[name] = run("fusedopt", *train_args, name)
        if not runs:
            raise SystemExit("--compare-optimizers: none of these optimizers is in this build")
        print(f"fusedopt, {args.device}: {'optimizer':9s} {'final loss':>10s} {'last-10 mean':>12s} {'tokens/s':>9s}")
        for name, r in runs.items():
            final, last10, speed = r["losses"][-1], sum(r["losses"][-10:]) / len(r["losses"][-10:]), r["tokens_per_s"]
            print(f"{'':15s}{name:9s} {final:10.4f} {last10:12.4f} {speed:9,.0f}  {what} {r['peak_mib']:.0f} MiB")
        _plot_optimizers(runs, cfg, n_params, args.device, args.out or "examples/optimizers.png")
        return runs

    runs = {impl: run(impl, *train_args, args.optimizer) for impl in ("torch", "fusedopt")}
    for impl, r in runs.items():
        final, speed, peak = r["losses"][-1], r["tokens_per_s"], r["peak_mib"]
        print(f"{impl:9s} {args.optimizer} final loss {final:.5f}  {speed:,.0f} tokens/s  {what} {peak:.0f} MiB")
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["fusedopt"]["losses"], runs["torch"]["losses"])]
    worst = max(rel)
    print(f"largest relative difference between the loss curves: {worst:.2e}")
    n = check_steps(args.optimizer, len(rel))
    if n < len(rel):
        worst = max(rel[:n])
        print(f"  over the first {n} steps, which --check compares ({args.optimizer} is sign-based): {worst:.2e}")
    _plot(runs, cfg, args.out or "examples/finetune_gpt.png")
    if args.check:
        # fp32 parity tolerance for a reduced loss (tests/conftest.py REDUCTION_TOLERANCES).
        assert worst < 1e-4 and not math.isnan(worst), f"loss curves disagree: {worst:.2e}"
    return runs


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def _plot(runs: dict, cfg, out: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, style in (("torch", "-"), ("fusedopt", "--")):
        ax.plot(runs[impl]["losses"], style, label=f"{impl} ({runs[impl]['tokens_per_s']:,.0f} tok/s)")
    ax.axvline(cfg.pre, color="gray", lw=0.8)
    ax.set_xlabel("step (pre-training | fine-tuning)")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def _plot_optimizers(runs: dict, cfg, n_params: int, device: str, out: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        ax.plot(r["losses"], lw=1.2, label=f"{name}: final {r['losses'][-1]:.3f} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.axvline(cfg.pre, color="gray", lw=0.8)
    ax.set_title(f"fusedopt optimizers, GPT {n_params / 1e6:.2f}M params, {device}: {cfg.pre} + {cfg.fine} steps",
                 fontsize=10)  # fmt: skip
    ax.set_xlabel("step (pre-training on docstrings | fine-tuning on the Zen of Python)")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
