#!/usr/bin/env bash
# The GPU check: the one command run on a lent GPU machine (H100/H200), in under 5 minutes.
# Usage: benchmarks/device_check.sh [python]
#
# Phases, each under its own time limit (seconds) so that one overrunning cannot eat the
# others, and each also capped by what is left of DEADLINE_S (so the whole ends by then):
#   env            10  torch/triton/CUDA versions, the device, missing test modules
#   install        20  only when the package is missing: pip install -e ., offline
#   gpu-tests      55  pytest -m gpu on every test file that has gpu-marked tests
#   compile-check  60  pytest tests/cli/test_kernel_compile.py (skipped when the file is absent)
#   sampler-tune   25  bench_sampler.py --tune: the chunk kernel's (chunk, warps) launches
#   sampler-quick  25  bench_sampler.py --quick: 12 configurations against the baselines
#   launches       25  bench_launches.py at B = 1: kernels per decode step, counted and by
#                      the profiler, eager and fused (the article's configuration)
#   decode         55  bench_decode.py at B = 1, 64, 256
#   render         10  render_results.py: every table as markdown for RESULTS.md, printed last
#   sum           285  DEADLINE_S = 288; timeout's 2 s kill grace on top: under 300.
# Each phase's output goes to a log ($OUT/logs/ when $OUT is set); a failing phase prints
# its tail (pytest runs verbose, so a phase cut short shows the test it was in). The
# benchmarks rewrite their JSON after every row, so a phase cut short still leaves a table.
# With $OUT set, the JSON, the markdown (results.md) and the logs come back in it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
unset TRITON_INTERPRET
DEADLINE_S=288
RENDER_S=10
GRACE_S=2
RESULTS=benchmarks/results
LOGS="${OUT:+$OUT/logs}"
LOGS="${LOGS:-$(mktemp -d)}"
mkdir -p "$LOGS" "$RESULTS"
summary=()
failed=0

# phase NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), output to $LOGS/NAME.log.
phase() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(( DEADLINE_S - RENDER_S - GRACE_S - SECONDS ))
    [ "$name" = render ] && left=$(( DEADLINE_S - GRACE_S - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 3 )); then
        summary+=("$name: not run (no time left)")
        failed=1
        return 1
    fi
    local cmd="$*"
    cmd="${cmd//$'\n'/ }"
    echo "== $name (limit ${limit} s): ${cmd:0:150}"
    t0=$SECONDS
    timeout -k "$GRACE_S" "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local what="rc=$rc"
    (( rc == 124 || rc == 137 )) && what="rc=$rc (time limit ${limit} s)"
    summary+=("$name: $what in $(( SECONDS - t0 )) s")
    if (( rc != 0 )); then
        failed=1
        echo "-- $name failed ($what); last lines of $LOGS/$name.log:"
        tail -n 25 "$LOGS/$name.log"
    fi
    return $rc
}

phase env 10 "$PY" -c "
import importlib.util, torch, triton
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')
mods = ('pytest', 'scipy', 'tokenizers', 'safetensors', 'transformers', 'hypothesis')
print('missing modules:', [m for m in mods if importlib.util.find_spec(m) is None] or 'none')
"
cat "$LOGS/env.log"

# The GPU machine has torch, triton, transformers and pytest but not this package: install
# it in place, offline (lmgen_fast.kernels maps to kernels/, so the source tree alone won't do).
if ! "$PY" -c "import lmgen_fast.kernels" 2>/dev/null; then
    if ! phase install 20 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    then
        printf '%s\n' "${summary[@]}"
        exit 1
    fi
fi

# Results of an earlier run on this machine must not pass for this run's: moved aside, out
# of the repository (git would see them), not deleted.
if compgen -G "$RESULTS/*.json" >/dev/null; then
    previous="$(mktemp -d "${TMPDIR:-/tmp}/device_check_previous.XXXXXX")"
    mv -f "$RESULTS"/*.json "$previous"/
    echo "earlier results moved to $previous"
fi

# Every test file with gpu-marked tests (the compile check has its own phase below).
mapfile -t gpu_tests < <(grep -rlE --include="test_*.py" "^@gpu|mark.gpu" tests | grep -v test_kernel_compile.py)
phase gpu-tests 55 "$PY" -m pytest -m gpu "${gpu_tests[@]}" -v -rs -p no:cacheprovider
tail -n 3 "$LOGS/gpu-tests.log"

if [ -f tests/cli/test_kernel_compile.py ]; then
    # sm_90a only: the machine's own arch (CI compiles sm_80 too, with both Tritons).
    LMGEN_COMPILE_ARCHS=90 phase compile-check 60 "$PY" -m pytest -v \
        tests/cli/test_kernel_compile.py -rs -p no:cacheprovider
    tail -n 3 "$LOGS/compile-check.log"
else
    summary+=("compile-check: skipped (tests/cli/test_kernel_compile.py is absent)")
fi

# The budgets (counted from the start of the process) start no configuration late, so that
# the last one ends within the limit; bench_decode's skips the transformers comparisons.
phase sampler-tune 25 "$PY" benchmarks/bench_sampler.py --tune --budget-s 18
phase sampler-quick 25 "$PY" benchmarks/bench_sampler.py --quick --budget-s 16
# Kernels per step: the CPU's count (the same on any device) next to the profiler's.
phase launches 25 "$PY" benchmarks/bench_launches.py --device cuda --batches 1 \
    --out "$RESULTS/bench_launches_cuda.json"
phase decode 55 "$PY" benchmarks/bench_decode.py --batches 1 64 256 --repeats 2 --budget-s 30 \
    --json "$RESULTS/bench_decode_cuda.json"

echo "== device_check: $SECONDS s"
printf '  %s\n' "${summary[@]}"
echo "   logs: $LOGS"
# Last: every table of this run, as markdown ready for benchmarks/RESULTS.md.
phase render "$RENDER_S" "$PY" benchmarks/render_results.py \
    --command "benchmarks/device_check.sh"
echo "== results (markdown for benchmarks/RESULTS.md)"
cat "$LOGS/render.log"
# On the device tool's machine, $OUT comes back: take the JSON and the markdown along.
if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*.json "$OUT"/ 2>/dev/null
    cp "$LOGS/render.log" "$OUT/results.md" 2>/dev/null
fi
exit "$failed"
