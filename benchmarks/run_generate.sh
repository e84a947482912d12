#!/usr/bin/env bash
# The generation comparison of benchmarks/RESULTS.md ("CPU: generation against PyTorch's
# recurrent step"), in one run so that every ratio comes from the same machine state:
#
#   benchmarks/run_generate.sh [RESULTS_DIR]          (default build/generate-results)
#
#   1. bench_peak: memcpy GB/s of this build (a small batch's step reads every weight once)
#   2. bench_generate: Model::step for mamba-tiny and the Mamba-130m shape, batch $BATCH
#   3. benchmarks/reference/mamba.py --generate: PyTorch's recurrent step, same shapes,
#      tokens, batches and threads
#
# Environment: BUILD_DIR (default build), PYTHON (a python3 with torch; default
# /usr/bin/python3), OMP_NUM_THREADS (default 2), BATCH (default 1,8), TOKENS (default 128),
# PROMPT (default 64). Time it on a quiet machine (uptime).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
results="${1:-$root/build/generate-results}"
python="${PYTHON:-/usr/bin/python3}"
batch="${BATCH:-1,8}" tokens="${TOKENS:-128}" prompt="${PROMPT:-64}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
mkdir -p "$results"
for bin in bench_peak bench_generate; do
  if [[ ! -x "$build/benchmarks/$bin" ]]; then
    echo "run_generate.sh: $build/benchmarks/$bin is missing; build it (cmake --build $build --target $bin)" >&2
    exit 1
  fi
done
uptime | tee "$results/uptime.txt"
b="$build/benchmarks"
"$b/bench_peak" --out "$results/peak.jsonl"
"$b/bench_generate" --batch "$batch" --tokens "$tokens" --prompt "$prompt" --out "$results/ssmx.jsonl"
"$python" "$root/benchmarks/reference/mamba.py" --generate --D 64 --K 2 --R 4 --vocab 256 --batch "$batch" \
  --gen-tokens "$tokens" --prompt "$prompt" --threads "$OMP_NUM_THREADS" --out "$results/pytorch_tiny.jsonl"
"$python" "$root/benchmarks/reference/mamba.py" --generate --D 768 --K 24 --R 48 --vocab 50280 --batch "$batch" \
  --gen-tokens "$tokens" --prompt "$prompt" --threads "$OMP_NUM_THREADS" --out "$results/pytorch_130m.jsonl"
uptime | tee -a "$results/uptime.txt"
echo "run_generate.sh: JSON lines in $results"
