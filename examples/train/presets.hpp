// The built-in model presets of the `train` and `generate` programs, listed once so that a
// run trained by one is loaded by the other under the same name.
// Part of the trainer; include examples/train/trainer.hpp first.
#pragma once

#include "trainer.hpp"

namespace train {

inline Presets builtin_presets() {
  using ssmx::nn::DiagonalSSM;
  using ssmx::nn::Mamba;
  using ssmx::nn::Mamba2;
  // One instantiation of the training loop per preset (each costs compile time).
  return Presets()
      .add<DiagonalSSM<float, 64, 16>, 2>("diagonal-small")
      .add<DiagonalSSM<float, 256, 16>, 8>("diagonal-base")
      .add<Mamba<float, 64, 16, 2, 4>, 2>("mamba-tiny")
      .add<Mamba<float, 768, 16, 2, 4>, 24>("mamba-130m")
      .add<Mamba2<float, 64, 16, 16, 1, 2, 4>, 2>("mamba2-tiny")
      .add<Mamba2<float, 768, 128, 64, 1, 2, 4>, 24>("mamba2-130m");
}

}  // namespace train
