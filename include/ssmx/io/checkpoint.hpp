// ssmx — training checkpoints: parameters, optimiser state, step and the caller's metadata
// in one safetensors file, written atomically. Values keep their own dtype, so a resumed
// run is bit-identical to one that never stopped.
//
//   tensors   "param/<parameter>"          parameter values
//             "optim/<parameter>.<slot>"   optimiser state as its state() names it
//                                          (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer)
//   metadata  "format" = "ssmx.checkpoint", "format_version" = "1", "step",
//             "optim.kind" = "AdamW" | "SGD" | "none", "optim.<hyperparameter>",
//             "extra.<key>" = the caller's strings
//
// Numbers in the metadata are decimal strings; doubles carry max_digits10 digits, so they
// parse back to the same bits (exact_string / parse_double).
//
// In a directory, save_checkpoint_to_dir() writes step_00001234.safetensors and then a
// `latest` file naming it; latest_checkpoint() finds it again.
#pragma once

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <locale>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../nn/parameter.hpp"
#include "../optim/adamw.hpp"
#include "../optim/sgd.hpp"
#include "file.hpp"
#include "safetensors.hpp"

namespace ssmx::io {

using Metadata = std::map<std::string, std::string>;

// Decimal text of v that parses back to the same double (max_digits10 significant digits,
// independent of the global locale).
inline std::string exact_string(double v) {
  std::ostringstream os;
  os.imbue(std::locale::classic());
  os.precision(std::numeric_limits<double>::max_digits10);
  os << v;
  return os.str();
}
inline std::string exact_string(std::int64_t v) { return std::to_string(v); }

// The whole of `s` as a finite double or an int64; nullopt if it is anything else.
inline std::optional<double> parse_double(const std::string& s) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return std::nullopt;
  std::istringstream in(s);
  in.imbue(std::locale::classic());
  double v = 0;
  in >> v;
  if (in.fail() || in.peek() != std::char_traits<char>::eof() || !std::isfinite(v)) return std::nullopt;
  return v;
}
inline std::optional<std::int64_t> parse_int64(const std::string& s) {
  std::int64_t v = 0;
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, v);
  if (s.empty() || r.ec != std::errc() || r.ptr != end) return std::nullopt;
  return v;
}

// Stands for "no optimiser": a checkpoint of the parameters alone, or a load that restores
// only the parameters (whatever optimiser state the file holds).
struct NoOptimizer {};

// How an optimiser's state goes into a checkpoint. A specialisation provides
//   using value_type = T;
//   static constexpr const char* kind;              // "optim.kind"
//   static std::vector<NamedTensor<T>> state(const Opt&);              // "optim/<entry name>"
//   static void save_metadata(const Opt&, Metadata&);                  // "optim.*" keys
//   static void load(Opt&, const std::vector<NamedTensor<T>>& state, const Metadata&, const std::string& file);
//       validates the metadata, then replaces the state; on an exception nothing changed.
template <class Optimizer>
struct OptimizerCheckpoint {
  static_assert(sizeof(Optimizer) == 0,
                "ssmx::io: no checkpoint support for this optimiser; specialise ssmx::io::OptimizerCheckpoint");
};

namespace detail {

inline const std::string& metadata_field(const Metadata& md, const std::string& key, const std::string& file) {
  auto it = md.find(key);
  SSMX_REQUIRE(it != md.end(), IOError, file, ": field \"__metadata__.", key, "\" is missing");
  return it->second;
}
inline std::int64_t metadata_int64(const Metadata& md, const std::string& key, const std::string& file) {
  const std::string& s = metadata_field(md, key, file);
  const auto v = parse_int64(s);
  SSMX_REQUIRE(v.has_value() && *v >= 0, IOError, file, ": field \"__metadata__.", key, "\" is \"", printable(s),
               "\", expected a decimal integer >= 0");
  return *v;
}
// A learning rate: finite and >= 0, as the optimisers' set_lr() requires.
inline double metadata_lr(const Metadata& md, const std::string& file) {
  const std::string& s = metadata_field(md, "optim.lr", file);
  const auto v = parse_double(s);
  SSMX_REQUIRE(v.has_value() && *v >= 0.0, IOError, file, ": field \"__metadata__.optim.lr\" is \"", printable(s),
               "\", expected a finite number >= 0");
  return *v;
}

}  // namespace detail

