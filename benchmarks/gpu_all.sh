#!/usr/bin/env bash
# Every measurement of a release, on one machine with 4 GPUs (the device tool's nvidia-h100-x4), in three phases
# that each fit one 10-minute call:
#
#   bash benchmarks/gpu_all.sh single     # 4 one-GPU jobs side by side: tests | 224 sweep | 512 sweep | kernels
#   bash benchmarks/gpu_all.sh parallel   # context parallelism at 224: 1, 2, 4 GPUs; attention microbenchmarks
#   bash benchmarks/gpu_all.sh parallel512  # 1500 views at 512x384 on 2 and 4 GPUs
#
# Results land in $OUT (or benchmarks/results/run) as results.tgz; unpack into benchmarks/results/ and commit.
# The one-GPU jobs share the host but not their GPU; each timing is a same-process comparison (ours vs
# stock vs the official model at the same points), so the ratios hold. NVLink multicast stays off.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-benchmarks/results/run}"
work="$(mktemp -d)"
phase="${1:?usage: gpu_all.sh single|parallel|parallel512}"
scale=(benchmarks/scale_views.py --backend triton --cuda-graph-max-views 0 --outputs-to-cpu
       --single-run-above 1000 --repeats 1)

case "$phase" in
single)
    for job in "0 scale224" "1 scale512" "2 kernels pytest_benchmarks cameras environment" "3 tests"; do
        set -- $job
        gpu=$1; shift
        CUDA_VISIBLE_DEVICES=$gpu python benchmarks/gpu_check.py --out "$work/$1" --steps "$@" > "$work/$1.log" 2>&1 &
    done
    wait
    ;;
parallel)
    python -m pytest -q -rfEs -m gpu tests/test_gpu_model.py -k second_gpu > "$work/two_gpu_test.log" 2>&1
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --out "$work/context_parallel_p2.json" \
        > "$work/bench_cp_p2.log" 2>&1
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_context_parallel.py --out "$work/context_parallel_p4.json" \
        > "$work/bench_cp_p4.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 python "${scale[@]}" --size 224 --points 16 1500 3000 --out-dir "$work/p1" > "$work/p1.log" 2>&1
    for p in 2 4; do
        torchrun --standalone --nproc-per-node $p "${scale[@]}" --size 224 --points 16 1500 3000 \
            --out-dir "$work/p$p" > "$work/p$p.log" 2>&1
    done
    ;;
parallel224)  # the context-parallel part of "parallel" alone
    for p in 2 4; do
        torchrun --standalone --nproc-per-node $p "${scale[@]}" --size 224 --points 16 1500 3000 \
            --out-dir "$work/p$p" > "$work/p$p.log" 2>&1
    done
    ;;
parallel512)
    for p in 2 4; do
        torchrun --standalone --nproc-per-node $p "${scale[@]}" --size 512 --points 16 1500 \
            --out-dir "$work/p$p" > "$work/p${p}_512.log" 2>&1
    done
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
tail -n 40 "$work"/*.log "$work"/*/*.log 2>/dev/null | grep -v '^{' | tail -n 200
tar czf "$out/results_$phase.tgz" -C "$work" .
