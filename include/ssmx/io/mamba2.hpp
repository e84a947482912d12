// ssmx — public Mamba-2 checkpoints and nn::Model<nn::Mamba2<...>, K>: loading and export.
//
// A checkpoint directory holds config.json and model.safetensors (or shards with
// model.safetensors.index.json), in either of the two public layouts:
//   Hugging Face Mamba2ForCausalLM  hidden_size, state_size, head_dim, num_heads, n_groups,
//                                   expand, conv_kernel, num_hidden_layers, vocab_size,
//                                   layer_norm_epsilon, use_bias, use_conv_bias,
//                                   time_step_limit, tie_word_embeddings;
//                                   backbone.embeddings.weight
//   state-spaces/mamba (mamba2-*)   d_model, n_layer, vocab_size, ssm_cfg {layer: "Mamba2",
//                                   d_state, headdim, ngroups, expand, d_conv, dt_limit, ...},
//                                   pad_vocab_size_multiple, tie_embeddings;
//                                   backbone.embedding.weight
// Tensor names: backbone.layers.{i}.{norm.weight, mixer.{in_proj.weight, conv1d.weight,
// conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight}}, backbone.norm_f.weight,
// lm_head.weight ([vocab, d_model], transposed on load and export as for Mamba-1; absent or
// ignored when tied). Python's json writes time_step_limit's infinity as the bare word
// Infinity; it loads (io::read_config_json). The gated norm's epsilon is layer_norm_epsilon
// in the Hugging Face layout and 1e-5 in the state-spaces one (mamba_ssm hard-codes it).
// Features ssmx's Mamba2 lacks (biases on the projections, a gated MLP sharing in_proj
// (d_ssm < d_inner), the norm before the gate, a per-channel D, attention layers, other
// model types) are refused with an error naming the field, before any parameter is touched.
//
//   using LM = nn::Model<nn::Mamba2<float, 768, 128, 64, 1, 2, 4>, 24>;   // mamba2-130m
//   auto cfg = io::read_mamba2_config("mamba2-130m");
//   LM model({cfg.vocab, cfg.tie_embeddings, 0});
//   io::load_mamba2(model, "mamba2-130m");
//   io::save_mamba2(model, "exported");                                   // Hugging Face layout
// Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

#include "mamba.hpp"

namespace ssmx::io {

struct Mamba2Config {
  std::string file;  // the config.json it came from
  MambaLayout layout = MambaLayout::hugging_face;
  index_t vocab = 0, d_model = 0, n_layer = 0, d_state = 128, head_dim = 64, n_heads = 0, n_groups = 1, expand = 2,
          d_conv = 4;
  double norm_eps = 1e-5;        // the blocks' and the final RMSNorm
  double gated_norm_eps = 1e-5;  // the mixers' gated RMSNorm
  double dt_min = 0.0, dt_max = std::numeric_limits<double>::infinity();  // time_step_limit
  bool tie_embeddings = true;

