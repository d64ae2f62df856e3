"""Linear cross-entropy on the CPU: peak memory beyond the inputs and the returned gradients, and time, of one
forward + backward, each implementation in a fresh process (so no allocator cache or earlier peak is counted).

    python -m bench.linear_ce_memory                          # N=4096 H=1024 V=32000, fp32 and bf16, every impl
    python -m bench.linear_ce_memory --impls "fusedopt auto" --dtypes bf16 --reps 1 --json out.json

Memory: the process's RSS high-water mark (reset through /proc/self/clear_refs after malloc_trim) during the first
full-size call, minus the RSS before it (inputs allocated, a small warm-up call done so that library initialisation
is not counted), minus the bytes of the gradients it returns (d_input and d_weight). Time: the median of --reps
calls after that one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IGNORE = -100


def _fused(mode):
    def run(x, w, t):
        from fusedopt.nn.functional import linear_cross_entropy

        return linear_cross_entropy(x, w, t, ignore_index=IGNORE, mode=mode)

    return run


IMPLS = {
    "torch eager": lambda x, w, t: F.cross_entropy(F.linear(x, w), t, ignore_index=IGNORE),
    "torch native chunked": lambda x, w, t: F.linear_cross_entropy(
        x, w, t, ignore_index=IGNORE, options=torch.nn.LinearCrossEntropyOptions()
    ),
    "fusedopt row_chunked": _fused("row_chunked"),
    "fusedopt vocab_blocked": _fused("vocab_blocked"),
    "fusedopt auto": _fused("auto"),
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) * h**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.1] = IGNORE
    return x, w, t


def measure_here(impl: str, n: int, h: int, v: int, dtype: torch.dtype, reps: int) -> dict:
    """Run in the child process: the measurement of one implementation."""
    fn = IMPLS[impl]
    x, w, t = make_inputs(n, h, v, dtype)
    small = make_inputs(16, h, 512, dtype, seed=1)
    torch.autograd.grad(fn(*small), small[:2])  # library initialisation, not counted
    del small
    base = _reset_peak()
    start = time.perf_counter()
    grads = torch.autograd.grad(fn(x, w, t), [x, w])
    first = time.perf_counter() - start
    peak = _status("VmHWM")
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.autograd.grad(fn(x, w, t), [x, w])
        times.append(time.perf_counter() - start)
    times = times or [first]
    return {"impl": impl, "extra_bytes": peak - base - grad_bytes, "grad_bytes": grad_bytes, "first_s": first,
            "median_s": statistics.median(times), "min_s": min(times)}  # fmt: skip


def measure(impl: str, n: int, h: int, v: int, dtype: str, reps: int) -> dict:
    """One implementation in a fresh Python process."""
    cmd = [sys.executable, "-m", "bench.linear_ce_memory", "--child", impl, "--n", str(n), "--h", str(h), "--v",
           str(v), "--dtypes", dtype, "--reps", str(reps)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root)
    if out.returncode != 0:
        return {"impl": impl, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], n: int, h: int, v: int) -> str:
    lines = [f"linear cross-entropy fwd+bwd on the CPU, N={n} H={h} V={v}, 10% ignore_index; each row a fresh "
             "process; extra = peak RSS beyond the inputs and the returned gradients", "",
             "| dtype | impl | extra MiB | first call s | median s |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['impl']} | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['dtype']} | {r['impl']} | {r['extra_bytes'] / 2**20:.0f} | {r['first_s']:.2f} | "
                         f"{r['median_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure_here(a.child, a.n, a.h, a.v, DTYPES[a.dtypes], a.reps)))
        return
    rows = []
    for dtype in a.dtypes.split(","):
        for impl in a.impls.split(","):
            rows.append(dict(measure(impl, a.n, a.h, a.v, dtype, a.reps), dtype=dtype))
            print(table(rows[-1:], a.n, a.h, a.v).splitlines()[-1], flush=True)
    print()
    print(table(rows, a.n, a.h, a.v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "h": a.h, "v": a.v, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
