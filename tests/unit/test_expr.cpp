// Tests of the expression templates and reverse-mode autodiff. Evaluation tests run in the
// test space (CPU, or the GPU in the CUDA build) against host references; gradchecks run
// in double on the host.
#include "../support/test_support.hpp"

#include <cmath>
#include <functional>
#include <string>

namespace test_expr {
using namespace ssmx;

inline Tensor<double> random_tensor(const Dims& d, std::uint64_t seed, double lo = -2.0, double hi = 2.0) {
  test::Rng r(seed);
  Tensor<double> t(d);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = r.uniform(lo, hi);
  return t;
}

// A unary functor with its host reference and the domain to sample.
struct UnaryCase {
  const char* name;
  double lo, hi;
  std::function<double(double)> reference;
};

template <class Build>
void check_unary(const UnaryCase& c, Build build) {
  Tensor<double> x = random_tensor(Dims{7, 5}, 17, c.lo, c.hi);
  auto xs = test::to_space(x);
  Tensor<double, test::space> ys(x.dims());
  ys = build(xs);
  auto y = test::to_host(ys);
  for (index_t i = 0; i < x.numel(); ++i) {
    INFO(std::string(c.name));
    CHECK(y[i] == doctest::Approx(c.reference(x[i])).epsilon(1e-12));
  }
#if !SSMX_TEST_CUDA
  GradcheckOptions o;
  o.atol = 1e-8;  // tails of sigmoid/softplus: derivatives near 1e-6 meet finite-difference round-off
  auto res = gradcheck([&] { return build(x); }, {&x}, o);
  INFO(std::string(c.name), ": ", res.worst);
  CHECK(res.ok);
#endif
}
}  // namespace test_expr

using namespace test_expr;

TEST_CASE("expr: every unary functor evaluates and passes gradcheck") {
  auto sig = [](double v) { return 1 / (1 + std::exp(-v)); };
  check_unary({"neg", -2, 2, [](double v) { return -v; }}, [](const auto& x) { return -leaf(x); });
  check_unary({"exp", -2, 2, [](double v) { return std::exp(v); }}, [](const auto& x) { return ssmx::exp(x); });
  check_unary({"log", 0.1, 3, [](double v) { return std::log(v); }}, [](const auto& x) { return ssmx::log(x); });
  check_unary({"softplus", -30, 30, [](double v) { return std::log1p(std::exp(v)); }},
              [](const auto& x) { return ssmx::softplus(x); });
  check_unary({"sigmoid", -30, 30, sig}, [](const auto& x) { return ssmx::sigmoid(x); });
  check_unary({"silu", -8, 8, [&](double v) { return v * sig(v); }}, [](const auto& x) { return ssmx::silu(x); });
  check_unary({"tanh", -3, 3, [](double v) { return std::tanh(v); }}, [](const auto& x) { return ssmx::tanh(x); });
  check_unary({"sqrt", 0.1, 4, [](double v) { return std::sqrt(v); }}, [](const auto& x) { return ssmx::sqrt(x); });
  check_unary({"rsqrt", 0.1, 4, [](double v) { return 1 / std::sqrt(v); }}, [](const auto& x) { return ssmx::rsqrt(x); });
  check_unary({"square", -3, 3, [](double v) { return v * v; }}, [](const auto& x) { return ssmx::square(x); });
  check_unary({"scalar ops", -3, 3, [](double v) { return (2.0 * v + 1.0) / 4.0 - 0.5; }},
              [](const auto& x) { return (2.0 * leaf(x) + 1.0) / 4.0 - 0.5; });
}

TEST_CASE("expr: softplus and sigmoid stay finite for large arguments") {
  Tensor<double> x = from_vector<double>(Dims{4}, {-1000, -50, 50, 1000});
  auto sp = eval(softplus(x)), sg = eval(sigmoid(x));
  CHECK(sp[0] == 0.0);
  CHECK(sp[3] == 1000.0);
  CHECK(sg[0] == 0.0);
  CHECK(sg[3] == 1.0);
  for (index_t i = 0; i < 4; ++i) CHECK(std::isfinite(sp[i]));
}

