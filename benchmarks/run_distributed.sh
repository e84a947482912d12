#!/usr/bin/env bash
# Runs bench_distributed for R = 1, 2, 4 ranks and every scheme, then prints a markdown
# table: time per step, tokens/s, and per-rank peaks (the largest rank's) against R = 1.
#
#   benchmarks/run_distributed.sh [RESULTS_DIR]          (default build/bench-results)
#
# Environment: BUILD_DIR (default build), MODEL (diagonal | mamba, default diagonal),
# T (default 8192), BATCH (default 4), STEPS (default 1), OMP_NUM_THREADS (default 1 per
# rank). More ranks than cores are oversubscribed: on a small machine the times then
# measure the extra work and the transfers, not a speed-up; the memory figures hold.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${BUILD_DIR:-build}"
results="${1:-build/bench-results}"
model="${MODEL:-diagonal}"
T="${T:-8192}"
batch="${BATCH:-4}"
steps="${STEPS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
exe="$build/benchmarks/bench_distributed"
[[ -x "$exe" ]] || { echo "run_distributed.sh: $exe not built (cmake --build $build --target bench_distributed)" >&2; exit 2; }
mkdir -p "$results"
out="$results/distributed.jsonl"
: > "$out"

run() {  # ranks scheme
  mpiexec -n "$1" --oversubscribe --allow-run-as-root "$exe" --scheme "$2" --model "$model" --T "$T" \
    --batch "$batch" --steps "$steps" --out "$out" > /dev/null
}
run 1 none
for R in 2 4; do
  for scheme in data layer sequence; do run "$R" "$scheme"; done
done

python3 - "$out" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = next(r for r in rows if r["scheme"] == "none")
mib = lambda b: b / 2**20
print(f"model {base['model']}, T {base['T']}, batch {base['batch']}, chunk {base['chunk']}, "
      f"{base['threads']} thread(s) per rank\n")
print("| scheme | R | s/step | tokens/s | peak MiB (max rank) | vs R=1 | activations MiB (max rank) | vs R=1 | resident MiB (max rank) | vs R=1 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    p, a, s = max(r["peak_bytes"]), max(r["activation_peak_bytes"]), max(r["resident_bytes"])
    bp, ba, bs = max(base["peak_bytes"]), max(base["activation_peak_bytes"]), max(base["resident_bytes"])
    print(f"| {r['scheme']} | {r['ranks']} | {r['seconds_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
          f"{mib(p):.1f} | {p/bp:.2f} | {mib(a):.1f} | {a/ba:.2f} | {mib(s):.1f} | {s/bs:.2f} |")
EOF
