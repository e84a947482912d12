// ssmx — the umbrella header of the CUDA backend (compile with nvcc). Including it installs
// the device allocator for Space::Cuda.
#pragma once

#include "ssmx.hpp"
#include "backend/cuda/check.cuh"
#include "backend/cuda/memory.cuh"
#include "backend/cuda/exec.cuh"
#include "backend/cuda/rows.cuh"
#include "backend/cuda/scan.cuh"
