// The fused scan (nn/fused.hpp) and the structured chunked scan (nn/structured.hpp) against
// the materialised path they replace, in double: every layer, every strategy, chunk lengths
// 1, 7, 256 and T, lengths no chunk divides, packed documents, carried states and their
// gradients, bf16 storage; bit-identity across thread counts; the path that ran (a silent
// fall-back fails here); both walks of the fused scan.
#include "../support/test_support.hpp"

#include <cmath>
#include <limits>

#if !SSMX_TEST_CUDA
#include <ssmx/nn/model.hpp>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../examples/custom_layer.hpp"

namespace test_fused {
using namespace ssmx;
using nn::token_t;

constexpr index_t vocab = 13;

template <class T>
struct tag {
  using type = T;
};

// GatedSSM with a decay in (1, 3): outside the structured scan's range (a layer that grows
// its state; stable enough over a few dozen tokens).
template <class T, index_t P, index_t N>
struct GrowingSSM : GatedSSM<T, P, N> {
  template <Space S2>
  using on = GrowingSSM;  // its own, not GatedSSM's (the host only)
  using GatedSSM<T, P, N>::GatedSSM;
  template <class U>
  auto decay(const U& u) const {
    return unsqueeze(1.0 + 2.0 * sigmoid(matmul(u, this->W_a.value) + this->b_a.value), 1);
  }
};

using Diagonal = nn::DiagonalSSM<double, 8, 4>;
using Diagonal16 = nn::DiagonalSSM<double, 24, 16>;  // a longer state row: the natural walk by the rule
using MambaSmall = nn::Mamba<double, 8, 4, 2, 4, 2>;
using Gated = GatedSSM<double, 8, 3>;
// Mamba-2: a scalar decay per head on a state [H, P, N]. One group of B and C shared by the
// 4 heads (computed once per chunk), or 2 groups (the heads' own copies).
using Mamba2One = nn::Mamba2<double, 8, 4, 4, 1, 2, 4>;
using Mamba2Groups = nn::Mamba2<double, 8, 4, 4, 2, 2, 4>;

struct Data {
  std::vector<token_t> x, y;
  std::vector<std::uint8_t> starts;
  nn::Batch batch;
  Data(index_t rows, index_t len, bool packed, std::uint64_t seed = 7)
      : x(std::size_t(rows * len)), y(x.size()), starts(x.size(), 0) {
    test::Rng rng(seed);
    for (auto& t : x) t = token_t(rng.integer(0, vocab - 1));
    for (std::size_t i = 0; i < y.size(); ++i) y[i] = i % 5 == 2 ? token_t(-1) : token_t(rng.integer(0, vocab - 1));
    for (index_t b = 0; b < rows; ++b) {
      starts[std::size_t(b * len)] = 1;
      for (index_t t = 11 + b; t < len; t += 37) starts[std::size_t(b * len + t)] = 1;
      if (len > 3) starts[std::size_t(b * len + len - 2)] = 1;  // a document of two tokens at the end
    }
    batch = nn::Batch{x.data(), y.data(), rows, len, packed ? starts.data() : nullptr};
  }
};

// Every parameter's gradient, one vector each.
template <class M>
std::vector<std::vector<double>> param_grads(M& m) {
  std::vector<std::vector<double>> out;
  for (auto* p : m.parameters()) out.emplace_back(p->grad.data(), p->grad.data() + p->numel());
  return out;
}

// max |a - b| / max |b|: the error against the tensor's own scale. The paths sum over tokens
// and state channels in different orders, so entries far below a tensor's largest carry the
// rounding of the larger ones.
double scaled_err(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(a[i] - b[i]) <= diff)) diff = std::fabs(a[i] - b[i]);  // NaN propagates
    scale = std::max(scale, std::fabs(b[i]));
  }
  return scale > 0 ? diff / scale : diff;
}

nn::ModelConfig config(nn::ScanPath path, bool bf16 = false) {
  nn::ModelConfig c;
  c.vocab = vocab;
  c.seed = 23;
  c.bf16_inputs = bf16;
  c.fused = path != nn::ScanPath::materialised;
  c.structured = path == nn::ScanPath::structured;
  return c;
}

