// ssmx — public Mamba checkpoints and nn::Model<nn::Mamba<...>, K>: loading and export.
//
// A checkpoint directory holds config.json and model.safetensors (or shards with
// model.safetensors.index.json), in either of the two public layouts:
//   Hugging Face MambaForCausalLM   hidden_size, state_size, num_hidden_layers, expand,
//                                   conv_kernel, time_step_rank, vocab_size,
//                                   layer_norm_epsilon, use_bias, use_conv_bias,
//                                   tie_word_embeddings; backbone.embeddings.weight
//   state-spaces/mamba              d_model, n_layer, vocab_size, ssm_cfg {d_state,
//                                   d_conv, expand, dt_rank}, pad_vocab_size_multiple,
//                                   tie_embeddings; backbone.embedding.weight
// Tensor names: backbone.layers.{i}.{norm.weight, mixer.<name>}, backbone.norm_f.weight,
// lm_head.weight (absent or ignored when tied). Both layouts store the untied head as
// PyTorch's nn.Linear(d_model, vocab).weight, [vocab, d_model]; ssmx's head is
// [d_model, vocab] (logits = y·W), so it is transposed on load and on export. F32, BF16
// and F16 weights convert to the model's type. The model's shapes are compile-time: every
// config field must equal the template argument it corresponds to, and every value must
// be valid, or loading stops with an error naming the file and the field before any
// parameter is touched.
//
//   using LM = nn::Model<nn::Mamba<float, 768, 16, 2, 4, 48>, 24>;     // mamba-130m
//   auto cfg = io::read_mamba_config("mamba-130m-hf");
//   LM model({cfg.vocab, cfg.tie_embeddings, 0});
//   io::load_mamba(model, "mamba-130m-hf");
//   io::save_mamba(model, "exported");                                  // Hugging Face layout
// Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <sys/stat.h>

#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "../nn/model.hpp"
#include "hf.hpp"

namespace ssmx::io {

enum class MambaLayout { hugging_face, state_spaces };

namespace detail {
// The embedding's tensor name in a checkpoint of `layout`.
inline const char* embedding_name(MambaLayout layout) {
  return layout == MambaLayout::hugging_face ? "backbone.embeddings.weight" : "backbone.embedding.weight";
}
}  // namespace detail

struct MambaConfig {
  std::string file;  // the config.json it came from
  MambaLayout layout = MambaLayout::hugging_face;
  index_t vocab = 0, d_model = 0, n_layer = 0, d_state = 16, expand = 2, d_conv = 4, dt_rank = 0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true, use_bias = false, use_conv_bias = true;

  // The name of one of our fields in this layout's config.json ("d_model" -> "hidden_size").
  const char* field(const std::string& ours) const {
    const bool hf = layout == MambaLayout::hugging_face;
    if (ours == "vocab") return "vocab_size";
    if (ours == "d_model") return hf ? "hidden_size" : "d_model";
    if (ours == "n_layer") return hf ? "num_hidden_layers" : "n_layer";
    if (ours == "d_state") return hf ? "state_size" : "ssm_cfg.d_state";
    if (ours == "expand") return hf ? "expand" : "ssm_cfg.expand";
    if (ours == "d_conv") return hf ? "conv_kernel" : "ssm_cfg.d_conv";
    if (ours == "dt_rank") return hf ? "time_step_rank" : "ssm_cfg.dt_rank";
    if (ours == "norm_eps") return hf ? "layer_norm_epsilon" : "norm_epsilon";
    if (ours == "tie_embeddings") return hf ? "tie_word_embeddings" : "tie_embeddings";
    if (ours == "use_bias") return "use_bias";
    if (ours == "use_conv_bias") return "use_conv_bias";
    return "?";
  }
  // The embedding's tensor name in this layout.
  const char* embedding_name() const { return detail::embedding_name(layout); }
};

// Largest value accepted for a size in a config (vocabulary, widths, layer count): token
// ids are int32, and products of two sizes must not overflow.
inline constexpr index_t max_mamba_config_size = 2147483647;

namespace detail {

// Fields of one JSON object of a config.json (the top level, or ssm_cfg), named in messages
// by their path.
struct ConfigObject {
  const nlohmann::json& obj;
  const std::string& file;
  std::string prefix;  // "" or "ssm_cfg."

