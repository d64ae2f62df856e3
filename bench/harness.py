"""The bench harness: timing, byte accounting, copy bandwidth, peak extra memory, and peer discovery (running the
cases is bench/runner.py; writing the results, bench/report.py).

A bench is a list of Cases. A Case is one piece of work (an op at one size) with a byte count, and the Impls that do
it: fusedopt's backends and the peers. An Impl whose code is missing (a fusedopt API not built in this tree, a peer
that cannot be imported) has build=None and a note saying why; it is listed, never faked.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# --- the data model ----------------------------------------------------------------------------------------------


@dataclass
class Runnable:
    """What an Impl's build() returns: `run` is timed; `reset` (optional) puts the state back to 'before the first
    call' so the peak-memory measurement sees the same allocations a first call makes (e.g. drops input.grad)."""

    run: Callable[[], object]
    reset: Callable[[], None] | None = None
    warmup: int = 1  # untimed calls first: 2+ for torch.compile (first call compiles, the next may recompile)


@dataclass
class Impl:
    name: str  # e.g. "fusedopt (cpu)", "torch fused"
    kind: str  # "fusedopt" or "peer"
    build: Callable[[], Runnable] | None  # None: not available here, see note
    note: str = ""


@dataclass
class Target:
    """A goal from shared/TARGETS.md, checked against the best fusedopt row of a case (or the row `impl` names).
    kind: "vs" (speed-up over the peer named `peer` >= value), "copy" (% of copy >= value), "ms" (time <= value),
    "mem" (peak extra GiB <= value), "mem_beyond_grads" (peak extra GiB, less the grads the call returns, <= value)."""

    kind: str
    value: float
    peer: str = ""
    impl: str = ""  # the fusedopt row judged (a prefix of its name, e.g. "fusedopt int8"); "": the fastest one

    def describe(self) -> str:
        return {
            "vs": f">= {self.value:g}x {self.peer}",
            "copy": f">= {self.value:g}% of copy",
            "ms": f"<= {self.value:g} ms",
            "mem": f"<= {self.value:g} GiB extra",
            "mem_beyond_grads": f"<= {self.value:g} GiB extra beyond the grads",
        }[self.kind]


@dataclass
class Case:
    tag: str  # short name for --ops, e.g. "adam", "ce-bf16"
    family: str  # "optim" or "losses"
    op: str  # what the table shows, sizes included
    nbytes: int  # bytes counted per call (0: not memory-bound, GB/s not reported)
    byte_model: str  # how nbytes was counted, for the table footer
    impls: list[Impl]
    memory: bool = False  # measure peak extra memory
    flops: int = 0  # for compute-bound work: TFLOP/s reported instead of GB/s
    grad_bytes: int = 0  # size of the grads one call produces (counted in its peak extra memory)
    targets: list[Target] = field(default_factory=list)


@dataclass
class Row:
    tag: str
    op: str
    impl: str
    kind: str
    ms: float | None = None  # the median: what the table reports
    reps: int = 0
    min_ms: float | None = None  # the fastest run, kept in the JSON (on a shared CPU the median can be far off it)
    gbps: float | None = None
    pct_copy: float | None = None
    speedup: float | None = None  # best peer's ms / this row's ms
    peak_bytes: int | None = None
    tflops: float | None = None
    note: str = ""


@dataclass
class Env:
    device: torch.device
    quick: bool
    budget_s: float  # time spent timing one impl (after warmup)
    min_reps: int
    max_reps: int
    copy_gbps: float = 0.0
    peak_method: str = ""
    deadline: float = 0.0  # time.time() after which the remaining impls are listed as skipped (0: none)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def make_env(device: str, quick: bool) -> Env:
    dev = torch.device(device)
    if dev.type == "cuda":
        env = Env(dev, quick, 0.2 if quick else 0.5, 5 if quick else 10, 50 if quick else 200)
        env.peak_method = "torch.cuda.max_memory_allocated() delta"
    else:
        env = Env(dev, quick, 0.5 if quick else 1.5, 3, 20 if quick else 50)
        env.peak_method = "the process's RSS high-water growth (VmHWM, after malloc_trim)" if _can_reset_hwm() else ""
    return env