TEST_CASE("expr: binary functors broadcast and pass gradcheck") {
  Tensor<double> a = random_tensor(Dims{4, 3, 5}, 1), b = random_tensor(Dims{3, 1}, 2, 0.5, 2.0);
  Tensor<double> c = random_tensor(Dims{5}, 3, 0.5, 2.0);
  auto as = test::to_space(a), bs = test::to_space(b), cs = test::to_space(c);
  Tensor<double, test::space> out(Dims{4, 3, 5});
  out = (leaf(as) + bs) * cs - leaf(as) / bs;
  auto o = test::to_host(out);
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < 3; ++j)
      for (index_t k = 0; k < 5; ++k)
        CHECK(o(i, j, k) == doctest::Approx((a(i, j, k) + b(j, 0)) * c(k) - a(i, j, k) / b(j, 0)).epsilon(1e-14));
  out = maximum(as, cs);
  o = test::to_host(out);
  CHECK(o(1, 2, 3) == std::max(a(1, 2, 3), c(3)));
#if !SSMX_TEST_CUDA
  for (auto res : {gradcheck([&] { return (leaf(a) + b) * c - leaf(a) / b; }, {&a, &b, &c}),
                   gradcheck([&] { return leaf(a) * a; }, {&a}),  // a leaf used twice
                   gradcheck([&] { return maximum(a, c); }, {&a, &c})}) {
    INFO(res.worst);
    CHECK(res.ok);
  }
#endif
}

TEST_CASE("expr: reductions over an axis and in full") {
  Tensor<double> x = random_tensor(Dims{3, 4, 5}, 4);
  auto xs = test::to_space(x);
  auto s1 = test::to_host(eval(sum(xs, 1)));
  auto m2 = test::to_host(eval(mean(xs, 2, true)));
  auto mx = test::to_host(eval(max(xs, 0)));
  auto all = test::to_host(eval(sum(xs)));
  auto mall = test::to_host(eval(max(xs)));
  CHECK(s1.dims() == Dims{3, 5});
  CHECK(m2.dims() == Dims{3, 4, 1});
  double total = 0, big = -1e300;
  for (index_t i = 0; i < 3; ++i)
    for (index_t k = 0; k < 5; ++k) {
      double s = 0;
      for (index_t j = 0; j < 4; ++j) s += x(i, j, k);
      CHECK(s1(i, k) == doctest::Approx(s).epsilon(1e-14));
    }
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) {
      double s = 0;
      for (index_t k = 0; k < 5; ++k) s += x(i, j, k);
      CHECK(m2(i, j, 0) == doctest::Approx(s / 5).epsilon(1e-14));
    }
  for (index_t j = 0; j < 4; ++j)
    for (index_t k = 0; k < 5; ++k)
      CHECK(mx(j, k) == std::max({x(0, j, k), x(1, j, k), x(2, j, k)}));
  for (index_t i = 0; i < x.numel(); ++i) {
    total += x[i];
    big = std::max(big, x[i]);
  }
  CHECK(all() == doctest::Approx(total).epsilon(1e-13));
  CHECK(mall() == big);
#if !SSMX_TEST_CUDA
  for (auto res : {gradcheck([&] { return sum(x, 1); }, {&x}), gradcheck([&] { return mean(x, 2, true); }, {&x}),
                   gradcheck([&] { return max(x, 0); }, {&x}), gradcheck([&] { return sum(x) * 1.0; }, {&x}),
                   gradcheck([&] { return mean(square(x)); }, {&x}),
                   gradcheck([&] { return leaf(x) / sum(x, -1, true); }, {&x})}) {
    INFO(res.worst);
    CHECK(res.ok);
  }
#endif
}


