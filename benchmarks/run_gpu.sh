#!/usr/bin/env bash
# The one command for the GPU machine: build the extension, run the cuda-marked tests and the
# benchmarks, write logs/JSON under $OUT (or benchmarks/results), print a short table last.
#
#   bash benchmarks/run_gpu.sh [pytest -k expression]      (from the repository root)
#
# Carry the wheel kit as .whl (see ../shared/device/README.md) for fairseq/DeepSpeed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .whl/kit.sh ] && . .whl/kit.sh
start=$SECONDS

echo "== build ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -v "warning #" "$OUT/build.log" | tail -40; exit 1; }
echo "   built in $((SECONDS - start)) s"
python3 -m fastpatch.cli env 2>/dev/null | tee "$OUT/env.txt"

echo "== cuda tests"
python3 -m pytest -q -m cuda -p no:cacheprovider ${1:+-k "$1"} tests \
  --junitxml="$OUT/cuda-tests.xml" > "$OUT/cuda-tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/cuda-tests.log" | head -40
tail -1 "$OUT/cuda-tests.log"

echo "== benchmarks"
python3 benchmarks/bench_ops.py --out "$OUT" > "$OUT/bench-ops.log" 2>&1 || tail -20 "$OUT/bench-ops.log"
for script in benchmarks/bench_models.py; do
  [ -f "$script" ] && { python3 "$script" --out "$OUT" > "$OUT/$(basename "$script" .py).log" 2>&1 || tail -20 "$OUT/$(basename "$script" .py).log"; }
done

echo "== summary ($((SECONDS - start)) s)"
echo "cuda tests: $(tail -1 "$OUT/cuda-tests.log")"
sed -n '/^# /,$p' "$OUT/bench-ops.log"
for log in "$OUT"/bench_models.log; do [ -f "$log" ] && sed -n '/^# /,$p' "$log"; done
exit $tests_rc
