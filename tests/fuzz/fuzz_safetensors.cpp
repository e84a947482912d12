// Fuzz target: the input is a whole safetensors file. Opens it (header length, JSON,
// entries, data layout) and reads every tensor it lists, as float, double or int64.
#include <cstdint>
#include <string>

#include <ssmx/io/safetensors.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ssmx_fuzz::MemoryFile file("model.safetensors");
  file.set(data, size);
  try {
    const auto f = ssmx::io::SafetensorsFile::open(file.path());
    (void)f.metadata();
    for (const auto& t : f.tensors()) {
      try {
        if (t.float_dtype() && t.shape.size() <= std::size_t(ssmx::max_rank)) {
          (void)f.read<float>(t.name);
          (void)f.read<double>(t.name, ssmx::Tag::Workspace);
        } else {
          (void)f.read_int64(t.name);
        }
      } catch (const ssmx::Error&) {
      }
    }
  } catch (const ssmx::Error&) {
  }
  return 0;
}
