// Bad input: sharded checkpoints (model.safetensors.index.json and its shards), and what
// stands at model.safetensors when there is no index.
#include "badinput.hpp"

namespace badinput {

inline const std::string shard_a =
    safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", le_f32(1) + le_f32(2));
inline const std::string shard_b = safetensors(R"({"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})",
                                               le_f32(3) + le_f32(4) + le_f32(5) + le_f32(6));
inline const std::string good_index =
    R"({"metadata":{"total_size":24},"weight_map":{"a":"model-1.safetensors","b":"model-2.safetensors"}})";

// A directory with the two shards and `index` as model.safetensors.index.json; loading it
// into SmallParams must fail naming `file` (the index unless said otherwise).
inline void sharded_case(const std::string& index, const std::vector<std::string>& fields,
                         const std::string& shard1 = shard_a, const std::string& shard2 = shard_b,
                         const std::string& file = "model.safetensors.index.json") {
  TempDir dir;
  write_file(dir.file("model-1.safetensors"), shard1);
  write_file(dir.file("model-2.safetensors"), shard2);
  write_file(dir.file("model.safetensors.index.json"), index);
  SmallParams p;
  expect_error<IOError>(
      dir.path(), {dir.file(file), fields},
      [&] { io::load_parameters(io::SafetensorsShards::open_dir(dir.path()), p.list); }, &p);
}

}  // namespace badinput

using namespace badinput;

TEST_CASE("badinput: sharded control - the good checkpoint loads") {
  TempDir dir;
  write_file(dir.file("model-1.safetensors"), shard_a);
  write_file(dir.file("model-2.safetensors"), shard_b);
  write_file(dir.file("model.safetensors.index.json"), good_index);
  SmallParams p;
  CHECK(io::load_parameters(io::SafetensorsShards::open_dir(dir.path()), p.list).empty());
  CHECK(p.list[1]->value[3] == 6.0f);
}

TEST_CASE("badinput: sharded tensor in a shard that weight_map does not list") {
  const std::string extra = safetensors(R"({"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                                        R"("hidden":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})",
                                        std::string(20, '\0'));
  sharded_case(good_index, {"model-2.safetensors holds tensor \"hidden\"", "field \"weight_map\" does not list"},
               shard_a, extra);
}

TEST_CASE("badinput: sharded tensor stored in two shards") {
  const std::string both = safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})",
                                       std::string(24, '\0'));
  sharded_case(good_index, {"tensor \"a\" is stored in two shards", "model-1.safetensors", "model-2.safetensors"},
               shard_a, both);
}

TEST_CASE("badinput: sharded key repeated in weight_map") {
  sharded_case(R"({"weight_map":{"a":"model-1.safetensors","b":"model-2.safetensors","a":"model-2.safetensors"}})",
               {"has the key \"a\" twice", "in field \"weight_map\""});
}

TEST_CASE("badinput: sharded deeply nested weight_map value") {
  sharded_case(R"({"weight_map":{"a":)" + nested(200000) + "}}", {"nests deeper than 64 levels", "weight_map.a"});
}

TEST_CASE("badinput: sharded number beyond a double in the index") {
  sharded_case(R"({"metadata":{"total_size":1e400},"weight_map":{"a":"model-1.safetensors"}})",
               {"not valid JSON", "metadata.total_size", "number overflow"});
}

TEST_CASE("badinput: sharded index without weight_map") {
  sharded_case(R"({"metadata":{}})", {"field \"weight_map\" is missing or not an object"});
}

TEST_CASE("badinput: sharded weight_map value that is not a string") {
  sharded_case(R"({"weight_map":{"a":1}})", {"field \"weight_map\": tensor \"a\" maps to 1"});
}

TEST_CASE("badinput: sharded shard name outside the directory") {
  sharded_case(R"({"weight_map":{"a":"../model-1.safetensors"}})",
               {"tensor \"a\" maps to \"../model-1.safetensors\"", "expected a file name in the index's directory"});
}

TEST_CASE("badinput: sharded shard name with control characters is escaped") {
  sharded_case(R"({"weight_map":{"a":"model\u001b\n.safetensors"}})", {"maps to \"model\\x1b\\n.safetensors\""});
}

TEST_CASE("badinput: sharded shard that does not exist") {
  sharded_case(R"({"weight_map":{"a":"model-1.safetensors","b":"model-3.safetensors"}})",
               {"model-3.safetensors: cannot open"}, shard_a, shard_b, "model-3.safetensors");
}

TEST_CASE("badinput: sharded weight_map naming a tensor the shard lacks") {
  sharded_case(R"({"weight_map":{"a":"model-2.safetensors","b":"model-2.safetensors"}})",
               {"field \"weight_map\" puts tensor \"a\" in", "which has no such tensor"});
}

TEST_CASE("badinput: sharded shard with a hole in its data") {
  const std::string holey =
      safetensors(R"({"b":{"dtype":"F32","shape":[2,2],"data_offsets":[4,20]}})", std::string(20, '\0'));
  sharded_case(good_index, {"tensor \"b\"", "hole in the data buffer"}, shard_a, holey, "model-2.safetensors");
}

TEST_CASE("badinput: sharded index that is a FIFO does not block") {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  REQUIRE(::mkfifo(index.c_str(), 0600) == 0);
  SmallParams p;
  expect_error<IOError>(
      dir.path(), {index, {"is a FIFO (named pipe)"}}, [&] { io::SafetensorsShards::open_dir(dir.path()); }, &p);
}

TEST_CASE("badinput: sharded index that is a symlink to /dev/zero") {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  fs::create_symlink("/dev/zero", index);
  expect_error<IOError>(dir.path(), {index, {"is a character device"}},
                        [&] { io::SafetensorsShards::open_dir(dir.path()); });
}

TEST_CASE("badinput: sharded index that is a dangling symlink") {
  TempDir dir;
  write_file(dir.file("model.safetensors"), shard_a);  // not a fallback for a broken index
  const std::string index = dir.file("model.safetensors.index.json");
  fs::create_symlink("gone.json", index);
  expect_error<IOError>(dir.path(), {index, {"is a dangling symbolic link"}},
                        [&] { io::SafetensorsShards::open_dir(dir.path()); });
}

TEST_CASE("badinput: single file that is a dangling symlink") {
  TempDir dir;
  const std::string single = dir.file("model.safetensors");
  fs::create_symlink("nowhere.safetensors", single);
  expect_error<IOError>(dir.path(), {single, {"is a dangling symbolic link"}},
                        [&] { io::SafetensorsShards::open_dir(dir.path()); });
}

TEST_CASE("badinput: single file in a symlink loop") {
  TempDir dir;
  const std::string single = dir.file("model.safetensors");
  fs::create_symlink("model.safetensors", single);
  expect_error<IOError>(dir.path(), {single, {"a loop of symbolic links"}},
                        [&] { io::SafetensorsShards::open_dir(dir.path()); });
}
