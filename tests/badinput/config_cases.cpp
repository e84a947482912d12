// Bad input: config.json of a Mamba checkpoint (both layouts), and checkpoints whose tensors
// do not fit their config. Every case loads into a model and checks that it is unchanged.
#include "badinput.hpp"

namespace badinput {

// The fixture `name` copied, with its config.json replaced by `config` (raw text), loaded
// into `model`; the failure is expected of type E, naming config.json (or `file`).
template <class E = IOError>
void config_case(const std::string& config, const std::vector<std::string>& fields,
                 const std::string& name = "mamba_tiny", index_t vocab = 32, bool tied = true,
                 const std::string& file = "config.json") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, name);
  write_file(ckpt + "/config.json", config);
  TinyLM model({vocab, tied, 0});
  expect_error<E>(
      dir.path(), {ckpt + "/" + file, fields}, [&] { io::load_mamba(model, ckpt); }, &model);
}

// The fixture's config.json with `patch` merged in (null removes a field).
inline std::string patched(const nlohmann::json& patch, const std::string& name = "mamba_tiny") {
  nlohmann::json j = nlohmann::json::parse(read_file(fixture(name + "/config.json")));
  j.merge_patch(patch);
  return j.dump(2);
}

}  // namespace badinput

using namespace badinput;

TEST_CASE("badinput: config control - the fixtures load") {
  TinyLM tied({32, true, 0});
  io::load_mamba(tied, fixture("mamba_tiny"));
  TinyLM ss({16, false, 0});
  io::load_mamba(ss, fixture("mamba_untied_ss"));
}

TEST_CASE("badinput: config layer_norm_epsilon of 0 is refused before any parameter changes") {
  config_case(patched({{"layer_norm_epsilon", 0}}),
              {"field \"layer_norm_epsilon\" is 0, expected a finite number > 0"});
}

TEST_CASE("badinput: config negative layer_norm_epsilon") {
  config_case(patched({{"layer_norm_epsilon", -1e-5}}), {"field \"layer_norm_epsilon\" is -1e-05"});
}

TEST_CASE("badinput: config layer_norm_epsilon beyond a double") {
  std::string text = patched({{"layer_norm_epsilon", 12345}});
  text.replace(text.find("12345"), 5, "1e400");
  config_case(text, {"not valid JSON", "in field \"layer_norm_epsilon\"", "number overflow"});
}

TEST_CASE("badinput: config layer_norm_epsilon that is a string") {
  config_case(patched({{"layer_norm_epsilon", "1e-5"}}),
              {"field \"layer_norm_epsilon\" is \"1e-5\", expected a number"});
}

TEST_CASE("badinput: config Hugging Face layout without hidden_size") {
  config_case(patched({{"hidden_size", nullptr}}), {"field \"hidden_size\" is missing"});
}

TEST_CASE("badinput: config neither layout") {
  config_case(R"({"vocab_size": 32, "note": "not a model"})",
              {"field \"hidden_size\" (Hugging Face MambaForCausalLM) or \"d_model\" (state-spaces/mamba) is missing"});
}

TEST_CASE("badinput: config that is a JSON array") {
  config_case("[1, 2, 3]", {"the file holds a JSON array, expected an object"});
}

TEST_CASE("badinput: config with a repeated key") {
  config_case(R"({"hidden_size": 16, "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 32})",
              {"has the key \"hidden_size\" twice"});
}

TEST_CASE("badinput: config deeply nested field") {
  config_case(R"({"hidden_size": 16, "rope_scaling": )" + nested(200000) + "}",
              {"nests deeper than 64 levels", "rope_scaling"});
}

TEST_CASE("badinput: config invalid UTF-8 is escaped in the message") {
  config_case("{\"hidden_size\": 16, \"name\": \"caf\xc3\x28\"}", {"not valid JSON", "\\x"});
}

