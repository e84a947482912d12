// Layer sharding and sequence sharding against the single-process Adjoint, in double, run
// by every rank of an mpiexec job with 2 and 3 ranks (tests/dist/CMakeLists.txt). Every
// rank also computes the single-process reference itself.
//
// Agreement is measured per tensor as max|a - b| / max|b|: the sharded runs add the same
// terms in another order (shard boundaries move with the ranks, all-reduces sum across
// ranks), so elements that cancel to near zero can differ relatively more than the
// tensor as a whole.
#include "support/test_support.hpp"

#include <map>
#include <string>

#include <ssmx/dist/communicator.hpp>
#include <ssmx/dist/layer_parallel.hpp>
#include <ssmx/dist/sequence_parallel.hpp>

namespace test_sharding {

using namespace ssmx;
using nn::token_t;
using ssmx::test::Rng;

template <class T>
double rel_err(const Tensor<T>& a, const Tensor<T>& b) {
  if (a.dims() != b.dims()) return std::numeric_limits<double>::infinity();
  double diff = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

constexpr double tol = 1e-10;

// Two sequences of 23 tokens (not divisible by 2 or 3), some targets ignored, and document
// starts, one of them right after where a rank boundary falls for R = 2 and R = 3.
struct Data {
  index_t B = 2, L = 23, vocab = 13;
  std::vector<token_t> inputs, targets;
  std::vector<std::uint8_t> starts;
  explicit Data(bool with_starts) {
    Rng rng(91);
    for (index_t i = 0; i < B * L; ++i) {
      inputs.push_back(token_t(rng.integer(0, vocab - 1)));
      targets.push_back(rng.uniform(0, 1) < 0.15 ? token_t(-1) : token_t(rng.integer(0, vocab - 1)));
    }
    if (with_starts) {
      starts.assign(std::size_t(B * L), 0);
      for (index_t t : {index_t(0), index_t(9), index_t(13)}) starts[std::size_t(t)] = 1;
      for (index_t t : {index_t(5), index_t(16), index_t(20)}) starts[std::size_t(L + t)] = 1;
    }
  }
  nn::Batch batch() const {
    return nn::Batch{inputs.data(), targets.data(), B, L, starts.empty() ? nullptr : starts.data()};
  }
};

template <class T>
std::map<std::string, const Parameter<T>*> by_name(const ParameterList<T>& list) {
  std::map<std::string, const Parameter<T>*> m;
  for (auto* p : list) m[p->name] = p;
  return m;
}

// Random LayerStates inputs (initial states and halo rows, final-state gradients).
template <class Model>
nn::LayerStates<double> random_states(index_t B, std::uint64_t seed) {
  using Layer = typename Model::layer_type;
  constexpr index_t K = Model::num_layers, halo = nn::layer_halo<Layer>::value;
  const index_t S = nn::state_numel(Layer::state_dims());
  nn::LayerStates<double> st;
  for (index_t k = 0; k < K; ++k) {
    const std::uint64_t s = seed + 10 * std::uint64_t(k);
    st.initial.push_back(ssmx::test::uniform<double>(Dims{B, S}, s, -0.5, 0.5));
    st.final_grad.push_back(ssmx::test::uniform<double>(Dims{B, S}, s + 1, -0.5, 0.5));
    if (halo > 0) {
      st.initial_halo.push_back(ssmx::test::uniform<double>(Dims{B, halo, Model::d_model}, s + 2, -1, 1));
      st.final_halo_grad.push_back(ssmx::test::uniform<double>(Dims{B, halo, Model::d_model}, s + 3, -0.5, 0.5));
    }
  }
  return st;
}

void check_states(const nn::LayerStates<double>& got, const nn::LayerStates<double>& ref, index_t kb, index_t ke) {
  auto cmp = [&](const std::vector<Tensor<double>>& g, const std::vector<Tensor<double>>& r, const char* what) {
    REQUIRE(g.size() == r.size());
    for (index_t k = kb; k < ke && k < index_t(r.size()); ++k) {
      CAPTURE(what);
      CAPTURE(k);
      CHECK(rel_err(g[std::size_t(k)], r[std::size_t(k)]) <= tol);
    }
  };
  cmp(got.final_states, ref.final_states, "final_states");
  cmp(got.final_halo, ref.final_halo, "final_halo");
  cmp(got.initial_grad, ref.initial_grad, "initial_grad");
  cmp(got.initial_halo_grad, ref.initial_halo_grad, "initial_halo_grad");
}

enum class Scheme { layer, sequence };

// Loss, parameter gradients and LayerStates outputs of one sharded forward_backward equal
// the single-process Adjoint's.
template <class Model>
void check_gradients(Scheme scheme, bool tied, bool with_starts, bool with_states) {
  dist::Communicator comm;
  const Data d(with_starts);
  typename Model::Config cfg;
  cfg.vocab = d.vocab;
  cfg.seed = 5;
  cfg.tie_embeddings = tied;
  Model serial(cfg);
  const Adjoint strategy{4, 2};
  nn::LayerStates<double> ref_states = random_states<Model>(d.B, 40), states = random_states<Model>(d.B, 40);
  const nn::StepResult ref = serial.forward_backward(d.batch(), strategy, with_states ? &ref_states : nullptr);

  if (scheme == Scheme::layer) {
    std::tie(cfg.layer_begin, cfg.layer_end) = dist::layer_block(Model::num_layers, comm.rank(), comm.size());
    // A rank needs only its own layers' entries; the others may be empty.
    for (index_t k = 0; k < Model::num_layers; ++k)
      if (k < cfg.layer_begin || k >= cfg.layer_end)
        for (auto* v : {&states.initial, &states.final_grad, &states.initial_halo, &states.final_halo_grad})
          if (!v->empty()) (*v)[std::size_t(k)] = Tensor<double>();
  }
  Model sharded(cfg);
  nn::LayerStates<double>* sp = with_states ? &states : nullptr;
  const nn::StepResult got = scheme == Scheme::layer
                                 ? dist::layer_parallel_forward_backward(sharded, comm, d.batch(), strategy, sp)
                                 : dist::sequence_parallel_forward_backward(sharded, comm, d.batch(), strategy, sp);
  CHECK(got.tokens == ref.tokens);
  CHECK(got.correct == ref.correct);
  CHECK(std::fabs(got.loss - ref.loss) <= tol * std::fabs(ref.loss));
  const auto want = by_name(serial.parameters());
  const auto mine = sharded.parameters();
  CHECK(!mine.empty());
  for (auto* p : mine) {
    CAPTURE(p->name);
    REQUIRE(want.count(p->name) == 1);
    CHECK(rel_err(p->value, want.at(p->name)->value) == 0.0);  // the same initial values
    CHECK(rel_err(p->grad, want.at(p->name)->grad) <= tol);
  }
  if (with_states) check_states(states, ref_states, sharded.layer_begin(), sharded.layer_end());
}

using Diag = nn::Model<nn::DiagonalSSM<double, 8, 4>, 3>;
using Mamba = nn::Model<nn::Mamba<double, 8, 4, 2, 4>, 3>;

}  // namespace test_sharding

using namespace test_sharding;

TEST_CASE("dist: layer_block and sequence_block split contiguously") {
  for (int R : {1, 2, 3, 4}) {
    index_t next = 0;
    for (int r = 0; r < R; ++r) {
      const auto [t0, t1] = dist::sequence_block(23, r, R);
      CHECK(t0 == next);
      CHECK(t1 - t0 >= 23 / R);
      CHECK(t1 - t0 <= 23 / R + 1);
      next = t1;
    }
    CHECK(next == 23);
    next = 0;
    for (int r = 0; r < R; ++r) {
      const auto [k0, k1] = dist::layer_block(5, r, R);
      CHECK(k0 == next);
      CHECK(k1 > k0);
      next = k1;
    }
    CHECK(next == 5);
  }
  CHECK_THROWS_WITH_AS(dist::layer_block(2, 0, 3), doctest::Contains("2 layers cannot be split over 3 ranks"),
                       ValueError);
}

TEST_CASE("dist: a layer-sharded model holds its part with the whole model's initial values") {
  Diag::Config cfg;
  cfg.vocab = 13;
  cfg.tie_embeddings = false;
  cfg.layer_begin = 1;
  cfg.layer_end = 2;
  Diag mid(cfg);
  CHECK(!mid.holds_embedding());
  CHECK(!mid.holds_head());
  CHECK(mid.parameters().size() == Diag(Diag::Config{13, false, 0}).block(1).parameters().size());
  CHECK_THROWS_WITH_AS(mid.block(0), doctest::Contains("holds layers [1, 2)"), ValueError);
  const Data d(false);
  CHECK_THROWS_WITH_AS(mid.evaluate(d.batch()), doctest::Contains("layer_parallel_evaluate"), ValueError);
  cfg.layer_end = 1;
  CHECK_THROWS_WITH_AS(Diag{cfg}, doctest::Contains("not a non-empty range"), ValueError);
}

TEST_CASE("dist: layer sharding gives the single-process Adjoint gradients") {
  SUBCASE("DiagonalSSM, tied") { check_gradients<Diag>(Scheme::layer, true, false, false); }
  SUBCASE("DiagonalSSM, untied, document starts, carried states") {
    check_gradients<Diag>(Scheme::layer, false, true, true);
  }
  SUBCASE("Mamba, tied, document starts, carried states and halo") {
    check_gradients<Mamba>(Scheme::layer, true, true, true);
  }
}

TEST_CASE("dist: sequence sharding gives the single-process Adjoint gradients") {
  SUBCASE("DiagonalSSM, tied") { check_gradients<Diag>(Scheme::sequence, true, false, false); }
  SUBCASE("DiagonalSSM, untied, document starts, carried states") {
    check_gradients<Diag>(Scheme::sequence, false, true, true);
  }
  SUBCASE("Mamba (halo crosses ranks), untied") { check_gradients<Mamba>(Scheme::sequence, false, false, false); }
  SUBCASE("Mamba, tied, document starts, carried states and halo") {
    check_gradients<Mamba>(Scheme::sequence, true, true, true);
  }
}

TEST_CASE("dist: sharded train steps and evaluation equal the single-process ones") {
  dist::Communicator comm;
  const Data d(true);
  Mamba::Config cfg;
  cfg.vocab = d.vocab;
  cfg.seed = 8;
  Mamba serial(cfg), seq(cfg);
  Mamba::Config lcfg = cfg;
  std::tie(lcfg.layer_begin, lcfg.layer_end) = dist::layer_block(3, comm.rank(), comm.size());
  Mamba lay(lcfg);
  AdamW<double> o_serial(1e-2), o_seq(1e-2), o_lay(1e-2);
  nn::StepOptions so;
  so.clip_norm = 0.05;  // active: clipping must use the global norm
  const Adjoint strategy{5, 3};
  for (int step = 0; step < 2; ++step) {
    CAPTURE(step);
    const auto s = nn::train_step(serial, o_serial, d.batch(), strategy, so);
    const auto q = dist::sequence_parallel_train_step(seq, o_seq, comm, d.batch(), strategy, so);
    const auto l = dist::layer_parallel_train_step(lay, o_lay, comm, d.batch(), strategy, so);
    CHECK(s.grad_norm > so.clip_norm);
    for (const auto* r : {&q, &l}) {
      CHECK(r->tokens == s.tokens);
      CHECK(std::fabs(r->loss - s.loss) <= tol * std::fabs(s.loss));
      CHECK(std::fabs(r->grad_norm - s.grad_norm) <= tol * s.grad_norm);
    }
  }
  const auto want = by_name(serial.parameters());
  for (Mamba* m : {&seq, &lay})
    for (auto* p : m->parameters()) {
      CAPTURE(p->name);
      // AdamW divides by sqrt(v): rounding in the gradients grows a little through it.
      CHECK(rel_err(p->value, want.at(p->name)->value) <= 1e-9);
    }

  const nn::StepResult e = serial.evaluate(d.batch(), 6);
  const nn::StepResult eq = dist::sequence_parallel_evaluate(seq, comm, d.batch());
  const nn::StepResult el = dist::layer_parallel_evaluate(lay, comm, d.batch());
  for (const auto* r : {&eq, &el}) {
    CHECK(r->tokens == e.tokens);
    CHECK(std::fabs(r->loss - e.loss) <= 1e-9 * std::fabs(e.loss));
  }
}

TEST_CASE("dist: sharding errors are the same on every rank") {
  dist::Communicator comm;
  const Data d(false);
  Mamba::Config cfg;
  cfg.vocab = d.vocab;
  Mamba whole(cfg);
  // Every rank holding all layers is not a layer split (for R > 1).
  if (comm.size() > 1)
    CHECK_THROWS_WITH_AS(dist::layer_parallel_forward_backward(whole, comm, d.batch()),
                         doctest::Contains("instead of its block"), ValueError);
  // Too few tokens per rank for the convolution halo: a clear error before any transfer.
  const nn::Batch tiny{d.inputs.data(), d.targets.data(), 1, 3 * comm.size() - 1};
  CHECK_THROWS_WITH_AS(dist::sequence_parallel_forward_backward(whole, comm, tiny),
                       doctest::Contains("convolution halo of 3"), ValueError);
  // A bad token: every rank throws (the batch is the same everywhere), nothing changes.
  std::vector<token_t> bad = d.inputs;
  bad[7] = token_t(d.vocab);
  const nn::Batch bad_batch{bad.data(), d.targets.data(), d.B, d.L};
  AdamW<double> opt(1e-2);
  const auto before = whole.parameters()[0]->value.clone();
  CHECK_THROWS_WITH_AS(dist::sequence_parallel_train_step(whole, opt, comm, bad_batch),
                       doctest::Contains("outside the vocabulary"), ValueError);
  CHECK(rel_err(whole.parameters()[0]->value, before) == 0.0);
}

// Data parallel across groups of sharded ranks: D groups (2 when the rank count is even)
// of G = R / D ranks; group g trains on row g of the batch, sharded within the group,
// and totals and gradients are summed over the `replicas` (the ranks holding the same
// part in the other groups). With 4 ranks: 2 × 2 (tests/dist/CMakeLists.txt runs it).
TEST_CASE("dist: sharding combined with data parallelism") {
  dist::Communicator world;
  const int R = world.size(), D = R % 2 == 0 ? 2 : 1, G = R / D, g = world.rank() / G;
  dist::Communicator group = world.split(g, world.rank()), replicas = world.split(world.rank() % G, world.rank());
  const Data d(true);
  Mamba::Config cfg;
  cfg.vocab = d.vocab;
  cfg.seed = 12;
  Mamba serial(cfg);
  const Adjoint strategy{4, 2};
  // The rows of the whole batch: the first D (one per group).
  const nn::Batch whole{d.inputs.data(), d.targets.data(), D, d.L, d.starts.data()};
  const nn::StepResult ref = serial.forward_backward(whole, strategy);
  const nn::Batch row{d.inputs.data() + g * d.L, d.targets.data() + g * d.L, 1, d.L, d.starts.data() + g * d.L};
  const auto want = by_name(serial.parameters());
  for (Scheme scheme : {Scheme::layer, Scheme::sequence}) {
    CAPTURE(int(scheme));
    Mamba::Config c = cfg;
    if (scheme == Scheme::layer) std::tie(c.layer_begin, c.layer_end) = dist::layer_block(3, group.rank(), group.size());
    Mamba part(c);
    const nn::StepResult got =
        scheme == Scheme::layer ? dist::layer_parallel_forward_backward(part, group, row, strategy, nullptr, &replicas)
                                : dist::sequence_parallel_forward_backward(part, group, row, strategy, nullptr, &replicas);
    CHECK(got.tokens == ref.tokens);
    CHECK(std::fabs(got.loss - ref.loss) <= tol * std::fabs(ref.loss));
    for (auto* p : part.parameters()) {
      CAPTURE(p->name);
      CHECK(rel_err(p->grad, want.at(p->name)->grad) <= tol);
    }
  }
}
