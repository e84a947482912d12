// Loading Mamba checkpoints made by PyTorch (tests/reference/mamba_reference.py), tied and
// untied, in the Hugging Face and the state-spaces layouts, and matching their logits, loss
// and gradients; exporting one back (host backend; needs nlohmann_json).
#include "../support/test_support.hpp"
#include "../support/model_checks.hpp"

#if !SSMX_TEST_CUDA && __has_include(<nlohmann/json.hpp>)
#include <ssmx/io/mamba.hpp>

namespace test_hf_mamba {
using namespace ssmx;

// The fixtures: V = 32 (16 for the square ones), D = 16, K = 2, N = 4, expand 2, W = 4, R = 2.
template <class T>
using TinyLM = nn::Model<nn::Mamba<T, 16, 4, 2, 4, 2>, 2>;

using test::fixture;
using test::name_in_file;
using test::scaled_err;
using test::transposed;

inline std::vector<nn::token_t> read_ints(const io::SafetensorsFile& f, const std::string& name) {
  const std::vector<std::int64_t> v = f.read_int64(name);
  return std::vector<nn::token_t>(v.begin(), v.end());
}

struct Reference {
  explicit Reference(const std::string& dir = "mamba_tiny")
      : file(io::SafetensorsFile::open(fixture(dir + "/reference.safetensors"))) {}
  io::SafetensorsFile file;
  std::vector<nn::token_t> x = read_ints(file, "input_ids"), y = read_ints(file, "targets");
  nn::Batch batch() const { return nn::Batch{x.data(), y.data(), 2, 24}; }
};

// Loads fixture `dir` into a model of vocabulary `vocab` and compares logits, loss and every
// gradient with the PyTorch reference (the head's gradient transposed back: the reference
// has it in the file's [V, D]).
template <class T>
void check_against_reference(double tol, const std::string& dir = "mamba_tiny", index_t vocab = 32, bool tied = true,
                             bool state_spaces = false) {
  Reference ref(dir);
  TinyLM<T> m({vocab, tied, 0});
  io::load_mamba(m, fixture(dir));
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
      Tensor<double> want = ref.file.read<double>("grad." + name_in_file(p->name, state_spaces));
      if (p->name == "lm_head.weight") want = transposed(want);
      CHECK(scaled_err(p->grad, want) < tol);
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

TEST_CASE("io: an untied Hugging Face Mamba checkpoint loads its head transposed and matches PyTorch") {
  check_against_reference<double>(1e-10, "mamba_untied", 32, false);
  check_against_reference<float>(1e-4, "mamba_untied", 32, false);
}

TEST_CASE("io: an untied checkpoint with vocab equal to d_model loads its head transposed") {
  // [V, D] == [D, V]: only the values tell a transposed head from a right one.
  check_against_reference<double>(1e-10, "mamba_untied_square", 16, false);
  TinyLM<float> m({16, false, 0});
  io::load_mamba(m, fixture("mamba_untied_square"));
  const auto file = io::SafetensorsFile::open(fixture("mamba_untied_square/model.safetensors"));
  const Tensor<float> stored = file.read<float>("lm_head.weight");  // [V, D]
  for (auto* p : m.parameters())
    if (p->name == "lm_head.weight") {
      REQUIRE(p->value.dims() == Dims{16, 16});
      for (index_t i = 0; i < 16; ++i)
        for (index_t v = 0; v < 16; ++v) REQUIRE(p->value(i, v) == stored(v, i));
    }
}

TEST_CASE("io: an untied state-spaces Mamba checkpoint loads with its padded vocabulary") {
  const auto cfg = io::read_mamba_config(fixture("mamba_untied_ss"));
  CHECK(cfg.layout == io::MambaLayout::state_spaces);
  CHECK(cfg.vocab == 16);  // vocab_size 13 padded to a multiple of 8
  CHECK(!cfg.tie_embeddings);
  check_against_reference<double>(1e-10, "mamba_untied_ss", 16, false, true);
  check_against_reference<float>(1e-4, "mamba_untied_ss", 16, false, true);
}

TEST_CASE("io: save_mamba writes what PyTorch stores and loads back bit for bit") {
  for (const char* dir : {"mamba_untied", "mamba_untied_square", "mamba_tiny"}) {
    CAPTURE(dir);
    const bool tied = std::string(dir) == "mamba_tiny";
    const index_t vocab = std::string(dir) == "mamba_untied_square" ? 16 : 32;
    TinyLM<float> m({vocab, tied, 0});
    io::load_mamba(m, fixture(dir));
    ssmx::test::TempDir out;
    io::save_mamba(m, out.path(), 1e-5);
    // Every tensor as the PyTorch-made file has it (F32, the head as [V, D]), byte for byte.
    const auto theirs = io::SafetensorsFile::open(fixture(std::string(dir) + "/model.safetensors"));
    const auto ours = io::SafetensorsFile::open(out.file("model.safetensors"));
    REQUIRE(ours.tensors().size() == theirs.tensors().size());
    for (const auto& t : theirs.tensors()) {
      CAPTURE(t.name);
      REQUIRE(ours.has(t.name));
      CHECK(ours.info(t.name).shape == t.shape);
      const Tensor<float> a = ours.read<float>(t.name), b = theirs.read<float>(t.name);
      CHECK(ssmx::test::bytes_of(a.data(), a.numel()) == ssmx::test::bytes_of(b.data(), b.numel()));
    }
    const auto cfg = io::read_mamba_config(out.path());
    CHECK(cfg.tie_embeddings == tied);
    CHECK(cfg.vocab == vocab);
    TinyLM<float> back({vocab, tied, 7});
    io::load_mamba(back, out.path());
    const auto pa = m.parameters(), pb = back.parameters();
    for (std::size_t k = 0; k < pa.size(); ++k)
      CHECK(ssmx::test::bytes_of(pa[k]->value.data(), pa[k]->numel()) ==
            ssmx::test::bytes_of(pb[k]->value.data(), pb[k]->numel()));
  }
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
                       doctest::Contains("config.json: field \"state_size\" is 4 but the model has 8"), ShapeError);
  nn::Model<nn::Mamba<float, 16, 4, 2, 4, 2>, 3> wrong_layers({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_layers, fixture("mamba_tiny")),
                       doctest::Contains("field \"num_hidden_layers\" is 2 but the model has 3"), ShapeError);
  TinyLM<float> wrong_vocab({40, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_vocab, fixture("mamba_tiny")),
                       doctest::Contains("field \"vocab_size\" is 32"), ShapeError);
  // A tied model and an untied checkpoint, and the other way round.
  TinyLM<float> tied({32, true, 0}), untied({32, false, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba(tied, fixture("mamba_untied")),
                       doctest::Contains("field \"tie_word_embeddings\" is false"), ValueError);
  CHECK_THROWS_WITH_AS(io::load_mamba(untied, fixture("mamba_tiny")),
                       doctest::Contains("field \"tie_word_embeddings\" is true"), ValueError);
  // Nothing was loaded into a model that failed the check.
  for (auto* p : wrong_layers.parameters())
    if (p->name == "norm_f.weight") CHECK(p->value[0] == 1.0f);
  CHECK_THROWS_WITH_AS(io::load_mamba(wrong_vocab, fixture("no_such_checkpoint")),
                       doctest::Contains("no_such_checkpoint/config.json"), IOError);
}
#endif
