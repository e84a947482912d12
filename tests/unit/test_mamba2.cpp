// Tests of the Mamba-2 layer (host backend): PyTorch-made checkpoints in both layouts
// (tests/reference/mamba2_reference.py, a sequential recurrence in float64) matched in
// logits, loss and every gradient; central differences; every strategy against Backprop;
// the structured (SSD), fused and materialised paths; packed documents, carried states; the
// config checks. Also the two expression nodes the layer is built with (reshape,
// rms_normalize).
#include "../support/test_support.hpp"
#include "../support/model_checks.hpp"

#if !SSMX_TEST_CUDA
#include <ssmx/nn/model.hpp>

#if __has_include(<nlohmann/json.hpp>)
#include <filesystem>

#include <ssmx/io/mamba2.hpp>
#define SSMX_TEST_MAMBA2_IO 1
#endif

namespace test_mamba2 {
using namespace ssmx;
using test::grads_of;
using test::perturb;
using test::rel_diff;
using test::Tokens;

// The fixtures' shapes: D 16, N 4, head_dim 4, expand 2 (8 heads), W 4, 2 layers, V 32.
template <class T, index_t G = 1>
using FixtureLM = nn::Model<nn::Mamba2<T, 16, 4, 4, G, 2, 4>, 2>;
// A smaller model for the strategy and packing checks: D 6, N 3, head_dim 3 (4 heads), G 2.
template <class T>
using SmallLM = nn::Model<nn::Mamba2<T, 6, 3, 3, 2, 2, 4>, 2>;
constexpr index_t vocab = 11;

}  // namespace test_mamba2

using namespace test_mamba2;

