#!/usr/bin/env bash
# End-to-end tests of examples/train (registered by tests/trainer/CMakeLists.txt):
#
#   trainer_test.sh MODE TRAIN WORK SOURCE_DIR [ARGS...]
#
#   resume-recall | resume-text [MODEL] | resume-tokens | resume-custom (TRAIN: train_custom)
#       run A: 2N steps in one go; run B: stopped after step N + 1, its last checkpoint
#       (N + 1) deleted as if it crashed before saving, then --resume: B's metrics must hold
#       the same losses as A's, byte for byte, for every step.
#   sigint        SIGINT during a run: exit 0, a checkpoint, and --resume continues from it.
#   mismatch      --resume with a flag that differs from the saved config fails, names the
#                 flag and both values, and changes nothing on disk.
#   existing      a fresh run into a directory holding another run fails and changes nothing.
#   help REGEX    `train --help` exits 0, matches REGEX (newlines as spaces), shows defaults.
#   messages      a token file without the default --eot token: a warning; step 1 runs at
#                 lr / warmup, not 0; summary.json's tokens are the metrics lines' sum.
#   expect-error REGEX ARGS...
#                 `train ARGS...` run in an empty WORK must fail with a message matching
#                 REGEX and leave WORK empty.
#   bad-input SETUP CODE REGEX ARGS...
#                 WORK prepared by SETUP (below), then `train ARGS...` must exit with CODE,
#                 print a message matching REGEX and change no file in WORK.
#   kill-resume   a checkpointing run killed (SIGKILL) at 20 random moments, each time
#                 continued (--resume, or the same command when no checkpoint exists
#                 yet); every continuation must start, and the end must equal an
#                 uninterrupted run: parameters, optimiser state and carried state bit for
#                 bit, and one metrics line per step with the same losses.
#   nonfinite     a run whose loss turns non-finite after some steps: exit 1 naming the
#                 step, the last good state saved (equal to a run stopped there on purpose)
#                 and resumable.
#   unsaved-start a run that stopped before its first checkpoint (files, no checkpoint):
#                 --resume says to start afresh and changes nothing; the same command then
#                 starts afresh over it and gives the same losses as a clean run.
#   first-step-oom out of memory in the first step (ulimit -v): exit 1, and the run's
#                 files are removed again (WORK as before); skipped under AddressSanitizer.
#   samples       --sample-every: samples.jsonl holds a line per sample that parses, with the
#                 stated prompt (the first 32 held-out bytes); a run killed between a sample
#                 and its checkpoint, then resumed, ends with the same file byte for byte.
#   eval-data     --eval-data: summary.json's loss over a file shorter than one window equals
#                 the loss in windows of 7 tokens (the state carried); perplexity = exp(loss),
#                 bits per byte = loss / ln 2; a token file of the same bytes gives the same loss.
#   generate GENERATE
#                 GENERATE --run on a run trained here: the number of tokens asked for, greedy
#                 and seeded output reproducible, different seeds and --batch sequences
#                 different, --stop, text output, the tokens/s and memory line.
# (bad-input also takes GENERATE as TRAIN, for generate's own bad input.)
#
# Several processes (--dist): these modes take the mpiexec command line first, up to `--`
# (the executable, its process-count flag, then flags such as --oversubscribe); most run
# 2 ranks:
#
#   dist-data | dist-layer | dist-sequence  -- [MODEL]   (MODEL: mamba-tiny by default)
#       run S: one process; run A: 2N steps on 2 ranks; run B: 2 ranks stopped after step
#       N + 1, rank 0's part of checkpoint N + 1 and `latest` deleted (as if the job died
#       while saving: the other ranks' parts stay), then resumed on 2 ranks. B's losses
#       must equal A's bit for bit; A's (train and eval) must equal S's to 1e-5 relative.
#   dist-sigint   SIGINT to one rank: every rank stops at the same step, a checkpoint, exit
#                 0, and the run resumes from it.
#   dist-killed   one rank killed (SIGKILL) with mpiexec told not to end the job: the other
#                 fails within SSMX_DIST_TIMEOUT (5 s here), naming the timeout; the last
#                 checkpoint stays valid (the run resumes from it).
#   dist-mismatch ranks given different flags (--seed) fail on start, naming the flag and
#                 writing nothing; --resume with another number of ranks or another --dist
#                 fails naming both values and changes nothing.
#   dist-expect-error RANKS LINES REGEX ARGS...
#                 as expect-error, under mpiexec with RANKS ranks: a failure at set-up,
#                 agreed by the ranks: LINES lines `train: error: ...` (1 when every rank
#                 failed alike), and the job ends without MPI_Abort.
#   dist-layer-eval -- GENERATE
#                 --eval-data under --dist layer (the ranks evaluate each window together)
#                 gives one process's loss; GENERATE --run reads the run's checkpoint parts
#                 and continues a prompt as it does from the one-process run.
set -euo pipefail
mode=$1 train=$2 work=$3 src=$4
shift 4
mpi=()  # dist modes: the mpiexec command line
if [[ $mode == dist-* ]]; then
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi+=("$1"); shift; done
  [ $# -gt 0 ] || { echo "FAIL: $mode: expected the mpiexec command line, then --" >&2; exit 1; }
  shift
  [ ${#mpi[@]} -ge 2 ] || { echo "FAIL: $mode: the mpiexec command line needs the executable and its -np flag" >&2; exit 1; }
fi
# `np N ARGS...`: train ARGS... on N ranks.
np() { local n=$1; shift; "${mpi[0]}" "${mpi[1]}" "$n" "${mpi[@]:2}" "$train" "$@"; }
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
export OMP_WAIT_POLICY=passive  # several ranks share the cores: no spinning

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

# The loss of every train and eval line of a metrics file: "type step loss".
all_losses() { sed -nE 's/^\{"type":"(train|eval)","step":([0-9]+),"loss":([^,]+),.*$/\1 \2 \3/p' "$1"; }

# The pid of rank $2 among the train processes started under $1 (mpiexec, or a shell running it).
descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done; }
rank_pid() {
  local p ranks=()
  for p in $(descendants "$1"); do
    [ "$(cat "/proc/$p/comm" 2> /dev/null)" = "$(basename "$train" | cut -c1-15)" ] || continue
    ranks+=("$p")
    tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && { echo "$p"; return; }
  done
  [ ${#ranks[@]} -gt "$2" ] && echo "${ranks[$2]}"  # another MPI: the ranks in the order they were started
}

# Waits (up to 30 s) until metrics file $1 has a train line for a step >= $2.
wait_for_step() {
  for _ in $(seq 300); do
    [ "$(losses "$1" 2> /dev/null | tail -1 | cut -d' ' -f1)" -ge "$2" ] 2> /dev/null && return 0
    sleep 0.1
  done
  return 1
}

dist_test() {  # the scheme, then the flags of the run
  local scheme=$1 n=3
  shift
  local common=(--steps $((2 * n)) --checkpoint-every "$n" --keep-checkpoints 0 --eval-every 2 --print-every 1 "$@")
  "$train" --out S "${common[@]}" > S.log 2>&1 || { cat S.log; fail "run S (one process) failed"; }
  np 2 --dist "$scheme" --out A "${common[@]}" > A.log 2>&1 || { cat A.log; fail "run A (2 ranks) failed"; }
  np 2 --dist "$scheme" --out B "${common[@]}" --until $((n + 1)) > B1.log 2>&1 ||
    { cat B1.log; fail "run B (2 ranks, first part) failed"; }
  cat A.log
  local ckpt=B/checkpoints/$(printf 'step_%08d' $((n + 1)))
  if [ "$scheme" = layer ]; then
    [ -f "$ckpt.rank-1-of-2.safetensors" ] || fail "--dist layer: no $ckpt.rank-1-of-2.safetensors"
  else
    [ -z "$(ls B/checkpoints | grep rank-)" ] || fail "--dist $scheme wrote per-rank files: $(ls B/checkpoints)"
  fi
  # As if the job had died after the other ranks saved step N + 1 but before rank 0 did.
  rm -f B/checkpoints/latest "$ckpt.safetensors"
  np 2 --out B --resume > B2.log 2>&1 || { cat B2.log; fail "run B (2 ranks, resumed) failed"; }
  cat B2.log
  grep -q "resuming from .*step_$(printf '%08d' "$n").safetensors at step $n (dropped 2 metrics lines" B2.log ||
    fail "B did not resume from step $n, dropping the lines of step $((n + 1))"
  grep -q "^dist: " B2.log || fail "the log does not say how the run is split"
  grep -Eq '"dist": "'"$scheme"'"' A/config.json && grep -Eq '"ranks": 2' A/config.json ||
    fail "A/config.json does not record --dist $scheme and 2 ranks"
  [ "$(losses A/metrics.jsonl | wc -l)" -eq $((2 * n)) ] || fail "A logged $(losses A/metrics.jsonl | wc -l) steps"
  diff <(losses A/metrics.jsonl) <(losses B/metrics.jsonl) ||
    fail "the resumed run's losses differ from the uninterrupted run's (2 ranks)"
  # Against one process: the same steps up to the rounding of sums taken in another order
  # (gradients summed over ranks, float32 throughout). Observed: 1e-7 relative after 6 AdamW
  # steps; 1e-5 leaves room for other compilers and CPUs, while a lost row, token or layer
  # changes the loss by 1e-3 or more.
  paste -d' ' <(all_losses S/metrics.jsonl) <(all_losses A/metrics.jsonl) | awk '
    { n++; if ($1 != $4 || $2 != $5) { print "FAIL: line " n ": " $1 " " $2 " vs " $4 " " $5; bad = 1; next }
      d = $3 - $6; if (d < 0) d = -d; s = $3 < 0 ? -$3 : $3
      if (d > 1e-5 * s) { printf "FAIL: %s step %d: loss %.9g on one process, %.9g on 2 ranks\n", $1, $2, $3, $6; bad = 1 }
      if (d > worst) worst = d / s }
    END { if (n != 9) { print "FAIL: " n " losses compared, expected 9"; bad = 1 }
          printf "largest relative difference from one process: %.3g\n", worst; exit bad }' ||
    fail "2 ranks (--dist $scheme) do not reproduce the one-process run"
  [ -s B/summary.json ] && grep -q '"ranks": 2' B/summary.json || fail "B/summary.json is missing or lacks the ranks"
  echo "PASS: --dist $scheme on 2 ranks: steps 1..$((2 * n)) as one process; resumed bit for bit"
}

# The data buffer (every tensor's bytes) of a safetensors file.
data_buffer() { local n; n=$(od -An -t u8 -N8 "$1" | tr -d ' '); tail -c +$((9 + n)) "$1"; }
# Its header without the fields that differ between identical runs (wall-clock time).
header_of() {
  local n; n=$(od -An -t u8 -N8 "$1" | tr -d ' ')
  head -c $((8 + n)) "$1" | tail -c "$n" | sed -E 's/"extra\.train_seconds":"[^"]*",?//; s/ *$//'
}
# Every entry under WORK with its type and, for regular files, its checksum (FIFOs are not read).
snapshot() {
  find . -mindepth 1 -printf '%y %p %l\n' | sort
  find . -type f -print0 | sort -z | xargs -0 -r md5sum
}

# bad-input setups: what WORK holds before the command.
small_run() {
  "$train" --out "$1" --data recall --context 32 --steps 2 --eval-every 0 --checkpoint-every 0 > "$1.log" 2>&1 ||
    { cat "$1.log"; fail "setup: the run $1 failed"; }
}
setup() {
  case "$1" in
    none) ;;
    fifo) mkfifo pipe ;;
    devzero) ln -s /dev/zero zero ;;
    file) echo "not a directory" > notadir ;;
    tokens) make_token_file "$src/README.md" tokens.bin 600 ;;
    finished) small_run R ;;
    latest-garbage) small_run R; printf 'step_\033[2J../../etc/passwd\n' > R/checkpoints/latest ;;
    latest-devzero) small_run R; rm R/checkpoints/latest; ln -s /dev/zero R/checkpoints/latest ;;
    latest-missing) small_run R; echo step_00000099.safetensors > R/checkpoints/latest ;;
    checkpoint-truncated) small_run R; truncate -s 100 R/checkpoints/step_00000002.safetensors ;;
    empty-run) mkdir -p R/checkpoints ;;
    hf-wide)  # the fixture with a d_model no model of generate has
      mkdir W
      cp "$src/tests/data/mamba_tiny/model.safetensors" W/
      sed -e 's/"hidden_size": 16/"hidden_size": 24/' -e 's/"intermediate_size": 32/"intermediate_size": 48/' \
        "$src/tests/data/mamba_tiny/config.json" > W/config.json
      grep -q '"hidden_size": 24' W/config.json || fail "setup: hidden_size not replaced" ;;
    *) fail "unknown setup $1" ;;
  esac
}

