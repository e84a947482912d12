#!/usr/bin/env bash
# End-to-end tests of examples/train (registered by tests/trainer/CMakeLists.txt):
#
#   trainer_test.sh MODE TRAIN WORK SOURCE_DIR [ARGS...]
#
#   resume-recall | resume-text | resume-tokens
#       run A: 2N steps in one go; run B: stopped after step N + 1, its last checkpoint
#       (N + 1) deleted as if it crashed before saving, then --resume: B's metrics must hold
#       the same losses as A's, byte for byte, for every step.
#   sigint        SIGINT during a run: exit 0, a checkpoint, and --resume continues from it.
#   mismatch      --resume with a flag that differs from the saved config fails, names the
#                 flag and both values, and changes nothing on disk.
#   existing      a fresh run into a directory holding another run fails and changes nothing.
#   expect-error REGEX ARGS...
#                 `train ARGS...` run in an empty WORK must fail with a message matching
#                 REGEX and leave WORK empty.
set -euo pipefail
mode=$1 train=$2 work=$3 src=$4
shift 4
[ -f "$train" ] && [ -x "$train" ] || { echo "FAIL: $train is not an executable" >&2; exit 1; }
# WORK is wiped: only when it is empty or one of ours (the marker), never some other directory.
if [ -d "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -f "$work/.trainer_test" ]; then
  echo "FAIL: $work is not empty and not a trainer test directory; refusing to wipe it" >&2
  exit 1
fi
rm -rf "$work"
mkdir -p "$work"
cd "$work"
touch .trainer_test
export OMP_NUM_THREADS=1  # tiny models: threads only add overhead (and contention on busy CI)

fail() { echo "FAIL: $*" >&2; exit 1; }
# "step loss" of every train line of a metrics file.
losses() { grep '"type":"train"' "$1" | sed -E 's/^\{"type":"train","step":([0-9]+),"loss":([^,]+),.*$/\1 \2/'; }
sum() { find "$@" -type f | sort | xargs md5sum; }  # every file under the given paths

le32() {
  local h
  for s in 0 8 16 24; do printf -v h '%02x' $((($1 >> s) & 255)); printf "\\x$h"; done
}
# The first $3 bytes of $1 as an llm.c uint16 token file $2 (one token per byte).
make_token_file() {
  local b h
  {
    le32 20240520; le32 1; le32 "$3"
    head -c $((1024 - 12)) /dev/zero
    head -c "$3" "$1" | od -An -v -tu1 | tr -s ' ' '\n' | while read -r b; do
      [ -n "$b" ] || continue
      printf -v h '%02x' "$b"
      printf "\\x$h\\x00"
    done
  } > "$2"
  [ "$(stat -c %s "$2")" -eq $((1024 + 2 * $3)) ] || fail "token file $2 has the wrong size"
}

resume_test() {  # N, then the flags of the run
  local n=$1
  shift
  local common=(--steps $((2 * n)) --checkpoint-every "$n" --keep-checkpoints 0 --eval-every 2 --print-every 1 "$@")
  "$train" --out A "${common[@]}" > A.log 2>&1 || { cat A.log; fail "run A failed"; }
  "$train" --out B "${common[@]}" --until $((n + 1)) > B1.log 2>&1 || { cat B1.log; fail "run B (first part) failed"; }
  # As if B had been killed after logging step N + 1 but before its checkpoint.
  rm -f B/checkpoints/latest "B/checkpoints/$(printf 'step_%08d.safetensors' $((n + 1)))"
  "$train" --out B --resume > B2.log 2>&1 || { cat B2.log; fail "run B (resumed) failed"; }
  cat B2.log
  grep -q "resuming from .*step_$(printf '%08d' "$n").safetensors at step $n (dropped 2 metrics lines" B2.log ||
    fail "B did not resume from step $n, dropping the lines of step $((n + 1))"
  [ "$(losses A/metrics.jsonl | wc -l)" -eq $((2 * n)) ] || fail "A logged $(losses A/metrics.jsonl | wc -l) steps"
  if ! diff <(losses A/metrics.jsonl) <(losses B/metrics.jsonl); then
    fail "the resumed run's losses differ from the uninterrupted run's"
  fi
  for f in summary.json config.json; do [ -s "B/$f" ] || fail "B/$f is missing"; done
  ls B/plot.* > /dev/null || fail "no plot written"
  echo "PASS: steps 1..$((2 * n)) have identical losses"
}

case "$mode" in
  resume-recall)
    resume_test 3 --data recall --context 64 --batch 2 --curriculum-start 16 --curriculum-steps 2 --eval-sequences 2
    ;;
  resume-text)
    resume_test 3 --data "text:$src/README.md" --model mamba-tiny --strategy truncated --window 16 --context 32 \
      --batch 2 --val-fraction 0.1 --eval-tokens 256
    ;;
  resume-tokens)
    make_token_file "$src/README.md" tokens.bin 4000
    # Documents are lines (--eot 10): many starts and carried rows in every batch.
    resume_test 3 --data tokens:tokens.bin --eot 10 --context 48 --batch 3 --optimizer sgd --lr 0.05 \
      --schedule constant --warmup 2 --val-fraction 0.1 --eval-tokens 256
    ;;
  sigint)
    "$train" --out R --data recall --context 64 --steps 100000 --eval-every 0 --checkpoint-every 0 > R1.log 2>&1 &
    pid=$!
    for _ in $(seq 300); do
      grep -q '"type":"train"' R/metrics.jsonl 2> /dev/null && break
      sleep 0.1
    done
    grep -q '"type":"train"' R/metrics.jsonl || { kill -9 $pid; fail "no step logged within 30 s"; }
    kill -INT $pid
    rc=0
    wait $pid || rc=$?
    cat R1.log
    [ $rc -eq 0 ] || fail "SIGINT: exit status $rc, expected 0"
    grep -q "stopped by signal 2 at step" R1.log || fail "no stop message"
    [ -f R/checkpoints/latest ] || fail "SIGINT: no checkpoint"
    grep -q '"stop_reason": "interrupted"' R/summary.json || fail "summary.json does not say interrupted"
    step=$(losses R/metrics.jsonl | tail -1 | cut -d' ' -f1)
    "$train" --out R --resume --until $((step + 2)) > R2.log 2>&1 || { cat R2.log; fail "resume after SIGINT failed"; }
    cat R2.log
    grep -q "at step $step" R2.log || fail "did not resume at step $step"
    [ "$(losses R/metrics.jsonl | tail -1 | cut -d' ' -f1)" -eq $((step + 2)) ] || fail "resumed run did not reach step $((step + 2))"
    echo "PASS"
    ;;
  mismatch)
    "$train" --out M --data recall --context 32 --steps 4 --until 2 --eval-every 0 > M1.log 2>&1 || { cat M1.log; fail "first run failed"; }
    before=$(sum M)
    rc=0
    "$train" --out M --resume --batch 3 > M2.log 2>&1 || rc=$?
    cat M2.log
    [ $rc -ne 0 ] || fail "a resume with a different --batch succeeded"
    grep -Eq -- "--batch 3 differs from the value the run was started with, 2 \(saved in M/checkpoints/step_00000002.safetensors\)" M2.log ||
      fail "the message does not name --batch and both values"
    rc=0
    "$train" --out M --resume --model mamba-tiny > M3.log 2>&1 || rc=$?
    cat M3.log
    [ $rc -ne 0 ] && grep -q -- '--model "mamba-tiny" differs .* "diagonal-small"' M3.log || fail "--model mismatch not reported"
    [ "$(sum M)" = "$before" ] || fail "a failed resume changed files"
    echo "PASS"
    ;;
  existing)
    "$train" --out E --data recall --context 32 --steps 2 --eval-every 0 > E1.log 2>&1 || { cat E1.log; fail "first run failed"; }
    before=$(sum E)
    rc=0
    "$train" --out E --data recall --context 32 --steps 2 > E2.log 2>&1 || rc=$?
    cat E2.log
    [ $rc -ne 0 ] || fail "a fresh run into an existing run's directory succeeded"
    grep -q "E already holds a run (E/metrics.jsonl exists)" E2.log || fail "unclear message"
    [ "$(sum E)" = "$before" ] || fail "the failed run changed files"
    echo "PASS"
    ;;
  expect-error)
    regex=$1
    shift
    rc=0
    "$train" "$@" > out.log 2>&1 || rc=$?
    cat out.log
    [ $rc -ne 0 ] || fail "train $* succeeded"
    grep -Eq -- "$regex" out.log || fail "the message does not match: $regex"
    [ -z "$(ls -A | grep -v '^out.log$' | grep -v '^.trainer_test$')" ] || fail "a failing run wrote files: $(ls -A)"
    echo "PASS"
    ;;
  *) fail "unknown mode $mode" ;;
esac
