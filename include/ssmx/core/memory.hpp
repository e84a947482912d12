// ssmx — memory spaces and the tracked allocator.
//
// Every byte the engine allocates goes through allocate()/deallocate(), which record the
// current and peak bytes per memory space and per tag. Benchmarks read the peaks to report
// memory honestly; a strategy's memory claim is only as good as this accounting.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "error.hpp"

namespace ssmx {

enum class Space : int { Host = 0, Cuda = 1 };
inline constexpr int num_spaces = 2;

inline const char* space_name(Space s) { return s == Space::Host ? "Host" : "Cuda"; }

// What an allocation is for; peaks are kept per tag and for the whole space.
enum class Tag : int { Parameters = 0, Gradients = 1, Activations = 2, Workspace = 3, OptimizerState = 4 };
inline constexpr int num_tags = 5;

inline const char* tag_name(Tag t) {
  switch (t) {
    case Tag::Parameters: return "parameters";
    case Tag::Gradients: return "gradients";
    case Tag::Activations: return "activations";
    case Tag::Workspace: return "workspace";
    case Tag::OptimizerState: return "optimizer_state";
  }
  return "?";
}

struct MemoryStats {
  std::size_t current = 0;
  std::size_t peak = 0;
  std::array<std::size_t, num_tags> current_by_tag{};
  std::array<std::size_t, num_tags> peak_by_tag{};
  std::size_t allocations = 0;  // number of allocate() calls since the last reset
};

namespace detail {

struct SpaceCounters {
  std::atomic<std::size_t> current{0}, peak{0}, allocations{0};
  std::array<std::atomic<std::size_t>, num_tags> tag_current{}, tag_peak{};
};

inline SpaceCounters& counters(Space s) {
  static SpaceCounters c[num_spaces];
  return c[int(s)];
}

inline void raise_peak(std::atomic<std::size_t>& peak, std::size_t value) {
  std::size_t p = peak.load(std::memory_order_relaxed);
  while (value > p && !peak.compare_exchange_weak(p, value, std::memory_order_relaxed)) {
  }
}

inline void record_alloc(Space s, Tag t, std::size_t bytes) {
  auto& c = counters(s);
  raise_peak(c.peak, c.current.fetch_add(bytes, std::memory_order_relaxed) + bytes);
  auto& tc = c.tag_current[int(t)];
  raise_peak(c.tag_peak[int(t)], tc.fetch_add(bytes, std::memory_order_relaxed) + bytes);
  c.allocations.fetch_add(1, std::memory_order_relaxed);
}

inline void record_free(Space s, Tag t, std::size_t bytes) noexcept {
  auto& c = counters(s);
  c.current.fetch_sub(bytes, std::memory_order_relaxed);
  c.tag_current[int(t)].fetch_sub(bytes, std::memory_order_relaxed);
}

// A raw allocator for one space. The CUDA backend (ssmx/cuda.cuh) installs its own for
// Space::Cuda; the host one is built in. Neither records: the tracker wraps them.
struct RawAllocator {
  void* (*allocate)(std::size_t bytes) = nullptr;        // throws OutOfMemoryError / DeviceError
  void (*deallocate)(void* p, std::size_t bytes) = nullptr;  // never throws
};

inline constexpr std::size_t host_alignment = 64;

inline void* host_allocate(std::size_t bytes) {
  std::size_t rounded = (bytes + host_alignment - 1) / host_alignment * host_alignment;
  void* p = std::aligned_alloc(host_alignment, rounded == 0 ? host_alignment : rounded);
  if (!p) throw OutOfMemoryError(bytes, "Host");
  return p;
}
inline void host_deallocate(void* p, std::size_t) noexcept { std::free(p); }

inline RawAllocator& raw_allocator(Space s) {
  static RawAllocator table[num_spaces] = {{&host_allocate, &host_deallocate}, {nullptr, nullptr}};
  return table[int(s)];
}

// Byte copies and zeroing in a space other than the host's. The CUDA backend installs them
// with its allocator; a copy whose destination is host memory returns once the bytes are
// there. Without them, touching device memory is a DeviceError (as allocating it is).
struct RawTransfer {
  void (*copy)(void* dst, Space dst_space, const void* src, Space src_space, std::size_t bytes) = nullptr;
  void (*zero)(void* p, Space s, std::size_t bytes) = nullptr;
};
inline RawTransfer& raw_transfer() {
  static RawTransfer t;
  return t;
}

inline void no_device_memory(Space s) {
  throw DeviceError(detail::str("memory space ", space_name(s),
                                " is not available: include <ssmx/cuda.cuh> and compile with nvcc to use CUDA memory"));
}

// Copies `bytes` from src (in space ss) to dst (in space ds); the ranges must not overlap.
inline void copy_bytes(void* dst, Space ds, const void* src, Space ss, std::size_t bytes) {
  if (bytes == 0) return;
  if (ds == Space::Host && ss == Space::Host) {
    std::memcpy(dst, src, bytes);
    return;
  }
  if (!raw_transfer().copy) no_device_memory(ds == Space::Host ? ss : ds);
  raw_transfer().copy(dst, ds, src, ss, bytes);
}
// Sets `bytes` at p (in space s) to zero.
inline void zero_bytes(void* p, Space s, std::size_t bytes) {
  if (bytes == 0) return;
  if (s == Space::Host) {
    std::memset(p, 0, bytes);
    return;
  }
  if (!raw_transfer().zero) no_device_memory(s);
  raw_transfer().zero(p, s, bytes);
}

}  // namespace detail

// Allocates `bytes` in space `s` and records them under tag `t`.
inline void* allocate(std::size_t bytes, Space s, Tag t) {
  auto& raw = detail::raw_allocator(s);
  if (!raw.allocate) detail::no_device_memory(s);
  void* p = raw.allocate(bytes);
  detail::record_alloc(s, t, bytes);
  return p;
}

// Releases memory from allocate(); `bytes`, `s` and `t` must be those it was allocated with.
inline void deallocate(void* p, std::size_t bytes, Space s, Tag t) noexcept {
  if (!p) return;
  detail::raw_allocator(s).deallocate(p, bytes);
  detail::record_free(s, t, bytes);
}

// The tracker's counters for one space.
inline MemoryStats memory_stats(Space s = Space::Host) {
  auto& c = detail::counters(s);
  MemoryStats m;
  m.current = c.current.load();
  m.peak = c.peak.load();
  m.allocations = c.allocations.load();
  for (int i = 0; i < num_tags; ++i) {
    m.current_by_tag[i] = c.tag_current[i].load();
    m.peak_by_tag[i] = c.tag_peak[i].load();
  }
  return m;
}

// Sets every peak of space s to its current value, so that the next peak measures one region.
inline void reset_peak(Space s = Space::Host) {
  auto& c = detail::counters(s);
  c.peak.store(c.current.load());
  c.allocations.store(0);
  for (int i = 0; i < num_tags; ++i) c.tag_peak[i].store(c.tag_current[i].load());
}

// An owning, typed, tracked buffer. Move-only; releases on destruction.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(std::size_t count, Space s, Tag t) : size_(count), space_(s), tag_(t) {
    if (count) data_ = static_cast<T*>(allocate(count * sizeof(T), s, t));
  }
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      Buffer tmp(std::move(o));
      swap(tmp);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { reset(); }

  void reset() noexcept {
    deallocate(data_, size_ * sizeof(T), space_, tag_);
    data_ = nullptr;
    size_ = 0;
  }
  void swap(Buffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(space_, o.space_);
    std::swap(tag_, o.tag_);
  }

  T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  Space space() const noexcept { return space_; }
  Tag tag() const noexcept { return tag_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
  Space space_ = Space::Host;
  Tag tag_ = Tag::Workspace;
};

// Tracked scratch memory for a computation's own buffers (uninitialised unless given a
// value): a Buffer with element access.
template <class T>
class Work {
 public:
  Work() = default;
  explicit Work(std::size_t count, Tag tag = Tag::Workspace) : buf_(count, Space::Host, tag) {}
  Work(std::size_t count, T value, Tag tag = Tag::Workspace) : buf_(count, Space::Host, tag) {
    std::fill(begin(), end(), value);
  }
  T* data() const noexcept { return buf_.data(); }
  std::size_t size() const noexcept { return buf_.size(); }
  T* begin() const noexcept { return buf_.data(); }
  T* end() const noexcept { return buf_.data() + buf_.size(); }
  T& operator[](std::size_t i) const noexcept { return buf_.data()[i]; }

 private:
  Buffer<T> buf_;
};

}  // namespace ssmx
