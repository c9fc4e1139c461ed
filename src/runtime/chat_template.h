// The Hymba-1.5B-Instruct chat format (docs/CHAT.md).
//
// The checkpoint's tokenizer_config.json carries a Jinja chat template. We do
// not embed a Jinja interpreter: the template is *recognised* (compared, token
// by token after Jinja's own lexing, with the template Hymba ships) and then
// rendered by C++ code that reproduces what Hugging Face's
// apply_chat_template produces with Jinja2 for it, byte for byte: Python's
// str.strip() on contents, transformers' `tojson` (json.dumps with
// ensure_ascii=False, insertion-ordered keys, Python float repr) on tools,
// Python truthiness for `tools`, `contexts` and `add_generation_prompt`.
// Any other template is refused with a clear message unless the caller
// forces the Hymba format (--chat-format hymba).
//
// The rendered prompt contains no BOS and is tokenized without one (HF
// tokenizes chat prompts with add_special_tokens=False).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace hymba {

using ordered_json = nlohmann::ordered_json;

// A conversation as in HF's chat API: {"messages": [{"role", "content"}...],
// "tools": [...], "contexts": [...], "add_generation_prompt": bool}.
struct Conversation {
  ordered_json messages = ordered_json::array();
  ordered_json tools;     // null or an array (any JSON items; rendered with tojson)
  ordered_json contexts;  // null or an array of strings
  ordered_json add_generation_prompt = false;  // Python truthiness, as the template tests it

  // Parses and checks the shape (throws hymba::Error naming the problem):
  // an object with a "messages" array of objects; tools / contexts null or
  // arrays. Unknown top-level keys are rejected (a typo would otherwise
  // silently drop e.g. the tools).
  static Conversation from_json_text(const std::string& text, const std::string& what = "the conversation");
  static Conversation from_json(const ordered_json& j, const std::string& what = "the conversation");

  void add_message(const std::string& role, const std::string& content);
};

class ChatTemplate {
 public:
  // How load() treats the checkpoint's template.
  //   "auto":  use the checkpoint's template; refuse one that is not Hymba's.
  //   "hymba": render Hymba-Instruct's format whatever the checkpoint says.
  static std::vector<std::string> format_names() { return {"auto", "hymba"}; }

  // Reads dir/tokenizer_config.json ("chat_template", a string or HF's list
  // of named templates, the "default" one is used) or dir/chat_template.jinja.
  static ChatTemplate load(const std::string& dir, const std::string& format = "auto");
  // From a template string (throws if it is not Hymba's).
  static ChatTemplate from_string(const std::string& tmpl);
  static ChatTemplate hymba() { return ChatTemplate(); }

  // The rendered prompt. Throws hymba::Error where Jinja2 would fail (a
  // system/user/assistant/tool message whose content is not a string, a
  // context that is not a string). Messages with other roles are skipped, as
  // the template does; each skip is reported in *warnings if given.
  std::string render(const Conversation& c, std::vector<std::string>* warnings = nullptr) const;

  // Where the template came from (for messages), e.g. "DIR/tokenizer_config.json".
  const std::string& source() const { return source_; }

 private:
  ChatTemplate() = default;
  std::string source_ = "built-in Hymba format";
};

// The chat template of nvidia/Hymba-1.5B-Instruct (spec section 6).
const std::string& hymba_template_string();
// True if tmpl is Hymba's template up to Jinja-irrelevant spelling:
// whitespace inside tags, quote style and escapes of string literals.
bool is_hymba_template(const std::string& tmpl);

// Python's str.strip() (no argument) on UTF-8 text: removes the code points
// for which str.isspace() is true from both ends. Invalid bytes are kept.
std::string python_strip(const std::string& s);
// Python's json.dumps(x, ensure_ascii=False) (the `tojson` filter of
// transformers' chat environment). Integers beyond 64 bits are not supported
// (nlohmann parses them as doubles).
std::string python_json_dumps(const ordered_json& x);
// repr() of a Python float.
std::string python_float_repr(double v);
// Python truthiness of a JSON value (null, false, 0, "", [], {} are false).
bool python_truthy(const ordered_json& x);

}  // namespace hymba
