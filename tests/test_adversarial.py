"""Adversarial comparison with torch: hypothesis draws bad and edge inputs (empty, 0-d, non-contiguous,
channels_last, NaN/Inf, huge values, wrong grad dtype or shape, params listed twice, params resized between steps,
huge or equal logits, -inf logits, ignored rows, odd label smoothing) and each case runs in a worker process
(tests/adversarial_worker.py), so a crash or a heap corruption fails the case that caused it instead of the run.
Every backend that runs here is drawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORKER = Path(__file__).with_name("adversarial_worker.py")
ROOT = WORKER.parent.parent
BACKENDS = cpu_backends()


class Worker:
    """One worker process, restarted after a crash."""

    def __init__(self):
        self.proc = None
        self.count = 0

    def _start(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=ROOT,
        )  # fmt: skip

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.count += 1
        case = {**case, "id": self.count}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        started = self.proc.stdout.readline()
        result = self.proc.stdout.readline()
        if not result:
            code = self.proc.wait(timeout=30)
            stderr = self.proc.stderr.read()[-2000:]
            self.proc = None
            return {"outcome": "crash", "detail": f"worker died (exit {code}) after {started.strip()!r}: {stderr}"}
        return json.loads(result)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _check(worker, case):
    result = worker.run(case)
    assert result["outcome"] not in ("crash", "mismatch"), f"{result['outcome']} on {case}:\n{result['detail']}"


SHAPES = st.sampled_from([(), (0,), (1,), (7,), (5, 3), (2, 3, 2, 2), (0, 4), (130,)])
OPTIONS = {
    "Adam": st.fixed_dictionaries(
        {}, optional={"betas": st.sampled_from([(0.0, 0.999), (0.9, 0.999), (0.5, 0.0)]), "amsgrad": st.booleans(),
                      "weight_decay": st.sampled_from([0.0, 0.1]), "maximize": st.booleans(),
                      "eps": st.sampled_from([0.0, 1e-8])}
    ),
    "AdamW": st.fixed_dictionaries({}, optional={"amsgrad": st.booleans(), "maximize": st.booleans()}),
    "RMSprop": st.fixed_dictionaries(
        {}, optional={"centered": st.booleans(), "momentum": st.sampled_from([0.0, 0.9]),
                      "weight_decay": st.sampled_from([0.0, 0.1]), "maximize": st.booleans()}
    ),
    "SGD": st.fixed_dictionaries(
        {}, optional={"momentum": st.sampled_from([0.0, 0.9]), "weight_decay": st.sampled_from([0.0, 0.1]),
                      "maximize": st.booleans(), "dampening": st.sampled_from([0.0, 0.5])}
    ),
    "Adagrad": st.fixed_dictionaries(
        {}, optional={"lr_decay": st.sampled_from([0.0, 0.1]), "weight_decay": st.sampled_from([0.0, 0.1]),
                      "initial_accumulator_value": st.sampled_from([0.0, 0.5]), "maximize": st.booleans(),
                      "eps": st.sampled_from([0.0, 1e-10])}
    ),
    # no torch class: the worker compares with tests/optim_db.py's PaperLion (a plain loop of the paper)
    "Lion": st.fixed_dictionaries(
        {}, optional={"betas": st.sampled_from([(0.9, 0.99), (0.0, 0.5), (1.0, 0.9)]),
                      "weight_decay": st.sampled_from([0.0, 0.1]), "maximize": st.booleans()}
    ),
}  # fmt: skip
# Drawn by their own test (so the draws of the others stay as they were). LAMB has no torch class to compare with:
# its edges are in test_lamb.py, against the paper's loop.
ADAFACTOR_OPTIONS = {
    "Adafactor": st.fixed_dictionaries(
        {}, optional={"weight_decay": st.sampled_from([0.0, 0.1]), "maximize": st.booleans(),
                      "beta2_decay": st.sampled_from([-0.8, -0.5]), "d": st.sampled_from([1.0, 2.0]),
                      "eps": st.sampled_from([(None, 1e-3), (1e-30, 1e-3), (0.0, 0.0)])}
    ),
}  # fmt: skip


@st.composite
def optimizer_cases(draw, names=None, options=OPTIONS):
    name = draw(st.sampled_from(sorted(names or options)))
    shape = draw(SHAPES)
    steps = draw(st.integers(1, 3))
    grads = draw(st.lists(st.sampled_from(["normal", "normal", "nan", "inf", "huge", "none", "float64", "reshaped"]),
                          min_size=steps, max_size=steps))  # fmt: skip
    return {
        "kind": "optimizer",
        "optimizer": name,
        "options": draw(options[name]),
        "backend": draw(st.sampled_from(BACKENDS)),
        "dtype": draw(st.sampled_from(["float32", "float64", "bfloat16", "float16"])),
        "shape": list(shape),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "channels_last"])),
        "scale": draw(st.sampled_from([1.0, 1e-30, 1e30])),
        "grad_scale": draw(st.sampled_from([1.0, 1e-3, 1e3])),
        "lr": draw(st.sampled_from([0.1, 1e-3])),
        "grads": grads,
        "duplicate": draw(st.booleans()),
        "resize_at": draw(st.sampled_from([-1, -1, 1])),
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def cross_entropy_cases(draw):
    target_kind = draw(st.sampled_from(["index", "index", "probs"]))
    return {
        "kind": "cross_entropy",
        "backend": draw(st.sampled_from(BACKENDS)),
        "dtype": draw(st.sampled_from(["float32", "float64", "bfloat16", "float16"])),
        "rows": draw(st.sampled_from([0, 1, 5, 17])),
        "classes": draw(st.sampled_from([1, 2, 9, 300])),
        "scale": draw(st.sampled_from([1.0, 1e4, 1e-4])),
        "special": draw(st.sampled_from(["none", "none", "nan", "neg_inf", "equal_huge"])),
        "transposed": draw(st.booleans()),
        "target_kind": target_kind,
        "ignore_some": target_kind == "index" and draw(st.booleans()),
        "weight": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


TENSOR_FIELDS = {
    "dtype": st.sampled_from(["float32", "float64", "bfloat16", "float16"]),
    "shape": st.sampled_from([[], [0], [1], [7], [5, 3], [2, 3, 2, 2], [0, 4], [300]]),
    "layout": st.sampled_from(["contiguous", "transposed", "channels_last"]),
    "scale": st.sampled_from([1.0, 1e-30, 1e4, 1e30]),
    "special": st.sampled_from(["none", "none", "nan", "inf"]),
    "seed": st.integers(0, 2**16),
}


@st.composite
def clip_grad_norm_cases(draw):
    return {
        "kind": "clip_grad_norm",
        "backend": draw(st.sampled_from(BACKENDS)),
        **{k: draw(v) for k, v in TENSOR_FIELDS.items()},
        "max_norm": draw(st.sampled_from([1.0, 0.0, 1e-3, 1e30])),
        "norm_type": draw(st.sampled_from([2.0, 1.0, 3.0, float("inf")])),
        "error_if_nonfinite": draw(st.booleans()),
    }


@st.composite
def pointwise_cases(draw):
    return {
        "kind": "pointwise",
        "loss": draw(st.sampled_from(["mse", "bce", "bce_logits"])),
        "backend": draw(st.sampled_from(BACKENDS)),
        **{k: draw(v) for k, v in TENSOR_FIELDS.items()},
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=True)  # fmt: skip


@SETTINGS
@given(case=optimizer_cases())
def test_optimizers_against_torch(worker, case):
    _check(worker, case)


@settings(SETTINGS, max_examples=30)
@given(case=optimizer_cases(names=["Lion"]))
def test_lion_against_the_paper(worker, case):
    _check(worker, case)


@SETTINGS
@given(case=optimizer_cases(options=ADAFACTOR_OPTIONS))
def test_adafactor_against_torch(worker, case):
    _check(worker, case)


@SETTINGS
@given(case=cross_entropy_cases())
def test_cross_entropy_against_torch(worker, case):
    _check(worker, case)


@SETTINGS
@given(case=clip_grad_norm_cases())
def test_clip_grad_norm_against_torch(worker, case):
    _check(worker, case)


@SETTINGS
@given(case=pointwise_cases())
def test_pointwise_losses_against_torch(worker, case):
    _check(worker, case)


def test_worker_reports_a_crash(worker):
    """The harness itself: a case that kills the worker is reported as a crash, and the next case runs."""
    result = worker.run({"kind": "optimizer", "crash_for_test": True, "optimizer": "nope"})
    assert result["outcome"] == "mismatch"  # an unknown optimizer name is a Python error, reported, not a crash
    worker.proc.kill()
    worker.proc.wait()
    assert worker.run({"kind": "optimizer"})["outcome"] == "mismatch"  # restarted
