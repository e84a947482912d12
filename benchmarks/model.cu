// One forward+backward step of a whole model on the GPU, per gradient strategy: tokens/s
// and the peak of tracked device memory, against T; and the largest T that trains in one
// step on this GPU.
//
// Models (compile-time shapes; --model), float, tied head, vocab 256, batch 1:
//   diagonal      Model<DiagonalSSM<float, 256, 16>, 8, Space::Cuda>      (the benchmark model)
//   diagonal-768  Model<DiagonalSSM<float, 768, 16>, 24, Space::Cuda>     (a Mamba-130m-sized
//                 stack of DiagonalSSM layers: d_model 768, 24 layers)
//   mamba-130m    Model<Mamba<float, 768, 16, 2, 4, 48>, 24, Space::Cuda> (Mamba-130m's shapes)
// Tokens: x_t = (7t + 3) mod vocab, target x_{t+1} (benchmarks/reference/diagonal_ssm.py
// uses the same stream).
//
// Napkin math, per token (float): Adjoint stores K·P·4 bytes of layer inputs plus P·4 of
// dL/dy (diagonal: 9 KiB; diagonal-768: 75 KiB), Backprop every intermediate of every
// layer: several state-sized values per layer (S = P·N floats: 16 KiB per value for the
// diagonal model, 48 KiB for diagonal-768), i.e. hundreds of KiB to MiB per token.
//
// Timing: the best of --repeats steps after one warm-up, wall clock around a step that ends
// with the loss on the host (the step synchronises), plus cudaDeviceSynchronize.
// Memory: memory_stats(Space::Cuda) after reset_peak: every byte ssmx allocates on the
// device (parameters and gradients included), not what the pool has reserved.
//
// Output: JSON lines on stdout (and --out): "kind":"step" with strategy, T, seconds,
// tokens_per_s, peak_bytes, baseline_bytes, peak_by_tag, loss; "kind":"oom" where a step did
// not fit; with --find-max, "kind":"max_T" per strategy: the largest T tried that fitted.
// Without a GPU it prints a reason and exits 0.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <ssmx/cuda.cuh>
#include <ssmx/nn/model.hpp>

namespace bench_model_cuda {

using namespace ssmx;
using nn::token_t;

struct Options {
  std::string model = "diagonal";
  std::vector<index_t> T = {4096, 16384, 65536};
  std::vector<std::string> strategies = {"backprop", "checkpointed", "adjoint"};
  index_t vocab = 256, chunk = 1024, shard = 1024;
  int repeats = 2;
  bool find_max = false;
  index_t max_T = index_t(1) << 24;
  std::string out;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "bench_model_cuda: %s\n"
               "usage: bench_model_cuda [--model diagonal|diagonal-768|mamba-130m] [--T 4K,16K,...]\n"
               "       [--strategies backprop,checkpointed,adjoint] [--chunk N] [--shard N] [--repeats N]\n"
               "       [--find-max] [--max-T N] [--out FILE]\n",
               why.c_str());
  std::exit(2);
}

index_t count(const std::string& s) {
  index_t mult = 1;
  std::string d = s;
  if (!d.empty() && (d.back() == 'K' || d.back() == 'k')) mult = 1024, d.pop_back();
  if (!d.empty() && (d.back() == 'M' || d.back() == 'm')) mult = 1 << 20, d.pop_back();
  char* end = nullptr;
  const long long v = std::strtoll(d.c_str(), &end, 10);
  if (d.empty() || *end || v <= 0) usage("not a positive count: " + s);
  return index_t(v) * mult;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") o.model = value();
    else if (a == "--T") {
      o.T.clear();
      for (const auto& t : split(value())) o.T.push_back(count(t));
    } else if (a == "--strategies") o.strategies = split(value());
    else if (a == "--chunk") o.chunk = count(value());
    else if (a == "--shard") o.shard = count(value());
    else if (a == "--repeats") o.repeats = int(count(value()));
    else if (a == "--find-max") o.find_max = true;
    else if (a == "--max-T") o.max_T = count(value());
    else if (a == "--out") o.out = value();
    else usage("unknown flag " + a);
  }
  for (const auto& s : o.strategies)
    if (s != "backprop" && s != "checkpointed" && s != "adjoint") usage("unknown strategy " + s);
  return o;
}

struct Sink {
  std::ofstream file;
  void line(const std::string& s) {
    std::printf("%s\n", s.c_str());
    std::fflush(stdout);
    if (file) file << s << "\n" << std::flush;
  }
};

std::string device_name() {
  cudaDeviceProp p{};
  int dev = 0;
  SSMX_CUDA_CHECK(cudaGetDevice(&dev));
  SSMX_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return p.name;
}

struct Result {
  bool fit = false;
  double seconds = 0, loss = 0;
  MemoryStats mem;
  std::size_t baseline = 0;
};

