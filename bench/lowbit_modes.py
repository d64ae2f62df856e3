"""The optimizer-state modes of the low-bit bench (bench/optim_lowbit.py): fusedopt's and its peers' (torchao,
bitsandbytes), one entry each in `adamw_modes()`. A later mode (int4, fp8, bf16 + fp32 master, bf16 + int16
remainder, int8 with stochastic rounding or a master) is one more entry there: the memory table, the step-time case
and the tests pick it up.

Each mode says how its library lays out AdamW's two states (`StateLayout`, read from the library's source: the block
size, the size under which a param keeps full-precision state, the maps it keeps), so the Llama-2-7B row is computed
from the shapes; the scaled-down row is measured from the state tensors an optimizer actually holds after one step
(`state_bytes`), and the tests check that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.harness import peer_module
from bench.optim import LR, make_params, numel

ADAMW_KW = {"lr": LR, "weight_decay": 0.01}


@dataclass(frozen=True)
class StateLayout:
    """AdamW's state per param, as a library stores it. A param with at least `min_numel` elements (and, where
    `whole_blocks`, a multiple of `block` of them) keeps each state as `code_bits`-bit codes plus one float32 scale per
    `block` values; a smaller one keeps full precision: `fallback_itemsize` bytes per value (None: the param's dtype).
    `code_bits=32` is plain full precision throughout."""

    code_bits: int
    block: int = 256
    min_numel: int = 4096
    whole_blocks: bool = False  # torchao: a param whose size is not a multiple of the block keeps full precision
    fallback_itemsize: int | None = None
    map_bytes_per_state: int = 0  # torchao: every quantized state tensor holds its own copy of the map
    map_bytes_shared: int = 0  # bitsandbytes: one map per signedness per optimizer, shared by its params
    extra_bytes_per_elt: int = 0  # state beside the moments, per param element (a master copy, a remainder)
    states: int = 2  # exp_avg, exp_avg_sq

    def quantizes(self, n: int) -> bool:
        return self.code_bits < 32 and n >= self.min_numel and not (self.whole_blocks and n % self.block)

    def state_bytes(self, shapes, param_dtype: torch.dtype) -> int:
        """State bytes (without the per-param `step` counters) of AdamW over params of these shapes."""
        total, any_quantized = 0, False
        for s in shapes:
            n = numel([s])
            total += self.extra_bytes_per_elt * n
            if self.quantizes(n):
                any_quantized = True
                # codes: a half byte rounds up (fusedopt int4, an odd size)
                per_state = -(-n * self.code_bits // 8) + 4 * -(-n // self.block) + self.map_bytes_per_state
            else:
                per_state = n * (self.fallback_itemsize or param_dtype.itemsize)
            total += self.states * per_state
        return total + (self.map_bytes_shared if any_quantized else 0)


FULL_PRECISION = StateLayout(code_bits=32)


@dataclass
class StateMode:
    """One row of the low-bit bench: an AdamW with some state layout, fusedopt's or a peer's."""

    name: str  # the row's label, e.g. "fusedopt int8", "torchao AdamW8bit"
    kind: str  # "fusedopt" or "peer"
    layout: StateLayout
    make: Callable[..., torch.optim.Optimizer] | None  # make(params, backend=None): None when unavailable here
    note: str = ""  # why unavailable; or what to know about the mode
    compiles: bool = False  # its step runs torch.compile: a slow first step, skipped where compiling is
    # The params' dtype the mode is for (bf16 for a master-weight mode); None: any, float32 in the memory table.
    param_dtype: torch.dtype | None = None
    kwargs: dict = field(default_factory=dict)  # fusedopt's mode keywords (state_dtype=...)

    @property
    def dtype(self) -> torch.dtype:
        return self.param_dtype or torch.float32

    def optimizer(self, shapes, device, backend: str | None = None) -> torch.optim.Optimizer:
        params = make_params(shapes, self.dtype, device)
        return self.make(params, backend) if self.kind == "fusedopt" else self.make(params)


def fusedopt_mode(label: str, layout: StateLayout, note: str = "", param_dtype=None, **kwargs) -> StateMode:
    """fusedopt.AdamW with mode keywords (e.g. state_dtype="int8"); its rows carry the backend."""
    import fusedopt

    def make(params, backend=None):
        return fusedopt.AdamW(params, **ADAMW_KW, **kwargs, **({"backend": backend} if backend else {}))

    return StateMode(f"fusedopt {label}", "fusedopt", layout, make, note, param_dtype=param_dtype, kwargs=kwargs)


def peer_mode(name: str, module: str, cls: str, dist: str, layout: StateLayout, compiles: bool = False) -> StateMode:
    """A peer library's AdamW (torch's hyperparameters, the same as fusedopt's rows), or its reason for absence."""
    mod, why = peer_module(module, dist)
    if mod is None:
        return StateMode(name, "peer", layout, None, why, compiles)
    opt_cls = getattr(mod, cls, None)
    if opt_cls is None:
        return StateMode(name, "peer", layout, None, f"{module} has no {cls} in this version", compiles)
    return StateMode(name, "peer", layout, lambda params: opt_cls(params, **ADAMW_KW), "", compiles)


def adamw_modes() -> list[StateMode]:
    """Every AdamW state mode the low-bit bench compares: fusedopt's first, then the peers'."""
    return [
        fusedopt_mode("fp32", FULL_PRECISION, note="torch.optim.AdamW's state (fused or not)"),
        fusedopt_mode("int8", StateLayout(code_bits=8), state_dtype="int8"),
        fusedopt_mode("int4", StateLayout(code_bits=4, block=128), state_dtype="int4"),
        fusedopt_mode("fp8", StateLayout(code_bits=8), state_dtype="fp8"),
        # bf16 params (docs/MASTER_WEIGHTS.md): bf16 states rounded stochastically, or float32 states beside an exact
        # master (float32, or its int16 low half beside the param). A new mode is one line here.
        fusedopt_mode("bf16 + stochastic rounding", FULL_PRECISION, param_dtype=torch.bfloat16,
                      bf16_stochastic_round=True),
        fusedopt_mode("bf16 + fp32 master", StateLayout(32, fallback_itemsize=4, extra_bytes_per_elt=4),
                      param_dtype=torch.bfloat16, master_weights=True),
        fusedopt_mode("bf16 + int16 remainder", StateLayout(32, fallback_itemsize=4, extra_bytes_per_elt=2),
                      param_dtype=torch.bfloat16, master_weights="remainder"),
        # Low-bit states with bf16 params: rounded stochastically (a small param's states bf16), or beside the exact
        # master (a small param's states float32, as beside any master).
        fusedopt_mode("bf16 + int8 + stochastic rounding", StateLayout(8), param_dtype=torch.bfloat16,
                      state_dtype="int8", bf16_stochastic_round=True),
        fusedopt_mode("bf16 + int8 + fp32 master", StateLayout(8, fallback_itemsize=4, extra_bytes_per_elt=4),
                      param_dtype=torch.bfloat16, state_dtype="int8", master_weights=True),
        fusedopt_mode("bf16 + int8 + int16 remainder", StateLayout(8, fallback_itemsize=4, extra_bytes_per_elt=2),
                      param_dtype=torch.bfloat16, state_dtype="int8", master_weights="remainder"),
        # torchao.optim: per state tensor its own map (256 or 16 float32 values); only sizes that are whole blocks
        # are quantized; its full-precision fallback has the param's dtype; the step is torch.compile'd per param.
        peer_mode("torchao AdamW8bit", "torchao.optim", "AdamW8bit", "torchao",
                  StateLayout(8, whole_blocks=True, map_bytes_per_state=256 * 4), compiles=True),
        peer_mode("torchao AdamW4bit", "torchao.optim", "AdamW4bit", "torchao",
                  StateLayout(4, block=128, whole_blocks=True, map_bytes_per_state=16 * 4), compiles=True),
        peer_mode("torchao AdamWFp8", "torchao.optim", "AdamWFp8", "torchao",
                  StateLayout(8, whole_blocks=True), compiles=True),
        # bitsandbytes: float32 state under 4096 elements whatever the param's dtype; two 256-value maps shared.
        peer_mode("bitsandbytes AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes",
                  StateLayout(8, fallback_itemsize=4, map_bytes_shared=2 * 256 * 4)),
    ]  # fmt: skip


# --- measuring what an optimizer holds ---------------------------------------------------------------------------


def _storages(t: torch.Tensor):
    """The plain tensors behind t: a tensor subclass (torchao's OptimState8bit, ...) is flattened to its parts."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(t, name))
    else:
        yield t


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of memory behind an optimizer's state tensors (the `step` counters left out): every storage once, a
    subclass's inner tensors included, a map that many params share counted once."""
    seen, total = set(), 0
    for st in opt.state.values():
        for key, value in st.items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue
            for t in _storages(value):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def step_eagerly(opt: torch.optim.Optimizer) -> None:
    """One step with torch.compile off (torchao compiles its step per param shape): the state it creates is the
    same, without minutes of compiling on a small CPU."""
    with torch.compiler.set_stance("force_eager"):
        opt.step()