// Long axes with few outputs (a parameter gradient summed over tokens) take the device's
// block reduction, short ones the per-output loop; both against a double loop.
TEST_CASE("expr: reductions along long and short axes, first, middle and last") {
  for (const Dims& d : {Dims{3, 1000, 5}, Dims{2000, 7}, Dims{5, 300}, Dims{2, 3, 70, 40}, Dims{4096, 1}}) {
    Tensor<double> x = random_tensor(d, 11);
    auto xs = test::to_space(x);
    for (int axis = 0; axis < d.rank; ++axis) {
      CAPTURE(d.str());
      CAPTURE(axis);
      const auto s = test::to_host(eval(sum(xs, axis)));
      const auto m = test::to_host(eval(mean(xs, axis, true)));
      const auto mx = test::to_host(eval(max(xs, axis)));
      index_t outer = 1, inner = 1;
      for (int i = 0; i < axis; ++i) outer *= d[i];
      for (int i = axis + 1; i < d.rank; ++i) inner *= d[i];
      const index_t L = d[axis];
      REQUIRE(s.numel() == outer * inner);
      for (index_t o = 0; o < outer; ++o)
        for (index_t c = 0; c < inner; ++c) {
          double want = 0, abs_sum = 0, big = -1e300;
          for (index_t l = 0; l < L; ++l) {
            const double v = x[(o * L + l) * inner + c];
            want += v;
            abs_sum += std::abs(v);
            big = std::max(big, v);
          }
          const index_t k = o * inner + c;
          CHECK(std::abs(s[k] - want) <= 1e-14 * abs_sum);
          CHECK(std::abs(m[k] - want / double(L)) <= 1e-14 * abs_sum / double(L));
          CHECK(mx[k] == big);
        }
    }
  }
}
TEST_CASE("expr: matrix products, transposed operands, and their VJPs") {
  Tensor<double> a = random_tensor(Dims{5, 3}, 5), b = random_tensor(Dims{3, 4}, 6), c = random_tensor(Dims{4, 5}, 7);
  auto as = test::to_space(a), bs = test::to_space(b), cs = test::to_space(c);
  auto p = test::to_host(eval(matmul(as, bs)));
  auto q = test::to_host(eval(matmul(transpose(bs), transpose(as))));      // (ab)ᵀ
  auto r = test::to_host(eval(matmul(exp(as) * 0.5, bs) + transpose(cs)));  // computed operand
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 4; ++j) {
      double s = 0, e = 0;
      for (index_t k = 0; k < 3; ++k) {
        s += a(i, k) * b(k, j);
        e += std::exp(a(i, k)) * 0.5 * b(k, j);
      }
      CHECK(p(i, j) == doctest::Approx(s).epsilon(1e-13));
      CHECK(q(j, i) == doctest::Approx(s).epsilon(1e-13));
      CHECK(r(i, j) == doctest::Approx(e + c(j, i)).epsilon(1e-13));
    }
#if !SSMX_TEST_CUDA
  for (auto res : {gradcheck([&] { return matmul(a, b); }, {&a, &b}),
                   gradcheck([&] { return matmul(transpose(b), transpose(a)); }, {&a, &b}),
                   gradcheck([&] { return tanh(matmul(matmul(a, b), c)); }, {&a, &b, &c})}) {
    INFO(res.worst);
    CHECK(res.ok);
  }
#endif
}

TEST_CASE("expr: products of few rows and many columns in every operand layout") {
  // The shapes of a generation step (1..8 rows against wide weights, read transposed or in
  // place), of a short chunk (up to 256 rows, split by columns) and of a long one (rows).
  for (index_t m : {1, 2, 5, 8, 9, 40, 300})
    for (index_t n : {3, 257, 700})
      for (index_t k : {1, 7, 64}) {
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        const Tensor<double> a = random_tensor(Dims{m, k}, 5), b = random_tensor(Dims{k, n}, 6),
                             at = random_tensor(Dims{k, m}, 7), bt = random_tensor(Dims{n, k}, 8);
        const Tensor<double> c0 = random_tensor(Dims{m, n}, 9);
        auto as = test::to_space(a), bs = test::to_space(b), ats = test::to_space(at), bts = test::to_space(bt);
        // A as given or transposed, B as given or transposed: every layout gemm reads in place.
        const auto p00 = test::to_host(eval(matmul(as, bs)));
        const auto p01 = test::to_host(eval(matmul(as, transpose(bts))));
        const auto p10 = test::to_host(eval(matmul(transpose(ats), bs)));
        const auto p11 = test::to_host(eval(matmul(transpose(ats), transpose(bts))));
        // A column-major view of B itself (as the tied head reads the embedding).
        const TensorView<const double, test::space> bcol(bts.data(), Dims{k, n}, {1, k, 0, 0});
        const auto pcol = test::to_host(eval(matmul(as, bcol)));
        // Accumulation into existing values (beta = 1).
        auto acc = test::to_space(c0);
        accumulate(acc.view(), matmul(as, transpose(bts)));
        const auto pacc = test::to_host(acc);
        double worst = 0;
        for (index_t i = 0; i < m; ++i)
          for (index_t j = 0; j < n; ++j) {
            double r00 = 0, r01 = 0, r10 = 0, r11 = 0;
            for (index_t q = 0; q < k; ++q) {
              r00 += a(i, q) * b(q, j);
              r01 += a(i, q) * bt(j, q);
              r10 += at(q, i) * b(q, j);
              r11 += at(q, i) * bt(j, q);
            }
            for (double e : {p00(i, j) - r00, p01(i, j) - r01, p10(i, j) - r10, p11(i, j) - r11, pcol(i, j) - r01,
                             pacc(i, j) - (c0(i, j) + r01)})
              worst = std::max(worst, std::abs(e));
          }
        CHECK(worst <= 1e-12 * double(k));
      }
}

