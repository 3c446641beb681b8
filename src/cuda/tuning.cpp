// The JSON tuning table (see tuning.hpp and docs/TUNING.md). A small strict JSON reader: objects,
// arrays, strings (no \u escapes beyond ASCII), numbers, true/false/null.
#include "cuda/tuning.hpp"

#include "backend.hpp"

#include <cuda_runtime.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace mhc::cuda_impl {

namespace {

struct Json {
  enum Kind { null, boolean, number, string, array, object } kind = null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;

  const Json* find(const std::string& key) const {
    for (const auto& [k, v] : members)
      if (k == key) return &v;
    return nullptr;
  }
};

class Reader {
 public:
  explicit Reader(const std::string& text) : s_(text) {}

  Json document() {
    Json v = value();
    skip();
    if (p_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("at offset " + std::to_string(p_) + ": " + what);
  }
  void skip() {
    while (p_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[p_]))) ++p_;
  }
  bool take(char c) {
    skip();
    if (p_ < s_.size() && s_[p_] == c) {
      ++p_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!take(c)) fail(std::string("expected '") + c + "'");
  }
  bool word(const char* w) {
    const std::string ws(w);
    if (s_.compare(p_, ws.size(), ws) == 0) {
      p_ += ws.size();
      return true;
    }
    return false;
  }
  std::string string_body() {
    std::string out;
    while (p_ < s_.size() && s_[p_] != '"') {
      char c = s_[p_++];
      if (c == '\\') {
        if (p_ >= s_.size()) fail("unterminated escape");
        const char e = s_[p_++];
        switch (e) {
          case 'n': c = '\n'; break;
          case 't': c = '\t'; break;
          case 'r': c = '\r'; break;
          case 'b': c = '\b'; break;
          case 'f': c = '\f'; break;
          case 'u': {
            if (p_ + 4 > s_.size()) fail("short \\u escape");
            const long code = std::strtol(s_.substr(p_, 4).c_str(), nullptr, 16);
            p_ += 4;
            c = code < 128 ? static_cast<char>(code) : '?';
            break;
          }
          default: c = e;
        }
      }
      out += c;
    }
    if (p_ >= s_.size()) fail("unterminated string");
    ++p_;
    return out;
  }
  Json value() {
    skip();
    if (p_ >= s_.size()) fail("unexpected end");
    Json v;
    const char c = s_[p_];
    if (c == '{') {
      ++p_;
      v.kind = Json::object;
      if (take('}')) return v;
      do {
        skip();
        if (!take('"')) fail("expected a key");
        std::string key = string_body();
        expect(':');
        v.members.emplace_back(std::move(key), value());
      } while (take(','));
      expect('}');
    } else if (c == '[') {
      ++p_;
      v.kind = Json::array;
      if (take(']')) return v;
      do v.items.push_back(value());
      while (take(','));
      expect(']');
    } else if (c == '"') {
      ++p_;
      v.kind = Json::string;
      v.str = string_body();
    } else if (word("true")) {
      v.kind = Json::boolean;
      v.b = true;
    } else if (word("false")) {
      v.kind = Json::boolean;
    } else if (word("null")) {
      v.kind = Json::null;
    } else {
      char* end = nullptr;
      v.num = std::strtod(s_.c_str() + p_, &end);
      if (end == s_.c_str() + p_) fail("unexpected character");
      p_ = static_cast<std::size_t>(end - s_.c_str());
      v.kind = Json::number;
    }
    return v;
  }

  const std::string& s_;
  std::size_t p_ = 0;
};

struct Range {
  std::int64_t lo = INT64_MIN, hi = INT64_MAX;
  bool contains(std::int64_t v) const { return v >= lo && v <= hi; }
};

struct Entry {
  std::string op;
  int n = 0;          // 0 = any
  std::string dtype;  // "" = any
  Range C, tokens;
  std::map<std::string, int> params;
};

struct Table {
  std::string path;  // "" when no file was found or it was malformed
  std::vector<Entry> entries;
  std::string error;  // why the file was ignored
};

// A number, [lo, hi] (null = unbounded) or absent (any).
Range parse_range(const Json* v, const char* what) {
  Range r;
  if (!v || v->kind == Json::null) return r;
  if (v->kind == Json::number) {
    r.lo = r.hi = static_cast<std::int64_t>(v->num);
    return r;
  }
  if (v->kind != Json::array || v->items.size() != 2)
    throw std::runtime_error(std::string(what) + ": expected a number or [lo, hi]");
  if (v->items[0].kind == Json::number) r.lo = static_cast<std::int64_t>(v->items[0].num);
  if (v->items[1].kind == Json::number) r.hi = static_cast<std::int64_t>(v->items[1].num);
  return r;
}