TEST_CASE("mamba2: parameter names and shapes follow the public checkpoints") {
  nn::Mamba2<float, 16, 4, 4, 2, 2, 4> m("layers.0.mixer.");
  std::vector<std::string> names;
  index_t total = 0;
  for (auto* p : m.parameters()) {
    names.push_back(p->name);
    total += p->numel();
  }
  const std::vector<std::string> expected{"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                          "A_log",          "D",             "norm.weight", "out_proj.weight"};
  REQUIRE(names.size() == expected.size());
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(names[i] == "layers.0.mixer." + expected[i]);
  // E = 32, H = 8, conv_dim = 32 + 2·2·4 = 48, in_proj rows 2·32 + 2·2·4 + 8 = 88.
  CHECK(m.in_proj.value.dims() == Dims{88, 16});
  CHECK(m.conv_weight.value.dims() == Dims{48, 1, 4});
  CHECK(m.conv_bias.value.dims() == Dims{48});
  CHECK(m.A_log.value.dims() == Dims{8});
  CHECK(m.norm_weight.value.dims() == Dims{32});
  CHECK(m.out_proj.value.dims() == Dims{16, 32});
  CHECK(nn::Mamba2<float, 16, 4, 4, 2, 2, 4>::state_dims() == Dims{8, 4, 4});
  CHECK(total == decltype(m)::parameter_count());
}

TEST_CASE("expr: reshape and rms_normalize match their definitions and central differences") {
  test::Rng rng(3);
  Tensor<double> x(Dims{3, 8}), w(Dims{2, 4});
  test::fill_normal<double>(x.view(), rng, 0, 1);
  test::fill_normal<double>(w.view(), rng, 0, 1);
  // reshape is the row-major reinterpretation, of a leaf and of an expression.
  const Tensor<double> r = eval(reshape(x, Dims{3, 2, 4}));
  const Tensor<double> re = eval(reshape(x * 2.0, Dims{6, 4}));
  for (index_t i = 0; i < 24; ++i) {
    CHECK(r[i] == x[i]);
    CHECK(re[i] == 2.0 * x[i]);
  }
  // rms_normalize over the last axis.
  const Tensor<double> n = eval(rms_normalize(reshape(x, Dims{3, 2, 4}), 1e-5));
  for (index_t row = 0; row < 6; ++row) {
    double ms = 0;
    for (index_t j = 0; j < 4; ++j) ms += x[row * 4 + j] * x[row * 4 + j] / 4;
    for (index_t j = 0; j < 4; ++j) CHECK(n[row * 4 + j] == doctest::Approx(x[row * 4 + j] / std::sqrt(ms + 1e-5)));
  }
  // Gradients through both, of x and of a weight read after the reshape; the cotangent
  // reaching rms_normalize is not constant along its axis (the product with x after it).
  const auto expr = [&] {
    return sum(reshape(rms_normalize(reshape(x * 1.5, Dims{3, 2, 4}), 1e-3) * leaf(w), Dims{3, 8}) * leaf(x));
  };
  Tensor<double> gx = zeros<double>(x.dims()), gw = zeros<double>(w.dims());
  Tensor<double> one(Dims{});
  fill(one, 1.0);
  backward(expr(), one, {wrt(x, gx), wrt(w, gw)});
  GradcheckOptions o;
  o.rtol = 1e-6;
  o.atol = 1e-9;
  std::vector<Tensor<double>*> inputs{&x, &w};
  std::vector<const Tensor<double>*> grads{&gx, &gw};
  const auto res = check_gradients([&] { return eval(expr())[0]; }, inputs, grads, o);
  INFO(res.worst);
  CHECK(res.ok);
  CHECK(res.checked == 32);
}

TEST_CASE("mamba2: model gradients match central differences in double") {
  // The whole language model (2 Mamba-2 blocks of 4 heads in 2 groups, untied head): every
  // parameter tensor, sampled, against central differences of the loss; Δ clamped to a
  // range that cuts some tokens' values at both ends.
  for (const bool clamp : {false, true}) {
    CAPTURE(clamp);
    SmallLM<double> m({vocab, false, 3});
    perturb(m, 4, 0.2);
    const index_t len = 9;
    Tokens d(2, len, 5);
    d.y[3] = -1;
    const nn::Batch batch = d.batch(2, len);
    if (clamp) {
      // Δ = softplus(≈ N(0, 0.6²) - 0.04) spreads over about [0.4, 1]: the range cuts it at
      // both ends (each bound alone changes the loss) and leaves the middle.
      const auto limit = [&](double lo, double hi) {
        for (index_t k = 0; k < 2; ++k) m.block(k).mixer.set_time_step_limit(lo, hi);
        return m.evaluate(batch, 4).loss;
      };
      for (index_t k = 0; k < 2; ++k) fill<double>(m.block(k).mixer.dt_bias.value.view(), -0.04);
      const double free = limit(0, 1e9), lower = limit(0.55, 1e9), upper = limit(0, 0.75), both = limit(0.55, 0.75);
      CHECK(std::abs(lower - free) > 1e-6);
      CHECK(std::abs(upper - free) > 1e-6);
      CHECK(std::abs(both - lower) > 1e-6);
      CHECK(std::abs(both - upper) > 1e-6);
    }
    test::check_parameter_gradients(m, batch, Adjoint{4, 2});
  }
}

TEST_CASE("mamba2: every strategy and every scan path give the Backprop gradient") {
  // Chunk lengths shorter than the convolution window, and lengths no chunk divides. (The
  // paper's formula, exact for one layer only, is checked on other layers: test_model.)
  SmallLM<double> m({vocab, false, 8});
  perturb(m, 9);
  const index_t len = 23;
  Tokens d(2, len, 10);
  const nn::Batch batch = d.batch(2, len);
  double lb = 0, la = 0;
  const auto gb = grads_of(m, batch, Backprop{}, &lb);
  nn::reset_scan_counts();
  for (index_t chunk : {1, 3, 7, 23, 64})
    for (index_t shard : {1, 3, 64}) {
      CAPTURE(chunk);
      CAPTURE(shard);
      const auto ga = grads_of(m, batch, Adjoint{chunk, shard}, &la);
      CHECK(la == doctest::Approx(lb).epsilon(1e-13));
      CHECK(rel_diff(ga, gb) < 1e-12);
    }
  // The adjoint strategies run the structured (SSD) scan: one decay per head (the
  // materialised path is the reference).
  const nn::ScanCounts counts = nn::scan_counts();
  CHECK(counts.structured > 0);
  CHECK(counts.fused == 0);
  CHECK(counts.materialised == 0);
  CHECK(rel_diff(grads_of(m, batch, Checkpointed{}), gb) < 1e-12);
  CHECK(rel_diff(grads_of(m, batch, TruncatedAdjoint{len, 4}), gb) < 1e-12);
  // A window shorter than the sequence changes the gradient (the test can tell).
  CHECK(rel_diff(grads_of(m, batch, TruncatedAdjoint{4, 4}), gb) > 1e-6);
  for (index_t chunk : {1, 2, 5, 100}) CHECK(m.evaluate(batch, chunk).loss == doctest::Approx(lb).epsilon(1e-13));
  // The elementwise fused scan and the materialised path give the same numbers.
  nn::ModelConfig cfg{vocab, false, 8};
  cfg.structured = false;
  SmallLM<double> mf(cfg);
  perturb(mf, 9);
  nn::reset_scan_counts();
  CHECK(rel_diff(grads_of(mf, batch, Adjoint{5, 2}), gb) < 1e-12);
  CHECK(nn::scan_counts().structured == 0);
  CHECK(nn::scan_counts().fused > 0);
  cfg.fused = false;
  SmallLM<double> mm(cfg);
  perturb(mm, 9);
  nn::reset_scan_counts();
  CHECK(rel_diff(grads_of(mm, batch, Adjoint{5, 2}), gb) < 1e-12);
  CHECK(nn::scan_counts().fused + nn::scan_counts().structured == 0);
}

TEST_CASE("mamba2: packed documents give the gradients of each document alone") {
  SmallLM<double> m({vocab, true, 21});
  perturb(m, 22);
  test::check_packing_equals_separate(m);
}

TEST_CASE("mamba2: a sequence split into two calls gives the one-call loss and gradients") {
  SmallLM<double> m({vocab, true, 12});
  perturb(m, 13);
  test::check_split_equals_whole(m);
}

TEST_CASE("mamba2: initial-state gradients match central differences") {
  SmallLM<double> m({vocab, true, 17});
  perturb(m, 18);
  test::check_initial_state_gradients(m);
}

TEST_CASE("mamba2: bf16-stored layer inputs stay close to float") {
  nn::ModelConfig cfg{vocab, true, 31};
  SmallLM<float> f(cfg);
  cfg.bf16_inputs = true;
  SmallLM<float> b(cfg);
  const index_t len = 40;
  Tokens d(2, len, 32);
  const auto gf = grads_of(f, d.batch(2, len), Adjoint{16, 4});
  const auto gb = grads_of(b, d.batch(2, len), Adjoint{16, 4});
  CHECK(rel_diff(gb, gf) < 2e-2);
  CHECK(rel_diff(gb, gf) > 0);  // the inputs were rounded
}

TEST_CASE("mamba2: float model trains on a copy task") {
  // Not a benchmark: a short run whose loss must fall well below its start.
  SmallLM<float> m({vocab, true, 25});
  const index_t len = 32;
  Tokens d(2, len, 26);
  for (index_t b = 0; b < 2; ++b)
    for (index_t t = 0; t < len; ++t)
      d.y[std::size_t(b * len + t)] = t >= 4 ? d.x[std::size_t(b * len + t - 4)] : nn::token_t(-1);  // recall 4 back
  AdamW<float> opt(1e-2, 0.9, 0.999, 1e-8, 0.0);
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    const auto r = nn::train_step(m, opt, d.batch(2, len), Adjoint{8, 4});
    if (step == 0) first = r.mean_loss();
    last = r.mean_loss();
  }
  CHECK(last < 0.5 * first);
}

