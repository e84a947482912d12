// The main job on the GPU: examples/train_recall.cpp compiled by nvcc with the model, its
// gradients and the optimiser state in device memory (target train_recall_cuda).
#include <ssmx/cuda.cuh>

#define SSMX_RECALL_SPACE ::ssmx::Space::Cuda
#include "train_recall.cpp"
