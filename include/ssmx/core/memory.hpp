// ssmx — memory spaces and the tracked allocator.
//
// Every byte the engine allocates goes through allocate()/deallocate(), which record the
// current and peak bytes per memory space and per tag. Benchmarks read the peaks to report
// memory honestly; a strategy's memory claim is only as good as this accounting.
//
// Host blocks are cached: a freed block is kept in a bin of its size class and handed out
// again for the next request of that class, so steady-state training steps reuse memory
// that is already mapped instead of faulting in fresh pages. The accounting above counts
// requested bytes of live allocations only; retained blocks show in cache_stats(). The
// cache holds at most SSMX_HOST_CACHE_BYTES (default 1 GiB; 0 turns it off; suffixes K, M,
// G), evicting the least recently used bins first; release_cached_memory() empties it.
// Under AddressSanitizer it is off by default, and retained blocks are poisoned when it is
// turned on, so use-after-free is still reported.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "error.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define SSMX_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SSMX_ASAN 1
#endif
#endif
#ifndef SSMX_ASAN
#define SSMX_ASAN 0
#endif
#if SSMX_ASAN
#include <sanitizer/asan_interface.h>
#endif

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

// The allocation cache of one space: blocks freed by deallocate() and kept for reuse.
struct CacheStats {
  std::size_t retained = 0;  // bytes held in freed blocks (block sizes, not requests)
  std::size_t blocks = 0;    // freed blocks held
  std::size_t limit = 0;     // most bytes held; 0: the cache is off
  std::size_t hits = 0;      // allocations served from the cache, since the start
  std::size_t misses = 0;    // allocations that found no block of their size class
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
  std::size_t (*release_cached)() = nullptr;             // frees cached blocks, returns bytes; optional
  CacheStats (*cache_stats)() = nullptr;                  // optional
};

inline constexpr std::size_t host_alignment = 64;
inline constexpr std::size_t host_page = 4096;
inline constexpr std::size_t host_large_block = std::size_t(128) << 10;  // from here on, whole pages
inline constexpr std::size_t default_host_cache_bytes = std::size_t(1) << 30;

// The size class of a request: small requests round up to 64 bytes, large ones to pages.
inline std::size_t host_block_size(std::size_t bytes) noexcept {
  if (bytes == 0) return host_alignment;
  const std::size_t unit = bytes < host_large_block ? host_alignment : host_page;
  return bytes > std::numeric_limits<std::size_t>::max() - unit ? 0 : (bytes + unit - 1) / unit * unit;
}

// SSMX_HOST_CACHE_BYTES: digits with an optional K, M or G suffix (binary units); unset or
// empty gives the default.
inline std::size_t host_cache_limit_from(const char* value) {
  if (!value || !*value) return SSMX_ASAN ? 0 : default_host_cache_bytes;
  const auto bad = [&] {
    return ValueError(str("SSMX_HOST_CACHE_BYTES='", value,
                          "': expected a number of bytes, optionally with a K, M or G suffix (0 turns the cache off)"));
  };
  std::size_t v = 0;
  const char* c = value;
  for (; *c >= '0' && *c <= '9'; ++c) {
    const std::size_t digit = std::size_t(*c - '0');
    if (v > (std::numeric_limits<std::size_t>::max() - digit) / 10) throw bad();
    v = v * 10 + digit;
  }
  if (c == value) throw bad();
  int shift = 0;
  if (*c == 'K' || *c == 'k') shift = 10;
  if (*c == 'M' || *c == 'm') shift = 20;
  if (*c == 'G' || *c == 'g') shift = 30;
  if (shift) ++c;
  if (*c != '\0' || (shift && v > (std::numeric_limits<std::size_t>::max() >> shift))) throw bad();
  return v << shift;
}

// Freed host blocks by size class, at most `limit` bytes in all. One mutex: allocations
// come from OpenMP workers, but per buffer, not per element.
class HostCache {
 public:
  explicit HostCache(std::size_t limit) : limit_(limit) {}

  // A retained block of exactly `size` bytes (a size class), or nullptr.
  void* take(std::size_t size) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = bins_.find(size);
    if (it == bins_.end() || it->second.blocks.empty()) {
      ++misses_;
      return nullptr;
    }
    void* p = it->second.blocks.back();
    it->second.blocks.pop_back();
    it->second.last_use = ++clock_;
    retained_ -= size;
    --blocks_;
    ++hits_;
#if SSMX_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, size);
#endif
    return p;
  }

  // Keeps p (a block of `size` bytes) for reuse; false when it does not fit, and the caller
  // frees it.
  bool keep(void* p, std::size_t size) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      if (size > limit_) return false;
      if (retained_ + size > limit_) evict(retained_ + size - limit_, size);
      if (retained_ + size > limit_) return false;
      Bin& bin = bins_[size];
      bin.blocks.push_back(p);
      bin.last_use = ++clock_;
      retained_ += size;
      ++blocks_;
