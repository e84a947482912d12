// Tests of ssmx/optim: SGD (plain, momentum, Nesterov, weight decay) against hand-computed
// values, AdamW against an independent double-precision reference of torch.optim.AdamW's
// rule, AdamW minimising a quadratic, gradient norm and clipping, the strong exception
// guarantee on non-finite gradients, state save/load, learning-rate schedules.
#include "../support/test_support.hpp"

#if !SSMX_TEST_CUDA  // the optimisers are host-only for now

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ssmx/optim/optim.hpp>

namespace test_optim {

using namespace ssmx;

// Owns parameters and hands out the ParameterList an optimiser takes.
template <class T>
struct Params {
  std::vector<std::unique_ptr<Parameter<T>>> owned;
  ParameterList<T> list;

  Parameter<T>& add(const std::string& name, const Dims& d, const std::vector<double>& values) {
    owned.push_back(std::make_unique<Parameter<T>>(name, d));
    Parameter<T>& p = *owned.back();
    for (index_t i = 0; i < p.numel(); ++i) p.value[i] = T(values[std::size_t(i)]);
    fill<T>(p.grad, T(0));
    list.push_back(&p);
    return p;
  }
};

template <class T>
void set_grad(Parameter<T>& p, const std::vector<double>& g) {
  for (index_t i = 0; i < p.numel(); ++i) p.grad[i] = T(g[std::size_t(i)]);
}

template <class T>
std::vector<double> values_of(const Tensor<T>& t) {
  std::vector<double> out;
  for (index_t i = 0; i < t.numel(); ++i) out.push_back(double(t[i]));
  return out;
}

// Every value, gradient and state tensor as raw bytes, for bit-identity checks (NaN-safe).
using ssmx::test::bytes_of;
template <class T>
std::vector<std::vector<unsigned char>> snapshot_params(const ParameterList<T>& params) {
  std::vector<std::vector<unsigned char>> s;
  for (auto* p : params) {
    s.push_back(bytes_of(p->value.data(), p->value.numel()));
    s.push_back(bytes_of(p->grad.data(), p->grad.numel()));
  }
  return s;
}
template <class T>
std::vector<std::pair<std::string, std::vector<unsigned char>>> snapshot_state(const std::vector<NamedTensor<T>>& st) {
  std::vector<std::pair<std::string, std::vector<unsigned char>>> s;
  for (const auto& e : st) s.emplace_back(e.name, bytes_of(e.value.data(), e.value.numel()));
  return s;
}

using ssmx::test::contains;
using ssmx::test::message_of;

// torch.optim.AdamW's update for one tensor, in double with plain loops (the reference).
struct AdamRef {
  std::vector<double> p, m, v;
  void step(const std::vector<double>& g, int t, double lr, double b1, double b2, double eps, double wd) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    const double bc1 = 1.0 - std::pow(b1, t), bc2 = 1.0 - std::pow(b2, t);
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - lr * wd;
      m[i] = b1 * m[i] + (1.0 - b1) * g[i];
      v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
      const double denom = std::sqrt(v[i]) / std::sqrt(bc2) + eps;
      p[i] -= lr / bc1 * m[i] / denom;
    }
  }
};

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

}  // namespace test_optim

// ---- SGD ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("optim: SGD plain and with weight decay match hand-computed values", T, float, double) {
  using namespace test_optim;
  Params<T> net;
  auto& w = net.add("w", ssmx::Dims{2}, {1.0, -2.0});
  set_grad(w, {0.5, 0.25});

  SUBCASE("plain") {
    ssmx::SGD<T> opt(0.1);
    opt.step(net.list);
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.95, -2.025}) < tolerance<T>());
    opt.step(net.list);
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.90, -2.05}) < tolerance<T>());
    CHECK(opt.state().empty());  // no momentum, no buffers
  }
  SUBCASE("coupled weight decay") {
    ssmx::SGD<T> opt(0.1, 0.0, 0.1);
    opt.step(net.list);  // p - 0.1 (g + 0.1 p)
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.94, -2.005}) < tolerance<T>());
    opt.step(net.list);
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.8806, -2.00995}) < tolerance<T>());
  }
}