#if SSMX_TEST_MAMBA2_IO
namespace test_mamba2 {
using test::fixture;
using test::scaled_err;

// A fixture's reference outputs (input ids and targets [B, T], logits, loss, gradients).
struct Reference {
  explicit Reference(const std::string& dir) : file(io::SafetensorsFile::open(fixture(dir + "/reference.safetensors"))) {
    const auto shape = file.info("input_ids").shape;
    REQUIRE(shape.size() == 2);
    B = index_t(shape[0]);
    T = index_t(shape[1]);
    for (auto v : file.read_int64("input_ids")) x.push_back(nn::token_t(v));
    for (auto v : file.read_int64("targets")) y.push_back(nn::token_t(v));
  }
  io::SafetensorsFile file;
  index_t B = 0, T = 0;
  std::vector<nn::token_t> x, y;
  nn::Batch batch() const { return nn::Batch{x.data(), y.data(), B, T}; }
};

// Loads fixture `dir` and compares logits, loss and every gradient (per tensor, scaled by
// its largest entry) with the PyTorch reference, for every strategy and for chunk lengths
// that do not divide T = 13.
template <class T, index_t G>
void check_against_reference(double tol, const std::string& dir, bool tied, bool state_spaces) {
  Reference ref(dir);
  FixtureLM<T, G> m({32, tied, 0});
  io::load_mamba2(m, fixture(dir));
  for (index_t chunk : {13, 5, 1}) {
    CAPTURE(chunk);
    CHECK(scaled_err(m.logits(ref.batch(), chunk), ref.file.read<double>("logits")) < tol);
  }
  const double loss = ref.file.read<double>("loss")[0];
  const auto check = [&](const auto& strategy, const char* name) {
    CAPTURE(name);
    m.zero_grad();
    const auto r = m.forward_backward(ref.batch(), strategy);
    CHECK(std::abs(r.loss - loss) / loss < tol);
    for (auto* p : m.parameters()) {
      CAPTURE(p->name);
      Tensor<double> want = ref.file.read<double>("grad." + test::name_in_file(p->name, state_spaces));
      if (p->name == "lm_head.weight") want = test::transposed(want);
      CHECK(scaled_err(p->grad, want) < tol);
    }
  };
  check(Adjoint{13, 4}, "Adjoint{13, 4}");
  check(Adjoint{5, 2}, "Adjoint{5, 2}");
  // The other strategies in double only: float tests the arithmetic, which they share (and
  // each strategy instantiated for another model type costs compile time).
  if constexpr (std::is_same_v<T, double>) {
    check(Adjoint{4, 3}, "Adjoint{4, 3}");
    check(Backprop{}, "Backprop");
    check(Checkpointed{}, "Checkpointed");
    check(TruncatedAdjoint{13, 3}, "TruncatedAdjoint{13, 3}");
  }
}
}  // namespace test_mamba2

