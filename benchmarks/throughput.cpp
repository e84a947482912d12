// Forward+backward throughput per gradient strategy, the paper's O(T²) adjoint beside the
// O(T) one, and a parameter/gradient dump for the PyTorch cross-check.
//
// 1. Main model (--model diagonal): Model<DiagonalSSM<float, 256, 16>, 8>, vocab 256, tied
//    head, batch 1 (the shape of bench_memory); --model mamba: Model<Mamba<float, 256, 16,
//    2, 4, 16>, 4> (the shape of benchmarks/reference/mamba.py); --model mamba2:
//    Model<Mamba2<float, 256, 64, 64, 1, 2, 4>, 4> (D 256, N 64, headdim 64: 8 heads, one
//    group; the shape of benchmarks/reference/mamba2.py). One forward_backward step
//    per (scan path, strategy, T); reports tokens/s and µs per token. Adjoint's cost is
//    linear in T, so µs/token stays flat. --scan picks the scan paths (materialised, fused,
//    structured: nn/scan_layer.hpp), each timed in the same run.
// 2. Quadratic check: Model<DiagonalSSM<float, 64, 16>, 1> (a smaller model, so that the
//    O(T²) runs finish), Adjoint against PaperAdjoint without truncation (window 0, the
//    double sum over t and i <= t). With K = 1 the paper's formula is exact, so both give the
//    same gradient (reported as max_rel_grad_diff) and only the time differs:
//    PaperAdjoint's µs/token grows linearly with T.
// 3. --dump DIR: a double-precision Model<DiagonalSSM<double, 16, 4>, 2>, vocab 32, writes
//    its parameters, the tokens and the loss and gradients of several strategies as raw
//    little-endian files with a JSON manifest; benchmarks/reference/compare.py recomputes
//    them with the PyTorch reference and prints the largest relative error.
//
// Tokens (shared with the reference): x_t = (7t + 3) mod vocab, target_t = x_{t+1}.
//
// Napkin math for (1), per token and layer: the three maps R^P -> R^N are 6PN = 24.6 KFLOP;
// the state update and the readout touch S = P·N = 4096 values about four times (16 KFLOP).
// The backward pass recomputes the forward once and costs about twice it: ~4 × 41 KFLOP
// ≈ 0.16 MFLOP per token and layer, 1.3 MFLOP for K = 8, plus the tied head (2·P·vocab
// forward, twice that backward: 0.4 MFLOP). About 1.7 MFLOP per token: at ~10 GFLOP/s on
// two cores the ceiling is ~6,000 tokens/s; tokens_per_s / 6,000 is the engine's fraction.
//
// Output: JSON lines on stdout and in --out:
//   {"name":"throughput"|"throughput_mamba"|"throughput_mamba2","strategy","T","batch","P","N","K","vocab",
//    "chunk"|"window","threads","scan","seconds","tokens_per_s","us_per_token","loss","peak_bytes"}
//   {"name":"throughput_paper", ... the same for the small model, "max_rel_grad_diff"}
//   {"name":..., "kind":"skipped", "reason", "predicted_seconds", "predicted_peak_bytes"}
// Run `bench_throughput --help` for the flags.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <ssmx/adjoint/strategy.hpp>
#include <ssmx/core/memory.hpp>
#include <ssmx/nn/model.hpp>

#include "bench_util.hpp"

