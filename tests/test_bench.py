"""The bench harness on tiny sizes: timings, byte accounting, the not-built rows, and the files it writes."""

from __future__ import annotations

import json

import pytest
import torch

from bench import harness, losses, optim, report, runner
from bench.__main__ import main, select


@pytest.fixture
def env():
    e = harness.Env(torch.device("cpu"), quick=True, budget_s=0.01, min_reps=3, max_reps=5)
    e.peak_method = "the process's RSS high-water growth" if harness._can_reset_hwm() else ""
    e.copy_gbps = harness.copy_bandwidth(e)
    return e


def tiny_cases(env):
    shapes = [(1000,), (37, 11), (4096,)]
    adam = optim.optimizer_case("adam", "Adam", "Adam", torch.optim.Adam, shapes, torch.float32, env, {"lr": 1e-3},
                                ("for-loop", "fused"), [harness.Target("vs", 1e-6, "torch fused")], 7,
                                optim.ADAM_BYTES)  # fmt: skip
    ce = losses.ce_case("ce", 64, 1000, torch.float32, env, 0.1, [])
    return [adam, ce]


@pytest.mark.parametrize("interleave", [True, False])
def test_harness_writes_sane_results(env, tmp_path, interleave):
    assert env.copy_gbps > 0
    cases = tiny_cases(env)
    rows, targets, interrupted = runner.run_cases(cases, env, progress=False, interleave=interleave)
    assert not interrupted
    assert [r.tag for r in rows] == [c.tag for c in cases for _ in c.impls]
    by_tag = {c.tag: c for c in cases}
    timed = [r for r in rows if r.ms is not None]
    assert {r.impl for r in timed} >= {"torch for-loop", "torch fused", "torch eager"}
    for r in rows:
        assert r.ms is not None or r.note, f"{r.impl}: neither a time nor a reason"
    for r in timed:
        case = by_tag[r.tag]
        assert r.ms > 0 and r.reps >= env.min_reps
        assert r.gbps == pytest.approx(case.nbytes / (r.ms * 1e-3) / 1e9)
        assert r.pct_copy == pytest.approx(100 * r.gbps / env.copy_gbps)
        assert r.speedup is not None and r.speedup > 0
        if case.memory and env.peak_method:
            assert r.peak_bytes is not None and r.peak_bytes >= 0
    assert by_tag["adam"].nbytes == 28 * optim.numel([(1000,), (37, 11), (4096,)])
    assert by_tag["ce"].nbytes == 2 * 64 * 1000 * 4
    # The fastest peer of each case has speed-up exactly 1.
    for c in cases:
        peers = [r for r in timed if r.tag == c.tag and r.kind == "peer"]
        assert max(r.speedup for r in peers) == pytest.approx(1.0)
    fused_adam = next(r for r in rows if r.tag == "adam" and r.kind == "fusedopt")
    if fused_adam.ms is not None:
        assert targets[0]["met"] is True and targets[0]["value"] > 0

    meta = report.run_meta(env)
    paths = report.write_results(rows, cases, env, targets, tmp_path, meta)
    data = json.loads(paths["json"].read_text())
    assert data["copy_gbps"] == pytest.approx(env.copy_gbps)
    assert len(data["rows"]) == len(rows) and data["meta"]["date"] == meta["date"]
    for r in data["rows"]:
        if r["ms"] is not None:
            assert r["ms"] > 0 and r["gbps"] > 0
    md = paths["md"].read_text()
    assert "| op | impl | ms | GB/s | % of copy | vs best peer | peak extra | note |" in md
    assert "Byte model:" in md and "torch fused" in md
    assert paths["png"].stat().st_size > 1000
    # a run of selected cases (--ops) is named after them: it never overwrites the day's full run
    partial = report.write_results(rows, cases, env, targets, tmp_path, {**meta, "ops": "adam,ce"})
    assert partial["json"].name == f"{meta['date']}-adam+ce{'-quick' if env.quick else ''}.json"
    assert json.loads(paths["json"].read_text())["meta"].get("ops") is None
    table = report.console_table(rows, cases, env)
    assert "vs best peer" in table and "torch eager" in table


def test_missing_api_is_listed_not_faked(env):
    impls = harness.fusedopt_impls("optim.NoSuchOptimizer", env.device, lambda api, b: None)
    assert impls and all(i.build is None and "not built in this tree" in i.note for i in impls)
    impls = harness.fusedopt_impls("optim.Adam", env.device, lambda api, b: None, needs="no_such_keyword")
    assert all(i.build is None and "no_such_keyword" in i.note for i in impls)
    row = runner.run_impl(tiny_cases(env)[0], impls[0], env)
    assert row.ms is None and row.gbps is None and "not built" in row.note


