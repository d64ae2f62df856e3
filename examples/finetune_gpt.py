"""Pre-train a small character-level GPT on Python's own docstrings, then fine-tune it on the Zen of Python, twice:
once with plain PyTorch (F.cross_entropy, torch.optim.AdamW, clip_grad_norm_) and once with fusedopt (fused
cross-entropy, fused AdamW with the gradient clipping folded into the step). No downloads: the corpora ship with
Python. It writes the two loss curves overlaid in a PNG and prints tokens/s and peak memory of each run: on CUDA the
peak of torch's allocator, on the CPU the peak resident set size (RSS) of the process, which counts the interpreter,
torch's libraries, the corpora and every allocation, not just tensors. Each run has a fresh worker process, so its
peak is its own.

    python examples/finetune_gpt.py                       # CPU, a few minutes
    python examples/finetune_gpt.py --device cuda
    python examples/finetune_gpt.py --tiny --check         # what the tests run: seconds, and asserts agreement
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


def train(impl: str, cfg, corpora, vocab: int, device: str, progress: bool = True) -> dict:
    torch.manual_seed(0)
    model = GPT(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.context).to(device)
    if impl == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    else:
        import fusedopt

        opt = fusedopt.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, max_grad_norm=cfg.clip)
    losses, tokens, start, warmup = [], 0, time.perf_counter(), 2  # the first steps pay one-time costs: untimed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=sum(steps for _, steps in corpora), desc=f"{impl:8s}", unit="step", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
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
            if impl == "torch":
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (what the tests use)")
    p.add_argument("--check", action="store_true", help="assert the two loss curves agree")
    p.add_argument("--out", default="examples/finetune_gpt.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    cfg = argparse.Namespace(dim=256, layers=4, heads=4, context=64, batch=16, lr=1e-3, clip=1.0, pre=150, fine=50)
    if args.tiny:
        cfg = argparse.Namespace(dim=32, layers=2, heads=2, context=32, batch=4, lr=3e-3, clip=0.5, pre=12, fine=8)
    pre_text, fine_text = pretrain_corpus(), finetune_corpus()
    chars = sorted(set(pre_text) | set(fine_text))
    index = {c: i for i, c in enumerate(chars)}
    encode = lambda s: torch.tensor([index[c] for c in s], dtype=torch.long)
    corpora = [(encode(pre_text), cfg.pre), (encode(fine_text), cfg.fine)]

    runs = {impl: train_in_fresh_process(impl, cfg, corpora, len(chars), args.device, not args.no_progress)
            for impl in ("torch", "fusedopt")}  # fmt: skip
    n_params = sum(p.numel() for p in GPT(len(chars), cfg.dim, cfg.layers, cfg.heads, cfg.context).parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(chars)}; {cfg.pre} + {cfg.fine} steps")
    for impl, r in runs.items():
        final, speed, peak = r["losses"][-1], r["tokens_per_s"], r["peak_mib"]
        what = "peak allocated" if args.device == "cuda" else "peak RSS (whole process)"
        print(f"{impl:9s} final loss {final:.5f}  {speed:,.0f} tokens/s  {what} {peak:.0f} MiB")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["fusedopt"]["losses"], runs["torch"]["losses"]))
    print(f"largest relative difference between the loss curves: {worst:.2e}")
    _plot(runs, cfg, args.out)
    if args.check:
        # fp32 parity tolerance for a reduced loss (tests/conftest.py REDUCTION_TOLERANCES).
        assert worst < 1e-4 and not math.isnan(worst), f"loss curves disagree: {worst:.2e}"
    return runs


def _plot(runs: dict, cfg, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
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


if __name__ == "__main__":
    main()
