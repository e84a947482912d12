#!/usr/bin/env bash
# The main job: build and run a real training run of a DiagonalSSM language model with
# the exact adjoint backward on the embedded long-range key-value recall task.
# Installs missing Debian packages first. Extra arguments go to train_recall
# (see `build/examples/train_recall --help`), e.g.  bash examples/run_main.sh --context 16384
# With a visible GPU (nvidia-smi) and nvcc it builds and runs train_recall_cuda, the same
# program with the model on the GPU; SSMX_DEVICE=cpu keeps it on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=.ci/install-deps.sh
source .ci/install-deps.sh
ssmx_install_deps
# The options it needs, whatever build/ was configured with before (e.g. an install recipe).
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSSMX_BUILD_EXAMPLES=ON >/dev/null
target=train_recall
if [[ "${SSMX_DEVICE:-auto}" != cpu ]] && nvidia-smi -L >/dev/null 2>&1 &&
   grep -q '^SSMX_ENABLE_CUDA:BOOL=ON' build/CMakeCache.txt; then
  target=train_recall_cuda
fi
cmake --build build -j"${SSMX_JOBS:-2}" --target "$target"
# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that
# wait for a descheduled one make each step several times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
exec "build/examples/$target" "$@"
