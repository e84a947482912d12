// Distributed training steps: peak tracked memory per rank and tokens/s, per scheme.
// Run under MPI, e.g.
//
//   mpirun -np 2 build/benchmarks/bench_distributed --scheme sequence --T 8K
//   benchmarks/run_distributed.sh                 R = 1, 2, 4 for every scheme
//
// Schemes (every one: an AdamW step of the whole batch, Adjoint{chunk, shard}):
//   none      one process, the whole batch (run with R = 1: the reference)
//   data      rank r takes its batch / R rows; gradients all-reduced
//   layer     rank r holds dist::layer_block(K, r, R) and the whole batch
//   sequence  rank r holds tokens dist::sequence_block(T, r, R) of every row, whole model
// Models (tied head, vocab --vocab):
//   diagonal  Model<DiagonalSSM<float, 256, 16>, 8>            (the benchmark model)
//   mamba     Model<Mamba<float, 256, 16, 2, 4>, 8>             (a conv halo crosses ranks)
//
// One warm-up step, then --steps timed steps. A step's time is the slowest rank's (a barrier
// before, the max over ranks after); tokens/s = batch·T / that time. Memory: each rank's
// tracked host peak over the timed steps (memory_stats after reset_peak), in total and for
// the activations alone (the stored layer inputs and boundary states: what sharding
// splits), and what stays resident between steps (parameters, gradients, optimiser state).
//
// Output: rank 0 prints one JSON line (and appends it to --out):
//   {"name":"distributed","scheme","model","ranks","T","batch","chunk","steps","seconds_per_step",
//    "tokens_per_s","loss","peak_bytes":[per rank],"activation_peak_bytes":[per rank],
//    "resident_bytes":[per rank],"threads"}
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <ssmx/dist/communicator.hpp>
#include <ssmx/dist/data_parallel.hpp>
#include <ssmx/dist/layer_parallel.hpp>
#include <ssmx/dist/sequence_parallel.hpp>
#include <ssmx/ssmx.hpp>

#include "bench_util.hpp"

namespace bench_distributed {

using ssmx::index_t;
namespace nn = ssmx::nn;
namespace dist = ssmx::dist;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string scheme = "sequence", model = "diagonal", out;
  index_t T = 4096, batch = 2, chunk = 256, shard = 64, vocab = 256;
  int steps = 2;
};

template <class T>
std::string json_list(const std::vector<T>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + bench_util::num(double(v[i]));
  return s + "]";
}

