#!/usr/bin/env bash
# The GPU benchmarks of benchmarks/RESULTS.md, in one run on one GPU (H100 or H200), after
# the GPU tests (ctest -L gpu: the unit tests on the device, and compute-sanitizer's memcheck
# and racecheck where installed; their log is gpu_tests.log, a failure is reported and the
# benchmarks still run):
#   1. bench_scan_cuda       the scan kernels in bytes/s against a device-to-device copy
#   2. bench_model_cuda      forward+backward tokens/s and peak device memory per strategy
#                            against T (the benchmark model), then the largest T that trains
#                            in one step (--find-max) for the benchmark model and for the
#                            Mamba-130m-sized DiagonalSSM stack (d_model 768, 24 layers)
#   3. the PyTorch reference (benchmarks/reference/diagonal_ssm.py) on the same GPU, eager
#      and torch.compile, on the same model and tokens
# Every result is a JSON line under RESULTS_DIR; nvidia-smi's view of the device comes first.
#
#   benchmarks/run_gpu.sh [RESULTS_DIR]          (default build-gpu/bench-results)
#
# Environment: BUILD_DIR (default build-gpu; configured here with CUDA and Release),
# T_LIST (default 4K,16K,64K), MAX_T (default 16M), SKIP_TORCH=1 (no PyTorch runs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${BUILD_DIR:-build-gpu}"
results="${1:-$build/bench-results}"
t_list="${T_LIST:-4K,16K,64K}"
max_t="${MAX_T:-16M}"
mkdir -p "$results"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$results/device.csv"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DSSMX_ENABLE_CUDA=ON -DSSMX_BUILD_EXAMPLES=OFF \
  -DSSMX_TEST_CONSUMERS=OFF -DSSMX_TEST_HEADERS=OFF > "$results/configure.log"
cmake --build "$build" -j"$(nproc)" --target ssmx_tests_cuda bench_scan_cuda bench_model_cuda > "$results/build.log"

ctest --test-dir "$build" -L gpu --output-on-failure > "$results/gpu_tests.log" 2>&1 ||
  echo "GPU TESTS FAILED: see $results/gpu_tests.log" | tee "$results/gpu_tests.failed"
tail -n 3 "$results/gpu_tests.log"

"$build/benchmarks/bench_scan_cuda" --benchmark_format=json --benchmark_out="$results/scan_cuda.json" \
  --benchmark_out_format=json > /dev/null

model="$build/benchmarks/bench_model_cuda"
"$model" --model diagonal --T "$t_list" --strategies backprop,checkpointed,adjoint --out "$results/model_diagonal.jsonl"
"$model" --model diagonal --T 64K --find-max --max-T "$max_t" --strategies backprop,adjoint --repeats 0 \
  --out "$results/max_T_diagonal.jsonl"
"$model" --model diagonal-768 --T 4K --find-max --max-T "$max_t" --strategies backprop,adjoint --repeats 0 \
  --out "$results/max_T_diagonal_768.jsonl"

if [[ "${SKIP_TORCH:-0}" != 1 ]]; then
  ref=benchmarks/reference/diagonal_ssm.py
  python3 "$ref" --device cuda --T "$t_list" --out "$results/torch_eager.jsonl"
  python3 "$ref" --device cuda --compile --T "$t_list" --out "$results/torch_compile.jsonl" ||
    echo "torch.compile failed on this machine (see above); eager only" | tee "$results/torch_compile.failed"
fi
echo "results in $results"
