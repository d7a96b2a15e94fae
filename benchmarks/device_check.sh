#!/usr/bin/env bash
# The GPU check: the gpu-marked tests (sampler kernel, decode engine), then the sampler
# benchmark (issues 3 and 8) and the end-to-end decode benchmark (issue 5); their tables
# print last. Meant to finish in under 5 minutes on an H100/H200.
# Usage: benchmarks/device_check.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
unset TRITON_INTERPRET
# The GPU machine has torch, triton, transformers and pytest but not this package: install
# it in place, offline (lmgen_fast.kernels maps to kernels/, so the source tree alone won't do).
if ! "$PY" -c "import lmgen_fast.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== pytest -m gpu (sampler kernel, decode engine) =="
timeout 100 "$PY" -m pytest -m gpu tests/test_kernel.py tests/test_kernel_extensions.py \
    tests/test_engine.py -q -rs -p no:cacheprovider
tests_rc=$?

echo "== benchmarks/bench_sampler.py =="
sampler_log="$(mktemp)"
timeout 75 "$PY" benchmarks/bench_sampler.py --budget-s 45 >"$sampler_log"
sampler_rc=$?

echo "== benchmarks/bench_decode.py =="
decode_log="$(mktemp)"
timeout 130 "$PY" benchmarks/bench_decode.py --repeats 2 --budget-s 100 >"$decode_log"
decode_rc=$?

echo "device_check: tests rc=$tests_rc, bench_sampler rc=$sampler_rc, bench_decode rc=$decode_rc"
cat "$sampler_log" "$decode_log"  # the tables, last
rm -f "$sampler_log" "$decode_log"
# On the device tool's machine, $OUT comes back: take the JSON results along.
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null; fi
exit $(( tests_rc != 0 || sampler_rc != 0 || decode_rc != 0 ))