TEST_CASE("expr: softmax and log_softmax are stable and pass gradcheck") {
  Tensor<double> x = random_tensor(Dims{3, 6}, 8);
  x(1, 2) = 1000;  // would overflow exp without the max shift
  auto xs = test::to_space(x);
  auto sm = test::to_host(eval(softmax(xs)));
  auto ls = test::to_host(eval(log_softmax(xs)));
  for (index_t i = 0; i < 3; ++i) {
    double s = 0;
    for (index_t j = 0; j < 6; ++j) {
      s += sm(i, j);
      CHECK(std::isfinite(ls(i, j)));
      CHECK(std::exp(ls(i, j)) == doctest::Approx(sm(i, j)).epsilon(1e-12));
    }
    CHECK(s == doctest::Approx(1.0).epsilon(1e-14));
  }
  CHECK(sm(1, 2) == doctest::Approx(1.0));
#if !SSMX_TEST_CUDA
  Tensor<double> y = random_tensor(Dims{3, 6}, 9);
  for (auto res : {gradcheck([&] { return softmax(y); }, {&y}), gradcheck([&] { return log_softmax(y * 3.0); }, {&y})}) {
    INFO(res.worst);
    CHECK(res.ok);
  }
#endif
}

TEST_CASE("expr: unsqueeze and broadcast_to build outer products") {
  Tensor<double> u = random_tensor(Dims{4, 3}, 10), v = random_tensor(Dims{4, 2}, 11);
  auto us = test::to_space(u), vs = test::to_space(v);
  auto o = test::to_host(eval(unsqueeze(us, 2) * unsqueeze(exp(vs), 1)));
  auto bt = test::to_host(eval(broadcast_to(unsqueeze(vs, 1), Dims{4, 3, 2})));
  CHECK(o.dims() == Dims{4, 3, 2});
  for (index_t t = 0; t < 4; ++t)
    for (index_t p = 0; p < 3; ++p)
      for (index_t n = 0; n < 2; ++n) {
        CHECK(o(t, p, n) == doctest::Approx(u(t, p) * std::exp(v(t, n))).epsilon(1e-14));
        CHECK(bt(t, p, n) == v(t, n));
      }
#if !SSMX_TEST_CUDA
  auto res = gradcheck([&] { return unsqueeze(u, 2) * unsqueeze(exp(v), 1); }, {&u, &v});
  INFO(res.worst);
  CHECK(res.ok);
  auto res2 = gradcheck([&] { return broadcast_to(unsqueeze(sigmoid(v), 1), Dims{4, 3, 2}); }, {&v});
  CHECK(res2.ok);
#endif
}

#if !SSMX_TEST_CUDA
TEST_CASE("expr: an elementwise assignment is one pass with no temporaries") {
  Tensor<float> x(Dims{64, 32}), w(Dims{32}), y(Dims{64, 32});
  fill(x, 0.5f);
  fill(w, 2.0f);
  reset_peak(Space::Host);
  y = exp(-softplus(leaf(x) * w + 1.0f)) * sigmoid(x);
  CHECK(memory_stats(Space::Host).allocations == 0);
  const float expect = std::exp(-std::log1p(std::exp(2.0f))) * (1 / (1 + std::exp(-0.5f)));
  CHECK(y(3, 7) == doctest::Approx(expect));
}

TEST_CASE("expr: backward accumulates into the targets and skips the rest") {
  Tensor<double> x = random_tensor(Dims{3, 4}, 12), w = random_tensor(Dims{4}, 13);
  Tensor<double> gx = zeros<double>(x.dims()), g = zeros<double>(Dims{3, 4});
  fill(g, 1.0);
  backward(leaf(x) * w, g, {wrt(x, gx)});
  backward(leaf(x) * w, g, {wrt(x, gx)});
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) CHECK(gx(i, j) == doctest::Approx(2 * w(j)));
  // Cotangent of the wrong shape; gradient of the wrong shape.
  Tensor<double> bad(Dims{4, 3});
  CHECK_THROWS_AS(backward(leaf(x) * w, bad, {wrt(x, gx)}), ShapeError);
  Tensor<double> gw_bad(Dims{5});
  CHECK_THROWS_WITH_AS(wrt(w, gw_bad), doctest::Contains("[5]"), ShapeError);
}

TEST_CASE("expr: shape errors name the operation and both shapes") {
  Tensor<double> a(Dims{3, 4}), b(Dims{5, 4}), c(Dims{4, 2});
  CHECK_THROWS_WITH_AS(leaf(a) + b, doctest::Contains("add: shapes [3, 4] and [5, 4] do not broadcast"), ShapeError);
  CHECK_THROWS_WITH_AS(matmul(a, b), doctest::Contains("inner extents differ"), ShapeError);
  Tensor<double> out(Dims{3, 3});
  CHECK_THROWS_WITH_AS(out = matmul(a, c), doctest::Contains("cannot be written to a tensor of shape [3, 3]"),
                       ShapeError);
  CHECK_THROWS_AS(sum(a, 2), ShapeError);
}

