#!/usr/bin/env bash
# Runs the CPU benchmarks behind benchmarks/RESULTS.md and prints a markdown summary.
#
#   benchmarks/run_cpu.sh [--quick | --full] [RESULTS_DIR]      (default build/bench-results)
#
# Modes
#   --quick    smoke test (about a minute on 2 cores, for CI): tiny T, every code path.
#   (default)  the RESULTS.md set: memory at T = 1K..64K for Backprop, Checkpointed,
#              Adjoint, TruncatedAdjoint; throughput at 1K..16K; PaperAdjoint's O(T²) on a
#              small model; the PyTorch reference. Runs predicted (from the affine fit of the
#              runs before) to take more than MAX_RUN_SECONDS (default 300) or 3/4 of RAM
#              are skipped with a JSON line that carries the prediction.
#   --full     the issue's whole list with no time cap: memory up to 256K, one Adjoint step
#              at T = 1,048,576, throughput up to 256K. Hours at the current throughput.
#
# Environment: BUILD_DIR (default build/bench-release), PYTHON (a python3 with torch;
# default /usr/bin/python3 when it has torch), MAX_RUN_SECONDS, OMP_NUM_THREADS.
# Writes RESULTS_DIR/{memory,throughput,pytorch,gradient_check}.jsonl, summary.md, and the
# gradient dump in RESULTS_DIR/dump/.
set -euo pipefail

mode=standard
results=""
for arg in "$@"; do
  case "$arg" in
    --quick) mode=quick ;;
    --full) mode=full ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "run_cpu.sh: unknown flag $arg (see --help)" >&2; exit 2 ;;
    *) results="$arg" ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build/bench-release}"
results="${results:-$root/build/bench-results}"
max_run_seconds="${MAX_RUN_SECONDS:-300}"
mkdir -p "$results" "$results/dump"
results="$(cd "$results" && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
  for candidate in /usr/bin/python3 python3; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  echo "run_cpu.sh: no python3 with torch found; set PYTHON=/path/to/python3" >&2
  exit 1
fi

echo "== build (Release; the ISA of SSMX_ARCH, native unless the build dir says otherwise) -> $build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSSMX_BUILD_TESTS=OFF -DSSMX_BUILD_EXAMPLES=OFF \
  -DSSMX_BUILD_BENCHMARKS=ON >/dev/null
cmake --build "$build" -j"$(nproc)" --target bench_memory bench_throughput
bench="$build/benchmarks"

start=$(date +%s)
case "$mode" in
  quick)
    mem_flags=(--T 128,256 --chunk 64 --window 128 --budget-gib 0.05 --max-T 1024)
    tp_flags=(--T 256 --strategies adjoint,truncated --chunk 64 --window 128 --paper-T 128,256)
    torch_flags=(--T 256 --warmup 0 --repeats 1)
    ;;
  standard)
    mem_flags=(--T 1K,4K,16K,64K --budget-gib 4 --max-T 64K --max-run-seconds "$max_run_seconds")
    tp_flags=(--T 1K,4K,16K --paper-T 512,1K,2K,4K --max-run-seconds "$max_run_seconds")
    torch_flags=(--T 1K,4K,16K)
    ;;
  full)
    mem_flags=(--T 1K,4K,16K,64K,256K --budget-gib 8 --max-T 1M --adjoint-1m)
    tp_flags=(--T 1K,4K,16K,64K,256K --paper-T 256,512,1K,2K,4K)
    torch_flags=(--T 1K,4K,16K,64K)
    ;;
esac

echo "== gradient cross-check (float64, PyTorch reference)"
"$bench/bench_throughput" --dump "$results/dump" >/dev/null
rm -f "$results/gradient_check.jsonl"
"$PYTHON" "$root/benchmarks/reference/compare.py" "$results/dump" --out "$results/gradient_check.jsonl"

echo "== bench_memory ${mem_flags[*]}"
"$bench/bench_memory" "${mem_flags[@]}" --out "$results/memory.jsonl"

echo "== bench_throughput ${tp_flags[*]}"
"$bench/bench_throughput" "${tp_flags[@]}" --out "$results/throughput.jsonl"

