// Tests of ssmx/optim: SGD (plain, momentum, Nesterov, weight decay) against hand-computed
// values, AdamW against an independent double-precision reference of torch.optim.AdamW's
// rule, AdamW minimising a quadratic, gradient norm and clipping, the strong exception
// guarantee on non-finite gradients, state save/load (also across memory spaces),
// learning-rate schedules. Parameters live in the test space (the GPU in the CUDA build)
// and are compared on the host; the reduction path of the norms (the device's) is
// compared with the host loops in both builds.
#include "../support/test_support.hpp"

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
using ssmx::test::space;

// Writes host values (row-major) into a tensor of any space.
template <class T, Space S>
void put(Tensor<T, S>& t, const std::vector<double>& values) {
  Tensor<T> h(t.dims(), Tag::Workspace);
  for (index_t i = 0; i < h.numel(); ++i) h[i] = T(values[std::size_t(i)]);
  copy<T>(t.view(), h.view());
}

// Owns parameters (in space S) and hands out the ParameterList an optimiser takes.
template <class T, Space S = space>
struct Params {
  std::vector<std::unique_ptr<Parameter<T, S>>> owned;
  ParameterList<T, S> list;

  Parameter<T, S>& add(const std::string& name, const Dims& d, const std::vector<double>& values) {
    owned.push_back(std::make_unique<Parameter<T, S>>(name, d));
    Parameter<T, S>& p = *owned.back();
    put(p.value, values);
    fill<T>(p.grad, T(0));
    list.push_back(&p);
    return p;
  }
};

template <class T, Space S>
void set_grad(Parameter<T, S>& p, const std::vector<double>& g) {
  put(p.grad, g);
}

// Sets one element of a tensor of any space.
template <class T, Space S>
void set_element(Tensor<T, S>& t, index_t i, T x) {
  Tensor<T> h = ssmx::test::to_host(t);
  h[i] = x;
  copy<T>(t.view(), h.view());
}

// The values of a tensor or view of any space, on the host.
template <class T, Space S>
std::vector<T> host_values(TensorView<const T, S> v) {
  Tensor<T> h(v.dims(), Tag::Workspace);
  copy<T>(h.view(), v);
  return std::vector<T>(h.data(), h.data() + h.numel());
}
template <class T, Space S>
std::vector<double> values_of(const Tensor<T, S>& t) {
  std::vector<double> out;
  for (T x : to_vector(t)) out.push_back(double(x));
  return out;
}
template <class T, Space S>
std::vector<double> values_of(TensorView<const T, S> v) {
  std::vector<double> out;
  for (T x : host_values(v)) out.push_back(double(x));
  return out;
}

// Every value, gradient and state tensor as raw bytes, for bit-identity checks (NaN-safe).
template <class T>
std::vector<unsigned char> bytes_of(const std::vector<T>& v) {
  return ssmx::test::bytes_of(v.data(), index_t(v.size()));
}
template <class T, Space S>
std::vector<std::vector<unsigned char>> snapshot_params(const ParameterList<T, S>& params) {
  std::vector<std::vector<unsigned char>> s;
  for (auto* p : params) {
    s.push_back(bytes_of(to_vector(p->value)));
    s.push_back(bytes_of(to_vector(p->grad)));
  }
  return s;
}
template <class T, Space S>
std::vector<std::pair<std::string, std::vector<unsigned char>>> snapshot_state(
    const std::vector<NamedTensor<T, S>>& st) {
  std::vector<std::pair<std::string, std::vector<unsigned char>>> s;
  for (const auto& e : st) s.emplace_back(e.name, bytes_of(host_values(e.value)));
  return s;
}

// Host copies of a state (owning), and host entries that view them.
template <class T, Space S>
std::vector<Tensor<T>> host_copies(const std::vector<NamedTensor<T, S>>& st) {
  std::vector<Tensor<T>> out;
  for (const auto& e : st) {
    out.emplace_back(e.value.dims(), Tag::Workspace);
    copy<T>(out.back().view(), e.value);
  }
  return out;
}
template <class T, Space S>
std::vector<NamedTensor<T>> host_entries(const std::vector<NamedTensor<T, S>>& st, const std::vector<Tensor<T>>& h) {
  std::vector<NamedTensor<T>> out;
  for (std::size_t k = 0; k < st.size(); ++k) out.push_back({st[k].name, h[k].view()});
  return out;
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

// The same computation in the test space and on the host: bit-identical on the CPU build;
// on the GPU, expression kernels may contract into FMAs and reductions add in another order.
// Values below `near_zero` in magnitude are compared absolutely (max_rel_err's floor).
inline constexpr double near_zero = 1e-2;
template <class T>
double space_vs_host_tolerance() {
  if (space == Space::Host) return 0.0;
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

// The reduction path (device) against the host loops: sums of squares in T, per gradient.
template <class T>
double reduction_tolerance() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-13;
}

// Same classification of a non-finite double (NaN, +inf, -inf) or the same relative value.
inline bool same_norm(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * std::fmax(std::fabs(a), std::fabs(b));
}

}  // namespace test_optim