case "$mode" in
  bad-input)
    what=$1 code=$2 regex=$3
    shift 3
    setup "$what"
    before=$(snapshot)
    rc=0
    timeout 60 "$train" "$@" > out.log 2>&1 || rc=$?
    cat out.log
    [ $rc -eq "$code" ] || fail "train $* exited with $rc, expected $code"
    grep -Eq -- "$regex" out.log || fail "the message does not match: $regex"
    [ "$(snapshot | grep -v ' ./out.log')" = "$(printf '%s\n' "$before" | grep -v ' ./out.log')" ] ||
      { diff <(printf '%s\n' "$before") <(snapshot) || true; fail "files in WORK changed"; }
    echo "PASS"
    ;;
  kill-resume)
    # mamba-tiny on text: the carried state and convolution halo, packed data, evaluations
    # and a checkpoint every 2 steps, so that kills land in steps, evaluations and saves.
    flags=(--data "text:$src/README.md" --model mamba-tiny --context 16 --batch 2 --steps 300 --checkpoint-every 2
           --keep-checkpoints 2 --eval-every 10 --val-fraction 0.1 --eval-tokens 64 --print-every 1000)
    now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
    t0=$(now_ms)
    "$train" --out A "${flags[@]}" > A.log 2>&1 || { cat A.log; fail "the uninterrupted run failed"; }
    t1=$(now_ms)
    "$train" --out A --resume > A2.log 2>&1 || { cat A2.log; fail "--resume of the finished run failed"; }
    t2=$(now_ms)
    # Kill moments up to the start-up time (measured by the resume that has nothing to do)
    # plus about 15 steps, so that kills land in the start, in steps, evaluations and saves,
    # whatever the speed of the build (a sanitizer build is many times slower).
    startup=$((t2 - t1)) per_step=$(((t1 - t0 - (t2 - t1)) / 300))
    [ $per_step -ge 1 ] || per_step=1
    window=$((startup + 15 * per_step))
    seed=${SSMX_KILL_SEED:-$RANDOM}
    RANDOM=$seed
    echo "start-up ${startup} ms, ${per_step} ms a step: kills within ${window} ms of each start, drawn with seed $seed" \
      "(SSMX_KILL_SEED=$seed repeats them)"
    continue_b() {  # the command that continues B: --resume, or the same command while nothing is saved
      if [ -f B/checkpoints/latest ] || ls B/checkpoints/step_*.safetensors > /dev/null 2>&1; then
        args=(--out B --resume)
      else
        args=(--out B "${flags[@]}")
      fi
    }
    kills=0 starts=0
    while [ $kills -lt 20 ] && [ $starts -lt 200 ]; do
      starts=$((starts + 1))
      continue_b
      "$train" "${args[@]}" > "B$starts.log" 2>&1 &
      pid=$!
      delay=$((RANDOM * 32768 + RANDOM))
      delay=$((delay % window))
      sleep "$((delay / 1000)).$(printf '%03d' $((delay % 1000)))"
      kill -9 $pid 2> /dev/null || true
      rc=0
      wait $pid || rc=$?
      if [ $rc -eq 137 ]; then
        kills=$((kills + 1))
      elif [ $rc -ne 0 ]; then
        cat "B$starts.log"
        fail "start $starts (${args[*]}) failed with status $rc after $kills kills"
      elif grep -q "nothing to do" "B$starts.log"; then
        fail "the run finished after $kills kills; make it longer"
      fi
    done
    [ $kills -eq 20 ] || fail "only $kills kills landed in $starts starts"
    continue_b
    "$train" "${args[@]}" > B-last.log 2>&1 || { cat B-last.log; fail "the last continuation failed"; }
    last=$(printf 'step_%08d.safetensors' 300)
    cmp <(data_buffer "A/checkpoints/$last") <(data_buffer "B/checkpoints/$last") ||
      fail "the final parameters, optimiser or carried state differ from the uninterrupted run's"
    [ "$(header_of "A/checkpoints/$last")" = "$(header_of "B/checkpoints/$last")" ] ||
      fail "the final checkpoint's metadata (data cursor, tokens, best eval) differs"
    [ "$(losses B/metrics.jsonl | cut -d' ' -f1 | tr '\n' ' ')" = "$(seq -s ' ' 1 300) " ] ||
      fail "B/metrics.jsonl does not hold one train line per step 1..300: $(losses B/metrics.jsonl | wc -l) lines"
    diff <(all_losses A/metrics.jsonl) <(all_losses B/metrics.jsonl) || fail "the losses differ from the uninterrupted run's"
    ls B/checkpoints | grep -q '\.tmp\.' && fail "temporary files left in B/checkpoints: $(ls B/checkpoints)"
    echo "PASS: $kills kills in $starts starts; the final state is bit-identical to the uninterrupted run's"
    ;;
  nonfinite)
    # SGD with a huge step: the loss is finite for 3 steps, then not.
    flags=(--data "text:$src/README.md" --model mamba-tiny --context 16 --batch 2 --steps 50 --optimizer sgd --lr 1000
           --clip 0 --warmup 0 --schedule constant --eval-every 0 --val-fraction 0 --checkpoint-every 0)
    rc=0
    "$train" --out N "${flags[@]}" > N.log 2>&1 || rc=$?
    cat N.log
    [ $rc -eq 1 ] || fail "exit status $rc, expected 1"
    # The step that fails depends on rounding (compiler, flags); it is at least the second.
    bad=$(sed -nE 's/^train: error: step ([0-9]+) failed: .*/\1/p' N.log)
    [ -n "$bad" ] && [ "$bad" -ge 2 ] || fail "the message does not name the failed step (after the first)"
    good=$((bad - 1))
    ckpt=$(printf 'step_%08d.safetensors' $good)
    grep -Eq "train: error: step $bad failed: .*(non-finite|not finite).*; the last good state, step $good, is saved in N/checkpoints/$ckpt" N.log ||
      fail "the message does not name the saved state"
    grep -q '"stop_reason": "failed"' N/summary.json || fail "summary.json does not say failed"
    "$train" --out G "${flags[@]}" --until $good > G.log 2>&1 || { cat G.log; fail "the run stopped at step $good failed"; }
    cmp <(data_buffer "N/checkpoints/$ckpt") <(data_buffer "G/checkpoints/$ckpt") || fail "the saved state is not that of step $good"
    [ "$(header_of "N/checkpoints/$ckpt")" = "$(header_of "G/checkpoints/$ckpt")" ] ||
      fail "the saved data cursor or metadata is not that of step $good"
    rc=0
    "$train" --out N --resume > N2.log 2>&1 || rc=$?
    cat N2.log
    grep -q "resuming from N/checkpoints/$ckpt at step $good" N2.log || fail "did not resume at step $good"
    [ $rc -eq 1 ] && grep -q "step $bad failed: .*; the checkpoint of step $good is the last good state" N2.log ||
      fail "the resumed run did not fail at step $bad again"
    echo "PASS"
    ;;
  unsaved-start)
    common=(--data recall --context 32 --steps 4 --eval-every 2 --checkpoint-every 0)
    "$train" --out C "${common[@]}" > C.log 2>&1 || { cat C.log; fail "the clean run failed"; }
    "$train" --out U "${common[@]}" > U1.log 2>&1 || { cat U1.log; fail "the first run failed"; }
    rm -r U/checkpoints  # as if it had been killed before its first checkpoint
    echo '{"type":"train","step":1,"lo' >> U/metrics.jsonl  # and torn a line
    before=$(snapshot)
    rc=0
    "$train" --out U --resume > U2.log 2>&1 || rc=$?
    cat U2.log
    [ $rc -eq 2 ] || fail "--resume of a run without a checkpoint: exit status $rc, expected 2"
    grep -q "the run in U stopped before its first checkpoint: run the same command without --resume" U2.log ||
      fail "--resume does not say how to restart"
    [ "$(snapshot | grep -v 'U2.log')" = "$(printf '%s\n' "$before" | grep -v 'U2.log')" ] || fail "--resume changed files"
    "$train" --out U "${common[@]}" > U3.log 2>&1 || { cat U3.log; fail "the same command over the unsaved start failed"; }
    cat U3.log
    grep -q "note: U holds the files of a run that stopped before its first checkpoint; starting afresh" U3.log ||
      fail "no note that the old files are replaced"
    diff <(all_losses C/metrics.jsonl) <(all_losses U/metrics.jsonl) || fail "the restarted run differs from a clean one"
    echo "PASS"
    ;;
  first-step-oom)
    if ldd "$train" 2> /dev/null | grep -q libasan; then
      echo "skipped: ulimit -v does not go with AddressSanitizer's shadow memory"
      exit 0
    fi
    rc=0
    (ulimit -v 2000000 && "$train" --out O --data recall --context 20000000 --eval-sequences 1 --steps 3 \
      --eval-every 0 > O.log 2>&1) || rc=$?
    cat O.log
    [ $rc -eq 1 ] || fail "exit status $rc, expected 1"
    grep -q "train: error: step 1 failed: out of memory" O.log || fail "no out-of-memory message naming the step"
    [ ! -e O ] || fail "the failed run left files: $(find O)"
    echo "PASS"
    ;;
  samples)
    common=(--model diagonal-small --data "text:$src/README.md" --context 32 --batch 2 --steps 4 --checkpoint-every 2
            --keep-checkpoints 0 --eval-every 0 --sample-every 2 --sample-tokens 8 --print-every 1)
    "$train" --out A "${common[@]}" > A.log 2>&1 || { cat A.log; fail "run A failed"; }
    cat A.log
    grep -q '^sample at step 2: "' A.log || fail "no sample printed at step 2"
    python3 - "$src/README.md" A/samples.jsonl A/summary.json << 'PY' || fail "A/samples.jsonl is not as stated"