TEST_CASE("expr: bf16 and half leaves compute in float") {
  Tensor<bf16> xb(Dims{8});
  Tensor<half> xh(Dims{8});
  for (index_t i = 0; i < 8; ++i) {
    xb[i] = bf16(float(i) * 0.25f);
    xh[i] = half(float(i) * 0.25f);
  }
  auto y = eval(leaf(xb) * 2.0f + leaf(xh));
  for (index_t i = 0; i < 8; ++i) CHECK(y[i] == doctest::Approx(0.75 * double(i)));
  Tensor<bf16> back(Dims{8});
  back = leaf(xb) + 1.0f;  // stored rounded to bf16
  CHECK(float(back[3]) == doctest::Approx(1.75f));
}

TEST_CASE("expr: host results do not depend on the thread count") {
  // Row blocks (300 rows), column blocks (40 rows, 700 columns) and few rows (4).
  for (index_t m : {300, 40, 4}) {
    CAPTURE(m);
    const index_t n = m == 300 ? 150 : 700;
    Tensor<float> a(Dims{m, 200}), b(Dims{200, n});
    test::Rng r(3);
    for (index_t i = 0; i < a.numel(); ++i) a[i] = float(r.normal());
    for (index_t i = 0; i < b.numel(); ++i) b[i] = float(r.normal());
    auto p1 = eval(matmul(a, b));
    auto s1 = eval(sum(a));
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    auto p2 = eval(matmul(a, b));
    auto s2 = eval(sum(a));
    omp_set_num_threads(saved);
    CHECK(std::memcmp(p1.data(), p2.data(), p1.bytes()) == 0);
    CHECK(s1() == s2());
#endif
  }
}

TEST_CASE("expr: causal_conv1d matches its definition and central differences") {
  // C = 70: a partial block of channels; W = 18: taps past the kernel's 16 accumulators.
  for (index_t W : {index_t(1), index_t(4), index_t(18)})
    for (bool masked : {false, true}) {
      CAPTURE(W);
      CAPTURE(masked);
      const index_t n = 9, C = 70;
      Tensor<double> x = random_tensor(Dims{n + W - 1, C}, 31), w = random_tensor(Dims{C, 1, W}, 32),
                     b = random_tensor(Dims{C}, 33), m(Dims{W, n});
      for (index_t j = 0; j < W; ++j)
        for (index_t t = 0; t < n; ++t) m(j, t) = masked && (t + j) % 3 == 0 ? 0.0 : 1.0;
      const TensorView<const double> mv = masked ? TensorView<const double>(m.view()) : TensorView<const double>();
      const TensorView<const double> wv = w.view(), bv = b.view();
      const auto expr = [&] { return causal_conv1d(leaf(x) * 1.5, wv, bv, mv); };
      const Tensor<double> y = eval(expr());
      for (index_t t = 0; t < n; ++t)
        for (index_t c = 0; c < C; ++c) {
          double want = b[c];
          for (index_t j = 0; j < W; ++j) want += 1.5 * x(t + j, c) * w[c * W + j] * (masked ? m(j, t) : 1.0);
          CHECK(y(t, c) == doctest::Approx(want).epsilon(1e-13));
        }
      Tensor<double> g = random_tensor(Dims{n, C}, 34);
      const auto loss = [&] { return sum(expr() * leaf(g)); };
      Tensor<double> gx = zeros<double>(x.dims()), gw = zeros<double>(w.dims()), gb = zeros<double>(b.dims());
      Tensor<double> one(Dims{});
      fill(one, 1.0);
      backward(loss(), one, {wrt(x, gx), wrt(w, gw), wrt(b, gb)});
      GradcheckOptions o;  // the loss is bilinear: the differences' error is the loss's rounding / eps
      o.eps = 1e-4;
      o.rtol = 1e-6;
      o.atol = 1e-7;
      std::vector<Tensor<double>*> inputs{&x, &w, &b};
      std::vector<const Tensor<double>*> grads{&gx, &gw, &gb};
      const auto res = check_gradients([&] { return eval(loss())[0]; }, inputs, grads, o);
      INFO(res.worst);
      CHECK(res.ok);
      CHECK(res.checked == x.numel() + w.numel() + b.numel());
    }
}
#endif