TEST_CASE("mamba2: a Hugging Face checkpoint (tied, one group) matches the PyTorch reference") {
  check_against_reference<double, 1>(1e-10, "mamba2_tiny", true, false);
  check_against_reference<float, 1>(1e-4, "mamba2_tiny", true, false);
}

TEST_CASE("mamba2: a Hugging Face checkpoint with two groups and an untied head matches the reference") {
  check_against_reference<double, 2>(1e-10, "mamba2_groups", false, false);
  check_against_reference<float, 2>(1e-4, "mamba2_groups", false, false);
}

TEST_CASE("mamba2: a state-spaces checkpoint with a padded vocabulary matches the reference") {
  const auto cfg = io::read_mamba2_config(fixture("mamba2_ss"));
  CHECK(cfg.layout == io::MambaLayout::state_spaces);
  CHECK(cfg.vocab == 32);  // vocab_size 29 padded to a multiple of 8
  CHECK(cfg.n_heads == 8);
  check_against_reference<double, 1>(1e-10, "mamba2_ss", true, true);
  check_against_reference<float, 1>(1e-4, "mamba2_ss", true, true);
}

TEST_CASE("mamba2: time_step_limit written by Python as [0.0, Infinity] loads") {
  const auto cfg = io::read_mamba2_config(fixture("mamba2_tiny"));
  CHECK(cfg.dt_min == 0.0);
  CHECK(std::isinf(cfg.dt_max));
  CHECK(cfg.dt_max > 0);
  CHECK(cfg.n_heads == 8);
  CHECK(cfg.head_dim == 4);
  // The words outside strings only; inside a string they stay text. Strict JSON still refuses them.
  const auto j = io::parse_json(R"({"a": [-Infinity, Infinity, NaN], "b": "Infinity", "NaNa": 1})", "text", "",
                                io::max_json_depth, true);
  CHECK(std::isinf(j["a"][0].get<double>()));
  CHECK(j["a"][0].get<double>() < 0);
  CHECK(std::isinf(j["a"][1].get<double>()));
  CHECK(std::isnan(j["a"][2].get<double>()));
  CHECK(j["b"] == "Infinity");
  CHECK(j["NaNa"] == 1);
  CHECK_THROWS_WITH_AS(io::parse_json("[Infinity]", "text"), doctest::Contains("not valid JSON"), IOError);
  CHECK_THROWS_AS(io::parse_json("[Infinityx]", "text", "", io::max_json_depth, true), IOError);
}