// Loss, every gradient, and the states' gradients of one step.
struct Result {
  double loss = 0;
  std::vector<std::vector<double>> grads;
  std::vector<double> state_grads, final_states;
};

template <class Layer, index_t K = 2, class Strategy>
Result step(nn::ScanPath path, const nn::Batch& b, const Strategy& s, bool with_states = false, bool bf16 = false) {
  nn::Model<Layer, K> m(config(path, bf16));
  // Larger weights than the initialisation's, so that every term matters.
  test::Rng rng(41);
  for (auto* p : m.parameters())
    for (index_t i = 0; i < p->numel(); ++i) p->value[i] += rng.normal(0, 0.05);
  nn::LayerStates<double> st;
  const index_t S = Layer::state_dims().numel(), H = nn::layer_halo<Layer>::value;
  if (with_states) {
    for (index_t k = 0; k < K; ++k) {
      st.initial.push_back(test::normal<double>(Dims{b.batch, S}, 100 + std::uint64_t(k), 0, 0.5));
      st.final_grad.push_back(test::normal<double>(Dims{b.batch, S}, 200 + std::uint64_t(k), 0, 0.5));
      if (H > 0) {
        st.initial_halo.push_back(test::normal<double>(Dims{b.batch, H, Layer::d_model}, 300 + std::uint64_t(k)));
        st.final_halo_grad.push_back(test::normal<double>(Dims{b.batch, H, Layer::d_model}, 400 + std::uint64_t(k)));
      }
    }
  }
  m.zero_grad();
  Result r;
  r.loss = m.forward_backward(b, s, with_states ? &st : nullptr).loss;
  r.grads = param_grads(m);
  if (with_states)
    for (index_t k = 0; k < K; ++k) {
      const auto g = to_vector(st.initial_grad[std::size_t(k)]);
      r.state_grads.insert(r.state_grads.end(), g.begin(), g.end());
      const auto f = to_vector(st.final_states[std::size_t(k)]);
      r.final_states.insert(r.final_states.end(), f.begin(), f.end());
      if (H > 0) {
        const auto gh = to_vector(st.initial_halo_grad[std::size_t(k)]);
        r.state_grads.insert(r.state_grads.end(), gh.begin(), gh.end());
      }
    }
  return r;
}

void check_close(const Result& got, const Result& want, double tol = 1e-12) {
  CHECK(std::fabs(got.loss - want.loss) <= tol * std::fabs(want.loss));
  REQUIRE(got.grads.size() == want.grads.size());
  for (std::size_t i = 0; i < want.grads.size(); ++i) {
    CAPTURE(i);
    CHECK(scaled_err(got.grads[i], want.grads[i]) <= tol);
  }
  CHECK(scaled_err(got.state_grads, want.state_grads) <= tol);
  CHECK(scaled_err(got.final_states, want.final_states) <= tol);
}

// The number of stretch passes per path in one call of f.
template <class F>
nn::ScanCounts counts_of(F&& f) {
  nn::reset_scan_counts();
  f();
  return nn::scan_counts();
}
}  // namespace test_fused

using namespace test_fused;

