#!/usr/bin/env bash
# Issue 3, item 6: the GPU tests of the sampler, then its benchmark; the table prints last.
# Meant to finish in under 5 minutes on an H100. Usage: benchmarks/device_check.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python}}"
unset TRITON_INTERPRET

echo "== pytest -m gpu (sampler kernel) =="
timeout 150 "$PY" -m pytest -m gpu tests/test_kernel.py -q -rs -p no:cacheprovider
tests_rc=$?

echo "== benchmarks/bench_sampler.py =="
log="$(mktemp)"
timeout 200 "$PY" benchmarks/bench_sampler.py --budget-s 120 >"$log"
bench_rc=$?

echo "device_check: tests rc=$tests_rc, benchmark rc=$bench_rc"
cat "$log"  # the table, last
rm -f "$log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