echo "== PyTorch reference ${torch_flags[*]}"
"$PYTHON" "$root/benchmarks/reference/diagonal_ssm.py" "${torch_flags[@]}" --threads 2 --out "$results/pytorch.jsonl"

elapsed=$(( $(date +%s) - start ))
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)"
blas="$("$PYTHON" -c "import torch,re; m=re.search(r'BLAS_INFO=(\w+)', torch.__config__.show()); print(m.group(1) if m else '?')")"

"$PYTHON" - "$results" "$mode" "$cpu" "$elapsed" "$blas" > "$results/summary.md" <<'PY'
import datetime, json, os, sys
res, mode, cpu, elapsed, blas = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def rd(n):
    p = os.path.join(res, n)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
mem, tp, pt, gc = rd("memory.jsonl"), rd("throughput.jsonl"), rd("pytorch.jsonl"), rd("gradient_check.jsonl")
MiB = 1 << 20
order = ["backprop", "checkpointed", "adjoint", "truncated"]
threads = next((r["threads"] for r in mem + tp if "threads" in r), "?")
print(f"Run {datetime.date.today().isoformat()} on {cpu or 'unknown CPU'}, {threads} OpenMP threads, "
      f"mode `{mode}`, {elapsed // 60} min {elapsed % 60} s. PyTorch {pt[0]['torch'] if pt else '-'} "
      f"(BLAS_INFO={blas}), {pt[0]['threads'] if pt else '-'} threads.\n")

steps = [r for r in mem if r.get("kind") in ("step", "skipped") and not r.get("budget_check")]
Ts = sorted({r["T"] for r in steps})
print("### Peak tracked host memory, one forward+backward step (MiB)\n")
print("Model<DiagonalSSM<float,256,16>,8>, vocab 256, batch 1; Adjoint chunk "
      f"{next((r['chunk'] for r in mem if 'chunk' in r), '?')}, Truncated window "
      f"{next((r['window'] for r in mem if 'window' in r), '?')}. *pred.* = predicted by the affine fit, not run.\n")
print("| T | " + " | ".join(order) + " | backprop / adjoint | checkpointed / adjoint |")
print("|---:|" + "---:|" * (len(order) + 2))
def peak(s, T):
    for r in steps:
        if r["strategy"] == s and r["T"] == T:
            if r["kind"] == "step":
                return r["peak_bytes"], ""
            return r["predicted_peak_bytes"], f" *pred., skipped: {r['reason']}*"
    return None, ""
for T in Ts:
    cells, vals = [], {}
    for s in order:
        v, note = peak(s, T)
        vals[s] = v
        cells.append("—" if v is None else f"{v / MiB:,.1f}{note}")
    ratio = lambda a: f"{vals[a] / vals['adjoint']:.1f}×" if vals.get(a) and vals.get("adjoint") else "—"
    print(f"| {T:,} | " + " | ".join(cells) + f" | {ratio('backprop')} | {ratio('checkpointed')} |")
print("\nTargets at T = 65,536: Adjoint ≥ 10× below Backprop and ≥ 3× below Checkpointed.\n")

