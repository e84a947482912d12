// ssmx — the safetensors file format (https://github.com/huggingface/safetensors):
//
//     [u64 little-endian N] [N bytes of JSON header, space-padded] [data buffer]
//     header: {"<tensor>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//              "__metadata__": {"<key>": "<value>", ...}}
//
// Offsets are relative to the start of the data buffer, values are little-endian and
// row-major. SafetensorsFile validates the whole header against the file size before it
// reads any tensor, as strictly as the format's reference implementation: the header is a
// JSON object that begins with '{' and is padded with spaces only, every name appears
// once, and the tensors fill the data buffer exactly (no overlaps, holes or trailing
// bytes). SafetensorsWriter writes a temporary file and renames it over the target, so a
// reader never sees a half-written file.
//
// Needs nlohmann_json (CMake target ssmx::io) and POSIX (pread, fsync, rename).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "file.hpp"
#include "json.hpp"

namespace ssmx::io {

// The header string of a floating dtype ssmx computes or stores in: F32, F64, BF16, F16.
inline const char* safetensors_dtype(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
  }
  return "?";
}

// The floating dtype named by a header string, if it is one ssmx converts from.
inline std::optional<DType> parse_float_dtype(const std::string& s) {
  for (DType d : {DType::f32, DType::f64, DType::bf16, DType::f16})
    if (s == safetensors_dtype(d)) return d;
  return std::nullopt;
}

namespace detail {

using ::ssmx::detail::bits_float;
using ::ssmx::detail::float_bits;
using ::ssmx::detail::str;

// Every dtype of the format with its element size. Non-float tensors can be listed but not read.
struct SafetensorsDtype {
  const char* name;
  std::uint64_t bytes;
};
inline constexpr SafetensorsDtype safetensors_dtypes[] = {
    {"F64", 8},  {"F32", 4},     {"F16", 2},     {"BF16", 2},    {"I64", 8}, {"I32", 4},
    {"I16", 2},  {"I8", 1},      {"U64", 8},     {"U32", 4},     {"U16", 2}, {"U8", 1},
    {"BOOL", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"C64", 8}};

// Element size of a header dtype; 0 if the string names none.
inline std::uint64_t safetensors_dtype_bytes(const std::string& s) {
  for (const auto& d : safetensors_dtypes)
    if (s == d.name) return d.bytes;
  return 0;
}

inline std::string safetensors_dtype_list() {
  std::string out;
  for (const auto& d : safetensors_dtypes) out += (out.empty() ? "" : ", ") + std::string(d.name);
  return out;
}

// "[2, 3]" for a shape given as a vector.
inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline bool same_shape(const std::vector<std::int64_t>& shape, const Dims& d) {
  if (shape.size() != std::size_t(d.rank)) return false;
  for (int i = 0; i < d.rank; ++i)
    if (shape[std::size_t(i)] != d[i]) return false;
  return true;
}

// Little-endian loads and stores, independent of the host's byte order.
inline std::uint64_t load_le(const unsigned char* p, int bytes) {
  std::uint64_t u = 0;
  for (int i = bytes - 1; i >= 0; --i) u = (u << 8) | p[i];
  return u;
}
inline void store_le(unsigned char* p, std::uint64_t u, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<unsigned char>(u >> (8 * i));
}

// One stored element of dtype d at p, as T.
template <class T>
T decode(const unsigned char* p, DType d) {
  switch (d) {
    case DType::f32: return T(bits_float(std::uint32_t(load_le(p, 4))));
    case DType::f64: {
      const std::uint64_t u = load_le(p, 8);
      double x;
      std::memcpy(&x, &u, 8);
      return T(x);
    }
    case DType::bf16: {
      bf16 b;
      b.bits = std::uint16_t(load_le(p, 2));
      return T(float(b));
    }
    case DType::f16: {
      half h;
      h.bits = std::uint16_t(load_le(p, 2));
      return T(float(h));
    }
  }
  return T(0);
}

// Stores x as dtype d at p. A double goes to bf16/f16 through float (rounded twice; the
// second rounding dominates and this is what a float model's weights go through anyway).
template <class T>
void encode(T x, DType d, unsigned char* p) {
  switch (d) {
    case DType::f32: store_le(p, float_bits(float(x)), 4); return;
    case DType::f64: {
      const double v = double(x);
      std::uint64_t u;
      std::memcpy(&u, &v, 8);
      store_le(p, u, 8);
      return;
    }
    case DType::bf16: store_le(p, bf16(float(x)).bits, 2); return;
    case DType::f16: store_le(p, half(float(x)).bits, 2); return;
  }
}

// Calls f(k, offset) for every element of a (possibly strided) view of rank <= 4: k is the
// row-major position, offset the element offset given by the strides.
template <class F>
void for_each_element(const Dims& d, const std::array<index_t, max_rank>& strides, F&& f) {
  std::array<index_t, max_rank> e{1, 1, 1, 1}, s{0, 0, 0, 0};
  for (int i = 0; i < d.rank; ++i) {
    e[std::size_t(max_rank - d.rank + i)] = d[i];
    s[std::size_t(max_rank - d.rank + i)] = strides[std::size_t(i)];
  }
  index_t k = 0;
  for (index_t i0 = 0; i0 < e[0]; ++i0)
    for (index_t i1 = 0; i1 < e[1]; ++i1)
      for (index_t i2 = 0; i2 < e[2]; ++i2)
        for (index_t i3 = 0; i3 < e[3]; ++i3) f(k++, i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3]);
}

}  // namespace detail

