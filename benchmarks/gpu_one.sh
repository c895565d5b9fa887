#!/usr/bin/env bash
# Release 3's measurements on one H200 (the device tool's nvidia-h200), each phase one call of under 10 minutes:
#
#   bash benchmarks/gpu_one.sh learn    # where a training step's time goes (profile, GPU alone), then the
#                                       # learning run beside the GPU tests (neither is a timing of the other)
#   bash benchmarks/gpu_one.sh bench    # training step targets, official step, 5000 views @512 peak, small scenes
#   bash benchmarks/gpu_one.sh tests    # the whole -m gpu suite
#
# Needs .peers (a copy of shared/peers) and .whl_official (omegaconf, hydra-core, antlr4 wheels) carried along.
# Everything lands in $OUT (or benchmarks/results/run); copy the JSON into benchmarks/results/ and commit it.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_official/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
out="${OUT:-benchmarks/results/run}"
mkdir -p "$out"
py=python3
gpu_tests() {  # the new tests first, so that a cut-off run has covered them
    timeout "$1" $py -m pytest -v -rfEs -m gpu -p no:cacheprovider --durations=25 tests/test_memory.py \
        tests/test_train_gpu.py tests/test_gpu_compile.py tests/test_upsample.py tests/test_gpu.py \
        tests/test_gpu_model.py tests/ > "$out/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" >> "$out/gpu_tests.log"
}

case "${1:?usage: gpu_one.sh learn|bench|tests}" in
learn)
    for backend in triton torch; do
        $py benchmarks/profile_train_step.py --backend "$backend" --views 32 --size 512 \
            --out "$out/profile_train_${backend}_512_32.json" > "$out/profile_train_$backend.log" 2>&1
    done
    $py benchmarks/learning_run.py --minutes "${LEARN_MINUTES:-2.0}" --out "$out/learning_run_h200.json" \
        > "$out/learning_run.log" 2>&1 &
    gpu_tests "${TEST_SECONDS:-380}"
    wait
    ;;
bench)
    $py benchmarks/bench_train.py --out "$out/train_h200.json" ${BENCH_ITEMS:-} > "$out/bench_train.log" 2>&1
    ;;
tests)
    gpu_tests "${TEST_SECONDS:-560}"
    ;;
*)
    echo "unknown phase $1" >&2
    exit 2
    ;;
esac
tail -n 30 "$out"/*.log
