// Tests of ssmx/core: Dims and Shape, Tensor and TensorView, the tracked allocator, its host
// cache and Buffer, the 16-bit storage types, error messages, Eigen interop.
#include "support/test_support.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(_OPENMP) && !SSMX_TEST_CUDA
#include <omp.h>
#endif

namespace test_core {

using namespace ssmx;

using ssmx::test::contains;
using ssmx::test::message_of;

inline std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A host tensor [0, 1, 2, ...] of the given shape.
inline Tensor<float> iota(const Dims& d) {
  Tensor<float> t(d);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(i);
  return t;
}

}  // namespace test_core

// ---- tests that run on both backends ------------------------------------------------------

TEST_CASE("core: tensor round trip through the test space") {
  using namespace test_core;
  auto h = ssmx::test::uniform<float>(Dims{3, 5}, 7);
  auto d = ssmx::test::to_space(h);
  CHECK(d.dims() == h.dims());
  CHECK(decltype(d)::space == ssmx::test::space);
  auto back = ssmx::test::to_host(d);
  CHECK(to_vector(back) == to_vector(h));
  CHECK(ssmx::test::max_rel_err(back, h) == 0.0);
}

TEST_CASE("core: tracked allocator counts the test space") {
  using namespace test_core;
  constexpr Space S = ssmx::test::space;
  const auto before = memory_stats(S);
  reset_peak(S);
  {
    Tensor<float, S> a(Dims{256}, Tag::Parameters);
    Tensor<double, S> b(Dims{4, 8}, Tag::Gradients);
    const auto during = memory_stats(S);
    CHECK(during.current == before.current + 1024 + 256);
    CHECK(during.current_by_tag[int(Tag::Parameters)] == before.current_by_tag[int(Tag::Parameters)] + 1024);
    CHECK(during.current_by_tag[int(Tag::Gradients)] == before.current_by_tag[int(Tag::Gradients)] + 256);
    CHECK(during.allocations == 2);
  }
  const auto after = memory_stats(S);
  CHECK(after.current == before.current);
  CHECK(after.peak == before.current + 1024 + 256);
  CHECK(after.peak_by_tag[int(Tag::Parameters)] == before.current_by_tag[int(Tag::Parameters)] + 1024);
}

// ---- host-only tests ------------------------------------------------------------------------
#if !SSMX_TEST_CUDA

TEST_CASE("core: Dims extents and numel and equality and printing") {
  using namespace test_core;
  const Dims d{2, 3, 4};
  CHECK(d.rank == 3);
  CHECK(d[0] == 2);
  CHECK(d[2] == 4);
  CHECK(d.numel() == 24);
  CHECK(d.str() == "[2, 3, 4]");
  CHECK(Dims{}.numel() == 1);  // a scalar
  CHECK(Dims{}.str() == "[]");
  CHECK(Dims{5, 0}.numel() == 0);
  CHECK(d == Dims{2, 3, 4});
  CHECK(d != Dims{2, 3});
  CHECK(d != Dims{2, 3, 5});
  const auto s = contiguous_strides(d);
  CHECK(s[0] == 12);
  CHECK(s[1] == 4);
  CHECK(s[2] == 1);
}

TEST_CASE("core: Dims rejects a fifth extent and negative extents by name") {
  using namespace test_core;
  auto m = message_of<ShapeError>([] { Dims d{1, 2, 3, 4, 5}; });
  CHECK(contains(m, "rank 5"));
  CHECK(contains(m, "maximum rank 4"));
  m = message_of<ShapeError>([] { Dims d{3, -2}; });
  CHECK(contains(m, "extent 1"));
  CHECK(contains(m, "-2"));
}

TEST_CASE("core: Shape with static and dynamic extents") {
  using namespace test_core;
  using Seq = Shape<dynamic, 4, dynamic>;
  static_assert(Seq::rank == 3);
  static_assert(Seq::rank_dynamic == 2);
  static_assert(Seq::static_extent(1) == 4);
  static_assert(Seq::static_extent(0) == dynamic);
  static_assert(Shape<2, 3>::rank_dynamic == 0);

  const Seq s(10, 2);
  CHECK(s.dims() == Dims{10, 4, 2});
  const Dims converted = s;
  CHECK(converted == Dims{10, 4, 2});
  CHECK(Shape<2, 3>().dims() == Dims{2, 3});
  CHECK(Shape<>().dims().rank == 0);

  Tensor<float> t(Seq(5, 3));
  CHECK(t.dims() == Dims{5, 4, 3});
}

TEST_CASE("core: Shape::check accepts matching tensors and names the mismatch") {
  using namespace test_core;
  using Seq = Shape<dynamic, 4, 2>;
  CHECK_NOTHROW(Seq::check(Dims{7, 4, 2}, "h"));
  CHECK_NOTHROW(Seq::check(Dims{0, 4, 2}, "h"));

  auto m = message_of<ShapeError>([] { Seq::check(Dims{7, 4}, "state"); });
  CHECK(contains(m, "'state'"));
  CHECK(contains(m, "rank 2"));
  CHECK(contains(m, "expected rank 3"));

  m = message_of<ShapeError>([] { Seq::check(Dims{7, 5, 2}, "state"); });
  CHECK(contains(m, "'state'"));
  CHECK(contains(m, "extent 5"));
  CHECK(contains(m, "dimension 1"));
  CHECK(contains(m, "expected 4"));
  CHECK(contains(m, "[7, 5, 2]"));
}

