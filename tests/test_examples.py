"""The examples run as a user runs them (short settings) and agree with plain PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stderr: bool = False) -> str | tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
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