TEST_CASE("fused: the rule picks the fused scan for every layer and the structured one for shared decays") {
  static_assert(nn::Fusion<nn::DiagonalSSM<float, 256, 16>>::value, "DiagonalSSM fuses");
  static_assert(nn::Fusion<nn::Mamba<float, 64, 16, 2, 4, 4>>::value, "Mamba fuses");
  static_assert(nn::Fusion<GatedSSM<float, 16, 4>>::value, "the example layer fuses");
  static_assert(nn::detail::structured_shape_v<nn::DiagonalSSM<float, 256, 16>>, "DiagonalSSM: a shared decay");
  static_assert(nn::detail::structured_shape_v<GatedSSM<float, 16, 4>>, "GatedSSM: a shared decay");
  static_assert(!nn::detail::structured_shape_v<nn::Mamba<float, 64, 16, 2, 4, 4>>, "Mamba: a decay per coefficient");
  static_assert(nn::detail::structured_shape_v<nn::Mamba2<float, 64, 16, 16, 1, 2, 4>>, "Mamba2: a decay per head");
  const Data d(1, 40, false);
  auto run = [&](auto tag, nn::ScanPath path) {
    using Layer = typename decltype(tag)::type;
    return counts_of([&] { step<Layer>(path, d.batch, Adjoint{16, 8}); });
  };
  const auto diag = run(tag<Diagonal>{}, nn::ScanPath::structured);
  CHECK(diag.materialised == 0);
  CHECK(diag.fused == 0);
  CHECK(diag.structured > 0);
  const auto mamba = run(tag<MambaSmall>{}, nn::ScanPath::structured);
  CHECK(mamba.materialised == 0);
  CHECK(mamba.structured == 0);
  CHECK(mamba.fused > 0);
  for (const auto& m2 : {run(tag<Mamba2One>{}, nn::ScanPath::structured),
                         run(tag<Mamba2Groups>{}, nn::ScanPath::structured)}) {
    CHECK(m2.materialised == 0);
    CHECK(m2.fused == 0);
    CHECK(m2.structured > 0);
  }
  const auto mamba2_fused = run(tag<Mamba2One>{}, nn::ScanPath::fused);
  CHECK(mamba2_fused.structured == 0);
  CHECK(mamba2_fused.fused > 0);
  const auto gated = run(tag<Gated>{}, nn::ScanPath::fused);
  CHECK(gated.materialised == 0);
  CHECK(gated.structured == 0);
  CHECK(gated.fused > 0);
  const auto ref = run(tag<Diagonal>{}, nn::ScanPath::materialised);
  CHECK(ref.fused + ref.structured == 0);
  CHECK(ref.materialised > 0);
}

TEST_CASE_TEMPLATE("fused: every path equals the materialised one for every chunk length", Layer, Diagonal, Diagonal16,
                   MambaSmall, Gated, Mamba2One, Mamba2Groups) {
  for (index_t len : {index_t(1), index_t(45), index_t(300)}) {
    const Data d(2, len, false);
    for (index_t chunk : {index_t(1), index_t(7), index_t(256), len}) {
      if (len > 100 && chunk == 1) continue;  // 300 one-token chunks: covered by the shorter sequence
      CAPTURE(len);
      CAPTURE(chunk);
      const Result ref = step<Layer>(nn::ScanPath::materialised, d.batch, Adjoint{chunk, 5});
      check_close(step<Layer>(nn::ScanPath::fused, d.batch, Adjoint{chunk, 5}), ref);
      check_close(step<Layer>(nn::ScanPath::structured, d.batch, Adjoint{chunk, 5}), ref);
    }
  }
}

TEST_CASE_TEMPLATE("fused: packed documents, carried states and their gradients, bf16 storage", Layer, Diagonal,
                   MambaSmall, Gated, Mamba2One, Mamba2Groups) {
  const Data d(2, 83, true);
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    const Result ref = step<Layer>(nn::ScanPath::materialised, d.batch, Adjoint{19, 4}, true, bf16);
    check_close(step<Layer>(nn::ScanPath::fused, d.batch, Adjoint{19, 4}, true, bf16), ref);
    check_close(step<Layer>(nn::ScanPath::structured, d.batch, Adjoint{19, 4}, true, bf16), ref);
  }
}

TEST_CASE_TEMPLATE("fused: every strategy equals itself on the materialised path", Layer, Diagonal, MambaSmall,
                   Mamba2One) {
  const Data d(1, 70, true);
  auto both = [&](const auto& s) {
    const Result ref = step<Layer>(nn::ScanPath::materialised, d.batch, s, true);
    check_close(step<Layer>(nn::ScanPath::fused, d.batch, s, true), ref);
    check_close(step<Layer>(nn::ScanPath::structured, d.batch, s, true), ref);
  };
  both(Backprop{});
  both(Checkpointed{});
  both(Adjoint{16, 3});
  both(TruncatedAdjoint{20, 6});
  both(TruncatedAdjoint{70, 6});
  both(PaperAdjoint{9});
  both(PaperAdjoint{0});
}

