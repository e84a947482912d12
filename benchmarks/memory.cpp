// Peak tracked host memory of one forward+backward step, per gradient strategy.
//
// Models (compile-time shapes, the library's design; --model), tied head, batch 1:
//   diagonal    Model<DiagonalSSM<float, 256, 16>, 8>: P = 256, N = 16, state S = P·N =
//               4096 floats per token and layer (the napkin math below)
//   mamba-130m  Model<Mamba<float, 768, 16, 2, 4, 48>, 24>: Mamba-130m's shapes (d_model
//               768, 24 layers, d_state 16, expand 2, d_conv 4, dt_rank 48), state
//               S = 1536·16 per token and layer; Adjoint stores K·768 floats per token
//   mamba2-130m Model<Mamba2<float, 768, 128, 64, 1, 2, 4>, 24>: mamba2-130m's shapes
//               (d_model 768, 24 layers, d_state 128, headdim 64: 24 heads, one group),
//               state S = 24·64·128 = 196,608 per token and layer (8 times Mamba-1's)
// vocab 256 unless --vocab. Tokens: x_t = (7t + 3) mod vocab, target_t = x_{t+1}.
//
// Napkin math, bytes per token (float, K = 8 layers):
//   Adjoint       K·P·4 (layer inputs) + P·4 (dL/dy) + K·S·4/chunk (boundary states)
//                 = 8 KiB + 1 KiB + 0.5 KiB (chunk 256)  ~ 9.5 KiB, plus O(chunk·S) workspace
//   Checkpointed  the same streams + one layer's whole stretch and tapes over all T tokens:
//                 several S-sized values per token (a, h, dL/dh, δ, ...) ~ 100+ KiB
//   Backprop      K such tapes ~ K times that
//   TruncatedAdjoint  like Adjoint with window-long chunks and O(window·S) block sums
// The peak is affine in T (a + b·T); the benchmark fits it from the runs made so far and
// uses the fit to skip runs that would not fit in memory (or time) and to answer
// --budget-gib: the largest T whose peak fits a budget, verified by a run when allowed.
//
// Output: one JSON object per line on stdout and in --out. Result lines have
//   {"name":"memory","kind":"step","strategy","T","batch","P","N","K","vocab","chunk"|"window",
//    "threads","peak_bytes","baseline_bytes","peak_by_tag":{...},"seconds","tokens_per_s","loss"}
// peak_bytes is the tracker's peak over the step (memory_stats(Space::Host) after
// reset_peak), model parameters and gradients included; baseline_bytes is what was live
// before the step (parameters, gradients). Skipped runs: "kind":"skipped" with the reason and
// the predicted peak and time. Budget answers: "kind":"budget".
//
// Run `bench_memory --help` for the flags.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <ssmx/adjoint/strategy.hpp>
#include <ssmx/core/memory.hpp>
#include <ssmx/nn/model.hpp>

#include "bench_util.hpp"

