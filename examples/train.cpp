// train — the general ssmx trainer with the built-in presets; everything else is in
// examples/train/trainer.hpp (flags, data, checkpoints, resume, plots, MPI), which a
// program training its own layer includes the same way (examples/train_custom.cpp).
#include "train/trainer.hpp"

int main(int argc, char** argv) {
  using ssmx::nn::DiagonalSSM;
  using ssmx::nn::Mamba;
  // One instantiation of the training loop per preset (each costs compile time).
  const auto presets = train::Presets()
                           .add<DiagonalSSM<float, 64, 16>, 2>("diagonal-small")
                           .add<DiagonalSSM<float, 256, 16>, 8>("diagonal-base")
                           .add<Mamba<float, 64, 16, 2, 4>, 2>("mamba-tiny")
                           .add<Mamba<float, 768, 16, 2, 4>, 24>("mamba-130m");
  return train::main(argc, argv, presets);
}