TEST_CASE("fused: both walks of the fused scan give the same gradients") {
  const Data d(1, 60, true);
  const Result ref = step<Diagonal>(nn::ScanPath::materialised, d.batch, Adjoint{25, 5}, true);
  for (int walk : {1, 2}) {
    CAPTURE(walk);
    nn::fused::walk_override() = walk;
    check_close(step<Diagonal>(nn::ScanPath::fused, d.batch, Adjoint{25, 5}, true), ref);
    check_close(step<MambaSmall>(nn::ScanPath::fused, d.batch, Adjoint{25, 5}, true),
                step<MambaSmall>(nn::ScanPath::materialised, d.batch, Adjoint{25, 5}, true));
  }
  nn::fused::walk_override() = 0;
}

TEST_CASE("fused: evaluate and logits stream the same values on every path") {
  const Data d(2, 50, true);
  auto logits = [&](nn::ScanPath path) {
    nn::Model<MambaSmall, 2> m(config(path));
    return to_vector(m.logits(d.batch, 13));
  };
  const auto ref = logits(nn::ScanPath::materialised);
  CHECK(test::max_rel_err(logits(nn::ScanPath::fused), ref, 1e-9) <= 1e-12);
  nn::Model<Diagonal, 2> a(config(nn::ScanPath::structured)), b(config(nn::ScanPath::materialised));
  const double la = a.evaluate(d.batch, 17).loss, lb = b.evaluate(d.batch, 17).loss;
  CHECK(std::fabs(la - lb) <= 1e-12 * std::fabs(lb));
}

TEST_CASE("fused: gradients are bit-identical across runs and thread counts") {
#if defined(_OPENMP)
  const Data d(2, 300, true);
  const int saved = omp_get_max_threads();
  auto run = [&](auto tag, int threads, nn::ScanPath path) {
    omp_set_num_threads(threads);
    nn::Model<typename decltype(tag)::type, 2> m(config(path));
    m.zero_grad();
    m.forward_backward(d.batch, Adjoint{128, 16});
    std::vector<unsigned char> bytes;
    for (auto* p : m.parameters()) {
      const auto b = test::bytes_of(p->grad.data(), p->numel());
      bytes.insert(bytes.end(), b.begin(), b.end());
    }
    return bytes;
  };
  auto same = [&](auto tag, nn::ScanPath path) {
    const auto one = run(tag, 1, path);
    CHECK(run(tag, 1, path) == one);
    CHECK(run(tag, 2, path) == one);
    CHECK(run(tag, 3, path) == one);
  };
  for (auto path : {nn::ScanPath::fused, nn::ScanPath::structured}) same(tag<nn::DiagonalSSM<float, 64, 16>>{}, path);
  same(tag<nn::Mamba2<float, 32, 16, 16, 1, 2, 4>>{}, nn::ScanPath::structured);
  omp_set_num_threads(saved);
#else
  MESSAGE("built without OpenMP: one thread only");
#endif
}

// The workspace and activation peak of one step of a one-layer model, T tokens in one chunk.
template <index_t P, index_t N>
std::size_t step_peak(nn::ScanPath path, index_t T) {
  using Net = nn::Model<nn::DiagonalSSM<float, P, N>, 1>;
  const Data d(1, T, false);
  Net m(config(path));
  m.zero_grad();
  reset_peak(Space::Host);
  m.forward_backward(d.batch, Adjoint{T, T});
  const MemoryStats ms = memory_stats(Space::Host);
  return ms.peak_by_tag[int(Tag::Workspace)] + ms.peak_by_tag[int(Tag::Activations)];
}