TEST_CASE("core: Tensor construction and element access and clone and reshape") {
  using namespace test_core;
  auto t = iota(Dims{2, 3});
  CHECK(t.rank() == 2);
  CHECK(t.extent(1) == 3);
  CHECK(t.numel() == 6);
  CHECK(t.bytes() == 24);
  CHECK(t.tag() == Tag::Activations);
  CHECK(!t.empty());
  CHECK(t(1, 2) == 5.0f);
  CHECK(t(0, 1) == 1.0f);
  t(1, 0) = 30.0f;
  CHECK(t[3] == 30.0f);

  auto c = t.clone(Tag::Workspace);
  CHECK(c.tag() == Tag::Workspace);
  CHECK(c.data() != t.data());
  CHECK(to_vector(c) == to_vector(t));
  c(0, 0) = -1.0f;
  CHECK(t(0, 0) == 0.0f);  // a clone is independent

  t.reshape(Dims{3, 2});
  CHECK(t.dims() == Dims{3, 2});
  CHECK(t(1, 1) == 30.0f);
  auto m = message_of<ShapeError>([&] { t.reshape(Dims{4, 2}); });
  CHECK(contains(m, "[3, 2]"));
  CHECK(contains(m, "[4, 2]"));

  Tensor<float> empty;
  CHECK(empty.empty());
  Tensor<float> none(Dims{0, 3});
  CHECK(none.empty());
  CHECK(none.data() == nullptr);
}

