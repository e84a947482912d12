// ssmx — JSON from untrusted files (config.json, model.safetensors.index.json, safetensors
// headers), read strictly and without recursion on the input's depth:
//   - nesting deeper than max_json_depth is refused while parsing, so that nothing later
//     (a copy, a comparison, a dump) recurses deeper than that;
//   - a key repeated within one object is an error (a reader must not silently keep one);
//   - every parse failure, number overflows (1e400) included, is an IOError naming the file
//     and, where known, the field;
//   - json_excerpt() renders a value for a message iteratively, bounded in depth and length.
// Needs nlohmann_json (CMake target ssmx::io).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "file.hpp"

namespace ssmx::io {

// Bounds on what read_json() and parse_json() accept.
inline constexpr std::uint64_t max_json_bytes = std::uint64_t(64) << 20;
inline constexpr int max_json_depth = 64;

namespace detail {

// The text after nlohmann's "[json.exception.parse_error.101] " tag, escaped (the lexer
// quotes the raw bytes it stopped at).
inline std::string json_error_text(const std::exception& e) {
  std::string w = e.what();
  const auto close = w.find("] ");
  if (!w.empty() && w[0] == '[' && close != std::string::npos) w = w.substr(close + 2);
  return printable(w, 200);
}

// A short rendering of a JSON value for error messages: compact JSON, containers deeper
// than 3 levels shown as [...] or {...}, cut after about 80 characters. Iterative.
inline std::string json_excerpt(const nlohmann::json& j, std::size_t max_chars = 80) {
  using json = nlohmann::json;
  struct Frame {
    const json* value;
    json::const_iterator it;
    bool first;
  };
  std::vector<Frame> stack;
  std::string out;
  const auto emit = [&](const json& v) {
    if (v.is_structured()) {
      if (stack.size() >= 3) {
        out += v.is_array() ? "[...]" : "{...}";
        return;
      }
      out += v.is_array() ? '[' : '{';
      stack.push_back(Frame{&v, v.cbegin(), true});
    } else if (v.is_string()) {
      out += '"' + printable(v.get_ref<const std::string&>(), max_chars) + '"';
    } else {
      out += v.dump();  // a number, true, false or null
    }
  };
  emit(j);
  while (!stack.empty() && out.size() <= max_chars) {
    Frame& f = stack.back();
    if (f.it == f.value->cend()) {
      out += f.value->is_array() ? ']' : '}';
      stack.pop_back();
      continue;
    }
    if (!f.first) out += ',';
    f.first = false;
    if (f.value->is_object()) out += '"' + printable(f.it.key(), max_chars) + "\":";
    const json& child = *f.it;
    ++f.it;
    emit(child);  // may grow the stack: f is not used after this
  }
  if (out.size() > max_chars) {
    std::size_t cut = max_chars - 3;
    while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xc0) == 0x80) --cut;  // not inside a UTF-8 sequence
    out = out.substr(0, cut) + "...";
  }
  return out;
}

// Where the parser is, for messages: the keys of the open objects ("ssm_cfg.d_state").
struct JsonParseState {
  struct Frame {
    bool object;
    std::string key;  // the last key read in this object
    std::unordered_set<std::string> keys;
  };
  std::vector<Frame> frames;
  std::string field() const {
    std::string f;
    for (const auto& fr : frames) {
      if (!fr.object) {
        f += "[]";
      } else if (!fr.key.empty()) {
        if (!f.empty()) f += '.';
        f += fr.key;
      }
    }
    return f;
  }
};

// Python's json module writes float('inf'), -inf and nan as the bare words Infinity,
// -Infinity and NaN, which JSON does not have (Hugging Face configs hold
// "time_step_limit": [0.0, Infinity]). Outside strings, each such word becomes a string
// holding a marker that cannot come from the file's own strings (it starts with a NUL
// byte, which a JSON string spells \u0000), turned back into the number while parsing.
inline const std::string& python_literal_marker(int which) {  // 0: inf, 1: -inf, 2: nan
  static const std::string m[3] = {std::string("\0ssmx:inf", 9), std::string("\0ssmx:-inf", 10),
                                   std::string("\0ssmx:nan", 9)};
  return m[which];
}
inline std::string mark_python_literals(const std::string& text) {
  static const char* const words[3] = {"Infinity", "-Infinity", "NaN"};
  static const char* const spelled[3] = {"\"\\u0000ssmx:inf\"", "\"\\u0000ssmx:-inf\"", "\"\\u0000ssmx:nan\""};
  const auto word_char = [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.';
  };
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size()) {
        out += text[++i];
      } else if (ch == '"') {
        in_string = false;
      }
      continue;
    }
    if (ch == '"') {
      in_string = true;
      out += ch;
      continue;
    }
    bool replaced = false;
    if (i == 0 || !word_char(text[i - 1]))
      for (int w = 0; w < 3 && !replaced; ++w) {
        const std::size_t len = std::char_traits<char>::length(words[w]);
        if (text.compare(i, len, words[w]) == 0 && (i + len == text.size() || !word_char(text[i + len]))) {
          out += spelled[w];
          i += len - 1;
          replaced = true;
        }
      }
    if (!replaced) out += ch;
  }
  return out;
}

}  // namespace detail