TEST_CASE_TEMPLATE("optim: SGD momentum and Nesterov match hand-computed values", T, float, double) {
  using namespace test_optim;
  // Scalar gradients 1, -0.5, 2 (and twice that in the second element), lr 0.1, momentum 0.9.
  const std::vector<double> gs{1.0, -0.5, 2.0};
  Params<T> net;
  auto& w = net.add("w", ssmx::Dims{2}, {0.0, 0.0});

  SUBCASE("heavy ball") {
    // buf = 1, 0.4, 2.36;  p = -0.1, -0.14, -0.376
    ssmx::SGD<T> opt(0.1, 0.9);
    const std::vector<double> want{-0.1, -0.14, -0.376}, bufs{1.0, 0.4, 2.36};
    for (std::size_t s = 0; s < gs.size(); ++s) {
      set_grad(w, {gs[s], 2 * gs[s]});
      opt.step(net.list);
      CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{want[s], 2 * want[s]}) < tolerance<T>());
      auto st = opt.state();
      REQUIRE(st.size() == 1);
      CHECK(st[0].name == "w.momentum_buffer");
      CHECK(ssmx::test::max_rel_err(ssmx::to_vector(st[0].value), std::vector<double>{bufs[s], 2 * bufs[s]}) <
            tolerance<T>());
    }
  }
  SUBCASE("nesterov") {
    // d = g + 0.9 buf = 1.9, -0.14, 4.124;  p = -0.19, -0.176, -0.5884
    ssmx::SGD<T> opt(0.1, 0.9, 0.0, true);
    const std::vector<double> want{-0.19, -0.176, -0.5884};
    for (std::size_t s = 0; s < gs.size(); ++s) {
      set_grad(w, {gs[s], 2 * gs[s]});
      opt.step(net.list);
      CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{want[s], 2 * want[s]}) < tolerance<T>());
    }
  }
  SUBCASE("momentum with weight decay") {
    // p0 = 1, g = 1, wd = 0.5: g' = 1.5, buf = 1.5, p = 0.85;
    // then g' = 1 + 0.425 = 1.425, buf = 1.35 + 1.425 = 2.775, p = 0.85 - 0.2775 = 0.5725
    Params<T> one;
    auto& u = one.add("u", ssmx::Dims{1}, {1.0});
    set_grad(u, {1.0});
    ssmx::SGD<T> opt(0.1, 0.9, 0.5);
    opt.step(one.list);
    CHECK(double(u.value[0]) == doctest::Approx(0.85).epsilon(tolerance<T>()));
    opt.step(one.list);
    CHECK(double(u.value[0]) == doctest::Approx(0.5725).epsilon(tolerance<T>()));
  }
}

TEST_CASE("optim: SGD rejects invalid hyperparameters") {
  CHECK_THROWS_AS(ssmx::SGD<float>(-0.1), ssmx::ValueError);
  CHECK_THROWS_AS(ssmx::SGD<float>(0.1, 1.0), ssmx::ValueError);
  CHECK_THROWS_AS(ssmx::SGD<float>(0.1, 0.0, -1.0), ssmx::ValueError);
  CHECK_THROWS_AS(ssmx::SGD<float>(0.1, 0.0, 0.0, true), ssmx::ValueError);  // Nesterov needs momentum
  ssmx::SGD<float> opt(0.1);
  CHECK_THROWS_AS(opt.set_lr(std::numeric_limits<double>::quiet_NaN()), ssmx::ValueError);
  opt.set_lr(0.5);
  CHECK(opt.lr() == 0.5);
}