namespace bench_throughput {

using namespace bench_util;
using ssmx::index_t;

using MainNet = ssmx::nn::Model<ssmx::nn::DiagonalSSM<float, 256, 16>, 8>;
using MambaNet = ssmx::nn::Model<ssmx::nn::Mamba<float, 256, 16, 2, 4, 16>, 4>;
using Mamba2Net = ssmx::nn::Model<ssmx::nn::Mamba2<float, 256, 64, 64, 1, 2, 4>, 4>;
using SmallNet = ssmx::nn::Model<ssmx::nn::DiagonalSSM<float, 64, 16>, 1>;
using DumpNet = ssmx::nn::Model<ssmx::nn::DiagonalSSM<double, 16, 4>, 2>;

struct Options : CommonOptions {
  std::vector<index_t> paper_T = {512, 1024, 2048, 4096};
  index_t repeats = 1;
  bool main = true, paper = true;
  std::string dump_dir;
  index_t dump_T = 256;
  std::string model = "diagonal";
  std::vector<std::string> scans = {"structured"};
};

void add_options(CLI::App& app, Options& o) {
  add_common_options(app, o);
  app.get_option("--T")->description("main-model sequence lengths");
  add_count(app, "--repeats", o.repeats, "steps per point; the fastest is reported");
  add_counts(app, "--paper-T", o.paper_T, "small-model lengths for Adjoint vs PaperAdjoint", "512,1K,2K,4K");
  // Negative flags: giving one clears the bool.
  app.add_flag_callback("--no-main", [&o] { o.main = false; }, "skip the main model");
  app.add_flag_callback("--no-paper", [&o] { o.paper = false; }, "skip the PaperAdjoint comparison");
  app.add_option("--dump", o.dump_dir, "only write the double-precision gradient dump for compare.py to DIR")
      ->type_name("DIR");
  add_count(app, "--dump-T", o.dump_T, "sequence length of the dump");
  app.add_option("--model", o.model,
                 "main model: diagonal (DiagonalSSM P=256 N=16 K=8), mamba (Mamba D=256 K=4) or mamba2 (Mamba2 D=256 "
                 "N=64 headdim=64 K=4)")
      ->check(CLI::IsMember({"diagonal", "mamba", "mamba2"}))
      ->capture_default_str();
  app.add_option("--scan", o.scans, "scan paths to time, comma-separated: materialised, fused, structured")
      ->delimiter(',')
      ->check(CLI::IsMember({"materialised", "fused", "structured"}))
      ->capture_default_str();
}

struct Timed {
  double seconds = 0, loss = 0;
  std::size_t peak = 0;
};

// The fastest of `repeats` steps (gradients zeroed before each), and the tracked peak.
template <class Net, class Strategy>
Timed time_step(Net& net, index_t T, index_t vocab, const Strategy& strategy, index_t repeats) {
  const Tokens tok(T, vocab);
  const ssmx::nn::Batch batch{tok.inputs.data(), tok.targets.data(), 1, T};
  Timed best;
  for (index_t r = 0; r < repeats; ++r) {
    net.zero_grad();
    ssmx::reset_peak(ssmx::Space::Host);
    const auto t0 = std::chrono::steady_clock::now();
    const ssmx::nn::StepResult res = net.forward_backward(batch, strategy);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == 0 || s < best.seconds) best.seconds = s;
    best.loss = res.loss;
    best.peak = std::max(best.peak, ssmx::memory_stats(ssmx::Space::Host).peak);
  }
  return best;
}

// max over parameters of max|a - b| / max|b|.
template <class T>
double max_rel_diff(const std::vector<std::vector<T>>& a, const std::vector<std::vector<T>>& b) {
  double worst = 0;
  for (std::size_t p = 0; p < a.size(); ++p) {
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < a[p].size(); ++i) {
      diff = std::max(diff, std::abs(double(a[p][i]) - double(b[p][i])));
      scale = std::max(scale, std::abs(double(b[p][i])));
    }
    worst = std::max(worst, scale > 0 ? diff / scale : diff);
  }
  return worst;
}

template <class Net>
std::vector<std::vector<typename Net::T>> grads_of(Net& net) {
  std::vector<std::vector<typename Net::T>> g;
  for (auto* p : net.parameters()) g.emplace_back(p->grad.data(), p->grad.data() + p->numel());
  return g;
}

class Bench {
 public:
  explicit Bench(const Options& o) : opt_(o), sink_(o.out) {
    mem_limit_ = o.mem_limit_gib > 0 ? o.mem_limit_gib * double(1ull << 30) : 0.75 * physical_memory_bytes();
  }

  void run() {
    if (!opt_.dump_dir.empty()) {
      dump();
      return;
    }
    if (opt_.main) main_model();
    if (opt_.paper) paper_comparison();
  }

 private:
  std::string header(const std::string& name, const std::string& s, index_t T, index_t P, index_t N, index_t K,
                     const std::string& kind = "") const {
    std::string h = "{\"name\":\"" + name + "\",";
    if (!kind.empty()) h += "\"kind\":\"" + kind + "\",";
    h += "\"strategy\":\"" + s + "\",\"T\":" + std::to_string(T) + ",\"batch\":1,\"P\":" + std::to_string(P) +
         ",\"N\":" + std::to_string(N) + ",\"K\":" + std::to_string(K) + ",\"vocab\":" + std::to_string(opt_.vocab);
    if (s == "adjoint") h += ",\"chunk\":" + std::to_string(opt_.chunk) + ",\"shard\":" + std::to_string(opt_.shard);
    if (s == "truncated") h += ",\"window\":" + std::to_string(opt_.window) + ",\"shard\":" + std::to_string(opt_.shard);
    if (s == "paper_adjoint") h += ",\"window\":0";
    return h + ",\"threads\":" + std::to_string(threads());
  }

  std::string result(const Timed& t, index_t T) const {
    return ",\"seconds\":" + num(t.seconds) + ",\"tokens_per_s\":" + num(double(T) / t.seconds) +
           ",\"us_per_token\":" + num(1e6 * t.seconds / double(T)) + ",\"loss\":" + num(t.loss) +
           ",\"peak_bytes\":" + std::to_string(t.peak);
  }