// ---- SGD ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("optim: SGD plain and with weight decay match hand-computed values", T, float, double) {
  using namespace test_optim;
  Params<T> net;
  auto& w = net.add("w", ssmx::Dims{2}, {1.0, -2.0});
  set_grad(w, {0.5, 0.25});

  SUBCASE("plain") {
    ssmx::SGD<T, space> opt(0.1);
    opt.step(net.list);
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.95, -2.025}) < tolerance<T>());
    opt.step(net.list);
    CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{0.90, -2.05}) < tolerance<T>());
    CHECK(opt.state().empty());  // no momentum, no buffers
  }
  SUBCASE("coupled weight decay") {
    ssmx::SGD<T, space> opt(0.1, 0.0, 0.1);
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
    ssmx::SGD<T, space> opt(0.1, 0.9);
    const std::vector<double> want{-0.1, -0.14, -0.376}, bufs{1.0, 0.4, 2.36};
    for (std::size_t s = 0; s < gs.size(); ++s) {
      set_grad(w, {gs[s], 2 * gs[s]});
      opt.step(net.list);
      CHECK(ssmx::test::max_rel_err(values_of(w.value), std::vector<double>{want[s], 2 * want[s]}) < tolerance<T>());
      auto st = opt.state();
      REQUIRE(st.size() == 1);
      CHECK(st[0].name == "w.momentum_buffer");
      CHECK(ssmx::test::max_rel_err(values_of(st[0].value), std::vector<double>{bufs[s], 2 * bufs[s]}) <
            tolerance<T>());
    }
  }
  SUBCASE("nesterov") {
    // d = g + 0.9 buf = 1.9, -0.14, 4.124;  p = -0.19, -0.176, -0.5884
    ssmx::SGD<T, space> opt(0.1, 0.9, 0.0, true);
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
    ssmx::SGD<T, space> opt(0.1, 0.9, 0.5);
    opt.step(one.list);
    CHECK(values_of(u.value)[0] == doctest::Approx(0.85).epsilon(tolerance<T>()));
    opt.step(one.list);
    CHECK(values_of(u.value)[0] == doctest::Approx(0.5725).epsilon(tolerance<T>()));
  }
}

#if !SSMX_TEST_CUDA  // no tensors involved
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
#endif

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

  ssmx::AdamW<T, space> opt(1e-2, b1, b2, eps, wd);
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
  CHECK(ssmx::test::max_rel_err(values_of(st[0].value), ref[0].m) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(values_of(st[1].value), ref[0].v) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(values_of(st[2].value), ref[1].m) < tolerance<T>());
  CHECK(ssmx::test::max_rel_err(values_of(st[3].value), ref[1].v) < tolerance<T>());
}

