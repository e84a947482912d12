// Generation speed: Model::prefill over a prompt, then Model::step one token at a time for B
// sequences at once, for the trainer's mamba-tiny preset and the Mamba-130m shape.
//
//   bench_generate [--models tiny,130m] [--batch 1,8] [--tokens 128] [--prompt 64] [--out FILE]
//
//   tiny   Model<Mamba<float, 64, 16, 2, 4>, 2>, vocab 256 (the trainer's mamba-tiny)
//   130m   Model<Mamba<float, 768, 16, 2, 4>, 24>, vocab 50280 (state-spaces/mamba-130m's shape)
//
// Every sequence reads the token stream of benchmarks/reference (x_t = (7t + 3) mod vocab)
// for its prompt and its steps, so benchmarks/reference/mamba.py --generate does the same
// work. A step reads every weight once whatever B (the products run over the B sequences
// together): at small B generation is bound by the bytes of the weights, so each line also
// gives weight bytes per second, to set against bench_peak's memcpy bandwidth.
//
// Output, JSON lines {"name":"ssmx_generate","model","batch","prompt","tokens","threads",
// "prefill_seconds","seconds","tokens_per_s" (B·tokens / seconds of the steps),
// "ms_per_step","weight_bytes","weight_gb_per_s","state_bytes","peak_host_bytes" (during the
// steps, beyond what was allocated before them)}.
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <ssmx/core/memory.hpp>
#include <ssmx/nn/model.hpp>

#include "bench_util.hpp"

namespace {

using bench_util::num;
using ssmx::index_t;
using ssmx::nn::token_t;
using Clock = std::chrono::steady_clock;

using Tiny = ssmx::nn::Model<ssmx::nn::Mamba<float, 64, 16, 2, 4>, 2>;
using M130 = ssmx::nn::Model<ssmx::nn::Mamba<float, 768, 16, 2, 4>, 24>;

template <class Net>
void run(const std::string& name, index_t vocab, index_t batch, index_t prompt, index_t tokens, bench_util::Sink& sink) {
  ssmx::nn::ModelConfig cfg;
  cfg.vocab = vocab;
  Net model(cfg);
  std::size_t weight_bytes = 0;
  for (auto* p : model.parameters()) weight_bytes += p->value.bytes();
  const bench_util::Tokens stream(prompt + tokens, vocab);
  auto ds = model.decode_state(batch);
  const auto t0 = Clock::now();
  for (index_t b = 0; b < batch; ++b) (void)model.prefill(stream.inputs.data(), prompt, ds, b);
  const double prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<token_t> col(static_cast<std::size_t>(batch));
  auto step = [&](index_t t) {
    std::fill(col.begin(), col.end(), stream.inputs[std::size_t(prompt + t)]);
    return model.step(col.data(), ds);
  };
  (void)step(0);  // warm-up: first-touch of the step's buffers
  ssmx::reset_peak(ssmx::Space::Host);
  const std::size_t before = ssmx::memory_stats(ssmx::Space::Host).current;
  const auto t1 = Clock::now();
  double check = 0;
  for (index_t t = 1; t < tokens; ++t) check += double(step(t)[0]);
  const double s = std::chrono::duration<double>(Clock::now() - t1).count();
  const std::size_t peak = ssmx::memory_stats(ssmx::Space::Host).peak - before;
  const double steps = double(tokens - 1);
  sink.line("{\"name\":\"ssmx_generate\",\"model\":\"" + name + "\",\"batch\":" + std::to_string(batch) +
            ",\"prompt\":" + std::to_string(prompt) + ",\"tokens\":" + std::to_string(tokens) +
            ",\"threads\":" + std::to_string(bench_util::threads()) + ",\"prefill_seconds\":" + num(prefill_s) +
            ",\"seconds\":" + num(s) + ",\"tokens_per_s\":" + num(double(batch) * steps / s) +
            ",\"ms_per_step\":" + num(1e3 * s / steps) + ",\"weight_bytes\":" + std::to_string(weight_bytes) +
            ",\"weight_gb_per_s\":" + num(double(weight_bytes) * steps / s / 1e9) +
            ",\"state_bytes\":" + std::to_string(ds.bytes()) + ",\"peak_host_bytes\":" + std::to_string(peak) +
            ",\"check\":" + num(check) + "}");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_generate: tokens/s of Model::step (after Model::prefill) for Mamba models."};
  std::vector<std::string> models{"tiny", "130m"};
  std::vector<index_t> batches{1, 8};
  index_t tokens = 128, prompt = 64;
  std::string out;
  app.add_option("--models", models, "of tiny,130m")->delimiter(',')->check(CLI::IsMember({"tiny", "130m"}));
  bench_util::add_counts(app, "--batch", batches, "sequences generated together", "1,8");
  bench_util::add_count(app, "--tokens", tokens, "tokens stepped per sequence (the first is a warm-up)");
  bench_util::add_count(app, "--prompt", prompt, "prompt tokens per sequence (prefill, timed apart)");
  app.add_option("--out", out, "also write the JSON lines to FILE")->type_name("FILE");
  CLI11_PARSE(app, argc, argv);
  if (tokens < 2) {
    std::cerr << "bench_generate: --tokens must be at least 2 (the first step is a warm-up)\n";
    return 2;
  }
  bench_util::Sink sink(out);
  for (const auto& m : models)
    for (index_t b : batches) {
      if (m == "tiny") run<Tiny>(m, 256, b, prompt, tokens, sink);
      if (m == "130m") run<M130>(m, 50280, b, prompt, tokens, sink);
    }
  return 0;
}