std::vector<Entry> parse_table(const std::string& text, const std::string& device_name) {
  const Json doc = Reader(text).document();
  if (doc.kind != Json::object) throw std::runtime_error("the document must be an object");
  const Json* fmt = doc.find("format");
  if (!fmt || fmt->kind != Json::string || fmt->str != "mhc-tuning")
    throw std::runtime_error("\"format\" must be \"mhc-tuning\"");
  const Json* version = doc.find("version");
  if (!version || version->kind != Json::number || version->num != 1)
    throw std::runtime_error("\"version\" must be 1");
  std::vector<Entry> out;
  // Entries measured on another GPU model do not apply here.
  if (const Json* dev = doc.find("device"); dev && dev->kind == Json::string && !dev->str.empty() &&
                                            dev->str != device_name)
    return out;
  const Json* entries = doc.find("entries");
  if (!entries || entries->kind != Json::array) throw std::runtime_error("\"entries\" must be an array");
  for (const Json& e : entries->items) {
    if (e.kind != Json::object) throw std::runtime_error("every entry must be an object");
    Entry entry;
    const Json* op = e.find("op");
    if (!op || op->kind != Json::string) throw std::runtime_error("entry without \"op\"");
    entry.op = op->str;
    if (const Json* n = e.find("n"); n && n->kind == Json::number) entry.n = static_cast<int>(n->num);
    if (const Json* d = e.find("dtype"); d && d->kind == Json::string) entry.dtype = d->str;
    entry.C = parse_range(e.find("C"), "C");
    entry.tokens = parse_range(e.find("tokens"), "tokens");
    const Json* params = e.find("params");
    if (!params || params->kind != Json::object) throw std::runtime_error("entry without \"params\" object");
    for (const auto& [k, v] : params->members) {
      if (v.kind != Json::number) throw std::runtime_error("param " + k + ": expected an integer");
      entry.params[k] = static_cast<int>(v.num);
    }
    out.push_back(std::move(entry));
  }
  return out;
}

std::string default_path() {
  if (const char* p = std::getenv("MHC_TUNING_FILE"); p && *p) return p;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/mhc/tuning.json";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/mhc/tuning.json";
  return "";
}

std::string current_device_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return prop.name;
}

std::mutex table_mutex;
std::shared_ptr<const Table> table;  // null until the first lookup

std::shared_ptr<const Table> read_default_file() {
  auto t = std::make_shared<Table>();
  const std::string path = default_path();
  if (path.empty()) return t;
  std::ifstream in(path);
  if (!in) return t;
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    t->entries = parse_table(ss.str(), current_device_name());
    t->path = path;
  } catch (const std::exception& e) {
    t->error = path + ": " + e.what();
    std::fprintf(stderr, "mhc: ignoring tuning file %s\n", t->error.c_str());
  }
  return t;
}

std::shared_ptr<const Table> get_table() {
  const std::lock_guard<std::mutex> lock(table_mutex);
  if (!table) table = read_default_file();
  return table;
}

TuningStatus status_of(const Table& t) { return {t.path, static_cast<int>(t.entries.size()), t.error}; }

}  // namespace

int tuned(const TuningKey& key, const char* param, int fallback) {
  const auto t = get_table();
  for (const Entry& e : t->entries) {
    if (e.op != key.op) continue;
    if (e.n != 0 && e.n != key.n) continue;
    if (!e.dtype.empty() && e.dtype != dtype_name(key.dtype)) continue;
    if (!e.C.contains(key.C) || !e.tokens.contains(key.tokens)) continue;
    const auto it = e.params.find(param);
    if (it != e.params.end()) return it->second;  // else a later, broader entry may set it
  }
  return fallback;
}

TuningStatus tuning_status() { return status_of(*get_table()); }

TuningStatus reload_tuning() {
  auto t = read_default_file();
  const std::lock_guard<std::mutex> lock(table_mutex);
  table = t;
  return status_of(*t);
}

void set_tuning_json(const std::string& json) {
  const std::string error = load_tuning_text(json, current_device_name());
  if (!error.empty()) throw InvalidArgument("tuning table: " + error);
}

std::string load_tuning_text(const std::string& text, const std::string& device_name) {
  auto t = std::make_shared<Table>();
  try {
    t->entries = parse_table(text, device_name);
    t->path = "<text>";
  } catch (const std::exception& e) {
    return e.what();
  }
  const std::lock_guard<std::mutex> lock(table_mutex);
  table = t;
  return "";
}

}  // namespace mhc::cuda_impl