TEST_CASE("badinput: config negative vocab_size") {
  config_case(patched({{"vocab_size", -32}}), {"field \"vocab_size\" is -32, expected an integer in [1, 2147483647]"});
}

TEST_CASE("badinput: config vocab_size beyond int32") {
  config_case(patched({{"vocab_size", 1099511627776LL}}), {"field \"vocab_size\" is 1099511627776"});
}

TEST_CASE("badinput: config expand so large that expand times hidden_size overflows") {
  config_case(patched({{"expand", 4611686018427387904LL}}), {"field \"expand\" is 4611686018427387904"});
}

TEST_CASE("badinput: config intermediate_size that disagrees with expand") {
  config_case(patched({{"intermediate_size", 48}}), {"field \"intermediate_size\" is 48", "2 × 16 = 32"});
}

TEST_CASE("badinput: config time_step_rank neither an integer nor auto") {
  config_case(patched({{"time_step_rank", "fast"}}),
              {"field \"time_step_rank\" is \"fast\", expected an integer or \"auto\""});
}

TEST_CASE("badinput: config state_size that differs from the compiled model") {
  config_case<ShapeError>(patched({{"state_size", 8}}),
                          {"field \"state_size\" is 8 but the model has 4", "compile the model with Mamba's N = 8"});
}

TEST_CASE("badinput: config tie_word_embeddings that differs from the model") {
  config_case<ValueError>(
      patched({{"tie_word_embeddings", false}}),
      {"field \"tie_word_embeddings\" is false but the model was built with tie_embeddings = true"});
}

TEST_CASE("badinput: config use_bias true") {
  config_case<ValueError>(patched({{"use_bias", true}}), {"field \"use_bias\" is true"});
}

TEST_CASE("badinput: config hidden_act other than silu") {
  config_case(patched({{"hidden_act", "gelu"}}), {"field \"hidden_act\" is \"gelu\", expected \"silu\""});
}

TEST_CASE("badinput: config state-spaces ssm_cfg that is not an object") {
  config_case(patched({{"ssm_cfg", 4}}, "mamba_untied_ss"), {"field \"ssm_cfg\" is 4, expected an object"},
              "mamba_untied_ss", 16, false);
}

TEST_CASE("badinput: config state-spaces Mamba-2 layer") {
  config_case(patched({{"ssm_cfg", {{"layer", "Mamba2"}}}}, "mamba_untied_ss"),
              {"field \"ssm_cfg.layer\" is \"Mamba2\", expected \"Mamba1\""}, "mamba_untied_ss", 16, false);
}

TEST_CASE("badinput: config state-spaces without d_model") {
  config_case(patched({{"d_model", nullptr}}, "mamba_untied_ss"), {"field \"d_model\" is missing"}, "mamba_untied_ss",
              16, false);
}

TEST_CASE("badinput: config state-spaces ssm_cfg.d_state of the wrong type") {
  config_case(patched({{"ssm_cfg", {{"d_state", 4.5}}}}, "mamba_untied_ss"),
              {"field \"ssm_cfg.d_state\" is 4.5, expected an integer"}, "mamba_untied_ss", 16, false);
}

TEST_CASE("badinput: config state-spaces LayerNorm blocks") {
  config_case(patched({{"rms_norm", false}}, "mamba_untied_ss"), {"field \"rms_norm\" is false, expected true"},
              "mamba_untied_ss", 16, false);
}

TEST_CASE("badinput: config state-spaces pad_vocab_size_multiple of 0") {
  config_case(patched({{"pad_vocab_size_multiple", 0}}, "mamba_untied_ss"), {"field \"pad_vocab_size_multiple\" is 0"},
              "mamba_untied_ss", 16, false);
}

TEST_CASE("badinput: config.json that is a directory") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  fs::remove(ckpt + "/config.json");
  fs::create_directory(ckpt + "/config.json");
  TinyLM model({32, true, 0});
  expect_error<IOError>(
      dir.path(), {ckpt + "/config.json", {"is a directory, not a regular file"}}, [&] { io::load_mamba(model, ckpt); },
      &model);
}

