// Chat format and multi-turn chat sessions.
//
// Rendering goldens come from Jinja2 (tests/chat/make_chat_goldens.py, run by
// the ctest fixture `chat_goldens` with the template string of the real
// checkpoint); token ids from python3-sentencepiece; the spec's test vector
// from ../shared/spec/hymba-model.md section 6. Multi-turn cache reuse is
// checked against running the whole conversation from scratch.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "io/tokenizer.h"
#include "model/hymba_model.h"
#include "model/presets.h"
#include "runtime/chat_session.h"
#include "runtime/chat_template.h"
#include "runtime/generator.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace hymba;
using hymba::test::error_of;

namespace {

std::string real_dir() { return test::shared_dir() + "/hymba-1.5b"; }

// Read with ordered_json: tools must keep their key order (tojson does).
const ordered_json& chat_goldens() {
  static const ordered_json j = [] {
    const std::string path = test::work_dir() + "/chat_goldens.json";
    std::ifstream f(path);
    EXPECT_TRUE(f.good()) << "cannot open " << path << " (written by the ctest fixture chat_goldens)";
    ordered_json g;
    if (f.good()) f >> g;
    return g;
  }();
  return j;
}

Conversation conversation_of(const ordered_json& j) { return Conversation::from_json(j); }

std::vector<int32_t> ids_of(const ordered_json& j) { return j.get<std::vector<int32_t>>(); }

void write_text(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << s;
}

}  // namespace

// ------------------------------------------------------------ rendering

TEST(ChatTemplate, RealCheckpointTemplateIsRecognised) {
  const auto cfg = test::read_json(real_dir() + "/tokenizer_config.json");
  const std::string t = cfg["chat_template"].get<std::string>();
  EXPECT_EQ(t, hymba_template_string());
  EXPECT_TRUE(is_hymba_template(t));
  EXPECT_EQ(chat_goldens()["template"].get<std::string>(), t);
  EXPECT_NO_THROW(ChatTemplate::load(real_dir()));
}

TEST(ChatTemplate, EveryConversationMatchesJinja2) {
  const auto tmpl = ChatTemplate::load(real_dir());
  const auto& cases = chat_goldens()["cases"];
  ASSERT_GE(cases.size(), 25u);
  int rendered = 0, rejected = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const Conversation conv = conversation_of(c["conversation"]);
    if (c["error"].get<bool>()) {
      const std::string msg = error_of([&] { tmpl.render(conv); });
      EXPECT_NE(msg, "<no hymba::Error thrown>") << "Jinja2 rejects this conversation: " << c["message"];
      ++rejected;
    } else {
      EXPECT_EQ(tmpl.render(conv), c["rendered"].get<std::string>());
      ++rendered;
    }
  }
  EXPECT_GE(rendered, 20);
  EXPECT_GE(rejected, 4);
}

TEST(ChatTemplate, ChatPathTokenIdsMatchSentencePiece) {
  const auto tmpl = ChatTemplate::load(real_dir());
  const Tokenizer tok = Tokenizer::load(real_dir());
  for (const auto& c : chat_goldens()["cases"]) {
    if (c["error"].get<bool>()) continue;
    SCOPED_TRACE(c["name"].get<std::string>());
    EXPECT_EQ(tok.encode(tmpl.render(conversation_of(c["conversation"])), false), ids_of(c["ids"]));
  }
}

TEST(ChatTemplate, SpecTestVector) {
  // Spec section 6: system "You are a helpful assistant.", user "Hi", generation prompt on; no BOS.
  const std::vector<int32_t> want = {529,   17833, 29918, 333,   29918, 29900, 29958, 3924,  13,    3492,
                                     526,   263,   8444,  20255, 29889, 13,    13,    29966, 17833, 29918,
                                     333,   29918, 29896, 29958, 2659,  13,    18567, 13,    29966, 17833,
                                     29918, 333,   29918, 29896, 29958, 7900,  22137, 13};
  const auto tmpl = ChatTemplate::load(real_dir());
  Conversation conv;
  conv.add_message("system", "You are a helpful assistant.");
  conv.add_message("user", "Hi");
  conv.add_generation_prompt = true;
  const std::string text = tmpl.render(conv);
  EXPECT_EQ(text, "<extra_id_0>System\nYou are a helpful assistant.\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n");
  const Tokenizer tok = Tokenizer::load(real_dir());
  const auto ids = tok.encode(text, false);
  EXPECT_EQ(ids, want);
  EXPECT_NE(ids.front(), tok.bos_id());
}

