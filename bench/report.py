"""Writing the results: the console table, bench/results/<device>/<date>.{json,md,png}, the machine's description."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from bench.harness import Case, Env, Row

COLUMNS = ("op", "impl", "ms", "GB/s", "% of copy", "vs best peer", "peak extra", "note")


# --- machine and run metadata ------------------------------------------------------------------------------------


def device_slug(env: Env) -> str:
    if not env.is_cuda:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(env.device).lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)  # fmt: skip
        return out.stdout.strip()
    except Exception:
        return ""


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info(env: Env) -> dict:
    info = {
        "device": str(env.device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        from fusedopt import _backend

        mod, _ = _backend.cpu_extension()
        info["fusedopt_cpu_capability"] = mod.cpu_capability() if mod is not None else None
    except Exception:
        info["fusedopt_cpu_capability"] = None
    if env.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(env.device)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(meta: dict) -> str:
    if meta.get("gpu"):
        return f"{meta['gpu']} (CUDA {meta['cuda']}), torch {meta['torch']}, Triton {meta['triton']}"
    return (f"{meta['cpu']}, {meta['cpu_cores']} cores ({meta['torch_threads']} torch threads, "
            f"fusedopt CPU kernels: {meta['fusedopt_cpu_capability']}), torch {meta['torch']}")  # fmt: skip


# --- formatting --------------------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    if n >= 2**30:
        return f"+{n / 2**30:.2f} GiB"
    return f"+{n / 2**20:.0f} MiB"


def cells(row: Row, case: Case, env: Env) -> list[str]:
    ms = "" if row.ms is None else (f"{row.ms:.3f}" if row.ms < 10 else f"{row.ms:.1f}")
    if row.tflops is not None:
        rate = f"{row.tflops:.1f} TFLOP/s" if row.tflops >= 1 else f"{row.tflops * 1e3:.1f} GFLOP/s"
    else:
        rate = "" if row.gbps is None else f"{row.gbps:.1f}"
    pct = "" if row.pct_copy is None else f"{row.pct_copy:.0f}%"
    speed = "" if row.speedup is None else f"{row.speedup:.2f}x"
    peak = _bytes(row.peak_bytes) if case.memory else ""
    if peak and case.grad_bytes:  # what the implementation needs beyond the grads it returns
        peak += f" ({_bytes(max(0, row.peak_bytes - case.grad_bytes))} beyond grads)"
    if case.memory and row.ms is not None and row.peak_bytes is None:
        peak = "n/a"
    return [row.op, row.impl, ms, rate, pct, speed, peak, row.note]


def table_rows(rows: list[Row], cases: list[Case], env: Env) -> list[list[str]]:
    by_tag = {c.tag: c for c in cases}
    out, last = [], None
    for r in rows:
        c = cells(r, by_tag[r.tag], env)
        if r.tag == last:
            c[0] = ""
        last = r.tag
        out.append(c)
    return out


def console_table(rows, cases, env, note_width: int = 70) -> str:
    body = table_rows(rows, cases, env)
    for c in body:
        c[-1] = c[-1] if len(c[-1]) <= note_width else c[-1][: note_width - 3] + "..."
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(COLUMNS)]
    right = {2, 3, 4, 5, 6}

    def line(c):
        return "  ".join(x.rjust(w) if i in right else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out, last_op = [line(COLUMNS), sep], None
    for c in body:
        if c[0] and last_op is not None:
            out.append("")
        last_op = c[0] or last_op
        out.append(line(c))
    return "\n".join(out)


def footer(cases: list[Case], env: Env, targets: list[dict], meta: dict) -> list[str]:
    both = meta.get("copy_gbps_start_end")
    when = f", the better of its measurements at the start and end ({both[0]:.1f}, {both[1]:.1f})" if both else ""
    lines = [f"Copy bandwidth measured in this run: {env.copy_gbps:.1f} GB/s (read + write counted{when}). "
             "GB/s = counted bytes / median time; % of copy = GB/s / copy bandwidth; "
             "vs best peer = fastest peer's time / this time."]  # fmt: skip
    models = {}
    for c in cases:
        models.setdefault(c.byte_model, []).append(c.tag)
    lines.append("Byte model: " + "; ".join(f"{', '.join(tags)}: {m}" for m, tags in models.items()) + ".")
    mem = [c for c in cases if c.memory]
    if mem:
        how = env.peak_method or "not measurable here (n/a)"
        grads = ", ".join(f"{c.tag} {_bytes(c.grad_bytes)[1:]}" for c in mem)
        lines.append(f"Peak extra memory: the first forward + backward (after compilation), above the inputs, by "
                     f"{how}; buffers kept for re-use count; it includes the grads the call returns ({grads}); "
                     "'beyond grads' leaves them out.")
    if meta.get("interrupted"):
        lines.append(f"INTERRUPTED: {meta['interrupted']}.")
    load = [meta.get("load_start"), meta.get("load_end")]
    if None not in load:
        busy = max(load) > 0.8 * (meta["cpu_cores"] or 1)
        lines.append(f"Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on {meta['cpu_cores']} cores"
                     + ("; the machine was busy with other work, so CPU-bound times are inflated." if busy else "."))
    for t in targets:
        if t["met"] is None:
            verdict = "not measured"
        else:
            v = t["value"]
            verdict = ("met" if t["met"] else "NOT met") + f" ({v:.3g} by {t['impl']})"
        lines.append(f"Target {t['tag']}: {t['target']}: {verdict}.")
    return lines


# --- files -------------------------------------------------------------------------------------------------------


def markdown(rows, cases, env, meta, targets, title) -> str:
    body = table_rows(rows, cases, env)
    esc = lambda s: s.replace("|", "\\|")
    when = f"{meta['date']} {meta['time']} UTC"
    out = [f"# {title}", "", f"{when}, {describe_machine(meta)}, commit {meta['commit']}.", ""]
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join("---:" if i in (2, 3, 4, 5, 6) else "---" for i in range(len(COLUMNS))) + "|")
    out += ["| " + " | ".join(esc(x) for x in c) + " |" for c in body]
    out.append("")
    out += [f"- {line}" for line in footer(cases, env, targets, meta)]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], cases: list[Case], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.ms is not None]
    if not timed:
        return
    labels, speed, pct, colors = [], [], [], []
    last = None
    for r in timed:
        if r.tag != last:
            if last is not None:  # a blank bar between cases
                labels.append("")
                speed.append(float("nan"))
                pct.append(float("nan"))
                colors.append("white")
            last = r.tag
        labels.append(f"{r.tag}: {r.impl}")
        speed.append(r.speedup if r.speedup is not None else float("nan"))
        pct.append(r.pct_copy if r.pct_copy is not None else float("nan"))
        colors.append("tab:red" if r.kind == "fusedopt" else "tab:gray")
    ticks = list(range(len(labels)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 0.26 * len(labels) + 1.5), sharey=True)
    a1.barh(ticks, speed, color=colors)
    a1.axvline(1.0, color="black", lw=0.8)
    a1.set_xscale("log")
    a1.set_xlabel("speed-up vs the best peer, log scale (higher is better)")
    a2.barh(ticks, pct, color=colors)
    a2.axvline(100.0, color="black", lw=0.8)
    a2.set_xlabel("% of the copy bandwidth measured in the same run")
    a1.set_yticks(ticks, labels, fontsize=7)
    a1.invert_yaxis()
    fig.suptitle(f"{title}  (red: fusedopt, gray: peers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def case_record(c: Case) -> dict:
    return {"tag": c.tag, "family": c.family, "op": c.op, "bytes": c.nbytes, "byte_model": c.byte_model,
            "flops": c.flops, "grad_bytes": c.grad_bytes, "memory": c.memory}  # fmt: skip


def write_results(rows, cases, env, targets, out_dir: Path, meta: dict) -> dict:
    """Writes <out_dir>/<date>.json, .md and .png and returns their paths. A run of selected cases (meta["ops"],
    from --ops) is named after them, <date>-<ops>, so it never overwrites the day's full run."""
    meta.setdefault("load_end", load_average())
    out_dir.mkdir(parents=True, exist_ok=True)
    ops = "+".join(t for t in re.split(r"[^A-Za-z0-9_.-]+", meta.get("ops") or "") if t)
    stem = meta["date"] + (f"-{ops}" if ops else "") + ("-quick" if env.quick else "")
    title = f"fusedopt bench, {meta['device_slug']}{' (--quick)' if env.quick else ''}"
    paths = {k: out_dir / f"{stem}.{k}" for k in ("json", "md", "png")}
    payload = {
        "meta": meta,
        "copy_gbps": env.copy_gbps,
        "quick": env.quick,
        "peak_method": env.peak_method or None,
        "cases": [case_record(c) for c in cases],
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets": targets,
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    paths["md"].write_text(markdown(rows, cases, env, meta, targets, title))
    plot(rows, cases, paths["png"], title)
    return paths


def run_meta(env: Env) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = machine_info(env)
    meta.update(date=now.strftime("%Y-%m-%d"), time=now.strftime("%H:%M"), device_slug=device_slug(env),
                load_start=load_average())
    return meta