namespace bench_memory {

using namespace bench_util;
using ssmx::index_t;
using Diagonal = ssmx::nn::Model<ssmx::nn::DiagonalSSM<float, 256, 16>, 8>;
using Mamba130m = ssmx::nn::Model<ssmx::nn::Mamba<float, 768, 16, 2, 4, 48>, 24>;
using Mamba2_130m = ssmx::nn::Model<ssmx::nn::Mamba2<float, 768, 128, 64, 1, 2, 4>, 24>;

struct Options : CommonOptions {
  std::string model = "diagonal";
  double budget_gib = 0;    // 0: no budget question
  index_t max_T = 1 << 20;  // largest T run to verify a budget answer
  bool adjoint_1m = false;
  bool bf16_inputs = false;
};

void add_options(CLI::App& app, Options& o) {
  add_common_options(app, o);
  app.add_option("--model", o.model, "diagonal (DiagonalSSM P=256 N=16 K=8), mamba-130m or mamba2-130m")
      ->check(CLI::IsMember({"diagonal", "mamba-130m", "mamba2-130m"}))
      ->capture_default_str();
  app.add_option("--budget-gib", o.budget_gib,
                 "report per strategy the largest T whose peak fits X GiB (affine fit); verify it by a run "
                 "when T <= --max-T")
      ->type_name("X");
  add_count(app, "--max-T", o.max_T, "cap for the verification run of --budget-gib")->default_str("1M");
  app.add_flag("--adjoint-1m", o.adjoint_1m, "also run one Adjoint step at T = 1,048,576 (ignores --max-run-seconds)");
  app.add_flag("--bf16-inputs", o.bf16_inputs,
               "store the layer inputs in bfloat16 (Model::Config::bf16_inputs); each step is then also run with "
               "float storage and the differences reported (\"vs_float\")");
}

struct Measured {
  index_t T = 0;
  ssmx::MemoryStats stats;
  std::size_t baseline = 0;
  double seconds = 0, loss = 0;
  // --bf16-inputs: against the same step with float storage; and, for scale, float storage
  // with every parameter perturbed by a relative 2^-9 (bfloat16's rounding) of varying sign.
  double loss_rel = -1, grad_rel = -1, perturbed_loss_rel = -1, perturbed_grad_rel = -1;
};

template <class Net>
class Bench {
  static constexpr index_t P = Net::d_model, K = Net::num_layers;

 public:
  explicit Bench(const Options& o) : opt_(o), sink_(o.out), net_(config(o)) {
    mem_limit_ = o.mem_limit_gib > 0 ? o.mem_limit_gib * double(1ull << 30) : 0.75 * physical_memory_bytes();
  }

  void run() {
    for (const auto& s : opt_.strategies) {
      std::vector<Measured> done;
      for (index_t T : opt_.T) step_if_allowed(s, T, done, opt_.max_run_seconds);
      if (opt_.budget_gib > 0) budget(s, done);
    }
    if (opt_.adjoint_1m) {
      std::vector<Measured> none;
      step_if_allowed("adjoint", index_t(1) << 20, none, 0);
    }
  }

 private:
  static typename Net::Config config(const Options& o) {
    typename Net::Config c;
    c.vocab = o.vocab;
    c.seed = o.seed;
    c.bf16_inputs = o.bf16_inputs;
    return c;
  }

  std::string header(const std::string& kind, const std::string& s, index_t T) const {
    std::string h = "{\"name\":\"memory\",\"kind\":\"" + kind + "\",\"strategy\":\"" + s + "\",\"T\":" +
                    std::to_string(T) + ",\"batch\":1,\"model\":\"" + opt_.model + "\",\"P\":" + std::to_string(P) +
                    ",\"S\":" + std::to_string(ssmx::nn::state_numel(Net::layer_type::state_dims())) + ",\"K\":" + std::to_string(K) + ",\"vocab\":" + std::to_string(opt_.vocab);
    if (s == "adjoint") h += ",\"chunk\":" + std::to_string(opt_.chunk) + ",\"shard\":" + std::to_string(opt_.shard);
    if (s == "truncated") h += ",\"window\":" + std::to_string(opt_.window) + ",\"shard\":" + std::to_string(opt_.shard);
    h += ",\"threads\":" + std::to_string(threads());
    if (opt_.bf16_inputs) h += ",\"bf16_inputs\":true";
    if (verifying_ && kind != "budget") h += ",\"budget_check\":true";  // the run that verifies a budget answer
    return h;
  }

  // The runs to fit. Adjoint and TruncatedAdjoint cut the sequence into chunks of
  // min(chunk, T) (window for Truncated): below one chunk the whole sequence is one stretch
  // and the cost per token is higher. Fit the chunked regime when it has two points.
  std::vector<Measured> fit_points(const std::string& s, const std::vector<Measured>& done) const {
    const index_t start = s == "adjoint" ? opt_.chunk : s == "truncated" ? opt_.window : 0;
    std::vector<Measured> chunked;
    for (const auto& m : done)
      if (m.T >= start) chunked.push_back(m);
    return chunked.size() >= 2 ? chunked : done;
  }