TEST(ChatTemplate, SpellingVariantsOfTheTemplateAreRecognised) {
  // The spec writes the newlines as \n escapes; Jinja reads both the same.
  std::string escaped;
  for (char c : hymba_template_string()) escaped += c == '\n' ? std::string("\\n") : std::string(1, c);
  EXPECT_TRUE(is_hymba_template(escaped));
  // Whitespace inside tags and the quote style do not matter to Jinja.
  std::string spaced = hymba_template_string();
  for (size_t p = 0; (p = spaced.find("{% ", p)) != std::string::npos; p += 6) spaced.replace(p, 3, "{%\n\t  ");
  for (size_t p = 0; (p = spaced.find(" }}", p)) != std::string::npos; p += 4) spaced.replace(p, 3, "  }}");
  EXPECT_TRUE(is_hymba_template(spaced));
  std::string dq = hymba_template_string();
  for (size_t p = 0; (p = dq.find("'<extra_id_0>System'", p)) != std::string::npos;)
    dq.replace(p, 20, "\"<extra_id_0>System\"");
  EXPECT_TRUE(is_hymba_template(dq));
}

TEST(ChatTemplate, OtherTemplatesAreRefused) {
  EXPECT_FALSE(is_hymba_template(""));
  EXPECT_FALSE(is_hymba_template("{% for m in messages %}{{ m['content'] }}{% endfor %}"));
  // One character of a literal changed: a different prompt, so refused.
  std::string t = hymba_template_string();
  t.replace(t.find("User"), 4, "Usr ");
  EXPECT_FALSE(is_hymba_template(t));
  // Text outside tags changes the output: refused.
  EXPECT_FALSE(is_hymba_template(hymba_template_string() + "\n"));
  EXPECT_FALSE(is_hymba_template("{{ unterminated"));
  EXPECT_NE(error_of([] { ChatTemplate::from_string("{{ messages }}"); }).find("not Hymba"), std::string::npos);

  const fs::path dir = fs::path(test::work_dir()) / "chat" / "chatml";
  nlohmann::json cfg = {{"chat_template", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                          "<|im_end|>\n{% endfor %}"}};
  write_text(dir / "tokenizer_config.json", cfg.dump());
  const std::string msg = error_of([&] { ChatTemplate::load(dir.string()); });
  EXPECT_NE(msg.find("not Hymba-1.5B-Instruct's"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--chat-format hymba"), std::string::npos) << msg;
  // The documented override renders Hymba's format regardless.
  EXPECT_NO_THROW(ChatTemplate::load(dir.string(), "hymba"));

  const fs::path none = fs::path(test::work_dir()) / "chat" / "no-template";
  write_text(none / "tokenizer_config.json", "{\"add_bos_token\": true}");
  EXPECT_NE(error_of([&] { ChatTemplate::load(none.string()); }).find("has no chat template"), std::string::npos);
  write_text(none / "tokenizer_config.json", "{not json");
  EXPECT_NE(error_of([&] { ChatTemplate::load(none.string()); }).find("not valid JSON"), std::string::npos);
}

TEST(ChatTemplate, TemplateFromChatTemplateJinjaOrNamedList) {
  const fs::path dir = fs::path(test::work_dir()) / "chat" / "jinja-file";
  write_text(dir / "tokenizer_config.json", "{}");
  write_text(dir / "chat_template.jinja", hymba_template_string());
  EXPECT_NO_THROW(ChatTemplate::load(dir.string()));
  const fs::path dir2 = fs::path(test::work_dir()) / "chat" / "named-list";
  nlohmann::json cfg = {{"chat_template", nlohmann::json::array({{{"name", "tool_use"}, {"template", "x"}},
                                                                 {{"name", "default"}, {"template", hymba_template_string()}}})}};
  write_text(dir2 / "tokenizer_config.json", cfg.dump());
  EXPECT_NO_THROW(ChatTemplate::load(dir2.string()));
}

TEST(ChatTemplate, UnknownRolesAreSkippedWithAWarning) {
  const auto tmpl = ChatTemplate::hymba();
  Conversation c;
  c.add_message("narrator", "x");
  c.add_message("user", "u");
  std::vector<std::string> warnings;
  EXPECT_EQ(tmpl.render(c, &warnings), "<extra_id_0>System\n\n<extra_id_1>User\nu\n");
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("narrator"), std::string::npos);
}

TEST(ChatTemplate, BadConversationJson) {
  auto err = [](const std::string& text) { return error_of([&] { Conversation::from_json_text(text); }); };
  EXPECT_NE(err("{\"messages\": [").find("not valid JSON"), std::string::npos);
  EXPECT_NE(err("[]").find("must be a JSON object"), std::string::npos);
  EXPECT_NE(err("{}").find("no \"messages\""), std::string::npos);
  EXPECT_NE(err("{\"messages\": {}}").find("must be an array"), std::string::npos);
  EXPECT_NE(err("{\"messages\": [\"hi\"]}").find("messages[0] must be an object"), std::string::npos);
  EXPECT_NE(err("{\"messages\": [], \"tools\": {}}").find("\"tools\" must be an array"), std::string::npos);
  EXPECT_NE(err("{\"messages\": [], \"contexts\": \"c\"}").find("\"contexts\" must be an array"), std::string::npos);
  EXPECT_NE(err("{\"messages\": [], \"tool\": []}").find("unknown key \"tool\""), std::string::npos);
  const auto tmpl = ChatTemplate::hymba();
  auto render_err = [&](const std::string& text) {
    return error_of([&] { tmpl.render(Conversation::from_json_text(text)); });
  };
  EXPECT_NE(render_err("{\"messages\": [{\"role\": \"user\"}]}").find("has no \"content\""), std::string::npos);
  EXPECT_NE(render_err("{\"messages\": [{\"role\": \"user\", \"content\": 1}]}").find("must be a string"),
            std::string::npos);
  EXPECT_NE(render_err("{\"messages\": [], \"contexts\": [1]}").find("contexts[0] must be a string"),
            std::string::npos);
}

TEST(ChatTemplate, PythonHelpers) {
  // Expected values are Python's (repr / str.strip / json.dumps), written out by hand.
  EXPECT_EQ(python_float_repr(1.0), "1.0");
  EXPECT_EQ(python_float_repr(0.1), "0.1");
  EXPECT_EQ(python_float_repr(-0.0), "-0.0");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float_repr(1e-5), "1e-05");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(1.5e-10), "1.5e-10");
  EXPECT_EQ(python_float_repr(123456.789), "123456.789");
  EXPECT_EQ(python_float_repr(1.7976931348623157e308), "1.7976931348623157e+308");
  EXPECT_EQ(python_strip(" \t\n a b \xc2\xa0\xe3\x80\x80"), "a b");
  EXPECT_EQ(python_strip("\xe2\x80\x8b x \xe2\x80\x8b"), "\xe2\x80\x8b x \xe2\x80\x8b");  // U+200B is not space
  EXPECT_EQ(python_strip("\xff x \xff"), "\xff x \xff");
  EXPECT_EQ(python_strip("   "), "");
  EXPECT_EQ(python_json_dumps(ordered_json::parse(R"({"b": [1, 2.0, "x<y>&'"], "a": null})")),
            R"({"b": [1, 2.0, "x<y>&'"], "a": null})");
  EXPECT_TRUE(python_truthy(ordered_json::parse("[0]")));
  EXPECT_FALSE(python_truthy(ordered_json::parse("0.0")));
  EXPECT_FALSE(python_truthy(ordered_json::parse("\"\"")));
}

// ------------------------------------------------------------ sessions

namespace {

struct TinyChat {
  std::unique_ptr<HymbaModel> model;
  Tokenizer tok = Tokenizer::load(real_dir());
  TinyChat() {
    // ctest runs the tests in parallel processes: write to a private
    // directory, then rename it into place (the loser of a race drops its copy).
    const fs::path dir = fs::path(test::work_dir()) / "chat" / "tiny";
    if (!fs::exists(dir / "model.safetensors")) {
      const fs::path tmp = dir.string() + ".tmp." + std::to_string(::getpid());
      fs::create_directories(tmp);
      write_random_checkpoint(preset_config("tiny"), DType::F32, 7, tmp.string());
      std::error_code ec;
      fs::rename(tmp, dir, ec);
      if (ec) fs::remove_all(tmp);
    }
    model = HymbaModel::load(dir.string());
  }
};

TinyChat& tiny() {
  static TinyChat t;
  return t;
}

// The answer to `conv` computed from scratch (a fresh cache, whole prompt).
GenerationResult from_scratch(const Conversation& conv, const ChatOptions& o, int turn) {
  Conversation c = conv;
  c.add_generation_prompt = true;
  GenerationRequest req;
  req.prompt = tiny().tok.encode(ChatTemplate::hymba().render(c), false);
  req.max_new_tokens = o.max_new_tokens;
  req.sampling = o.sampling;
  req.sampling.seed = o.sampling.seed + uint64_t(turn);
  req.stop_strings = o.stop_strings;
  req.ignore_eos = o.ignore_eos;
  req.context = o.context;
  Generator gen(*tiny().model, &tiny().tok);
  return gen.generate(req);
}

void check_against_scratch(ChatOptions o, const std::vector<std::string>& user_turns, std::vector<std::string>* paths) {
  ChatSession s(*tiny().model, tiny().tok, ChatTemplate::hymba(), o);
  for (size_t t = 0; t < user_turns.size(); ++t) {
    SCOPED_TRACE("turn " + std::to_string(t));
    Conversation before = s.conversation();
    before.add_message("user", user_turns[t]);
    const ChatTurn turn = s.send(user_turns[t]);
    const GenerationResult want = from_scratch(before, o, int(t));
    EXPECT_EQ(turn.gen.tokens, want.tokens);
    EXPECT_EQ(turn.gen.text, want.text);
    EXPECT_EQ(turn.gen.stop_reason, want.stop_reason);
    EXPECT_EQ(turn.conversation_tokens, turn.reused_tokens + turn.prefilled_tokens);
    if (paths) paths->push_back(turn.cache_path);
    // The cache holds the rendered prompt and the answer's tokens but the last.
    EXPECT_EQ(int64_t(s.cached_ids().size()), turn.conversation_tokens + turn.gen.tokens_in_cache);
    EXPECT_EQ(turn.gen.tokens_in_cache, std::max<int64_t>(int64_t(turn.gen.tokens.size()) - 1, 0));
  }
}

}  // namespace

TEST(ChatSession, MultiTurnCacheReuseEqualsRecomputing) {
  ChatOptions o;
  o.system = "You are a helpful assistant.";
  o.max_new_tokens = 12;
  o.context = 2048;
  std::vector<std::string> paths;
  check_against_scratch(o, {"Hi", "Tell me more.", "And the last one?", "Bye"}, &paths);
  ASSERT_EQ(paths.size(), 4u);
  EXPECT_EQ(paths[0], "rebuild");  // nothing cached yet
  for (size_t i = 1; i < paths.size(); ++i) EXPECT_NE(paths[i], "rebuild") << "turn " << i;
}

TEST(ChatSession, WithoutSnapshotsStillEqualsRecomputing) {
  ChatOptions o;
  o.max_new_tokens = 10;
  o.context = 2048;
  o.keep_snapshot = false;
  check_against_scratch(o, {"One", "Two", "Three"}, nullptr);
}

TEST(ChatSession, SampledTurnsEqualRecomputing) {
  ChatOptions o;
  o.max_new_tokens = 10;
  o.context = 2048;
  o.sampling.temperature = 0.8f;
  o.sampling.top_k = 40;
  o.sampling.seed = 5;
  check_against_scratch(o, {"One", "Two", "Three"}, nullptr);
}

TEST(ChatSession, CanonicalAnswersExtendTheCache) {
  // An empty answer (no tokens) leaves the cache a prefix of the next prompt:
  // the next turn prefills only its new tokens.
  ChatOptions o;
  o.max_new_tokens = 0;
  o.context = 1024;
  ChatSession s(*tiny().model, tiny().tok, ChatTemplate::hymba(), o);
  const ChatTurn t1 = s.send("first");
  EXPECT_EQ(t1.cache_path, "rebuild");
  const ChatTurn t2 = s.send("second");
  EXPECT_EQ(t2.cache_path, "extend");
  EXPECT_EQ(t2.reused_tokens, t1.conversation_tokens);
  const auto full = tiny().tok.encode(s.render(false), false);
  EXPECT_EQ(t2.prefilled_tokens, t2.conversation_tokens - t1.conversation_tokens);
  EXPECT_GT(full.size(), 0u);
}

TEST(ChatSession, CancelledAnswerIsKeptAndTheNextTurnMatchesRecomputing) {
  ChatOptions o;
  o.max_new_tokens = 20;
  o.context = 2048;
  ChatSession s(*tiny().model, tiny().tok, ChatTemplate::hymba(), o);
  int seen = 0;
  const ChatTurn t1 = s.send("stop me", [&](int32_t id, const std::string&) { return id < 0 || ++seen < 4; });
  EXPECT_EQ(t1.gen.stop_reason, "cancelled");
  EXPECT_EQ(t1.gen.tokens.size(), 4u);
  const auto& msgs = s.conversation().messages;
  ASSERT_EQ(msgs.size(), 2u);
  EXPECT_EQ(msgs[1]["role"], "assistant");
  EXPECT_EQ(msgs[1]["content"].get<std::string>(), t1.gen.text);
  Conversation before = s.conversation();
  before.add_message("user", "next");
  const ChatTurn t2 = s.send("next");
  EXPECT_EQ(t2.gen.tokens, from_scratch(before, o, 1).tokens);
}

TEST(ChatSession, ResetForgetsTheHistoryButKeepsTheSystemPrompt) {
  ChatOptions o;
  o.system = "S";
  o.max_new_tokens = 4;
  o.context = 1024;
  ChatSession s(*tiny().model, tiny().tok, ChatTemplate::hymba(), o);
  const ChatTurn a = s.send("hello");
  s.send("again");
  s.reset();
  EXPECT_EQ(s.conversation().messages.size(), 1u);
  EXPECT_TRUE(s.cached_ids().empty());
  const ChatTurn b = s.send("hello");
  EXPECT_EQ(b.cache_path, "rebuild");
  EXPECT_EQ(b.gen.tokens, a.gen.tokens);
}

TEST(ChatSession, ConversationTooLongForTheContextIsAClearErrorAndRecoverable) {
  ChatOptions o;
  o.max_new_tokens = 4;
  o.context = 40;
  ChatSession s(*tiny().model, tiny().tok, ChatTemplate::hymba(), o);
  const std::string msg = error_of([&] { s.send(std::string(300, 'x') + " many words here and there"); });
  EXPECT_NE(msg.find("no longer fits"), std::string::npos) << msg;
  EXPECT_EQ(s.conversation().messages.size(), 0u);  // the failed message is not kept
  const ChatTurn t = s.send("ok");                   // still usable
  EXPECT_LE(t.conversation_tokens, 40);
}

TEST(Generator, ContinueSequenceEqualsOneGeneration) {
  // Prefilling a prompt in two calls (generate on the first part's cache)
  // gives the same tokens as one call.
  auto& m = *tiny().model;
  Generator gen(m, &tiny().tok);
  const auto ids = tiny().tok.encode("The quick brown fox jumps over the lazy dog", true);
  GenerationRequest whole;
  whole.prompt = ids;
  whole.max_new_tokens = 8;
  const auto want = gen.generate(whole);
  auto seq = m.new_sequence(64);
  std::vector<float> logits(size_t(m.vocab_size()));
  m.forward(*seq, ids.data(), 5, logits.data(), false);
  GenerationRequest rest;
  rest.prompt.assign(ids.begin() + 5, ids.end());
  rest.history.assign(ids.begin(), ids.begin() + 5);
  rest.max_new_tokens = 8;
  const auto got = gen.continue_sequence(*seq, rest);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.tokens_in_cache, 7);
  EXPECT_EQ(seq->length(), m.config().num_memory_tokens + int64_t(ids.size()) + 7);
}
