// Distributed training (--dist): the processes of one run, what each of them holds, and how
// they agree. Every rank reads the same flags and the same data and draws every batch itself,
// so no tokens travel between ranks.
//
//   none       one process; MPI is not initialised.
//   data       every rank holds the whole model and trains on rows [B·r/R, B·(r+1)/R) of each
//              batch of B rows; gradients are summed (ssmx/dist/data_parallel.hpp). Evaluation:
//              each rank its share of the held-out rows, the sums added up.
//   layer      rank r holds the layers dist::layer_block(K, r, R) (the first rank also the
//              embedding, the last one the final norm and the head) and sees the whole batch;
//              activations go up the ranks and their gradients come back down
//              (ssmx/dist/layer_parallel.hpp). Evaluation: dist::layer_parallel_evaluate.
//   sequence   every rank holds the whole model and tokens dist::sequence_block(T, r, R) of every
//              row; the scan carry and the convolution halo cross the ranks
//              (ssmx/dist/sequence_parallel.hpp; the adjoint strategy only). Evaluation:
//              dist::sequence_parallel_evaluate.
//
// --eval-data: under layer the ranks evaluate each window together; under the others every
// rank evaluates the whole file by itself (Group::evaluate_stream). --sample-every: rank 0
// alone generates, which needs the whole model (not under layer).
//
// Each scheme takes the steps of the one-process run up to the rounding of sums taken in
// another order.
//
// Agreement: whatever every rank must decide alike (stop on a signal or on the time budget)
// is summed over the ranks after each step. Failure: an error found while the run is set up
// (flags, data, files, the ranks' flags against each other) is agreed on by all ranks, which
// then end normally with its exit status (Group::agree_on_failure); an exception on any rank
// later ends the job: that rank prints `train: error: rank r of R: ...` and calls MPI_Abort
// (the others may wait in a collective that it will never join). A rank that dies
// without a word leaves the others waiting in a collective until SSMX_DIST_TIMEOUT seconds
// (default 300) have passed; they then fail the same way.
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ssmx/ssmx.hpp>

#if SSMX_TRAIN_MPI  // set by examples/CMakeLists.txt when train links ssmx::dist
#include <ssmx/dist/data_parallel.hpp>
#include <ssmx/dist/layer_parallel.hpp>
#include <ssmx/dist/sequence_parallel.hpp>
#endif

#include "config.hpp"
#include "data.hpp"

namespace train {

namespace nn = ssmx::nn;

enum class Scheme { none, data, layer, sequence };

inline Scheme parse_scheme(const std::string& s) {
  if (s == "data") return Scheme::data;
  if (s == "layer") return Scheme::layer;
  if (s == "sequence") return Scheme::sequence;
  SSMX_REQUIRE(s == "none", UsageError, "--dist '", s, "': expected none, data, layer or sequence");
  return Scheme::none;
}

// The number of processes of the MPI job this process was started in, as the launcher tells
// it (Open MPI, MPICH/Hydra and PMI launchers such as srun); 1 when there is none.
inline long launcher_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK"})
    if (const char* s = std::getenv(var)) {
      char* end = nullptr;
      const long r = std::strtol(s, &end, 10);
      if (end != s && *end == '\0' && r >= 0) return r;
    }
  return 0;
}
inline long launcher_job_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
    if (const char* s = std::getenv(var)) {
      char* end = nullptr;
      const long n = std::strtol(s, &end, 10);
      if (end != s && *end == '\0' && n > 0) return n;
    }
  return 1;
}