TEST_CASE_TEMPLATE("optim: AdamW minimises a quadratic", T, float, double) {
  using namespace test_optim;
  // L = 1/2 sum_i c_i (p_i - target_i)^2 with curvatures spanning three decades.
  const std::vector<double> target{1.5, -2.0, 0.25, 3.0, -0.75}, curv{1.0, 10.0, 0.1, 100.0, 3.0};
  Params<T> net;
  auto& w = net.add("w", ssmx::Dims{5}, {0.0, 0.0, 0.0, 0.0, 0.0});
  auto loss = [&] {
    const std::vector<double> p = values_of(w.value);
    double l = 0.0;
    for (std::size_t i = 0; i < target.size(); ++i) {
      const double d = p[i] - target[i];
      l += 0.5 * curv[i] * d * d;
    }
    return l;
  };
  const double initial = loss();
  ssmx::AdamW<T, space> opt(0.1, 0.9, 0.999, 1e-8, 0.0);
  ssmx::WarmupCosine sched(20, 1500, 0.1, 0.0);
  for (std::int64_t s = 0; s < 1500; ++s) {
    const std::vector<double> p = values_of(w.value);
    std::vector<double> g(target.size());
    for (std::size_t i = 0; i < target.size(); ++i) g[i] = double(T(curv[i] * (p[i] - target[i])));
    set_grad(w, g);
    opt.set_lr(sched.lr(s));
    opt.step(net.list);
  }
  CHECK(initial > 100.0);
  CHECK(loss() < 1e-6 * initial);
  const std::vector<double> p = values_of(w.value);
  for (std::size_t i = 0; i < target.size(); ++i) CHECK(p[i] == doctest::Approx(target[i]).epsilon(1e-3));
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

  ssmx::AdamW<double, space> opt(1e-2);
  const std::size_t before = ssmx::memory_stats(space).current_by_tag[tag];
  for (int t = 0; t < 3; ++t) {
    std::vector<double> g(12);
    for (auto& x : g) x = rng.normal();
    set_grad(w, g);
    set_grad(w2, g);
    opt.step(net.list);
  }
  // Two moments of 12 doubles, allocated once, under Tag::OptimizerState, in the space.
  CHECK(ssmx::memory_stats(space).current_by_tag[tag] - before == 2 * 12 * sizeof(double));

  // A fresh optimiser given the state (and the parameters) continues bit-identically.
  ssmx::AdamW<double, space> restored(1e-2);
  restored.load_state(opt.state(), opt.step_count());
  CHECK(restored.step_count() == 3);
  CHECK(ssmx::memory_stats(space).current_by_tag[tag] - before == 4 * 12 * sizeof(double));
  ssmx::copy<double>(w2.value.view(), w.value.view());
  for (int t = 0; t < 2; ++t) {
    std::vector<double> g(12);
    for (auto& x : g) x = rng.normal();
    set_grad(w, g);
    set_grad(w2, g);
    opt.step(net.list);
    restored.step(twin.list);
  }
  CHECK(bytes_of(to_vector(w.value)) == bytes_of(to_vector(w2.value)));
  CHECK(snapshot_state(opt.state()) == snapshot_state(restored.state()));

  // Incomplete or foreign state is refused and the current state kept.
  auto st = opt.state();
  const auto kept = snapshot_state(restored.state());
  std::vector<ssmx::NamedTensor<double, space>> partial{st[0]};
  CHECK(contains(message_of<ssmx::ValueError>([&] { restored.load_state(partial, 5); }), "w.exp_avg_sq"));
  std::vector<ssmx::NamedTensor<double, space>> foreign{st[0], st[1], {"w.momentum_buffer", st[0].value}};
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
  ssmx::SGD<float, space> a(0.1, 0.9), b(0.1, 0.9);
  a.step(net.list);
  b.load_state(a.state());
  CHECK(snapshot_state(a.state()) == snapshot_state(b.state()));
  std::vector<ssmx::NamedTensor<float, space>> bad{{"w.exp_avg", a.state()[0].value}};
  CHECK_THROWS_AS(b.load_state(bad), ssmx::ValueError);
  CHECK(snapshot_state(a.state()) == snapshot_state(b.state()));
}