  // Empty when allowed, else the reason; fills the predictions.
  std::string check(double pred_secs, double pred_peak) const {
    if (pred_peak > mem_limit_) return "memory";
    if (opt_.max_run_seconds > 0 && pred_secs > opt_.max_run_seconds) return "time";
    return "";
  }
  void skipped(const std::string& head, const std::string& reason, double pred_secs, double pred_peak) {
    sink_.line(head + ",\"reason\":\"" + reason + "\",\"predicted_seconds\":" + num(pred_secs) +
               ",\"predicted_peak_bytes\":" + num(std::round(pred_peak)) + "}");
  }

  void main_model() {
    if (opt_.model == "mamba")
      main_model<MambaNet>(256, 16, 4);
    else if (opt_.model == "mamba2")
      main_model<Mamba2Net>(256, 64, 4);
    else
      main_model<MainNet>(256, 16, 8);
  }

  template <class Net>
  void main_model(index_t P, index_t N, index_t K) {
    for (const auto& scan : opt_.scans) {
      typename Net::Config cfg;
      cfg.vocab = opt_.vocab;
      cfg.seed = opt_.seed;
      cfg.fused = scan != "materialised";
      cfg.structured = scan == "structured";
      Net net(cfg);
      time_step(net, 256, opt_.vocab, ssmx::Adjoint{}, 1);  // warm-up: first touch, thread pool
      const std::string name = opt_.model == "diagonal" ? "throughput" : "throughput_" + opt_.model;
      const std::string tail = ",\"scan\":\"" + scan + "\"";
      for (const auto& s : opt_.strategies) {
        std::vector<double> x, secs, peaks;
        for (index_t T : opt_.T) {
          const double pred_secs = x.empty() ? 0 : fit(x, secs)(double(T));
          const double pred_peak = x.empty() ? 0 : fit(x, peaks)(double(T));
          const std::string why = check(pred_secs, pred_peak);
          if (!why.empty()) {
            skipped(header(name, s, T, P, N, K, "skipped") + tail, why, pred_secs, pred_peak);
            continue;
          }
          Timed t;
          if (s == "backprop") t = time_step(net, T, opt_.vocab, ssmx::Backprop{}, opt_.repeats);
          if (s == "checkpointed") t = time_step(net, T, opt_.vocab, ssmx::Checkpointed{}, opt_.repeats);
          if (s == "adjoint") t = time_step(net, T, opt_.vocab, ssmx::Adjoint{opt_.chunk, opt_.shard}, opt_.repeats);
          if (s == "truncated")
            t = time_step(net, T, opt_.vocab, ssmx::TruncatedAdjoint{opt_.window, opt_.shard}, opt_.repeats);
          sink_.line(header(name, s, T, P, N, K) + tail + result(t, T) + "}");
          x.push_back(double(T)), secs.push_back(t.seconds), peaks.push_back(double(t.peak));
        }
      }
    }
  }

  void paper_comparison() {
    SmallNet::Config cfg;
    cfg.vocab = opt_.vocab;
    cfg.seed = opt_.seed;
    SmallNet net(cfg);
    const ssmx::Adjoint adj{opt_.chunk, opt_.shard};
    time_step(net, 256, opt_.vocab, adj, 1);  // warm-up
    double last_T = 0, last_paper = 0, last_adj = 0;
    for (index_t T : opt_.paper_T) {
      // Adjoint is linear in T, PaperAdjoint quadratic: extrapolate from the previous T.
      const double r = last_T > 0 ? double(T) / last_T : 0;
      const double pred_adj = last_adj * r, pred_paper = last_paper * r * r;
      std::string why = check(pred_adj, 0);
      if (!why.empty()) {
        skipped(header("throughput_paper", "adjoint", T, 64, 16, 1, "skipped"), why, pred_adj, 0);
        continue;
      }
      const Timed ta = time_step(net, T, opt_.vocab, adj, opt_.repeats);
      const auto g_adj = grads_of(net);
      sink_.line(header("throughput_paper", "adjoint", T, 64, 16, 1) + result(ta, T) + "}");
      last_adj = ta.seconds;
      why = check(pred_paper, 0);
      if (!why.empty()) {
        skipped(header("throughput_paper", "paper_adjoint", T, 64, 16, 1, "skipped"), why, pred_paper, 0);
        last_T = double(T);
        continue;
      }
      const Timed tp = time_step(net, T, opt_.vocab, ssmx::PaperAdjoint{0}, opt_.repeats);
      const double diff = max_rel_diff(grads_of(net), g_adj);
      sink_.line(header("throughput_paper", "paper_adjoint", T, 64, 16, 1) + result(tp, T) +
                 ",\"max_rel_grad_diff\":" + num(diff) + "}");
      last_T = double(T), last_paper = tp.seconds;
    }
  }

