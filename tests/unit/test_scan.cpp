// Tests of ssmx::linear_scan / reverse_linear_scan and the affine scan operator.
// Compiled for the host (ssmx::test::space == Space::Host) and, by nvcc, for Space::Cuda.
// References are naive sequential loops and explicit transfer matrices on the host.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../support/test_support.hpp"

#include <ssmx/scan/scan.hpp>
#if SSMX_TEST_CUDA
#include <ssmx/backend/cuda/scan.cuh>
#endif

namespace test_scan {

using ssmx::Dims;
using ssmx::index_t;
using ssmx::Tensor;
using ssmx::TensorView;
constexpr ssmx::Space S = ssmx::test::space;

template <class T>
T tol() {
  return std::is_same_v<T, float> ? T(2e-5) : T(1e-12);
}

// Uniform values in [lo, hi), reproducible from the seed.
template <class T>
Tensor<T> random_tensor(const Dims& d, std::uint64_t seed, double lo, double hi) {
  Tensor<T> t(d);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = T(u(rng));
  return t;
}
// Decays in (0.5, 1) with a few negative ones, as a stable recurrence has.
template <class T>
Tensor<T> random_decay(const Dims& d, std::uint64_t seed) {
  Tensor<T> t = random_tensor<T>(d, seed, 0.5, 1.0);
  for (index_t i = 0; i < t.numel(); i += 7) t[i] = -t[i];
  return t;
}

// max |x - y| / max(1, |y|) over contiguous host tensors of equal shape.
template <class T>
double max_err(const Tensor<T>& x, const Tensor<T>& y) {
  REQUIRE(x.dims() == y.dims());
  double m = 0;
  for (index_t i = 0; i < x.numel(); ++i) {
    const double d = std::abs(double(x[i]) - double(y[i])) / std::max(1.0, std::abs(double(y[i])));
    if (!(d <= m)) m = d;  // NaN propagates as a failure
  }
  return m;
}

template <class T>
Tensor<T> host_of(const Tensor<T, S>& t) {
  return ssmx::test::to_host(t);
}
template <class T>
Tensor<T, S> on_space(const Tensor<T>& t) {
  return ssmx::test::to_space(t);
}

// Naive forward recurrence on contiguous host tensors [B, T, C]; h0, hf optional [B, C].
template <class T>
Tensor<T> naive_forward(const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>* h0 = nullptr,
                        Tensor<T>* hf = nullptr) {
  const index_t B = a.extent(0), L = a.extent(1), C = a.extent(2);
  Tensor<T> h(a.dims());
  for (index_t i = 0; i < B; ++i)
    for (index_t c = 0; c < C; ++c) {
      T s = h0 ? (*h0)(i, c) : T(0);
      for (index_t t = 0; t < L; ++t) {
        s = a(i, t, c) * s + b(i, t, c);
        h(i, t, c) = s;
      }
      if (hf) (*hf)(i, c) = s;
    }
  return h;
}

// Naive reverse recurrence: δ_t = g_t + a_{t+1} δ_{t+1}, δ_{T-1} = g_{T-1} + carry_in.
template <class T>
Tensor<T> naive_reverse(const Tensor<T>& a, const Tensor<T>& g, const Tensor<T>* carry_in = nullptr,
                        Tensor<T>* carry_out = nullptr) {
  const index_t B = a.extent(0), L = a.extent(1), C = a.extent(2);
  Tensor<T> d(a.dims());
  for (index_t i = 0; i < B; ++i)
    for (index_t c = 0; c < C; ++c) {
      T s = carry_in ? (*carry_in)(i, c) : T(0);
      for (index_t t = L - 1; t >= 0; --t) {
        d(i, t, c) = g(i, t, c) + s;
        s = a(i, t, c) * d(i, t, c);
      }
      if (carry_out) (*carry_out)(i, c) = s;
    }
  return d;
}

struct Case {
  index_t batch, time, channels;
};
// Shapes that reach every kernel of both backends: single elements, odd sizes, one or few
// long channels, many channels, large T x C.
inline std::vector<Case> shapes() {
  return {{1, 1, 1},    {1, 1, 5},      {2, 7, 1},     {3, 33, 3},    {2, 100, 17},   {4, 257, 130},
          {1, 5000, 2}, {2, 3, 1000},   {1, 20001, 1}, {2, 9000, 3},  {3, 5000, 40},  {1, 70000, 1},
          {2, 700, 1100}, {1, 4099, 600}, {5, 1, 3},   {1, 40000, 8}};
}

}  // namespace test_scan