// State saved in one space and loaded in another (a device optimiser resumed from a
// checkpoint's host tensors, a host optimiser given device state) continues as the original.
TEST_CASE_TEMPLATE("optim: optimiser state moves between memory spaces", T, float, double) {
  using namespace test_optim;
  ssmx::test::Rng rng(19);
  std::vector<double> init(10);
  for (auto& x : init) x = double(T(rng.uniform()));
  Params<T> net, twin;
  Params<T, ssmx::Space::Host> host;
  auto& w = net.add("w", ssmx::Dims{2, 5}, init);
  auto& w2 = twin.add("w", ssmx::Dims{2, 5}, init);
  auto& wh = host.add("w", ssmx::Dims{2, 5}, init);
  auto random_grads = [&] {
    std::vector<double> g(10);
    for (auto& x : g) x = double(T(rng.normal()));
    set_grad(w, g);
    set_grad(w2, g);
    set_grad(wh, g);
  };

  ssmx::AdamW<T, space> opt(1e-2, 0.9, 0.99, 1e-8, 0.1);
  for (int t = 0; t < 3; ++t) {
    random_grads();
    opt.step(net.list);
  }
  const auto saved = host_copies(opt.state());  // as a checkpoint would hold them
  ssmx::AdamW<T, space> resumed(1e-2, 0.9, 0.99, 1e-8, 0.1);
  resumed.load_state(host_entries(opt.state(), saved), opt.step_count());  // host entries, optimiser in space
  ssmx::AdamW<T> on_host(1e-2, 0.9, 0.99, 1e-8, 0.1);
  on_host.load_state(opt.state(), opt.step_count());  // entries in space, optimiser on the host
  CHECK(snapshot_state(resumed.state()) == snapshot_state(opt.state()));
  CHECK(snapshot_state(on_host.state()) == snapshot_state(opt.state()));
  put(w2.value, values_of(w.value));
  put(wh.value, values_of(w.value));

  for (int t = 0; t < 3; ++t) {
    random_grads();
    opt.step(net.list);
    resumed.step(twin.list);
    on_host.step(host.list);
  }
  CHECK(bytes_of(to_vector(w.value)) == bytes_of(to_vector(w2.value)));
  CHECK(ssmx::test::max_rel_err(to_vector(w.value), to_vector(wh.value), near_zero) <= space_vs_host_tolerance<T>());

  // Loaded values are checked wherever they come from, with the host's messages.
  auto bad = host_copies(opt.state());
  bad[1][3] = T(-1);  // w.exp_avg_sq
  std::vector<ssmx::Tensor<T, space>> bad_in_space;
  for (const auto& h : bad) bad_in_space.push_back(ssmx::to_space<space>(h));
  std::vector<ssmx::NamedTensor<T, space>> entries{{"w.exp_avg", bad_in_space[0].view()},
                                                   {"w.exp_avg_sq", bad_in_space[1].view()}};
  const auto kept = snapshot_state(resumed.state());
  const std::string msg = message_of<ssmx::ValueError>([&] { resumed.load_state(entries, 1); });
  CHECK(contains(msg, "AdamW::load_state: state entry 'w.exp_avg_sq' has negative value -1 at index 3"));
  CHECK(snapshot_state(resumed.state()) == kept);
  CHECK(resumed.step_count() == 6);
}

// The optimisers and the clipping in the test space against the same on the host, step by
// step (bit-identical on the CPU build; to rounding on the GPU).
// Device optimisers against host ones. On the CPU build both sides would be the same
// instantiation (a comparison that cannot fail), so this runs in the CUDA build only.
#if SSMX_TEST_CUDA
TEST_CASE_TEMPLATE("optim: optimisers in the test space follow the host optimisers", T, float, double) {
  using namespace test_optim;
  ssmx::test::Rng rng(23);
  const ssmx::Dims dims[] = {ssmx::Dims{7, 13}, ssmx::Dims{300}, ssmx::Dims{3, 4, 5}};
  Params<T> dev;
  Params<T, ssmx::Space::Host> host;
  for (int k = 0; k < 3; ++k) {
    std::vector<double> init(std::size_t(dims[k].numel()));
    for (auto& x : init) x = double(T(rng.normal()));
    const std::string name = "layers." + std::to_string(k) + ".w";
    dev.add(name, dims[k], init);
    host.add(name, dims[k], init);
  }
  ssmx::AdamW<T, space> adamw(1e-2, 0.9, 0.99, 1e-8, 0.1);
  ssmx::AdamW<T> adamw_h(1e-2, 0.9, 0.99, 1e-8, 0.1);
  ssmx::SGD<T, space> sgd(5e-3, 0.9, 1e-2, true);
  ssmx::SGD<T> sgd_h(5e-3, 0.9, 1e-2, true);
  const double tol = space_vs_host_tolerance<T>();
  for (int step = 0; step < 8; ++step) {
    for (std::size_t k = 0; k < 3; ++k) {
      std::vector<double> g(std::size_t(dims[k].numel()));
      for (auto& x : g) x = double(T(rng.normal(0.0, 2.0)));
      set_grad(*dev.list[k], g);
      set_grad(*host.list[k], g);
    }
    const double n = double(ssmx::clip_grad_norm(dev.list, 10.0)), nh = double(ssmx::clip_grad_norm(host.list, 10.0));
    CHECK(same_norm(n, nh, reduction_tolerance<T>()));
    if (step % 2 == 0) {
      adamw.step(dev.list);
      adamw_h.step(host.list);
    } else {
      sgd.step(dev.list);
      sgd_h.step(host.list);
    }
  }
  for (std::size_t k = 0; k < 3; ++k) {
    CAPTURE(k);
    CHECK(ssmx::test::max_rel_err(to_vector(dev.list[k]->value), to_vector(host.list[k]->value), near_zero) <= tol);
  }
  const auto st = adamw.state();
  const auto st_h = adamw_h.state();
  REQUIRE(st.size() == st_h.size());
  for (std::size_t k = 0; k < st.size(); ++k) {
    CAPTURE(st[k].name);
    CHECK(st[k].name == st_h[k].name);
    CHECK(ssmx::test::max_rel_err(host_values(st[k].value), host_values(st_h[k].value), near_zero) <= tol);
  }
  CHECK(adamw.step_count() == 4);
}