// FNV-1a: a hash of a flag's value, the same on every rank.
inline std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The processes of a run: this one alone (--dist none), or the ranks of MPI_COMM_WORLD.
class Group {
 public:
  Group() = default;
  // Initialises MPI unless scheme is none; UsageError in a build without MPI.
  Group(Scheme scheme, int* argc, char*** argv) : scheme_(scheme) {
    if (scheme == Scheme::none) return;
#if SSMX_TRAIN_MPI
    env_.emplace(argc, argv);
    comm_.emplace();
    rank_ = comm_->rank();
    size_ = comm_->size();
#else
    (void)argc, (void)argv;
    throw UsageError("--dist: this build of train has no MPI (Open MPI was not found when it was configured; "
                     "Debian: libopenmpi-dev, then reconfigure), so only --dist none runs");
#endif
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  Scheme scheme() const { return scheme_; }
  bool distributed() const { return scheme_ != Scheme::none; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  bool root() const { return rank_ == 0; }
  std::string who() const { return "rank " + std::to_string(rank_) + " of " + std::to_string(size_); }

  // This rank's rows of a batch of n rows: a contiguous share under --dist data, else all.
  std::pair<index_t, index_t> rows(index_t n) const {
    if (scheme_ != Scheme::data) return {0, n};
    return {n * rank_ / size_, n * (rank_ + 1) / size_};
  }

  // The layers [begin, end) of a K-layer model this rank holds (all but under --dist layer).
  std::pair<index_t, index_t> layers(index_t K, const std::string& model) const {
    if (scheme_ != Scheme::layer) return {0, K};
    SSMX_REQUIRE(size_ <= K, UsageError, "--dist layer: ", size_, " ranks for the ", K, " layers of --model ", model,
                 "; each rank needs a layer: run at most ", K, " ranks, or use --dist data or sequence");
#if SSMX_TRAIN_MPI
    return ssmx::dist::layer_block(K, rank_, size_);
#else
    return {0, K};
#endif
  }

  // Every rank's `mine` (all the same length), rank after rank; the caller's values alone
  // without MPI. One collective: the per-step agreement.
  std::vector<std::int64_t> gather(const std::vector<std::int64_t>& mine) {
    if (!distributed()) return mine;
    std::vector<std::int64_t> all(mine.size() * std::size_t(size_), 0);
    std::copy(mine.begin(), mine.end(), all.begin() + std::ptrdiff_t(mine.size() * std::size_t(rank_)));
#if SSMX_TRAIN_MPI
    comm_->allreduce_sum(all.data(), all.size());  // each rank fills its own slots: exact
#endif
    return all;
  }

  // Sums loss, tokens and correct over the ranks (in double: counts stay exact below 2^53).
  void sum(nn::StepResult& r) {
    if (!distributed()) return;
    double v[3] = {r.loss, double(r.tokens), double(r.correct)};
#if SSMX_TRAIN_MPI
    comm_->allreduce_sum(v, 3);
#endif
    r.loss = v[0];
    r.tokens = index_t(v[1]);
    r.correct = index_t(v[2]);
  }

  void barrier() {
#if SSMX_TRAIN_MPI
    if (distributed()) comm_->barrier();
#endif
  }

  // DistError on every rank unless all ranks pass the same value.
  void check_same(const std::string& what, std::uint64_t value) {
#if SSMX_TRAIN_MPI
    if (distributed()) comm_->check_same(what, value);
#else
    (void)what, (void)value;
#endif
  }

  // Every rank must run with the same flags: a rank with another --seed or --data would
  // silently train something else, one with another --out write elsewhere. `flags` maps a
  // flag to its value. One collective over a hash of all of them; on a mismatch, one per
  // flag, so that the error names the flag (integers are compared as themselves, so the
  // message shows every rank's value; other values by a hash).
  void check_same_flags(const nlohmann::json& flags) {
#if SSMX_TRAIN_MPI
    if (!distributed()) return;
    auto hash = [](const nlohmann::json& v) {
      return v.is_number_integer() ? std::uint64_t(v.get<std::int64_t>()) : fnv1a(v.dump());
    };
    try {
      comm_->check_same("the flags", fnv1a(flags.dump()));
      return;
    } catch (const ssmx::dist::DistTimeoutError&) {
      throw;
    } catch (const ssmx::dist::DistError&) {  // they differ: find the flag
    }
    for (const auto& [name, value] : flags.items()) {
      try {
        comm_->check_same("--" + name, hash(value));
      } catch (const ssmx::dist::DistTimeoutError&) {
        throw;
      } catch (const ssmx::dist::DistError& e) {
        // An integer's check lists every rank's value; other values were compared by a hash,
        // which says nothing to a person: then only this rank's value.
        throw UsageError(ssmx::detail::str("--", name, " differs between the ranks (", who(), " has ", value.dump(),
                                           ")", value.is_number_integer() ? std::string(": ") + e.what() : "",
                                           "; start every rank with the same flags"));
      }
    }
    throw UsageError("the ranks were started with different flags; start every rank with the same flags");
#else
    (void)flags;
#endif
  }

  // Under --dist data and sequence every rank holds the same parameters.
  template <class T>
  void check_same_layout(const ssmx::ParameterList<T>& params) {
#if SSMX_TRAIN_MPI
    if (scheme_ == Scheme::data || scheme_ == Scheme::sequence)
      comm_->check_same("the parameters' names and shapes", ssmx::dist::parameter_layout_hash(params));
#else
    (void)params;
#endif
  }

  // A line for the log: what each rank does (empty for --dist none).
  std::string describe(index_t K, index_t batch, index_t context) const {
    const std::string R = std::to_string(size_) + (size_ == 1 ? " rank" : " ranks");
    switch (scheme_) {
      case Scheme::data:
        return "dist: data parallel over " + R + ", " + std::to_string(batch / size_) + " of the " +
               std::to_string(batch) + " rows of each batch per rank, gradients summed";
      case Scheme::layer: {
        std::string s = "dist: the layers split over " + R + ":";
        for (int q = 0; q < size_; ++q) {
#if SSMX_TRAIN_MPI
          const auto [b, e] = ssmx::dist::layer_block(K, q, size_);
#else
          const index_t b = 0, e = K;
#endif
          s += ssmx::detail::str(q ? ", " : " ", "rank ", q, " layers [", b, ", ", e, ")");
        }
        return s;
      }
      case Scheme::sequence:
        return "dist: sequence parallel over " + R + ", about " + std::to_string(context / size_) +
               " tokens of every row per rank, gradients summed";
      default:
        return "";
    }
  }

  // The end of a phase that every rank reaches, failed or not: each passes its own error
  // (code 0: none), and all learn whether any rank failed. If one did, every rank returns the
  // largest code and the job ends as a normal one does (MPI is finalised with the Group), not
  // through MPI_Abort: the error is printed once when every rank failed with the same message,
  // else by each rank that failed. One collective; 0 when no rank failed.
  int agree_on_failure(int code, const std::string& message) {
    const auto all = gather({code, code ? std::int64_t(fnv1a(message)) : 0});
    int worst = 0;
    bool alike = true;
    for (int q = 0; q < size_; ++q) {
      worst = std::max(worst, int(all[std::size_t(2 * q)]));
      alike = alike && all[std::size_t(2 * q)] != 0 && all[std::size_t(2 * q + 1)] == all[1];
    }
    if (worst == 0) return 0;
    if (alike && size_ > 1) {
      if (root()) std::fprintf(stderr, "train: error: all %d ranks: %s\n", size_, message.c_str());
    } else if (code) {
      std::fprintf(stderr, "train: error: %s%s\n", distributed() ? (who() + ": ").c_str() : "", message.c_str());
    }
    std::fflush(stdout);
    return worst;
  }

  // Ends the job on every rank (MPI_Abort), or this process alone.
  [[noreturn]] void abort(int code) {
#if SSMX_TRAIN_MPI
    if (distributed()) ssmx::dist::Environment::abort(code);
#endif
    std::fflush(stdout);
    std::exit(code);
  }

  // One optimisation step of this rank's part of the batch; every rank returns the step's
  // totals over the whole batch. `carry` holds this rank's rows (--dist data) or layers
  // (--dist layer) of the recurrent state carried from step to step.
  template <class LM, class Opt, class Strategy>
  nn::TrainStepResult train_step(LM& model, Opt& opt, const Strategy& strategy, const StepData& sd,
                                 const nn::StepOptions& so, nn::LayerStates<typename LM::T>* carry) {
    switch (scheme_) {
      case Scheme::none:
        return nn::train_step(model, opt, sd.batch(), strategy, so, carry);
#if SSMX_TRAIN_MPI
      case Scheme::data: {
        const auto [r0, r1] = rows(sd.rows);
        return ssmx::dist::data_parallel_train_step(model, opt, *comm_, sd.batch(r0, r1), strategy, so, carry);
      }
      case Scheme::layer:
        return ssmx::dist::layer_parallel_train_step(model, opt, *comm_, sd.batch(), strategy, so, carry);
      case Scheme::sequence:
        if constexpr (std::is_same_v<Strategy, ssmx::Adjoint>)
          return ssmx::dist::sequence_parallel_train_step(model, opt, *comm_, sd.batch(), strategy, so, carry);
        break;  // refused at setup
#else
      default:
        break;
#endif
    }
    throw ssmx::ValueError("Group::train_step: --dist and --strategy do not go together");
  }

  // Loss and accuracy on the held-out data, the same on every rank. `chunk`: the streaming
  // chunk of one process's evaluation (the sharded ones hold their part's tokens at once).
  template <class LM>
  nn::StepResult evaluate(LM& model, Data& data, index_t chunk) {
    using T = typename LM::T;
    auto eval = [&](const nn::Batch& b, nn::LayerStates<T>* states) -> nn::StepResult {
#if SSMX_TRAIN_MPI
      if (scheme_ == Scheme::layer) return ssmx::dist::layer_parallel_evaluate(model, *comm_, b, states);
      if (scheme_ == Scheme::sequence) return ssmx::dist::sequence_parallel_evaluate(model, *comm_, b, states);
#endif
      return model.evaluate(b, chunk, states);
    };
    if (scheme_ != Scheme::data) return data.evaluate<T>(eval);
    nn::StepResult r = data.evaluate<T>(eval, rank_, size_);
    sum(r);
    return r;
  }

  // Loss over n tokens delivered by read(begin, count, out), as one sequence in windows of
  // `window` predictions with the state carried (nn::evaluate_stream), the same on every
  // rank. Every scheme but layer holds the whole model on each rank, which evaluates alone
  // (no rank waits for another); under layer the ranks run each window together.
  template <class LM, class Read>
  nn::HeldOut evaluate_stream(LM& model, index_t n, Read&& read, index_t window, index_t chunk) {
#if SSMX_TRAIN_MPI
    if (scheme_ == Scheme::layer)
      return nn::evaluate_windows<typename LM::T, LM::space>(
          n, model.vocab(), read, window, [&](const nn::Batch& b, nn::LayerStates<typename LM::T>* st) {
            return ssmx::dist::layer_parallel_evaluate(model, *comm_, b, st);
          });
#endif
    return nn::evaluate_stream(model, n, read, window, chunk);
  }

  // --dist data: rank 0 receives every rank's rows of a carried state into `full` ([B, ...]),
  // the others send theirs (`mine`, [B/R, ...]). Otherwise `mine` is the whole tensor.
  template <class T>
  void gather_rows(const ssmx::Tensor<T>& mine, ssmx::Tensor<T>& full, int tag) {
    if (scheme_ != Scheme::data) {
      std::copy_n(mine.data(), full.numel(), full.data());
      return;
    }
#if SSMX_TRAIN_MPI
    const index_t B = full.dims()[0], per_row = full.numel() / B;
    if (!root()) {
      comm_->send(mine.view(), 0, tag);
      return;
    }
    for (int q = 0; q < size_; ++q) {
      const index_t r0 = B * q / size_, r1 = B * (q + 1) / size_;
      ssmx::TensorView<T> part(full.data() + r0 * per_row, ssmx::Dims{(r1 - r0) * per_row});
      if (q == 0)
        std::copy_n(mine.data(), part.numel(), part.data());
      else
        comm_->recv(part, q, tag);
    }
#else
    (void)tag;
#endif
  }

 private:
  Scheme scheme_ = Scheme::none;
  int rank_ = 0, size_ = 1;
#if SSMX_TRAIN_MPI
  std::optional<ssmx::dist::Environment> env_;
  std::optional<ssmx::dist::Communicator> comm_;  // declared after env_: freed before MPI_Finalize
#endif
};

}  // namespace train
