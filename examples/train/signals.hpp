// SIGINT, SIGTERM and SIGUSR1 ask the training loop to stop: the handler only sets a flag,
// which the loop reads after each step (under --dist, every rank learns of it in the same
// step), then saves a checkpoint and exits 0. A second signal quits at once (checkpoints are
// written atomically, so none is left half-written). SIGUSR1 is for MPI jobs: Open MPI's
// mpirun forwards it to every rank, whereas it answers SIGINT/SIGTERM by killing the ranks.
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>

namespace train {

inline std::atomic<int> stop_signal{0};  // the signal that asked to stop, 0 for none
static_assert(std::atomic<int>::is_always_lock_free, "the stop flag is written from a signal handler");

inline std::atomic<bool> print_stop_message{true};  // false on the ranks of an MPI job after the first

inline void on_stop_signal(int sig) {
  if (stop_signal.exchange(sig) != 0) _exit(128 + sig);  // the second one: quit now
  static const char msg[] = "\nstop requested: finishing this step, then saving a checkpoint (again to quit now)\n";
  if (print_stop_message.load()) (void)!write(STDERR_FILENO, msg, sizeof msg - 1);  // async-signal-safe, unlike stdio
}

// Installs the handlers for its lifetime.
class StopSignals {
 public:
  StopSignals() {
    struct sigaction sa {};
    sa.sa_handler = &on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // file writes in progress carry on rather than fail with EINTR
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
    sigaction(SIGUSR1, &sa, &old_usr1_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGUSR1, &old_usr1_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  static int requested() { return stop_signal.load(); }

 private:
  struct sigaction old_int_ {}, old_term_ {}, old_usr1_ {};
};

}  // namespace train