#if SSMX_ASAN
      ASAN_POISON_MEMORY_REGION(p, size);
#endif
      return true;
    } catch (...) {  // a bin that could not grow (bad_alloc), or a failed lock
      return false;
    }
  }

  // Frees every retained block; returns the bytes freed.
  std::size_t release() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::size_t freed = retained_;
    for (auto& [size, bin] : bins_) drop(bin, size, bin.blocks.size());
    bins_.clear();
    return freed;
  }

  // A new bound on the retained bytes; what is over it is freed now.
  void set_limit(std::size_t limit) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
    if (retained_ > limit_) evict(retained_ - limit_, 0);
  }

  CacheStats stats() const noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    return {retained_, blocks_, limit_, hits_, misses_};
  }

 private:
  struct Bin {
    std::vector<void*> blocks;
    std::uint64_t last_use = 0;
  };

  void drop(Bin& bin, std::size_t size, std::size_t count) noexcept {
    for (; count > 0; --count) {
      void* p = bin.blocks.back();
      bin.blocks.pop_back();
#if SSMX_ASAN
      ASAN_UNPOISON_MEMORY_REGION(p, size);
#endif
      std::free(p);
      retained_ -= size;
      --blocks_;
    }
  }

  // Frees at least `bytes` from the least recently used bins other than `spare`'s, as far
  // as they go.
  void evict(std::size_t bytes, std::size_t spare) noexcept {
    std::size_t freed = 0;
    while (freed < bytes) {
      Bin* oldest = nullptr;
      std::size_t oldest_size = 0;
      for (auto& [size, bin] : bins_)
        if (size != spare && !bin.blocks.empty() && (!oldest || bin.last_use < oldest->last_use)) {
          oldest = &bin;
          oldest_size = size;
        }
      if (!oldest) return;
      const std::size_t count = std::min(oldest->blocks.size(), (bytes - freed + oldest_size - 1) / oldest_size);
      drop(*oldest, oldest_size, count);
      freed += count * oldest_size;
    }
  }

  mutable std::mutex mutex_;
  std::unordered_map<std::size_t, Bin> bins_;
  std::size_t limit_;
  std::size_t retained_ = 0, blocks_ = 0, hits_ = 0, misses_ = 0;
  std::uint64_t clock_ = 0;
};

// The process's host cache, sized from SSMX_HOST_CACHE_BYTES when first used. Never
// destroyed, so that buffers freed during static destruction still find it.
inline HostCache& host_cache() {
  static HostCache& cache = *new HostCache(host_cache_limit_from(std::getenv("SSMX_HOST_CACHE_BYTES")));
  return cache;
}

inline void* host_allocate(std::size_t bytes) {
  const std::size_t size = host_block_size(bytes);
  if (size == 0) throw OutOfMemoryError(bytes, "Host");
  HostCache& cache = host_cache();
  if (void* p = cache.take(size)) return p;
  void* p = std::aligned_alloc(host_alignment, size);
  if (!p && cache.release() > 0) p = std::aligned_alloc(host_alignment, size);  // retry without the cache
  if (!p) throw OutOfMemoryError(bytes, "Host");
  return p;
}
inline void host_deallocate(void* p, std::size_t bytes) noexcept {
  if (!host_cache().keep(p, host_block_size(bytes))) std::free(p);
}
inline std::size_t host_release_cached() { return host_cache().release(); }
inline CacheStats host_cache_stats() { return host_cache().stats(); }

inline RawAllocator& raw_allocator(Space s) {
  static RawAllocator table[num_spaces] = {{&host_allocate, &host_deallocate, &host_release_cached, &host_cache_stats},
                                           {nullptr, nullptr, nullptr, nullptr}};
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

// Frees the blocks that space s keeps for reuse (the host cache; a backend's pool where the
// backend installs a hook); returns the bytes freed. Live allocations are untouched.
inline std::size_t release_cached_memory(Space s = Space::Host) noexcept {
  try {
    auto& raw = detail::raw_allocator(s);
    return raw.release_cached ? raw.release_cached() : 0;
  } catch (...) {
    return 0;
  }
}

// What space s keeps for reuse (all zeros for a space without a cache).
inline CacheStats cache_stats(Space s = Space::Host) {
  auto& raw = detail::raw_allocator(s);
  return raw.cache_stats ? raw.cache_stats() : CacheStats{};
}

// Bounds the host cache to `bytes` (0 turns it off), freeing what is over it now; the same
// as SSMX_HOST_CACHE_BYTES at startup.
inline void set_host_cache_limit(std::size_t bytes) { detail::host_cache().set_limit(bytes); }

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
