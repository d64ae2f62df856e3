"""The examples run as a user runs them (short settings) and agree with plain PyTorch."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the examples import their shared examples/optimizers.py
optimizers = importlib.import_module("optimizers")

# One thread: the examples' --tiny models have thousands of parameters, too few for two threads to help, and on a
# shared, loaded 2-core machine OpenMP threads wait on each other (a tiny GPT run measured 5-10x slower with 2).
THREADS = "1"


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    yield
    torch.set_num_threads(threads)


def run(*args: str, stderr: bool = False) -> str | tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=THREADS)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return (out.stdout, out.stderr) if stderr else out.stdout


def test_seed_example_matches_torch():
    fused = float(re.search(r"final loss (\S+)", run("examples/seed_example.py")).group(1))
    plain = float(re.search(r"final loss (\S+)", run("examples/seed_example.py", "--torch")).group(1))
    first = float(re.search(r"epoch   0 loss (\S+)", run("examples/seed_example.py", "--epochs", "1")).group(1))
    assert fused < first  # the loss falls
    assert fused == pytest.approx(plain, rel=1e-4)  # fp32 parity tolerance for a reduced loss


def test_finetune_gpt_tiny_curves_agree(tmp_path):
    out, err = run("examples/finetune_gpt.py", "--tiny", "--check", "--out", str(tmp_path / "curves.png"), stderr=True)
    assert "largest relative difference" in out
    peaks = re.findall(r"peak RSS \(whole process\) (\d+) MiB", out)  # measured on the CPU too, not "nan"
    assert len(peaks) == 2 and all(int(p) > 0 for p in peaks), out
    assert "DeprecationWarning" not in err, err[-3000:]
    assert "20/20" in err  # the progress bars ran to the end (12 + 8 steps in --tiny)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_finetune_hf_tiny_curves_agree(tmp_path):
    """The Trainer example, plain vs apply_fusedopt + fusedopt AdamW, each in a fresh process: the script's --check
    asserts a loss per step, curves within float32 rounding, and a finite peak memory for both runs."""
    pytest.importorskip("transformers")
    out = run("examples/finetune_hf.py", "--tiny", "--check", "--out", str(tmp_path / "curves.png"))
    assert "largest relative difference" in out and "nan" not in out
    assert re.search(r"fusedopt .* tokens/s  peak memory \+\d+ MiB", out)
    assert (tmp_path / "curves.png").stat().st_size > 0


def run_seed(*args: str) -> float:
    """examples/seed_example.py in this process (the CLI as a user runs it, without a fresh interpreter's start-up);
    its final loss."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = ["seed_example.py", *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / "examples" / "seed_example.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return float(re.search(r"final loss (\S+)", out.getvalue()).group(1))


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_optimizer_flag_matches_plain_run(name, tmp_path, capsys, one_thread):
    """--optimizer NAME in both examples: the fusedopt run and the plain run (torch.optim's class, or the fusedopt
    class with backend="torch" where torch has none) agree, and the loss falls. In this process, with --same-process,
    so that nine optimizers cost seconds rather than nine interpreter start-ups each."""
    finetune_gpt = importlib.import_module("finetune_gpt")
    why = optimizers.missing(name, "fusedopt")
    if why:
        with pytest.raises(SystemExit, match="is not in this build"):
            finetune_gpt.main(["--tiny", "--optimizer", name, "--same-process"])
        pytest.skip(f"{name}: {why}")
    fused, plain = run_seed("--optimizer", name), run_seed("--optimizer", name, "--torch")
    assert fused < 0.69  # below the first epoch's 0.728 (and chance's log 2)
    assert fused == pytest.approx(plain, rel=1e-4)  # fp32 parity tolerance for a reduced loss
    # --check asserts the curves agree (over the first steps only for a sign-based update: check_steps()).
    runs = finetune_gpt.main(["--tiny", "--check", "--optimizer", name, "--same-process", "--no-progress",
                              "--out", str(tmp_path / "curves.png")])  # fmt: skip
    assert runs["fusedopt"]["losses"][-1] < runs["fusedopt"]["losses"][0]
    assert f"fusedopt  {name} final loss" in capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_compare_optimizers_tiny(tmp_path):
    """--compare-optimizers: one fusedopt run per optimizer, one PNG, a table of final losses. In a subprocess as a user
    runs it; --same-process keeps it to one interpreter start-up."""
    png = tmp_path / "optimizers.png"
    out = run("examples/finetune_gpt.py", "--compare-optimizers", "adam,sgd,lion", "--tiny", "--same-process",
              "--no-progress", "--out", str(png))  # fmt: skip
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+(\d+\.\d+)\s+\d+\.\d+", out, re.M)}
    assert set(rows) == {"adam", "sgd", "lion"}, out
    assert all(0 < loss < 4.5 for loss in rows.values()), out  # below the start, log(vocab) ~ 4.6
    assert png.stat().st_size > 0