TEST_CASE("core: Tensor move leaves the source empty and keeps the memory") {
  using namespace test_core;
  auto a = iota(Dims{4});
  const float* p = a.data();
  const auto before = memory_stats().current;
  Tensor<float> b(std::move(a));
  CHECK(b.data() == p);
  CHECK(a.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  CHECK(memory_stats().current == before);
  Tensor<float> c = iota(Dims{8});
  c = std::move(b);  // releases c's old 32 bytes
  CHECK(c.data() == p);
  CHECK(c.dims() == Dims{4});
  CHECK(memory_stats().current == before);
}

TEST_CASE("core: zeros and fill and from_vector and to_vector and check_dims") {
  using namespace test_core;
  auto z = zeros<double>(Dims{2, 2});
  CHECK(to_vector(z) == std::vector<double>{0, 0, 0, 0});
  fill(z, 1.5);
  CHECK(to_vector(z) == std::vector<double>{1.5, 1.5, 1.5, 1.5});

  auto v = from_vector<int>(Dims{2, 2}, {1, 2, 3, 4});
  CHECK(v(1, 0) == 3);
  auto m = message_of<ShapeError>([] { (void)from_vector<int>(Dims{2, 2}, {1, 2, 3}); });
  CHECK(contains(m, "3 values"));
  CHECK(contains(m, "[2, 2]"));

  CHECK_NOTHROW(check_dims(Dims{2, 3}, Dims{2, 3}, "x"));
  m = message_of<ShapeError>([] { check_dims(Dims{2, 3}, Dims{3, 2}, "weights"); });
  CHECK(contains(m, "'weights'"));
  CHECK(contains(m, "[2, 3]"));
  CHECK(contains(m, "expected [3, 2]"));
}

TEST_CASE("core: TensorView slices alias the tensor") {
  using namespace test_core;
  auto t = iota(Dims{4, 3});
  TensorView<float> v = t;
  auto rows = v.slice(1, 3);
  CHECK(rows.dims() == Dims{2, 3});
  CHECK(rows.is_contiguous());
  CHECK(rows(0, 0) == 3.0f);
  rows(1, 2) = 100.0f;
  CHECK(t(2, 2) == 100.0f);

  auto cols = v.slice(1, 1, 3);  // columns 1 and 2
  CHECK(cols.dims() == Dims{4, 2});
  CHECK(!cols.is_contiguous());
  CHECK(cols.stride(0) == 3);
  CHECK(cols(3, 0) == 10.0f);
  CHECK(to_vector(cols) == std::vector<float>{1, 2, 4, 5, 7, 100, 10, 11});

  fill(cols, -1.0f);
  CHECK(t(0, 0) == 0.0f);
  CHECK(t(0, 1) == -1.0f);
  CHECK(t(3, 2) == -1.0f);

  TensorView<const float> cv = v;  // mutable -> const view
  CHECK(cv.data() == t.data());
  CHECK(cv(0, 1) == -1.0f);
}

TEST_CASE("core: TensorView slice and reshape errors name the shapes") {
  using namespace test_core;
  auto t = iota(Dims{4, 3});
  auto v = t.view();
  auto m = message_of<ShapeError>([&] { (void)v.slice(2, 5); });
  CHECK(contains(m, "[2, 5)"));
  CHECK(contains(m, "[4, 3]"));
  m = message_of<ShapeError>([&] { (void)v.slice(2, 0, 1); });
  CHECK(contains(m, "dimension 2"));

  auto r = v.reshape(Dims{2, 6});
  CHECK(r.data() == t.data());
  CHECK(r(1, 0) == 6.0f);
  m = message_of<ShapeError>([&] { (void)v.reshape(Dims{5, 2}); });
  CHECK(contains(m, "12 elements"));
  CHECK(contains(m, "10 elements"));
  m = message_of<ShapeError>([&] { (void)v.slice(1, 0, 2).reshape(Dims{8}); });
  CHECK(contains(m, "non-contiguous"));
}

TEST_CASE("core: copy between strided views") {
  using namespace test_core;
  auto src = iota(Dims{3, 4});
  Tensor<float> dst = zeros<float>(Dims{4, 3});
  // The transpose of src through strides: dst[j, i] = src[i, j].
  TensorView<const float> transposed(src.data(), Dims{4, 3}, {1, 4, 0, 0});
  copy<float>(dst.view(), transposed);
  CHECK(dst(2, 1) == src(1, 2));
  CHECK(dst(3, 2) == src(2, 3));
  auto m = message_of<ShapeError>([&] { copy<float>(dst.view(), src.view()); });
  CHECK(contains(m, "[4, 3]"));
  CHECK(contains(m, "[3, 4]"));
}

TEST_CASE("core: tracked allocator keeps current and peak per space and per tag") {
  using namespace test_core;
  const auto host0 = memory_stats(Space::Host);
  const auto cuda0 = memory_stats(Space::Cuda);
  reset_peak(Space::Host);
  {
    Buffer<float> p(100, Space::Host, Tag::Parameters);        // 400 bytes
    Buffer<double> w(10, Space::Host, Tag::Workspace);         // 80 bytes
    {
      Buffer<char> act(1000, Space::Host, Tag::Activations);  // 1000 bytes, then freed
      CHECK(memory_stats().current == host0.current + 1480);
    }
    const auto s = memory_stats(Space::Host);
    CHECK(s.current == host0.current + 480);
    CHECK(s.peak == host0.current + 1480);
    CHECK(s.current_by_tag[int(Tag::Parameters)] == host0.current_by_tag[int(Tag::Parameters)] + 400);
    CHECK(s.current_by_tag[int(Tag::Workspace)] == host0.current_by_tag[int(Tag::Workspace)] + 80);
    CHECK(s.current_by_tag[int(Tag::Activations)] == host0.current_by_tag[int(Tag::Activations)]);
    CHECK(s.peak_by_tag[int(Tag::Activations)] == host0.current_by_tag[int(Tag::Activations)] + 1000);
    CHECK(s.allocations == 3);

    reset_peak(Space::Host);  // the next region starts at the current level
    const auto r = memory_stats(Space::Host);
    CHECK(r.peak == r.current);
    CHECK(r.peak_by_tag[int(Tag::Activations)] == r.current_by_tag[int(Tag::Activations)]);
    CHECK(r.allocations == 0);
  }
  CHECK(memory_stats(Space::Host).current == host0.current);
  // Host allocations never touch the other space's counters.
  CHECK(memory_stats(Space::Cuda).current == cuda0.current);
  CHECK(memory_stats(Space::Cuda).peak == cuda0.peak);
  CHECK(std::string(space_name(Space::Cuda)) == "Cuda");
  CHECK(std::string(tag_name(Tag::OptimizerState)) == "optimizer_state");
}

TEST_CASE("core: Buffer is move-only and releases exactly once") {
  using namespace test_core;
  static_assert(!std::is_copy_constructible_v<Buffer<float>>);
  static_assert(std::is_nothrow_move_constructible_v<Buffer<float>>);
  const auto base = memory_stats().current;
  Buffer<float> a(16, Space::Host, Tag::Gradients);
  float* p = a.data();
  CHECK(a.size() == 16);
  CHECK(a.tag() == Tag::Gradients);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % detail::host_alignment == 0);

  Buffer<float> b(std::move(a));
  CHECK(b.data() == p);
  CHECK(a.data() == nullptr);  // NOLINT(bugprone-use-after-move)
  CHECK(a.size() == 0);
  CHECK(memory_stats().current == base + 64);

  Buffer<float> c(4, Space::Host, Tag::Workspace);
  c = std::move(b);  // c's 16 bytes go back
  CHECK(c.data() == p);
  CHECK(c.tag() == Tag::Gradients);
  CHECK(memory_stats().current == base + 64);

  Buffer<float>& alias = c;
  c = std::move(alias);  // self-move keeps the buffer
  CHECK(c.data() == p);

  c.reset();
  CHECK(c.data() == nullptr);
  CHECK(memory_stats().current == base);
  c.reset();  // idempotent
  CHECK(memory_stats().current == base);

  Buffer<float> zero(0, Space::Host, Tag::Workspace);
  CHECK(zero.data() == nullptr);
}

