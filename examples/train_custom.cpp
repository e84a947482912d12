// train_custom — the trainer (examples/train/trainer.hpp) on a layer of your own: here the
// GatedSSM of examples/custom_layer.hpp. Every flag of `train` works (--data, --resume,
// --dist, --strategy, ...); --model names this program's preset:
//
//   build/examples/train_custom --data recall --context 256 --steps 300 --out runs/gated
//   build/examples/train_custom --out runs/gated --resume --steps 600
#include "custom_layer.hpp"
#include "train/trainer.hpp"

int main(int argc, char** argv) {
  return train::main(argc, argv, train::Presets().add<GatedSSM<float, 64, 16>, 2>("gated-small"));
}