// AdamW: both moments of every parameter it has seen, its step count and learning rate.
// beta1, beta2, eps and weight_decay are recorded but not restored: construct the
// optimiser with the values the run used.
template <class T>
struct OptimizerCheckpoint<AdamW<T>> {
  using value_type = T;
  static constexpr const char* kind = "AdamW";
  static std::vector<NamedTensor<T>> state(const AdamW<T>& o) { return o.state(); }
  static void save_metadata(const AdamW<T>& o, Metadata& md) {
    md["optim.step_count"] = exact_string(o.step_count());
    md["optim.lr"] = exact_string(o.lr());
    md["optim.beta1"] = exact_string(o.beta1());
    md["optim.beta2"] = exact_string(o.beta2());
    md["optim.eps"] = exact_string(o.eps());
    md["optim.weight_decay"] = exact_string(o.weight_decay());
  }
  static void load(AdamW<T>& o, const std::vector<NamedTensor<T>>& state, const Metadata& md, const std::string& file) {
    const std::int64_t steps = detail::metadata_int64(md, "optim.step_count", file);
    const double lr = detail::metadata_lr(md, file);
    o.load_state(state, steps);  // strong guarantee
    o.set_lr(lr);                // validated above: does not throw
  }
};

// SGD: the momentum buffers and the learning rate. momentum, weight_decay and nesterov are
// recorded but not restored.
template <class T>
struct OptimizerCheckpoint<SGD<T>> {
  using value_type = T;
  static constexpr const char* kind = "SGD";
  static std::vector<NamedTensor<T>> state(const SGD<T>& o) { return o.state(); }
  static void save_metadata(const SGD<T>& o, Metadata& md) {
    md["optim.lr"] = exact_string(o.lr());
    md["optim.momentum"] = exact_string(o.momentum());
    md["optim.weight_decay"] = exact_string(o.weight_decay());
    md["optim.nesterov"] = o.nesterov() ? "true" : "false";
  }
  static void load(SGD<T>& o, const std::vector<NamedTensor<T>>& state, const Metadata& md, const std::string& file) {
    const double lr = detail::metadata_lr(md, file);
    o.load_state(state);  // strong guarantee
    o.set_lr(lr);
  }
};

// What load_checkpoint() returns besides the restored tensors.
struct CheckpointInfo {
  std::int64_t step = 0;
  Metadata extra;  // the caller's metadata, without the "extra." prefix
};

namespace detail {

inline constexpr const char* checkpoint_format = "ssmx.checkpoint";
inline constexpr const char* checkpoint_version = "1";
inline constexpr const char* param_prefix = "param/";
inline constexpr const char* optim_prefix = "optim/";
inline constexpr const char* extra_prefix = "extra.";

inline bool starts_with(const std::string& s, const char* prefix) {
  return s.compare(0, std::strlen(prefix), prefix) == 0;
}

// Parameters by name; ValueError naming the file for a null entry or a repeated name.
template <class T>
std::map<std::string, Parameter<T>*> parameters_by_name(const ParameterList<T>& params, const std::string& file) {
  std::map<std::string, Parameter<T>*> by_name;
  for (std::size_t k = 0; k < params.size(); ++k) {
    SSMX_REQUIRE(params[k] != nullptr, ValueError, file, ": parameter ", k, " of the list is null");
    SSMX_REQUIRE(by_name.emplace(params[k]->name, params[k]).second, ValueError, file, ": parameter name \"",
                 params[k]->name, "\" appears twice in the list");
  }
  return by_name;
}

// The parameter that optimiser state entry "<parameter>.<slot>" belongs to; ValueError /
// ShapeError naming the file and the entry unless there is one with the entry's shape.
template <class T>
Parameter<T>& state_owner(const std::map<std::string, Parameter<T>*>& by_name, const std::string& entry,
                          const Dims& dims, const std::string& file) {
  const auto dot = entry.rfind('.');
  auto it = dot == std::string::npos ? by_name.end() : by_name.find(entry.substr(0, dot));
  SSMX_REQUIRE(it != by_name.end(), ValueError, file, ": optimizer state \"", printable(entry),
               "\" belongs to no parameter in the list (expected \"<parameter>.<slot>\")");
  SSMX_REQUIRE(dims == it->second->value.dims(), ShapeError, file, ": optimizer state \"", printable(entry),
               "\" has shape ", dims.str(), ", but parameter \"", it->first, "\" has shape ",
               it->second->value.dims().str());
  return *it->second;
}

template <class Optimizer>
constexpr const char* optimizer_kind() {
  if constexpr (std::is_same_v<Optimizer, NoOptimizer>)
    return "none";
  else
    return OptimizerCheckpoint<Optimizer>::kind;
}

template <class T, class Optimizer>
constexpr void check_optimizer_type() {
  if constexpr (!std::is_same_v<Optimizer, NoOptimizer>)
    static_assert(std::is_same_v<typename OptimizerCheckpoint<Optimizer>::value_type, T>,
                  "ssmx::io checkpoint: the optimiser's element type differs from the parameters'");
}

}  // namespace detail