import json, sys
data = open(sys.argv[1], "rb").read()
held_out = data[len(data) - int(len(data) * 0.05):]
lines = open(sys.argv[2]).read().splitlines()
steps = [json.loads(l)["step"] for l in lines]
assert steps == [2, 4], "steps %s, expected [2, 4]" % steps
for l in lines:
    j = json.loads(l)
    assert list(j) == ["step", "prompt", "sample", "prompt_ids", "sample_ids"], list(j)
    assert j["prompt_ids"] == list(held_out[:32]), "the prompt is not the first 32 held-out bytes"
    assert j["prompt"].replace("\ufffd", "") == held_out[:32].decode("utf-8", "replace").replace("\ufffd", ""), j["prompt"]
    assert len(j["sample_ids"]) == 8 and all(0 <= t < 256 for t in j["sample_ids"]), j["sample_ids"]
    # Bytes that are not UTF-8 become U+FFFD (how many per sequence is the encoder's choice).
    text = bytes(j["sample_ids"]).decode("utf-8", "replace")
    assert j["sample"].replace("\ufffd", "") == text.replace("\ufffd", ""), (j["sample"], j["sample_ids"])
assert json.load(open(sys.argv[3]))["samples"] == "A/samples.jsonl"
print("samples.jsonl: %d lines as stated" % len(lines))
PY
    "$train" --out B "${common[@]}" --until 3 > B1.log 2>&1 || { cat B1.log; fail "run B (first part) failed"; }
    [ "$(wc -l < B/samples.jsonl)" -eq 2 ] || fail "B/samples.jsonl should hold steps 2 and 3 (the end of the invocation)"
    # As if B had been killed after sampling at step 3 but before its checkpoint.
    rm -f B/checkpoints/latest B/checkpoints/step_00000003.safetensors
    "$train" --out B --resume > B2.log 2>&1 || { cat B2.log; fail "run B (resumed) failed"; }
    cmp A/samples.jsonl B/samples.jsonl || { diff A/samples.jsonl B/samples.jsonl; fail "the resumed run's samples differ"; }
    echo "PASS: samples.jsonl parses, and a resumed run keeps one line per sample, as an uninterrupted run"
    ;;
  eval-data)
    head -c 3000 "$src/README.md" > eval.txt
    make_token_file eval.txt eval.bin 3000
    common=(--model diagonal-small --data "text:$src/README.md" --context 32 --batch 2 --steps 3 --eval-every 2
            --eval-tokens 100000 --checkpoint-every 0 --print-every 1)
    "$train" --out W1 "${common[@]}" --eval-data text:eval.txt --eval-window 100000 > W1.log 2>&1 ||
      { cat W1.log; fail "run W1 failed"; }
    "$train" --out W2 "${common[@]}" --eval-data text:eval.txt --eval-window 7 > W2.log 2>&1 ||
      { cat W2.log; fail "run W2 failed"; }
    "$train" --out W3 "${common[@]}" --eval-data tokens:eval.bin --eval-window 100 > W3.log 2>&1 ||
      { cat W3.log; fail "run W3 failed"; }
    cat W2.log
    grep -Eq "^eval data text:eval.txt at step 3: loss [0-9.]+  perplexity [0-9.]+  bits/byte [0-9.]+  \(2999 tokens\)" W2.log ||
      fail "the summary lines do not report the --eval-data numbers"
    grep -q '"type":"eval_data","step":2,' W2/metrics.jsonl || fail "no eval_data metrics line at the evaluation of step 2"
    python3 - W1/summary.json W2/summary.json W3/summary.json << 'PY' || fail "summary.json's eval_data is wrong"