TEST_CASE_TEMPLATE("scan: AffineOp is associative and not commutative with identity (1 0)", T, float, double) {
  using P = ssmx::scan::AffinePair<T>;
  const ssmx::scan::AffineOp<T> op;
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  auto draw = [&] { return P{T(u(rng)), T(u(rng))}; };
  const T eps = std::is_same_v<T, float> ? T(1e-5) : T(1e-13);
  int noncommuting = 0;
  for (int i = 0; i < 1000; ++i) {
    const P x = draw(), y = draw(), z = draw();
    const P l = op(op(x, y), z), r = op(x, op(y, z));
    CHECK(std::abs(l.a - r.a) <= eps * (1 + std::abs(l.a)));
    CHECK(std::abs(l.b - r.b) <= eps * (1 + std::abs(l.b)));
    const P xy = op(x, y), yx = op(y, x);
    if (std::abs(xy.b - yx.b) > T(1e-3)) ++noncommuting;
    // Composition means "x then y": applying xy equals applying x, then y.
    const T h = T(u(rng));
    CHECK(std::abs(op.apply(xy, h) - op.apply(y, op.apply(x, h))) <= eps * 10);
    const P ix = op(op.identity(), x), xi = op(x, op.identity());
    CHECK(ix.a == x.a);
    CHECK(ix.b == x.b);
    CHECK(xi.a == x.a);
    CHECK(xi.b == x.b);
  }
  CHECK(noncommuting > 900);
  // A concrete counterexample: (2, 1) then (3, 0) gives 3; the other order gives 1.
  CHECK(op(P{2, 1}, P{3, 0}).b == T(3));
  CHECK(op(P{3, 0}, P{2, 1}).b == T(1));
}

TEST_CASE_TEMPLATE("scan: linear_scan matches a sequential loop", T, float, double) {
  using namespace test_scan;
  std::uint64_t seed = 1;
  for (const Case& k : shapes()) {
    CAPTURE(k.batch);
    CAPTURE(k.time);
    CAPTURE(k.channels);
    const Dims d{k.batch, k.time, k.channels};
    const Tensor<T> a = random_decay<T>(d, seed++), b = random_tensor<T>(d, seed++, -1, 1);
    const Tensor<T> h0 = random_tensor<T>(Dims{k.batch, k.channels}, seed++, -1, 1);
    Tensor<T> hf_ref(h0.dims());
    const Tensor<T> ref0 = naive_forward(a, b);
    const Tensor<T> ref = naive_forward(a, b, &h0, &hf_ref);

    Tensor<T, S> da = on_space(a), db = on_space(b), dh0 = on_space(h0);
    Tensor<T, S> dh(d), dhf(h0.dims());
    ssmx::linear_scan(da.view(), db.view(), dh.view());
    CHECK(max_err(host_of(dh), ref0) <= tol<T>());
    ssmx::linear_scan(da.view(), db.view(), dh.view(), dh0.view(), dhf.view());
    CHECK(max_err(host_of(dh), ref) <= tol<T>());
    CHECK(max_err(host_of(dhf), hf_ref) <= tol<T>());
  }
}

TEST_CASE_TEMPLATE("scan: reverse_linear_scan matches a sequential loop", T, float, double) {
  using namespace test_scan;
  std::uint64_t seed = 100;
  for (const Case& k : shapes()) {
    CAPTURE(k.batch);
    CAPTURE(k.time);
    CAPTURE(k.channels);
    const Dims d{k.batch, k.time, k.channels};
    const Tensor<T> a = random_decay<T>(d, seed++), g = random_tensor<T>(d, seed++, -1, 1);
    const Tensor<T> cin = random_tensor<T>(Dims{k.batch, k.channels}, seed++, -1, 1);
    Tensor<T> cout_ref(cin.dims());
    const Tensor<T> ref0 = naive_reverse(a, g);
    const Tensor<T> ref = naive_reverse(a, g, &cin, &cout_ref);

    Tensor<T, S> da = on_space(a), dg = on_space(g), dcin = on_space(cin);
    Tensor<T, S> dd(d), dcout(cin.dims());
    ssmx::reverse_linear_scan(da.view(), dg.view(), dd.view());
    CHECK(max_err(host_of(dd), ref0) <= tol<T>());
    ssmx::reverse_linear_scan(da.view(), dg.view(), dd.view(), dcin.view(), dcout.view());
    CHECK(max_err(host_of(dd), ref) <= tol<T>());
    CHECK(max_err(host_of(dcout), cout_ref) <= tol<T>());
  }
}