// One tensor of a safetensors header.
struct TensorInfo {
  std::string name;
  std::string dtype;                 // as in the header: "F32", "BF16", "I64", ...
  std::vector<std::int64_t> shape;   // any rank; ssmx tensors take rank <= 4
  std::uint64_t begin = 0, end = 0;  // data_offsets, relative to the data buffer

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }
  // Set for the dtypes read() converts from: F32, F64, BF16, F16.
  std::optional<DType> float_dtype() const { return parse_float_dtype(dtype); }
  std::string shape_str() const { return detail::shape_str(shape); }
};

// A safetensors file opened for reading. open() reads and validates the header; read()
// fetches one tensor with pread, so reads may run concurrently. The file stays open: a
// writer that renames a new file over the path does not disturb an open reader.
class SafetensorsFile {
 public:
  // Largest header accepted, as in the reference implementation: a corrupt length must
  // not make us allocate gigabytes.
  static constexpr std::uint64_t max_header_bytes = 100'000'000;
  // Deepest nesting accepted in a header (a valid one needs 3: entry, shape).
  static constexpr int max_header_depth = 16;

  // Opens `path` (a regular file; see file.hpp) and validates the header: its length
  // against the file size, the JSON (an object that begins with '{', padded with spaces
  // only, no name twice, nesting bounded), every entry's dtype/shape/data_offsets (types,
  // extents that fit int64, byte counts, bounds), the layout of the data buffer (tensors
  // fill it exactly: no overlaps, holes or trailing bytes) and __metadata__ (string
  // values). Throws IOError naming the file and the field.
  static SafetensorsFile open(const std::string& path) {
    SafetensorsFile f;
    f.path_ = path;
    std::uint64_t size = 0;
    f.fd_ = detail::open_regular(path, size);
    SSMX_REQUIRE(size >= 8, IOError, path, ": file is ", size,
                 " bytes, too short for the 8-byte header length of a safetensors file");
    unsigned char len[8];
    detail::pread_all(f.fd_.get(), len, 8, 0, path, "the header length");
    const std::uint64_t n = detail::load_le(len, 8);
    SSMX_REQUIRE(n <= max_header_bytes, IOError, path, ": header length ", n, " exceeds the limit of ",
                 max_header_bytes, " bytes (not a safetensors file, or corrupt)");
    SSMX_REQUIRE(n <= size - 8, IOError, path, ": header length ", n, " is past the end of the file (", size - 8,
                 " bytes after the length field; truncated?)");
    std::string header(std::size_t(n), '\0');
    detail::pread_all(f.fd_.get(), header.data(), n, 8, path, "the header");
    f.data_start_ = 8 + n;
    f.data_bytes_ = size - f.data_start_;
    f.parse_header(header);
    return f;
  }

