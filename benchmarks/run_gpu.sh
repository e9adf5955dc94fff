#!/usr/bin/env bash
# The one command for the GPU machine: build the extension, run the cuda-marked tests and the
# benchmarks, write logs/JSON under $OUT (or benchmarks/results), print a short table last.
#
#   FASTPATCH_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu.sh [pytest -k expr]
#
# (the GPU machine receives the tree without .git: pass the commit so tables can name it)
#
# Carry the wheel kit as .whl (see ../shared/device/README.md) for fairseq/DeepSpeed.
# Each stage has a time cap (seconds) so one call fits the device's 10-minute limit:
#   TESTS_TIMEOUT (default 240), OPS_TIMEOUT (180), MODELS_TIMEOUT (300),
#   FAIRSEQ_TIMEOUT (420), DEEPSPEED_TIMEOUT (300), PROFILE_TIMEOUT (300).
# STAGES picks what runs after the build (default "tests ops models inference"; also "fairseq",
# "deepspeed", "train-profile"), so a session can split the work over calls while the machine
# stays warm (the in-place build is kept); MODELS_ONLY (e.g. "bert-infer gpt2-train") picks
# workloads of bench_models.py, OPS_ONLY (e.g. "cross_entropy layers") the op benchmarks,
# FAIRSEQ_PARTS (default "generate bleu") the parts of bench_fairseq.py, and FAIRSEQ_ARGS /
# DEEPSPEED_ARGS / PROFILE_ARGS add options (e.g. "--bleu-updates 600", "--updates 100",
# "--rows fairseq lightseq").
# The device returns at most 8 files of $OUT: the per-command logs of fairseq/DeepSpeed go into
# one $OUT/logs.tar.gz (re-made after each of those stages, so a call cut short keeps the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the documented command already sourced the kit: a second pip install would only cost time
[[ ":${PYTHONPATH:-}:" == *:/tmp/site:* ]] || { [ -f .whl/kit.sh ] && . .whl/kit.sh; }
start=$SECONDS

echo "== build ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
if ! MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  # salvage: rebuild without the files that failed, so the rest can still be tested and timed
  failed=$(grep -oE "FAILED: [^ ]*csrc/[a-z_]+\.o" "$OUT/build.log" | sed -E 's#.*(csrc/[a-z_]+)\.o#\1.cu#' | sort -u | paste -sd, -)
  echo "!! build failed in: ${failed:-unknown}"; grep -E "error" "$OUT/build.log" | grep -v "warning #" | head -20
  [ -n "$failed" ] || exit 1
  FASTPATCH_SKIP_SOURCES=$failed MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace \
    > "$OUT/build-salvage.log" 2>&1 || { tail -20 "$OUT/build-salvage.log"; exit 1; }
fi
echo "   built in $((SECONDS - start)) s"
# integrations/ is installed as fastpatch.integrations; from a source tree (no pip install: the
# GPU machine has no index to fetch build requirements from) a temporary link does the same
if [ ! -e fastpatch/integrations ]; then
  ln -s ../integrations fastpatch/integrations && trap 'rm -f fastpatch/integrations' EXIT
fi
python3 -m fastpatch.cli env 2>/dev/null | tee "$OUT/env.txt"

STAGES=" ${STAGES:-tests ops models inference} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
tests_rc=0
if want tests; then
echo "== cuda tests"
# -v: a stage cut by its time cap still leaves the name and verdict of every test that ran
# SIGINT at the cap: pytest then stops as on Ctrl-C and still prints the failures so far
timeout -s INT -k 20 "${TESTS_TIMEOUT:-240}" python3 -m pytest -v -rfE --tb=short --durations=10 -m cuda \
  -p no:cacheprovider ${1:+-k "$1"} tests --junitxml="$OUT/cuda-tests.xml" > "$OUT/cuda-tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/cuda-tests.log" | head -40
tail -1 "$OUT/cuda-tests.log"
fi

echo "== benchmarks"
ops_only=(); [ -n "${OPS_ONLY:-}" ] && ops_only=(--only $OPS_ONLY)
want ops && { timeout "${OPS_TIMEOUT:-180}" python3 benchmarks/bench_ops.py --out "$OUT" "${ops_only[@]}" \
  > "$OUT/bench-ops.log" 2>&1 || tail -20 "$OUT/bench-ops.log"; }
for stage in models inference; do
  script=benchmarks/bench_$stage.py
  only=(); [ "$stage" = models ] && [ -n "${MODELS_ONLY:-}" ] && only=(--only $MODELS_ONLY)
  want "$stage" && { timeout "${MODELS_TIMEOUT:-300}" python3 "$script" --out "$OUT" "${only[@]}" \
    > "$OUT/$(basename "$script" .py).log" 2>&1 || tail -20 "$OUT/$(basename "$script" .py).log"; }
done
LOGS=$(mktemp -d)
bench() {  # stage, time cap, options; one process per fairseq command: its logs are tarred
  echo "   $1 ($(date +%T), cap $2 s)"
  timeout "$2" python3 "benchmarks/bench_$1.py" --out "$OUT" --log-dir "$LOGS/$1-logs" "${@:3}" \
    > "$OUT/bench_$1.log" 2>&1 || tail -20 "$OUT/bench_$1.log"
  tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
}
want fairseq && bench fairseq "${FAIRSEQ_TIMEOUT:-420}" --parts ${FAIRSEQ_PARTS:-generate bleu} \
  ${FAIRSEQ_ARGS:-}
want deepspeed && bench deepspeed "${DEEPSPEED_TIMEOUT:-300}" ${DEEPSPEED_ARGS:-}
# where a training update's time goes (host vs GPU, top kernels) for fairseq vs lightseq-train
want train-profile && { timeout "${PROFILE_TIMEOUT:-300}" python3 benchmarks/profile_fairseq_train.py \
  --out "$OUT" ${PROFILE_ARGS:-} > "$OUT/profile-fairseq-train.log" 2>&1 \
  || tail -20 "$OUT/profile-fairseq-train.log"; }

echo "== summary ($((SECONDS - start)) s)"
[ -f "$OUT/cuda-tests.log" ] && echo "cuda tests: $(tail -1 "$OUT/cuda-tests.log")"
[ -f "$OUT/bench-ops.log" ] && sed -n '/^# /,$p' "$OUT/bench-ops.log"
for log in "$OUT"/bench_models.log "$OUT"/bench_inference.log; do [ -f "$log" ] && sed -n '/^# /,$p' "$log"; done
# fairseq/DeepSpeed: the table, or (cut by the time cap) the per-command lines printed so far
for log in "$OUT"/bench_fairseq.log "$OUT"/bench_deepspeed.log; do
  [ -f "$log" ] || continue
  if grep -q '^# ' "$log"; then sed -n '/^# /,$p' "$log"
  else echo "$(basename "$log"): no table (cut by its time cap?), per command:"
    grep -E '^(== |  \[|generate |bleu |train |ddp |deepspeed )' "$log"; fi
done
[ -f "$OUT/profile-fairseq-train.log" ] && sed -n '/^# /,$p' "$OUT/profile-fairseq-train.log" | head -60
[ -f "$OUT/logs.tar.gz" ] && echo "(one log per fairseq/DeepSpeed command: $OUT/logs.tar.gz)"
exit $tests_rc
