"""examples/finetune_gpt.py's training run (its --tiny model and data, more steps) in this process, for the quality
tests of the optimizer-memory modes: int8 states (tests/test_lowbit_states.py) and bf16 params with stochastic
rounding (tests/test_stochastic_round.py). Seconds a run on one CPU thread."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # the example imports optimizers.py
import finetune_gpt
import optimizers

# --tiny's model; 150 pre-training + 50 fine-tuning steps (--tiny has 12 + 8: too few for the modes to differ)
TINY = {"dim": 32, "layers": 2, "heads": 2, "context": 32, "batch": 4, "lr": 3e-3, "clip": 0.5, "pre": 150, "fine": 50}


@functools.cache
def _data() -> tuple:
    pre, fine = finetune_gpt.pretrain_corpus(), finetune_gpt.finetune_corpus()
    chars = sorted(set(pre) | set(fine))
    index = {c: i for i, c in enumerate(chars)}
    encode = lambda s: torch.tensor([index[c] for c in s], dtype=torch.long)
    return encode(pre), encode(fine), len(chars)


def train(extra: dict | None = None, dtype: torch.dtype = torch.float32, optimizer: str = "adamw",
          **overrides) -> tuple:  # fmt: skip
    """(loss per step, the optimizer) of the example's fusedopt run of `optimizer` (examples/optimizers.py's names);
    `extra`: keywords for the optimizer."""
    cfg = argparse.Namespace(**{**TINY, **overrides})
    pre, fine, vocab = _data()
    made = []
    make = optimizers.make

    def recording_make(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model of thousands of params on a shared 2-core machine
    optimizers.make = recording_make
    try:
        run = finetune_gpt.train("fusedopt", cfg, [(pre, cfg.pre), (fine, cfg.fine)], vocab, "cpu", False, optimizer,
                                 extra, dtype)  # fmt: skip
    finally:
        optimizers.make = make
        torch.set_num_threads(threads)
    return run["losses"], made[0]
