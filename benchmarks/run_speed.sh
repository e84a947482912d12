#!/usr/bin/env bash
# The speed comparison of benchmarks/RESULTS.md ("CPU: scan paths against PyTorch"), in one
# run so that every ratio comes from the same machine state:
#
#   benchmarks/run_speed.sh [RESULTS_DIR]          (default build/speed-results)
#
#   1. bench_peak: SGEMM GFLOP/s and memcpy GB/s of this build (the roofline denominators)
#   2. bench_throughput, the DiagonalSSM benchmark model, Adjoint, T = $DIAG_T, each scan path
#   3. bench_throughput --model mamba (Mamba D=256 K=4), Adjoint, T = $MAMBA_T, each scan path
#   4. bench_memory --model mamba-130m --vocab 50280, Adjoint, T = $M130_T (its tokens/s)
#   5. the PyTorch references (benchmarks/reference/{diagonal_ssm,mamba}.py) on the same tokens
#   6. with BASE_BUILD=<build dir of an older commit>: its bench_throughput and bench_memory
#      on the same points (the "before" of a before/after)
#
# Environment: BUILD_DIR (default build/bench-release), BASE_BUILD, PYTHON (a python3 with
# torch; default /usr/bin/python3), OMP_NUM_THREADS (default 2), DIAG_T (default 4K,16K),
# MAMBA_T (default 1K,4K), M130_T (default 1K). Time it on a quiet machine (uptime); say
# which BLAS PyTorch uses (update-alternatives --display libblas.so.3-x86_64-linux-gnu).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build/bench-release}"
results="${1:-$root/build/speed-results}"
python="${PYTHON:-/usr/bin/python3}"
diag_t="${DIAG_T:-4K,16K}"
mamba_t="${MAMBA_T:-1K,4K}"
m130_t="${M130_T:-1K}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
mkdir -p "$results"
for bin in bench_peak bench_throughput bench_memory; do
  if [[ ! -x "$build/benchmarks/$bin" ]]; then
    echo "run_speed.sh: $build/benchmarks/$bin is missing; build it (cmake --build $build --target $bin)" >&2
    exit 1
  fi
done
uptime | tee "$results/uptime.txt"
b="$build/benchmarks"

"$b/bench_peak" --out "$results/peak.jsonl"
"$b/bench_throughput" --no-paper --strategies adjoint --T "$diag_t" --scan materialised,fused,structured \
  --out "$results/diagonal.jsonl"
"$b/bench_throughput" --no-paper --model mamba --strategies adjoint --T "$mamba_t" --scan materialised,fused \
  --out "$results/mamba.jsonl"
"$b/bench_memory" --model mamba-130m --vocab 50280 --strategies adjoint --T "$m130_t" --out "$results/mamba130m.jsonl"
"$python" "$root/benchmarks/reference/diagonal_ssm.py" --T "$diag_t" --threads "$OMP_NUM_THREADS" \
  | tee "$results/pytorch_diagonal.jsonl"
"$python" "$root/benchmarks/reference/mamba.py" --T "$mamba_t" --threads "$OMP_NUM_THREADS" \
  | tee "$results/pytorch_mamba.jsonl"
if [[ -n "${BASE_BUILD:-}" ]]; then
  "$BASE_BUILD/benchmarks/bench_throughput" --no-paper --strategies adjoint --T "$diag_t" \
    --out "$results/base_diagonal.jsonl"
  "$BASE_BUILD/benchmarks/bench_memory" --model mamba-130m --vocab 50280 --strategies adjoint --T "$m130_t" \
    --out "$results/base_mamba130m.jsonl"
fi
uptime | tee -a "$results/uptime.txt"
echo "run_speed.sh: JSON lines in $results"