// Writes `params`, the state of `opt` (AdamW, SGD or NoOptimizer), `step` and `extra` to
// `path`, atomically: on an exception the file at `path` keeps its old content.
// ValueError (naming the file) for step < 0, a null or repeated parameter, optimiser state
// that belongs to no parameter, or a non-finite value.
template <class T, class Optimizer>
void save_checkpoint(const std::string& path, const ParameterList<T>& params, const Optimizer& opt, std::int64_t step,
                     const Metadata& extra = {}) {
  detail::check_optimizer_type<T, Optimizer>();
  SSMX_REQUIRE(step >= 0, ValueError, path, ": step must be >= 0, got ", step);
  const auto by_name = detail::parameters_by_name(params, path);
  SafetensorsWriter w;
  for (auto* p : params) w.add(detail::param_prefix + p->name, p->value.view());
  Metadata md;
  if constexpr (!std::is_same_v<Optimizer, NoOptimizer>) {
    using Traits = OptimizerCheckpoint<Optimizer>;
    const auto state = Traits::state(opt);  // views into opt: valid until w.write() below
    for (const auto& e : state) {
      detail::state_owner(by_name, e.name, e.value.dims(), path);
      w.add(detail::optim_prefix + e.name, e.value);
    }
    Traits::save_metadata(opt, md);
  }
  md["format"] = detail::checkpoint_format;
  md["format_version"] = detail::checkpoint_version;
  md["step"] = exact_string(step);
  md["optim.kind"] = detail::optimizer_kind<Optimizer>();
  for (const auto& [k, v] : extra) md[detail::extra_prefix + k] = v;
  for (const auto& [k, v] : md) w.set_metadata(k, v);
  w.write(path);
}

// A checkpoint of the parameters alone.
template <class T>
void save_checkpoint(const std::string& path, const ParameterList<T>& params, std::int64_t step,
                     const Metadata& extra = {}) {
  save_checkpoint(path, params, NoOptimizer{}, step, extra);
}