TEST_CASE_TEMPLATE("scan: reverse_linear_scan is the transpose of linear_scan", T, float, double) {
  // Per channel, h = M b + m h0 with M[t][i] = a_{i+1} ... a_t (i <= t) and m_t = a_0 ... a_t.
  // The adjoint of that map is δ = Mᵀ g (with carry_in = a_T δ_T entering as an extra g term
  // at T-1 scaled through M), and dL/dh0 = mᵀ g = carry_out.
  using namespace test_scan;
  for (index_t L : {1, 2, 5, 12}) {
    CAPTURE(L);
    const index_t B = 2, C = 3;
    const Dims d{B, L, C};
    const Tensor<T> a = random_decay<T>(d, 7 + std::uint64_t(L)), g = random_tensor<T>(d, 8, -1, 1);
    const Tensor<T> cin = random_tensor<T>(Dims{B, C}, 9, -1, 1);
    Tensor<T, S> da = on_space(a), dg = on_space(g), dcin = on_space(cin);
    Tensor<T, S> dd(d), dcout(Dims{B, C});
    ssmx::reverse_linear_scan(da.view(), dg.view(), dd.view(), dcin.view(), dcout.view());
    const Tensor<T> delta = host_of(dd), cout = host_of(dcout);
    for (index_t i = 0; i < B; ++i)
      for (index_t c = 0; c < C; ++c) {
        std::vector<double> M(std::size_t(L * L), 0.0), m(std::size_t(L), 0.0);
        for (index_t t = 0; t < L; ++t) {
          double p = 1;
          for (index_t j = t; j >= 0; --j) {  // M[t][j] = a_{j+1} ... a_t
            M[std::size_t(t * L + j)] = p;
            p *= double(a(i, j, c));
          }
          m[std::size_t(t)] = p;  // a_0 ... a_t
        }
        // carry_in acts as an extra cotangent on h_{T-1}.
        std::vector<double> gg(static_cast<std::size_t>(L));
        for (index_t t = 0; t < L; ++t) gg[std::size_t(t)] = double(g(i, t, c)) + (t == L - 1 ? double(cin(i, c)) : 0.0);
        for (index_t j = 0; j < L; ++j) {
          double want = 0;
          for (index_t t = j; t < L; ++t) want += M[std::size_t(t * L + j)] * gg[std::size_t(t)];
          CHECK(std::abs(double(delta(i, j, c)) - want) <= double(tol<T>()) * (1 + std::abs(want)));
        }
        double want_h0 = 0;
        for (index_t t = 0; t < L; ++t) want_h0 += m[std::size_t(t)] * gg[std::size_t(t)];
        CHECK(std::abs(double(cout(i, c)) - want_h0) <= double(tol<T>()) * (1 + std::abs(want_h0)));
      }
  }
}

