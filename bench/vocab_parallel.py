"""`python -m bench.vocab_parallel`: the vocab-parallel cross-entropy on 2 gloo ranks on the CPU beside the
single-process run, forward + backward, with the bytes each rank receives per row (token), measured at the collective.

    python -m bench.vocab_parallel                 # N=512 rows, V=32000 classes, fp32
    python -m bench.vocab_parallel --quick         # a few seconds
    python -m bench.vocab_parallel --out DIR       # results folder (default bench/results/cpu/)

Rows: fusedopt's single-process cross_entropy on the whole (N, V) logits with 1 and with 2 threads, torch's
F.cross_entropy (2 threads), and the vocab-parallel path on 2 ranks of 1 thread each holding (N, V/2). Median of
`--reps` timed calls after one warm-up. On one machine gloo's "communication" is a loopback copy: the time shows the
cost of the extra collective and the torch-composed local math, not of a network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fusedopt.nn import vocab_parallel
from fusedopt.nn.functional import cross_entropy

WORLD = 2


def _data(n: int, v: int, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=gen).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    t[::10] = -100
    return x, t


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(loss_fn, x):
    def run():
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(loss_fn(leaf), [leaf])

    return run


def _rank_main(rank: int, port: int, n: int, v: int, dtype_name: str, reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        x, t = _data(n, v, getattr(torch, dtype_name))
        per = -(-v // WORLD)
        start = rank * per
        local = x[:, start : start + per].contiguous()
        received = []
        original = vocab_parallel._all_gather_flat

        def counting(out_t, local_t, group):
            received.append((out_t.numel() - local_t.numel()) * out_t.element_size())
            original(out_t, local_t, group)

        vocab_parallel._all_gather_flat = counting
        group = dist.group.WORLD
        loss = lambda z: cross_entropy(z, t, process_group=group, vocab_start=start, vocab_size=v)
        ms = _median_ms(_fwd_bwd(loss, local), reps)
        vocab_parallel._all_gather_flat = original
        times = [None] * WORLD
        dist.all_gather_object(times, ms)
        if rank == 0:
            result = {"ms": max(times), "ms_per_rank": times, "bytes_per_row": received[-1] / n, "collectives_per_call":
                      len(received) // (reps + 1)}  # fmt: skip
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, v: int, dtype_name: str, reps: int) -> dict:
    """Every row of the table, as a dict (also written as JSON by main)."""
    import torch.multiprocessing as mp

    dtype = getattr(torch, dtype_name)
    x, t = _data(n, v, dtype)
    rows = []
    threads_before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = _median_ms(_fwd_bwd(lambda z: cross_entropy(z, t), x), reps)
        rows.append({"impl": f"fusedopt cross_entropy, 1 process x {threads} thread(s)", "ms": ms, "bytes_per_row": 0})
    ms = _median_ms(_fwd_bwd(lambda z: F.cross_entropy(z, t), x), reps)
    rows.append({"impl": "torch F.cross_entropy, 1 process x 2 threads", "ms": ms, "bytes_per_row": 0})
    torch.set_num_threads(threads_before)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(_rank_main, args=(_free_port(), n, v, dtype_name, reps, out), nprocs=WORLD, join=True)
        tp = json.loads(Path(out).read_text())
    rows.append({"impl": f"fusedopt vocab-parallel, {WORLD} gloo ranks x 1 thread", "ms": tp["ms"],
                 "bytes_per_row": tp["bytes_per_row"], "collectives_per_call": tp["collectives_per_call"]})  # fmt: skip
    return {"n": n, "v": v, "dtype": dtype_name, "reps": reps, "world": WORLD, "rows": rows,
            "expected_bytes_per_row": vocab_parallel.row_statistics_bytes(WORLD, 0.0, dtype)}  # fmt: skip


def markdown(result: dict) -> str:
    title = (f"Cross-entropy forward + backward, N={result['n']} rows, V={result['v']} classes, {result['dtype']}, "
             f"CPU, median of {result['reps']}")  # fmt: skip
    lines = [title, "", "| impl | ms | bytes received per row |", "|---|---|---|"]
    lines += [f"| {r['impl']} | {r['ms']:.2f} | {r['bytes_per_row']:g} |" for r in result["rows"]]
    logits_row = result["v"] // result["world"] * torch.empty((), dtype=getattr(torch, result["dtype"])).element_size()
    lines += ["", f"A rank's logits row is {logits_row} bytes; gathering them would move that much per row and rank."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vocab_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=128, V=8000, 5 reps")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="", help="results folder (default bench/results/cpu/)")
    args = p.parse_args(argv)
    n, v, reps = (128, 8000, 5) if args.quick else (args.rows, args.vocab, args.reps)
    result = run(n, v, args.dtype, reps)
    table = markdown(result)
    print(table)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"vocab-parallel-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(table)
    print(f"Wrote {out_dir / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