// ---- AdamW -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("optim: AdamW matches a reference of the torch.optim.AdamW rule", T, float, double) {
  using namespace test_optim;
  const double b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.1;
  ssmx::test::Rng rng(42);
  Params<T> net;
  std::vector<AdamRef> ref(2);
  std::vector<double> init_a(6), init_b(4);
  for (auto& x : init_a) x = double(T(rng.uniform()));
  for (auto& x : init_b) x = double(T(rng.uniform()));
  auto& a = net.add("layers.0.W_a", ssmx::Dims{2, 3}, init_a);
  auto& b = net.add("layers.0.b", ssmx::Dims{4}, init_b);
  ref[0].p = init_a;
  ref[1].p = init_b;

  ssmx::AdamW<T> opt(1e-2, b1, b2, eps, wd);
  for (int t = 1; t <= 6; ++t) {
    const double lr = t <= 3 ? 1e-2 : 3e-3;  // set_lr in the middle, as a schedule would
    opt.set_lr(lr);
    std::vector<double> ga(6), gb(4);
    for (auto& x : ga) x = double(T(rng.normal()));
    for (auto& x : gb) x = double(T(rng.normal(0.0, 1e-3)));  // small gradients: eps matters
    set_grad(a, ga);
    set_grad(b, gb);
    opt.step(net.list);
    ref[0].step(ga, t, lr, b1, b2, eps, wd);
    ref[1].step(gb, t, lr, b1, b2, eps, wd);
    CHECK(ssmx::test::max_rel_err(values_of(a.value), ref[0].p) < tolerance<T>());
    CHECK(ssmx::test::max_rel_err(values_of(b.value), ref[1].p) < tolerance<T>());
  }
  CHECK(opt.step_count() == 6);

  auto st = opt.state();
  REQUIRE(st.size() == 4);
  CHECK(st[0].name == "layers.0.W_a.exp_avg");
  CHECK(st[1].name == "layers.0.W_a.exp_avg_sq");
  CHECK(st[2].name == "layers.0.b.exp_avg");
  CHECK(st[3].name == "layers.0.b.exp_avg_sq");
  CHECK(st[0].value.dims() == ssmx::Dims{2, 3});
  CHECK(ssmx::test::max_rel_err(ssmx::to_vector(st[0].value), ref[0].m) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(ssmx::to_vector(st[1].value), ref[0].v) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(ssmx::to_vector(st[2].value), ref[1].m) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(ssmx::to_vector(st[3].value), ref[1].v) < tolerance<T>());
}

TEST_CASE_TEMPLATE("optim: AdamW minimises a quadratic", T, float, double) {
  using namespace test_optim;
  // L = 1/2 sum_i c_i (p_i - target_i)^2 with curvatures spanning three decades.
  const std::vector<double> target{1.5, -2.0, 0.25, 3.0, -0.75}, curv{1.0, 10.0, 0.1, 100.0, 3.0};
  Params<T> net;
  auto& w = net.add("w", ssmx::Dims{5}, {0.0, 0.0, 0.0, 0.0, 0.0});
  auto loss = [&] {
    double l = 0.0;
    for (std::size_t i = 0; i < target.size(); ++i) {
      const double d = double(w.value[index_t(i)]) - target[i];
      l += 0.5 * curv[i] * d * d;
    }
    return l;
  };
  const double initial = loss();
  ssmx::AdamW<T> opt(0.1, 0.9, 0.999, 1e-8, 0.0);
  ssmx::WarmupCosine sched(20, 1500, 0.1, 0.0);
  for (std::int64_t s = 0; s < 1500; ++s) {
    for (std::size_t i = 0; i < target.size(); ++i)
      w.grad[index_t(i)] = T(curv[i] * (double(w.value[index_t(i)]) - target[i]));
    opt.set_lr(sched.lr(s));
    opt.step(net.list);
  }
  CHECK(initial > 100.0);
  CHECK(loss() < 1e-6 * initial);
  for (std::size_t i = 0; i < target.size(); ++i)
    CHECK(double(w.value[index_t(i)]) == doctest::Approx(target[i]).epsilon(1e-3));
}

