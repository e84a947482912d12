// ssmx — Hugging Face-style checkpoint directories: config.json, and the weights in
// model.safetensors or in shards listed by model.safetensors.index.json. load_parameters()
// maps a model's parameter names to the names in the file (and matrices stored transposed
// to ours) and copies the tensors in.
//
// Generic on purpose: the name and config mapping of a particular architecture lives with
// that model (e.g. nn/mamba.hpp). Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../nn/parameter.hpp"
#include "json.hpp"
#include "safetensors.hpp"

namespace ssmx::io {

// The weights of a Hugging Face checkpoint: one safetensors file, or several shards and
// the index {"weight_map": {"<tensor>": "<shard file name>"}} that says which holds what.
// All files are opened (and their headers validated) up front. A sharded checkpoint is as
// strict as a single file: every tensor of every shard is listed in the weight_map, under
// that shard, and listed once.
class SafetensorsShards {
 public:
  static constexpr const char* index_name = "model.safetensors.index.json";
  static constexpr const char* single_name = "model.safetensors";

  // `dir`/model.safetensors.index.json if there is anything by that name (a broken link is
  // reported as such, not skipped), else `dir`/model.safetensors.
  static SafetensorsShards open_dir(const std::string& dir) {
    const std::string index = dir + "/" + index_name, single = dir + "/" + single_name;
    if (entry_exists(index)) return open_index(index);
    SSMX_REQUIRE(entry_exists(single), IOError, dir, ": neither ", index_name, " nor ", single_name,
                 " found (a Hugging Face checkpoint directory holds one of them)");
    return open_file(single);
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
    const nlohmann::json index = read_json(index_path);  // a key listed twice is an error there
    SSMX_REQUIRE(index.is_object() && index.contains("weight_map") && index.at("weight_map").is_object(), IOError,
                 index_path,
                 ": field \"weight_map\" is missing or not an object (expected {\"<tensor>\": \"<shard>\"})");
    SafetensorsShards s;
    s.path_ = index_path;
    std::map<std::string, std::size_t> shard_of_name;
    const auto slash = index_path.rfind('/');
    const std::string dir = slash == std::string::npos ? "" : index_path.substr(0, slash + 1);
    for (const auto& [tensor, shard] : index.at("weight_map").items()) {
      const std::string shown = detail::printable(tensor);
      SSMX_REQUIRE(shard.is_string(), IOError, index_path, ": field \"weight_map\": tensor \"", shown, "\" maps to ",
                   detail::json_excerpt(shard), ", expected a shard file name");
      const std::string& name = shard.get_ref<const std::string&>();
      // A plain, printable name, so that an index cannot point outside its directory.
      const bool plain =
          !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
          std::none_of(name.begin(), name.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; });
      SSMX_REQUIRE(plain, IOError, index_path, ": field \"weight_map\": tensor \"", shown, "\" maps to \"",
                   detail::printable(name), "\", expected a file name in the index's directory");
      auto [it, fresh] = shard_of_name.emplace(name, s.files_.size());
      if (fresh) s.files_.push_back(SafetensorsFile::open(dir + name));
      const SafetensorsFile& f = s.files_[it->second];
      SSMX_REQUIRE(f.has(tensor), IOError, index_path, ": field \"weight_map\" puts tensor \"", shown, "\" in ",
                   f.path(), ", which has no such tensor");
      s.where_.emplace(tensor, it->second);
    }
    // Nothing in a shard that the index does not send a reader to.
    for (std::size_t k = 0; k < s.files_.size(); ++k)
      for (const auto& t : s.files_[k].tensors()) {
        auto w = s.where_.find(t.name);
        SSMX_REQUIRE(w != s.where_.end(), IOError, index_path, ": ", s.files_[k].path(), " holds tensor \"",
                     detail::printable(t.name), "\", which field \"weight_map\" does not list");
        SSMX_REQUIRE(w->second == k, IOError, index_path, ": tensor \"", detail::printable(t.name),
                     "\" is stored in two shards, ", s.files_[w->second].path(),
                     " (where field \"weight_map\" puts it) and ", s.files_[k].path());
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
    SSMX_REQUIRE(it != where_.end(), ValueError, path_, ": no tensor \"", detail::printable(name),
                 "\" in the checkpoint");
    return files_[it->second];
  }
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  template <class T>
  void read(const std::string& name, TensorView<T> dst) const {
    file_of(name).read<T>(name, dst);
  }

 private:
  SafetensorsShards() = default;
  // Anything at `path`, a dangling symbolic link included.
  static bool entry_exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0 || errno != ENOENT;
  }
  std::string path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> where_;  // tensor -> index into files_
};

// Our parameter name -> the tensor name in the file. Empty: the names are the same.
using NameMap = std::function<std::string(const std::string&)>;
// Whether the file stores our parameter (by our name) transposed: a matrix [a, b] of ours
// is [b, a] in the file. PyTorch's nn.Linear keeps its weight as [out, in], e.g. the LM
// head of a Hugging Face model as [vocab, d_model] where ssmx has [d_model, vocab].
using TransposedMap = std::function<bool(const std::string&)>;