// Restores `params` and the state of `opt` from a checkpoint written by save_checkpoint().
// Validates everything first: the format, the optimiser kind (ValueError unless the file's
// matches `opt`'s; NoOptimizer skips the optimiser state), every parameter present with its
// shape and dtype (the checkpoint keeps values in their own dtype: a float64 file does not
// load into float parameters), no tensor the model lacks, finite values. On an exception the
// parameters and the optimiser are unchanged. Holds one extra copy of both while loading.
template <class T, class Optimizer>
CheckpointInfo load_checkpoint(const std::string& path, const ParameterList<T>& params, Optimizer& opt) {
  detail::check_optimizer_type<T, Optimizer>();
  constexpr bool with_optimizer = !std::is_same_v<Optimizer, NoOptimizer>;
  const SafetensorsFile f = SafetensorsFile::open(path);
  const Metadata& md = f.metadata();

  const std::string& format = detail::metadata_field(md, "format", path);
  SSMX_REQUIRE(format == detail::checkpoint_format, IOError, path, ": field \"__metadata__.format\" is \"",
               detail::printable(format), "\", expected \"", detail::checkpoint_format, "\"");
  const std::string& version = detail::metadata_field(md, "format_version", path);
  SSMX_REQUIRE(version == detail::checkpoint_version, IOError, path, ": field \"__metadata__.format_version\" is \"",
               detail::printable(version), "\", expected \"", detail::checkpoint_version, "\"");
  CheckpointInfo info;
  info.step = detail::metadata_int64(md, "step", path);
  const std::string& kind = detail::metadata_field(md, "optim.kind", path);
  SSMX_REQUIRE(!with_optimizer || kind == detail::optimizer_kind<Optimizer>(), ValueError, path,
               ": the checkpoint holds optimizer state of kind \"", detail::printable(kind),
               "\", but the optimizer is \"", detail::optimizer_kind<Optimizer>(), "\"");

  // Names, shapes and dtypes of every tensor in the file against the model.
  const auto by_name = detail::parameters_by_name(params, path);
  const char* native = safetensors_dtype(dtype_v<T>);
  std::vector<const TensorInfo*> state_infos;
  for (const auto& t : f.tensors()) {
    const bool is_param = detail::starts_with(t.name, detail::param_prefix);
    const bool is_state = detail::starts_with(t.name, detail::optim_prefix);
    SSMX_REQUIRE(is_param || is_state, ValueError, path, ": unexpected tensor \"", detail::printable(t.name),
                 "\" (checkpoint tensors are \"param/...\" or \"optim/...\")");
    if (is_state && !with_optimizer) continue;
    SSMX_REQUIRE(t.dtype == native, ValueError, path, ": tensor \"", detail::printable(t.name), "\" has dtype ",
                 t.dtype, ", expected ", native, " (checkpoints keep values in the parameters' own dtype)");
    SSMX_REQUIRE(t.shape.size() <= std::size_t(max_rank), ShapeError, path, ": tensor \"", detail::printable(t.name),
                 "\" has shape ", t.shape_str(), " of rank ", t.shape.size(), "; ssmx tensors have rank <= ", max_rank);
    if (is_param) {
      const std::string name = t.name.substr(std::strlen(detail::param_prefix));
      auto it = by_name.find(name);
      SSMX_REQUIRE(it != by_name.end(), ValueError, path, ": tensor \"", detail::printable(t.name),
                   "\" has no parameter \"", detail::printable(name), "\" in the list");
      SSMX_REQUIRE(detail::same_shape(t.shape, it->second->value.dims()), ShapeError, path, ": tensor \"",
                   detail::printable(t.name), "\" has shape ", t.shape_str(), ", but parameter \"", name,
                   "\" has shape ", it->second->value.dims().str());
    } else {
      Dims d;
      d.rank = int(t.shape.size());
      for (int i = 0; i < d.rank; ++i) d[i] = t.shape[std::size_t(i)];
      detail::state_owner(by_name, t.name.substr(std::strlen(detail::optim_prefix)), d, path);
      state_infos.push_back(&t);
    }
  }
  for (auto* p : params)
    SSMX_REQUIRE(f.has(detail::param_prefix + p->name), ValueError, path, ": no tensor \"", detail::param_prefix,
                 p->name, "\" for parameter \"", p->name, "\"");

  // Read everything (reads reject non-finite values), then commit: the optimiser first
  // (its load_state() may still refuse, changing nothing), then the parameters (cannot fail).
  std::vector<Tensor<T>> values;
  values.reserve(params.size());
  for (auto* p : params) values.push_back(f.read<T>(detail::param_prefix + p->name, Tag::Workspace));
  if constexpr (with_optimizer) {
    std::vector<Tensor<T>> state_values;
    std::vector<NamedTensor<T>> state;
    state_values.reserve(state_infos.size());
    for (const TensorInfo* t : state_infos) {
      state_values.push_back(f.read<T>(t->name, Tag::Workspace));
      state.push_back({t->name.substr(std::strlen(detail::optim_prefix)), state_values.back().view()});
    }
    // The optimiser's own checks (slot names, pairs, non-negative exp_avg_sq) do not know the file.
    try {
      OptimizerCheckpoint<Optimizer>::load(opt, state, md, path);
    } catch (const ShapeError& e) {
      throw ShapeError(detail::str(path, ": ", e.what()));
    } catch (const ValueError& e) {
      throw ValueError(detail::str(path, ": ", e.what()));
    }
  }
  for (std::size_t k = 0; k < params.size(); ++k)
    if (values[k].numel()) std::memcpy(params[k]->value.data(), values[k].data(), values[k].bytes());

  for (const auto& [k, v] : md)
    if (detail::starts_with(k, detail::extra_prefix))
      info.extra.emplace(k.substr(std::strlen(detail::extra_prefix)), v);
  return info;
}