TEST_CASE("optim: AdamW state is tracked and round-trips through load_state") {
  using namespace test_optim;
  const auto tag = std::size_t(ssmx::Tag::OptimizerState);
  Params<double> net, twin;
  ssmx::test::Rng rng(7);
  std::vector<double> init(12);
  for (auto& x : init) x = rng.uniform();
  auto& w = net.add("w", ssmx::Dims{3, 4}, init);
  auto& w2 = twin.add("w", ssmx::Dims{3, 4}, init);

  ssmx::AdamW<double> opt(1e-2);
  const std::size_t before = ssmx::memory_stats().current_by_tag[tag];
  for (int t = 0; t < 3; ++t) {
    std::vector<double> g(12);
    for (auto& x : g) x = rng.normal();
    set_grad(w, g);
    set_grad(w2, g);
    opt.step(net.list);
  }
  // Two moments of 12 doubles, allocated once, under Tag::OptimizerState.
  CHECK(ssmx::memory_stats().current_by_tag[tag] - before == 2 * 12 * sizeof(double));

  // A fresh optimiser given the state (and the parameters) continues bit-identically.
  ssmx::AdamW<double> restored(1e-2);
  restored.load_state(opt.state(), opt.step_count());
  CHECK(restored.step_count() == 3);
  ssmx::copy<double>(w2.value.view(), w.value.view());
  for (int t = 0; t < 2; ++t) {
    std::vector<double> g(12);
    for (auto& x : g) x = rng.normal();
    set_grad(w, g);
    set_grad(w2, g);
    opt.step(net.list);
    restored.step(twin.list);
  }
  CHECK(bytes_of(w.value.data(), 12) == bytes_of(w2.value.data(), 12));
  CHECK(snapshot_state(opt.state()) == snapshot_state(restored.state()));

  // Incomplete or foreign state is refused and the current state kept.
  auto st = opt.state();
  const auto kept = snapshot_state(restored.state());
  std::vector<ssmx::NamedTensor<double>> partial{st[0]};
  CHECK(contains(message_of<ssmx::ValueError>([&] { restored.load_state(partial, 5); }), "w.exp_avg_sq"));
  std::vector<ssmx::NamedTensor<double>> foreign{st[0], st[1], {"w.momentum_buffer", st[0].value}};
  CHECK(contains(message_of<ssmx::ValueError>([&] { restored.load_state(foreign, 5); }), "w.momentum_buffer"));
  CHECK(snapshot_state(restored.state()) == kept);
  CHECK(restored.step_count() == 5);

  // A parameter whose shape no longer matches its state is a ShapeError, nothing changes.
  Params<double> other;
  other.add("w", ssmx::Dims{12}, init);
  const auto params_before = snapshot_params(other.list);
  CHECK(contains(message_of<ssmx::ShapeError>([&] { restored.step(other.list); }), "w.exp_avg"));
  CHECK(snapshot_params(other.list) == params_before);
  CHECK(snapshot_state(restored.state()) == kept);
}

TEST_CASE("optim: SGD momentum state round-trips through load_state") {
  using namespace test_optim;
  Params<float> net;
  auto& w = net.add("w", ssmx::Dims{3}, {1.0, 2.0, 3.0});
  set_grad(w, {0.5, -1.0, 2.0});
  ssmx::SGD<float> a(0.1, 0.9), b(0.1, 0.9);
  a.step(net.list);
  b.load_state(a.state());
  CHECK(snapshot_state(a.state()) == snapshot_state(b.state()));
  std::vector<ssmx::NamedTensor<float>> bad{{"w.exp_avg", a.state()[0].value}};
  CHECK_THROWS_AS(b.load_state(bad), ssmx::ValueError);
  CHECK(snapshot_state(a.state()) == snapshot_state(b.state()));
}

// ---- gradient norm and clipping ----------------------------------------------------------