bud = [r for r in mem if r.get("kind") == "budget"]
if bud:
    print(f"### Largest T within {bud[0]['budget_bytes'] / (1 << 30):.2f} GiB (affine fit of the peaks)\n")
    print("| strategy | bytes/token | intercept MiB | predicted max T | verified peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in bud:
        if "error" in r:
            print(f"| {r['strategy']} | — | — | — | {r['error']} |")
            continue
        v = r["verified_peak_bytes"]
        vs = "not run" if v is None else f"{v / MiB:,.1f} ({'fits' if r['fits'] else 'over'})"
        print(f"| {r['strategy']} | {r['bytes_per_token']:,.0f} | {r['intercept_bytes'] / MiB:,.1f} | "
              f"{r['predicted_max_T']:,} | {vs} |")
    print()

big = [r for r in mem if r.get("strategy") == "adjoint" and r["T"] == 1 << 20]
for r in big:
    if r["kind"] == "step":
        print(f"**Adjoint at T = 1,048,576**: one forward+backward step in {r['seconds']:.0f} s "
              f"({r['tokens_per_s']:.0f} tokens/s), peak {r['peak_bytes'] / (1 << 30):.2f} GiB tracked.\n")
    else:
        print(f"**Adjoint at T = 1,048,576**: skipped ({r['reason']}), predicted peak "
              f"{r['predicted_peak_bytes'] / (1 << 30):.2f} GiB.\n")

main = [r for r in tp if r["name"] == "throughput"]
if main:
    print("### Forward+backward throughput: tokens/s (µs per token)\n")
    tTs = sorted({r["T"] for r in main})
    print("| T | " + " | ".join(order) + " |")
    print("|---:|" + "---:|" * len(order))
    for T in tTs:
        cells = []
        for s in order:
            r = next((x for x in main if x["strategy"] == s and x["T"] == T), None)
            if r is None:
                cells.append("—")
            elif r.get("kind") == "skipped":
                cells.append(f"*skipped ({r['reason']}, pred. {r['predicted_seconds']:.0f} s)*")
            else:
                cells.append(f"{r['tokens_per_s']:,.0f} ({r['us_per_token']:,.0f})")
        print(f"| {T:,} | " + " | ".join(cells) + " |")
    print()

paper = [r for r in tp if r["name"] == "throughput_paper"]
if paper:
    print("### O(T) adjoint vs the paper's O(T²) double sum (Model<DiagonalSSM<float,64,16>,1>): µs per token\n")
    print("| T | adjoint | paper_adjoint (window 0) | max rel grad diff |")
    print("|---:|---:|---:|---:|")
    for T in sorted({r["T"] for r in paper}):
        a = next((r for r in paper if r["T"] == T and r["strategy"] == "adjoint"), {})
        p = next((r for r in paper if r["T"] == T and r["strategy"] == "paper_adjoint"), {})
        f = lambda r: "—" if not r else (f"*skipped ({r['reason']})*" if r.get("kind") == "skipped" else f"{r['us_per_token']:,.0f}")
        print(f"| {T:,} | {f(a)} | {f(p)} | {p.get('max_rel_grad_diff', float('nan')):.1e} |")
    print()

if pt:
    print("### ssmx vs PyTorch (same model, float32, same tokens, 2 threads): tokens/s\n")
    print("| T | ssmx adjoint | PyTorch (autograd, chunked scan) | ssmx / PyTorch |")
    print("|---:|---:|---:|---:|")
    for r in pt:
        s = next((x for x in main if x["strategy"] == "adjoint" and x["T"] == r["T"] and x.get("kind") != "skipped"), None)
        if s is None:
            s = next((x for x in mem if x.get("strategy") == "adjoint" and x["T"] == r["T"] and x.get("kind") == "step"), None)
        ss = f"{s['tokens_per_s']:,.0f}" if s else "—"
        ratio = f"{s['tokens_per_s'] / r['tokens_per_s']:.2f}×" if s else "—"
        print(f"| {r['T']:,} | {ss} | {r['tokens_per_s']:,.0f} | {ratio} |")
    print(f"\nPyTorch's BLAS here: {blas} (`generic` is the reference netlib BLAS).\n")

if gc:
    print(f"### Gradient cross-check against PyTorch, float64 (P={gc[0]['P']}, N={gc[0]['N']}, K={gc[0]['K']}, "
          f"vocab {gc[0]['vocab']}, T={gc[0]['T']})\n")
    print("| strategy | loss rel err | max rel grad err | worst parameter |")
    print("|---|---:|---:|---|")
    for r in gc:
        print(f"| {r['strategy']} {json.dumps(r['options']) if r['options'] else ''} | {r['loss_rel_err']:.1e} | "
              f"{r['max_rel_grad_err']:.1e} | {r['worst_parameter']} |")
    print(f"\nReference chunked scan vs a sequential loop: {gc[0]['reference_scan_err']:.1e}.")
PY

echo
cat "$results/summary.md"
echo
echo "== results in $results (summary.md, *.jsonl); $elapsed s"