  // Runs (strategy, T) unless the fit over `done` predicts it exceeds the memory limit or
  // `max_seconds` (0: no time limit); appends the measurement to `done`.
  bool step_if_allowed(const std::string& s, index_t T, std::vector<Measured>& done, double max_seconds) {
    std::vector<double> x, peak, secs;
    for (const auto& m : fit_points(s, done))
      x.push_back(double(m.T)), peak.push_back(double(m.stats.peak)), secs.push_back(m.seconds);
    const double pred_peak = x.empty() ? 0 : fit(x, peak)(double(T));
    const double pred_secs = x.empty() ? 0 : fit(x, secs)(double(T));
    std::string reason;
    if (pred_peak > mem_limit_) reason = "memory";
    else if (max_seconds > 0 && pred_secs > max_seconds) reason = "time";
    if (!reason.empty()) {
      sink_.line(header("skipped", s, T) + ",\"reason\":\"" + reason + "\",\"predicted_peak_bytes\":" +
                 num(std::round(pred_peak)) + ",\"predicted_seconds\":" + num(pred_secs) + ",\"limit_bytes\":" +
                 num(std::round(mem_limit_)) + ",\"limit_seconds\":" + num(max_seconds) + "}");
      return false;
    }
    Measured m = step(s, T);
    std::string l = header("step", s, T) + ",\"peak_bytes\":" + std::to_string(m.stats.peak) +
                    ",\"baseline_bytes\":" + std::to_string(m.baseline) + ",\"peak_by_tag\":{";
    for (int t = 0; t < ssmx::num_tags; ++t)
      l += std::string(t ? "," : "") + "\"" + ssmx::tag_name(ssmx::Tag(t)) + "\":" +
           std::to_string(m.stats.peak_by_tag[std::size_t(t)]);
    l += "},\"seconds\":" + num(m.seconds) + ",\"tokens_per_s\":" + num(double(T) / m.seconds) +
         ",\"loss\":" + num(m.loss);
    if (m.loss_rel >= 0)
      l += ",\"vs_float\":{\"loss_rel\":" + num(m.loss_rel) + ",\"grad_rel_2norm\":" + num(m.grad_rel) +
           ",\"perturbed_params_loss_rel\":" + num(m.perturbed_loss_rel) +
           ",\"perturbed_params_grad_rel_2norm\":" + num(m.perturbed_grad_rel) + "}";
    if (!done.empty()) l += ",\"predicted_peak_bytes\":" + num(std::round(pred_peak));
    sink_.line(l + "}");
    done.push_back(m);
    return true;
  }

  Measured step(const std::string& s, index_t T) {
    if (s == "backprop") return step_with(T, ssmx::Backprop{});
    if (s == "checkpointed") return step_with(T, ssmx::Checkpointed{});
    if (s == "adjoint") return step_with(T, ssmx::Adjoint{opt_.chunk, opt_.shard});
    return step_with(T, ssmx::TruncatedAdjoint{opt_.window, opt_.shard});
  }

