// generate — continue a prompt with a model trained by `train` (--run DIR) or a public Mamba
// checkpoint (--hf DIR); everything is in examples/train/generate.hpp. The presets are the
// trainer's, so every run of `train` loads by its saved preset name; the Mamba and Mamba-2
// shapes are theirs plus those of the test fixtures tests/data/mamba_tiny and mamba2_*.
#include "train/generate.hpp"
#include "train/presets.hpp"

int main(int argc, char** argv) {
  auto presets = train::builtin_presets();
  presets.add_checkpoint_shape<ssmx::nn::Mamba<float, 16, 4, 2, 4, 2>, 2>("mamba_tiny-fixture");
  presets.add_checkpoint_shape<ssmx::nn::Mamba2<float, 16, 4, 4, 1, 2, 4>, 2>("mamba2_tiny-fixture");
  presets.add_checkpoint_shape<ssmx::nn::Mamba2<float, 16, 4, 4, 2, 2, 4>, 2>("mamba2_groups-fixture");
  return train::generate_main(argc, argv, presets);
}
