#!/usr/bin/env bash
# The GPU check: the one command run on a lent GPU machine (H100/H200), COLD (a fresh
# machine: no Triton cache, the package not installed), in under 9 minutes.
# Usage: benchmarks/device_check.sh [python]      benchmarks/device_check.sh --budgets
#
# Phases run one after another, each under its own time limit (seconds, BUDGET below) so
# that one overrunning cannot eat the others, and each also capped by what is left of
# DEADLINE_S. The sum of the budgets plus each phase's kill grace stays under DEADLINE_S
# (tests/benchmarks/test_device_check.py checks it), and DEADLINE_S under the device
# tool's 600 s with room for its start and transfers.
#   env            torch/triton/CUDA versions, the device, modules the tests import
#   install        only when the package is missing: pip install -e ., offline
#   warm           in parallel, each under this one limit (16 CPU cores, one GPU):
#                  - compile-check: tests/cli/test_kernel_compile.py for sm_90a (CPU only:
#                    ~100 variants one after another, 0.3-4.7 s each cold, own cache);
#                  - gpu-FILE: pytest -m gpu, one process per test file that uses the
#                    kernel_device fixture or gpu marks (each compiles its own kernels);
#                  - warm-*: the benchmarks below once with one iteration each, so that
#                    Triton's cache (shared by every process) holds their kernels before
#                    anything is timed; their numbers are thrown away.
#   sampler-tune   bench_sampler.py --tune: the chunk kernel's (chunk, warps) launches
#   sampler-quick  bench_sampler.py --quick: 12 configurations against the baselines
#   launches       bench_launches.py at B = 1 and 64, contexts 16 and 512: kernels per step
#                  counted, by the profiler, and each kernel's time on replayed steps
#                  beside the predicted one (--predict h200)
#   decode         bench_decode.py at B = 1, 64, 256
#   render         render_results.py: every table as markdown for RESULTS.md, printed last
# Exit status: 0 when the GPU tests passed, whatever the benchmarks did (a benchmark cut
# short keeps the rows it wrote: each rewrites its JSON after every row); 1 when a GPU test
# failed, the GPU tests could not run (no device, install failed, none collected) or they
# ran out of time. LMGEN_CHECK_LIMITS="phase=s ..." lowers a phase's limit (for tests).
# Each phase's output goes to a log ($OUT/logs/ when $OUT is set); a failing phase prints
# its tail (pytest runs verbose, so a phase cut short shows the test it was in).
# With $OUT set, the JSON, the markdown (results.md) and the logs come back in it.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASES=(env install warm sampler-tune sampler-quick launches decode render)
declare -A BUDGET=([env]=20 [install]=40 [warm]=230 [sampler-tune]=30 [sampler-quick]=30
                   [launches]=60 [decode]=70 [render]=15)
DEADLINE_S=520
GRACE_S=2
if [ "${1:-}" = --budgets ]; then
    for p in "${PHASES[@]}"; do echo "$p ${BUDGET[$p]}"; done
    echo "grace $GRACE_S"
    echo "deadline $DEADLINE_S"
    exit 0
