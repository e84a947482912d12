// ssmx — loading public Mamba checkpoints into nn::Model<nn::Mamba<...>, K>.
//
// A checkpoint directory holds config.json and model.safetensors (or shards with
// model.safetensors.index.json), in either of the two public layouts:
//   Hugging Face MambaForCausalLM   hidden_size, state_size, num_hidden_layers, expand,
//                                   conv_kernel, time_step_rank, vocab_size,
//                                   layer_norm_epsilon, use_bias, use_conv_bias,
//                                   tie_word_embeddings; backbone.embeddings.weight
//   state-spaces/mamba              d_model, n_layer, vocab_size, ssm_cfg {d_state,
//                                   d_conv, expand, dt_rank}, pad_vocab_size_multiple;
//                                   backbone.embedding.weight
// Tensor names: backbone.layers.{i}.{norm.weight, mixer.<name>}, backbone.norm_f.weight,
// lm_head.weight (absent or ignored when tied). F32, BF16 and F16 weights convert to the
// model's type. The model's shapes are compile-time: every config field must equal the
// template argument it corresponds to, or loading stops with an error naming the field
// and both values, before any parameter is touched.
//
//   using LM = nn::Model<nn::Mamba<float, 768, 16, 2, 4, 48>, 24>;     // mamba-130m
//   auto cfg = io::read_mamba_config("mamba-130m-hf");
//   LM model({cfg.vocab, cfg.tie_embeddings, 0});
//   io::load_mamba(model, "mamba-130m-hf");
// Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "../nn/model.hpp"
#include "hf.hpp"

