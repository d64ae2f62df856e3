"""`python -m bench` (= `make bench`): every op against its peers on this machine's device, one table.

    python -m bench                     # the whole suite, default sizes for this device
    python -m bench --quick             # a 1-2 minute smoke run at small sizes
    python -m bench --ops adam,ce       # only these cases (tags) or families (optim, losses)
    python -m bench --device cuda --out /tmp/results
    python -m bench --list              # the cases and their impls, without running them
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import harness, losses, optim, optim_lowbit, report, runner

# The low-bit case runs last: its first steps (8-bit state creation, torchao's compiles) take the longest, and on a
# CPU run the time limit then skips its rows rather than a family's.
FAMILIES = {"optim": optim, "losses": losses, "optim-lowbit": optim_lowbit}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--ops", default="", help="comma-separated case tags or families (optim, losses); default all")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing: a 1-2 minute smoke run")
    p.add_argument("--out", default="", help="results folder (default bench/results/<device>/)")
    p.add_argument("--list", action="store_true", help="list the cases and impls, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which the remaining impls are skipped (listed as such); default 540 for the "
                   "full CPU run (it must stay under 10 minutes on 2 cores), none otherwise")
    return p.parse_args(argv)


def select(all_cases: list, ops: str) -> list:
    if not ops:
        return all_cases
    wanted = {w.strip() for w in ops.split(",") if w.strip()}
    known = {c.tag for c in all_cases} | {c.family for c in all_cases}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"unknown --ops {sorted(unknown)}; choose from {sorted(known)}")
    return [c for c in all_cases if c.tag in wanted or c.family in wanted]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    env = harness.make_env(device, args.quick)
    limit = args.time_limit if args.time_limit is not None else (540 if not (args.quick or env.is_cuda) else 0)
    cases = []
    for mod in FAMILIES.values():
        cases += mod.cases(env)
    cases = select(cases, args.ops)
    if args.list:
        for c in cases:
            print(f"{c.tag:12s} {c.op}")
            for i in c.impls:
                print(f"    {i.kind:8s} {i.name}" + (f"  [{i.note}]" if i.note else ""))
        return 0
    t0 = time.time()
    env.deadline = t0 + limit if limit else 0.0
    meta = report.run_meta(env)
    if args.ops:
        meta["ops"] = args.ops  # the files are named after the selection (report.write_results)
    print(f"fusedopt bench on {report.describe_machine(meta)}{' (--quick)' if args.quick else ''}", file=sys.stderr)
    env.copy_gbps = harness.copy_bandwidth(env)
    total = sum(len(c.impls) for c in cases)
    rows, targets, interrupted = runner.run_cases(cases, env, progress=not args.no_progress)
    if not interrupted:  # the better of two copy measurements: one may have met a burst of other work
        meta["copy_gbps_start_end"] = [env.copy_gbps, harness.copy_bandwidth(env)]
        env.copy_gbps = max(meta["copy_gbps_start_end"])
        targets = runner.rescore(cases, rows, env)
    done = {r.tag for r in rows}
    cases = [c for c in cases if c.tag in done]
    if interrupted:
        meta["interrupted"] = f"stopped early: {len(rows)} of {total} impls measured"
    meta["load_end"] = report.load_average()
    print()
    print(report.console_table(rows, cases, env))
    print()
    for line in report.footer(cases, env, targets, meta):
        print(line)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / meta["device_slug"]
    paths = report.write_results(rows, cases, env, targets, out_dir, meta)
    print(f"\nWrote {', '.join(str(p) for p in paths.values())} in {time.time() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