fi
for kv in ${LMGEN_CHECK_LIMITS:-}; do BUDGET[${kv%%=*}]=${kv#*=}; done
PY="${1:-${PYTHON:-python3}}"
unset TRITON_INTERPRET
RESULTS="${LMGEN_CHECK_RESULTS:-benchmarks/results}"
LOGS="${OUT:+$OUT/logs}"
LOGS="${LOGS:-$(mktemp -d)}"
WARM="$(mktemp -d)"  # the warm-up runs' JSON: thrown away
mkdir -p "$LOGS" "$RESULTS"
summary=()
gpu_failed=0

# left NAME: seconds this phase may still take (what the later phases' budgets leave).
left() {
    local after=0 seen=0 p
    for p in "${PHASES[@]}"; do
        (( seen )) && after=$(( after + BUDGET[$p] + GRACE_S ))
        [ "$p" = "$1" ] && seen=1
    done
    echo $(( DEADLINE_S - after - GRACE_S - SECONDS ))
}

# phase NAME CMD...: run CMD under min(BUDGET[NAME], time left), output to $LOGS/NAME.log.
phase() {
    local name=$1 limit=${BUDGET[$1]} room rc t0
    shift
    room=$(left "$name")
    (( limit > room )) && limit=$room
    if (( limit < 3 )); then
        summary+=("$name: not run (no time left)")
        return 1
    fi
    local cmd="$*"
    cmd="${cmd//$'\n'/ }"
    echo "== $name (limit ${limit} s): ${cmd:0:150}"
    t0=$SECONDS
    # Through bash: CMD may be one of the exported functions below.
    timeout -k "$GRACE_S" "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local what="rc=$rc"
    (( rc == 124 || rc == 137 )) && what="rc=$rc (time limit ${limit} s)"
    summary+=("$name: $what in $(( SECONDS - t0 )) s")
    if (( rc != 0 )); then
        echo "-- $name: $what; last lines of $LOGS/$name.log:"
        tail -n 25 "$LOGS/$name.log"
    fi
    return $rc
}

phase env "$PY" -c "
import importlib.util, torch, triton
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')
mods = ('pytest', 'scipy', 'tokenizers', 'safetensors', 'transformers', 'hypothesis', 'tqdm')
print('missing modules:', [m for m in mods if importlib.util.find_spec(m) is None] or 'none')
"
cat "$LOGS/env.log"

# The GPU machine has torch, triton, transformers and pytest but not this package: install
# it in place, offline (lmgen_fast.kernels maps to kernels/, so the source tree alone won't do).
if ! "$PY" -c "import lmgen_fast.kernels" 2>/dev/null; then
    if ! phase install "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    then
        echo "== the package could not be installed: no GPU test ran"
        printf '  %s\n' "${summary[@]}"
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

# The timed runs, each a function so that the warm-up runs the very same kernels.
sampler_tune() { "$PY" benchmarks/bench_sampler.py --tune "$@"; }
sampler_quick() { "$PY" benchmarks/bench_sampler.py --quick "$@"; }
launches() {
    "$PY" benchmarks/bench_launches.py --device cuda --batches 1 64 --contexts 16 512 \
        --measure --predict h200 "$@"
}
decode() { "$PY" benchmarks/bench_decode.py --batches 1 64 256 "$@"; }

# warm: every job of the group at once, each under the phase's limit; one summary line each.
warm_group() {
    local limit=${BUDGET[warm]} room pids=() names=() i rc
    room=$(left warm)
    (( limit > room )) && limit=$room
    echo "== warm (limit ${limit} s, in parallel): ${!WARM_JOBS[*]}"
    for name in "${!WARM_JOBS[@]}"; do
        timeout -k "$GRACE_S" "$limit" bash -c "${WARM_JOBS[$name]}" \
            >"$LOGS/$name.log" 2>&1 &
        pids+=($!)
        names+=("$name")
    done
    local t0=$SECONDS
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        name=${names[$i]}
        local what="rc=$rc"
        (( rc == 124 || rc == 137 )) && what="rc=$rc (time limit ${limit} s)"
        # pytest's 5: no gpu test selected in that file (its tests are all CPU ones).
        if [[ $name == gpu-* ]]; then
            (( rc == 0 )) && gpu_ran=1
            (( rc != 0 && rc != 5 )) && gpu_failed=1
        fi
        summary+=("$name: $what (the group: $(( SECONDS - t0 )) s)")
        if (( rc != 0 && rc != 5 )); then
            echo "-- $name: $what; last lines of $LOGS/$name.log:"
            tail -n 25 "$LOGS/$name.log"
        fi
    done
}

declare -A WARM_JOBS=()
# Every test file that uses the kernel_device fixture or gpu marks (MARKS in conftest marks
# test_gpu_* by name), one pytest each (the compile check has its own job).
mapfile -t gpu_files < <(grep -rlE --include="test_*.py" \
    "kernel_device|^@gpu|mark\.gpu|def test_gpu_" tests | grep -v test_kernel_compile.py | sort)
for f in "${gpu_files[@]}"; do
    WARM_JOBS["gpu-$(basename "$f" .py)"]="'$PY' -m pytest -m gpu '$f' -v -rs -p no:cacheprovider"
done
if [ -f tests/cli/test_kernel_compile.py ]; then
    # sm_90a only: the machine's own arch (CI compiles sm_80 too, with both Tritons).
    WARM_JOBS[compile-check]="LMGEN_COMPILE_ARCHS=90 '$PY' -m pytest -v \
        tests/cli/test_kernel_compile.py -rs -p no:cacheprovider"
else
    summary+=("compile-check: skipped (tests/cli/test_kernel_compile.py is absent)")
fi
export -f sampler_tune sampler_quick launches decode
export PY
WARM_JOBS[warm-sampler]="sampler_tune --iters 1 --json '$WARM/tune.json' && \
    sampler_quick --iters 1 --no-compile --json '$WARM/quick.json'"
WARM_JOBS[warm-launches]="launches --out '$WARM/launches.json'"
WARM_JOBS[warm-decode]="decode --tokens 8 --repeats 1 --no-hf --no-profile --budget-s 1 \
    --json '$WARM/decode.json'"
gpu_ran=0
if (( ${#gpu_files[@]} )); then
    warm_group
else
    summary+=("gpu tests: no test file uses kernel_device or gpu marks")
fi
(( gpu_ran )) || gpu_failed=1
# Without a device every gpu test skips, which pytest calls a pass: not one here.
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    summary+=("gpu tests: no CUDA device, they all skipped")
    gpu_failed=1
fi

# The budgets (counted from the start of each process) start no configuration late, so
# that the last one ends within the limit; bench_decode's skips the transformers
# comparisons. A phase cut short keeps the rows its JSON already has.
phase sampler-tune sampler_tune --budget-s 22 --json "$RESULTS/sampler_tune_cuda.json"
phase sampler-quick sampler_quick --budget-s 22 --json "$RESULTS/bench_sampler_quick_cuda.json"
phase launches launches --out "$RESULTS/bench_launches_cuda.json"
phase decode decode --repeats 2 --budget-s 40 --json "$RESULTS/bench_decode_cuda.json"

echo "== device_check: $SECONDS s"
printf '  %s\n' "${summary[@]}"
echo "   logs: $LOGS"
# Last: every table of this run, as markdown ready for benchmarks/RESULTS.md.
shopt -s nullglob
results=("$RESULTS"/*.json)
phase render "$PY" benchmarks/render_results.py "${results[@]}" \
    --command "benchmarks/device_check.sh"
echo "== results (markdown for benchmarks/RESULTS.md)"
cat "$LOGS/render.log"
# On the device tool's machine, $OUT comes back: take the JSON and the markdown along.
if [ -n "${OUT:-}" ]; then
    cp "${results[@]}" "$OUT"/ 2>/dev/null
    cp "$LOGS/render.log" "$OUT/results.md" 2>/dev/null
fi
if (( gpu_failed )); then
    echo "== GPU tests failed or did not run (see the gpu-* lines above)"
    exit 1
fi
exit 0