// ---- the host allocation cache --------------------------------------------------------------

namespace test_core {

// Sets the host cache to `limit` bytes, empty, for one test; restores the limit after.
struct CacheScope {
  std::size_t saved = cache_stats().limit;
  explicit CacheScope(std::size_t limit) {
    release_cached_memory();
    set_host_cache_limit(limit);
  }
  ~CacheScope() {
    release_cached_memory();
    set_host_cache_limit(saved);
  }
};

inline constexpr std::size_t MiB = std::size_t(1) << 20;

}  // namespace test_core

TEST_CASE("core: the host cache hands a freed block to the next request of its size class") {
  using namespace test_core;
  CacheScope scope(64 * MiB);
  const auto s0 = cache_stats();
  CHECK(s0.retained == 0);
  CHECK(s0.limit == 64 * MiB);

  // Large requests round up to pages: 1 MiB and 1 MiB - 100 bytes share a block.
  void* big = allocate(MiB, Space::Host, Tag::Workspace);
  std::memset(big, 1, MiB);
  deallocate(big, MiB, Space::Host, Tag::Workspace);
  CHECK(cache_stats().retained == MiB);
  CHECK(cache_stats().blocks == 1);
  void* again = allocate(MiB - 100, Space::Host, Tag::Activations);
  CHECK(again == big);
  CHECK(cache_stats().hits == s0.hits + 1);
  CHECK(cache_stats().retained == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(again) % detail::host_alignment == 0);

  // Another class misses, and gets a block of its own while the first is live.
  void* other = allocate(2 * MiB, Space::Host, Tag::Workspace);
  CHECK(other != again);
  CHECK(cache_stats().misses == s0.misses + 2);
  deallocate(other, 2 * MiB, Space::Host, Tag::Workspace);
  deallocate(again, MiB - 100, Space::Host, Tag::Activations);
  CHECK(cache_stats().retained == 3 * MiB);

  // Small requests round up to 64 bytes: 100 and 120 bytes share a class, 200 does not.
  CHECK(detail::host_block_size(100) == 128);
  CHECK(detail::host_block_size(0) == detail::host_alignment);
  CHECK(detail::host_block_size(MiB + 1) == MiB + detail::host_page);
  void* small = allocate(100, Space::Host, Tag::Workspace);
  deallocate(small, 100, Space::Host, Tag::Workspace);
  void* small_again = allocate(120, Space::Host, Tag::Workspace);
  CHECK(small_again == small);
  void* small_other = allocate(200, Space::Host, Tag::Workspace);
  CHECK(small_other != small);
  deallocate(small_again, 120, Space::Host, Tag::Workspace);
  deallocate(small_other, 200, Space::Host, Tag::Workspace);
#if SSMX_ASAN
  CHECK(__asan_address_is_poisoned(small));  // a retained block still reports use after free
#endif
}

TEST_CASE("core: the host cache keeps at most its limit and evicts the least recently used") {
  using namespace test_core;
  CacheScope scope(4 * MiB);
  void* a = allocate(1 * MiB, Space::Host, Tag::Workspace);
  void* b = allocate(2 * MiB, Space::Host, Tag::Workspace);
  void* c = allocate(3 * MiB, Space::Host, Tag::Workspace);
  deallocate(a, 1 * MiB, Space::Host, Tag::Workspace);
  deallocate(b, 2 * MiB, Space::Host, Tag::Workspace);
  CHECK(cache_stats().retained == 3 * MiB);
  deallocate(c, 3 * MiB, Space::Host, Tag::Workspace);  // room for it: a, then b go
  CHECK(cache_stats().retained == 3 * MiB);
  CHECK(cache_stats().blocks == 1);
  const auto before = cache_stats();
  void* c2 = allocate(3 * MiB, Space::Host, Tag::Workspace);
  CHECK(c2 == c);
  CHECK(cache_stats().hits == before.hits + 1);
  void* a2 = allocate(1 * MiB, Space::Host, Tag::Workspace);  // evicted: a fresh block
  CHECK(cache_stats().misses == before.misses + 1);

  // A block over the limit is never kept.
  void* huge = allocate(5 * MiB, Space::Host, Tag::Workspace);
  deallocate(huge, 5 * MiB, Space::Host, Tag::Workspace);
  CHECK(cache_stats().retained == 0);

  // Lowering the limit frees what is over it now.
  deallocate(c2, 3 * MiB, Space::Host, Tag::Workspace);
  deallocate(a2, 1 * MiB, Space::Host, Tag::Workspace);
  CHECK(cache_stats().retained == 4 * MiB);
  set_host_cache_limit(2 * MiB);
  CHECK(cache_stats().retained <= 2 * MiB);
  CHECK(cache_stats().limit == 2 * MiB);
}

