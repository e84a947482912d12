// ssmx — the umbrella header. Compiles with a plain C++17 compiler; no CUDA needed.
#pragma once

#include "config.hpp"
#include "core/dtype.hpp"
#include "core/eigen.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "core/shape.hpp"
#include "core/tensor.hpp"
#include "expr/expr.hpp"
#include "autodiff/autodiff.hpp"
#include "scan/scan.hpp"
#include "optim/optim.hpp"
#include "nn/model.hpp"
#include "nn/train.hpp"
#include "data/packing.hpp"
#include "data/recall.hpp"
#include "data/token_file.hpp"