namespace test_mamba2 {
// A copy of fixture `dir` in `out` whose config.json has `from` replaced by `to`.
inline void copy_with_config(const std::string& dir, const test::TempDir& out, const std::string& from,
                             const std::string& to) {
  std::filesystem::copy_file(fixture(dir + "/model.safetensors"), out.file("model.safetensors"));
  std::string text = io::read_file_bounded(fixture(dir + "/config.json"), 1 << 20);
  const auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  text.replace(at, from.size(), to);
  io::write_file_atomically(out.file("config.json"), text);
}
// load_mamba2 of that copy fails with an error containing `message`, and leaves `m` unchanged.
template <class M>
void check_refused(M& m, const std::string& dir, const std::string& from, const std::string& to,
                   const std::string& message) {
  CAPTURE(to);
  test::TempDir out;
  copy_with_config(dir, out, from, to);
  std::vector<double> values;
  for (auto* p : m.parameters())
    for (index_t i = 0; i < p->numel(); ++i) values.push_back(double(p->value[i]));
  CHECK_THROWS_WITH(io::load_mamba2(m, out.path()), doctest::Contains(message.c_str()));
  std::size_t k = 0;
  bool same = true;
  for (auto* p : m.parameters())
    for (index_t i = 0; i < p->numel(); ++i) same = same && double(p->value[i]) == values[k++];
  CHECK(same);
}
}  // namespace test_mamba2