  // The name of one of our fields in this layout's config.json ("d_model" -> "hidden_size").
  const char* field(const std::string& ours) const {
    const bool hf = layout == MambaLayout::hugging_face;
    if (ours == "vocab") return "vocab_size";
    if (ours == "d_model") return hf ? "hidden_size" : "d_model";
    if (ours == "n_layer") return hf ? "num_hidden_layers" : "n_layer";
    if (ours == "d_state") return hf ? "state_size" : "ssm_cfg.d_state";
    if (ours == "head_dim") return hf ? "head_dim" : "ssm_cfg.headdim";
    if (ours == "n_groups") return hf ? "n_groups" : "ssm_cfg.ngroups";
    if (ours == "expand") return hf ? "expand" : "ssm_cfg.expand";
    if (ours == "d_conv") return hf ? "conv_kernel" : "ssm_cfg.d_conv";
    if (ours == "time_step_limit") return hf ? "time_step_limit" : "ssm_cfg.dt_limit";
    if (ours == "tie_embeddings") return hf ? "tie_word_embeddings" : "tie_embeddings";
    return "?";
  }
};

namespace detail {

// time_step_limit / dt_limit: [lo, hi] with 0 <= lo <= hi (hi may be Infinity).
inline void read_time_step_limit(const ConfigObject& o, const char* key, Mamba2Config& c) {
  if (!o.has(key)) return;
  const nlohmann::json& v = o.obj.at(key);
  const bool pair = v.is_array() && v.size() == 2 && v[0].is_number() && v[1].is_number();
  const double lo = pair ? v[0].get<double>() : 0, hi = pair ? v[1].get<double>() : 0;
  SSMX_REQUIRE(pair && std::isfinite(lo) && lo >= 0 && !std::isnan(hi) && hi >= lo, IOError, c.file, ": field \"",
               o.prefix, key, "\" is ", json_excerpt(v), ", expected [lo, hi] with 0 <= lo <= hi (hi may be Infinity)");
  c.dt_min = lo;
  c.dt_max = hi;
}

}  // namespace detail

// Reads dir/config.json in either layout and validates every value it uses (sizes positive
// and bounded, num_heads × head_dim = expand × hidden_size, heads a multiple of the groups,
// epsilons finite and > 0, time_step_limit a range, features ssmx's Mamba2 lacks switched
// off). IOError naming the file and the field. A state-spaces vocabulary is padded up to
// pad_vocab_size_multiple (8 when absent), as the checkpoints' embeddings are.
inline Mamba2Config read_mamba2_config(const std::string& dir) {
  Mamba2Config c;
  c.file = dir + "/config.json";
  const nlohmann::json j = detail::read_mamba_family_config(c.file, c.layout, "Mamba2ForCausalLM", "Mamba-2");
  const bool hf = c.layout == MambaLayout::hugging_face;
  const detail::ConfigObject top{j, c.file, ""};
  c.vocab = top.size("vocab_size");
  if (hf) {
    top.require<std::string>("model_type", "mamba2", "ssmx loads Mamba2ForCausalLM; a Mamba-1 model loads with load_mamba");
    c.d_model = top.size("hidden_size");
    c.n_layer = top.size("num_hidden_layers");
    c.d_state = top.size("state_size", 128, 1);
    c.head_dim = top.size("head_dim", 64, 1);
    c.n_groups = top.size("n_groups", 1, 1);
    c.expand = top.size("expand", 2, 1);
    c.d_conv = top.size("conv_kernel", 4, 1);
    c.norm_eps = top.get<double>("layer_norm_epsilon", 1e-5);
    c.gated_norm_eps = c.norm_eps;  // MambaRMSNormGated(eps=layer_norm_epsilon)
    c.tie_embeddings = top.get<bool>("tie_word_embeddings", true);
    top.require<bool>("use_bias", false, "ssmx's Mamba2 has no in_proj/out_proj bias");
    top.require<bool>("use_conv_bias", true, "ssmx's Mamba2 has a conv1d bias");
    top.require<std::string>("hidden_act", "silu", "ssmx's Mamba2 gates with SiLU");
    top.require<bool>("rms_norm", true, "ssmx's Mamba2 normalises with RMSNorm");
    top.require<bool>("norm_before_gate", false, "ssmx's Mamba2 gates before its norm");
    detail::read_time_step_limit(top, "time_step_limit", c);
    const index_t heads = c.expand * c.d_model / c.head_dim;
    c.n_heads = top.size("num_heads", heads, 1);
  } else {
    c.d_model = top.size("d_model");
    c.n_layer = top.size("n_layer");
    SSMX_REQUIRE(top.has("ssm_cfg") && j.at("ssm_cfg").is_object(), IOError, c.file, ": field \"ssm_cfg\" is ",
                 top.has("ssm_cfg") ? detail::json_excerpt(j.at("ssm_cfg")) : std::string("missing"),
                 ", expected an object with \"layer\": \"Mamba2\"");
    const detail::ConfigObject ssm{j.at("ssm_cfg"), c.file, "ssm_cfg."};
    SSMX_REQUIRE(ssm.has("layer"), IOError, c.file,
                 ": field \"ssm_cfg.layer\" is missing (a Mamba-1 model; it loads with load_mamba)");
    ssm.require<std::string>("layer", "Mamba2", "load_mamba2 loads Mamba-2 blocks");
    c.d_state = ssm.size("d_state", 128, 1);
    c.head_dim = ssm.size("headdim", 64, 1);
    c.n_groups = ssm.size("ngroups", 1, 1);
    c.expand = ssm.size("expand", 2, 1);
    c.d_conv = ssm.size("d_conv", 4, 1);
    ssm.require<bool>("bias", false, "ssmx's Mamba2 has no in_proj/out_proj bias");
    ssm.require<bool>("conv_bias", true, "ssmx's Mamba2 has a conv1d bias");
    ssm.require<bool>("rmsnorm", true, "ssmx's Mamba2 has the gated RMSNorm");
    ssm.require<bool>("norm_before_gate", false, "ssmx's Mamba2 gates before its norm");
    ssm.require<bool>("D_has_hdim", false, "ssmx's Mamba2 has one D per head");
    if (ssm.has("d_ssm"))
      SSMX_REQUIRE(ssm.get<index_t>("d_ssm") == c.expand * c.d_model, IOError, c.file, ": field \"ssm_cfg.d_ssm\" is ",
                   detail::json_excerpt(j.at("ssm_cfg").at("d_ssm")), ", but expand × d_model is ",
                   c.expand * c.d_model, " (a gated MLP in in_proj; ssmx's Mamba2 has none)");
    detail::read_time_step_limit(ssm, "dt_limit", c);
    c.n_heads = c.expand * c.d_model / c.head_dim;
    c.norm_eps = top.get<double>("norm_epsilon", 1e-5);
    c.gated_norm_eps = 1e-5;  // mamba_ssm: RMSNormGated(eps=1e-5)
    c.tie_embeddings = top.get<bool>("tie_embeddings", true);
    c.vocab = detail::state_spaces_vocab(top, c.vocab);
  }
  SSMX_REQUIRE(c.n_heads * c.head_dim == c.expand * c.d_model, IOError, c.file, ": ",
               hf ? "num_heads × head_dim" : "d_model × ssm_cfg.expand is not a multiple of ssm_cfg.headdim: heads × headdim",
               " = ", c.n_heads, " × ", c.head_dim, " = ", c.n_heads * c.head_dim, ", but ", hf ? "expand × hidden_size" : "expand × d_model",
               " is ", c.expand * c.d_model);
  SSMX_REQUIRE(c.n_heads % c.n_groups == 0, IOError, c.file, ": field \"", c.field("n_groups"), "\" is ", c.n_groups,
               ", which does not divide the ", c.n_heads, " heads");
  SSMX_REQUIRE(std::isfinite(c.norm_eps) && c.norm_eps > 0, IOError, c.file, ": field \"",
               hf ? "layer_norm_epsilon" : "norm_epsilon", "\" is ", c.norm_eps, ", expected a finite number > 0");
  return c;
}

namespace detail {
inline void require_field(const Mamba2Config& c, const char* ours, index_t file_value, index_t model_value,
                          const char* template_arg) {
  SSMX_REQUIRE(file_value == model_value, ShapeError, c.file, ": field \"", c.field(ours), "\" is ", file_value,
               " but the model has ", model_value, " (", template_arg, "); compile the model with ", template_arg,
               " = ", file_value);
}
}  // namespace detail

// Checks that `model` can hold what `c` describes: its shapes, its vocabulary and tied or
// untied head. ShapeError / ValueError naming the file and the field otherwise.
template <class T, index_t D, index_t N, index_t P, index_t G, index_t X, index_t W, index_t K>
void check_mamba2_config(const Mamba2Config& c, const nn::Model<nn::Mamba2<T, D, N, P, G, X, W>, K>& model) {
  detail::require_field(c, "d_model", c.d_model, D, "Mamba2's D");
  detail::require_field(c, "d_state", c.d_state, N, "Mamba2's N");
  detail::require_field(c, "head_dim", c.head_dim, P, "Mamba2's P");
  detail::require_field(c, "n_groups", c.n_groups, G, "Mamba2's G");
  detail::require_field(c, "expand", c.expand, X, "Mamba2's Expand");
  detail::require_field(c, "d_conv", c.d_conv, W, "Mamba2's W");
  detail::require_field(c, "n_layer", c.n_layer, K, "Model's K");
  SSMX_REQUIRE(c.vocab == model.vocab(), ShapeError, c.file, ": field \"vocab_size\" is ", c.vocab,
               c.layout == MambaLayout::state_spaces ? " (padded)" : "", " but the model has ", model.vocab(),
               " (Model::Config::vocab)");
  SSMX_REQUIRE(model.tied_embeddings() == c.tie_embeddings, ValueError, c.file, ": field \"", c.field("tie_embeddings"),
               "\" is ", c.tie_embeddings ? "true" : "false",
               " but the model was built with tie_embeddings = ", model.tied_embeddings() ? "true" : "false");
}

// Loads the checkpoint in `dir` into `model`. Everything is checked first (the config, the
// files, every tensor's name, shape, dtype and values); on an exception the model is
// unchanged.
template <class T, index_t D, index_t N, index_t P, index_t G, index_t X, index_t W, index_t K>
void load_mamba2(nn::Model<nn::Mamba2<T, D, N, P, G, X, W>, K>& model, const std::string& dir) {
  const Mamba2Config c = read_mamba2_config(dir);
  check_mamba2_config(c, model);
  detail::load_mamba_tensors(model, dir, c.layout);
  // Validated by read_mamba2_config: nothing below throws.
  model.set_norm_eps(c.norm_eps);
  for (index_t k = model.layer_begin(); k < model.layer_end(); ++k) {
    auto& mixer = model.block(k).mixer;
    mixer.norm_eps = c.gated_norm_eps;
    mixer.set_time_step_limit(c.dt_min, c.dt_max);
  }
}

// Writes `model` to `dir` (created if needed) as a Hugging Face Mamba2ForCausalLM checkpoint,
// as save_mamba does (detail::write_mamba_checkpoint).
// layer_norm_epsilon is the blocks' `norm_eps`; the mixers' gated-norm epsilon and Δ range
// are read from the model and must be the same in every layer. time_step_limit's infinity
// is written as Python does (Infinity).
template <class T, index_t D, index_t N, index_t P, index_t G, index_t X, index_t W, index_t K>
void save_mamba2(nn::Model<nn::Mamba2<T, D, N, P, G, X, W>, K>& model, const std::string& dir,
                 double norm_eps = 1e-5) {
  SSMX_REQUIRE(model.holds_all(), ValueError, dir, ": save_mamba2 needs the whole model; this one holds layers [",
               model.layer_begin(), ", ", model.layer_end(), ") of ", K);
  SSMX_REQUIRE(std::isfinite(norm_eps) && norm_eps > 0, ValueError, dir, ": norm_eps is ", norm_eps,
               ", expected a finite number > 0");
  const auto& first = model.block(0).mixer;
  for (index_t k = 1; k < K; ++k) {
    const auto& m = model.block(k).mixer;
    SSMX_REQUIRE(m.norm_eps == first.norm_eps && m.dt_min == first.dt_min && m.dt_max == first.dt_max, ValueError, dir,
                 ": layer ", k, "'s gated-norm epsilon or time-step limit differs from layer 0's; a config.json "
                 "holds one of each");
  }
  SSMX_REQUIRE(first.norm_eps == norm_eps, ValueError, dir, ": the mixers' gated-norm epsilon is ", first.norm_eps,
               " and norm_eps is ", norm_eps, "; Hugging Face's config has one layer_norm_epsilon for both");
  using Mixer = nn::Mamba2<T, D, N, P, G, X, W>;
  nlohmann::ordered_json j;
  j["architectures"] = {"Mamba2ForCausalLM"};
  j["model_type"] = "mamba2";
  j["vocab_size"] = model.vocab();
  j["hidden_size"] = D;
  j["num_hidden_layers"] = K;
  j["state_size"] = N;
  j["head_dim"] = P;
  j["num_heads"] = Mixer::n_heads;
  j["n_groups"] = G;
  j["expand"] = X;
  j["conv_kernel"] = W;
  j["layer_norm_epsilon"] = norm_eps;
  j["use_bias"] = false;
  j["use_conv_bias"] = true;
  j["hidden_act"] = "silu";
  j["rms_norm"] = true;
  j["tie_word_embeddings"] = model.tied_embeddings();
  j["time_step_limit"] = "@time_step_limit@";  // spelled below: nlohmann writes a non-finite number as null
  j["torch_dtype"] = std::is_same_v<T, float> ? "float32" : "float64";
  std::string text = j.dump(2) + "\n";
  {
    const std::string from = "\"@time_step_limit@\"";
    const auto number = [](double v) { return std::isinf(v) ? std::string("Infinity") : nlohmann::json(v).dump(); };
    text.replace(text.find(from), from.size(), "[" + number(first.dt_min) + ", " + number(first.dt_max) + "]");
  }
  detail::write_mamba_checkpoint(model, dir, text);
}

}  // namespace ssmx::io
