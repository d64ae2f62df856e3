"""Muon for the hidden matrices, AdamW for the rest: `muon_param_groups(model)` splits a model's parameters by the
usual rule, and `MuonWithAdamW` steps both optimizers as one (one state_dict, zero_grad, and param_groups that LR
schedulers and GradScaler see).

The rule (Keller Jordan's Muon recipe, as torch.optim.Muon's docstring states it): Muon is for the 2-D weights of
hidden layers. A parameter goes to Muon when it is a 2-D tensor that is
- not the weight of an embedding (nn.Embedding, nn.EmbeddingBag), nor tied to one (the same Parameter object);
- not in the output head: a module whose name (last dotted component) is in `head_names` (lm_head, output, head,
  classifier, score, embed_out by default);
everything else goes to AdamW: biases, norm weights (1-D), embeddings, the head, and tensors of other ranks
(convolution kernels: torch.optim.Muon takes 2-D params only).
"""

from __future__ import annotations

import collections

import torch

from fusedopt.optim import _hooks

HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score", "embed_out")


def muon_param_groups(model: torch.nn.Module, *, head_names=HEAD_NAMES) -> dict:
    """{"muon": [2-D hidden weights], "adamw": [every other parameter]}, each parameter once (see the module
    docstring for the rule)."""
    to_adamw: set = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) or name.rsplit(".", 1)[-1] in head_names:
            to_adamw.update(id(p) for p in module.parameters())
    groups: dict = {"muon": [], "adamw": []}
    for p in model.parameters():  # deduplicated: a tied weight comes once
        if not p.requires_grad:
            continue
        groups["muon" if p.ndim == 2 and id(p) not in to_adamw else "adamw"].append(p)
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """fusedopt.optim.Muon on the hidden matrices and fusedopt.optim.AdamW on the rest (`muon_param_groups`),
    stepped as one optimizer.

    `model_or_groups`: an nn.Module (split by `muon_param_groups(model, head_names=...)`) or a dict
    {"muon": params or param groups, "adamw": params or param groups}. `muon` and `adamw` are the keyword arguments
    of each optimizer (torch's defaults otherwise); `backend` goes to both.

    `param_groups` lists Muon's groups first, then AdamW's: the same dicts the two optimizers read, so an LR
    scheduler (or any code that sets group["lr"]) drives both. `state_dict()` is {"muon": ..., "adamw": ...}.
    Under GradScaler both unscale and skip inside their kernels. Clip with fusedopt.nn.utils.clip_grad_norm_ over
    all params (max_grad_norm= folded into each optimizer would clip each half by its own norm)."""

    _step_supports_amp_scaling = True  # GradScaler: both optimizers unscale and skip in their kernels

    def __init__(self, model_or_groups, *, muon: dict | None = None, adamw: dict | None = None, backend=None,
                 head_names=HEAD_NAMES):  # fmt: skip
        from fusedopt.optim.adam import AdamW
        from fusedopt.optim.muon import Muon

        if isinstance(model_or_groups, torch.nn.Module):
            groups = muon_param_groups(model_or_groups, head_names=head_names)
        else:
            groups = dict(model_or_groups)
        self.optimizers = {}
        for key, cls, kwargs in (("muon", Muon, muon), ("adamw", AdamW, adamw)):
            params = list(groups.get(key, ()))
            if params:
                self.optimizers[key] = cls(params, **{"backend": backend, **(kwargs or {})})
        if not self.optimizers:
            raise ValueError("MuonWithAdamW got no parameters")
        # The sub-optimizers' group dicts themselves (Optimizer.add_param_group keeps the dict it is given).
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups], {})
        self.state = collections.ChainMap(*(opt.state for opt in self.optimizers.values()))

    @property
    def muon(self):
        return self.optimizers.get("muon")

    @property
    def adamw(self):
        return self.optimizers.get("adamw")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = {k: getattr(self, k) for k in ("grad_scale", "found_inf") if hasattr(self, k)}  # set by GradScaler
        for opt in self.optimizers.values():
            for k, v in amp.items():
                setattr(opt, k, v)
            try:
                opt.step()
            finally:
                for k in amp:
                    delattr(opt, k)
        return loss

    def __getstate__(self) -> dict:
        # torch's keeps defaults, state and param_groups only; the two optimizers (whose state and group dicts
        # those are) go in the same state, so a copy's shares them as the original's do
        return {**super().__getstate__(), "optimizers": self.optimizers}

    def state_dict(self) -> dict:
        # the hooks registered on this optimizer run around the two optimizers' state_dicts (each runs its own)
        return _hooks.state_dict_with_hooks(self, lambda: {key: o.state_dict() for key, o in self.optimizers.items()})

    def load_state_dict(self, state_dict: dict) -> None:
        _hooks.load_with_hooks(self, state_dict, self._load_both)

    def _load_both(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"MuonWithAdamW state_dict has {sorted(state_dict)}, this optimizer {sorted(self.optimizers)}"
            )
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[key])
