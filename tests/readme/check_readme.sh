#!/usr/bin/env bash
# The README's code, checked so that it cannot drift (registered by tests/readme/CMakeLists.txt):
#
#   check_readme.sh cpp|cuda README SOURCE_DIR WORK CXX [NVCC] [MPICXX]
#       Every ```cpp block is compiled (-fsyntax-only), as the comment line just before
#       its fence says: <!-- check: compile --> (a whole translation unit, plain C++17),
#       <!-- check: cuda --> (by NVCC; skipped when there is none) or <!-- check: mpi -->
#       (by MPICXX; skipped when there is none), or <!-- check: excerpt FILE --> (the block
#       is, line for line, part of FILE, a source the build compiles). A block without such
#       a line fails. `cuda` checks the cuda blocks, `cpp` all others.
#   check_readme.sh sh README SOURCE_DIR WORK BUILD_DIR
#       Every ```sh block, in order, as a user on a fresh clone would run it, without
#       running the long jobs: `bash -n` parses it; `cmake --build D` and `cmake --install D`
#       need an earlier `cmake -S . -B D` (or run_main.sh, which configures build/); a
#       directory configured twice must get the same SSMX_BUILD_* options both times; every
#       --target exists (in BUILD_DIR, a build of this tree) and is not switched off by the
#       options D was configured with (-DSSMX_BUILD_EXAMPLES=OFF); a program D/examples/P
#       needs an earlier build of P in D; every --flag given to a program (also through
#       mpirun and run_main.sh) is one its --help lists; scripts named exist.
set -euo pipefail
kind=$1 readme=$2 src=$3 work=$4
shift 4
fail() { echo "FAIL: $*" >&2; exit 1; }
[ -f "$readme" ] || fail "$readme does not exist"
rm -rf "$work"
mkdir -p "$work"