TEST_CASE("core: the host cache leaves the tracked accounting unchanged") {
  using namespace test_core;
  // The same allocations with the cache on and off: memory_stats sees the same requests.
  auto run = [](std::size_t limit) {
    CacheScope scope(limit);
    reset_peak(Space::Host);
    const auto base = memory_stats(Space::Host);
    std::vector<MemoryStats> seen;
    for (int round = 0; round < 3; ++round) {
      Buffer<float> p(1000, Space::Host, Tag::Parameters);
      {
        Buffer<char> act(3 * MiB + 5, Space::Host, Tag::Activations);
        Buffer<double> w(77, Space::Host, Tag::Workspace);
        seen.push_back(memory_stats(Space::Host));
      }
      seen.push_back(memory_stats(Space::Host));
    }
    for (auto& s : seen) {
      s.current -= base.current;
      s.peak -= base.current;
      for (int t = 0; t < num_tags; ++t) s.current_by_tag[t] -= base.current_by_tag[t];
    }
    CHECK(memory_stats(Space::Host).current == base.current);
    return seen;
  };
  const auto cached = run(64 * MiB), uncached = run(0);
  REQUIRE(cached.size() == uncached.size());
  for (std::size_t i = 0; i < cached.size(); ++i) {
    CHECK(cached[i].current == uncached[i].current);
    CHECK(cached[i].peak == uncached[i].peak);
    CHECK(cached[i].allocations == uncached[i].allocations);
    CHECK(cached[i].current_by_tag == uncached[i].current_by_tag);
  }
  CHECK(cached[0].current == 4000 + 3 * MiB + 5 + 616);
  CHECK(cached[1].current == 4000);
  CHECK(cached[5].peak == 4000 + 3 * MiB + 5 + 616);
}

TEST_CASE("core: release_cached_memory frees what the host cache holds") {
  using namespace test_core;
  CacheScope scope(64 * MiB);
  for (std::size_t n : {std::size_t(64), std::size_t(5000), 2 * MiB}) {
    void* p = allocate(n, Space::Host, Tag::Workspace);
    deallocate(p, n, Space::Host, Tag::Workspace);
  }
  const auto held = cache_stats();
  CHECK(held.blocks == 3);
  CHECK(held.retained == 64 + 5056 + 2 * MiB);
  CHECK(release_cached_memory(Space::Host) == held.retained);
  CHECK(cache_stats().retained == 0);
  CHECK(cache_stats().blocks == 0);
  CHECK(release_cached_memory(Space::Host) == 0);
  // A space without a cache (here: no CUDA backend) has nothing to release.
  CHECK(release_cached_memory(Space::Cuda) == 0);
  CHECK(cache_stats(Space::Cuda).limit == 0);
}

TEST_CASE("core: SSMX_HOST_CACHE_BYTES sets the cache limit and 0 turns it off") {
  using namespace test_core;
  using detail::host_cache_limit_from;
  CHECK(host_cache_limit_from("0") == 0);
  CHECK(host_cache_limit_from("12345") == 12345);
  CHECK(host_cache_limit_from("512M") == 512 * MiB);
  CHECK(host_cache_limit_from("2G") == std::size_t(2) << 30);
  CHECK(host_cache_limit_from("64k") == 64 * 1024);
  // Unset or empty: 1 GiB, or off under AddressSanitizer.
  CHECK(host_cache_limit_from(nullptr) == (SSMX_ASAN ? 0 : detail::default_host_cache_bytes));
  CHECK(host_cache_limit_from("") == host_cache_limit_from(nullptr));
  for (const char* bad : {"abc", "12X", "1.5G", "-1", " 1", "1GB", "99999999999999999999", "17179869184G"}) {
    auto m = message_of<ValueError>([&] { (void)host_cache_limit_from(bad); });
    CHECK(contains(m, "SSMX_HOST_CACHE_BYTES"));
    CHECK(contains(m, bad));
  }
  // A cache built from "0" keeps nothing.
  detail::HostCache off(host_cache_limit_from("0"));
  void* p = std::malloc(256);
  CHECK_FALSE(off.keep(p, 256));
  CHECK(off.take(256) == nullptr);
  CHECK(off.stats().retained == 0);
  std::free(p);
}

#if defined(_OPENMP)
TEST_CASE("core: the host cache is thread-safe under OpenMP") {
  using namespace test_core;
  CacheScope scope(8 * MiB);
  const auto base = memory_stats(Space::Host);
  const auto c0 = cache_stats();
  constexpr int threads = 4, rounds = 400, live = 3;
  const std::size_t sizes[] = {64, 200, 4096, 150000, MiB, 3 * MiB};
  long corrupted = 0;
#pragma omp parallel num_threads(threads) reduction(+ : corrupted)
  {
    const int id = omp_get_thread_num();
    std::mt19937 rng(unsigned(id) + 1);
    std::vector<std::pair<unsigned char*, std::size_t>> held;
    for (int r = 0; r < rounds; ++r) {
      const std::size_t n = sizes[rng() % 6];
      auto* p = static_cast<unsigned char*>(allocate(n, Space::Host, Tag::Workspace));
      std::memset(p, id + 1, n);
      held.emplace_back(p, n);
      if (held.size() > std::size_t(live)) {  // free one written a while ago, after checking it
        const auto [q, m] = held[rng() % held.size()];
        for (std::size_t i = 0; i < m; i += 61) corrupted += q[i] != id + 1;
        corrupted += q[m - 1] != id + 1;
        deallocate(q, m, Space::Host, Tag::Workspace);
        held.erase(std::find(held.begin(), held.end(), std::make_pair(q, m)));
      }
    }
    for (auto [q, m] : held) deallocate(q, m, Space::Host, Tag::Workspace);
  }
  CHECK(corrupted == 0);
  CHECK(memory_stats(Space::Host).current == base.current);
  const auto c1 = cache_stats();
  CHECK((c1.hits - c0.hits) + (c1.misses - c0.misses) == std::size_t(threads) * rounds);
  CHECK(c1.hits > c0.hits);
  CHECK(c1.retained <= c1.limit);
}
#endif

