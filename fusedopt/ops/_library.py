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
