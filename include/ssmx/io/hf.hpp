// ssmx — Hugging Face-style checkpoint directories: config.json, and the weights in
// model.safetensors or in shards listed by model.safetensors.index.json. load_parameters()
// maps a model's parameter names to the names in the file and copies the tensors in.
//
// Generic on purpose: the name and config mapping of a particular architecture lives with
// that model (e.g. nn/mamba.hpp). Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../nn/parameter.hpp"
#include "safetensors.hpp"

namespace ssmx::io {

// Parses the JSON file at `path`. IOError naming the file when it cannot be read, or when
// it is not valid JSON (with the byte offset of the error).
inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SSMX_REQUIRE(in, IOError, path, ": cannot open: ", detail::errno_text(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  SSMX_REQUIRE(!in.bad(), IOError, path, ": cannot read: ", detail::errno_text(errno));
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw IOError(detail::str(path, ": not valid JSON: error at byte ", e.byte, ": ", detail::json_error_text(e)));
  }
}

// Field `key` of a JSON object (a config.json) as T: bool, an integer type, a floating
// type or std::string. IOError naming the file, the field, the expected type and what was
// found when it is absent, of another type, or out of T's range.
template <class T>
T json_field(const nlohmann::json& obj, const std::string& key, const std::string& file) {
  SSMX_REQUIRE(obj.is_object(), IOError, file, ": expected a JSON object holding field \"", key, "\", found a ",
               obj.type_name());
  auto it = obj.find(key);
  SSMX_REQUIRE(it != obj.end(), IOError, file, ": field \"", key, "\" is missing");
  const nlohmann::json& v = *it;
  const auto bad = [&](const char* expected) {
    return IOError(detail::str(file, ": field \"", key, "\" is ", detail::json_excerpt(v), ", expected ", expected));
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) throw bad("true or false");
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer()) throw bad("an integer");
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > std::uint64_t(std::numeric_limits<T>::max())) throw bad("an integer in range");
      return T(u);
    }
    const auto s = v.get<std::int64_t>();
    if (s < std::int64_t(std::numeric_limits<T>::min())) throw bad("an integer in range");
    return T(s);
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) throw bad("a number");
    return v.get<T>();
  } else {
    static_assert(std::is_same_v<T, std::string>,
                  "json_field: T must be bool, an integer, a floating type or std::string");
    if (!v.is_string()) throw bad("a string");
    return v.get<std::string>();
  }
}

// The same with a default for an absent (or null) field; a present field of the wrong
// type still throws.
template <class T>
T json_field(const nlohmann::json& obj, const std::string& key, const std::string& file, T fallback) {
  if (obj.is_object()) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
  }
  return json_field<T>(obj, key, file);
}

// The weights of a Hugging Face checkpoint: one safetensors file, or several shards and
// the index {"weight_map": {"<tensor>": "<shard file name>"}} that says which holds what.
// All files are opened (and their headers validated) up front.
class SafetensorsShards {
 public:
  static constexpr const char* index_name = "model.safetensors.index.json";
  static constexpr const char* single_name = "model.safetensors";

  // `dir`/model.safetensors.index.json if it exists, else `dir`/model.safetensors.
  static SafetensorsShards open_dir(const std::string& dir) {
    namespace fs = std::filesystem;
    const fs::path index = fs::path(dir) / index_name, single = fs::path(dir) / single_name;
    std::error_code ec;
    if (fs::exists(index, ec)) return open_index(index.string());
    SSMX_REQUIRE(fs::exists(single, ec), IOError, dir, ": neither ", index_name, " nor ", single_name,
                 " found (a Hugging Face checkpoint directory holds one of them)");
    return open_file(single.string());
  }

  // A single safetensors file.
  static SafetensorsShards open_file(const std::string& path) {
    SafetensorsShards s;
    s.path_ = path;
    s.files_.push_back(SafetensorsFile::open(path));
    for (const auto& t : s.files_[0].tensors()) s.where_.emplace(t.name, 0);
    return s;
  }

  // An index file; shard names are file names in the index's directory.
  static SafetensorsShards open_index(const std::string& index_path) {
    namespace fs = std::filesystem;
    const nlohmann::json index = read_json(index_path);
    SSMX_REQUIRE(index.is_object() && index.contains("weight_map") && index.at("weight_map").is_object(), IOError,
                 index_path,
                 ": field \"weight_map\" is missing or not an object (expected {\"<tensor>\": \"<shard>\"})");
    SafetensorsShards s;
    s.path_ = index_path;
    std::map<std::string, std::size_t> shard_of_name;
    const fs::path dir = fs::path(index_path).parent_path();
    for (const auto& [tensor, shard] : index.at("weight_map").items()) {
      SSMX_REQUIRE(shard.is_string(), IOError, index_path, ": field \"weight_map\": tensor \"", tensor, "\" maps to ",
                   detail::json_excerpt(shard), ", expected a shard file name");
      const std::string name = shard.get<std::string>();
      // A plain name, so that an index cannot point outside its directory.
      SSMX_REQUIRE(!name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos, IOError,
                   index_path, ": field \"weight_map\": tensor \"", tensor, "\" maps to \"", name,
                   "\", expected a file name in the index's directory");
      auto [it, fresh] = shard_of_name.emplace(name, s.files_.size());
      if (fresh) s.files_.push_back(SafetensorsFile::open((dir / name).string()));
      const SafetensorsFile& f = s.files_[it->second];
      SSMX_REQUIRE(f.has(tensor), IOError, index_path, ": field \"weight_map\" puts tensor \"", tensor, "\" in ",
                   f.path(), ", which has no such tensor");
      s.where_.emplace(tensor, it->second);
    }
    return s;
  }