namespace detail {

// `t` (rank 2) viewed as its transpose, without a copy.
template <class T>
TensorView<T> transposed_view(Tensor<T>& t) {
  const auto st = t.view().strides();
  return TensorView<T>(t.data(), Dims{t.dims()[1], t.dims()[0]}, {st[1], st[0], 0, 0});
}

inline Dims reversed(const Dims& d) { return d.rank == 2 ? Dims{d[1], d[0]} : d; }

// load_parameters over any source: find(name) gives the file holding tensor `name`, or null.
template <class T, class Find>
std::vector<std::string> load_parameters_from(Find&& find, const std::string& source,
                                              const std::vector<std::string>& all_names, const ParameterList<T>& params,
                                              const NameMap& name_in_file, const TransposedMap& transposed_in_file) {
  static_assert(is_compute_type_v<T>, "load_parameters: T must be float or double");
  struct Item {
    Parameter<T>* param;
    std::string name;  // in the file
    const SafetensorsFile* file;
    bool transposed;
  };
  std::vector<Item> items;
  std::vector<std::string> missing;
  for (std::size_t k = 0; k < params.size(); ++k) {
    Parameter<T>* p = params[k];
    SSMX_REQUIRE(p != nullptr, ValueError, "load_parameters: parameter ", k, " of the list is null");
    std::string name = name_in_file ? name_in_file(p->name) : p->name;
    const bool transposed = transposed_in_file && transposed_in_file(p->name);
    SSMX_REQUIRE(!transposed || p->value.dims().rank == 2, ValueError, "load_parameters: parameter \"", p->name,
                 "\" has shape ", p->value.dims().str(), "; only a matrix can be stored transposed");
    const SafetensorsFile* f = find(name);
    if (!f)
      missing.push_back(str("\"", printable(name), "\" (for parameter \"", p->name, "\")"));
    else
      items.push_back(Item{p, std::move(name), f, transposed});
  }
  if (!missing.empty()) {
    std::string list;
    for (std::size_t i = 0; i < missing.size() && i < 10; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 10) list += str(" and ", missing.size() - 10, " more");
    throw ValueError(str(source, ": missing ", missing.size(), " tensor", missing.size() == 1 ? "" : "s", ": ", list));
  }
  for (const auto& it : items) {
    const TensorInfo& ti = it.file->info(it.name);
    const Dims& ours = it.param->value.dims();
    const Dims want = it.transposed ? reversed(ours) : ours;
    SSMX_REQUIRE(same_shape(ti.shape, want), ShapeError, it.file->path(), ": tensor \"", printable(it.name),
                 "\" has shape ", ti.shape_str(), ", but parameter \"", it.param->name, "\" has shape ", ours.str(),
                 it.transposed ? str(", stored transposed: expected ", want.str()) : std::string());
    SSMX_REQUIRE(ti.float_dtype().has_value(), ValueError, it.file->path(), ": tensor \"", printable(it.name),
                 "\" has dtype ", ti.dtype, ", expected a floating dtype (F32, F64, BF16 or F16) for parameter \"",
                 it.param->name, "\"");
  }
  // Read everything before the first write, so that a bad value leaves the model as it was.
  std::vector<Tensor<T>> loaded;
  loaded.reserve(items.size());
  for (const auto& it : items) {
    loaded.emplace_back(it.param->value.dims(), Tag::Workspace);
    it.file->template read<T>(it.name, it.transposed ? transposed_view(loaded.back()) : loaded.back().view());
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
// name when name_in_file is empty), converting F32/F64/BF16/F16 to T; a matrix for which
// transposed_in_file(parameter name) holds is stored transposed in the file. Validates all
// of it first: every tensor present (the error lists the missing ones and the file),
// shapes equal, float dtypes, finite values; a failed load leaves the parameters untouched.
// Holds one extra copy of the parameters while loading. Several parameters may map to the
// same tensor (tied weights). Returns the file's tensors that no parameter used, sorted,
// so that a caller can insist on an exact match.
template <class T>
std::vector<std::string> load_parameters(const SafetensorsFile& file, const ParameterList<T>& params,
                                         const NameMap& name_in_file = {},
                                         const TransposedMap& transposed_in_file = {}) {
  std::vector<std::string> names;
  for (const auto& t : file.tensors()) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  return detail::load_parameters_from<T>([&](const std::string& n) { return file.has(n) ? &file : nullptr; },
                                         file.path(), names, params, name_in_file, transposed_in_file);
}

// The same from a sharded (or single-file) Hugging Face checkpoint.
template <class T>
std::vector<std::string> load_parameters(const SafetensorsShards& shards, const ParameterList<T>& params,
                                         const NameMap& name_in_file = {},
                                         const TransposedMap& transposed_in_file = {}) {
  return detail::load_parameters_from<T>(
      [&](const std::string& n) { return shards.has(n) ? &shards.file_of(n) : nullptr; }, shards.path(), shards.names(),
      params, name_in_file, transposed_in_file);
}

}  // namespace ssmx::io