// ---- gradient norm and clipping ----------------------------------------------------------
#endif  // SSMX_TEST_CUDA

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
    CHECK(values_of(b.grad)[0] == doctest::Approx(-0.8).epsilon(tolerance<T>()));
    CHECK(double(ssmx::global_grad_norm(net.list)) == doctest::Approx(1.0).epsilon(tolerance<T>()));
  }
  SUBCASE("clip_to_norm scales by a norm given by the caller") {
    ssmx::clip_to_norm(net.list, 10.0, 2.0);  // e.g. summed over processes
    CHECK(ssmx::test::max_rel_err(values_of(a.grad), std::vector<double>{0.6, 0.0}) < tolerance<T>());
    CHECK(values_of(b.grad)[0] == doctest::Approx(-0.8).epsilon(tolerance<T>()));
  }
  SUBCASE("max_norm must be >= 0") { CHECK_THROWS_AS(ssmx::clip_grad_norm(net.list, -1.0), ssmx::ValueError); }
}

TEST_CASE("optim: the gradient norm is deterministic and survives overflowing squares") {
  using namespace test_optim;
  Params<double> net;
  ssmx::test::Rng rng(3);
  std::vector<double> g(1000);
  for (auto& x : g) x = rng.normal();
  net.add("a", ssmx::Dims{1000}, g);
  set_grad(*net.list[0], g);
  const double n1 = ssmx::global_grad_norm(net.list), n2 = ssmx::global_grad_norm(net.list);
  CHECK(std::memcmp(&n1, &n2, sizeof(double)) == 0);
  double ref = 0.0;
  for (double x : g) ref += x * x;
  // The host adds in this order; a device reduction in another (positive terms: tiny error).
  CHECK(n1 == doctest::Approx(std::sqrt(ref)).epsilon(space == ssmx::Space::Host ? 1e-14 : 1e-13));

  Params<double> big;
  auto& h = big.add("h", ssmx::Dims{2}, {0.0, 0.0});
  set_grad(h, {3e200, -4e200});  // squares overflow a double; the norm does not
  CHECK(ssmx::clip_grad_norm(big.list, 1.0) == doctest::Approx(5e200));
  CHECK(values_of(h.grad)[0] == doctest::Approx(0.6));
  CHECK(values_of(h.grad)[1] == doctest::Approx(-0.8));
}

