#!/usr/bin/env bash
# Fuzzes the safetensors header and config.json parsers with libFuzzer for a bounded time:
#
#   tests/fuzz/run_fuzz.sh [WORK_DIR] [SECONDS_PER_TARGET]      (default build-fuzz, 45)
#
# Builds each tests/fuzz/fuzz_<target>.cpp with clang++ -fsanitize=fuzzer,address,undefined
# into WORK_DIR, then runs it from the seed corpus in tests/fuzz/corpus/<target> (read only;
# new inputs go to WORK_DIR/corpus-<target>). Fails on a crash, an escaped exception, a
# sanitizer report, an input that runs longer than 10 s or a memory blow-up; the input is
# kept as WORK_DIR/crash-* (replay it with the printed command).
# Needs clang and the fuzzer runtime (Debian: clang, libclang-rt-14-dev).
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-build-fuzz}"
seconds="${2:-45}"
cxx="${SSMX_FUZZ_CXX:-}"
if [[ -z "$cxx" ]]; then
  for c in clang++ clang++-14 clang++-15 clang++-16; do command -v "$c" > /dev/null && { cxx=$c; break; }; done
fi
[[ -n "$cxx" ]] || { echo "run_fuzz: no clang++ found (Debian: apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }
mkdir -p "$work"
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -I"$src/include" -isystem /usr/include/eigen3 -Wno-unknown-pragmas)
for target in safetensors config; do
  echo "== build fuzz_$target ($cxx)"
  "$cxx" "${flags[@]}" "$src/tests/fuzz/fuzz_$target.cpp" -o "$work/fuzz_$target"
done
status=0
for target in safetensors config; do
  corpus="$work/corpus-$target"
  mkdir -p "$corpus"
  echo "== fuzz_$target for ${seconds} s"
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$work/fuzz_$target" "$corpus" "$src/tests/fuzz/corpus/$target" -dict="$src/tests/fuzz/json.dict" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$work/" > "$work/fuzz_$target.log" 2>&1 || status=$?
  tail -n 15 "$work/fuzz_$target.log"
  if [[ $status -ne 0 ]]; then
    echo "run_fuzz: fuzz_$target failed (status $status); see $work/fuzz_$target.log and $work/crash-*" >&2
    echo "replay: $work/fuzz_$target $work/crash-*" >&2
    exit $status
  fi
done
echo "run_fuzz: no crash, hang or sanitizer report"