import json, math, sys
one, windows, tokens = (json.load(open(p))["eval_data"] for p in sys.argv[1:])
print(one, windows, tokens, sep="\n")
for e in (one, windows):
    assert e["path"] == "text:eval.txt" and e["step"] == 3 and e["tokens"] == 2999, e
    assert abs(e["perplexity"] - math.exp(e["loss"])) <= 1e-12 * e["perplexity"], e
    assert abs(e["bits_per_byte"] - e["loss"] / math.log(2)) <= 1e-12 * e["bits_per_byte"], e
assert 4 < one["loss"] < 6.5, "loss %g: not near ln 256 = 5.5 after 3 steps" % one["loss"]
# One window is the file as one sequence; windows of 7 carry the state: the same loss, to rounding.
rel = abs(one["loss"] - windows["loss"]) / one["loss"]
assert rel <= 1e-5, "one window: %.9g, windows of 7: %.9g (relative %.2e)" % (one["loss"], windows["loss"], rel)
assert tokens["path"] == "tokens:eval.bin" and tokens["tokens"] == 2999 and tokens["bits_per_byte"] is None, tokens
assert abs(tokens["loss"] - one["loss"]) <= 1e-5 * one["loss"], (tokens["loss"], one["loss"])
print("one window %.9g, windows of 7 %.9g (relative difference %.2e)" % (one["loss"], windows["loss"], rel))
PY
    echo "PASS"
    ;;
  generate)
    gen=$1
    [ -f "$gen" ] && [ -x "$gen" ] || fail "$gen is not an executable"
    "$train" --out R --model diagonal-small --data "text:$src/README.md" --context 32 --batch 2 --steps 4 \
      --eval-every 0 --print-every 1 > R.log 2>&1 || { cat R.log; fail "training the run failed"; }
    g() { "$gen" --run R --prompt "The trainer " --max-tokens 20 "$@" 2> g.err || { cat g.err; fail "generate $* failed"; }; }
    out=$(g --ids)
    cat g.err
    [ "$(wc -w <<< "$out")" -eq 20 ] || fail "--max-tokens 20 printed $(wc -w <<< "$out") ids: $out"
    grep -Eq "^generate: model diagonal-small .* from R/checkpoints/step_00000004.safetensors, vocab 256" g.err ||
      fail "generate does not say which model and checkpoint it loaded"
    grep -Eq "^generate: 20 tokens in [0-9.]+ s: [0-9.]+ tokens/s \(prefill: 12 tokens in [0-9.]+ s\); peak host memory [0-9.]+ MiB$" g.err ||
      fail "no line with tokens/s and peak memory"
    [ "$(g --ids --temperature 0)" = "$(g --ids --temperature 0)" ] || fail "--temperature 0 twice differs"
    s1=$(g --ids --seed 1)
    [ "$s1" = "$(g --ids --seed 1)" ] || fail "--seed 1 twice differs"
    [ "$s1" != "$(g --ids --seed 2)" ] || fail "--seed 1 and --seed 2 give the same tokens: $s1"
    [ "$(g --ids)" = "$(g --ids --seed 0)" ] || fail "the default seed is not 0"
    batch=$(g --ids --seed 1 --batch 3)
    [ "$(wc -l <<< "$batch")" -eq 3 ] || fail "--batch 3 printed $(wc -l <<< "$batch") lines"
    [ "$(head -1 <<< "$batch")" = "$s1" ] || fail "sequence 0 of --batch 3 differs from the single sequence of the same seed"
    [ "$(sort -u <<< "$batch" | wc -l)" -eq 3 ] || fail "the 3 sequences of --batch 3 are not all different: $batch"
    while read -r line; do [ "$(wc -w <<< "$line")" -eq 20 ] || fail "a --batch sequence has $(wc -w <<< "$line") ids"; done <<< "$batch"
    greedy=$(g --ids --temperature 0)
    stop=$(cut -d' ' -f6 <<< "$greedy")
    before=$(tr ' ' '\n' <<< "$greedy" | grep -nx -- "$stop" | head -1 | cut -d: -f1)
    stopped=$(g --ids --temperature 0 --stop "$stop")
    [ "$(wc -w <<< "$stopped")" -eq $((before - 1)) ] ||
      fail "--stop $stop: $(wc -w <<< "$stopped") ids, expected the $((before - 1)) before its first occurrence in: $greedy"
    g --temperature 0 > text.out
    [ "$(stat -c %s text.out)" -eq 21 ] || fail "text output: $(stat -c %s text.out) bytes, expected 20 and a newline"
    [ "$(od -An -v -tu1 text.out | tr -s ' \n' ' ' | sed 's/^ //; s/ 10 $//')" = "$greedy" ] ||
      fail "the text output is not the bytes of the greedy ids"
    echo "PASS"
    ;;
  dist-data)
    dist_test data --data "text:$src/README.md" --model "${1:-mamba-tiny}" --strategy truncated --window 16 --context 32 \
      --batch 4 --val-fraction 0.1 --eval-tokens 256
    ;;
  dist-layer)
    dist_test layer --data "text:$src/README.md" --model "${1:-mamba-tiny}" --chunk 8 --context 32 --batch 2 \
      --val-fraction 0.1 --eval-tokens 256
    ;;
  dist-sequence)
    dist_test sequence --data "text:$src/README.md" --model "${1:-mamba-tiny}" --chunk 8 --context 32 --batch 2 \
      --val-fraction 0.1 --eval-tokens 256
    ;;
  dist-sigint)
    np 2 --dist data --out R --data recall --context 64 --steps 100000 --eval-every 0 --checkpoint-every 0 \
      > R1.log 2>&1 &
    pid=$!
    wait_for_step R/metrics.jsonl 2 || { kill -9 $pid; cat R1.log; fail "no step logged within 30 s"; }
    victim=$(rank_pid $pid 1)
    [ -n "$victim" ] || { kill -9 $pid; fail "rank 1 not found among the children of mpiexec ($pid)"; }
    kill -INT "$victim"  # one rank only: the ranks must agree to stop
    rc=0
    wait $pid || rc=$?
    cat R1.log
    [ $rc -eq 0 ] || fail "SIGINT to rank 1: exit status $rc, expected 0"
    grep -Eq "stopped by signal 2 at step [0-9]+ \(sent to rank 1\); continue with mpirun -np 2 .*train --out R --resume" R1.log ||
      fail "no stop message naming rank 1 and the command that continues"
    [ "$(grep -c 'stop requested' R1.log)" -le 1 ] || fail "'stop requested' printed by more than one rank"
    [ -f R/checkpoints/latest ] || fail "SIGINT: no checkpoint"
    grep -q '"stop_reason": "interrupted"' R/summary.json || fail "summary.json does not say interrupted"
    step=$(losses R/metrics.jsonl | tail -1 | cut -d' ' -f1)
    grep -q "$(printf 'step_%08d' "$step")" R/checkpoints/latest || fail "the checkpoint is not that of step $step"
    np 2 --out R --resume --until $((step + 2)) > R2.log 2>&1 || { cat R2.log; fail "resume after SIGINT failed"; }
    cat R2.log
    grep -q "at step $step" R2.log || fail "did not resume at step $step"
    [ "$(losses R/metrics.jsonl | tail -1 | cut -d' ' -f1)" -eq $((step + 2)) ] || fail "resumed run did not reach step $((step + 2))"
    echo "PASS"
    ;;
  dist-killed)
    # mpiexec would end the job itself when a rank dies; told not to, the survivor's timeout must.
    start=$SECONDS
    env SSMX_DIST_TIMEOUT=5 "${mpi[0]}" "${mpi[1]}" 2 "${mpi[@]:2}" --mca orte_abort_on_non_zero_status 0 "$train" \
      --dist data --out K --data recall --context 64 --steps 100000 --eval-every 0 --checkpoint-every 2 > K1.log 2>&1 &
    pid=$!
    wait_for_step K/metrics.jsonl 3 || { kill -9 $pid; cat K1.log; fail "no step 3 logged within 30 s"; }
    victim=$(rank_pid $pid 1)
    [ -n "$victim" ] || { kill -9 $pid; fail "rank 1 not found among the children of mpiexec ($pid)"; }
    kill -9 "$victim"
    killed_at=$SECONDS
    rc=0
    wait $pid || rc=$?
    cat K1.log
    [ $rc -ne 0 ] || fail "the job exited 0 after rank 1 was killed"
    [ $((SECONDS - killed_at)) -lt 45 ] || fail "the job took $((SECONDS - killed_at)) s to end after rank 1 died"
    grep -Eq "train: error: rank 0 of 2: .*timed out after 5 s" K1.log || fail "rank 0 did not report the timeout"
    step=$(sed -E 's/step_0*([0-9]+)\.safetensors/\1/' K/checkpoints/latest)
    np 2 --out K --resume --until $((step + 1)) > K2.log 2>&1 || { cat K2.log; fail "the last checkpoint does not resume"; }
    cat K2.log
    grep -q "at step $step" K2.log || fail "did not resume at step $step"
    echo "PASS: the job ended $((SECONDS - killed_at)) s after rank 1 died ($((SECONDS - start)) s in all)"
    ;;
  dist-mismatch)
    rc=0
    "${mpi[0]}" "${mpi[1]}" 1 "${mpi[@]:2}" "$train" --dist data --out M --data recall --context 32 --steps 4 --seed 1 : \
      "${mpi[1]}" 1 "$train" --dist data --out M --data recall --context 32 --steps 4 --seed 2 \
      > M0.log 2>&1 || rc=$?
    cat M0.log
    [ $rc -ne 0 ] || fail "ranks with different --seed ran"
    grep -Eq -- "train: error: rank [01] of 2: --seed differs between the ranks \(rank [01] of 2 has [12]\): .*rank 0: 1, rank 1: 2 \(differs from rank 0\)" M0.log ||
      fail "the message does not name --seed and each rank's value"
    rc=0
    "${mpi[0]}" "${mpi[1]}" 1 "${mpi[@]:2}" "$train" --dist data --out M --data recall --context 32 --optimizer sgd : \
      "${mpi[1]}" 1 "$train" --dist data --out M --data recall --context 32 --optimizer adamw > M5.log 2>&1 || rc=$?
    cat M5.log
    [ $rc -ne 0 ] && grep -Eq -- '--optimizer differs between the ranks \(rank [01] of 2 has "(sgd|adamw)"\); start every' M5.log ||
      fail "the message does not name --optimizer and the rank's value"
    ! grep -E -- '--optimizer differs.*[0-9]{10}' M5.log || fail "the message shows hashes"
    ! grep -q MPI_ABORT M0.log M5.log || fail "ranks with different flags ended the job with MPI_Abort"
    # One rank alone cannot read its data: it says so, the other waits for nothing, and
    # the job ends with the data error's status, not through MPI_Abort.
    rc=0
    "${mpi[0]}" "${mpi[1]}" 1 "${mpi[@]:2}" "$train" --dist data --out M --data "text:$src/README.md" --context 32 : \
      "${mpi[1]}" 1 "$train" --dist data --out M --data text:nowhere.txt --context 32 > M6.log 2>&1 || rc=$?
    cat M6.log
    [ $rc -eq 1 ] || fail "a rank without its data: exit status $rc, not 1"
    grep -Eq -- "^train: error: rank 1 of 2: byte file 'nowhere.txt': cannot open" M6.log ||
      fail "rank 1 did not name its data file"
    [ "$(grep -c '^train: error:' M6.log)" = 1 ] || fail "expected one error line, from rank 1"
    ! grep -q MPI_ABORT M6.log || fail "a failure at set-up ended the job with MPI_Abort"
    [ ! -e M ] || fail "ranks that disagree wrote files: $(find M)"
    np 2 --dist data --out M --data recall --context 32 --steps 4 --until 2 --eval-every 0 > M1.log 2>&1 ||
      { cat M1.log; fail "first run failed"; }
    before=$(sum M)
    rc=0
    np 3 --out M --resume > M2.log 2>&1 || rc=$?
    cat M2.log
    [ $rc -ne 0 ] || fail "a resume on 3 ranks of a 2-rank run succeeded"
    grep -Eq -- "--resume: the run was started with 2 ranks \(--dist data, saved in M/checkpoints/step_00000002.safetensors\), but this job has 3: resume it with mpirun -np 2" M2.log ||
      fail "the message does not name both numbers of ranks"
    rc=0
    "$train" --out M --resume > M3.log 2>&1 || rc=$?
    cat M3.log
    [ $rc -ne 0 ] && grep -q -- "started with 2 ranks .*, but this job has 1" M3.log || fail "a resume without mpirun not refused"
    rc=0
    np 2 --out M --resume --dist sequence > M4.log 2>&1 || rc=$?
    cat M4.log
    [ $rc -ne 0 ] && grep -q -- '--dist "sequence" differs from the value the run was started with, "data"' M4.log ||
      fail "--dist mismatch not reported"
    [ "$(sum M)" = "$before" ] || fail "a failed resume changed files"
    echo "PASS"
    ;;
  dist-layer-eval)
    gen=$1
    head -c 3000 "$src/README.md" > eval.txt
    flags=(--model mamba-tiny --data "text:$src/README.md" --context 32 --batch 2 --steps 3 --eval-every 0
           --checkpoint-every 0 --eval-data text:eval.txt --eval-window 50 --chunk 8)
    "$train" --out S "${flags[@]}" > S.log 2>&1 || { cat S.log; fail "run S (one process) failed"; }
    np 2 --dist layer --out L "${flags[@]}" > L.log 2>&1 || { cat L.log; fail "run L (2 ranks) failed"; }
    cat L.log
    [ -f L/checkpoints/step_00000003.rank-1-of-2.safetensors ] || fail "--dist layer wrote no part for rank 1"
    python3 - S/summary.json L/summary.json << 'PY' || fail "--eval-data under --dist layer differs from one process"