TEST_CASE("mamba2: a config that does not match the model or that ssmx cannot run names the field") {
  FixtureLM<float, 2> wrong_groups({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba2(wrong_groups, fixture("mamba2_tiny")),
                       doctest::Contains("config.json: field \"n_groups\" is 1 but the model has 2"), ShapeError);
  nn::Model<nn::Mamba2<float, 16, 4, 8, 1, 2, 4>, 2> wrong_heads({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba2(wrong_heads, fixture("mamba2_tiny")),
                       doctest::Contains("field \"head_dim\" is 4 but the model has 8"), ShapeError);
  FixtureLM<float, 2> untied({32, true, 0});
  CHECK_THROWS_WITH_AS(io::load_mamba2(untied, fixture("mamba2_groups")),
                       doctest::Contains("field \"tie_word_embeddings\" is false"), ValueError);
  // The other family's checkpoints, both ways.
  CHECK_THROWS_WITH_AS(io::load_mamba2(wrong_groups, fixture("mamba_tiny")),
                       doctest::Contains("field \"model_type\" is \"mamba\""), IOError);
  CHECK_THROWS_WITH_AS(io::read_mamba_config(fixture("mamba2_tiny")),
                       doctest::Contains("a Mamba-2 model, which loads with io::load_mamba2"), IOError);
  CHECK_THROWS_WITH_AS(io::read_mamba_config(fixture("mamba2_ss")),
                       doctest::Contains("field \"ssm_cfg.layer\" is \"Mamba2\""), IOError);
  CHECK_THROWS_WITH_AS(io::read_mamba2_config(fixture("mamba_untied_ss")),
                       doctest::Contains("field \"ssm_cfg.layer\" is \"Mamba1\", expected \"Mamba2\""), IOError);
  // Values ssmx cannot run, each refused before any parameter is touched.
  FixtureLM<float> m({32, true, 0});
  const std::string limit = "\"time_step_limit\": [0.0, Infinity]";
  check_refused(m, "mamba2_tiny", limit, "\"time_step_limit\": [0.5, 0.1]", "field \"time_step_limit\" is [0.5,0.1]");
  check_refused(m, "mamba2_tiny", limit, "\"time_step_limit\": [NaN, 1.0]", "field \"time_step_limit\"");
  check_refused(m, "mamba2_tiny", limit, "\"time_step_limit\": 0.5", "expected [lo, hi]");
  check_refused(m, "mamba2_tiny", "\"num_heads\": 8", "\"num_heads\": 7", "num_heads × head_dim = 7 × 4 = 28");
  check_refused(m, "mamba2_tiny", "\"use_bias\": false", "\"use_bias\": true", "field \"use_bias\" is true");
  check_refused(m, "mamba2_tiny", "\"rms_norm\": true", "\"rms_norm\": true, \"norm_before_gate\": true",
                "field \"norm_before_gate\" is true");
  check_refused(m, "mamba2_tiny", "\"model_type\": \"mamba2\"", "\"model_type\": \"bamba\"",
                "field \"model_type\" is \"bamba\"");
  check_refused(m, "mamba2_ss", "\"layer\": \"Mamba2\"", "\"layer\": \"Mamba2\", \"d_ssm\": 16",
                "field \"ssm_cfg.d_ssm\" is 16");
  check_refused(m, "mamba2_ss", "\"attn_layer_idx\": []", "\"attn_layer_idx\": [1]", "no attention layers");
  check_refused(m, "mamba2_ss", "\"d_intermediate\": 0", "\"d_intermediate\": 64", "no MLP");
  // A finite limit loads into every layer.
  test::TempDir out;
  copy_with_config("mamba2_tiny", out, limit, "\"time_step_limit\": [0.001, 0.5]");
  io::load_mamba2(m, out.path());
  CHECK(m.block(1).mixer.dt_min == 0.001);
  CHECK(m.block(1).mixer.dt_max == 0.5);
}

namespace test_mamba2 {
// save_mamba2 of fixture `dir` loaded into M: every tensor byte for byte as PyTorch stored
// it, the infinite limit spelled as Python does, and the export loads back bit for bit.
template <class M>
void check_save_round_trip(const std::string& dir, bool tied) {
  CAPTURE(dir);
  M m({32, tied, 0});
  io::load_mamba2(m, fixture(dir));
  test::TempDir out;
  io::save_mamba2(m, out.path(), 1e-5);
  const auto theirs = io::SafetensorsFile::open(fixture(dir + "/model.safetensors"));
  const auto ours = io::SafetensorsFile::open(out.file("model.safetensors"));
  REQUIRE(ours.tensors().size() == theirs.tensors().size());
  for (const auto& t : theirs.tensors()) {
    CAPTURE(t.name);
    REQUIRE(ours.has(t.name));
    CHECK(ours.info(t.name).shape == t.shape);
    const Tensor<float> a = ours.read<float>(t.name), b = theirs.read<float>(t.name);
    CHECK(test::bytes_of(a.data(), a.numel()) == test::bytes_of(b.data(), b.numel()));
  }
  const std::string text = io::read_file_bounded(out.file("config.json"), 1 << 20);
  CHECK(text.find("\"time_step_limit\": [0.0, Infinity]") != std::string::npos);
  const auto cfg = io::read_mamba2_config(out.path());
  CHECK(cfg.tie_embeddings == tied);
  CHECK(std::isinf(cfg.dt_max));
  M back({32, tied, 7});
  io::load_mamba2(back, out.path());
  const auto pa = m.parameters(), pb = back.parameters();
  for (std::size_t k = 0; k < pa.size(); ++k)
    CHECK(test::bytes_of(pa[k]->value.data(), pa[k]->numel()) == test::bytes_of(pb[k]->value.data(), pb[k]->numel()));
}
}  // namespace test_mamba2

TEST_CASE("mamba2: save_mamba2 writes what PyTorch stores and loads back bit for bit") {
  check_save_round_trip<FixtureLM<float, 1>>("mamba2_tiny", true);
  check_save_round_trip<FixtureLM<float, 2>>("mamba2_groups", false);
}
#endif  // SSMX_TEST_MAMBA2_IO
#endif