# Blocks of language $1 into $work/NN.$1, the check line's mode into $work/NN.$1.mode, and
# the README line of the fence into $work/NN.$1.line.
extract() {
  awk -v lang="$1" -v work="$work" '
  /^<!-- check: [a-z-]+( [^ ]+)? -->$/ { mode = $3 (NF == 5 ? " " $4 : ""); next }
  /^```/ {
    if (inside) { inside = 0; close(f); mode = ""; next }
    inside = 1; tag = substr($0, 4)
    if (tag == lang) { n++; f = sprintf("%s/%02d.%s", work, n, lang)
      printf "" > f; print (mode == "" ? "none" : mode) > (f ".mode"); print NR > (f ".line") }
    else f = ""
    mode = ""; next
  }
  inside && f != "" { print > f }
  !inside && !/^[[:space:]]*$/ { mode = "" }
' "$readme"
}

if [ "$kind" = cpp ] || [ "$kind" = cuda ]; then
  cxx=$1 nvcc=${2:-} mpicxx=${3:-}
  extract cpp
  flags=(-std=c++17 -fsyntax-only -I "$src/include" -I /usr/include/eigen3 -fopenmp)
  n=0 skipped=0
  for f in "$work"/*.cpp; do
    [ -e "$f" ] || fail "no cpp block in $readme"
    mode=$(cat "$f.mode") line=$(cat "$f.line")
    # `cuda` checks the cuda blocks only (nvcc is slow: a test of its own); `cpp` the others.
    if [ "$kind" = cuda ] && [ "$mode" != cuda ]; then continue; fi
    if [ "$kind" = cpp ] && [ "$mode" = cuda ]; then continue; fi
    case "$mode" in
      compile) "$cxx" "${flags[@]}" -x c++ "$f" || fail "the cpp block at $readme:$line does not compile" ;;
      cuda)
        if [ -z "$nvcc" ]; then echo "skipped: the cuda block at $readme:$line (no nvcc)"; skipped=$((skipped + 1)); continue; fi
        "$nvcc" -std=c++17 -x cu -I "$src/include" -I /usr/include/eigen3 -c "$f" -o "$f.o" ||
          fail "the cuda block at $readme:$line does not compile" ;;
      mpi)
        if [ -z "$mpicxx" ]; then echo "skipped: the mpi block at $readme:$line (no MPI)"; skipped=$((skipped + 1)); continue; fi
        "$mpicxx" "${flags[@]}" -x c++ "$f" || fail "the mpi block at $readme:$line does not compile" ;;
      excerpt\ *)
        file=$src/${mode#excerpt }
        [ -f "$file" ] || fail "the cpp block at $readme:$line is an excerpt of ${mode#excerpt }, which does not exist"
        python3 -c 'import sys; sys.exit(0 if open(sys.argv[1]).read() in open(sys.argv[2]).read() else 1)' "$f" "$file" ||
          fail "the cpp block at $readme:$line is not, line for line, in ${mode#excerpt } (which the build compiles)" ;;
      *) fail "the cpp block at $readme:$line has no '<!-- check: compile|cuda|mpi|excerpt FILE -->' line before its fence" ;;
    esac
    [[ $mode == excerpt* ]] && echo "ok: the cpp block at $readme:$line is in ${mode#excerpt }" || echo "ok: the $mode block at $readme:$line compiles"
    n=$((n + 1))
  done
  [ "$kind" = cpp ] || [ $((n + skipped)) -gt 0 ] || fail "no cuda block in $readme"
  echo "PASS: $n $kind blocks compile ($skipped skipped)"
  exit 0
fi

[ "$kind" = sh ] || fail "unknown kind $kind (cpp or sh)"
build=$1
extract sh
if [ -f "$build/build.ninja" ]; then
  targets=$(ninja -C "$build" -t targets all 2> /dev/null | sed -nE 's/^([A-Za-z0-9_.-]+): .*/\1/p')
else
  targets=$(cmake --build "$build" --target help 2> /dev/null | sed -nE 's/^\.\.\. ([A-Za-z0-9_.-]+).*/\1/p')
fi
[ -n "$targets" ] || fail "cannot list the targets of $build (cmake --build $build --target help)"
declare -A configured=() examples_off=() built=()
# `--flag` words of a command line after the program, checked against the program's --help.
check_flags() {  # program (in $build/examples), where, words...
  local prog=$1 where=$2 help w
  shift 2
  [ -x "$build/examples/$prog" ] || fail "$where: $prog is not built in $build, cannot check its flags"
  help=$("$build/examples/$prog" --help 2>&1) || true
  for w in "$@"; do
    [[ $w == --* ]] || continue
    w=${w%%=*}
    grep -q -- "^ *$w[ ,]\|^ *$w\$" <<< "$help" || fail "$where: $prog has no flag $w"
  done
}
n=0
for f in "$work"/*.sh; do
  [ -e "$f" ] || fail "no sh block in $readme"
  line=$(cat "$f.line")
  bash -n "$f" || fail "the sh block at $readme:$line does not parse"
  # Logical lines: continuations joined, comments dropped.
  while IFS= read -r cmd; do
    read -r -a w <<< "$cmd"
    [ ${#w[@]} -gt 0 ] || continue
    where="$readme:$line: $cmd"
    if [ "${w[0]}" = cmake ] && [ "${w[1]:-}" = -S ]; then
      [ "${w[3]:-}" = -B ] || fail "$where: write cmake -S . -B DIR"
      d=${w[4]}
      off=$(printf '%s\n' "${w[@]}" | grep -E '^-DSSMX_BUILD_[A-Z]+=OFF$' | sort | tr '\n' ' ' || true)
      # Each recipe its own build directory: configuring one again with other options
      # breaks the recipe that configured it first (its targets disappear).
      [ -z "${configured[$d]:-}" ] || [ "${configured[$d]}" = "options:$off" ] ||
        fail "$where: $d is configured again with other options than before (${configured[$d]#options:}, now ${off:-the defaults}): give each recipe its own build directory"
      configured[$d]="options:$off"
      [[ " ${w[*]} " == *" -DSSMX_BUILD_EXAMPLES=OFF "* ]] && examples_off[$d]=1 || examples_off[$d]=0
    elif [ "${w[0]}" = cmake ] && [ "${w[1]:-}" = --build ]; then
      d=${w[2]}
      [ -n "${configured[$d]:-}" ] || fail "$where: $d is built before any block configures it (cmake -S . -B $d)"
      for ((i = 3; i < ${#w[@]}; i++)); do
        [ "${w[i]}" = --target ] || continue
        t=${w[i + 1]:-}
        grep -qx -- "$t" <<< "$targets" || fail "$where: no target $t"
        if [ -f "$src/examples/$t.cpp" ] && [ "${examples_off[$d]}" = 1 ]; then
          fail "$where: $d was configured with -DSSMX_BUILD_EXAMPLES=OFF, so it has no target $t"
        fi
        built[$d/examples/$t]=1
      done
    elif [ "${w[0]}" = cmake ] && [ "${w[1]:-}" = --install ]; then
      [ -n "${configured[${w[2]}]:-}" ] || fail "$where: ${w[2]} is installed before any block configures it"
    elif [ "${w[0]}" = bash ]; then
      [ -f "$src/${w[1]}" ] || fail "$where: no script ${w[1]}"
      if [ "${w[1]}" = examples/run_main.sh ]; then
        [ -z "${configured[build]:-}" ] || [ "${configured[build]}" = "options:" ] ||
          fail "$where: run_main.sh needs build/ with the examples, but an earlier block configured it with ${configured[build]#options:}"
        configured[build]="options:" examples_off[build]=0 built[build/examples/train_recall]=1
        check_flags train_recall "$where" "${w[@]:2}"
      fi
    else
      for ((i = 0; i < ${#w[@]}; i++)); do  # a program of this project, maybe under mpirun
        [[ ${w[i]} == */examples/* ]] || continue
        [ -n "${built[${w[i]}]:-}" ] || fail "$where: ${w[i]} is run before any block builds it (cmake --build ${w[i]%%/examples/*} --target ${w[i]##*/})"
        check_flags "${w[i]##*/}" "$where" "${w[@]:i+1}"
        break
      done
    fi
  done < <(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$f" | sed -E 's/(^|[[:space:]])#.*$//')
  echo "ok: the sh block at $readme:$line"
  n=$((n + 1))
done
echo "PASS: $n sh blocks checked in order"