TEST_CASE_TEMPLATE("scan: chunked scans with carried state equal the whole scan", T, float, double) {
  using namespace test_scan;
  for (const Case& k : std::vector<Case>{{2, 64, 5}, {1, 9001, 1}, {3, 3000, 70}, {2, 50000, 2}}) {
    CAPTURE(k.time);
    CAPTURE(k.channels);
    const Dims d{k.batch, k.time, k.channels}, sd{k.batch, k.channels};
    const Tensor<T> a = random_decay<T>(d, 21), b = random_tensor<T>(d, 22, -1, 1);
    const Tensor<T> h0 = random_tensor<T>(sd, 23, -1, 1);
    Tensor<T> hf_ref(sd), cout_ref(sd);
    const Tensor<T> ref = naive_forward(a, b, &h0, &hf_ref);
    const Tensor<T> dref = naive_reverse(a, b, &h0, &cout_ref);

    Tensor<T, S> da = on_space(a), db = on_space(b);
    Tensor<T, S> dh(d), dd(d);
    const index_t cuts[] = {0, k.time / 3, k.time / 3 + 1, k.time};  // includes a one-step chunk
    {  // forward, chunk by chunk; the state tensor is both h0 and h_final (in place)
      Tensor<T, S> state = on_space(h0);
      for (int j = 0; j < 3; ++j) {
        auto av = da.view().slice(1, cuts[j], cuts[j + 1]);
        auto bv = db.view().slice(1, cuts[j], cuts[j + 1]);
        ssmx::linear_scan(av, bv, dh.view().slice(1, cuts[j], cuts[j + 1]), state.view(), state.view());
      }
      CHECK(max_err(host_of(dh), ref) <= tol<T>());
      CHECK(max_err(host_of(state), hf_ref) <= tol<T>());
    }
    {  // reverse, last chunk first; the carry tensor is both carry_in and carry_out
      Tensor<T, S> carry = on_space(h0);
      for (int j = 2; j >= 0; --j) {
        auto av = da.view().slice(1, cuts[j], cuts[j + 1]);
        auto gv = db.view().slice(1, cuts[j], cuts[j + 1]);
        ssmx::reverse_linear_scan(av, gv, dd.view().slice(1, cuts[j], cuts[j + 1]), carry.view(), carry.view());
      }
      CHECK(max_err(host_of(dd), dref) <= tol<T>());
      CHECK(max_err(host_of(carry), cout_ref) <= tol<T>());
    }
  }
}

TEST_CASE_TEMPLATE("scan: an empty time range passes the state through", T, float, double) {
  using namespace test_scan;
  const Tensor<T> h0 = random_tensor<T>(Dims{2, 3}, 5, -1, 1);
  Tensor<T, S> da(Dims{2, 0, 3}), db(Dims{2, 0, 3}), dh(Dims{2, 0, 3});
  Tensor<T, S> dh0 = on_space(h0), dhf = on_space(random_tensor<T>(Dims{2, 3}, 6, -1, 1));
  ssmx::linear_scan(da.view(), db.view(), dh.view(), dh0.view(), dhf.view());
  CHECK(max_err(host_of(dhf), h0) == 0);
  ssmx::reverse_linear_scan(da.view(), db.view(), dh.view(), dh0.view(), dhf.view());
  CHECK(max_err(host_of(dhf), h0) == 0);
  // Without an incoming state the outgoing one is zero.
  ssmx::linear_scan(da.view(), db.view(), dh.view(), {}, dhf.view());
  for (T v : ssmx::to_vector(host_of(dhf))) CHECK(v == T(0));
}

TEST_CASE_TEMPLATE("scan: strided views - time and channel slices and a broadcast decay", T, float, double) {
  using namespace test_scan;
  for (const Case& k : std::vector<Case>{{2, 50, 9}, {3, 6000, 5}, {2, 300, 700}, {1, 30000, 3}}) {
    CAPTURE(k.time);
    CAPTURE(k.channels);
    const Dims d{k.batch, k.time, k.channels};
    const Tensor<T> a = random_decay<T>(d, 31), b = random_tensor<T>(d, 32, -1, 1);
    Tensor<T, S> da = on_space(a), db = on_space(b);
    // Time slice [t0, t1) and channel slice [c0, c1): strides (T*C, C, 1), offset start.
    const index_t t0 = k.time / 4, t1 = k.time - k.time / 5, c0 = k.channels > 2 ? 1 : 0, c1 = k.channels - (k.channels > 4);
    Tensor<T, S> dh(d);
    auto hv = dh.view().slice(1, t0, t1).slice(2, c0, c1);
    ssmx::linear_scan(da.view().slice(1, t0, t1).slice(2, c0, c1), db.view().slice(1, t0, t1).slice(2, c0, c1), hv);
    ssmx::reverse_linear_scan(da.view().slice(1, t0, t1).slice(2, c0, c1), db.view().slice(1, t0, t1).slice(2, c0, c1),
                              dh.view().slice(1, t0, t1).slice(2, c1 - c0 > 1 ? c0 : c0, c1));
    // Reference on compact copies of the slices. (The reverse result overwrote the forward one.)
    const Dims sd{k.batch, t1 - t0, c1 - c0};
    Tensor<T> as(sd), bs(sd);
    ssmx::copy<T>(as.view(), a.view().slice(1, t0, t1).slice(2, c0, c1));
    ssmx::copy<T>(bs.view(), b.view().slice(1, t0, t1).slice(2, c0, c1));
    const Tensor<T> dref = naive_reverse(as, bs);
    const Tensor<T> got_all = host_of(dh);
    Tensor<T> got(sd);
    ssmx::copy<T>(got.view(), got_all.view().slice(1, t0, t1).slice(2, c0, c1));
    CHECK(max_err(got, dref) <= tol<T>());

    // Forward into the slice, checked separately; a broadcast over batch (stride 0).
    ssmx::linear_scan(da.view().slice(1, t0, t1).slice(2, c0, c1), db.view().slice(1, t0, t1).slice(2, c0, c1), hv);
    const Tensor<T> got_f_all = host_of(dh);
    ssmx::copy<T>(got.view(), got_f_all.view().slice(1, t0, t1).slice(2, c0, c1));
    CHECK(max_err(got, naive_forward(as, bs)) <= tol<T>());

    auto a0 = da.view().slice(0, 0, 1);  // batch 0 only, repeated with batch stride 0
    TensorView<const T, S> abcast(a0.data(), d, {0, a0.stride(1), 1, 0});
    Tensor<T> a_rep(d);
    for (index_t i = 0; i < k.batch; ++i)
      for (index_t t = 0; t < k.time; ++t)
        for (index_t c = 0; c < k.channels; ++c) a_rep(i, t, c) = a(0, t, c);
    ssmx::linear_scan(abcast, db.view(), dh.view());
    CHECK(max_err(host_of(dh), naive_forward(a_rep, b)) <= tol<T>());
  }
}