TEST_CASE_TEMPLATE("optim: clip_grad_norm computes the global norm and scales above the threshold", T, float,
                   double) {
  using namespace test_optim;
  Params<T> net;
  auto& a = net.add("a", ssmx::Dims{2}, {0.0, 0.0});
  auto& b = net.add("b", ssmx::Dims{1, 1}, {0.0});
  set_grad(a, {3.0, 0.0});
  set_grad(b, {-4.0});
  CHECK(double(ssmx::global_grad_norm(net.list)) == doctest::Approx(5.0));

  SUBCASE("below the threshold: a no-op") {
    const auto before = snapshot_params(net.list);
    CHECK(double(ssmx::clip_grad_norm(net.list, 10.0)) == doctest::Approx(5.0));
    CHECK(double(ssmx::clip_grad_norm(net.list, 5.0)) == doctest::Approx(5.0));  // equal: not above
    CHECK(double(ssmx::clip_grad_norm(net.list, std::numeric_limits<double>::infinity())) == doctest::Approx(5.0));
    CHECK(snapshot_params(net.list) == before);
  }
  SUBCASE("above the threshold: scaled to max_norm") {
    CHECK(double(ssmx::clip_grad_norm(net.list, 1.0)) == doctest::Approx(5.0));  // the norm before clipping
    CHECK(ssmx::test::max_rel_err(values_of(a.grad), std::vector<double>{0.6, 0.0}) < tolerance<T>());
    CHECK(double(b.grad[0]) == doctest::Approx(-0.8).epsilon(tolerance<T>()));
    CHECK(double(ssmx::global_grad_norm(net.list)) == doctest::Approx(1.0).epsilon(tolerance<T>()));
  }
  SUBCASE("max_norm must be >= 0") { CHECK_THROWS_AS(ssmx::clip_grad_norm(net.list, -1.0), ssmx::ValueError); }
}

TEST_CASE("optim: the gradient norm is deterministic and survives overflowing squares") {
  using namespace test_optim;
  Params<double> net;
  ssmx::test::Rng rng(3);
  std::vector<double> g(1000);
  for (auto& x : g) x = rng.normal();
  auto& a = net.add("a", ssmx::Dims{1000}, g);
  set_grad(a, g);
  const double n1 = ssmx::global_grad_norm(net.list), n2 = ssmx::global_grad_norm(net.list);
  CHECK(std::memcmp(&n1, &n2, sizeof(double)) == 0);
  double ref = 0.0;
  for (double x : g) ref += x * x;
  CHECK(n1 == doctest::Approx(std::sqrt(ref)).epsilon(1e-14));

  Params<double> big;
  auto& h = big.add("h", ssmx::Dims{2}, {0.0, 0.0});
  set_grad(h, {3e200, -4e200});  // squares overflow a double; the norm does not
  CHECK(ssmx::clip_grad_norm(big.list, 1.0) == doctest::Approx(5e200));
  CHECK(h.grad[0] == doctest::Approx(0.6));
  CHECK(h.grad[1] == doctest::Approx(-0.8));
}

// ---- non-finite gradients: the strong exception guarantee --------------------------------

TEST_CASE_TEMPLATE("optim: a non-finite gradient throws and changes nothing", T, float, double) {
  using namespace test_optim;
  Params<T> net;
  ssmx::test::Rng rng(11);
  std::vector<double> va(6), vb(20);
  for (auto& x : va) x = rng.uniform();
  for (auto& x : vb) x = rng.uniform();
  auto& a = net.add("embedding.weight", ssmx::Dims{6}, va);  // comes first: must not be updated either
  auto& b = net.add("layers.0.W_a", ssmx::Dims{4, 5}, vb);
  set_grad(a, va);
  set_grad(b, vb);

  ssmx::SGD<T> sgd(0.1, 0.9, 0.01);
  ssmx::AdamW<T> adamw(1e-2);
  sgd.step(net.list);  // state exists before the failing step
  adamw.step(net.list);

  const T bad_values[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()};
  for (T bad : bad_values) {
    CAPTURE(double(bad));
    b.grad[17] = bad;
    b.grad[19] = std::numeric_limits<T>::quiet_NaN();  // later offender: not the one named
    const auto params_before = snapshot_params(net.list);
    const auto sgd_before = snapshot_state(sgd.state());
    const auto adamw_before = snapshot_state(adamw.state());
    const std::string value = std::isnan(bad) ? "nan" : "inf";

    std::string msg = message_of<ssmx::ValueError>([&] { sgd.step(net.list); });
    CHECK(contains(msg, "gradient of 'layers.0.W_a' has non-finite value " + value + " at index 17"));
    msg = message_of<ssmx::ValueError>([&] { adamw.step(net.list); });
    CHECK(contains(msg, "gradient of 'layers.0.W_a' has non-finite value " + value + " at index 17"));
    msg = message_of<ssmx::ValueError>([&] { ssmx::clip_grad_norm(net.list, 1.0); });
    CHECK(contains(msg, "'layers.0.W_a'"));
    CHECK(contains(msg, "index 17"));

    CHECK(snapshot_params(net.list) == params_before);
    CHECK(snapshot_state(sgd.state()) == sgd_before);
    CHECK(snapshot_state(adamw.state()) == adamw_before);
    CHECK(adamw.step_count() == 1);
    CHECK(!std::isfinite(double(ssmx::global_grad_norm(net.list))));  // measuring does not throw
  }
}

