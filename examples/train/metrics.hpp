// JSON-lines metrics: one object per logged step ("type": "train") and per evaluation
// ("type": "eval"), keys in a fixed order, doubles printed with %.17g so that they read back
// to the same bits (and two runs can be compared line by line).
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <ssmx/io/file.hpp>  // write_file_atomically, read_file_bounded

namespace train {

// One JSON object, built key by key.
class JsonLine {
 public:
  JsonLine& add(const char* key, double v) {
    char buf[40];
    if (std::isfinite(v))
      std::snprintf(buf, sizeof buf, "%.17g", v);
    else
      std::snprintf(buf, sizeof buf, "null");  // JSON has no inf or NaN
    return raw(key, buf);
  }
  JsonLine& add(const char* key, std::int64_t v) { return raw(key, std::to_string(v)); }
  JsonLine& add(const char* key, const std::string& v) { return raw(key, nlohmann::json(v).dump()); }
  JsonLine& add(const char* key, const char* v) { return add(key, std::string(v)); }
  // A value already serialised as JSON.
  JsonLine& add_json(const char* key, const std::string& json) { return raw(key, json); }
  std::string str() const { return "{" + body_ + "}"; }

 private:
  JsonLine& raw(const char* key, const std::string& value) {
    if (!body_.empty()) body_ += ",";
    body_ += nlohmann::json(key).dump() + ":" + value;
    return *this;
  }
  std::string body_;
};

class MetricsFile {
 public:
  MetricsFile() = default;
  MetricsFile(const MetricsFile&) = delete;
  MetricsFile& operator=(const MetricsFile&) = delete;
  ~MetricsFile() {
    if (f_) std::fclose(f_);
  }

  // A new file; refuses to replace an existing one (a previous run's metrics).
  void create(const std::string& path) {
    path_ = path;
    f_ = std::fopen(path.c_str(), "wx");
    if (!f_)
      throw ssmx::IOError(ssmx::detail::str(path, ": cannot create the metrics file: ", std::strerror(errno)));
  }

  // Continues the file of a resumed run: lines of steps after `step` (written after the
  // checkpoint being resumed from, and to be written again) and a torn last line are
  // dropped, atomically, then new lines are appended. Returns the number of lines dropped.
  std::size_t resume(const std::string& path, std::int64_t step) {
    path_ = path;
    std::string text;
    std::uint64_t size = 0;
    std::string why;
    if (ssmx::io::detail::try_open_regular(path, size, why)) {
      text = ssmx::io::read_file_bounded(path, max_bytes);
    } else {
      struct stat st {};
      if (::lstat(path.c_str(), &st) == 0 || errno != ENOENT)  // there, but not a file to append to
        throw ssmx::IOError(ssmx::detail::str(path, ": the metrics file ", why));
    }
    std::string kept;
    std::size_t dropped = 0;
    for (std::size_t begin = 0; begin < text.size();) {
      const std::size_t nl = text.find('\n', begin);
      const bool complete = nl != std::string::npos;
      const std::string line = text.substr(begin, complete ? nl - begin : std::string::npos);
      begin = complete ? nl + 1 : text.size();
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      const bool after = j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
                         j["step"].get<std::int64_t>() > step;
      if (!complete || j.is_discarded() || after) {  // torn by a kill, or a step the checkpoint does not have
        ++dropped;
        continue;
      }
      kept += line + "\n";
    }
    if (kept != text) ssmx::io::write_file_atomically(path, kept);
    f_ = std::fopen(path.c_str(), "a");
    if (!f_)
      throw ssmx::IOError(ssmx::detail::str(path, ": cannot open the metrics file to append: ", std::strerror(errno)));
    return dropped;
  }

  // Written through at once: a killed run loses no logged step.
  void write(const JsonLine& line) {
    const std::string s = line.str() + "\n";
    if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0)
      throw ssmx::IOError(ssmx::detail::str(path_, ": cannot write the metrics file: ", std::strerror(errno)));
  }

  const std::string& path() const { return path_; }

  static constexpr std::uint64_t max_bytes = std::uint64_t(16) << 30;

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// The curves of a metrics file, for the plot and the summary.
struct Point {
  std::int64_t step;
  double loss, accuracy;
};
struct History {
  std::vector<Point> train, eval;
  double chance = -1;  // recall: the chance accuracy; -1 when there is none
};

inline History read_history(const std::string& path) {
  History h;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("type") || !j.contains("step")) continue;
    auto num = [&](const char* k) { return j.contains(k) && j[k].is_number() ? j[k].get<double>() : NAN; };
    const Point p{j["step"].get<std::int64_t>(), num("loss"), num("accuracy")};
    if (j["type"] == "train") h.train.push_back(p);
    if (j["type"] == "eval") {
      h.eval.push_back(p);
      if (j.contains("chance")) h.chance = num("chance");
    }
  }
  return h;
}

}  // namespace train
