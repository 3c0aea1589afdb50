#!/usr/bin/env bash
# Every GPU figure in one run (bench/gpu_suite.py), then optionally the `gpu` tests, on one machine.
#
#   bash bench/gpu_suite.sh OUT_DIR [--device cuda|cpu] [--sections train cache caption tune] [--with-tests]
#
# On the lent GPU machine (no network, no ray/pydantic installed) run it through the bundle that
# ../shared/tools/gpu-bundle.sh builds into .gpu/: this script re-executes itself under
# `.gpu/run.sh` when Ray is not importable. Figures go to OUT_DIR/gpu_suite.{json,md} (plus profiler
# summaries), the tests' log to OUT_DIR/pytest_gpu.log. Exit status: non-zero when a section failed,
# a goal was missed, or (with --with-tests) a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--device cuda|cpu] [--sections ...] [--with-tests]}
shift
if ! python3 -c "import ray, pydantic" 2>/dev/null && [ -x .gpu/run.sh ] && [ -z "${UMAF_IN_BUNDLE:-}" ]; then
  export UMAF_IN_BUNDLE=1
  exec bash .gpu/run.sh bash "$0" "$OUT" "$@"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WITH_TESTS=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--with-tests" ]; then WITH_TESTS=1; else ARGS+=("$arg"); fi
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
started=$(date +%s)
"$PY" bench/gpu_suite.py --out "$OUT" "${ARGS[@]}"
status=$?
echo "== gpu_suite: figures exit $status after $(( $(date +%s) - started )) s"
if [ "$WITH_TESTS" = 1 ]; then
  tests_started=$(date +%s)
  UMAF_TEST_RAY_CPUS=${UMAF_TEST_RAY_CPUS:-8} "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py \
    2>&1 | tee "$OUT/pytest_gpu.log"
  tests=${PIPESTATUS[0]}
  echo "== gpu_suite: gpu tests exit $tests after $(( $(date +%s) - tests_started )) s"
  [ "$tests" -ne 0 ] && status=1
fi
exit "$status"
