"""fusedopt.nn.CrossEntropyLoss: torch.nn.CrossEntropyLoss with the fused kernels (a subclass, so isinstance checks,
the `weight` buffer and state_dict are torch's)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt.nn import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss's arguments, plus keyword-only `backend`, `z_loss`, `softcap`, `return_lse`,
    `inplace_backward`, and `process_group`, `vocab_start`, `vocab_size` for class-sharded logits (documented in
    fusedopt.nn.functional.cross_entropy)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, backend: str | None = "auto",
                 z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 inplace_backward: bool = False, process_group=None, vocab_start: int | None = None,
                 vocab_size: int | None = None) -> None:  # fmt: skip
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = backend
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, backend=self.backend, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward, process_group=self.process_group,
            vocab_start=self.vocab_start, vocab_size=self.vocab_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"backend={self.backend!r}"]
        if self.ignore_index != -100:
            extras.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            extras.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        if self.process_group is not None:
            extras.append(f"vocab_start={self.vocab_start}, vocab_size={self.vocab_size} (process_group)")
        return ", ".join(extras)
