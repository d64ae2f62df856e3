"""Running the cases: each impl built, its peak memory taken, timed; rows filled with GB/s, % of copy, speed-up and
the targets' verdicts.

On GPU the impls of a case run one after the other (the device is ours alone, and 1.1B-parameter cases do not fit
side by side). On CPU they are interleaved: all of a case's impls are built, then timed in rounds, one call of each per
round, so that another process's burst on a shared machine slows every impl of the case alike instead of whichever
happened to run then.
"""

from __future__ import annotations

import sys
import time

from bench.harness import Case, Env, Impl, Row, Runnable, free_memory, measure, peak_extra_bytes, sync


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {msg[0][:120] if msg else ''}"


def _over_time(env: Env) -> bool:
    return bool(env.deadline) and time.time() > env.deadline


def _prepare(case: Case, impl: Impl, row: Row, env: Env) -> Runnable | None:
    """Builds the impl and takes its peak memory on the first call after compilation (torch.compile compiles on call
    1), so buffers an implementation keeps for re-use (a pool, a cache) count: they stay with the process. None (and
    a note on the row) when the impl is unavailable or fails."""
    if impl.build is None:
        return None
    if _over_time(env):
        row.note = "skipped: the run reached its --time-limit"
        return None
    try:
        r = impl.build()
        if case.memory:
            for _ in range(r.warmup - 1):
                r.run()
            row.peak_bytes = peak_extra_bytes(r, env)
            r.warmup = 1
        return r
    except Exception as exc:  # an impl that fails is reported as such, the run goes on
        row.note = _short(exc)
        return None


def _release(env: Env) -> None:
    if "torch._dynamo" in sys.modules:  # compiled peers: drop their graphs and guards (they hold the tensors)
        sys.modules["torch._dynamo"].reset()
    free_memory(env.device)


def _fill(case: Case, row: Row, env: Env) -> None:
    if row.ms is None:
        return
    if case.nbytes:
        row.gbps = case.nbytes / (row.ms * 1e-3) / 1e9
        row.pct_copy = 100.0 * row.gbps / env.copy_gbps if env.copy_gbps else None
    if case.flops:
        row.tflops = case.flops / (row.ms * 1e-3) / 1e12


def run_impl(case: Case, impl: Impl, env: Env) -> Row:
    """One impl on its own: build, peak memory, warm-up, timing."""
    row = Row(case.tag, case.op, impl.name, impl.kind, note=impl.note)
    r = _prepare(case, impl, row, env)
    try:
        if r is not None:
            row.ms, row.reps, row.min_ms = measure(r.run, env, warmup=r.warmup + (2 if env.is_cuda else 0))
    except Exception as exc:
        row.ms, row.reps, row.min_ms = None, 0, None
        row.note = _short(exc)
    finally:
        del r
        _release(env)
    _fill(case, row, env)
    return row


def run_interleaved(case: Case, env: Env, on_impl=lambda: None) -> list[Row]:
    """All impls of the case built, warmed up, then timed round-robin until each has env.budget_s of runs (within
    [min_reps, max_reps]). Median and min per impl, as measure() gives them."""
    rows = [Row(case.tag, case.op, i.name, i.kind, note=i.note) for i in case.impls]
    live: list[tuple[Row, Runnable, list]] = []
    try:
        for impl, row in zip(case.impls, rows):
            r = _prepare(case, impl, row, env)
            if r is not None:
                try:
                    for _ in range(r.warmup):
                        r.run()
                    live.append((row, r, []))
                except Exception as exc:
                    row.note = _short(exc)
            on_impl()
        while live:
            for entry in list(live):
                row, r, times = entry
                try:
                    t0 = time.perf_counter()
                    r.run()
                    sync(env.device)
                    times.append(time.perf_counter() - t0)
                except Exception as exc:
                    row.note, times[:] = _short(exc), []
                    live.remove(entry)
                    continue
                spent = sum(times)
                if len(times) >= env.max_reps or (len(times) >= env.min_reps and spent >= env.budget_s):
                    ordered = sorted(times)
                    mid = len(ordered) // 2
                    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
                    row.ms, row.reps, row.min_ms = median * 1e3, len(times), ordered[0] * 1e3
                    live.remove(entry)
    finally:
        live.clear()
        _release(env)
    for row in rows:
        _fill(case, row, env)
    return rows


def finish_case(rows: list[Row]) -> None:
    """Fills each row's speed-up against the fastest peer of its case."""
    peers = [r.ms for r in rows if r.kind == "peer" and r.ms is not None]
    best = min(peers) if peers else None
    for r in rows:
        if best is not None and r.ms is not None:
            r.speedup = best / r.ms


def check_targets(case: Case, rows: list[Row]) -> list[dict]:
    """Each target of the case, judged on its best fusedopt row, or the row it names (None when either side was not
    measured)."""
    ours = [r for r in rows if r.kind == "fusedopt" and r.ms is not None]
    fastest = min(ours, key=lambda r: r.ms) if ours else None
    out = []
    for t in case.targets:
        best = next((r for r in ours if r.impl.startswith(t.impl)), None) if t.impl else fastest
        got, met = None, None
        if best is not None:
            if t.kind == "vs":
                peer = next((r for r in rows if r.impl == t.peer and r.ms is not None), None)
                got = peer.ms / best.ms if peer else None
                met = None if got is None else got >= t.value
            elif t.kind == "copy":
                got = best.pct_copy
                met = None if got is None else got >= t.value
            elif t.kind == "ms":
                got, met = best.ms, best.ms <= t.value
            elif t.kind in ("mem", "mem_beyond_grads"):
                less = case.grad_bytes if t.kind == "mem_beyond_grads" else 0
                got = None if best.peak_bytes is None else (best.peak_bytes - less) / 2**30
                met = None if got is None else got <= t.value
        out.append({"tag": case.tag, "op": case.op, "target": t.describe(), "impl": best.impl if best else None,
                    "value": got, "met": met})  # fmt: skip
    return out


def rescore(cases: list[Case], rows: list[Row], env: Env) -> list[dict]:
    """Recomputes GB/s, % of copy and the targets' verdicts (after env.copy_gbps changed)."""
    targets = []
    for case in cases:
        case_rows = [r for r in rows if r.tag == case.tag]
        for row in case_rows:
            _fill(case, row, env)
        targets += check_targets(case, case_rows)
    return targets


def run_cases(cases: list[Case], env: Env, progress: bool = True, interleave: bool | None = None):
    """Runs every impl of every case (interleaved on CPU, see the module doc). Returns (rows, targets, interrupted):
    on KeyboardInterrupt (Ctrl-C, or gpu_check.sh's time limit) it stops and returns what was measured."""
    from tqdm import tqdm

    interleave = not env.is_cuda if interleave is None else interleave
    rows, targets = [], []
    bar = tqdm(total=sum(len(c.impls) for c in cases), disable=not progress, unit="impl", dynamic_ncols=True)
    interrupted = False
    for case in cases:
        case_rows = []
        try:
            if interleave:
                bar.set_description(f"{case.tag}"[:48])
                case_rows = run_interleaved(case, env, on_impl=lambda: bar.update(1))
            else:
                for impl in case.impls:
                    bar.set_description(f"{case.tag}: {impl.name}"[:48])
                    case_rows.append(run_impl(case, impl, env))
                    bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
        if case_rows:
            finish_case(case_rows)
            rows += case_rows
            targets += check_targets(case, case_rows)
        if interrupted:
            break
    bar.close()
    return rows, targets, interrupted