  template <class Strategy>
  Measured step_with(index_t T, const Strategy& strategy) {
    const Tokens tok(T, opt_.vocab);
    const ssmx::nn::Batch batch{tok.inputs.data(), tok.targets.data(), 1, T};
    net_.zero_grad();
    ssmx::reset_peak(ssmx::Space::Host);
    Measured m;
    m.T = T;
    m.baseline = ssmx::memory_stats(ssmx::Space::Host).current;
    const auto t0 = std::chrono::steady_clock::now();
    const ssmx::nn::StepResult r = net_.forward_backward(batch, strategy);
    m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    m.stats = ssmx::memory_stats(ssmx::Space::Host);
    m.loss = r.loss;
    if (opt_.bf16_inputs) {  // the same step with float storage, after the measurement
      typename Net::Config c = config(opt_);
      c.bf16_inputs = false;
      Net ref(c), perturbed(c);
      const double ref_loss = ref.forward_backward(batch, strategy).loss;
      std::mt19937_64 rng(7);
      for (auto* q : perturbed.parameters())
        for (index_t j = 0; j < q->numel(); ++j) q->value[j] *= float(1.0 + ((rng() & 1) ? 1.0 : -1.0) / 512.0);
      const double perturbed_loss = perturbed.forward_backward(batch, strategy).loss;
      auto grad_rel = [&](Net& x) {
        double diff = 0, norm = 0;
        const auto p = x.parameters(), q = ref.parameters();
        for (std::size_t i = 0; i < p.size(); ++i)
          for (index_t j = 0; j < p[i]->numel(); ++j) {
            const double a = double(p[i]->grad[j]), b = double(q[i]->grad[j]);
            diff += (a - b) * (a - b);
            norm += b * b;
          }
        return std::sqrt(diff / norm);
      };
      m.loss_rel = std::fabs(r.loss - ref_loss) / std::fabs(ref_loss);
      m.grad_rel = grad_rel(net_);
      m.perturbed_loss_rel = std::fabs(perturbed_loss - ref_loss) / std::fabs(ref_loss);
      m.perturbed_grad_rel = grad_rel(perturbed);
    }
    return m;
  }

  // The largest T whose predicted peak fits the budget, from the affine fit of the runs.
  void budget(const std::string& s, std::vector<Measured>& done) {
    const double bytes = opt_.budget_gib * double(1ull << 30);
    if (done.size() < 2) {
      sink_.line(header("budget", s, 0) + ",\"budget_bytes\":" + num(std::round(bytes)) +
                 ",\"error\":\"needs peaks at two or more T (see --T)\"}");
      return;
    }
    std::vector<double> x, peak;
    for (const auto& m : fit_points(s, done)) x.push_back(double(m.T)), peak.push_back(double(m.stats.peak));
    const Affine f = fit(x, peak);
    const index_t t_max = f.b > 0 && bytes > f.a ? index_t(std::floor((bytes - f.a) / f.b)) : 0;
    // "T" of a budget line is the answer: the predicted largest T.
    std::string l = header("budget", s, t_max) + ",\"budget_bytes\":" + num(std::round(bytes));
    l += ",\"intercept_bytes\":" + num(std::round(f.a)) + ",\"bytes_per_token\":" + num(f.b) +
         ",\"predicted_max_T\":" + std::to_string(t_max);
    bool verified = false;
    verifying_ = true;
    const bool ran = t_max > 0 && t_max <= opt_.max_T && step_if_allowed(s, t_max, done, opt_.max_run_seconds);
    verifying_ = false;
    if (ran) {
      const auto& m = done.back();
      l += ",\"verified_peak_bytes\":" + std::to_string(m.stats.peak) +
           ",\"fits\":" + (double(m.stats.peak) <= bytes ? "true" : "false");
      verified = true;
    }
    if (!verified) l += ",\"verified_peak_bytes\":null";
    sink_.line(l + "}");
  }

  Options opt_;
  Sink sink_;
  Net net_;
  double mem_limit_ = 0;
  bool verifying_ = false;
};

}  // namespace bench_memory

int main(int argc, char** argv) {
  CLI::App app{"bench_memory: peak tracked host memory of one forward+backward step per strategy, batch 1."};
  bench_memory::Options o;
  bench_memory::add_options(app, o);
  CLI11_PARSE(app, argc, argv);
  bench_util::sort_unique(o.T);
  try {
    if (o.model == "mamba-130m")
      bench_memory::Bench<bench_memory::Mamba130m>(o).run();
    else if (o.model == "mamba2-130m")
      bench_memory::Bench<bench_memory::Mamba2_130m>(o).run();
    else
      bench_memory::Bench<bench_memory::Diagonal>(o).run();
  } catch (const std::exception& e) {
    std::cerr << "bench_memory: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