TEST_CASE("badinput: config.json that is a FIFO does not block") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  fs::remove(ckpt + "/config.json");
  REQUIRE(::mkfifo((ckpt + "/config.json").c_str(), 0600) == 0);
  TinyLM model({32, true, 0});
  expect_error<IOError>(
      dir.path(), {ckpt + "/config.json", {"is a FIFO (named pipe)"}}, [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: config.json that is a symlink to /dev/zero") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  fs::remove(ckpt + "/config.json");
  fs::create_symlink("/dev/zero", ckpt + "/config.json");
  TinyLM model({32, true, 0});
  expect_error<IOError>(
      dir.path(), {ckpt + "/config.json", {"is a character device"}}, [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: config.json larger than the JSON bound") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  fs::resize_file(ckpt + "/config.json", io::max_json_bytes + 1);  // sparse: nothing is written
  TinyLM model({32, true, 0});
  expect_error<IOError>(
      dir.path(), {ckpt + "/config.json", {"more than the 67108864 bytes accepted"}},
      [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: config.json missing") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  fs::remove(ckpt + "/config.json");
  TinyLM model({32, true, 0});
  expect_error<IOError>(
      dir.path(), {ckpt + "/config.json", {"cannot open: No such file"}}, [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: a Hugging Face checkpoint missing its embedding names the Hugging Face tensor") {
  // The weights of the state-spaces fixture (backbone.embedding.weight) under a Hugging Face config.
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_untied_ss");
  write_file(ckpt + "/config.json", patched({{"vocab_size", 16}, {"tie_word_embeddings", false}}));
  TinyLM model({16, false, 0});
  expect_error<ValueError>(
      dir.path(),
      {ckpt + "/model.safetensors",
       {"tensor \"backbone.embedding.weight\" is not a parameter of the model",
        "Hugging Face layout, whose embedding is backbone.embeddings.weight"}},
      [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: an untied checkpoint whose head has the untransposed shape") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_untied");
  {
    const auto f = io::SafetensorsFile::open(ckpt + "/model.safetensors");
    io::SafetensorsWriter w;
    std::vector<Tensor<float>> keep;  // the writer holds views until write()
    keep.reserve(f.tensors().size());
    for (const auto& t : f.tensors()) {
      keep.push_back(f.read<float>(t.name));
      if (t.name == "lm_head.weight") keep.back().reshape(Dims{16, 32});  // [D, V]: ssmx's, not PyTorch's
      w.add(t.name, keep.back());
    }
    w.write(ckpt + "/model.safetensors");
  }
  TinyLM model({32, false, 0});
  expect_error<ShapeError>(
      dir.path(),
      {ckpt + "/model.safetensors",
       {"tensor \"lm_head.weight\" has shape [16, 32]", "stored transposed: expected [32, 16]"}},
      [&] { io::load_mamba(model, ckpt); }, &model);
}

TEST_CASE("badinput: a Hugging Face checkpoint without its embedding names the missing tensor") {
  TempDir dir;
  const std::string ckpt = copy_fixture(dir, "mamba_tiny");
  {
    const auto f = io::SafetensorsFile::open(ckpt + "/model.safetensors");
    io::SafetensorsWriter w;
    std::vector<Tensor<float>> keep;
    keep.reserve(f.tensors().size());
    for (const auto& t : f.tensors())
      if (t.name != "backbone.embeddings.weight") {
        keep.push_back(f.read<float>(t.name));
        w.add(t.name, keep.back());
      }
    w.write(ckpt + "/model.safetensors");
  }
  TinyLM model({32, true, 0});
  expect_error<ValueError>(
      dir.path(),
      {ckpt + "/model.safetensors",
       {"missing 1 tensor: \"backbone.embeddings.weight\" (for parameter \"embedding.weight\")"}},
      [&] { io::load_mamba(model, ckpt); }, &model);
}