  // ---- the dump for benchmarks/reference/compare.py ----
  template <class T>
  static void write_raw(const std::string& path, const T* data, index_t n) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write " + path);
    f.write(reinterpret_cast<const char*>(data), std::streamsize(std::size_t(n) * sizeof(T)));
  }
  static std::string shape_json(const ssmx::Dims& d) {
    std::string s = "[";
    for (int i = 0; i < d.rank; ++i) s += (i ? "," : "") + std::to_string(d[i]);
    return s + "]";
  }

  void dump() {
    const std::uint16_t probe = 1;
    unsigned char first = 0;
    std::memcpy(&first, &probe, 1);
    if (first != 1) throw std::runtime_error("--dump writes little-endian files; this host is big-endian");
    const std::string dir = opt_.dump_dir;
    const index_t T = opt_.dump_T, vocab = 32;
    DumpNet::Config cfg;
    cfg.vocab = vocab;
    cfg.seed = opt_.seed;
    DumpNet net(cfg);
    const Tokens tok(T, vocab);
    write_raw(dir + "/inputs.i32", tok.inputs.data(), T);
    write_raw(dir + "/targets.i32", tok.targets.data(), T);
    std::string m = "{\"dtype\":\"float64\",\"endian\":\"little\",\"P\":16,\"N\":4,\"K\":2,\"vocab\":" +
                    std::to_string(vocab) + ",\"T\":" + std::to_string(T) + ",\"seed\":" + std::to_string(opt_.seed) +
                    ",\"tie_embeddings\":true,\"norm_eps\":" + num(ssmx::nn::default_norm_eps) +
                    ",\"inputs\":\"inputs.i32\",\"targets\":\"targets.i32\",\"parameters\":[";
    bool first_p = true;
    for (auto* p : net.parameters()) {
      const std::string file = p->name + ".value.f64";
      write_raw(dir + "/" + file, p->value.data(), p->numel());
      m += std::string(first_p ? "" : ",") + "{\"name\":\"" + p->name + "\",\"shape\":" + shape_json(p->value.dims()) +
           ",\"file\":\"" + file + "\"}";
      first_p = false;
    }
    m += "],\"strategies\":[";
    const ssmx::nn::Batch batch{tok.inputs.data(), tok.targets.data(), 1, T};
    bool first_s = true;
    auto record = [&](const std::string& name, const std::string& options, auto strategy) {
      net.zero_grad();
      const ssmx::nn::StepResult r = net.forward_backward(batch, strategy);
      char loss[64];
      std::snprintf(loss, sizeof loss, "%.17g", r.loss);
      m += std::string(first_s ? "" : ",") + "{\"name\":\"" + name + "\",\"options\":" + options + ",\"loss\":" + loss +
           ",\"grads\":{";
      bool first_g = true;
      for (auto* p : net.parameters()) {
        const std::string file = name + "." + p->name + ".grad.f64";
        write_raw(dir + "/" + file, p->grad.data(), p->numel());
        m += std::string(first_g ? "" : ",") + "\"" + p->name + "\":\"" + file + "\"";
        first_g = false;
      }
      m += "}}";
      first_s = false;
    };
    record("backprop", "{}", ssmx::Backprop{});
    record("checkpointed", "{}", ssmx::Checkpointed{});
    // A chunk that does not divide T, so that ragged chunks and the carries are exercised.
    record("adjoint", "{\"chunk\":48,\"shard\":16}", ssmx::Adjoint{48, 16});
    record("adjoint_default", "{\"chunk\":256,\"shard\":64}", ssmx::Adjoint{});
    // A window >= T is exactly the untruncated adjoint (DESIGN §1.3).
    record("truncated_full_window", "{\"window\":" + std::to_string(T) + ",\"shard\":16}",
           ssmx::TruncatedAdjoint{T, 16});
    m += "]}";
    std::ofstream f(dir + "/manifest.json", std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write " + dir + "/manifest.json (does the directory exist?)");
    f << m << "\n";
    sink_.line("{\"name\":\"dump\",\"dir\":\"" + dir + "\",\"T\":" + std::to_string(T) + ",\"P\":16,\"N\":4,\"K\":2,\"vocab\":" +
               std::to_string(vocab) + ",\"strategies\":5}");
  }

  Options opt_;
  Sink sink_;
  double mem_limit_ = 0;
};

}  // namespace bench_throughput

int main(int argc, char** argv) {
  CLI::App app{"bench_throughput: forward+backward tokens/s per gradient strategy."};
  bench_throughput::Options o;
  bench_throughput::add_options(app, o);
  CLI11_PARSE(app, argc, argv);
  bench_util::sort_unique(o.T);
  bench_util::sort_unique(o.paper_T);
  try {
    bench_throughput::Bench(o).run();
  } catch (const std::exception& e) {
    std::cerr << "bench_throughput: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