// The path device gradients take (one expression reduction per gradient, the sums added in
// double) against the host loops, on host copies of the same gradients: ordinary values,
// squares that overflow T (float) or double, empty gradients, non-finite elements.
TEST_CASE_TEMPLATE("optim: the reduction path of the gradient norm matches the host loops", T, float, double) {
  using namespace test_optim;
  namespace od = ssmx::optim_detail;
  const double tol = reduction_tolerance<T>();
  ssmx::test::Rng rng(31);
  const ssmx::Dims dims[] = {ssmx::Dims{4097}, ssmx::Dims{0}, ssmx::Dims{3, 50}, ssmx::Dims{1}};
  Params<T> dev;
  Params<T, ssmx::Space::Host> host;
  std::vector<std::vector<double>> grads;
  for (int k = 0; k < 4; ++k) {
    std::vector<double> g(std::size_t(dims[k].numel()));
    for (auto& x : g) x = double(T(rng.normal()));
    const std::string name = "p" + std::to_string(k);
    set_grad(dev.add(name, dims[k], g), g);
    set_grad(host.add(name, dims[k], g), g);
    grads.push_back(g);
  }
  auto set_both = [&](std::size_t k, ssmx::index_t i, T x) {
    set_element(dev.list[k]->grad, i, x);
    set_element(host.list[k]->grad, i, x);
  };

  SUBCASE("ordinary gradients") {
    CHECK(same_norm(od::by_reduction::sum_of_squares(dev.list), od::sum_of_squares(host.list), tol));
    CHECK(same_norm(od::by_reduction::sum_of_squares(dev.list, 0.25), od::sum_of_squares(host.list, 0.25), tol));
    CHECK(same_norm(od::by_reduction::grad_norm(dev.list), od::grad_norm(host.list), tol));
    CHECK(!od::by_reduction::first_non_finite(dev.list).found());
    // Deterministic run to run.
    const double n1 = od::by_reduction::grad_norm(dev.list), n2 = od::by_reduction::grad_norm(dev.list);
    CHECK(std::memcmp(&n1, &n2, sizeof(double)) == 0);
    // What the library uses for the test space is this path on the GPU and the loops on the host.
    if (space != ssmx::Space::Host) CHECK(od::grad_norm(dev.list) == n1);
    CHECK(od::by_reduction::grad_norm(ssmx::ParameterList<T, space>{}) == 0.0);
  }
  SUBCASE("squares that overflow T") {
    const T large = T(3.0 * std::sqrt(double(std::numeric_limits<T>::max())));  // its square overflows T
    set_both(0, 17, large);
    set_both(2, 149, T(-large * T(4) / T(3)));
    set_both(3, 0, large);
    CHECK(std::isfinite(od::by_reduction::grad_norm(dev.list)));
    CHECK(same_norm(od::by_reduction::grad_norm(dev.list), od::grad_norm(host.list), tol));
    if (std::is_same_v<T, float>)  // within a double: the sums of squares agree too
      CHECK(same_norm(od::by_reduction::sum_of_squares(dev.list), od::sum_of_squares(host.list), tol));
  }
  SUBCASE("non-finite elements") {
    const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
    set_both(2, 31, inf);
    CHECK(same_norm(od::by_reduction::sum_of_squares(dev.list), od::sum_of_squares(host.list), 0.0));  // +inf
    CHECK(same_norm(od::by_reduction::grad_norm(dev.list), od::grad_norm(host.list), 0.0));
    set_both(0, 4000, -inf);
    set_both(2, 40, nan);
    CHECK(same_norm(od::by_reduction::grad_norm(dev.list), od::grad_norm(host.list), 0.0));  // NaN
    const od::NonFinite a = od::by_reduction::first_non_finite(dev.list), b = od::first_non_finite(host.list);
    CHECK(a.param == 0);
    CHECK(a.index == 4000);
    CHECK(a.param == b.param);
    CHECK(a.index == b.index);
    CHECK(a.value == b.value);
  }
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

  ssmx::SGD<T, space> sgd(0.1, 0.9, 0.01);
  ssmx::AdamW<T, space> adamw(1e-2);
  sgd.step(net.list);  // state exists before the failing step
  adamw.step(net.list);

  const T bad_values[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()};
  for (T bad : bad_values) {
    CAPTURE(double(bad));
    set_element(b.grad, 17, bad);
    set_element(b.grad, 19, std::numeric_limits<T>::quiet_NaN());  // later offender: not the one named
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
  b.grad = ssmx::Tensor<float, space>(ssmx::Dims{2}, ssmx::Tag::Gradients);  // wrong shape
  fill<float>(b.grad, 1.0f);
  ssmx::AdamW<float, space> opt(0.1);
  const auto before = snapshot_params(net.list);
  std::string msg = message_of<ssmx::ShapeError>([&] { opt.step(net.list); });
  CHECK(contains(msg, "'b'"));
  CHECK(contains(msg, "[3]"));
  CHECK(snapshot_params(net.list) == before);
  CHECK(opt.state().empty());
  CHECK(opt.step_count() == 0);

  ssmx::ParameterList<float, space> twice{&a, &a};
  CHECK(contains(message_of<ssmx::ValueError>([&] { opt.step(twice); }), "'a' appears twice"));
  ssmx::ParameterList<float, space> with_null{&a, nullptr};
  CHECK_THROWS_AS(opt.step(with_null), ssmx::ValueError);
}

// ---- schedules -----------------------------------------------------------------------------

#if !SSMX_TEST_CUDA  // no tensors involved
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
#endif
