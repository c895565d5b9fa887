#!/usr/bin/env bash
# Release 3's measurements on one H200 (the device tool's nvidia-h200), each phase one call of under 10 minutes:
#
#   bash benchmarks/gpu_one.sh learn    # where the learning run's step (eager and compiled) and its validation
#                                       # go (GPU alone), then the learning run beside the GPU tests
#   bash benchmarks/gpu_one.sh loop     # the learning run's step inside the training loop (default, 8 workers,
#                                       # compiled), then compiled against eager at 1000 and 1500 views
#   bash benchmarks/gpu_one.sh compile  # tests/test_gpu_compile.py, the torch backend compiled at 1500 views, and a
#                                       # compiled start cold then warm (Inductor's on-disk cache)
#   bash benchmarks/gpu_one.sh compile-rest  # what `compile` has not reached in its time: the compiled training step,
#                                       # reduce-overhead and export of the large model, the torch backend at 1500
#   bash benchmarks/gpu_one.sh compile-small  # the compiled forward after other view counts (symbolic sizes), a
#                                       # 1-100 view compiled sweep of both backends, then the compile and upsampling tests
#   bash benchmarks/gpu_one.sh profile  # where the large model's 32-view training step goes, both backends
#   bash benchmarks/gpu_one.sh bench    # the training-step targets (bench_train.py), then GPU tests until CALL_SECONDS
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
# Every file with GPU tests, the newest first, so that a run cut off by its time limit has covered them.
TEST_FILES="${TEST_FILES:-tests/test_train_gpu.py tests/test_gpu_compile.py tests/test_memory.py tests/test_upsample.py
    tests/test_offload.py tests/test_validation.py tests/test_layernorm.py tests/test_patch_embed.py tests/test_parallel.py
    tests/test_gpu_model.py tests/test_gpu.py tests/test_attention.py tests/test_cameras.py}"
gpu_tests() {  # $1: seconds at most; pytest -v logs each test as it ends, so a cut-off run still says what passed
    timeout "$1" $py -m pytest -v -rfEs -m gpu -p no:cacheprovider --durations=25 $TEST_FILES ${TEST_ARGS:-} \
        > "$out/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" >> "$out/gpu_tests.log"
}

case "${1:?usage: gpu_one.sh learn|profile|bench|tests}" in
learn)  # 8 files come back: 3 profiles, their log, the learning run's JSON, PNG and log, the tests' log
    for compiled in "" --compile; do
        $py benchmarks/profile_train_step.py --model learning-run $compiled --top 20 \
            --out "$out/profile_learning_run${compiled:+_compiled}.json" >> "$out/profile_learning_run.log" 2>&1
    done
    $py benchmarks/profile_validation.py --out "$out/profile_validation.json" >> "$out/profile_learning_run.log" 2>&1
    $py benchmarks/learning_run.py ${LEARN_MINUTES:+--minutes $LEARN_MINUTES} ${LEARN_ARGS:-} \
        --out "$out/learning_run_h200.json" > "$out/learning_run.log" 2>&1 &
    gpu_tests "${TEST_SECONDS:-380}"
    wait
    ;;
loop)  # 4 profiles and their log, the sweep's JSON and log
    start=$SECONDS
    for variant in "" "--workers 8" "--compile"; do
        name=$(echo "$variant" | tr -d ' -')
        $py benchmarks/profile_train_step.py --model learning-run --loop-steps 30 $variant --top 10 \
            --out "$out/profile_learning_run_loop${name:+_$name}.json" >> "$out/profile_loop.log" 2>&1
    done
    timeout $(( ${CALL_SECONDS:-560} - (SECONDS - start) )) $py benchmarks/scale_views.py --backend triton torch \
        --size 224 --points 1000 1500 --compile --repeats 1 --cuda-graph-max-views 0 --out-dir "$out" \
        > "$out/compile_sweep.log" 2>&1
    ;;
compile)  # the tests' log; the two starts' and the 1500-view sweep's JSON and logs
    start=$SECONDS
    TEST_FILES=tests/test_gpu_compile.py gpu_tests "${TEST_SECONDS:-240}"
    for start_kind in cold warm; do
        TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_start $py benchmarks/scale_views.py --backend triton --size 224 \
            --points 16 --compile --repeats 1 --cuda-graph-max-views 0 --out-dir "$out/start_$start_kind" \
            > "$out/compile_start_$start_kind.log" 2>&1
    done
    timeout $(( ${CALL_SECONDS:-560} - (SECONDS - start) )) $py benchmarks/scale_views.py --backend torch --size 224 \
        --points 1500 --compile --repeats 1 --cuda-graph-max-views 0 --out-dir "$out/torch_1500" \
        > "$out/compile_torch_1500.log" 2>&1
    ;;
compile-rest)  # the tests' log; the 1500-view sweep's JSON and log
    start=$SECONDS
    TEST_FILES="tests/test_gpu_compile.py::test_a_compiled_training_step_of_the_large_model_matches_eager
        tests/test_gpu_compile.py::test_reduce_overhead_and_export" gpu_tests "${TEST_SECONDS:-330}"
    timeout $(( ${CALL_SECONDS:-560} - (SECONDS - start) )) $py benchmarks/scale_views.py --backend torch --size 224 \
        --points 1500 --compile --repeats 1 --cuda-graph-max-views 0 --out-dir "$out/torch_1500" \
        > "$out/compile_torch_1500.log" 2>&1
    ;;
compile-small)  # the JSON and logs of the profile and the sweep, then the tests' log
    start=$SECONDS
    $py benchmarks/profile_compiled_forward.py --views 32 --warm-views 1 2 \
        --variants "triton eager" "triton compiled" "torch compiled" \
        --out "$out/profile_compiled_forward_h200_32_after_1_2.json" > "$out/profile_compiled_forward.log" 2>&1
    $py benchmarks/scale_views.py --backend triton torch --size 224 --points 1 16 32 100 --compile --repeats 3 \
        --cuda-graph-max-views 0 --out-dir "$out/sweep" > "$out/compile_sweep.log" 2>&1
    TEST_FILES="tests/test_gpu_compile.py tests/test_upsample.py" gpu_tests $(( ${CALL_SECONDS:-560} - (SECONDS - start) ))
    ;;
profile)
    for backend in triton torch; do
        $py benchmarks/profile_train_step.py --backend "$backend" --views 32 --size 512 \
            --out "$out/profile_train_${backend}_512_32.json" > "$out/profile_train_$backend.log" 2>&1
    done
    ;;
bench)  # then the GPU tests for what is left of the call
    start=$SECONDS
    $py benchmarks/bench_train.py --out "$out/train_h200.json" ${BENCH_ITEMS:-} > "$out/bench_train.log" 2>&1
    gpu_tests $(( ${CALL_SECONDS:-560} - (SECONDS - start) ))
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
