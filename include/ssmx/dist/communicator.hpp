// ssmx — a thin RAII layer over MPI for the distributed features (DESIGN §1.5).
//
//   Environment    MPI_Init_thread / MPI_Finalize; MPI_ERRORS_RETURN on MPI_COMM_WORLD so a
//                  failed call becomes a DistError instead of killing the process.
//   Communicator   a duplicate of a communicator (its own message space) plus a
//                  reversed-rank twin for reverse scans: barrier, allreduce_sum, broadcast,
//                  send/recv of views, check_same, exscan_affine / reverse_exscan_affine.
//
// Every MPI call is checked; failures throw DistError naming the call and MPI's message.
//
// Dead or stuck ranks: every blocking operation is a nonblocking MPI call polled with
// MPI_Test until a deadline (set_timeout; default 300 s, or the environment variable
// SSMX_DIST_TIMEOUT in seconds). On timeout it throws DistTimeoutError; the communicator
// is then unusable (the request is still pending inside MPI and may still write into the
// caller's buffer), and the caller is expected to call Environment::abort() so that
// every rank exits.
//
// Threads: MPI is called from one thread at a time (MPI_THREAD_FUNNELED is requested by
// default; OpenMP regions inside ssmx never call MPI).
#pragma once

// Only MPI's C API is used; skip the deprecated C++ bindings (they warn under -Wextra).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"

namespace ssmx::dist {

// An MPI call failed, ranks disagree (check_same), or a peer went away.
class DistError : public Error {
 public:
  using Error::Error;
};

// A blocking operation did not complete before the communicator's deadline.
class DistTimeoutError : public DistError {
 public:
  using DistError::DistError;
};

inline constexpr double default_timeout_seconds = 300.0;

namespace detail {

inline std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(buf, std::size_t(len));
}

// Throws DistError naming the call when rc is not MPI_SUCCESS.
inline void check(int rc, const char* call) {
  if (rc != MPI_SUCCESS) throw DistError(::ssmx::detail::str(call, " failed: ", mpi_error_string(rc)));
}

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else static_assert(sizeof(T) == 0, "ssmx::dist: unsupported element type (float, double, int32/64, uint64)");
}

// The affine operator on a [2, n] block (row 0: a, row 1: b). MPI hands the operand from
// the lower rank in `in`: inout <- in ∘ inout = (a_in·a_io, a_io·b_in + b_io), i.e. first
// apply `in`'s map h -> a h + b, then inout's. Not commutative, hence commute = 0.
template <class T>
void affine_compose(void* in, void* inout, int* len, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);  // one element of `type` is a whole [2, n] block
  const std::size_t n = std::size_t(bytes) / (2 * sizeof(T));
  const T* x = static_cast<const T*>(in);
  T* y = static_cast<T*>(inout);
  for (int e = 0; e < *len; ++e, x += 2 * n, y += 2 * n)
    for (std::size_t i = 0; i < n; ++i) {
      y[n + i] = y[i] * x[n + i] + y[n + i];
      y[i] = x[i] * y[i];
    }
}

inline double timeout_from_env() {
  const char* s = std::getenv("SSMX_DIST_TIMEOUT");
  if (!s || !*s) return default_timeout_seconds;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  SSMX_REQUIRE(end && *end == '\0' && v > 0, ValueError, "SSMX_DIST_TIMEOUT='", s,
               "': expected a positive number of seconds (e.g. 300, or inf)");
  return v;
}

}  // namespace detail

