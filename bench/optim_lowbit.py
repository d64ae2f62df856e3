"""Low-bit optimizer states (docs/LOW_BIT_STATES.md): the state-memory table (int8 and int4) and the int8 step-time
case.

    python -m bench.optim_lowbit          # the memory table (Llama-2-7B from shapes; a scaled-down set measured)
    python -m bench --ops adamw-int8      # the step-time rows, with the other optimizer cases' machinery

Byte model of an int8 AdamW step (fp32 params): read p, g (8 B), write p (4 B), read and write two 1-byte codes
(4 B) and their absmax (4 x 4/256 B): 16.06 B per param, against 28 B for the float32 step.
"""

from __future__ import annotations

import torch

from bench.harness import Case, Env, Impl, Runnable, Target, fusedopt_impls, peer_module
from bench.optim import LR, _describe, llama_shapes, make_params, numel, sizes

INT8_BYTES = "read p, g; write p; read + write 2 codes (1 B each) and their absmax (4 B / 256): 16.06 B fp32"


def llama2_7b_shapes() -> list:
    return llama_shapes(4096, 11008, 32, 32000, 4096)


def state_bytes_from_shapes(shapes, states: int, state_dtype: str | None, min_numel: int = 4096) -> int:
    """Optimizer state bytes (without the 4-byte `step` per tensor) for `states` buffers per param: codes (int8 one
    byte per value, int4 one per two) and a float32 absmax per block (256 or 128 values)."""
    from fusedopt import lowbit

    total = 0
    for s in shapes:
        n = numel([s])
        if state_dtype is not None and n >= min_numel:
            fmt = lowbit.FORMATS[state_dtype]
            total += states * (fmt.codes_numel(n) + 4 * fmt.num_blocks(n))
        else:
            total += states * 4 * n
    return total


def measured_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k != "step")  # fmt: skip


def memory_table(env: Env | None = None) -> str:
    import fusedopt

    rows = ["| parameter set | state_dtype | params | fp32 AdamW state | low-bit AdamW state | B / param (fp32 -> "
            "low-bit) | source |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    big, small = llama2_7b_shapes(), llama_shapes(256, 704, 4, 8000, 64)
    for state_dtype in ("int8", "int4"):
        n = numel(big)
        fp, q = state_bytes_from_shapes(big, 2, None), state_bytes_from_shapes(big, 2, state_dtype)
        rows.append(f"| Llama-2-7B shapes | {state_dtype} | {n / 1e9:.2f} B | {fp / 2**30:.1f} GiB | "
                    f"{q / 2**30:.1f} GiB | {fp / n:.2f} -> {q / n:.3f} | computed from shapes |")  # fmt: skip
        measured = {}
        for sd in (None, state_dtype):
            ps = make_params(small, torch.float32, torch.device("cpu"))
            opt = fusedopt.AdamW(ps, lr=LR, backend="cpu", state_dtype=sd)
            opt.step()
            measured[sd] = measured_state_bytes(opt)
        n = numel(small)
        assert measured[None] == state_bytes_from_shapes(small, 2, None)
        assert measured[state_dtype] == state_bytes_from_shapes(small, 2, state_dtype)
        rows.append(f"| scaled-down Llama ({_describe(small)}) | {state_dtype} | {n / 1e6:.1f} M | "
                    f"{measured[None] / 2**20:.1f} MiB | {measured[state_dtype] / 2**20:.1f} MiB | "
                    f"{measured[None] / n:.2f} -> {measured[state_dtype] / n:.3f} | measured (state tensors after one "
                    "step) |")  # fmt: skip
    return "\n".join(rows)


def _peer_8bit(name: str, module: str, cls: str, dist: str, shapes, dev) -> Impl:
    mod, why = peer_module(module, dist)
    if mod is None:
        return Impl(name, "peer", None, why)

    def build():
        return Runnable(getattr(mod, cls)(make_params(shapes, torch.float32, dev), lr=LR, weight_decay=0.01).step)

    return Impl(name, "peer", build)


def cases(env: Env) -> list[Case]:
    import fusedopt

    shapes, dev = sizes(env)["model"], env.device
    kw = {"lr": LR, "weight_decay": 0.01}
    impls = fusedopt_impls("optim.AdamW", dev, lambda api, b: Runnable(
        api(make_params(shapes, torch.float32, dev), **kw, backend=b, state_dtype="int8").step), label="int8")
    backend = "cuda" if env.is_cuda else "cpu"
    impls.append(Impl(f"fusedopt fp32 ({backend})", "peer", lambda: Runnable(
        fusedopt.AdamW(make_params(shapes, torch.float32, dev), **kw, backend=backend).step)))
    impls.append(Impl("torch fused", "peer", lambda: Runnable(
        torch.optim.AdamW(make_params(shapes, torch.float32, dev), **kw, fused=True).step)))
    impls.append(_peer_8bit("torchao AdamW8bit", "torchao.optim", "AdamW8bit", "torchao", shapes, dev))
    impls.append(_peer_8bit("bitsandbytes AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", shapes, dev))
    n = numel(shapes)
    op = f"AdamW int8 states fp32, {_describe(shapes)}"
    # The goal: an int8 step within 1.5x of the float32 fused step (it moves fewer bytes but quantizes).
    return [Case("adamw-int8", "optim", op, int(n * 16.0625), INT8_BYTES, impls,
                 targets=[Target("vs", 1 / 1.5, f"fusedopt fp32 ({backend})")])]  # fmt: skip


if __name__ == "__main__":
    print(memory_table())
