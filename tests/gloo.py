"""The harness of the multi-process gloo tests (test_distributed.py, test_vocab_parallel.py,
test_lowbit_distributed.py): a free port for the rendezvous, the process group, and each worker's loop over its
scenarios, which writes one JSON of {scenario: "ok" or the traceback} per rank."""

from __future__ import annotations

import datetime
import json
import socket
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int, timeout_s: int = 60) -> None:
    torch.set_num_threads(1)  # several processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def run_scenarios(scenarios, args: tuple, result_path: str) -> None:
    """Runs fn(*args) for each (name, fn), records the outcome, and ends the process group."""
    results = {}
    try:
        for name, fn in scenarios:
            try:
                fn(*args)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()  # keep the ranks in step even when one scenario failed on one rank
    finally:
        with open(result_path, "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