TEST_CASE("core: Space::Cuda without the CUDA backend throws DeviceError") {
  using namespace test_core;
  const auto cuda0 = memory_stats(Space::Cuda);
  auto m = message_of<DeviceError>([] { Tensor<float, Space::Cuda> t(Dims{8}); });
  CHECK(contains(m, "Cuda"));
  CHECK(contains(m, "cuda.cuh"));
  CHECK(memory_stats(Space::Cuda).current == cuda0.current);
  CHECK(memory_stats(Space::Cuda).allocations == cuda0.allocations);
  // DeviceError is an ssmx::Error is a std::runtime_error.
  CHECK_THROWS_AS((void)allocate(4, Space::Cuda, Tag::Workspace), Error);
}

#if !defined(__SANITIZE_ADDRESS__)  // ASan aborts on absurd sizes instead of returning null
TEST_CASE("core: an impossible host allocation throws OutOfMemoryError naming bytes and space") {
  using namespace test_core;
  const std::size_t huge = std::size_t(1) << 62;
  try {
    (void)allocate(huge, Space::Host, Tag::Activations);
    FAIL("allocation of 2^62 bytes succeeded");
  } catch (const OutOfMemoryError& e) {
    CHECK(e.requested_bytes() == huge);
    CHECK(e.space() == "Host");
    CHECK(contains(e.what(), std::to_string(huge)));
    CHECK(contains(e.what(), "Host"));
  }
}
#endif

TEST_CASE("core: error types and SSMX_REQUIRE") {
  using namespace test_core;
  static_assert(std::is_base_of_v<Error, ShapeError>);
  static_assert(std::is_base_of_v<Error, ValueError>);
  static_assert(std::is_base_of_v<Error, DeviceError>);
  static_assert(std::is_base_of_v<Error, OutOfMemoryError>);
  static_assert(std::is_base_of_v<Error, IOError>);
  static_assert(std::is_base_of_v<std::runtime_error, Error>);
  const int token = 70000, vocab = 50277;
  auto m = message_of<ValueError>(
      [&] { SSMX_REQUIRE(token < vocab, ValueError, "token id ", token, " >= vocabulary size ", vocab); });
  CHECK(m == "token id 70000 >= vocabulary size 50277");
  CHECK_NOTHROW(SSMX_REQUIRE(1 < vocab, ValueError, "unused"));
  const OutOfMemoryError oom(4096, "Cuda", "1024 bytes free");
  CHECK(std::string(oom.what()) == "out of memory: could not allocate 4096 bytes in memory space Cuda (1024 bytes free)");
}

TEST_CASE("core: dtype names and sizes and traits") {
  using namespace test_core;
  CHECK(dtype_v<float> == DType::f32);
  CHECK(dtype_v<double> == DType::f64);
  CHECK(dtype_v<bf16> == DType::bf16);
  CHECK(dtype_v<half> == DType::f16);
  CHECK(dtype_size(DType::f32) == 4);
  CHECK(dtype_size(DType::f64) == 8);
  CHECK(dtype_size(DType::bf16) == 2);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK(std::string(dtype_name(DType::bf16)) == "bfloat16");
  CHECK(std::string(dtype_name(DType::f16)) == "float16");
  static_assert(sizeof(bf16) == 2 && sizeof(half) == 2);
  static_assert(std::is_same_v<compute_t<bf16>, float>);
  static_assert(std::is_same_v<compute_t<double>, double>);
  static_assert(is_compute_type_v<float> && !is_compute_type_v<half>);
}