// Restores the parameters alone (any optimiser state in the file is ignored).
template <class T>
CheckpointInfo load_checkpoint(const std::string& path, const ParameterList<T>& params) {
  NoOptimizer none;
  return load_checkpoint(path, params, none);
}

// ---- checkpoint directories -------------------------------------------------------------

// "step_00001234.safetensors": zero-padded to 8 digits, so names sort like steps.
inline std::string checkpoint_file_name(std::int64_t step) {
  SSMX_REQUIRE(step >= 0, ValueError, "checkpoint_file_name: step must be >= 0, got ", step);
  char buf[40];
  std::snprintf(buf, sizeof buf, "step_%08lld.safetensors", static_cast<long long>(step));
  return buf;
}

// Saves to `dir`/checkpoint_file_name(step) (creating `dir`), then replaces `dir`/latest
// with that file name, each atomically. A crash in between leaves `latest` naming the
// previous checkpoint, which is complete. Returns the checkpoint's path.
template <class T, class Optimizer>
std::string save_checkpoint_to_dir(const std::string& dir, const ParameterList<T>& params, const Optimizer& opt,
                                   std::int64_t step, const Metadata& extra = {}) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  SSMX_REQUIRE(!ec, IOError, dir, ": cannot create the checkpoint directory: ", ec.message());
  const std::string name = checkpoint_file_name(step);
  const std::string path = (fs::path(dir) / name).string();
  save_checkpoint(path, params, opt, step, extra);
  write_file_atomically((fs::path(dir) / "latest").string(), name + "\n");
  return path;
}

// The newest checkpoint in `dir`: the file `latest` names, or, without a `latest` file, the
// step_*.safetensors with the highest step; nullopt when there is none. IOError naming the
// `latest` file when it is not a small regular file (a broken link included), is
// malformed, or names a missing file.
inline std::optional<std::string> latest_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string latest = (fs::path(dir) / "latest").string();
  if (fs::symlink_status(latest, ec).type() != fs::file_type::not_found ||
      (ec && ec != std::errc::no_such_file_or_directory)) {
    const std::string text = read_file_bounded(latest, 4096);
    const std::string name = text.substr(0, text.find('\n'));
    const bool plain =
        !name.empty() && name.find('/') == std::string::npos && name != "." && name != ".." &&
        std::none_of(name.begin(), name.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; });
    SSMX_REQUIRE(plain, IOError, latest, ": holds \"", detail::printable(name),
                 "\", expected a checkpoint file name in ", dir);
    const fs::path target = fs::path(dir) / name;
    SSMX_REQUIRE(fs::is_regular_file(target, ec), IOError, latest, ": names ", target.string(),
                 ", which does not exist or is not a regular file");
    return target.string();
  }
  std::optional<std::string> best;
  std::int64_t best_step = -1;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::string head = "step_", tail = ".safetensors";
    if (name.size() <= head.size() + tail.size() || name.compare(0, head.size(), head) != 0 ||
        name.compare(name.size() - tail.size(), tail.size(), tail) != 0)
      continue;
    const auto step = parse_int64(name.substr(head.size(), name.size() - head.size() - tail.size()));
    if (step && *step > best_step && it->is_regular_file(ec)) {
      best_step = *step;
      best = it->path().string();
    }
  }
  return best;
}

}  // namespace ssmx::io
