// Fuzz target: the input is a JSON file, read four ways: as a checkpoint's config.json
// (read_mamba_config and read_mamba2_config, each then checked against a compiled model;
// both read Python's Infinity / NaN words), as a
// model.safetensors.index.json (its shard names resolved in a directory holding one small
// shard, "a.safetensors", with tensor "a"), and through parse_json and json_excerpt.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <ssmx/io/io.hpp>
#include <ssmx/ssmx.hpp>

#include "fuzz_support.hpp"

namespace {

using TinyLM = ssmx::nn::Model<ssmx::nn::Mamba<float, 16, 4, 2, 4, 2>, 2>;
using Tiny2LM = ssmx::nn::Model<ssmx::nn::Mamba2<float, 16, 4, 4, 1, 2, 4>, 2>;

// A directory with config.json -> the memory file, and a.safetensors.
struct Setup {
  ssmx_fuzz::MemoryFile file{"config.json"};
  std::string dir;
  Setup() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "ssmx_fuzz_config_XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    dir = tmpl;
    std::filesystem::create_symlink(file.path(), dir + "/config.json");
    ssmx::Tensor<float> a(ssmx::Dims{2});
    a[0] = 1.0f;
    a[1] = 2.0f;
    ssmx::io::SafetensorsWriter w;
    w.add("a", a);
    w.write(dir + "/a.safetensors");
  }
  ~Setup() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Setup setup;
  static TinyLM model({32, true, 0});
  static Tiny2LM model2({32, true, 0});
  setup.file.set(data, size);
  try {
    const auto c = ssmx::io::read_mamba_config(setup.dir);
    (void)c.field("d_model");
    ssmx::io::check_mamba_config(c, model);
  } catch (const ssmx::Error&) {
  }
  try {
    const auto c = ssmx::io::read_mamba2_config(setup.dir);
    (void)c.field("head_dim");
    ssmx::io::check_mamba2_config(c, model2);
  } catch (const ssmx::Error&) {
  }
  try {
    (void)ssmx::io::SafetensorsShards::open_index(setup.dir + "/config.json");
  } catch (const ssmx::Error&) {
  }
  try {
    const auto j = ssmx::io::parse_json(std::string(reinterpret_cast<const char*>(data), size), "input");
    (void)ssmx::io::detail::json_excerpt(j);
  } catch (const ssmx::Error&) {
  }
  return 0;
}