TEST_CASE("core: bf16 round trips every non-NaN bit pattern") {
  using namespace test_core;
  int mismatches = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    bf16 x;
    x.bits = static_cast<std::uint16_t>(b);
    const float f = x;
    if (f != f) continue;  // NaN payloads are tested separately
    CHECK(bits_of(f) == (b << 16));  // bf16 is the top half of a float
    if (bf16(f).bits != b) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("core: bf16 rounds to nearest even and keeps NaN and inf and signed zero and subnormals") {
  using namespace test_core;
  const float ulp = 1.0f / 128.0f;  // bf16 spacing in [1, 2)
  CHECK(float(bf16(1.0f + ulp / 2)) == 1.0f);               // tie -> even (1.0)
  CHECK(float(bf16(1.0f + 3 * ulp / 2)) == 1.0f + 2 * ulp);  // tie -> even (1 + 2 ulp)
  CHECK(float(bf16(1.0f + ulp / 2 + ulp / 64)) == 1.0f + ulp);  // above the tie -> up
  CHECK(float(bf16(1.0f + ulp / 2 - ulp / 64)) == 1.0f);        // below the tie -> down
  CHECK(float(bf16(-1.0f - 3 * ulp / 2)) == -1.0f - 2 * ulp);
  CHECK(float(bf16(3.14159265f)) == 3.140625f);

  const float inf = std::numeric_limits<float>::infinity();
  CHECK(float(bf16(inf)) == inf);
  CHECK(float(bf16(-inf)) == -inf);
  CHECK(float(bf16(std::numeric_limits<float>::max())) == inf);  // beyond the last bf16 + half an ulp
  const float nan_in = std::numeric_limits<float>::quiet_NaN();
  const float nan_out = bf16(nan_in);
  CHECK(nan_out != nan_out);
  const float snan = float_of(0x7f800001u);  // payload only in the low bits: must not become inf
  const bf16 from_snan(snan);
  CHECK((from_snan.bits & 0x7f80u) == 0x7f80u);
  CHECK((from_snan.bits & 0x007fu) != 0u);
  CHECK(bf16(-0.0f).bits == 0x8000u);
  const float sub = float_of(0x00080000u);  // 2^-130: a float subnormal, exact in bf16
  CHECK(float(bf16(sub)) == sub);
  CHECK(float(bf16(float_of(0x00000001u))) == 0.0f);  // 2^-149 rounds to +0
}

TEST_CASE("core: half round trips every non-NaN bit pattern") {
  using namespace test_core;
  int mismatches = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    half x;
    x.bits = static_cast<std::uint16_t>(b);
    const float f = x;
    if (f != f) continue;
    if (half(f).bits != b) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("core: half rounds to nearest even in the normal and subnormal range") {
  using namespace test_core;
  const float ulp = 1.0f / 1024.0f;  // half spacing in [1, 2)
  CHECK(float(half(1.0f + ulp / 2)) == 1.0f);
  CHECK(float(half(1.0f + 3 * ulp / 2)) == 1.0f + 2 * ulp);
  CHECK(float(half(1.0f + ulp / 2 + ulp / 64)) == 1.0f + ulp);
  CHECK(float(half(0.1f)) == 0.0999755859375f);
  CHECK(half(65504.0f).bits == 0x7bffu);  // largest finite
  CHECK(half(65519.0f).bits == 0x7bffu);  // below the tie with 65536
  CHECK(half(65520.0f).bits == 0x7c00u);  // the tie goes to even: inf
  CHECK(half(1e6f).bits == 0x7c00u);
  CHECK(half(-1e6f).bits == 0xfc00u);

  const float tiny = 1.0f / 16777216.0f;  // 2^-24, the smallest subnormal
  CHECK(half(tiny).bits == 0x0001u);
  CHECK(half(tiny / 2).bits == 0x0000u);         // tie between 0 and 1 -> even (0)
  CHECK(half(tiny * 1.5f).bits == 0x0002u);      // tie between 1 and 2 -> even (2)
  CHECK(half(tiny * 2.5f).bits == 0x0002u);      // tie between 2 and 3 -> even (2)
  CHECK(half(tiny / 2 * 1.01f).bits == 0x0001u);  // just above the tie
  CHECK(half(tiny / 4).bits == 0x0000u);
  CHECK(half(-tiny / 4).bits == 0x8000u);  // keeps the sign of zero
  CHECK(float(half(6.103515625e-05f)) == 6.103515625e-05f);  // 2^-14, the smallest normal
  CHECK(float(half(tiny * 1023)) == tiny * 1023);            // the largest subnormal

  const float inf = std::numeric_limits<float>::infinity();
  CHECK(half(inf).bits == 0x7c00u);
  CHECK(half(-inf).bits == 0xfc00u);
  const float nan_out = half(std::numeric_limits<float>::quiet_NaN());
  CHECK(nan_out != nan_out);
  const half from_snan(float_of(0x7f800001u));  // payload only in low bits: must stay NaN
  CHECK((from_snan.bits & 0x7c00u) == 0x7c00u);
  CHECK((from_snan.bits & 0x03ffu) != 0u);
  CHECK(half(-0.0f).bits == 0x8000u);
}

TEST_CASE("core: storage-type tensors") {
  using namespace test_core;
  Tensor<bf16> t(Dims{3});
  t[0] = 1.0f;
  t[1] = -2.5f;
  t[2] = 1.0f + 1.0f / 256;  // tie -> 1.0
  CHECK(float(t[1]) == -2.5f);
  CHECK(float(t[2]) == 1.0f);
  CHECK(t.bytes() == 6);
  auto h = ssmx::test::uniform<half>(Dims{2, 2}, 3);
  for (index_t i = 0; i < h.numel(); ++i) CHECK(std::fabs(float(h[i])) <= 1.0f);
}

TEST_CASE("core: Eigen map of a tensor aliases its memory") {
  using namespace test_core;
  auto t = iota(Dims{2, 3});
  auto m = as_eigen(t);
  CHECK(m.rows() == 2);
  CHECK(m.cols() == 3);
  CHECK(m.data() == t.data());
  CHECK(m(1, 2) == 5.0f);
  m(0, 1) = 42.0f;
  CHECK(t(0, 1) == 42.0f);
  t(1, 0) = -7.0f;
  CHECK(m(1, 0) == -7.0f);

  const auto& ct = t;
  auto cm = as_eigen(ct);
  static_assert(std::is_const_v<std::remove_pointer_t<decltype(cm.data())>>, "a map of a const tensor is read-only");
  CHECK(cm.sum() == 0.0f + 42.0f + 2.0f - 7.0f + 4.0f + 5.0f);

  // A column block (strided rows) maps with an outer stride.
  auto big = iota(Dims{3, 4});
  auto block = as_eigen(big.view().slice(1, 1, 3));
  CHECK(block.rows() == 3);
  CHECK(block.cols() == 2);
  CHECK(block.outerStride() == 4);
  block.setZero();
  CHECK(big(2, 1) == 0.0f);
  CHECK(big(2, 3) == 11.0f);

  // A rank-1 tensor is a row.
  auto v = iota(Dims{5});
  CHECK(as_eigen(v).rows() == 1);
  CHECK(as_eigen(v).sum() == 10.0f);

  auto msg = message_of<ShapeError>([] {
    auto t3 = iota(Dims{2, 2, 2});
    (void)as_eigen(t3);
  });
  CHECK(contains(msg, "[2, 2, 2]"));
  msg = message_of<ShapeError>([&] {
    TensorView<float> strided_last(big.data(), Dims{2, 2}, {4, 2, 0, 0});
    (void)as_eigen(strided_last);
  });
  CHECK(contains(msg, "contiguous"));
}

TEST_CASE("core: a tensor view of an Eigen matrix aliases its memory") {
  using namespace test_core;
  RowMatrix<double> r(2, 3);
  r << 1, 2, 3, 4, 5, 6;
  auto rv = view_of(r);
  CHECK(rv.dims() == Dims{2, 3});
  CHECK(rv.data() == r.data());
  CHECK(rv.is_contiguous());
  CHECK(rv(1, 2) == 6.0);
  rv(0, 0) = -1.0;
  CHECK(r(0, 0) == -1.0);

  Eigen::MatrixXf c(2, 3);  // column-major
  c << 1, 2, 3, 4, 5, 6;
  auto cv = view_of(c);
  CHECK(cv.dims() == Dims{2, 3});
  CHECK(cv.stride(0) == 1);
  CHECK(cv.stride(1) == 2);
  CHECK(!cv.is_contiguous());
  CHECK(cv(1, 0) == 4.0f);
  CHECK(cv(0, 2) == 3.0f);
  cv(1, 2) = 60.0f;
  CHECK(c(1, 2) == 60.0f);
  CHECK(to_vector(cv) == std::vector<float>{1, 2, 3, 4, 5, 60});  // row-major order

  // Both directions: Eigen -> view -> Eigen lands on the same memory.
  auto back = as_eigen(rv);
  back(1, 1) = 50.0;
  CHECK(r(1, 1) == 50.0);
}

TEST_CASE("core: test support helpers") {
  using namespace test_core;
  using ssmx::test::max_rel_err;
  CHECK(max_rel_err(std::vector<double>{1, 2, 4}, std::vector<double>{1, 2, 4}) == 0.0);
  CHECK(max_rel_err(std::vector<double>{1, 2, 4}, std::vector<double>{1, 2, 5}) == doctest::Approx(0.2));
  CHECK(max_rel_err(std::vector<float>{0}, std::vector<double>{0}) == 0.0);
  CHECK(max_rel_err(std::vector<double>{1}, std::vector<double>{1, 2}) == std::numeric_limits<double>::infinity());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(max_rel_err(std::vector<double>{nan}, std::vector<double>{nan}) == 0.0);
  CHECK(max_rel_err(std::vector<double>{nan}, std::vector<double>{1}) == std::numeric_limits<double>::infinity());

  auto a = ssmx::test::normal<double>(Dims{1000}, 42);
  auto b = ssmx::test::normal<double>(Dims{1000}, 42);
  auto c = ssmx::test::normal<double>(Dims{1000}, 43);
  CHECK(to_vector(a) == to_vector(b));  // same seed, same numbers
  CHECK(to_vector(a) != to_vector(c));
  double mean = 0;
  for (index_t i = 0; i < a.numel(); ++i) mean += a[i];
  mean /= double(a.numel());
  CHECK(std::fabs(mean) < 0.2);
  auto u = ssmx::test::uniform<float>(Dims{100}, 1, 2.0, 3.0);
  for (index_t i = 0; i < u.numel(); ++i) {
    CHECK(u[i] >= 2.0f);
    CHECK(u[i] <= 3.0f);
  }
}

#endif  // !SSMX_TEST_CUDA
