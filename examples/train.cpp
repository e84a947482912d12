// train — the general ssmx trainer with the built-in presets (train/presets.hpp); everything
// else is in examples/train/trainer.hpp (flags, data, checkpoints, resume, plots, MPI), which
// a program training its own layer includes the same way (examples/train_custom.cpp).
#include "train/trainer.hpp"
#include "train/presets.hpp"

int main(int argc, char** argv) { return train::main(argc, argv, train::builtin_presets()); }
