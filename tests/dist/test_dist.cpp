// Tests of include/ssmx/dist/, run by every rank of an mpiexec job (tests/dist/CMakeLists.txt
// runs it with 2 and 3 ranks). Every rank runs every case in the same order, so the
// collectives inside the cases match; references are computed serially on every rank.
#define DOCTEST_CONFIG_IMPLEMENT
#include "support/test_support.hpp"

#include <ssmx/dist/communicator.hpp>
#include <ssmx/dist/data_parallel.hpp>

namespace test_dist {

using namespace ssmx;
using ssmx::test::max_rel_err;
using ssmx::test::Rng;
using nn::token_t;

// The affine map of rank q (a in [-1.5, 1.5], b in [-1, 1]), the same on every rank.
template <class T>
std::vector<T> affine_of(int q, index_t n) {
  Rng rng(1000 + std::uint64_t(q));
  std::vector<T> ab(std::size_t(2 * n));
  for (index_t i = 0; i < n; ++i) ab[std::size_t(i)] = T(rng.uniform(-1.5, 1.5));
  for (index_t i = 0; i < n; ++i) ab[std::size_t(n + i)] = T(rng.uniform(-1.0, 1.0));
  return ab;
}

// acc <- acc ∘ e: first acc's map, then e's.
template <class T>
void compose_into(std::vector<T>& acc, const std::vector<T>& e, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const std::size_t a = std::size_t(i), b = std::size_t(n + i);
    acc[b] = e[a] * acc[b] + e[b];
    acc[a] = acc[a] * e[a];
  }
}

template <class T>
std::vector<T> identity(index_t n) {
  std::vector<T> id(std::size_t(2 * n), T(0));
  std::fill_n(id.begin(), n, T(1));
  return id;
}

template <class T>
void check_exscans(double tol) {
  dist::Communicator comm;
  const int R = comm.size(), r = comm.rank();
  const index_t n = 7;
  // forward: e_0 ∘ ... ∘ e_{r-1}
  std::vector<T> mine = affine_of<T>(r, n);
  dist::Communicator& c = comm;
  c.exscan_affine(TensorView<T>(mine.data(), Dims{2, n}));
  std::vector<T> left = identity<T>(n), wrong = identity<T>(n);
  for (int q = 0; q < r; ++q) {
    compose_into(left, affine_of<T>(q, n), n);
    std::vector<T> e = affine_of<T>(q, n);  // the other order: e_q ∘ wrong
    compose_into(e, wrong, n);
    wrong = e;
  }
  CHECK(max_rel_err(mine, left) <= tol);
  // A commutative reduction would be free to compose in either order; with two or more
  // operands the orders differ, and only the left fold is correct.
  if (r >= 2) CHECK(max_rel_err(mine, wrong) > 1e-3);

  // reverse: e_{R-1} ∘ ... ∘ e_{r+1}
  std::vector<T> back = affine_of<T>(r, n);
  c.reverse_exscan_affine(TensorView<T>(back.data(), Dims{2, n}));
  std::vector<T> right = identity<T>(n);
  for (int q = R - 1; q > r; --q) compose_into(right, affine_of<T>(q, n), n);
  CHECK(max_rel_err(back, right) <= tol);
}

using Layer = nn::DiagonalSSM<double, 8, 4>;
using DPModel = nn::Model<Layer, 2>;

struct Data {
  index_t B = 5, L = 11, vocab = 16;
  std::vector<token_t> inputs, targets;
  Data() {
    Rng rng(77);
    for (index_t i = 0; i < B * L; ++i) {
      inputs.push_back(token_t(rng.integer(0, vocab - 1)));
      targets.push_back(rng.uniform(0, 1) < 0.2 ? token_t(-1) : token_t(rng.integer(0, vocab - 1)));
    }
  }
  // Rows r, r + R, ... of the batch.
  void rows(int r, int R, std::vector<token_t>& in, std::vector<token_t>& tg) const {
    in.clear();
    tg.clear();
    for (index_t b = r; b < B; b += R) {
      in.insert(in.end(), inputs.begin() + b * L, inputs.begin() + (b + 1) * L);
      tg.insert(tg.end(), targets.begin() + b * L, targets.begin() + (b + 1) * L);
    }
  }
};

}  // namespace test_dist

using namespace test_dist;