TEST_CASE("fused: the hot path holds no [tokens x state] tensor") {
  // The same layer with N = 16 and N = 64: every [T, P, N] tensor the step holds at its peak
  // adds T * P * 48 floats. The materialised path holds a and h (at least two); the fused
  // and structured paths hold per-token [T, P] and [T, N] buffers and tile or chunk buffers,
  // so they must grow by less than one.
  constexpr index_t T = 2048, P = 32;
  const std::size_t one = std::size_t(T * P * (64 - 16)) * sizeof(float);
  for (auto path : {nn::ScanPath::materialised, nn::ScanPath::fused, nn::ScanPath::structured}) {
    const std::size_t small = step_peak<P, 16>(path, T), large = step_peak<P, 64>(path, T);
    CAPTURE(int(path));
    MESSAGE("path ", int(path), ": workspace + activation peak ", small, " bytes at N = 16, ", large,
            " at N = 64; one [T x P x 48] tensor is ", one);
    REQUIRE(large > small);
    if (path == nn::ScanPath::materialised)
      CHECK(large - small > 2 * one);
    else
      CHECK(large - small < one);
  }
}

// Layers that break the contract, each in one map.
template <class T, index_t P, index_t N>
struct FlatDecay : GatedSSM<T, P, N> {  // decay [tokens, P] for a state [P, N]
  template <Space S2>
  using on = FlatDecay;
  using GatedSSM<T, P, N>::GatedSSM;
  template <class U>
  auto decay(const U& u) const {
    return sigmoid(matmul(u, this->W_g.value));
  }
};
template <class T, index_t P, index_t N>
struct NarrowReadout : GatedSSM<T, P, N> {  // readout [tokens, N] for d_model P
  template <Space S2>
  using on = NarrowReadout;
  using GatedSSM<T, P, N>::GatedSSM;
  template <class H, class U>
  auto readout(const H&, const U& u) const {
    return matmul(u, this->W_c.value);
  }
};

TEST_CASE("fused: a map of the wrong shape is named with its layer, the shape it has and the one it needs") {
  const Data d(1, 16, false);
  for (auto path : {nn::ScanPath::materialised, nn::ScanPath::fused, nn::ScanPath::structured}) {
    CAPTURE(int(path));
    const std::string flat = test::message_of<ShapeError>(
        [&] { step<FlatDecay<double, 8, 4>, 1>(path, d.batch, Adjoint{16, 8}); });
    CHECK(flat.find("FlatDecay<double, 8l, 4l") != std::string::npos);
    CHECK(flat.find("decay(u) has shape [16, 8] for 16 tokens; it must broadcast to [tokens, state] = [16, 8, 4]") !=
          std::string::npos);
    const std::string narrow = test::message_of<ShapeError>(
        [&] { step<NarrowReadout<double, 8, 4>, 1>(path, d.batch, Adjoint{16, 8}); });
    CHECK(narrow.find("NarrowReadout<double, 8l, 4l") != std::string::npos);
    CHECK(narrow.find("readout(h, u) has shape [16, 4] for 16 tokens") != std::string::npos);
    CHECK(narrow.find("it must be [tokens, d_model] = [16, 8]") != std::string::npos);
  }
}

TEST_CASE("fused: a decay above 1 is reported with its layer before it grows the state") {
  // GrowingSSM's decay is in (1, 3): the loss would end as inf or NaN after a few hundred
  // tokens; the first token's decay names the map instead, on every path and strategy.
  using Growing = GrowingSSM<double, 8, 3>;
  const Data d(1, 30, false);
  for (auto path : {nn::ScanPath::materialised, nn::ScanPath::fused, nn::ScanPath::structured}) {
    CAPTURE(int(path));
    const std::string msg = test::message_of<ValueError>([&] { step<Growing, 1>(path, d.batch, Adjoint{30, 8}); });
    CHECK(msg.find("GrowingSSM<double, 8l, 3l") != std::string::npos);
    CHECK(msg.find("decay(u) is ") != std::string::npos);
    CHECK(msg.find("a decay must lie in [0, 1]") != std::string::npos);
    CHECK_THROWS_AS((step<Growing, 1>(path, d.batch, Backprop{})), ValueError);
  }
}
#endif