  bool has(const char* key) const { return obj.is_object() && obj.contains(key) && !obj.at(key).is_null(); }
  template <class T>
  T get(const char* key) const {
    return json_field_named<T>(obj, key, prefix + key, file);
  }
  template <class T>
  T get(const char* key, T fallback) const {
    return has(key) ? get<T>(key) : fallback;
  }
  // An integer size in [lo, max_mamba_config_size].
  index_t size(const char* key, index_t lo = 1) const {
    const index_t v = get<index_t>(key);
    SSMX_REQUIRE(v >= lo && v <= max_mamba_config_size, IOError, file, ": field \"", prefix, key, "\" is ", v,
                 ", expected an integer in [", lo, ", ", max_mamba_config_size, "]");
    return v;
  }
  index_t size(const char* key, index_t fallback, index_t lo) const { return has(key) ? size(key, lo) : fallback; }
  // The Δ rank: an integer, or "auto" for ceil(d_model / 16).
  index_t dt_rank(const char* key, index_t d_model) const {
    const index_t automatic = (d_model + 15) / 16;
    if (has(key) && obj.at(key).is_string()) {
      const std::string& v = obj.at(key).get_ref<const std::string&>();
      SSMX_REQUIRE(v == "auto", IOError, file, ": field \"", prefix, key, "\" is \"", printable(v),
                   "\", expected an integer or \"auto\"");
      return automatic;
    }
    return size(key, automatic, 1);
  }
  // A field that must hold `expected` when present (a feature ssmx's Mamba does not have).
  template <class T>
  void require(const char* key, const T& expected, const char* why) const {
    if (!has(key)) return;
    const T v = get<T>(key);
    SSMX_REQUIRE(v == expected, IOError, file, ": field \"", prefix, key, "\" is ", json_excerpt(obj.at(key)),
                 ", expected ", json_excerpt(nlohmann::json(expected)), " (", why, ")");
  }
};

inline bool has_any(const nlohmann::json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (j.contains(k)) return true;
  return false;
}

// A config.json as an object, and its layout (`hf_class` and `family` name the model in the
// message when neither layout's fields are there).
inline nlohmann::json read_mamba_family_config(const std::string& file, MambaLayout& layout, const char* hf_class,
                                               const char* family) {
  nlohmann::json j = read_config_json(file);
  SSMX_REQUIRE(j.is_object(), IOError, file, ": the file holds a JSON ", j.type_name(), ", expected an object");
  const bool hf = has_any(j, {"hidden_size", "num_hidden_layers", "state_size", "model_type", "architectures",
                              "tie_word_embeddings", "layer_norm_epsilon"});
  const bool ss = has_any(j, {"d_model", "n_layer", "ssm_cfg", "pad_vocab_size_multiple", "tie_embeddings"});
  SSMX_REQUIRE(hf || ss, IOError, file, ": field \"hidden_size\" (Hugging Face ", hf_class,
               ") or \"d_model\" (state-spaces/mamba) is missing: not a ", family, " config");
  layout = hf ? MambaLayout::hugging_face : MambaLayout::state_spaces;
  return j;
}

// The top-level checks of a state-spaces config (RMSNorm blocks, no MLP, no attention) and
// its vocabulary padded up to pad_vocab_size_multiple (8 when absent, mamba_ssm's default).
inline index_t state_spaces_vocab(const ConfigObject& top, index_t vocab) {
  const nlohmann::json& j = top.obj;
  top.require<bool>("rms_norm", true, "ssmx's blocks use RMSNorm");
  top.require<index_t>("d_intermediate", 0, "ssmx's blocks have no MLP");
  if (top.has("attn_layer_idx"))
    SSMX_REQUIRE(j.at("attn_layer_idx").is_array() && j.at("attn_layer_idx").empty(), IOError, top.file,
                 ": field \"attn_layer_idx\" is ", json_excerpt(j.at("attn_layer_idx")),
                 ", expected [] (ssmx's model has no attention layers)");
  const index_t pad = top.size("pad_vocab_size_multiple", 8, 1);
  const index_t padded = (vocab + pad - 1) / pad * pad;
  SSMX_REQUIRE(padded <= max_mamba_config_size, IOError, top.file, ": field \"vocab_size\" ", vocab,
               " padded to a multiple of pad_vocab_size_multiple = ", pad, " is ", padded, ", more than ",
               max_mamba_config_size);
  return padded;
}

}  // namespace detail

// Reads dir/config.json in either layout and validates every value it uses (sizes positive
// and bounded, intermediate_size = expand × hidden_size, layer_norm_epsilon finite and
// > 0, features ssmx's Mamba lacks switched off). IOError naming the file and the field.
// A state-spaces vocabulary is padded up to pad_vocab_size_multiple (8 when absent, as in
// mamba_ssm's MambaConfig), as the checkpoints' embeddings are.
inline MambaConfig read_mamba_config(const std::string& dir) {
  MambaConfig c;
  c.file = dir + "/config.json";
  const nlohmann::json j = detail::read_mamba_family_config(c.file, c.layout, "MambaForCausalLM", "Mamba");
  const bool hf = c.layout == MambaLayout::hugging_face;
  const detail::ConfigObject top{j, c.file, ""};
  SSMX_REQUIRE(!(top.has("model_type") && j.at("model_type") == "mamba2"), IOError, c.file,
               ": field \"model_type\" is \"mamba2\": a Mamba-2 model, which loads with io::load_mamba2");
  c.vocab = top.size("vocab_size");
  if (hf) {
    c.d_model = top.size("hidden_size");
    c.n_layer = top.size("num_hidden_layers");
    c.d_state = top.size("state_size", 16, 1);
    c.expand = top.size("expand", 2, 1);
    c.d_conv = top.size("conv_kernel", 4, 1);
    c.dt_rank = top.dt_rank("time_step_rank", c.d_model);
    c.norm_eps = top.get<double>("layer_norm_epsilon", 1e-5);
    c.tie_embeddings = top.get<bool>("tie_word_embeddings", true);
    c.use_bias = top.get<bool>("use_bias", false);
    c.use_conv_bias = top.get<bool>("use_conv_bias", true);
    const index_t inner = top.size("intermediate_size", c.expand * c.d_model, 1);
    SSMX_REQUIRE(inner == c.expand * c.d_model, IOError, c.file, ": field \"intermediate_size\" is ", inner,
                 ", but expand × hidden_size is ", c.expand, " × ", c.d_model, " = ", c.expand * c.d_model);
    top.require<std::string>("hidden_act", "silu", "ssmx's Mamba gates with SiLU");
  } else {
    c.d_model = top.size("d_model");
    c.n_layer = top.size("n_layer");
    SSMX_REQUIRE(!top.has("ssm_cfg") || j.at("ssm_cfg").is_object(), IOError, c.file, ": field \"ssm_cfg\" is ",
                 detail::json_excerpt(j.at("ssm_cfg")), ", expected an object");
    static const nlohmann::json no_fields = nlohmann::json::object();
    const detail::ConfigObject ssm{top.has("ssm_cfg") ? j.at("ssm_cfg") : no_fields, c.file, "ssm_cfg."};
    ssm.require<std::string>("layer", "Mamba1", "load_mamba loads Mamba-1 blocks; Mamba-2 loads with load_mamba2");
    c.d_state = ssm.size("d_state", 16, 1);
    c.d_conv = ssm.size("d_conv", 4, 1);
    c.expand = ssm.size("expand", 2, 1);
    c.dt_rank = ssm.dt_rank("dt_rank", c.d_model);
    c.use_bias = ssm.get<bool>("bias", false);
    c.use_conv_bias = ssm.get<bool>("conv_bias", true);
    c.norm_eps = top.get<double>("norm_epsilon", 1e-5);
    c.tie_embeddings = top.get<bool>("tie_embeddings", true);
    c.vocab = detail::state_spaces_vocab(top, c.vocab);
  }
  SSMX_REQUIRE(std::isfinite(c.norm_eps) && c.norm_eps > 0, IOError, c.file, ": field \"", c.field("norm_eps"),
               "\" is ", c.norm_eps, ", expected a finite number > 0");
  return c;
}

namespace detail {
inline void require_field(const MambaConfig& c, const char* ours, index_t file_value, index_t model_value,
                          const char* template_arg) {
  SSMX_REQUIRE(file_value == model_value, ShapeError, c.file, ": field \"", c.field(ours), "\" is ", file_value,
               " but the model has ", model_value, " (", template_arg, "); compile the model with ", template_arg,
               " = ", file_value);
}
}  // namespace detail

// Checks that `model` can hold what `c` describes: its shapes, its vocabulary, tied or
// untied head, and a valid norm epsilon. ShapeError / ValueError naming the file and the
// field otherwise.
template <class T, index_t D, index_t N, index_t X, index_t W, index_t R, index_t K>
void check_mamba_config(const MambaConfig& c, const nn::Model<nn::Mamba<T, D, N, X, W, R>, K>& model) {
  detail::require_field(c, "d_model", c.d_model, D, "Mamba's D");
  detail::require_field(c, "d_state", c.d_state, N, "Mamba's N");
  detail::require_field(c, "expand", c.expand, X, "Mamba's Expand");
  detail::require_field(c, "d_conv", c.d_conv, W, "Mamba's W");
  detail::require_field(c, "dt_rank", c.dt_rank, R, "Mamba's R");
  detail::require_field(c, "n_layer", c.n_layer, K, "Model's K");
  SSMX_REQUIRE(c.vocab == model.vocab(), ShapeError, c.file, ": field \"vocab_size\" is ", c.vocab,
               c.layout == MambaLayout::state_spaces ? " (padded)" : "", " but the model has ", model.vocab(),
               " (Model::Config::vocab)");
  SSMX_REQUIRE(!c.use_bias, ValueError, c.file, ": field \"", c.field("use_bias"),
               "\" is true; ssmx's Mamba has no in_proj/out_proj bias");
  SSMX_REQUIRE(c.use_conv_bias, ValueError, c.file, ": field \"", c.field("use_conv_bias"),
               "\" is false; ssmx's Mamba has a conv1d bias");
  SSMX_REQUIRE(std::isfinite(c.norm_eps) && c.norm_eps > 0, ValueError, c.file, ": field \"", c.field("norm_eps"),
               "\" is ", c.norm_eps, ", expected a finite number > 0");
  SSMX_REQUIRE(model.tied_embeddings() == c.tie_embeddings, ValueError, c.file, ": field \"", c.field("tie_embeddings"),
               "\" is ", c.tie_embeddings ? "true" : "false",
               " but the model was built with tie_embeddings = ", model.tied_embeddings() ? "true" : "false");
}

namespace detail {
// Our parameter name -> the tensor name in a checkpoint of `layout` (Mamba and Mamba-2).
inline std::string mamba_name_in_file(MambaLayout layout, const std::string& ours) {
  if (ours == "embedding.weight") return embedding_name(layout);
  if (ours == "lm_head.weight") return ours;
  return "backbone." + ours;  // layers.{i}.…, norm_f.weight
}

// Loads the checkpoint in `dir` (of `layout`) into `model`'s parameters: every tensor of the
// file must be one of them (a tied model ignores lm_head.weight), the head is transposed,
// and everything is checked before a parameter changes.
template <class Model>
void load_mamba_tensors(Model& model, const std::string& dir, MambaLayout layout) {
  const SafetensorsShards shards = SafetensorsShards::open_dir(dir);
  const bool tied = model.tied_embeddings();
  const NameMap name_in_file = [&](const std::string& ours) { return mamba_name_in_file(layout, ours); };
  const TransposedMap transposed = [](const std::string& ours) { return ours == "lm_head.weight"; };
  std::set<std::string> expected;
  for (auto* p : model.parameters()) expected.insert(name_in_file(p->name));
  for (const auto& name : shards.names())
    SSMX_REQUIRE(expected.count(name) || (tied && name == "lm_head.weight"), ValueError, shards.path(), ": tensor \"",
                 printable(name), "\" is not a parameter of the model",
                 name == "backbone.embeddings.weight" || name == "backbone.embedding.weight"
                     ? str(" (config.json is in the ", layout == MambaLayout::hugging_face ? "Hugging Face" : "state-spaces",
                           " layout, whose embedding is ", embedding_name(layout), ")")
                     : std::string());
  load_parameters(shards, model.parameters(), name_in_file, transposed);
}

// Writes `model` to `dir` (created if needed) in the Hugging Face layout: model.safetensors
// (F32 or F64 as the model's T, the untied head transposed to [vocab, d_model]) and then
// `config_text` as config.json, each atomically, after every value was checked, so that a
// failure leaves the directory's old files in place.
template <class Model>
void write_mamba_checkpoint(Model& model, const std::string& dir, const std::string& config_text) {
  using T = typename Model::T;
  SafetensorsWriter w;
  for (auto* p : model.parameters()) {
    const std::string name = mamba_name_in_file(MambaLayout::hugging_face, p->name);
    if (p->name == "lm_head.weight") {
      const auto st = p->value.view().strides();
      w.add(name,
            TensorView<const T>(p->value.data(), Dims{p->value.dims()[1], p->value.dims()[0]}, {st[1], st[0], 0, 0}));
    } else {
      w.add(name, p->value);
    }
  }
  w.set_metadata("format", "pt");
  struct stat st {};
  const std::string index = dir + "/" + SafetensorsShards::index_name;
  SSMX_REQUIRE(::lstat(index.c_str(), &st) != 0, IOError, index,
               " exists: a loader would read the shards it lists instead of the exported model.safetensors; "
               "export into another directory");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  SSMX_REQUIRE(!ec, IOError, dir, ": cannot create the directory: ", ec.message());
  w.write(dir + "/" + SafetensorsShards::single_name);
  write_file_atomically(dir + "/config.json", config_text);
}
}  // namespace detail

// Loads the checkpoint in `dir` into `model`. Everything is checked first (the config, the
// files, every tensor's name, shape, dtype and values); on an exception the model is
// unchanged.
template <class T, index_t D, index_t N, index_t X, index_t W, index_t R, index_t K>
void load_mamba(nn::Model<nn::Mamba<T, D, N, X, W, R>, K>& model, const std::string& dir) {
  const MambaConfig c = read_mamba_config(dir);
  check_mamba_config(c, model);
  detail::load_mamba_tensors(model, dir, c.layout);
  model.set_norm_eps(c.norm_eps);  // validated by read_mamba_config: does not throw
}

// Writes `model` to `dir` (created if needed) as a Hugging Face MambaForCausalLM checkpoint:
// config.json and model.safetensors (F32 or F64 as the model's T, the untied head
// transposed to [vocab, d_model]), each written atomically; model.safetensors first, after
// every value was checked, so that a failure leaves the directory's old files in place.
// `norm_eps` is the RMSNorm epsilon the model runs with (a loaded checkpoint's norm_eps).
template <class T, index_t D, index_t N, index_t X, index_t W, index_t R, index_t K>
void save_mamba(nn::Model<nn::Mamba<T, D, N, X, W, R>, K>& model, const std::string& dir, double norm_eps = 1e-5) {
  SSMX_REQUIRE(model.holds_all(), ValueError, dir, ": save_mamba needs the whole model; this one holds layers [",
               model.layer_begin(), ", ", model.layer_end(), ") of ", K);
  SSMX_REQUIRE(std::isfinite(norm_eps) && norm_eps > 0, ValueError, dir, ": norm_eps is ", norm_eps,
               ", expected a finite number > 0");
  nlohmann::ordered_json j;
  j["architectures"] = {"MambaForCausalLM"};
  j["model_type"] = "mamba";
  j["vocab_size"] = model.vocab();
  j["hidden_size"] = D;
  j["num_hidden_layers"] = K;
  j["state_size"] = N;
  j["expand"] = X;
  j["intermediate_size"] = X * D;
  j["conv_kernel"] = W;
  j["time_step_rank"] = R;
  j["layer_norm_epsilon"] = norm_eps;
  j["use_bias"] = false;
  j["use_conv_bias"] = true;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = model.tied_embeddings();
  j["torch_dtype"] = std::is_same_v<T, float> ? "float32" : "float64";
  detail::write_mamba_checkpoint(model, dir, j.dump(2) + "\n");
}

}  // namespace ssmx::io
