#!/bin/sh
# The greedy continuation of the Mamba and Mamba-2 fixtures by `generate` (ssmx: prefill, then one
# recurrent step a token, float32) against the PyTorch reference's (greedy_reference.py:
# the whole sequence through its sequential scan at every token, float64), id for id.
# Registered by tests/trainer/CMakeLists.txt as reference/greedy_generation.
#
#   check_greedy.sh GENERATE PYTHON SOURCE_DIR
set -eu
generate=$1 python=$2 src=$3
status=0
# The tied fixture repeats its last token (a tied head favours the token just seen); the
# untied ones, in both layouts, give varied sequences.
for case in mamba_tiny:7,3,19,30,2,11 mamba_untied:1,2,3,4,5 mamba_untied_ss:1,2,3,4,5 mamba_untied:9 \
  mamba2_tiny:7,3,19,30,2,11 mamba2_groups:1,2,3,4,5 mamba2_ss:1,2,3,4,5; do
  fixture=${case%%:*} prompt=${case#*:}
  ours=$("$generate" --hf "$src/tests/data/$fixture" --prompt-ids "$prompt" --max-tokens 24 --temperature 0 --ids)
  theirs=$("$python" "$src/tests/reference/greedy_reference.py" "$src/tests/data/$fixture" --prompt-ids "$prompt" \
    --max-tokens 24)
  if [ "$ours" = "$theirs" ] && [ "$(echo "$ours" | wc -w)" -eq 24 ]; then
    echo "ok: $fixture from $prompt: $ours"
  else
    echo "FAIL: $fixture from $prompt:"
    echo "  generate:  $ours"
    echo "  reference: $theirs"
    status=1
  fi
done
exit $status
