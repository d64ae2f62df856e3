"""Pre-train a small Llama (built from a config: no downloads) on Python's own docstrings, then fine-tune it on the
Zen of Python, with the Hugging Face Trainer, twice: plain (HF's loss on the full logits, torch's AdamW) and with
fusedopt (`apply_fusedopt(model)`: the fused linear cross-entropy, no logits; fusedopt's AdamW). Each run is a fresh
process, so its peak memory is its own. Writes both loss curves in one PNG and prints tokens/s and peak memory (on
the CPU: the growth of the process's peak RSS during training; on CUDA: torch's peak allocation).

    python examples/finetune_hf.py                        # CPU, a couple of minutes
    python examples/finetune_hf.py --bf16 --device cuda
    python examples/finetune_hf.py --tiny --check          # what the tests run: seconds, and asserts agreement
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {  # words as tokens: the vocabulary (the LM head) is large next to the hidden size, as in real LMs
    "default": dict(hidden=64, layers=2, heads=4, seq=128, batch=16, vocab=8000, lr=2e-3, pre=80, fine=30),
    "tiny": dict(hidden=32, layers=1, heads=2, seq=16, batch=4, vocab=400, lr=3e-3, pre=8, fine=6),
}
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def corpora() -> tuple[str, str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from finetune_gpt import finetune_corpus, pretrain_corpus  # the same texts as the GPT example

    return pretrain_corpus(), finetune_corpus()


def tokenize(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]|\n", text)


def build_vocab(texts: list[str], size: int) -> dict[str, int]:
    counts = collections.Counter(tok for text in texts for tok in tokenize(text))
    words = [w for w, _ in counts.most_common(size - len(SPECIALS))]
    return {w: i for i, w in enumerate(SPECIALS + words)}


class Windows(torch.utils.data.Dataset):
    """`count` windows of `seq` tokens at seeded random offsets; labels = input_ids (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, seq: int, count: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(ids) - seq, (count,), generator=gen).tolist()
        self.ids, self.seq = ids, seq

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        window = self.ids[self.starts[i] : self.starts[i] + self.seq]
        return {"input_ids": window, "labels": window}