namespace ssmx::io {

struct MambaConfig {
  std::string file;  // the config.json it came from
  index_t vocab = 0, d_model = 0, n_layer = 0, d_state = 16, expand = 2, d_conv = 4, dt_rank = 0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true, use_bias = false, use_conv_bias = true;
};

// Reads dir/config.json in either layout. The vocabulary is padded up to
// pad_vocab_size_multiple where the config asks for it, as the checkpoints' embeddings are.
inline MambaConfig read_mamba_config(const std::string& dir) {
  MambaConfig c;
  c.file = dir + "/config.json";
  const nlohmann::json j = read_json(c.file);
  SSMX_REQUIRE(j.is_object(), IOError, c.file, ": expected a JSON object");
  c.vocab = json_field<index_t>(j, "vocab_size", c.file);
  auto dt_rank = [&](const nlohmann::json& obj, const char* key) {
    if (obj.is_object() && obj.contains(key) && obj[key].is_string()) {
      const std::string v = obj[key].get<std::string>();
      SSMX_REQUIRE(v == "auto", IOError, c.file, ": field \"", key, "\" is \"", v, "\", expected an integer or \"auto\"");
      return (c.d_model + 15) / 16;
    }
    return json_field<index_t>(obj, key, c.file, (c.d_model + 15) / 16);
  };
  if (j.contains("hidden_size")) {  // Hugging Face
    c.d_model = json_field<index_t>(j, "hidden_size", c.file);
    c.n_layer = json_field<index_t>(j, "num_hidden_layers", c.file);
    c.d_state = json_field<index_t>(j, "state_size", c.file, index_t(16));
    c.expand = json_field<index_t>(j, "expand", c.file, index_t(2));
    c.d_conv = json_field<index_t>(j, "conv_kernel", c.file, index_t(4));
    c.dt_rank = dt_rank(j, "time_step_rank");
    c.norm_eps = json_field<double>(j, "layer_norm_epsilon", c.file, 1e-5);
    c.tie_embeddings = json_field<bool>(j, "tie_word_embeddings", c.file, true);
    c.use_bias = json_field<bool>(j, "use_bias", c.file, false);
    c.use_conv_bias = json_field<bool>(j, "use_conv_bias", c.file, true);
    const index_t inner = json_field<index_t>(j, "intermediate_size", c.file, c.expand * c.d_model);
    SSMX_REQUIRE(inner == c.expand * c.d_model, IOError, c.file, ": intermediate_size is ", inner,
                 ", but expand × hidden_size is ", c.expand * c.d_model);
  } else {  // state-spaces/mamba
    c.d_model = json_field<index_t>(j, "d_model", c.file);
    c.n_layer = json_field<index_t>(j, "n_layer", c.file);
    const nlohmann::json ssm = j.contains("ssm_cfg") ? j["ssm_cfg"] : nlohmann::json::object();
    c.d_state = json_field<index_t>(ssm, "d_state", c.file, index_t(16));
    c.d_conv = json_field<index_t>(ssm, "d_conv", c.file, index_t(4));
    c.expand = json_field<index_t>(ssm, "expand", c.file, index_t(2));
    c.dt_rank = dt_rank(ssm, "dt_rank");
    c.tie_embeddings = json_field<bool>(j, "tie_embeddings", c.file, true);
    const index_t pad = json_field<index_t>(j, "pad_vocab_size_multiple", c.file, index_t(1));
    SSMX_REQUIRE(pad >= 1, IOError, c.file, ": pad_vocab_size_multiple is ", pad, ", expected >= 1");
    c.vocab = (c.vocab + pad - 1) / pad * pad;
  }
  SSMX_REQUIRE(c.vocab > 0 && c.d_model > 0 && c.n_layer > 0, IOError, c.file,
               ": vocab_size, d_model and n_layer must be positive");
  return c;
}

namespace detail {
inline void require_field(const MambaConfig& c, const char* field, index_t file_value, index_t model_value,
                          const char* template_arg) {
  SSMX_REQUIRE(file_value == model_value, ShapeError, c.file, ": ", field, " is ", file_value, " but the model has ",
               model_value, " (", template_arg, "); compile the model with ", template_arg, " = ", file_value);
}
}  // namespace detail

// Checks that `model` has the shapes `c` describes; ShapeError naming the field otherwise.
template <class T, index_t D, index_t N, index_t X, index_t W, index_t R, index_t K>
void check_mamba_config(const MambaConfig& c, const nn::Model<nn::Mamba<T, D, N, X, W, R>, K>& model) {
  detail::require_field(c, "d_model (hidden_size)", c.d_model, D, "Mamba's D");
  detail::require_field(c, "d_state (state_size)", c.d_state, N, "Mamba's N");
  detail::require_field(c, "expand", c.expand, X, "Mamba's Expand");
  detail::require_field(c, "d_conv (conv_kernel)", c.d_conv, W, "Mamba's W");
  detail::require_field(c, "dt_rank (time_step_rank)", c.dt_rank, R, "Mamba's R");
  detail::require_field(c, "n_layer (num_hidden_layers)", c.n_layer, K, "Model's K");
  SSMX_REQUIRE(c.vocab == model.vocab(), ShapeError, c.file, ": vocab_size is ", c.vocab, " but the model has ",
               model.vocab(), " (Model::Config::vocab)");
  SSMX_REQUIRE(!c.use_bias, ValueError, c.file, ": use_bias is true; ssmx's Mamba has no in_proj/out_proj bias");
  SSMX_REQUIRE(c.use_conv_bias, ValueError, c.file, ": use_conv_bias is false; ssmx's Mamba has a conv1d bias");
}

// Loads the checkpoint in `dir` into `model` (config checked first; nothing changes on error).
template <class T, index_t D, index_t N, index_t X, index_t W, index_t R, index_t K>
void load_mamba(nn::Model<nn::Mamba<T, D, N, X, W, R>, K>& model, const std::string& dir) {
  const MambaConfig c = read_mamba_config(dir);
  check_mamba_config(c, model);
  const SafetensorsShards shards = SafetensorsShards::open_dir(dir);
  const bool tied = model.tied_embeddings();
  SSMX_REQUIRE(tied == c.tie_embeddings, ValueError, c.file, ": tie_word_embeddings is ",
               c.tie_embeddings ? "true" : "false", " but the model was built with tie_embeddings = ",
               tied ? "true" : "false");
  const std::string embedding =
      shards.has("backbone.embeddings.weight") ? "backbone.embeddings.weight" : "backbone.embedding.weight";
  const NameMap name_in_file = [&](const std::string& ours) -> std::string {
    if (ours == "embedding.weight") return embedding;
    if (ours == "lm_head.weight") return ours;
    return "backbone." + ours;  // layers.{i}.…, norm_f.weight
  };
  // Every tensor of the file must be a parameter (a tied model ignores lm_head.weight).
  std::set<std::string> expected;
  for (auto* p : model.parameters()) expected.insert(name_in_file(p->name));
  for (const auto& name : shards.names())
    SSMX_REQUIRE(expected.count(name) || (tied && name == "lm_head.weight"), ValueError, shards.path(),
                 ": tensor \"", name, "\" is not a parameter of the model");
  load_parameters(shards, model.parameters(), name_in_file);
  model.set_norm_eps(c.norm_eps);
}

}  // namespace ssmx::io