template <class Model>
int run(const Options& o, dist::Communicator& comm) {
  const int R = comm.size(), r = comm.rank();
  SSMX_REQUIRE(o.scheme != "none" || R == 1, ssmx::ValueError, "--scheme none is the one-process reference: run it with 1 rank, not ", R);
  SSMX_REQUIRE(o.scheme != "data" || o.batch % R == 0, ssmx::ValueError, "--scheme data: --batch ", o.batch,
               " is not divisible by the ", R, " ranks");
  typename Model::Config cfg;
  cfg.vocab = o.vocab;
  cfg.seed = 1;
  if (o.scheme == "layer") std::tie(cfg.layer_begin, cfg.layer_end) = dist::layer_block(Model::num_layers, r, R);
  ssmx::reset_peak(ssmx::Space::Host);
  Model model(cfg);
  ssmx::AdamW<float> opt(1e-3);
  const ssmx::Adjoint strategy{o.chunk, o.shard};

  // Every row: the benchmark token stream, shifted per row.
  std::vector<nn::token_t> inputs, targets;
  for (index_t b = 0; b < o.batch; ++b) {
    const bench_util::Tokens tok(o.T + b, o.vocab);
    inputs.insert(inputs.end(), tok.inputs.begin() + b, tok.inputs.end());
    targets.insert(targets.end(), tok.targets.begin() + b, tok.targets.end());
  }
  const nn::Batch whole{inputs.data(), targets.data(), o.batch, o.T};
  const index_t rows = o.scheme == "data" ? o.batch / R : o.batch;
  const nn::Batch local{inputs.data() + (o.scheme == "data" ? r * rows * o.T : 0),
                        targets.data() + (o.scheme == "data" ? r * rows * o.T : 0), rows, o.T};

  auto step = [&]() -> nn::TrainStepResult {
    if (o.scheme == "data") return dist::data_parallel_train_step(model, opt, comm, local, strategy);
    if (o.scheme == "layer") return dist::layer_parallel_train_step(model, opt, comm, whole, strategy);
    if (o.scheme == "sequence") return dist::sequence_parallel_train_step(model, opt, comm, whole, strategy);
    return nn::train_step(model, opt, whole, strategy);
  };
  step();  // warm-up: the optimiser's state is allocated here
  const double param_bytes = double(ssmx::memory_stats(ssmx::Space::Host).current);
  ssmx::reset_peak(ssmx::Space::Host);
  double seconds = 0, loss = 0;
  for (int s = 0; s < o.steps; ++s) {
    comm.barrier();
    const auto t0 = Clock::now();
    const auto res = step();
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> all(std::size_t(R), 0.0);
    all[std::size_t(r)] = dt;
    comm.allreduce_sum(all.data(), all.size());
    seconds += *std::max_element(all.begin(), all.end());
    loss = res.mean_loss();
  }
  const auto ms = ssmx::memory_stats(ssmx::Space::Host);
  std::vector<double> peak(std::size_t(R), 0.0), act(std::size_t(R), 0.0), params(std::size_t(R), 0.0);
  peak[std::size_t(r)] = double(ms.peak);
  act[std::size_t(r)] = double(ms.peak_by_tag[std::size_t(ssmx::Tag::Activations)]);
  params[std::size_t(r)] = param_bytes;
  comm.allreduce_sum(peak.data(), peak.size());
  comm.allreduce_sum(act.data(), act.size());
  comm.allreduce_sum(params.data(), params.size());
  if (r == 0) {
    const double per_step = seconds / o.steps;
    std::string line = "{\"name\":\"distributed\",\"scheme\":\"" + o.scheme + "\",\"model\":\"" + o.model +
                       "\",\"ranks\":" + std::to_string(R) + ",\"T\":" + std::to_string(o.T) +
                       ",\"batch\":" + std::to_string(o.batch) + ",\"chunk\":" + std::to_string(o.chunk) +
                       ",\"steps\":" + std::to_string(o.steps) + ",\"seconds_per_step\":" + bench_util::num(per_step) +
                       ",\"tokens_per_s\":" + bench_util::num(double(o.batch * o.T) / per_step) +
                       ",\"loss\":" + bench_util::num(loss) + ",\"peak_bytes\":" + json_list(peak) +
                       ",\"activation_peak_bytes\":" + json_list(act) + ",\"resident_bytes\":" + json_list(params) +
                       ",\"threads\":" + std::to_string(bench_util::threads()) + "}";
    std::printf("%s\n", line.c_str());
    if (!o.out.empty()) std::ofstream(o.out, std::ios::app) << line << "\n";
  }
  return 0;
}

}  // namespace bench_distributed

int main(int argc, char** argv) {
  using namespace bench_distributed;
  ssmx::dist::Environment env(&argc, &argv);
  Options o;
  CLI::App app{"Distributed training steps: peak memory per rank and tokens/s (run under mpirun)"};
  app.add_option("--scheme", o.scheme, "none (1 rank), data, layer or sequence")
      ->check(CLI::IsMember({"none", "data", "layer", "sequence"}))
      ->capture_default_str();
  app.add_option("--model", o.model, "diagonal or mamba")->check(CLI::IsMember({"diagonal", "mamba"}))->capture_default_str();
  bench_util::add_count(app, "--T", o.T, "tokens per sequence");
  bench_util::add_count(app, "--batch", o.batch, "sequences per step");
  bench_util::add_count(app, "--chunk", o.chunk, "Adjoint chunk length");
  bench_util::add_count(app, "--shard", o.shard, "VJP shard length");
  bench_util::add_count(app, "--vocab", o.vocab, "vocabulary size");
  app.add_option("--steps", o.steps, "timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--out", o.out, "also append the JSON line to FILE")->type_name("FILE");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    ssmx::dist::Communicator comm;
    if (o.model == "mamba") return run<ssmx::nn::Model<ssmx::nn::Mamba<float, 256, 16, 2, 4>, 8>>(o, comm);
    return run<ssmx::nn::Model<ssmx::nn::DiagonalSSM<float, 256, 16>, 8>>(o, comm);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_distributed: error: %s\n", e.what());
    ssmx::dist::Environment::abort(1);
  }
  return 1;
}