class Recorder:
    """A TrainerCallback (built lazily: transformers is imported in the child only) keeping the logged losses and
    the time of every step."""

    @staticmethod
    def make():
        import transformers

        class _Recorder(transformers.TrainerCallback):
            def __init__(self):
                self.losses, self.step_times = [], []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

            def on_step_end(self, args, state, control, **kwargs):
                self.step_times.append(time.perf_counter())

        return _Recorder()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _start_rss_peak() -> int:
    """Resets the peak-RSS mark where Linux allows it; returns the RSS to measure the growth from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:  # elsewhere: the lifetime peak so far (ru_maxrss: KiB on Linux, bytes on macOS)
        return _peak_rss()


def _peak_rss() -> int:
    if os.path.exists("/proc/self/clear_refs"):
        return _status("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def train_one(impl: str, cfg: dict, device: str, bf16: bool) -> dict:
    """One run (plain or fusedopt), in this process."""
    import transformers

    import fusedopt
    from fusedopt.transformers import apply_fusedopt

    transformers.logging.set_verbosity_error()
    pre_text, fine_text = corpora()
    vocab = build_vocab([pre_text, fine_text], cfg["vocab"])
    encode = lambda s: torch.tensor([vocab.get(t, 1) for t in tokenize(s)], dtype=torch.long)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=cfg["hidden"],
                                      intermediate_size=4 * cfg["hidden"], num_hidden_layers=cfg["layers"],
                                      num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                                      max_position_embeddings=cfg["seq"], bos_token_id=2, eos_token_id=3,
                                      pad_token_id=0)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(device)
    if impl == "fusedopt":
        apply_fusedopt(model)
    recorder = Recorder.make()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _start_rss_peak()
    with tempfile.TemporaryDirectory() as out_dir:
        for phase, (text, steps) in enumerate([(pre_text, cfg["pre"]), (fine_text, cfg["fine"])]):
            opt_cls = fusedopt.optim.AdamW if impl == "fusedopt" else torch.optim.AdamW
            opt = opt_cls(model.parameters(), lr=cfg["lr"], weight_decay=0.1)
            args = transformers.TrainingArguments(
                output_dir=out_dir, max_steps=steps, per_device_train_batch_size=cfg["batch"],
                learning_rate=cfg["lr"], lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
                bf16=bf16, use_cpu=device == "cpu", report_to=[], save_strategy="no", seed=phase,
                dataloader_num_workers=0, disable_tqdm=False,  # the Trainer's progress bar, on stderr
            )  # fmt: skip
            data = Windows(encode(text), cfg["seq"], steps * cfg["batch"], seed=phase)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                           callbacks=[recorder])  # fmt: skip
            trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    times = recorder.step_times[2:]  # the first steps pay one-time costs
    tokens = (len(times) - 1) * cfg["batch"] * cfg["seq"]
    return {"losses": recorder.losses, "tokens_per_s": tokens / (times[-1] - times[0]), "peak_mib": peak / 2**20,
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(vocab)}  # fmt: skip


def run_in_fresh_process(impl: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--device", args.device]
    cmd += ["--tiny"] * args.tiny + ["--bf16"] * args.bf16
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # stderr: the Trainer's progress bar
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="Trainer(bf16=True): autocast to bfloat16")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (what the tests use)")
    p.add_argument("--check", action="store_true", help="assert the two loss curves agree")
    p.add_argument("--out", default="examples/finetune_hf.png")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = SIZES["tiny" if args.tiny else "default"]
    if args.child:
        print(json.dumps(train_one(args.child, cfg, args.device, args.bf16)))
        return {}
    runs = {impl: run_in_fresh_process(impl, args) for impl in ("plain", "fusedopt")}
    first = runs["plain"]
    print(f"Llama: {first['params'] / 1e6:.2f}M params, vocab {first['vocab']} words, hidden {cfg['hidden']}; "
          f"{cfg['pre']} + {cfg['fine']} steps of {cfg['batch']} x {cfg['seq']} tokens, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}")  # fmt: skip
    for impl, r in runs.items():
        print(f"{impl:9s} final loss {r['losses'][-1]:.4f}  {r['tokens_per_s']:,.0f} tokens/s  "
              f"peak memory +{r['peak_mib']:.0f} MiB")  # fmt: skip
    pairs = list(zip(runs["fusedopt"]["losses"], runs["plain"]["losses"]))
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    print(f"largest relative difference between the loss curves: {worst:.2e}")
    _plot(runs, cfg, args.out)
    if args.check:
        # float32: the runs differ by float32 roundings (HF logs losses to 4 digits), which grow slowly over a long
        # run (~1e-7 after 14 tiny steps, ~4e-4 after 200 default ones); bf16 autocast: by bf16 roundings.
        limit = 2e-2 if args.bf16 else 1e-3
        assert len(pairs) == cfg["pre"] + cfg["fine"], "a loss per step"
        assert worst < limit and not math.isnan(worst), f"loss curves disagree: {worst:.2e}"
        assert all(r["peak_mib"] > 0 and math.isfinite(r["peak_mib"]) for r in runs.values()), "peak memory"
    return runs


def _plot(runs: dict, cfg: dict, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, style in (("plain", "-"), ("fusedopt", "--")):
        r = runs[impl]
        ax.plot(r["losses"], style, label=f"{impl} ({r['tokens_per_s']:,.0f} tok/s, +{r['peak_mib']:.0f} MiB peak)")
    ax.axvline(cfg["pre"], color="gray", lw=0.8)
    ax.set_xlabel("step (pre-training | fine-tuning)")
    ax.set_ylabel("cross-entropy")
    ax.set_title("HF Trainer, Llama from a config: plain vs apply_fusedopt + fusedopt AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