TEST_CASE("optim: malformed parameter lists are refused before any update") {
  using namespace test_optim;
  Params<float> net;
  auto& a = net.add("a", ssmx::Dims{2}, {1.0, 2.0});
  auto& b = net.add("b", ssmx::Dims{3}, {1.0, 2.0, 3.0});
  set_grad(a, {1.0, 1.0});
  b.grad = ssmx::Tensor<float>(ssmx::Dims{2}, ssmx::Tag::Gradients);  // wrong shape
  fill<float>(b.grad, 1.0f);
  ssmx::AdamW<float> opt(0.1);
  const auto before = snapshot_params(net.list);
  std::string msg = message_of<ssmx::ShapeError>([&] { opt.step(net.list); });
  CHECK(contains(msg, "'b'"));
  CHECK(contains(msg, "[3]"));
  CHECK(snapshot_params(net.list) == before);
  CHECK(opt.state().empty());
  CHECK(opt.step_count() == 0);

  ssmx::ParameterList<float> twice{&a, &a};
  CHECK(contains(message_of<ssmx::ValueError>([&] { opt.step(twice); }), "'a' appears twice"));
  ssmx::ParameterList<float> with_null{&a, nullptr};
  CHECK_THROWS_AS(opt.step(with_null), ssmx::ValueError);
}

// ---- schedules -----------------------------------------------------------------------------

TEST_CASE("optim: learning-rate schedules") {
  ssmx::ConstantLR constant(3e-4);
  CHECK(constant.lr(0) == 3e-4);
  CHECK(constant.lr(123456) == 3e-4);

  ssmx::WarmupCosine s(10, 110, 1.0, 0.1);
  CHECK(s.lr(0) == 0.0);                           // warmup start
  CHECK(s.lr(5) == doctest::Approx(0.5));          // warmup middle
  CHECK(s.lr(10) == doctest::Approx(1.0));         // warmup end = cosine start: the peak
  CHECK(s.lr(35) == doctest::Approx(0.1 + 0.9 * 0.5 * (1.0 + std::cos(3.14159265358979323846 / 4))));
  CHECK(s.lr(60) == doctest::Approx(0.55));        // cosine middle: halfway between peak and floor
  CHECK(s.lr(109) > 0.1);
  CHECK(s.lr(110) == doctest::Approx(0.1));        // cosine end
  CHECK(s.lr(1000) == 0.1);                        // after the end: the floor
  for (std::int64_t k = 10; k < 110; ++k) CHECK(s.lr(k + 1) <= s.lr(k));  // monotone decay

  ssmx::WarmupCosine no_warmup(0, 100, 2.0);
  CHECK(no_warmup.lr(0) == doctest::Approx(2.0));
  CHECK(no_warmup.lr(100) == 0.0);

  CHECK_THROWS_AS(ssmx::WarmupCosine(20, 10, 1.0), ssmx::ValueError);
  CHECK_THROWS_AS(ssmx::WarmupCosine(0, 10, 1.0, 2.0), ssmx::ValueError);
  CHECK_THROWS_AS(s.lr(-1), ssmx::ValueError);
  CHECK_THROWS_AS(ssmx::ConstantLR(-1.0), ssmx::ValueError);
}

#endif  // !SSMX_TEST_CUDA
