// ssmx — the layer pipeline: a model's layers over the stretches of one sequence on the
// host's OpenMP threads, each layer one stretch behind the layer it reads from.
//
// Stretch j of layer i needs stretch j - 1 of layer i (the state, or the adjoint carry,
// passed along the sequence) and stretch j of layer i - 1 (its input: the layer below in the
// forward pass, the cotangent from the layer above in the backward pass). Nothing else: a
// wavefront. Layers go round-robin to the threads, and a thread starts stretch j of its
// layer once the layer before has finished stretch j, so with p threads p layers run at
// once, each a stretch behind the one before. A stretch is a few milliseconds of work; the
// threads meet once per stretch instead of once per operation (an OpenMP region whose
// threads sleep between regions costs tens of microseconds to wake on every one), and
// everything inside a stretch runs on its thread alone.
//
// Determinism: every task computes exactly what it computes in order (the work inside a
// stretch never depends on the number of threads), so results are bit-identical to a
// pipeline of one thread.
// Private header: include <ssmx/nn/model.hpp>.
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "../core/shape.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ssmx::nn::detail {

// Threads a pipeline of `layers` layers over `stretches` stretches uses on the host: one
// (in order, with the parallelism inside each operation) when there is nothing to overlap
// or the caller already runs in parallel.
inline int pipeline_threads(index_t layers, index_t stretches) {
#if defined(_OPENMP)
  if (omp_in_parallel() || layers < 2 || stretches < 2) return 1;
  return int(std::min<index_t>(index_t(omp_get_max_threads()), layers));
#else
  (void)layers, (void)stretches;
  return 1;
#endif
}

// The index of the calling thread in the pipeline (0 outside one).
inline int pipeline_thread() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

#if defined(_OPENMP)
// run_pipeline on `threads` OpenMP threads.
template <class Begin, class Task, class End>
void run_pipeline_threads(index_t layers, index_t stretches, int threads, Begin& begin, Task& task, End& end) {
  // done[i]: stretches layer i has finished. Each is written by one thread and read by the
  // thread of layer i + 1.
  const std::unique_ptr<std::atomic<index_t>[]> done(new std::atomic<index_t>[std::size_t(layers)]);
  for (index_t i = 0; i < layers; ++i) done[std::size_t(i)].store(0, std::memory_order_relaxed);
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(threads)
  {
    const index_t me = index_t(omp_get_thread_num()), p = index_t(omp_get_num_threads());
    try {
      for (index_t i = me; i < layers && !failed.load(std::memory_order_relaxed); i += p) {
        begin(i);
        for (index_t j = 0; j < stretches; ++j) {
          if (i > 0)  // the wait is at most one stretch of the layer before
            while (done[std::size_t(i - 1)].load(std::memory_order_acquire) <= j &&
                   !failed.load(std::memory_order_relaxed))
              std::this_thread::yield();
          if (failed.load(std::memory_order_relaxed)) break;
          task(i, j);
          done[std::size_t(i)].store(j + 1, std::memory_order_release);
        }
        if (!failed.load(std::memory_order_relaxed)) end(i);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (error) std::rethrow_exception(error);
}
#endif

// For every layer i in [0, layers): begin(i), task(i, j) for j in [0, stretches), end(i);
// task(i, j) after task(i, j - 1) and task(i - 1, j). With threads > 1 (and OpenMP), layers i ≡ r
// (mod threads) run on thread r. An exception on any thread stops the others at their next
// stretch and is rethrown here.
template <class Begin, class Task, class End>
void run_pipeline(index_t layers, index_t stretches, int threads, Begin&& begin, Task&& task, End&& end) {
#if defined(_OPENMP)
  if (threads > 1) {
    run_pipeline_threads(layers, stretches, threads, begin, task, end);
    return;
  }
#else
  (void)threads;  // without OpenMP, in order
#endif
  for (index_t i = 0; i < layers; ++i) {
    begin(i);
    for (index_t j = 0; j < stretches; ++j) task(i, j);
    end(i);
  }
}

}  // namespace ssmx::nn::detail