# --- timing ------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], env: Env, warmup: int = 1) -> tuple[float, int, float]:
    """(median ms, runs, min ms) of `fn` over as many runs as fit in env.budget_s (within [min_reps, max_reps]), after
    `warmup` calls (which absorb torch.compile and Triton compilation). CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(env.device)
    if not env.is_cuda:
        times, spent = [], 0.0
        while len(times) < env.max_reps and (len(times) < env.min_reps or spent < env.budget_s):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            spent += times[-1]
        return statistics.median(times) * 1e3, len(times), min(times) * 1e3
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(env.device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(env.max_reps, max(env.min_reps, env.budget_s / one)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(env.device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), reps, min(times)


def copy_bandwidth(env: Env) -> float:
    """GB/s of a plain copy of a large buffer on the device, read plus write counted: the roof for memory-bound ops."""
    numel = (1 << 30 if env.is_cuda else 1 << 26) // (4 if env.quick else 1)  # 4 GiB / 256 MiB of fp32
    bufs = [torch.randn(numel, device=env.device), torch.empty(numel, device=env.device)]
    ms, _, _ = measure(lambda: bufs[1].copy_(bufs[0]), env, warmup=3)
    bufs.clear()
    free_memory(env.device)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


# --- memory ------------------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def _malloc_trim() -> None:
    """Hands glibc's free heap pages back to the OS, so that memory re-used by the next call shows up in its RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(r: Runnable, env: Env) -> int | None:
    """Peak memory above what was allocated before one call of r.run, inputs excluded; None where not measurable.
    On CPU: the growth of the RSS high-water mark (reset through /proc/self/clear_refs) after malloc_trim, an
    estimate that sees large tensors exactly and small allocations (under a page or so) not at all."""
    if r.reset is not None:
        r.reset()
    free_memory(env.device)
    if env.is_cuda:
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        base = torch.cuda.memory_allocated(env.device)
        r.run()
        torch.cuda.synchronize(env.device)
        return max(0, torch.cuda.max_memory_allocated(env.device) - base)
    if not env.peak_method:
        return None
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    r.run()
    return max(0, _proc_status("VmHWM") - base)


# --- discovery ---------------------------------------------------------------------------------------------------


def fusedopt_api(path: str):
    """fusedopt.<path> (e.g. "optim.RMSprop", "nn.functional.cross_entropy"), or None when this tree lacks it."""
    try:
        obj = importlib.import_module("fusedopt")
    except Exception:
        return None
    for part in path.split("."):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule its package does not import
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        except Exception:
            return None
    return obj


def accepts(fn, name: str) -> bool:
    """Whether callable/class `fn` takes keyword `name` (e.g. backend=, max_grad_norm=)."""
    try:
        target = fn.__init__ if inspect.isclass(fn) else fn
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def fusedopt_backends(device: torch.device) -> list[tuple[str, str]]:
    """(backend, why-not) for the fusedopt backends worth benchmarking on this device; why-not empty when usable.
    The "torch" backend is the plain reference, not a product path, so it is not listed."""
    try:
        from fusedopt import _backend
    except Exception as exc:
        return [("cpu" if device.type == "cpu" else "cuda", f"fusedopt does not import: {exc}")]
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    out = []
    for name in names:
        ok = _backend.usable(name, device.type)
        out.append((name, "" if ok else f"backend {name} not usable: {_backend.status(name).reason}"))
    return out


def fusedopt_impls(api_path: str, device: torch.device, make: Callable[[object, str], Runnable],
                   label: str = "", needs: str = "") -> list[Impl]:  # fmt: skip
    """One Impl per fusedopt backend for the API at `api_path`; make(api, backend) builds the Runnable.
    `needs`: a keyword the API must accept (e.g. "max_grad_norm"), else the row says it is not built yet."""
    api = fusedopt_api(api_path)
    suffix = f" {label}" if label else ""
    missing = ""
    if api is None:
        missing = f"not built in this tree (no fusedopt.{api_path})"
    elif needs and not accepts(api, needs):
        missing = f"not built in this tree (fusedopt.{api_path} has no {needs}=)"
    backends = fusedopt_backends(device)
    if api is not None and not missing and not accepts(api, "backend"):
        # No backend= on this API: one row, whatever "auto" picks (make() gets "auto", itself a valid backend).
        backends = [("auto", "" if any(not why for _, why in backends) else backends[0][1])]
    impls = []
    for backend, why in backends:
        name = f"fusedopt{suffix} ({backend})"
        if missing or why:
            impls.append(Impl(name, "fusedopt", None, missing or why))
        else:
            impls.append(Impl(name, "fusedopt", lambda api=api, b=backend: make(api, b)))
    return impls


def peer_module(module: str, dist: str = "") -> tuple[object | None, str]:
    """Import a peer library, or say why it cannot be used (the row is then skipped with that note).
    `dist`: its pip name, when not the module's top-level name."""
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError:
        return None, f"not installed here (pip install {dist or module.split('.')[0]})"
    except Exception as exc:  # installed but broken (another torch/triton build, a failing JIT build)
        return None, f"import failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def compile_note(env: Env, family: str) -> str:
    """Why torch.compile peers are skipped in this run ('' when they run): compiling costs 20+ s per graph on a
    2-core CPU, so --quick leaves them out on CPU, and on GPU leaves out the optimizer graphs only."""
    if os.environ.get("FUSEDOPT_BENCH_NO_COMPILE") == "1":
        return "skipped: FUSEDOPT_BENCH_NO_COMPILE=1"
    if env.quick and (not env.is_cuda or family == "optim"):
        return "skipped in --quick (compile time)"
    return ""