import json, sys
s, l = (json.load(open(p))["eval_data"] for p in sys.argv[1:])
assert s["tokens"] == l["tokens"] == 2999, (s, l)
rel = abs(s["loss"] - l["loss"]) / s["loss"]
assert rel <= 1e-5, "one process %.9g, 2 ranks %.9g" % (s["loss"], l["loss"])
print("eval data: one process %.9g, --dist layer %.9g (relative %.2e)" % (s["loss"], l["loss"], rel))
PY
    one=$("$gen" --run S --prompt "The " --max-tokens 16 --temperature 0 --ids 2> gen.err) || { cat gen.err; fail "generate --run S failed"; }
    two=$("$gen" --run L --prompt "The " --max-tokens 16 --temperature 0 --ids 2> gen.err) || { cat gen.err; fail "generate --run L failed"; }
    [ "$one" = "$two" ] || fail "generate from the --dist layer run: $two; from one process: $one"
    echo "PASS"
    ;;
  dist-expect-error)
    ranks=$1 lines=$2 regex=$3
    shift 3
    rc=0
    np "$ranks" "$@" > out.log 2>&1 || rc=$?
    cat out.log
    [ $rc -ne 0 ] || fail "train $* on $ranks ranks succeeded"
    grep -Eq -- "$regex" out.log || fail "the message does not match: $regex"
    [ "$(grep -c '^train: error:' out.log)" = "$lines" ] || fail "expected $lines line(s) 'train: error: ...'"
    ! grep -q MPI_ABORT out.log || fail "a failure at set-up ended the job with MPI_Abort"
    [ -z "$(ls -A | grep -v '^out.log$' | grep -v '^.trainer_test$')" ] || fail "a failing run wrote files: $(ls -A)"
    echo "PASS"
    ;;
  resume-recall)
    resume_test 3 --data recall --context 64 --batch 2 --curriculum-start 16 --curriculum-steps 2 --eval-sequences 2
    ;;
  resume-custom)  # TRAIN is train_custom: a user's layer (examples/custom_layer.hpp) through train/trainer.hpp
    resume_test 3 --data recall --model gated-small --context 64 --batch 2 --eval-sequences 2
    grep -q "model gated-small (d_model=64, state 64x16, K=2 layers" A.log || { cat A.log; fail "the log does not describe the custom preset"; }
    "$train" --help > help.log || fail "--help failed"
    grep -q -- "--model TEXT:{gated-small}" help.log || fail "--help does not list the custom preset"
    ;;
  resume-text)
    resume_test 3 --data "text:$src/README.md" --model "${1:-mamba-tiny}" --strategy truncated --window 16 --context 32 \
      --batch 2 --val-fraction 0.1 --eval-tokens 256
    ;;
  resume-tokens)
    make_token_file "$src/README.md" tokens.bin 4000
    # Documents are lines (--eot 10): many starts and carried rows in every batch. The
    # stored layer inputs in bfloat16: a resumed run still repeats every bit.
    resume_test 3 --data tokens:tokens.bin --eot 10 --context 48 --batch 3 --storage bf16 --optimizer sgd --lr 0.05 \
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
  help)
    "$train" --help > help.log 2>&1 || { cat help.log; fail "--help failed"; }
    tr '\n' ' ' < help.log | grep -Eq -- "$1" || { cat help.log; fail "--help does not match: $1"; }
    grep -Eq -- "--lr FLOAT:NUMBER > 0=0.01|--lr .*=0.01" help.log || fail "--help does not show the default of --lr"
    echo "PASS"
    ;;
  messages)
    make_token_file "$src/README.md" tokens.bin 2000  # bytes: no token 50256 (the default --eot)
    "$train" --out R --data tokens:tokens.bin --context 32 --steps 3 --warmup 2 --eval-every 0 > R.log 2>&1 ||
      { cat R.log; fail "the run failed"; }
    cat R.log
    grep -q "warning: --eot 50256 does not occur in the training tokens of tokens.bin" R.log || fail "no --eot warning"
    lr1=$(grep '"type":"train","step":1,' R/metrics.jsonl | sed -E 's/.*"lr":([^,]+),.*/\1/')
    awk -v lr="$lr1" 'BEGIN { exit !(lr > 0.004 && lr < 0.006) }' || fail "step 1 ran at lr $lr1, expected 0.01 / 2"
    sum=$(grep '"type":"train"' R/metrics.jsonl | sed -E 's/.*"tokens":([0-9]+),.*/\1/' | awk '{ s += $1 } END { print s }')
    grep -q "\"tokens\": $sum," R/summary.json || { cat R/summary.json; fail "summary.json's tokens differ from the metrics' sum, $sum"; }
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
