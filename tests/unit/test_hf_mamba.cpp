// Loading a Mamba checkpoint made by PyTorch (tests/reference/mamba_reference.py) and
// matching its logits, loss and gradients (host backend; needs nlohmann_json).
#include "../support/test_support.hpp"

#if !SSMX_TEST_CUDA && __has_include(<nlohmann/json.hpp>)
#include <ssmx/io/mamba.hpp>

#ifndef SSMX_TEST_DATA_DIR
#define SSMX_TEST_DATA_DIR "tests/data"
#endif

namespace test_hf_mamba {
using namespace ssmx;

// The fixture: V = 32, D = 16, K = 2, N = 4, expand 2, W = 4, R = 2.
template <class T>
using TinyLM = nn::Model<nn::Mamba<T, 16, 4, 2, 4, 2>, 2>;

inline std::string fixture(const char* name) { return std::string(SSMX_TEST_DATA_DIR) + "/" + name; }

inline std::vector<nn::token_t> read_ints(const io::SafetensorsFile& f, const std::string& name) {
  const std::vector<std::int64_t> v = f.read_int64(name);
  return std::vector<nn::token_t>(v.begin(), v.end());
}

struct Reference {
  io::SafetensorsFile file = io::SafetensorsFile::open(fixture("mamba_tiny/reference.safetensors"));
  std::vector<nn::token_t> x = read_ints(file, "input_ids"), y = read_ints(file, "targets");
  nn::Batch batch() const { return nn::Batch{x.data(), y.data(), 2, 24}; }
};

// max |a - b| over max |b|, per tensor.
template <class T>
double scaled_err(const Tensor<T>& a, const Tensor<double>& b) {
  REQUIRE(a.dims() == b.dims());
  double err = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}

template <class T>
void check_against_reference(double tol) {
  Reference ref;
  TinyLM<T> m({32, true, 0});
  io::load_mamba(m, fixture("mamba_tiny"));
  const Tensor<T> logits = m.logits(ref.batch(), 7);
  CHECK(scaled_err(logits, ref.file.read<double>("logits")) < tol);
  for (index_t chunk : {24, 5}) {
    CAPTURE(chunk);
    m.zero_grad();
    const auto r = m.forward_backward(ref.batch(), Adjoint{chunk, 4});
    const double loss = ref.file.read<double>("loss")[0];
    CHECK(std::abs(r.loss - loss) / loss < tol);
    for (auto* p : m.parameters()) {
      CAPTURE(p->name);
      const std::string name = p->name == "embedding.weight" ? "backbone.embeddings.weight" : "backbone." + p->name;
      CHECK(scaled_err(p->grad, ref.file.read<double>("grad." + name)) < tol);
    }
  }
}
}  // namespace test_hf_mamba

using namespace test_hf_mamba;

TEST_CASE("io: a PyTorch-made Mamba checkpoint loads and matches the reference in double") {
  check_against_reference<double>(1e-10);
}

TEST_CASE("io: a PyTorch-made Mamba checkpoint loads and matches the reference in float") {
  check_against_reference<float>(1e-4);
}

TEST_CASE("io: a bf16 Mamba checkpoint loads as the bf16-rounded weights") {
  TinyLM<float> f32({32, true, 0}), b16({32, true, 0});
  io::load_mamba(f32, fixture("mamba_tiny"));
  io::load_mamba(b16, fixture("mamba_tiny_bf16"));
  const auto pa = f32.parameters(), pb = b16.parameters();
  for (std::size_t k = 0; k < pa.size(); ++k)
    for (index_t i = 0; i < pa[k]->numel(); ++i) {
      const float want = float(bf16(pa[k]->value[i]));  // round to nearest even, as the file was written
      REQUIRE(pb[k]->value[i] == want);
    }
}

TEST_CASE("io: a Mamba config that does not match the compiled shapes names the field") {
  nn::Model<nn::Mamba<float, 16, 8, 2, 4, 2>, 2> wrong_state({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_state, fixture("mamba_tiny")),
                       doctest::Contains("d_state (state_size) is 4 but the model has 8"), ShapeError);
  nn::Model<nn::Mamba<float, 16, 4, 2, 4, 2>, 3> wrong_layers({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_layers, fixture("mamba_tiny")),
                       doctest::Contains("n_layer (num_hidden_layers) is 2 but the model has 3"), ShapeError);
  TinyLM<float> wrong_vocab({40, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_vocab, fixture("mamba_tiny")), doctest::Contains("vocab_size is 32"),
                       ShapeError);
  // Nothing was loaded into a model that failed the check.
  for (auto* p : wrong_layers.parameters())
    if (p->name == "norm_f.weight") CHECK(p->value[0] == 1.0f);
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_vocab, fixture("no_such_checkpoint")),
                       doctest::Contains("no_such_checkpoint/config.json"), IOError);
}
#endif