  // The index file, or the single file.
  const std::string& path() const noexcept { return path_; }
  const std::vector<SafetensorsFile>& files() const noexcept { return files_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  // Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : where_) out.push_back(kv.first);
    return out;
  }
  // The file that holds `name`; ValueError naming the checkpoint and the tensor if none does.
  const SafetensorsFile& file_of(const std::string& name) const {
    auto it = where_.find(name);
    SSMX_REQUIRE(it != where_.end(), ValueError, path_, ": no tensor \"", name, "\" in the checkpoint");
    return files_[it->second];
  }
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  template <class T>
  void read(const std::string& name, TensorView<T> dst) const {
    file_of(name).read<T>(name, dst);
  }

 private:
  SafetensorsShards() = default;
  std::string path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> where_;  // tensor -> index into files_
};

// Our parameter name -> the tensor name in the file. Empty: the names are the same.
using NameMap = std::function<std::string(const std::string&)>;

namespace detail {

// load_parameters over any source: find(name) gives the file holding tensor `name`, or null.
template <class T, class Find>
std::vector<std::string> load_parameters_from(Find&& find, const std::string& source,
                                              const std::vector<std::string>& all_names, const ParameterList<T>& params,
                                              const NameMap& name_in_file) {
  static_assert(is_compute_type_v<T>, "load_parameters: T must be float or double");
  struct Item {
    Parameter<T>* param;
    std::string name;  // in the file
    const SafetensorsFile* file;
  };
  std::vector<Item> items;
  std::vector<std::string> missing;
  for (std::size_t k = 0; k < params.size(); ++k) {
    Parameter<T>* p = params[k];
    SSMX_REQUIRE(p != nullptr, ValueError, "load_parameters: parameter ", k, " of the list is null");
    std::string name = name_in_file ? name_in_file(p->name) : p->name;
    const SafetensorsFile* f = find(name);
    if (!f)
      missing.push_back(str("\"", name, "\" (for parameter \"", p->name, "\")"));
    else
      items.push_back(Item{p, std::move(name), f});
  }
  if (!missing.empty()) {
    std::string list;
    for (std::size_t i = 0; i < missing.size() && i < 10; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 10) list += str(" and ", missing.size() - 10, " more");
    throw ValueError(str(source, ": missing ", missing.size(), " tensor", missing.size() == 1 ? "" : "s", ": ", list));
  }
  for (const auto& it : items) {
    const TensorInfo& ti = it.file->info(it.name);
    SSMX_REQUIRE(same_shape(ti.shape, it.param->value.dims()), ShapeError, it.file->path(), ": tensor \"", it.name,
                 "\" has shape ", ti.shape_str(), ", but parameter \"", it.param->name, "\" has shape ",
                 it.param->value.dims().str());
    SSMX_REQUIRE(ti.float_dtype().has_value(), ValueError, it.file->path(), ": tensor \"", it.name, "\" has dtype ",
                 ti.dtype, ", expected a floating dtype (F32, F64, BF16 or F16) for parameter \"", it.param->name,
                 "\"");
  }
  // Read everything before the first write, so that a bad value leaves the model as it was.
  std::vector<Tensor<T>> loaded;
  loaded.reserve(items.size());
  for (const auto& it : items) {
    loaded.emplace_back(it.param->value.dims(), Tag::Workspace);
    it.file->template read<T>(it.name, loaded.back().view());
  }
  std::set<std::string> used;
  for (std::size_t k = 0; k < items.size(); ++k) {
    Tensor<T>& dst = items[k].param->value;
    if (dst.numel()) std::memcpy(dst.data(), loaded[k].data(), dst.bytes());
    used.insert(items[k].name);
  }
  std::vector<std::string> unused;
  for (const auto& n : all_names)
    if (!used.count(n)) unused.push_back(n);
  return unused;
}

}  // namespace detail

// Loads every parameter of `params` from the tensor name_in_file(parameter name) (the same
// name when name_in_file is empty), converting F32/F64/BF16/F16 to T. Validates all of it
// first: every tensor present (the error lists the missing ones and the file), shapes
// equal, float dtypes, finite values; a failed load leaves the parameters untouched.
// Holds one extra copy of the parameters while loading. Several parameters may map to the
// same tensor (tied weights). Returns the file's tensors that no parameter used, sorted,
// so that a caller can insist on an exact match.
template <class T>
std::vector<std::string> load_parameters(const SafetensorsFile& file, const ParameterList<T>& params,
                                         const NameMap& name_in_file = {}) {
  std::vector<std::string> names;
  for (const auto& t : file.tensors()) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  return detail::load_parameters_from<T>([&](const std::string& n) { return file.has(n) ? &file : nullptr; },
                                         file.path(), names, params, name_in_file);
}

// The same from a sharded (or single-file) Hugging Face checkpoint.
template <class T>
std::vector<std::string> load_parameters(const SafetensorsShards& shards, const ParameterList<T>& params,
                                         const NameMap& name_in_file = {}) {
  return detail::load_parameters_from<T>(
      [&](const std::string& n) { return shards.has(n) ? &shards.file_of(n) : nullptr; }, shards.path(), shards.names(),
      params, name_in_file);
}

}  // namespace ssmx::io