// Initialises MPI for the lifetime of the object (or adopts an MPI someone else
// initialised, and then leaves finalising to them).
class Environment {
 public:
  Environment() : Environment(nullptr, nullptr) {}
  Environment(int* argc, char*** argv, int required = MPI_THREAD_FUNNELED) {
    int initialised = 0;
    detail::check(MPI_Initialized(&initialised), "MPI_Initialized");
    if (!initialised) {
      // Before MPI_Init_thread the default error handler is fatal; MPI aborts on failure.
      detail::check(MPI_Init_thread(argc, argv, required, &provided_), "MPI_Init_thread");
      owned_ = true;
    } else {
      detail::check(MPI_Query_thread(&provided_), "MPI_Query_thread");
    }
    detail::check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    SSMX_REQUIRE(provided_ >= required, DistError, "MPI_Init_thread: thread level ", required,
                 " requested, the MPI library provides only ", provided_);
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  ~Environment() {
    if (!owned_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    const int rc = MPI_Finalize();  // destructors log, never throw
    if (rc != MPI_SUCCESS) std::fprintf(stderr, "ssmx::dist: MPI_Finalize failed: %s\n", detail::mpi_error_string(rc).c_str());
  }

  int thread_level() const noexcept { return provided_; }

  // Ends every rank of the job: the way out after a DistError on one rank, since the
  // others may be blocked in a collective that will never complete.
  [[noreturn]] static void abort(int code) noexcept {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort should not return
  }

 private:
  int provided_ = 0;
  bool owned_ = false;
};

// A communicator owned by ssmx: construction duplicates `parent` (collective over it) so
// ssmx traffic never matches the application's messages, and splits a reversed-rank twin
// for reverse_exscan_affine. Move-only; frees both on destruction (if MPI is still up).
class Communicator {
 public:
  explicit Communicator(MPI_Comm parent = MPI_COMM_WORLD) : timeout_(detail::timeout_from_env()) {
    detail::check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
    detail::check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    // key = size-1-rank: rank r of comm_ is rank size-1-r of reversed_, so a scan over
    // reversed_ runs from the last rank downwards.
    detail::check(MPI_Comm_split(comm_, 0, size_ - 1 - rank_, &reversed_), "MPI_Comm_split");
    detail::check(MPI_Comm_set_errhandler(reversed_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  Communicator(Communicator&& o) noexcept { swap(o); }
  Communicator& operator=(Communicator&& o) noexcept {
    Communicator tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~Communicator() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // After a timeout a request is still pending on these communicators: leave them be.
    if (broken_) return;
    if (reversed_ != MPI_COMM_NULL) MPI_Comm_free(&reversed_);
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  MPI_Comm native() const noexcept { return comm_; }

  // Deadline of every blocking operation, in seconds (> 0; +inf waits forever).
  void set_timeout(double seconds) {
    SSMX_REQUIRE(seconds > 0, ValueError, "Communicator::set_timeout: expected a positive number of seconds, got ",
                 seconds);
    timeout_ = seconds;
  }
  double timeout() const noexcept { return timeout_; }

  void barrier() {
    ensure_usable("barrier");
    MPI_Request req;
    begin("MPI_Ibarrier", MPI_Ibarrier(comm_, &req));
    wait(req, "barrier", "the other ranks");
  }

  // In place: every rank ends with the elementwise sum over ranks.
  template <class T>
  void allreduce_sum(T* data, std::size_t count) {
    ensure_usable("allreduce_sum");
    for (std::size_t done = 0; done < count;) {  // MPI counts are int
      const int n = int(std::min<std::size_t>(count - done, std::size_t(INT_MAX)));
      MPI_Request req;
      begin("MPI_Iallreduce", MPI_Iallreduce(MPI_IN_PLACE, data + done, n, detail::mpi_type<T>(), MPI_SUM, comm_, &req));
      wait(req, "allreduce_sum", "the other ranks");
      done += std::size_t(n);
    }
  }
  template <class T>
  void allreduce_sum(TensorView<T> v) {
    require_contiguous(v, "allreduce_sum");
    allreduce_sum(v.data(), std::size_t(v.numel()));
  }

  // Root's elements are copied into every rank's view (same shape on all ranks).
  template <class T>
  void broadcast(TensorView<T> v, int root) {
    require_contiguous(v, "broadcast");
    require_rank(root, "broadcast: root");
    ensure_usable("broadcast");
    MPI_Request req;
    begin("MPI_Ibcast", MPI_Ibcast(v.data(), checked_count(v.numel(), "broadcast"), detail::mpi_type<T>(), root, comm_, &req));
    wait(req, "broadcast", root == rank_ ? "the other ranks" : ::ssmx::detail::str("rank ", root).c_str());
  }

  template <class T>
  void send(TensorView<const T> v, int dest, int tag = 0) {
    require_contiguous(v, "send");
    require_rank(dest, "send: destination");
    ensure_usable("send");
    MPI_Request req;
    begin("MPI_Isend", MPI_Isend(v.data(), checked_count(v.numel(), "send"), detail::mpi_type<T>(), dest, tag, comm_, &req));
    wait(req, "send", ::ssmx::detail::str("rank ", dest).c_str());
  }
  template <class T>
  void send(TensorView<T> v, int dest, int tag = 0) {
    send(TensorView<const T>(v), dest, tag);
  }

  // Receives exactly v.numel() elements from `source`.
  template <class T>
  void recv(TensorView<T> v, int source, int tag = 0) {
    require_contiguous(v, "recv");
    require_rank(source, "recv: source");
    ensure_usable("recv");
    MPI_Request req;
    const int n = checked_count(v.numel(), "recv");
    begin("MPI_Irecv", MPI_Irecv(v.data(), n, detail::mpi_type<T>(), source, tag, comm_, &req));
    MPI_Status status;
    wait(req, "recv", ::ssmx::detail::str("rank ", source).c_str(), &status);
    int got = 0;
    detail::check(MPI_Get_count(&status, detail::mpi_type<T>(), &got), "MPI_Get_count");
    SSMX_REQUIRE(got == n, DistError, "recv from rank ", source, ": expected ", n, " elements, received ", got);
  }

  // Sends `out` to `dest` while receiving exactly in.numel() elements from `source`; either
  // peer may be no_rank (nothing sent or received). Neighbours exchanging along a chain
  // (r -> r+1) all proceed at once, without the send of one waiting on the next.
  static constexpr int no_rank = -1;
  template <class T>
  void sendrecv(TensorView<const T> out, int dest, TensorView<T> in, int source, int tag = 0) {
    ensure_usable("sendrecv");
    MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    int n_in = 0;
    if (source != no_rank) {
      require_contiguous(in, "sendrecv");
      require_rank(source, "sendrecv: source");
      n_in = checked_count(in.numel(), "sendrecv");
      begin("MPI_Irecv", MPI_Irecv(in.data(), n_in, detail::mpi_type<T>(), source, tag, comm_, &reqs[0]));
    }
    if (dest != no_rank) {
      require_contiguous(out, "sendrecv");
      require_rank(dest, "sendrecv: destination");
      begin("MPI_Isend", MPI_Isend(out.data(), checked_count(out.numel(), "sendrecv"), detail::mpi_type<T>(), dest, tag,
                                   comm_, &reqs[1]));
    }
    if (source != no_rank) {
      MPI_Status status;
      wait(reqs[0], "sendrecv", ::ssmx::detail::str("rank ", source).c_str(), &status);
      int got = 0;
      detail::check(MPI_Get_count(&status, detail::mpi_type<T>(), &got), "MPI_Get_count");
      SSMX_REQUIRE(got == n_in, DistError, "sendrecv from rank ", source, ": expected ", n_in, " elements, received ", got);
    }
    if (dest != no_rank) wait(reqs[1], "sendrecv", ::ssmx::detail::str("rank ", dest).c_str());
  }

  // A communicator over the ranks passing the same `color`, ordered by `key` (collective;
  // MPI_Comm_split), e.g. data-parallel groups of sharded ranks.
  Communicator split(int color, int key) const {
    ensure_usable("split");
    MPI_Comm part = MPI_COMM_NULL;
    detail::check(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split");
    Communicator c(part);
    MPI_Comm_free(&part);
    c.timeout_ = timeout_;
    return c;
  }

  // Throws DistError on every rank unless every rank passed the same value (e.g. a hash of
  // the model configuration). The message names `what` and each rank's value.
  void check_same(const std::string& what, std::uint64_t value) {
    ensure_usable("check_same");
    std::vector<std::uint64_t> all(std::size_t(size_), 0);
    MPI_Request req;
    begin("MPI_Iallgather", MPI_Iallgather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm_, &req));
    wait(req, ::ssmx::detail::str("check_same(", what, ")").c_str(), "the other ranks");
    if (std::all_of(all.begin(), all.end(), [&](std::uint64_t v) { return v == all[0]; })) return;
    std::string list;
    for (int r = 0; r < size_; ++r)
      list += ::ssmx::detail::str(r ? ", " : "", "rank ", r, ": ", all[std::size_t(r)],
                                  all[std::size_t(r)] != all[0] ? " (differs from rank 0)" : "");
    throw DistError(::ssmx::detail::str("ranks disagree on '", what, "': ", list));
  }

  // Exclusive scan over ranks of the affine maps h -> a h + b held in ab ([2, n]: row 0 a,
  // row 1 b, contiguous), in place: rank r ends with e_0 ∘ e_1 ∘ ... ∘ e_{r-1} (apply e_0
  // first), the identity (1, 0) on rank 0. This carries a scan's (Π a, h) across ranks.
  template <class T>
  void exscan_affine(TensorView<T> ab) {
    exscan_affine_on(ab, comm_, rank_ == 0, "exscan_affine");
  }
  // The same from the last rank downwards: rank r ends with e_{R-1} ∘ ... ∘ e_{r+1} (apply
  // e_{R-1} first), the identity on rank R-1. This carries the adjoint state backwards.
  template <class T>
  void reverse_exscan_affine(TensorView<T> ab) {
    exscan_affine_on(ab, reversed_, rank_ == size_ - 1, "reverse_exscan_affine");
  }

 private:
  void swap(Communicator& o) noexcept {
    std::swap(comm_, o.comm_);
    std::swap(reversed_, o.reversed_);
    std::swap(rank_, o.rank_);
    std::swap(size_, o.size_);
    std::swap(timeout_, o.timeout_);
    std::swap(broken_, o.broken_);
  }

  template <class T>
  static void require_contiguous(const TensorView<T>& v, const char* who) {
    SSMX_REQUIRE(v.is_contiguous(), ShapeError, "Communicator::", who, ": the view of shape ", v.dims().str(),
                 " must be contiguous");
  }
  void require_rank(int r, const char* who) const {
    SSMX_REQUIRE(r >= 0 && r < size_, ValueError, "Communicator::", who, " rank ", r, " is outside [0, ", size_, ")");
  }
  static int checked_count(index_t n, const char* who) {
    SSMX_REQUIRE(n <= index_t(INT_MAX), ValueError, "Communicator::", who, ": ", n,
                 " elements exceed MPI's int count; split the view");
    return int(n);
  }

  // Checks the start of a nonblocking call.
  static void begin(const char* call, int rc) { detail::check(rc, call); }
  void ensure_usable(const char* who) const {
    SSMX_REQUIRE(!broken_, DistError, "Communicator::", who,
                 ": an earlier operation timed out; this communicator is unusable (call Environment::abort)");
  }

  // Polls `req` until it completes or the deadline passes. Spins briefly (low latency for
  // small collectives), then sleeps with a growing pause of at most 1 ms.
  void wait(MPI_Request& req, const char* what, const char* peers, MPI_Status* status = nullptr) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const bool forever = !(timeout_ < std::numeric_limits<double>::infinity());
    const auto deadline = forever ? clock::time_point::max()
                                  : start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_));
    MPI_Status local;
    MPI_Status* st = status ? status : &local;
    std::chrono::microseconds pause(1);
    for (long polls = 0;; ++polls) {
      int done = 0;
      detail::check(MPI_Test(&req, &done, st), "MPI_Test");
      if (done) return;
      if (clock::now() >= deadline) {
        broken_ = true;
        throw DistTimeoutError(::ssmx::detail::str("Communicator::", what, " on rank ", rank_, " of ", size_,
                                                   " timed out after ", timeout_, " s waiting for ", peers,
                                                   " (one died or is stuck; call Environment::abort)"));
      }
      if (polls > 1000) {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
      }
    }
  }

  template <class T>
  void exscan_affine_on(TensorView<T> ab, MPI_Comm comm, bool first, const char* who) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "exscan_affine: float or double");
    require_contiguous(ab, who);
    SSMX_REQUIRE(ab.rank() == 2 && ab.extent(0) == 2, ShapeError, "Communicator::", who,
                 ": expected a [2, n] view (row 0: a, row 1: b), got ", ab.dims().str());
    const index_t n = ab.extent(1);
    checked_count(2 * n, who);
    if (n == 0) return;
    ensure_usable(who);
    // One element of `block` is the whole [2, n] array, so MPI never splits a pair (a, b).
    MPI_Datatype block;
    detail::check(MPI_Type_contiguous(int(2 * n), detail::mpi_type<T>(), &block), "MPI_Type_contiguous");
    MPI_Op op = MPI_OP_NULL;
    std::vector<T> out(std::size_t(2 * n));
    int rc = MPI_Type_commit(&block);
    if (rc == MPI_SUCCESS) rc = MPI_Op_create(&detail::affine_compose<T>, /*commute=*/0, &op);
    MPI_Request req = MPI_REQUEST_NULL;
    if (rc == MPI_SUCCESS) rc = MPI_Iexscan(ab.data(), out.data(), 1, block, op, comm, &req);
    try {
      detail::check(rc, "MPI_Iexscan");
      wait(req, who, "the other ranks");
    } catch (...) {
      if (!broken_) {
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
        MPI_Type_free(&block);
      }
      throw;
    }
    detail::check(MPI_Op_free(&op), "MPI_Op_free");
    detail::check(MPI_Type_free(&block), "MPI_Type_free");
    if (first) {  // MPI leaves the first rank's result undefined: the identity map
      std::fill_n(ab.data(), n, T(1));
      std::fill_n(ab.data() + n, n, T(0));
    } else {
      std::copy(out.begin(), out.end(), ab.data());
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm reversed_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  double timeout_ = default_timeout_seconds;
  bool broken_ = false;
};

}  // namespace ssmx::dist
