"""Low-bit optimizer states (docs/LOW_BIT_STATES.md): the state-memory table and the step-time case, fusedopt's
modes beside torchao's and bitsandbytes' AdamWs (bench/lowbit_modes.py lists them).

    python -m bench.optim_lowbit          # the memory table, then the step-time table (ratios vs fusedopt int8)
    python -m bench.optim_lowbit --memory # the memory table only (--steps: the step-time table only)
    python -m bench.optim_lowbit --steps --bf16   # the step-time table on bfloat16 params
    python -m bench --ops adamw-int8      # the step-time rows, with the other optimizer cases' machinery

Byte model of an int8 AdamW step (fp32 params): read p, g (8 B), write p (4 B), read and write two 1-byte codes
(4 B) and their absmax (4 x 4/256 B): 16.06 B per param, against 28 B for the float32 step (bf16 params: 10.06 B).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from bench import harness, report, runner
from bench.harness import Case, Env, Impl, Runnable, Target, compile_note, fusedopt_impls
from bench.lowbit_modes import ADAMW_KW, FULL_PRECISION, StateMode, adamw_modes, state_bytes, step_eagerly
from bench.optim import _describe, llama_shapes, make_params, numel, sizes

INT8_BYTES = ("read p, g; write p; read + write 2 codes (1 B each) and their absmax (4 B / 256): 16.06 B fp32, "
              "10.06 B bf16")
REFERENCE = "fusedopt int8"  # the mode the step-time table's ratios are taken against


def llama2_7b_shapes() -> list:
    return llama_shapes(4096, 11008, 32, 32000, 4096)


def scaled_down_shapes() -> list:
    return llama_shapes(256, 704, 4, 8000, 64)


# --- the memory table ----------------------------------------------------------------------------------------------


def measure_mode(mode: StateMode, shapes) -> int:
    """State bytes an optimizer of this mode holds after one step on params of these shapes (compiling off)."""
    opt = mode.optimizer(shapes, torch.device("cpu"), "cpu" if mode.kind == "fusedopt" else None)
    step_eagerly(opt)
    return state_bytes(opt)


def memory_rows(modes: list[StateMode], shapes_big, shapes_small) -> list[dict]:
    """Per mode: state bytes computed from the big set's shapes, and measured (and computed) on the small set."""
    rows = []
    for mode in modes:
        row = {"mode": mode.name, "computed_big": mode.layout.state_bytes(shapes_big, mode.dtype),
               "computed_small": mode.layout.state_bytes(shapes_small, mode.dtype), "measured_small": None,
               "note": mode.note}  # fmt: skip
        if mode.make is not None:
            try:
                row["measured_small"] = measure_mode(mode, shapes_small)
            except Exception as exc:  # a peer that fails is listed with its error, the table goes on
                row["note"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
        rows.append(row)
    return rows


def memory_table(modes: list[StateMode] | None = None, big=None, small=None) -> str:
    """Markdown: per mode, the state of a Llama-2-7B-shaped set computed, and a scaled-down set's measured."""
    modes = adamw_modes() if modes is None else modes
    big_name = "Llama-2-7B shapes" if big is None else "from shapes"
    big, small = big or llama2_7b_shapes(), small or scaled_down_shapes()
    n_big, n_small = numel(big), numel(small)
    lines = [f"| AdamW state | {big_name} ({n_big / 1e9:.2f} B params): computed | B / param | "
             f"scaled-down Llama ({_describe(small)}): measured | B / param | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in memory_rows(modes, big, small):
        measured, per_param, note = "unavailable", "-", r["note"]
        if r["measured_small"] is not None:
            measured = f"{r['measured_small'] / 2**20:.2f} MiB"
            per_param = f"{r['measured_small'] / n_small:.3f}"
            if r["measured_small"] != r["computed_small"]:  # the layout's rule missed something the library holds
                note = f"the shapes' rule gives {r['computed_small']} B, measured {r['measured_small']} B; {note}"
        lines.append(f"| {r['mode']} | {r['computed_big'] / 2**30:.2f} GiB | {r['computed_big'] / n_big:.3f} | "
                     f"{measured} | {per_param} | {note} |")  # fmt: skip
    return "\n".join(lines)


# --- the step-time case --------------------------------------------------------------------------------------------

# Per impl name, after its first call: (seconds the first step took, its optimizer's state bytes). The first step
# creates the state and, for torchao, compiles; the runner's timing starts after it.
FIRST_STEPS: dict[str, tuple[float, int]] = {}


def _recording(name: str, opt: torch.optim.Optimizer, warmup: int = 1) -> Runnable:
    def run():
        if name in FIRST_STEPS:
            opt.step()
            return
        t0 = time.perf_counter()
        opt.step()
        FIRST_STEPS[name] = (time.perf_counter() - t0, state_bytes(opt))

    return Runnable(run, warmup=warmup)


def _mode_impls(mode: StateMode, shapes, env: Env) -> list[Impl]:
    dev = env.device
    if mode.kind == "fusedopt":
        label = mode.name.removeprefix("fusedopt ")
        return fusedopt_impls("optim.AdamW", dev, lambda api, b, m=mode: _recording(
            f"{m.name} ({b})", m.optimizer(shapes, dev, b)), label=label)  # fmt: skip
    if mode.make is None:
        return [Impl(mode.name, "peer", None, mode.note)]
    skip = compile_note(env, "optim") if mode.compiles else ""
    if skip:
        return [Impl(mode.name, "peer", None, f"{skip}: its step is torch.compile'd per param shape")]
    # A compiling peer's first call compiles each shape; a second untimed call absorbs any recompile.
    warmup = 2 if mode.compiles else 1
    return [Impl(mode.name, "peer", lambda m=mode: _recording(m.name, m.optimizer(shapes, dev), warmup))]


def cases(env: Env, shapes=None, dtype: torch.dtype = torch.float32) -> list[Case]:
    """The int8 AdamW step beside the full-precision steps and the peers, on params of `dtype` (fp32: the main
    bench's `adamw-int8`; bf16: `adamw-int8-bf16`, from `python -m bench.optim_lowbit --bf16`)."""
    import fusedopt

    shapes, dev = shapes or sizes(env)["model"], env.device
    FIRST_STEPS.clear()  # the impls below record theirs anew
    # Every mode for any params, and those made for this dtype (a master-weight mode: bf16).
    modes = [dataclasses.replace(m, param_dtype=dtype) for m in adamw_modes() if m.param_dtype in (None, dtype)]
    impls = []
    for mode in modes:
        if mode.kind == "fusedopt" and mode.layout != FULL_PRECISION:
            impls += _mode_impls(mode, shapes, env)
    backend = "cuda" if env.is_cuda else "cpu"
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    full = f"fusedopt {name} ({backend})"  # the full-precision step (state in the params' dtype) int8 is held to
    impls.append(Impl(full, "peer", lambda: _recording(
        full, fusedopt.AdamW(make_params(shapes, dtype, dev), **ADAMW_KW, backend=backend))))
    impls.append(Impl("torch fused", "peer", lambda: _recording("torch fused", torch.optim.AdamW(
        make_params(shapes, dtype, dev), **ADAMW_KW, fused=True))))  # fmt: skip
    for mode in modes:
        if mode.kind == "peer":
            impls += _mode_impls(mode, shapes, env)
    n, e = numel(shapes), dtype.itemsize
    op = f"AdamW int8 states {name}, {_describe(shapes)}"
    # The goal: an int8 step within 1.5x of the float32 fused step (it moves fewer bytes but quantizes).
    return [Case("adamw-int8" + ("" if dtype == torch.float32 else f"-{name}"), "optim", op,
                 int(n * (3 * e + 4.0625)), INT8_BYTES, impls,
                 targets=[Target("vs", 1 / 1.5, full, impl=REFERENCE)])]  # fmt: skip


def step_table(rows, n_params: int) -> str:
    """The step-time rows with each impl's first step, the ratio to fusedopt int8 and the state it held."""
    ref = next((r for r in rows if r.impl.startswith(REFERENCE) and r.ms is not None), None)
    lines = [f"| impl | ms / step (median) | x {ref.impl if ref else REFERENCE} | first step | state B / param | "
             "note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        first = FIRST_STEPS.get(r.impl)
        ms = f"{r.ms:.1f}" if r.ms is not None else "-"
        ratio = f"{r.ms / ref.ms:.2f}" if r.ms is not None and ref is not None else "-"
        first_s = f"{first[0]:.2f} s" if first else "-"
        per_param = f"{first[1] / n_params:.3f}" if first else "-"
        lines.append(f"| {r.impl} | {ms} | {ratio} | {first_s} | {per_param} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.optim_lowbit", description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="the memory table only")
    p.add_argument("--steps", action="store_true", help="the step-time table only")
    p.add_argument("--bf16", action="store_true", help="time the steps on bfloat16 params (default float32)")
    p.add_argument("--quick", action="store_true", help="small sizes, short timing; compiling peers skipped")
    args = p.parse_args(argv)
    if not args.steps:
        print(memory_table())
    if args.memory:
        return 0
    env = harness.make_env("cuda" if torch.cuda.is_available() else "cpu", args.quick)
    env.copy_gbps = harness.copy_bandwidth(env)
    (case,) = cases(env, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    rows, targets, _ = runner.run_cases([case], env, progress=sys.stderr.isatty())
    load = report.load_average()
    print(f"\nStep time: {case.op}, {env.device.type}, load average {load if load is None else round(load, 1)}; "
          f"ratio = ms / ms of {REFERENCE} (above 1: slower than it)\n")  # fmt: skip
    print(step_table(rows, numel(sizes(env)["model"])))
    for t in targets:
        print(f"\ntarget {t['target']}: {t['value'] and round(t['value'], 3)} ({'met' if t['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