TEST_CASE("dist: allreduce_sum equals the serial sum") {
  dist::Communicator comm;
  const int R = comm.size(), r = comm.rank();
  const index_t n = 1001;
  auto values = [&](int q) { return ssmx::test::uniform<double>(Dims{n}, 10 + std::uint64_t(q)); };
  Tensor<double> mine = values(r), expected = zeros<double>(Dims{n});
  for (int q = 0; q < R; ++q) {
    Tensor<double> v = values(q);
    for (index_t i = 0; i < n; ++i) expected[i] += v[i];
  }
  comm.allreduce_sum(mine.view());
  CHECK(max_rel_err(mine, expected) <= 1e-14);

  Tensor<float> f = ssmx::test::uniform<float>(Dims{3, 5}, 20 + std::uint64_t(r));
  Tensor<float> fe = zeros<float>(Dims{3, 5});
  for (int q = 0; q < R; ++q) {
    Tensor<float> v = ssmx::test::uniform<float>(Dims{3, 5}, 20 + std::uint64_t(q));
    for (index_t i = 0; i < 15; ++i) fe[i] += v[i];
  }
  comm.allreduce_sum(f.view());
  CHECK(max_rel_err(f, fe, 1e-6) <= 1e-5);
}

TEST_CASE("dist: bucketed gradient all-reduce equals the serial sum") {
  dist::Communicator comm;
  const int R = comm.size(), r = comm.rank();
  const Dims shapes[] = {Dims{5}, Dims{10, 100}, Dims{7}, Dims{3, 3}};
  auto make = [&](int q, std::vector<Parameter<double>>& ps) {
    ps.clear();
    int k = 0;
    for (const Dims& d : shapes) {
      ps.emplace_back("p" + std::to_string(k), d);
      ps.back().grad = ssmx::test::uniform<double>(d, 100 * std::uint64_t(q) + std::uint64_t(k));
      ++k;
    }
  };
  std::vector<Parameter<double>> expected, other;
  make(0, expected);
  for (int q = 1; q < R; ++q) {
    make(q, other);
    for (std::size_t k = 0; k < other.size(); ++k)
      for (index_t i = 0; i < other[k].numel(); ++i) expected[k].grad[i] += other[k].grad[i];
  }
  // 64 bytes: 8 doubles per bucket, so parameters span buckets; and one bucket for all.
  for (std::size_t bucket : {std::size_t(64), std::size_t(24), dist::default_bucket_bytes}) {
    CAPTURE(bucket);
    std::vector<Parameter<double>> mine;
    make(r, mine);
    ParameterList<double> list;
    for (auto& p : mine) list.push_back(&p);
    dist::allreduce_gradients(comm, list, bucket);
    for (std::size_t k = 0; k < mine.size(); ++k) CHECK(max_rel_err(mine[k].grad, expected[k].grad) <= 1e-14);
  }
}

TEST_CASE("dist: exscan_affine is the left fold and reverse_exscan_affine the right fold") {
  check_exscans<double>(1e-13);
  check_exscans<float>(1e-5);
}

TEST_CASE("dist: the affine operator is not commutative") {
  const index_t n = 3;
  std::vector<double> x = affine_of<double>(0, n), y = affine_of<double>(1, n);
  std::vector<double> xy = y, yx = x;  // MPI order: inout <- in ∘ inout
  MPI_Datatype block;
  MPI_Type_contiguous(int(2 * n), MPI_DOUBLE, &block);
  MPI_Type_commit(&block);
  int one = 1;
  dist::detail::affine_compose<double>(x.data(), xy.data(), &one, &block);
  dist::detail::affine_compose<double>(y.data(), yx.data(), &one, &block);
  MPI_Type_free(&block);
  std::vector<double> ref = x;
  compose_into(ref, y, n);
  CHECK(max_rel_err(xy, ref) <= 1e-15);
  CHECK(max_rel_err(xy, yx) > 1e-3);
}

