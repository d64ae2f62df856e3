#!/usr/bin/env bash
# The GPU checks in one go, for a GPU machine (the H200 one: torch 2.11 cu130, Triton 3.6, Python 3.12, nvcc 13.0,
# no network), in under 8 minutes:
#   1. peers missing there (Liger-Kernel, Cut Cross-Entropy) installed from wheels in .whl/ when that folder exists;
#   2. the extensions built in place for sm_90 (FUSEDOPT_CUDA_ARCHS=9.0, MAX_JOBS=16);
#   3. the `gpu` tests (pytest -m gpu);
#   4. the quick bench on the GPU. BENCH_MODE=full runs the whole suite at TARGETS.md sizes instead; give it
#      GPU_CHECK_BUDGET_S=570 (most of one 10-minute device command); what does not fit is cut, and still written.
# Logs and results go to ${OUT:-bench/results/gpu-check}: env.log, build.log, tests.log, bench.log and the bench's
# <date>[-quick].json/.md/.png (7 files). Each step has a time limit; a bench cut short still writes what it measured.
#
# Knobs: OUT, PYTHON (default python3), BENCH_MODE (quick|full), BENCH_ARGS (extra `python -m bench` flags, e.g.
# "--ops adam,ce-bf16"), GPU_CHECK_BUDGET_S (default 450 s: the whole script's deadline).
# Wheels for the peers (pure Python), fetched where pip works, into the ignored .whl/:
#   python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-check}"
PY="${PYTHON:-python3}"
MODE="${BENCH_MODE:-quick}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-450}))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

left() { echo $((DEADLINE - SECONDS)); }

# step NAME LIMIT_S SIGNAL CMD...: runs CMD under `timeout`, its output in $OUT/NAME.log, and reports its status.
step() {
    local name=$1 limit=$2 sig=$3 rc t0=$SECONDS
    shift 3
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, no time left" | tee -a "$OUT/$name.log"
        failed+=("$name(no time)")
        return 1
    fi
    echo "== $name (limit ${limit}s)"
    timeout --signal="$sig" --kill-after=20 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ', TIMED OUT')"
    [ $rc -eq 0 ] || failed+=("$name(exit $rc)")
    return $rc
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    nvcc --version 2>&1 | tail -1 || true
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())' 2>&1
} >"$OUT/env.log"
cat "$OUT/env.log"

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$OUT/env.log" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "   wheels failed to install (see env.log); peers from them will be listed as not importable"
    fi
fi

budget=$(left)
if ! step build $((budget < 240 ? budget : 240)) TERM \
    env FUSEDOPT_CUDA_ARCHS=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace; then
    # No second, just-in-time attempt at the same build during the tests: run the other backends.
    export FUSEDOPT_SKIP_CUDA=1
    echo "   CUDA build failed: tests and bench run with FUSEDOPT_SKIP_CUDA=1 (see build.log)"
    tail -n 25 "$OUT/build.log"
fi
"$PY" -m fusedopt info >>"$OUT/env.log" 2>&1 || echo "(python -m fusedopt info failed)" >>"$OUT/env.log"

budget=$(($(left) - 150))  # leave the bench at least 150 s
step tests $((budget < 180 ? budget : 180)) TERM "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
tail -n 15 "$OUT/tests.log"

bench_flags=(--device cuda --out "$OUT" --no-progress)
[ "$MODE" = full ] || bench_flags+=(--quick)
# SIGINT at the limit: the bench stops timing, then writes the table and files for what it measured.
# shellcheck disable=SC2086
step bench $(($(left) - 5)) INT "$PY" -m bench "${bench_flags[@]}" ${BENCH_ARGS:-}
tail -n 80 "$OUT/bench.log"

echo
echo "gpu_check: $((SECONDS)) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -ne 0 ]; then
    echo "gpu_check: FAILED steps: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
