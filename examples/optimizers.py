"""The optimizers the examples can train with (`--optimizer NAME`), written once for both scripts.

Each row names the fusedopt class, the plain-PyTorch counterpart the `--torch` / plain run uses, and the
hyperparameters relative to the script's own Adam(W) learning rate and weight decay. torch has no Lion and no LAMB:
their plain run is the same fusedopt class with backend="torch", fusedopt's plain-PyTorch reference backend.

Classes are looked up on fusedopt.optim when a run starts, so a name whose class this build lacks fails with a clear
message (`missing(name, impl)` says it before any work) instead of an ImportError at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Row:
    fused: str  # class in fusedopt.optim
    plain: str | None  # class in torch.optim; None: the fusedopt class with backend="torch"
    lr: float  # multiple of the script's Adam(W) learning rate
    wd: float  # multiple of the script's AdamW weight decay (0: none; coupled L2 is not used)
    kwargs: dict = field(default_factory=dict)
    sign_based: bool = False  # the update is a sign: float32 rounding can flip it, and the curves then part
    note: str = ""


# lr and wd are multiples of the script's base (seed: Adam lr 1e-3, no decay; GPT: AdamW lr 1e-3, wd 0.1).
# fmt: off
TABLE: dict[str, Row] = {
    "adam": Row("Adam", "Adam", lr=1, wd=0),
    "adamw": Row("AdamW", "AdamW", lr=1, wd=1),
    "sgd": Row("SGD", "SGD", lr=50, wd=0, kwargs={"momentum": 0.9, "nesterov": True}),
    "rmsprop": Row("RMSprop", "RMSprop", lr=0.3, wd=0),
    "adagrad": Row("Adagrad", "Adagrad", lr=10, wd=0),
    # Lion: lr 3-10x below AdamW's and wd as much above it (the paper's advice), so lr * wd stays AdamW's.
    "lion": Row("Lion", None, lr=1 / 3, wd=3, kwargs={"betas": (0.9, 0.99)}, sign_based=True),
    # Muon on the 2-D hidden weights, AdamW on embeddings, head, norms and biases; "match_rms_adamw" scales Muon's
    # update to AdamW's RMS so both halves take the AdamW learning rate.
    "muon": Row(
        "MuonWithAdamW", "Muon", lr=1, wd=1, kwargs={"adjust_lr_fn": "match_rms_adamw"},
        note="torch.optim.Muon on the 2-D hidden weights and torch.optim.AdamW on the rest, stepped together "
             "(fusedopt.optim.MuonWithAdamW in the fusedopt run)",
    ),
    # Adafactor's step is relative to the param's RMS (torch's default lr is 1e-2); decoupled decay, lr * wd as AdamW.
    "adafactor": Row("Adafactor", "Adafactor", lr=10, wd=0.1),
    # LAMB: per-tensor trust ratio, so lr is a relative step; apex's default decay 0.01 (added to the update).
    "lamb": Row("LAMB", None, lr=5, wd=0.1),
}
# fmt: on
NAMES = tuple(TABLE)


def help_text() -> str:
    own = [n for n, r in TABLE.items() if r.plain is None]
    notes = "; ".join(f"{n}: {r.note}" for n, r in TABLE.items() if r.note and r.plain is not None)
    return (f"one of {', '.join(NAMES)}. The plain run uses torch.optim's class of the same name; torch has no "
            f"{' and no '.join(own)}: their plain run is the same fusedopt class with backend='torch' (fusedopt's "
            f"plain-PyTorch reference backend); {notes}")  # fmt: skip


def _fusedopt_optim():
    try:
        import fusedopt.optim
    except ImportError:
        return None
    return fusedopt.optim


def missing(name: str, impl: str) -> str | None:
    """Why `name` cannot run as `impl` ("fusedopt" or "torch") in this build, or None when it can."""
    row = TABLE[name]
    if impl == "torch" and row.plain is not None:
        absent = [c for c in ([row.plain] + (["AdamW"] if name == "muon" else [])) if not hasattr(torch.optim, c)]
        return f"torch.optim.{absent[0]} is not in this torch ({torch.__version__})" if absent else None
    needed = ["Muon", "MuonWithAdamW"] if name == "muon" else [row.fused]
    fo = _fusedopt_optim()
    absent = [c for c in needed if fo is None or not hasattr(fo, c)]
    return f"fusedopt.optim.{absent[0]} is not in this build" if absent else None


def muon_split(model: nn.Module, head: nn.Module | None) -> dict:
    """{"muon": 2-D hidden weights, "adamw": the rest}: fusedopt.optim.muon_param_groups when this build has it, with
    `head`'s name as the head; otherwise the same rule here (2-D, not an embedding, not in the head)."""
    head_name = next((n for n, m in model.named_modules() if m is head), "").rsplit(".", 1)[-1]
    split = getattr(_fusedopt_optim(), "muon_param_groups", None)
    if split is not None:
        return split(model, head_names=(head_name,) if head_name else ())
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in (head.parameters() if head is not None else ())}
    groups: dict = {"muon": [], "adamw": []}
    for p in model.parameters():
        groups["muon" if p.ndim == 2 and id(p) not in skip else "adamw"].append(p)
    return groups


class Together:
    """Several torch optimizers stepped as one (the plain run's torch.optim.Muon + torch.optim.AdamW)."""

    def __init__(self, *optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def make(name: str, impl: str, model: nn.Module, lr: float, *, weight_decay: float = 0.0, clip: float | None = None,
         head: nn.Module | None = None, extra: dict | None = None):  # fmt: skip
    """The optimizer for `model`: `impl` "fusedopt" or "torch" (the plain run). `lr` and `weight_decay` are the
    script's AdamW values, scaled by the row. The fusedopt optimizer folds clip_grad_norm_(clip) into its step where
    the class takes max_grad_norm (its `max_grad_norm` is then set); otherwise the caller clips. `extra`: more
    keywords for the fusedopt class (e.g. state_dtype="int8"; for muon, both of MuonWithAdamW's optimizers)."""
    why = missing(name, impl)
    if why:
        raise SystemExit(why)
    row = TABLE[name]
    kw = {"lr": lr * row.lr, **row.kwargs}
    if row.wd:
        kw["weight_decay"] = weight_decay * row.wd
    fused = impl != "torch"
    if name == "muon":
        groups = muon_split(model, head)
        adamw = {"lr": lr, "weight_decay": weight_decay}
        if fused:
            return _fusedopt_optim().MuonWithAdamW({k: v for k, v in groups.items() if v}, muon={**kw, **(extra or {})},
                                                   adamw={**adamw, **(extra or {})})  # fmt: skip
        return Together(torch.optim.Muon(groups["muon"], **kw) if groups["muon"] else None,
                        torch.optim.AdamW(groups["adamw"], **adamw) if groups["adamw"] else None)  # fmt: skip
    if fused:
        return getattr(_fusedopt_optim(), row.fused)(model.parameters(), max_grad_norm=clip, **kw, **(extra or {}))
    if row.plain is None:  # the fusedopt class on its plain-PyTorch backend; the caller clips with torch's clip
        return getattr(_fusedopt_optim(), row.fused)(model.parameters(), backend="torch", max_grad_norm=None, **kw)
    return getattr(torch.optim, row.plain)(model.parameters(), **kw)
