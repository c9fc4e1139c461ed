#include "runtime/chat_template.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "util/error.h"

namespace hymba {

namespace fs = std::filesystem;

// ------------------------------------------------------------ the template

const std::string& hymba_template_string() {
  // Exactly the "chat_template" string of nvidia/Hymba-1.5B-Instruct's
  // tokenizer_config.json (spec section 6); the newlines are real newline
  // characters inside the Jinja string literals, as in the JSON file.
  static const std::string t =
      "{{'<extra_id_0>System'}}{% for message in messages %}{% if message['role'] == 'system' %}"
      "{{'\n' + message['content'].strip()}}{% if tools or contexts %}{{'\n'}}{% endif %}{% endif %}"
      "{% endfor %}{% if tools %}{% for tool in tools %}{{ '\n<tool> ' + tool|tojson + ' </tool>' }}"
      "{% endfor %}{% endif %}{% if contexts %}{% if tools %}{{'\n'}}{% endif %}{% for context in contexts %}"
      "{{ '\n<context> ' + context.strip() + ' </context>' }}{% endfor %}{% endif %}{{'\n\n'}}"
      "{% for message in messages %}{% if message['role'] == 'user' %}"
      "{{ '<extra_id_1>User\n' + message['content'].strip() + '\n' }}"
      "{% elif message['role'] == 'assistant' %}"
      "{{ '<extra_id_1>Assistant\n' + message['content'].strip() + '\n' }}"
      "{% elif message['role'] == 'tool' %}{{ '<extra_id_1>Tool\n' + message['content'].strip() + '\n' }}"
      "{% endif %}{% endfor %}{%- if add_generation_prompt %}{{'<extra_id_1>Assistant\n'}}{%- endif %}";
  return t;
}

namespace {

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string normalize_newlines(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r') {
      out += '\n';
      if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The value of a Jinja string literal body: Jinja normalises newlines and
// then decodes Python's unicode-escape sequences.
std::string unescape_literal(const std::string& body) {
  const std::string s = normalize_newlines(body);
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    switch (c) {
      case '\n': break;  // line continuation
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x':
      case 'u':
      case 'U': {
        const size_t nd = c == 'x' ? 2 : (c == 'u' ? 4 : 8);
        uint32_t cp = 0;
        size_t k = 0;
        for (; k < nd && i + 1 + k < s.size() && hex_value(s[i + 1 + k]) >= 0; ++k)
          cp = cp * 16 + uint32_t(hex_value(s[i + 1 + k]));
        if (k != nd || cp > 0x10FFFF) {  // malformed: Python would fail; keep the text
          out += '\\';
          out += c;
        } else {
          append_utf8(out, cp);
          i += nd;
        }
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          uint32_t cp = uint32_t(c - '0');
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k)
            cp = cp * 8 + uint32_t(s[++i] - '0');
          append_utf8(out, cp);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return out;
}

// Jinja's lexical view of a template, with everything Jinja ignores removed:
// data text (newlines normalised), tag delimiters with their whitespace-control
// markers, and inside tags names, literals (decoded) and operator characters.
// Whitespace inside tags and comments vanish. Returns false on a template
// that does not lex (an unterminated tag or literal).
bool jinja_tokens(const std::string& src, std::vector<std::string>& toks) {
  const std::string s = normalize_newlines(src);
  std::string data;
  auto flush_data = [&] {
    if (!data.empty()) toks.push_back("D" + data);
    data.clear();
  };
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    if (s[i] != '{' || i + 1 >= n || (s[i + 1] != '{' && s[i + 1] != '%' && s[i + 1] != '#')) {
      data += s[i++];
      continue;
    }
    const char kind = s[i + 1];
    if (kind == '#') {
      const size_t e = s.find("#}", i + 2);
      if (e == std::string::npos) return false;
      i = e + 2;
      continue;
    }
    flush_data();
    const std::string close = kind == '{' ? "}}" : "%}";
    i += 2;
    std::string open = std::string("O") + kind;
    if (i < n && (s[i] == '-' || s[i] == '+')) open += s[i++];
    toks.push_back(open);
    bool closed = false;
    while (i < n) {
      const char c = s[i];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
        ++i;
      } else if (c == '\'' || c == '"') {
        size_t j = i + 1;
        while (j < n && s[j] != c) j += s[j] == '\\' ? 2 : 1;
        if (j >= n) return false;
        toks.push_back("S" + unescape_literal(s.substr(i + 1, j - i - 1)));
        i = j + 1;
      } else if (std::isalnum(static_cast<unsigned char>(c)) || c == '_') {
        size_t j = i;
        while (j < n && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_' || s[j] == '.')) ++j;
        toks.push_back("W" + s.substr(i, j - i));
        i = j;
      } else if ((c == '-' || c == '+') && s.compare(i + 1, 2, close) == 0) {
        toks.push_back(std::string("C") + c);
        i += 3;
        closed = true;
        break;
      } else if (s.compare(i, 2, close) == 0) {
        toks.push_back("C");
        i += 2;
        closed = true;
        break;
      } else {
        toks.push_back(std::string("P") + c);
        ++i;
      }
    }
    if (!closed) return false;
  }
  flush_data();
  return true;
}

std::string read_text_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  check(f.good(), "cannot read ", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ------------------------------------------------------------ UTF-8 / Python

bool python_isspace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Decodes the UTF-8 sequence at s[i]; returns its length (1 for an invalid
// byte, with cp = 0xFFFFFFFF).
size_t decode_utf8(const std::string& s, size_t i, uint32_t& cp) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  size_t len = 0;
  uint32_t v = 0;
  if (c < 0x80) {
    cp = c;
    return 1;
  } else if ((c & 0xE0) == 0xC0) {
    len = 2, v = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3, v = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4, v = c & 0x07;
  } else {
    cp = 0xFFFFFFFF;
    return 1;
  }
  if (i + len > s.size()) {
    cp = 0xFFFFFFFF;
    return 1;
  }
  for (size_t k = 1; k < len; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) {
      cp = 0xFFFFFFFF;
      return 1;
    }
    v = (v << 6) | (b(i + k) & 0x3F);
  }
  static const uint32_t min_of_len[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < min_of_len[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) {
    cp = 0xFFFFFFFF;
    return 1;
  }
  cp = v;
  return len;
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(c));
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

void json_dump(std::string& out, const ordered_json& x) {
  switch (x.type()) {
    case ordered_json::value_t::null: out += "null"; break;
    case ordered_json::value_t::boolean: out += x.get<bool>() ? "true" : "false"; break;
    case ordered_json::value_t::number_integer: out += std::to_string(x.get<int64_t>()); break;
    case ordered_json::value_t::number_unsigned: out += std::to_string(x.get<uint64_t>()); break;
    case ordered_json::value_t::number_float: out += python_float_repr(x.get<double>()); break;
    case ordered_json::value_t::string: json_string(out, x.get_ref<const std::string&>()); break;
    case ordered_json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& v : x) {
        if (!first) out += ", ";
        first = false;
        json_dump(out, v);
      }
      out += ']';
      break;
    }
    case ordered_json::value_t::object: {
      out += '{';
      bool first = true;
      for (const auto& [k, v] : x.items()) {
        if (!first) out += ", ";
        first = false;
        json_string(out, k);
        out += ": ";
        json_dump(out, v);
      }
      out += '}';
      break;
    }
    default: fail("cannot render a JSON value of type ", x.type_name(), " with tojson");
  }
}

std::string describe(const ordered_json& v) {
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

}  // namespace

std::string python_strip(const std::string& s) {
  size_t begin = 0;
  while (begin < s.size()) {
    uint32_t cp;
    const size_t len = decode_utf8(s, begin, cp);
    if (!python_isspace(cp)) break;
    begin += len;
  }
  // Walk forward over the rest, remembering where the last non-space ends.
  size_t end = begin;
  for (size_t i = begin; i < s.size();) {
    uint32_t cp;
    const size_t len = decode_utf8(s, i, cp);
    i += len;
    if (!python_isspace(cp)) end = i;
  }
  return s.substr(begin, end - begin);
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";  // json.dumps spelling (allow_nan)
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits, as Python's repr.
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  std::string out;
  size_t p = 0;
  if (sci[0] == '-') {
    out += '-';
    p = 1;
  }
  const size_t e = sci.find('e');
  std::string digits;
  for (size_t k = p; k < e; ++k)
    if (sci[k] != '.') digits += sci[k];
  const int exp10 = std::stoi(sci.substr(e + 1));
  const int decpt = exp10 + 1;  // value = 0.DIGITS x 10^decpt
  const int nd = int(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out.append("0.").append(size_t(-decpt), '0').append(digits);
    } else if (decpt >= nd) {
      out.append(digits).append(size_t(decpt - nd), '0').append(".0");
    } else {
      out.append(digits, 0, size_t(decpt)).append(".").append(digits, size_t(decpt));
    }
  } else {
    out += digits[0];
    if (nd > 1) out.append(".").append(digits, 1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += eb;
  }
  return out;
}

std::string python_json_dumps(const ordered_json& x) {
  std::string out;
  json_dump(out, x);
  return out;
}

bool python_truthy(const ordered_json& x) {
  switch (x.type()) {
    case ordered_json::value_t::null: return false;
    case ordered_json::value_t::boolean: return x.get<bool>();
    case ordered_json::value_t::number_integer: return x.get<int64_t>() != 0;
    case ordered_json::value_t::number_unsigned: return x.get<uint64_t>() != 0;
    case ordered_json::value_t::number_float: return x.get<double>() != 0.0;
    case ordered_json::value_t::string: return !x.get_ref<const std::string&>().empty();
    case ordered_json::value_t::array:
    case ordered_json::value_t::object: return !x.empty();
    default: return true;
  }
}

bool is_hymba_template(const std::string& tmpl) {
  static const std::vector<std::string> known = [] {
    std::vector<std::string> t;
    jinja_tokens(hymba_template_string(), t);
    return t;
  }();
  std::vector<std::string> got;
  return jinja_tokens(tmpl, got) && got == known;
}

// ------------------------------------------------------------ Conversation

Conversation Conversation::from_json_text(const std::string& text, const std::string& what) {
  ordered_json j;
  try {
    j = ordered_json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(what, " is not valid JSON: ", e.what());
  }
  return from_json(j, what);
}

Conversation Conversation::from_json(const ordered_json& j, const std::string& what) {
  check(j.is_object(), what, " must be a JSON object {\"messages\": [...], ...}, not ", j.type_name());
  Conversation c;
  for (const auto& [k, v] : j.items()) {
    if (k == "messages") {
      check(v.is_array(), what, ": \"messages\" must be an array of {\"role\", \"content\"} objects, not ",
            v.type_name());
      for (size_t i = 0; i < v.size(); ++i)
        check(v[i].is_object(), what, ": messages[", i, "] must be an object with \"role\" and \"content\", not ",
              describe(v[i]));
      c.messages = v;
    } else if (k == "tools") {
      check(v.is_null() || v.is_array(), what, ": \"tools\" must be an array (or null), not ", v.type_name());
      c.tools = v;
    } else if (k == "contexts") {
      check(v.is_null() || v.is_array(), what, ": \"contexts\" must be an array of strings (or null), not ",
            v.type_name());
      c.contexts = v;
    } else if (k == "add_generation_prompt") {
      c.add_generation_prompt = v;
    } else {
      fail(what, ": unknown key \"", k, "\" (expected messages, tools, contexts, add_generation_prompt)");
    }
  }
  check(j.contains("messages"), what, " has no \"messages\" array");
  return c;
}

void Conversation::add_message(const std::string& role, const std::string& content) {
  messages.push_back(ordered_json{{"role", role}, {"content", content}});
}

// ------------------------------------------------------------ ChatTemplate

ChatTemplate ChatTemplate::from_string(const std::string& tmpl) {
  check(is_hymba_template(tmpl),
        "the chat template is not Hymba-1.5B-Instruct's: hymba.cpp renders only that format "
        "(pass --chat-format hymba to use it anyway)");
  ChatTemplate t;
  t.source_ = "the given template";
  return t;
}

ChatTemplate ChatTemplate::load(const std::string& dir, const std::string& format) {
  check(format == "auto" || format == "hymba", "unknown chat format '", format, "' (expected auto or hymba)");
  ChatTemplate t;
  if (format == "hymba") {
    t.source_ = "the Hymba format (--chat-format hymba)";
    return t;
  }
  const fs::path cfg_path = fs::path(dir) / "tokenizer_config.json";
  const fs::path jinja_path = fs::path(dir) / "chat_template.jinja";
  std::string tmpl;
  std::string source;
  if (fs::exists(cfg_path)) {
    ordered_json cfg;
    try {
      cfg = ordered_json::parse(read_text_file(cfg_path));
    } catch (const nlohmann::json::parse_error& e) {
      fail(cfg_path.string(), " is not valid JSON: ", e.what());
    }
    check(cfg.is_object(), cfg_path.string(), " is not a JSON object");
    if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
      const auto& ct = cfg["chat_template"];
      source = cfg_path.string();
      if (ct.is_string()) {
        tmpl = ct.get<std::string>();
      } else if (ct.is_array()) {  // HF's named templates: [{"name", "template"}]
        for (const auto& e : ct)
          if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
            tmpl = e["template"].get<std::string>();
        check(!tmpl.empty(), cfg_path.string(), ": \"chat_template\" is a list without a \"default\" template");
      } else {
        fail(cfg_path.string(), ": \"chat_template\" must be a string, not ", ct.type_name());
      }
    }
  }
  if (source.empty() && fs::exists(jinja_path)) {
    tmpl = read_text_file(jinja_path);
    source = jinja_path.string();
  }
  if (source.empty()) {
    check(fs::exists(cfg_path) || fs::exists(dir), "model directory '", dir, "' does not exist");
    fail("'", dir, "' has no chat template (no \"chat_template\" in tokenizer_config.json, no chat_template.jinja): "
         "a base model? Pass --chat-format hymba to use the Hymba-Instruct chat format anyway");
  }
  check(is_hymba_template(tmpl), "the chat template in ", source,
        " is not Hymba-1.5B-Instruct's; hymba.cpp renders only that format and will not guess another "
        "(pass --chat-format hymba to use the Hymba format anyway)");
  t.source_ = source;
  return t;
}

std::string ChatTemplate::render(const Conversation& c, std::vector<std::string>* warnings) const {
  const auto& msgs = c.messages;
  check(msgs.is_array(), "the conversation's messages must be an array");
  auto role_of = [&](size_t i) -> std::string {
    const auto& m = msgs[i];
    check(m.is_object(), "messages[", i, "] must be an object, not ", describe(m));
    auto it = m.find("role");
    if (it == m.end() || !it->is_string()) return {};
    return it->get<std::string>();
  };
  auto content_of = [&](size_t i, const std::string& role) -> std::string {
    const auto& m = msgs[i];
    auto it = m.find("content");
    check(it != m.end(), "messages[", i, "] (role '", role, "') has no \"content\"");
    check(it->is_string(), "messages[", i, "] (role '", role,
          "'): \"content\" must be a string (Hymba's template calls .strip() on it), not ", describe(*it));
    return python_strip(it->get<std::string>());
  };
  const bool tools = python_truthy(c.tools);
  const bool contexts = python_truthy(c.contexts);
  std::string out = "<extra_id_0>System";
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (role_of(i) != "system") continue;
    out += "\n" + content_of(i, "system");
    if (tools || contexts) out += "\n";
  }
  if (tools) {
    check(c.tools.is_array(), "\"tools\" must be an array");
    for (const auto& tool : c.tools) out += "\n<tool> " + python_json_dumps(tool) + " </tool>";
  }
  if (contexts) {
    check(c.contexts.is_array(), "\"contexts\" must be an array of strings");
    if (tools) out += "\n";
    for (size_t i = 0; i < c.contexts.size(); ++i) {
      const auto& ctx = c.contexts[i];
      check(ctx.is_string(), "contexts[", i, "] must be a string (Hymba's template calls .strip() on it), not ",
            describe(ctx));
      out += "\n<context> " + python_strip(ctx.get<std::string>()) + " </context>";
    }
  }
  out += "\n\n";
  for (size_t i = 0; i < msgs.size(); ++i) {
    const std::string role = role_of(i);
    if (role == "user") {
      out += "<extra_id_1>User\n" + content_of(i, role) + "\n";
    } else if (role == "assistant") {
      out += "<extra_id_1>Assistant\n" + content_of(i, role) + "\n";
    } else if (role == "tool") {
      out += "<extra_id_1>Tool\n" + content_of(i, role) + "\n";
    } else if (role != "system" && warnings) {
      const auto it = msgs[i].find("role");
      warnings->push_back("messages[" + std::to_string(i) + "] has role " +
                          (it == msgs[i].end() ? std::string("(none)") : describe(*it)) +
                          ", which Hymba's chat template ignores (roles: system, user, assistant, tool)");
    }
  }
  if (python_truthy(c.add_generation_prompt)) out += "<extra_id_1>Assistant\n";
  return out;
}

}  // namespace hymba
