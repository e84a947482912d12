// Bad input: training checkpoint directories (the `latest` file) and checkpoint metadata.
#include "badinput.hpp"

namespace badinput {

// A directory with one good checkpoint of SmallParams at step 3, and its `latest` removed.
inline std::string checkpoint_dir(const TempDir& dir) {
  SmallParams p;
  const std::string ckpts = dir.file("checkpoints");
  io::save_checkpoint_to_dir(ckpts, p.list, io::NoOptimizer{}, 3);
  fs::remove(ckpts + "/latest");
  return ckpts;
}

}  // namespace badinput

using namespace badinput;

TEST_CASE("badinput: checkpoint latest that is a symlink to /dev/zero") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  fs::create_symlink("/dev/zero", ckpts + "/latest");
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"is a character device"}},
                        [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint latest that is a FIFO does not block") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  REQUIRE(::mkfifo((ckpts + "/latest").c_str(), 0600) == 0);
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"is a FIFO"}}, [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint latest that is a dangling symlink") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  fs::create_symlink("step_00000009.safetensors", ckpts + "/latest");
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"is a dangling symbolic link"}},
                        [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint latest holding control characters is escaped") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  write_file(ckpts + "/latest", "step_\x1b[2J\r.safetensors\n");
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"holds \"step_\\x1b[2J\\x0d.safetensors\""}},
                        [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint latest larger than a file name") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  write_file(ckpts + "/latest", std::string(10000, 's'));
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"is 10000 bytes, more than the 4096 bytes"}},
                        [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint latest naming a directory") {
  TempDir dir;
  const std::string ckpts = checkpoint_dir(dir);
  fs::create_directory(ckpts + "/step_00000007.safetensors");
  write_file(ckpts + "/latest", "step_00000007.safetensors\n");
  expect_error<IOError>(dir.path(), {ckpts + "/latest", {"which does not exist or is not a regular file"}},
                        [&] { (void)io::latest_checkpoint(ckpts); });
}

TEST_CASE("badinput: checkpoint metadata format with raw bytes is escaped") {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  SmallParams p;
  {
    io::SafetensorsWriter w;
    for (auto* q : p.list) w.add("param/" + q->name, q->value);
    w.set_metadata("format", "ssmx\u0007\u001b]0;pwned\u0007");
    w.write(path);
  }
  expect_error<IOError>(
      dir.path(), {path, {"field \"__metadata__.format\" is \"ssmx\\x07\\x1b]0;pwned\\x07\""}},
      [&] { io::load_checkpoint(path, p.list); }, &p);
}