// Parses `text`, the content of `source` (a file name; `what` says which part of it, e.g.
// "the header", or is empty for the whole file). IOError naming the source, the field and
// the byte for invalid JSON, a number beyond a double, nesting deeper than `max_depth`, or
// a key repeated within an object.
// With `python_literals`, the words Infinity, -Infinity and NaN that Python's json module
// writes for non-finite floats are read as those numbers (see read_config_json).
inline nlohmann::json parse_json(const std::string& text, const std::string& source, const std::string& what = "",
                                 int max_depth = max_json_depth, bool python_literals = false) {
  using json = nlohmann::json;
  const std::string subject = (what.empty() ? std::string("the JSON") : what) + " ";  // "... nests deeper"
  const std::string is = what.empty() ? std::string() : what + " is ";                // "... not valid JSON"
  const std::string of_what = what.empty() ? std::string() : " of " + what;
  detail::JsonParseState st;
  const auto where = [&] {
    const std::string f = st.field();
    return f.empty() ? std::string() : " in field \"" + detail::printable(f) + "\"";
  };
  const json::parser_callback_t cb = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (int(st.frames.size()) >= max_depth)
          throw IOError(
              detail::str(source, ": ", subject, "nests deeper than ", max_depth, " levels", where(), "; refused"));
        st.frames.push_back({event == json::parse_event_t::object_start, {}, {}});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end: st.frames.pop_back(); break;
      case json::parse_event_t::key: {
        auto& fr = st.frames.back();
        fr.key = parsed.get<std::string>();
        if (!fr.keys.insert(fr.key).second) {
          const std::string key = fr.key;
          fr.key.clear();
          throw IOError(detail::str(source, ": ", subject, "has the key \"", detail::printable(key), "\" twice",
                                    st.field().empty() ? " at the top level" : where(),
                                    " (JSON readers differ on which one counts)"));
        }
        break;
      }
      case json::parse_event_t::value:
        if (python_literals && parsed.is_string()) {
          const std::string& v = parsed.get_ref<const std::string&>();
          if (!v.empty() && v[0] == '\0') {
            if (v == detail::python_literal_marker(0))
              parsed = std::numeric_limits<double>::infinity();
            else if (v == detail::python_literal_marker(1))
              parsed = -std::numeric_limits<double>::infinity();
            else if (v == detail::python_literal_marker(2))
              parsed = std::numeric_limits<double>::quiet_NaN();
          }
        }
        break;
    }
    return true;
  };
  try {
    if (python_literals) return json::parse(detail::mark_python_literals(text), cb);
    return json::parse(text, cb);
  } catch (const json::parse_error& e) {
    throw IOError(detail::str(source, ": ", is, "not valid JSON: error at byte ", e.byte, of_what, where(), ": ",
                              detail::json_error_text(e)));
  } catch (const json::exception& e) {  // out_of_range: a number beyond a double
    throw IOError(detail::str(source, ": ", is, "not valid JSON", where(), ": ", detail::json_error_text(e)));
  }
}

// Reads and parses the JSON file at `path` (a regular file of at most `max_bytes`).
// IOError naming the file when it cannot be read, is too large, or is not valid JSON.
inline nlohmann::json read_json(const std::string& path, std::uint64_t max_bytes = max_json_bytes) {
  return parse_json(read_file_bounded(path, max_bytes), path);
}

// read_json for a model's config.json as Python writes it: the non-standard words
// Infinity, -Infinity and NaN (Python's json.dump of float('inf') and nan) read as numbers.
// Byte offsets in parse errors count the file with those words spelled as strings.
inline nlohmann::json read_config_json(const std::string& path, std::uint64_t max_bytes = max_json_bytes) {
  return parse_json(read_file_bounded(path, max_bytes), path, "", max_json_depth, true);
}

namespace detail {

// json_field with the name shown in messages (e.g. "ssm_cfg.d_state" for key "d_state").
template <class T>
T json_field_named(const nlohmann::json& obj, const std::string& key, const std::string& shown,
                   const std::string& file) {
  SSMX_REQUIRE(obj.is_object(), IOError, file, ": expected a JSON object holding field \"", shown, "\", found a ",
               obj.type_name());
  auto it = obj.find(key);
  SSMX_REQUIRE(it != obj.end(), IOError, file, ": field \"", shown, "\" is missing");
  const nlohmann::json& v = *it;
  const auto bad = [&](const char* expected) {
    return IOError(str(file, ": field \"", shown, "\" is ", json_excerpt(v), ", expected ", expected));
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
    if (s < std::int64_t(std::numeric_limits<T>::min()) ||
        (s > 0 && std::uint64_t(s) > std::uint64_t(std::numeric_limits<T>::max())))
      throw bad("an integer in range");
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

}  // namespace detail

// Field `key` of a JSON object (a config.json) as T: bool, an integer type, a floating
// type or std::string. IOError naming the file, the field, the expected type and what was
// found when it is absent, of another type, or out of T's range.
template <class T>
T json_field(const nlohmann::json& obj, const std::string& key, const std::string& file) {
  return detail::json_field_named<T>(obj, key, key, file);
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

}  // namespace ssmx::io