  const std::string& path() const noexcept { return path_; }
  // Every tensor, in the order of its data in the file.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // The header entry of `name`; ValueError naming the file and the tensor if absent.
  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    SSMX_REQUIRE(it != index_.end(), ValueError, path_, ": no tensor \"", detail::printable(name), "\" in the file (",
                 tensors_.size(), " tensors)");
    return tensors_[it->second];
  }
  // Bytes of the data buffer (the file size less the header).
  std::uint64_t data_bytes() const noexcept { return data_bytes_; }

  // Reads tensor `name` into `dst` (any strides), converting F32/F64/BF16/F16 to T. The
  // file's shape must equal dst's extents (ShapeError) and every value must be finite as
  // a T (ValueError naming the index). dst is written only after all checks passed.
  template <class T>
  void read(const std::string& name, TensorView<T> dst) const {
    static_assert(is_compute_type_v<T>, "SafetensorsFile::read: T must be float or double");
    const TensorInfo& ti = info(name);
    SSMX_REQUIRE(detail::same_shape(ti.shape, dst.dims()), ShapeError, path_, ": tensor \"", detail::printable(name),
                 "\" has shape ", ti.shape_str(), " in the file, but the destination has shape ", dst.dims().str());
    const std::vector<unsigned char> raw = read_checked<T>(ti);
    const DType d = *ti.float_dtype();
    const auto bytes = std::size_t(dtype_size(d));
    detail::for_each_element(dst.dims(), dst.strides(), [&](index_t k, index_t off) {
      dst.data()[off] = detail::decode<T>(raw.data() + std::size_t(k) * bytes, d);
    });
  }

  // Tensor `name` as a new host tensor of the file's shape (rank <= 4).
  template <class T>
  Tensor<T> read(const std::string& name, Tag tag = Tag::Parameters) const {
    const TensorInfo& ti = info(name);
    SSMX_REQUIRE(ti.shape.size() <= std::size_t(max_rank), ShapeError, path_, ": tensor \"", detail::printable(name),
                 "\" has shape ", ti.shape_str(), " of rank ", ti.shape.size(),
                 "; ssmx tensors have rank <= ", max_rank);
    Dims d;
    d.rank = int(ti.shape.size());
    for (int i = 0; i < d.rank; ++i) d[i] = ti.shape[std::size_t(i)];
    Tensor<T> t(d, tag);
    read<T>(name, t.view());
    return t;
  }

  // An integer or BOOL tensor (token ids, masks), row-major, as int64. ValueError naming
  // the tensor for another dtype, or for a U64 value beyond int64.
  std::vector<std::int64_t> read_int64(const std::string& name) const {
    const TensorInfo& ti = info(name);
    const bool is_signed = ti.dtype == "I8" || ti.dtype == "I16" || ti.dtype == "I32" || ti.dtype == "I64";
    const bool is_unsigned =
        ti.dtype == "U8" || ti.dtype == "U16" || ti.dtype == "U32" || ti.dtype == "U64" || ti.dtype == "BOOL";
    SSMX_REQUIRE(is_signed || is_unsigned, ValueError, where(name), "dtype ", ti.dtype,
                 " is not an integer dtype (I8..I64, U8..U64 or BOOL)");
    const int bytes = int(detail::safetensors_dtype_bytes(ti.dtype));
    std::vector<unsigned char> raw(std::size_t(ti.end - ti.begin));
    detail::pread_all(fd_.get(), raw.data(), raw.size(), data_start_ + ti.begin, path_,
                      detail::str("tensor \"", detail::printable(name), "\""));
    std::vector<std::int64_t> out(raw.size() / std::size_t(bytes));
    for (std::size_t k = 0; k < out.size(); ++k) {
      const std::uint64_t u = detail::load_le(raw.data() + k * std::size_t(bytes), bytes);
      if (is_signed) {
        const std::uint64_t sign = std::uint64_t(1) << (8 * bytes - 1);  // of the stored width
        out[k] = (u & sign) ? -std::int64_t(~u & (sign - 1)) - 1 : std::int64_t(u);
      } else {
        SSMX_REQUIRE(u <= std::uint64_t(std::numeric_limits<std::int64_t>::max()), ValueError, where(name), "value ", u,
                     " at index ", k, " does not fit in int64");
        out[k] = std::int64_t(u);
      }
    }
    return out;
  }

 private:
  SafetensorsFile() = default;

  std::string where(const std::string& tensor) const {
    return detail::str(path_, ": tensor \"", detail::printable(tensor), "\": ");
  }

  void parse_header(const std::string& header) {
    // The format's own rules: the JSON begins with '{' and only spaces may follow it.
    SSMX_REQUIRE(!header.empty() && header[0] == '{', IOError, path_, ": the header begins with ",
                 header.empty() ? std::string("nothing (its length is 0)") : byte_text(header[0]),
                 ", expected '{' (a JSON object)");
    std::size_t end = header.size();
    while (end > 0 && header[end - 1] == ' ') --end;
    SSMX_REQUIRE(end > 0 && header[end - 1] == '}', IOError, path_, ": the header's padding holds ",
                 byte_text(header[end - 1]), " at byte ", end - 1,
                 " of the header; after the JSON object only spaces (0x20) may follow");
    const nlohmann::json h = parse_json(header.substr(0, end), path_, "the header", max_header_depth);
    SSMX_REQUIRE(h.is_object(), IOError, path_, ": the header is a JSON ", h.type_name(),
                 ", expected an object of tensors");

    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == "__metadata__") {
        parse_metadata(it.value());
        continue;
      }
      tensors_.push_back(parse_entry(it.key(), it.value()));
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    // Sorted by offsets, the tensors must follow each other without a gap from byte 0 to
    // the end of the buffer, as the reference implementation requires: an overlap lets two
    // names share bytes, a hole or a tail hides bytes no reader looks at.
    std::uint64_t next = 0;
    const TensorInfo* prev = nullptr;
    for (const auto& t : tensors_) {
      SSMX_REQUIRE(t.begin >= next, IOError, where(t.name), "data_offsets [", t.begin, ", ", t.end,
                   "] overlap those of tensor \"", detail::printable(prev ? prev->name : ""), "\" [",
                   prev ? prev->begin : 0, ", ", prev ? prev->end : 0, "]");
      SSMX_REQUIRE(t.begin == next, IOError, where(t.name), "data_offsets [", t.begin, ", ", t.end,
                   "] leave a hole in the data buffer: bytes [", next, ", ", t.begin, ") belong to no tensor",
                   prev ? " (the previous tensor, \"" + detail::printable(prev->name) + "\", ends at " +
                              std::to_string(prev->end) + ")"
                        : std::string(" (the first tensor must begin at 0)"));
      next = t.end;
      prev = &t;
    }
    SSMX_REQUIRE(next == data_bytes_, IOError, path_, ": the data buffer holds ", data_bytes_, " bytes, but its ",
                 tensors_.size(), " tensors end at byte ", next, ": ", data_bytes_ - next,
                 " trailing bytes belong to no tensor");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  static std::string byte_text(char c) {
    const auto u = static_cast<unsigned char>(c);
    const std::string hex = detail::str("0x", "0123456789abcdef"[u >> 4], "0123456789abcdef"[u & 15]);
    return u >= 0x20 && u < 0x7f ? detail::str("'", c, "' (", hex, ")") : "byte " + hex;
  }

  void parse_metadata(const nlohmann::json& m) {
    if (m.is_null()) return;  // what serde writes for "no metadata"
    SSMX_REQUIRE(m.is_object(), IOError, path_, ": field \"__metadata__\" is a JSON ", m.type_name(),
                 ", expected an object of strings");
    for (auto it = m.begin(); it != m.end(); ++it) {
      SSMX_REQUIRE(it.value().is_string(), IOError, path_, ": field \"__metadata__\": key \"",
                   detail::printable(it.key()), "\" has the ", it.value().type_name(), " value ",
                   detail::json_excerpt(it.value()), ", expected a string");
      metadata_.emplace(it.key(), it.value().get<std::string>());
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& e) const {
    const std::string at = where(name);
    SSMX_REQUIRE(e.is_object(), IOError, at, "the entry is a JSON ", e.type_name(),
                 ", expected an object with dtype, shape and data_offsets");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      SSMX_REQUIRE(e.contains(field), IOError, at, "field \"", field, "\" is missing");
    TensorInfo t;
    t.name = name;

    const auto& dt = e.at("dtype");
    SSMX_REQUIRE(dt.is_string(), IOError, at, "field \"dtype\" is ", detail::json_excerpt(dt), ", expected a string");
    t.dtype = dt.get<std::string>();
    const std::uint64_t elem = detail::safetensors_dtype_bytes(t.dtype);
    SSMX_REQUIRE(elem != 0, IOError, at, "field \"dtype\" is \"", detail::printable(t.dtype), "\", expected one of ",
                 detail::safetensors_dtype_list());

    const auto& sh = e.at("shape");
    bool shape_ok = sh.is_array();
    if (shape_ok)
      for (const auto& x : sh) shape_ok = shape_ok && x.is_number_unsigned();
    SSMX_REQUIRE(shape_ok, IOError, at, "field \"shape\" is ", detail::json_excerpt(sh),
                 ", expected an array of non-negative integers");
    constexpr auto int64_max = std::uint64_t(std::numeric_limits<std::int64_t>::max());
    std::uint64_t bytes = elem;
    for (std::size_t k = 0; k < sh.size(); ++k) {
      const auto v = sh[k].get<std::uint64_t>();
      // Each extent on its own: after a 0 the product stays 0, whatever follows.
      SSMX_REQUIRE(v <= int64_max, IOError, at, "field \"shape\": extent ", k, " is ", v,
                   ", which does not fit int64 (at most ", int64_max, ")");
      SSMX_REQUIRE(v == 0 || bytes <= int64_max / v, IOError, at, "field \"shape\" ", detail::json_excerpt(sh),
                   " is too large (the byte count overflows)");
      bytes *= v;
      t.shape.push_back(std::int64_t(v));
    }

    const auto& off = e.at("data_offsets");
    SSMX_REQUIRE(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                 IOError, at, "field \"data_offsets\" is ", detail::json_excerpt(off),
                 ", expected [begin, end] with non-negative integers");
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    SSMX_REQUIRE(t.begin <= t.end, IOError, at, "data_offsets [", t.begin, ", ", t.end, "] end before they begin");
    SSMX_REQUIRE(t.end <= data_bytes_, IOError, at, "data_offsets [", t.begin, ", ", t.end,
                 "] past the end of the data (", data_bytes_, " bytes)");
    SSMX_REQUIRE(t.end - t.begin == bytes, IOError, at, "data_offsets [", t.begin, ", ", t.end, "] hold ",
                 t.end - t.begin, " bytes, but shape ", t.shape_str(), " of ", t.dtype, " needs ", bytes);
    return t;
  }

  // The raw bytes of a float tensor, after checking that every element is finite as a T.
  template <class T>
  std::vector<unsigned char> read_checked(const TensorInfo& ti) const {
    const auto d = ti.float_dtype();
    SSMX_REQUIRE(d.has_value(), ValueError, where(ti.name), "dtype ", ti.dtype, " cannot be read as ",
                 dtype_name(dtype_v<T>), " (readable: F32, F64, BF16, F16)");
    std::vector<unsigned char> raw(std::size_t(ti.end - ti.begin));
    detail::pread_all(fd_.get(), raw.data(), raw.size(), data_start_ + ti.begin, path_,
                      detail::str("tensor \"", detail::printable(ti.name), "\""));
    const auto bytes = std::size_t(dtype_size(*d));
    for (std::size_t k = 0; k * bytes < raw.size(); ++k) {
      const T x = detail::decode<T>(raw.data() + k * bytes, *d);
      SSMX_REQUIRE(std::isfinite(x), ValueError, where(ti.name), "non-finite value ", x, " at index ", k, " (",
                   ti.dtype, " read as ", dtype_name(dtype_v<T>), "; NaN and Inf are rejected)");
    }
    return raw;
  }

  std::string path_;
  detail::FileDescriptor fd_;
  std::uint64_t data_start_ = 0, data_bytes_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (by view) and metadata, then writes one safetensors file atomically.
// The views must stay valid and unchanged until write(). Tensors are laid out as the
// reference implementation does (larger dtypes first, then by name), so every tensor is
// aligned to its element size; the header is space-padded to a multiple of 8 bytes.
class SafetensorsWriter {
 public:
  // Adds `value` (float or double, any strides) under `name`, stored as `stored` (default:
  // T's own dtype; F32, F64, BF16 or F16). ValueError for an empty, reserved or repeated name.
  template <class T>
  void add(const std::string& name, TensorView<T> value, std::optional<DType> stored = std::nullopt) {
    using V = std::remove_const_t<T>;
    static_assert(is_compute_type_v<V>, "SafetensorsWriter::add: T must be float or double");
    SSMX_REQUIRE(!name.empty(), ValueError, "SafetensorsWriter: a tensor name must not be empty");
    SSMX_REQUIRE(name != "__metadata__", ValueError,
                 "SafetensorsWriter: \"__metadata__\" is reserved, not a tensor name");
    for (const auto& e : entries_)
      SSMX_REQUIRE(e.name != name, ValueError, "SafetensorsWriter: tensor \"", name, "\" added twice");
    entries_.push_back(Entry{name, stored.value_or(dtype_v<V>), TensorView<const V>(value)});
  }
  template <class T>
  void add(const std::string& name, const Tensor<T>& value, std::optional<DType> stored = std::nullopt) {
    add(name, value.view(), stored);
  }
  // The writer keeps a view until write(): a temporary tensor would be gone by then.
  template <class T>
  void add(const std::string& name, Tensor<T>&& value, std::optional<DType> stored = std::nullopt) = delete;

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  // Writes the file (see AtomicFile): on an exception `path` keeps its old content.
  // ValueError naming the file, the tensor and the index, before the file is touched, for
  // a value that is not finite once stored (NaN, Inf, or beyond the range of F16/BF16):
  // the reader would reject it.
  void write(const std::string& path) const {
    for (const auto& e : entries_) {
      std::visit(
          [&](const auto& v) {
            detail::for_each_element(v.dims(), v.strides(), [&](index_t k, index_t off) {
              unsigned char b[8];
              detail::encode(v.data()[off], e.stored, b);
              SSMX_REQUIRE(std::isfinite(detail::decode<double>(b, e.stored)), ValueError, path, ": tensor \"", e.name,
                           "\": value ", v.data()[off], " at index ", k, " is not finite as ",
                           safetensors_dtype(e.stored));
            });
          },
          e.view);
    }
    std::vector<const Entry*> order;
    for (const auto& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      const auto sa = dtype_size(a->stored), sb = dtype_size(b->stored);
      return sa != sb ? sa > sb : a->name < b->name;
    });

    nlohmann::json h = nlohmann::json::object();
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      const Dims dims = std::visit([](const auto& v) { return v.dims(); }, e->view);
      const std::vector<std::int64_t> shape(dims.extent.begin(), dims.extent.begin() + dims.rank);
      const std::uint64_t bytes = std::uint64_t(dims.numel()) * dtype_size(e->stored);
      h[e->name] = {{"dtype", safetensors_dtype(e->stored)},
                    {"shape", shape},
                    {"data_offsets", nlohmann::json::array({offset, offset + bytes})}};
      offset += bytes;
    }
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::string header;
    try {
      header = h.dump();
    } catch (const nlohmann::json::type_error& e) {
      throw ValueError(
          detail::str(path, ": a tensor name or metadata entry is not valid UTF-8 (", detail::json_error_text(e), ")"));
    }
    header.append((8 - header.size() % 8) % 8, ' ');

    AtomicFile out(path);
    unsigned char len[8];
    detail::store_le(len, header.size(), 8);
    out.write(len, 8);
    out.write(header.data(), header.size());
    // Encoded through a fixed buffer: the file never needs a second copy of the model in memory.
    std::vector<unsigned char> chunk(chunk_bytes);
    std::size_t used = 0;
    for (const Entry* e : order) {
      std::visit(
          [&](const auto& v) {
            const auto size = dtype_size(e->stored);
            detail::for_each_element(v.dims(), v.strides(), [&](index_t, index_t off) {
              if (used + size > chunk.size()) {
                out.write(chunk.data(), used);
                used = 0;
              }
              detail::encode(v.data()[off], e->stored, chunk.data() + used);
              used += size;
            });
          },
          e->view);
    }
    out.write(chunk.data(), used);
    out.commit();
  }

 private:
  static constexpr std::size_t chunk_bytes = std::size_t(1) << 20;  // a multiple of every element size
  struct Entry {
    std::string name;
    DType stored;
    std::variant<TensorView<const float>, TensorView<const double>> view;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace ssmx::io