TEST_CASE_TEMPLATE("scan: in place - h aliases b and delta aliases g", T, float, double) {
  using namespace test_scan;
  for (const Case& k : std::vector<Case>{{2, 100, 17}, {1, 40000, 1}, {3, 5000, 40}, {2, 300, 2000}, {2, 9000, 3}}) {
    CAPTURE(k.time);
    CAPTURE(k.channels);
    const Dims d{k.batch, k.time, k.channels};
    const Tensor<T> a = random_decay<T>(d, 41), b = random_tensor<T>(d, 42, -1, 1);
    const Tensor<T> h0 = random_tensor<T>(Dims{k.batch, k.channels}, 43, -1, 1);
    Tensor<T> hf_ref(h0.dims()), cout_ref(h0.dims());
    Tensor<T, S> da = on_space(a), dx = on_space(b), ds = on_space(h0);
    ssmx::linear_scan(da.view(), dx.view(), dx.view(), ds.view(), ds.view());
    CHECK(max_err(host_of(dx), naive_forward(a, b, &h0, &hf_ref)) <= tol<T>());
    CHECK(max_err(host_of(ds), hf_ref) <= tol<T>());
    Tensor<T, S> dg = on_space(b), dc = on_space(h0);
    ssmx::reverse_linear_scan(da.view(), dg.view(), dg.view(), dc.view(), dc.view());
    CHECK(max_err(host_of(dg), naive_reverse(a, b, &h0, &cout_ref)) <= tol<T>());
    CHECK(max_err(host_of(dc), cout_ref) <= tol<T>());
  }
}