def test_failing_impl_is_reported(env):
    case = tiny_cases(env)[0]

    def broken():
        raise RuntimeError("kernel exploded")

    row = runner.run_impl(case, harness.Impl("fusedopt (cpu)", "fusedopt", broken), env)
    assert row.ms is None and "kernel exploded" in row.note

    calls = []

    def fails_on_third_call():
        def run():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("died mid-run")

        return harness.Runnable(run)

    case.impls = [harness.Impl("fusedopt (cpu)", "fusedopt", fails_on_third_call), case.impls[-1]]
    rows = runner.run_interleaved(case, env)
    assert rows[0].ms is None and "died mid-run" in rows[0].note
    assert rows[1].ms is not None and rows[1].ms > 0


def test_cli_lists_and_selects(capsys):
    assert main(["--list", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    tags = ("adam", "adam-many", "rmsprop", "sgd", "adagrad", "lion", "muon", "lamb", "adafactor", "clip", "clip-adam",
            "ce", "mse", "bce")  # fmt: skip
    for tag in (*tags, "linear-ce"):
        assert f"\n{tag} " in "\n" + out
    env = harness.make_env("cpu", quick=True)
    all_cases = optim.cases(env) + losses.cases(env)
    assert {c.family for c in select(all_cases, "losses")} == {"losses"}
    assert [c.tag for c in select(all_cases, "adam,ce")] == ["adam", "ce"]
    with pytest.raises(SystemExit):
        select(all_cases, "nope")


@pytest.mark.parametrize("quick", [True, False])
def test_gpu_cases_are_well_formed(quick):
    """The GPU suite is built (not run) here: TARGETS.md sizes, byte counts, and a target per headline case."""
    env = harness.Env(torch.device("cuda"), quick, 1.0, 10, 100)
    cases = optim.cases(env) + losses.cases(env)
    tags = [c.tag for c in cases]
    assert len(tags) == len(set(tags)) and {"adam-bf16", "adam-many", "ce-bf16", "linear-ce"} <= set(tags)
    by_tag = {c.tag: c for c in cases}
    assert by_tag["adam-many"].nbytes == 28 * 10000 * 4096
    assert by_tag["adam-bf16"].nbytes * 2 == by_tag["adam"].nbytes
    if not quick:
        assert optim.numel(optim.sizes(env)["model"]) == pytest.approx(1.10e9, rel=0.01)
        assert by_tag["ce-bf16"].nbytes == 2 * 8192 * 128256 * 2
    for c in cases:
        assert c.impls and (c.nbytes > 0) != (c.flops > 0)
        assert any(i.kind == "fusedopt" for i in c.impls) and any(i.kind == "peer" for i in c.impls)
        for t in c.targets:
            assert t.kind != "vs" or any(i.name == t.peer for i in c.impls), (c.tag, t.peer)


@pytest.mark.gpu
def test_bench_runs_on_cuda(tmp_path, monkeypatch):
    """scripts/gpu_check.sh runs this before the quick bench: the CUDA timing (events), peak memory and files."""
    monkeypatch.setenv("FUSEDOPT_BENCH_NO_COMPILE", "1")  # the quick bench times torch.compile; keep this test short
    env = harness.make_env("cuda", quick=True)
    env.budget_s, env.max_reps = 0.02, 20
    env.copy_gbps = harness.copy_bandwidth(env)
    assert env.copy_gbps > 100  # any GPU copies faster than 100 GB/s
    shapes = [(1 << 20,), (4096,), (33, 77)]
    adam = optim.optimizer_case("adam", "Adam", "Adam", torch.optim.Adam, shapes, torch.float32, env, {"lr": 1e-3},
                                ("foreach", "fused"), [], 7, optim.ADAM_BYTES)  # fmt: skip
    ce = losses.ce_case("ce", 256, 32000, torch.bfloat16, env, 0.1, [])
    rows, targets, _ = runner.run_cases([adam, ce], env, progress=False)
    for r in rows:
        assert r.ms is not None or r.note
    eager = next(r for r in rows if r.impl == "torch eager")
    assert eager.ms > 0 and eager.peak_bytes >= 256 * 32000 * 2  # at least the grad it returns
    paths = report.write_results(rows, [adam, ce], env, targets, tmp_path, report.run_meta(env))
    assert json.loads(paths["json"].read_text())["meta"]["gpu"]


def test_a_target_judges_the_row_it_names():
    """A target with `impl` is judged on that fusedopt row, not on the case's fastest one (the low-bit case's int8
    goal must not be met by its faster int4 row)."""
    case = harness.Case("q", "optim", "op", 0, "", [], targets=[harness.Target("vs", 0.6, "full", impl="fusedopt int8"),
                                                               harness.Target("vs", 0.6, "full")])  # fmt: skip
    rows = [harness.Row("q", "op", "fusedopt int8 (cpu)", "fusedopt", ms=50.0),
            harness.Row("q", "op", "fusedopt int4 (cpu)", "fusedopt", ms=30.0),
            harness.Row("q", "op", "full", "peer", ms=25.0)]  # fmt: skip
    named, fastest = runner.check_targets(case, rows)
    assert named["impl"] == "fusedopt int8 (cpu)" and named["value"] == 0.5 and named["met"] is False
    assert fastest["impl"] == "fusedopt int4 (cpu)" and fastest["met"] is True
