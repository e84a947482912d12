// generate — continue a prompt with a model trained by `train` (--run DIR) or a public Mamba
// checkpoint (--hf DIR); everything is in examples/train/generate.hpp. The presets are the
// trainer's, so every run of `train` loads by its saved preset name; the Mamba shapes are
// theirs plus that of the test fixture tests/data/mamba_tiny.
#include "train/generate.hpp"
#include "train/presets.hpp"

int main(int argc, char** argv) {
  auto presets = train::builtin_presets();
  presets.add_checkpoint_shape<ssmx::nn::Mamba<float, 16, 4, 2, 4, 2>, 2>("mamba_tiny-fixture");
  return train::generate_main(argc, argv, presets);
}