TEST_CASE("scan: shape errors name the argument and the expected and actual shapes") {
  using namespace test_scan;
  using T = float;
  auto z = [](const Dims& d) { return on_space(ssmx::zeros<T>(d)); };
  Tensor<T, S> a = z({2, 5, 3}), b = z({2, 5, 3}), h = z({2, 5, 3}), s = z({2, 3});
  Tensor<T, S> bad_t = z({2, 4, 3}), bad_c = z({2, 5, 4}), bad_s = z({2, 4}), rank2 = z({5, 3});
  auto message_of = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const ssmx::ShapeError& e) {
      return e.what();
    }
    return "no exception";
  };
  auto fwd = [&](auto&& av, auto&& bv, auto&& hv, TensorView<const T, S> h0v = {}, TensorView<T, S> hfv = {}) {
    return [=] { ssmx::linear_scan<T, S>(av, bv, hv, h0v, hfv); };
  };
  auto rev = [&](auto&& av, auto&& gv, auto&& dv, TensorView<const T, S> civ = {}, TensorView<T, S> cov = {}) {
    return [=] { ssmx::reverse_linear_scan<T, S>(av, gv, dv, civ, cov); };
  };
  CHECK_NOTHROW(fwd(a.view(), b.view(), h.view(), s.view(), s.view())());
  CHECK_THROWS_AS(fwd(a.view(), bad_t.view(), h.view())(), ssmx::ShapeError);

  std::string m = message_of(fwd(a.view(), bad_t.view(), h.view()));
  CHECK(m.find("'b'") != std::string::npos);
  CHECK(m.find("[2, 4, 3]") != std::string::npos);
  CHECK(m.find("[2, 5, 3]") != std::string::npos);
  CHECK(message_of(fwd(a.view(), b.view(), bad_c.view())).find("'h'") != std::string::npos);
  CHECK(message_of(fwd(rank2.view(), b.view(), h.view())).find("'a'") != std::string::npos);
  CHECK(message_of(fwd(rank2.view(), b.view(), h.view())).find("rank 2") != std::string::npos);
  m = message_of(fwd(a.view(), b.view(), h.view(), bad_s.view()));
  CHECK(m.find("'h0'") != std::string::npos);
  CHECK(m.find("[2, 3]") != std::string::npos);
  CHECK(message_of(fwd(a.view(), b.view(), h.view(), {}, bad_s.view())).find("'h_final'") != std::string::npos);
  CHECK(message_of(rev(a.view(), bad_t.view(), h.view())).find("'g'") != std::string::npos);
  CHECK(message_of(rev(a.view(), b.view(), bad_c.view())).find("'delta'") != std::string::npos);
  CHECK(message_of(rev(a.view(), b.view(), h.view(), bad_s.view())).find("'carry_in'") != std::string::npos);
  CHECK(message_of(rev(a.view(), b.view(), h.view(), {}, bad_s.view())).find("'carry_out'") != std::string::npos);
  CHECK(message_of(rev(a.view(), b.view(), h.view(), {}, {})) == "no exception");
  // A non-contiguous channel dimension is rejected, naming the tensor.
  TensorView<const T, S> strided_c(b.data(), Dims{2, 5, 2}, {15, 3, 2, 0});
  m = message_of(fwd(a.view().slice(2, 0, 2), strided_c, h.view().slice(2, 0, 2)));
  CHECK(m.find("'b'") != std::string::npos);
  CHECK(m.find("channel stride 2") != std::string::npos);
  // An empty view where a sequence is required.
  CHECK(message_of(fwd(a.view(), TensorView<const T, S>{}, h.view())).find("'b'") != std::string::npos);
  // In place with different strides is rejected.
  TensorView<T, S> odd(b.data(), Dims{2, 5, 3}, {3, 6, 1, 0});
  CHECK(message_of(fwd(a.view(), b.view(), odd)).find("aliases") != std::string::npos);
}

TEST_CASE("scan: offsets are 64-bit when batch x time x channels exceeds 2^31") {
  using test_scan::index_t;
  // The layout a [4, 2^21, 2^12] contiguous view gets (2^35 elements); no memory is touched.
  float dummy = 0;
  const ssmx::TensorView<const float> v(&dummy, ssmx::Dims{4, index_t(1) << 21, index_t(1) << 12});
  const auto layout = ssmx::scan::detail::seq_layout(v);
  CHECK(layout.stride_batch == (index_t(1) << 33));
  CHECK(layout.stride_time == (index_t(1) << 12));
  const index_t last = layout.offset(3, (index_t(1) << 21) - 1, (index_t(1) << 12) - 1);
  CHECK(last == (index_t(1) << 35) - 1);
  CHECK(layout.offset(1, 0, 0) > (index_t(1) << 32));
  // A time slice of it keeps 64-bit strides; int32 math would wrap here.
  const auto tail = v.slice(1, (index_t(1) << 21) - 2, index_t(1) << 21);
  const auto tl = ssmx::scan::detail::seq_layout(tail);
  CHECK(tail.data() - v.data() == ((index_t(1) << 21) - 2) * (index_t(1) << 12));
  CHECK(tl.offset(3, 1, 5) + (tail.data() - v.data()) == layout.offset(3, (index_t(1) << 21) - 1, 5));
  static_assert(sizeof(decltype(layout.offset(0, 0, 0))) == 8, "scan offsets must be 64-bit");
}