template <class LM, class Strategy>
Result step(LM& model, index_t T, const Strategy& strategy, int repeats) {
  std::vector<token_t> x(static_cast<std::size_t>(T)), y(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) {
    x[std::size_t(t)] = token_t((7 * t + 3) % model.vocab());
    y[std::size_t(t)] = token_t((7 * (t + 1) + 3) % model.vocab());
  }
  const nn::Batch batch{x.data(), y.data(), 1, T};
  Result r;
  SSMX_CUDA_CHECK(cudaDeviceSynchronize());
  r.baseline = memory_stats(Space::Cuda).current;
  reset_peak(Space::Cuda);
  r.seconds = 1e300;
  try {
    for (int i = 0; i < 1 + repeats; ++i) {
      model.zero_grad();
      const auto t0 = std::chrono::steady_clock::now();
      r.loss = model.forward_backward(batch, strategy).loss;
      SSMX_CUDA_CHECK(cudaDeviceSynchronize());
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i > 0 || repeats == 0) r.seconds = std::min(r.seconds, dt);
    }
    r.fit = true;
  } catch (const OutOfMemoryError&) {
    r.fit = false;
  }
  r.mem = memory_stats(Space::Cuda);
  return r;
}

template <class LM>
Result run(LM& model, const std::string& strategy, index_t T, const Options& o) {
  if (strategy == "backprop") return step(model, T, Backprop{}, o.repeats);
  if (strategy == "checkpointed") return step(model, T, Checkpointed{}, o.repeats);
  return step(model, T, Adjoint{o.chunk, o.shard}, o.repeats);
}

template <class LM>
int bench(const Options& o, Sink& sink) {
  nn::ModelConfig cfg;
  cfg.vocab = o.vocab;
  LM model(cfg);
  const std::string dev = device_name();
  std::size_t free_b = 0, total_b = 0;
  SSMX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  auto emit = [&](const std::string& kind, const std::string& strategy, index_t T, const Result& r) {
    std::ostringstream s;
    s << "{\"name\":\"gpu_model\",\"kind\":\"" << kind << "\",\"device\":\"" << dev << "\",\"model\":\"" << o.model
      << "\",\"strategy\":\"" << strategy << "\",\"T\":" << T << ",\"batch\":1,\"K\":" << LM::num_layers
      << ",\"P\":" << LM::d_model << ",\"vocab\":" << o.vocab << ",\"chunk\":" << o.chunk
      << ",\"device_total_bytes\":" << total_b;
    if (r.fit) {
      s << ",\"seconds\":" << r.seconds << ",\"tokens_per_s\":" << double(T) / r.seconds << ",\"loss\":" << r.loss;
    }
    s << ",\"peak_bytes\":" << r.mem.peak << ",\"baseline_bytes\":" << r.baseline << ",\"peak_by_tag\":{";
    for (int t = 0; t < num_tags; ++t)
      s << (t ? "," : "") << "\"" << tag_name(Tag(t)) << "\":" << r.mem.peak_by_tag[std::size_t(t)];
    s << "}}";
    sink.line(s.str());
  };
  for (const auto& strategy : o.strategies) {
    for (index_t T : o.T) {
      const Result r = run(model, strategy, T, o);
      emit(r.fit ? "step" : "oom", strategy, T, r);
      if (!r.fit) break;  // larger T will not fit either
    }
    if (!o.find_max) continue;
    // Doubling, then one step of 1.5x between the last fit and the first miss.
    index_t lo = 0, T = o.T.empty() ? 4096 : o.T.front();
    for (; T <= o.max_T; T *= 2) {
      const Result r = run(model, strategy, T, o);
      emit(r.fit ? "step" : "oom", strategy, T, r);
      if (!r.fit) break;
      lo = T;
    }
    if (lo > 0 && T <= o.max_T) {
      const index_t mid = lo + lo / 2;
      const Result r = run(model, strategy, mid, o);
      emit(r.fit ? "step" : "oom", strategy, mid, r);
      if (r.fit) lo = mid;
    }
    std::ostringstream s;
    s << "{\"name\":\"gpu_model\",\"kind\":\"max_T\",\"device\":\"" << dev << "\",\"model\":\"" << o.model
      << "\",\"strategy\":\"" << strategy << "\",\"max_T\":" << lo << ",\"searched_up_to\":" << o.max_T << "}";
    sink.line(s.str());
  }
  return 0;
}

}  // namespace bench_model_cuda

int main(int argc, char** argv) {
  using namespace bench_model_cuda;
  const Options o = parse(argc, argv);
  if (!gpu::device_available()) {
    std::printf("bench_model_cuda skipped: no CUDA device\n");
    return 0;
  }
  Sink sink;
  if (!o.out.empty()) sink.file.open(o.out);
  try {
    if (o.model == "diagonal") return bench<nn::Model<nn::DiagonalSSM<float, 256, 16>, 8, Space::Cuda>>(o, sink);
    if (o.model == "diagonal-768") return bench<nn::Model<nn::DiagonalSSM<float, 768, 16>, 24, Space::Cuda>>(o, sink);
    if (o.model == "mamba-130m")
      return bench<nn::Model<nn::Mamba<float, 768, 16, 2, 4, 48>, 24, Space::Cuda>>(o, sink);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model_cuda: %s\n", e.what());
    return 1;
  }
  usage("unknown model " + o.model);
}
