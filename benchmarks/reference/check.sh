#!/bin/sh
# ctest's independent oracle: ssmx's loss and gradients (every strategy, float64) against
# the PyTorch reference model, to 1e-10 relative.
#   check.sh <bench_throughput> <python3 with torch> <work dir>
set -eu
bench="$1"; python="$2"; dir="$3"
rm -rf "$dir" && mkdir -p "$dir"
"$bench" --dump "$dir" >/dev/null
exec "$python" "$(dirname "$0")/compare.py" "$dir" --tol 1e-10
