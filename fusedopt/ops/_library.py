"""The torch.library namespace `fusedopt`: every kernel entry is a custom op with a schema and a fake impl,
so torch.compile traces through it and the dispatcher knows what it mutates."""

from __future__ import annotations

from collections.abc import Callable

import torch

LIB = torch.library.Library("fusedopt", "DEF")


def define_op(schema: str, impl: Callable, fake: Callable) -> Callable:
    """Defines fusedopt::<name> with one Python impl for CPU and CUDA (it dispatches on its `backend` arg)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fusedopt::{name}", fake, lib=LIB)
    return getattr(torch.ops.fusedopt, name).default


def split_lr(lr, device: torch.device) -> tuple:
    """An optimizer's lr as (float, None), or (0.0, tensor on `device`) for an lr the kernel reads on the device.
    Eager: a CPU lr tensor is read on the host (a CPU scalar costs no sync; a pageable host-to-device copy would).
    Traced: the tensor stays a graph input, moved to the params' device."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if torch.compiler.is_compiling():
        return 0.0, lr.to(device)
    if lr.device.type == "cpu":
        return float(lr), None
    return 0.0, lr if lr.device == device else lr.to(device, non_blocking=True)