TEST_CASE("dist: broadcast and send/recv") {
  dist::Communicator comm;
  const int R = comm.size(), r = comm.rank();
  Tensor<double> v = zeros<double>(Dims{4});
  if (r == R - 1)
    for (index_t i = 0; i < 4; ++i) v[i] = double(i) + 0.5;
  comm.broadcast(v.view(), R - 1);
  for (index_t i = 0; i < 4; ++i) CHECK(v[i] == double(i) + 0.5);

  // A ring: even ranks send first, odd ranks receive first (no reliance on buffering).
  Tensor<float> out = ssmx::test::uniform<float>(Dims{2, 3}, 50 + std::uint64_t(r)), in = zeros<float>(Dims{2, 3});
  const int next = (r + 1) % R, prev = (r + R - 1) % R;
  if (r % 2 == 0) {
    comm.send(out.view(), next, 7);
    comm.recv(in.view(), prev, 7);
  } else {
    comm.recv(in.view(), prev, 7);
    comm.send(out.view(), next, 7);
  }
  CHECK(max_rel_err(in, ssmx::test::uniform<float>(Dims{2, 3}, 50 + std::uint64_t(prev))) == 0.0);
  comm.barrier();
}

TEST_CASE("dist: check_same throws on every rank when one rank differs") {
  dist::Communicator comm;
  CHECK_NOTHROW(comm.check_same("model.config", 42));
  const std::string msg = ssmx::test::message_of<dist::DistError>(
      [&] { comm.check_same("model.config", comm.rank() == 1 ? 43 : 42); });
  CHECK(ssmx::test::contains(msg, "model.config"));
  CHECK(ssmx::test::contains(msg, "rank 1: 43 (differs from rank 0)"));
  CHECK(ssmx::test::contains(msg, "rank 0: 42"));
}

TEST_CASE("dist: data_parallel_train_step equals train_step on the whole batch") {
  dist::Communicator comm;
  const int R = comm.size(), r = comm.rank();
  const Data d;
  DPModel::Config cfg;
  cfg.vocab = d.vocab;
  cfg.seed = 3;
  DPModel serial(cfg), parallel(cfg);
  comm.check_same("parameters", dist::parameter_layout_hash(parallel.parameters()));
  AdamW<double> serial_opt(1e-2), parallel_opt(1e-2);
  nn::StepOptions so;
  so.clip_norm = 0.5;  // active: the clipping must see the global norm

  std::vector<token_t> in, tg;
  d.rows(r, R, in, tg);
  const nn::Batch whole{d.inputs.data(), d.targets.data(), d.B, d.L};
  const nn::Batch local{in.data(), tg.data(), index_t(in.size()) / d.L, d.L};
  for (int step = 0; step < 2; ++step) {
    CAPTURE(step);
    const nn::TrainStepResult s = nn::train_step(serial, serial_opt, whole, Adjoint{4, 4}, so);
    const nn::TrainStepResult p = dist::data_parallel_train_step(parallel, parallel_opt, comm, local, Adjoint{4, 4}, so);
    CHECK(p.tokens == s.tokens);
    CHECK(p.correct == s.correct);
    CHECK(std::fabs(p.loss - s.loss) <= 1e-10 * std::fabs(s.loss));
    CHECK(std::fabs(p.grad_norm - s.grad_norm) <= 1e-10 * s.grad_norm);
    const auto sp = serial.parameters(), pp = parallel.parameters();
    for (std::size_t k = 0; k < sp.size(); ++k) {
      CAPTURE(sp[k]->name);
      CHECK(max_rel_err(pp[k]->value, sp[k]->value) <= 1e-10);
    }
  }

  // Bad input on one rank: every rank throws and no parameter changes anywhere.
  std::vector<Tensor<double>> before;
  for (auto* p : parallel.parameters()) before.push_back(p->value.clone());
  std::vector<token_t> bad = in;
  if (r == 0) bad[0] = token_t(d.vocab);  // outside the vocabulary
  const nn::Batch bad_local{bad.data(), tg.data(), local.batch, d.L};
  if (r == 0)
    CHECK_THROWS_AS(dist::data_parallel_train_step(parallel, parallel_opt, comm, bad_local), ValueError);
  else
    CHECK_THROWS_WITH_AS(dist::data_parallel_train_step(parallel, parallel_opt, comm, bad_local),
                         doctest::Contains("failed on rank(s) 0"), dist::DistError);
  const auto pp = parallel.parameters();
  for (std::size_t k = 0; k < pp.size(); ++k) CHECK(max_rel_err(pp[k]->value, before[k]) == 0.0);
}

int main(int argc, char** argv) {
  ssmx::dist::Environment env(&argc, &argv);
  doctest::Context ctx(argc, argv);
  return ctx.run();  // mpiexec exits nonzero if any rank does
}
