// Tokenizer tests. Uses the real Hymba-1.5B tokenizer from ../shared
// (HYMBA_SHARED_DIR/hymba-1.5b) and goldens written by python3-sentencepiece
// (tests/tokenizer/make_token_goldens.py, ctest fixture tokenizer_goldens)
// into HYMBA_TEST_WORK/token_goldens.json.
#include <gtest/gtest.h>

#include "test_util.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/tokenizer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using hymba::StreamDecoder;
using hymba::Tokenizer;

namespace {

const std::string kTokDir = std::string(HYMBA_SHARED_DIR) + "/hymba-1.5b";
const std::string kGoldens = std::string(HYMBA_TEST_WORK) + "/token_goldens.json";

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

// Strict UTF-8 check (no overlongs, surrogates or values above U+10FFFF).
bool is_valid_utf8(const std::string& s) {
  size_t i = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  while (i < s.size()) {
    const unsigned c = p[i];
    size_t n = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07; min = 0x10000; }
    else return false;
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return false;
    i += n;
  }
  return true;
}

const Tokenizer& tok() {
  static const Tokenizer t = [] {
    if (!fs::exists(kTokDir + "/tokenizer.model"))
      ADD_FAILURE() << "tokenizer tests use ../shared: " << kTokDir << "/tokenizer.model is missing";
    return Tokenizer::load(kTokDir);
  }();
  return t;
}

const nlohmann::json& goldens() {
  static const nlohmann::json j = [] {
    std::ifstream in(kGoldens);
    if (!in) {
      ADD_FAILURE() << kGoldens << " missing: run via ctest (fixture tokenizer_goldens) or "
                    << "tests/tokenizer/make_token_goldens.py " << kTokDir << " " << kGoldens;
      return nlohmann::json::object({{"encode", nlohmann::json::array()},
                                     {"decode", nlohmann::json::array()}});
    }
    return nlohmann::json::parse(in);
  }();
  return j;
}

std::string stream_all(const std::vector<int32_t>& ids, bool check_chunks = true) {
  StreamDecoder sd(tok());
  std::string out;
  for (int32_t id : ids) {
    const std::string chunk = sd.push(id);
    if (check_chunks) {
      EXPECT_TRUE(is_valid_utf8(chunk)) << "chunk after id " << id;
    }
    out += chunk;
  }
  return out + sd.flush();
}

fs::path scratch_dir(const std::string& name) {
  const fs::path d = fs::path(HYMBA_TEST_WORK) / "tokenizer-scratch" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

using hymba::test::error_of;

}  // namespace

TEST(Tokenizer, LoadsHymbaVocabulary) {
  const Tokenizer& t = tok();
  EXPECT_EQ(t.sp_vocab_size(), 32000);
  EXPECT_EQ(t.vocab_size(), 32001);  // + [PAD]
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.pad_id(), 32000);
  EXPECT_EQ(t.unk_id(), 0);
  EXPECT_TRUE(t.add_bos_token());
  EXPECT_FALSE(t.add_eos_token());
  EXPECT_EQ(t.id_to_piece(32000), "[PAD]");
  EXPECT_EQ(t.id_to_piece(15043), "\xE2\x96\x81Hello");
  EXPECT_EQ(t.id_to_piece(13), "<0x0A>");
  EXPECT_EQ(t.id_to_piece(1), "<s>");
  EXPECT_TRUE(t.is_special(1));
  EXPECT_TRUE(t.is_special(2));
  EXPECT_TRUE(t.is_special(32000));
  EXPECT_FALSE(t.is_special(0));
  EXPECT_FALSE(t.is_special(15043));
}

TEST(Tokenizer, HelloWorld) {
  EXPECT_EQ(tok().encode("Hello world", true), (std::vector<int32_t>{1, 15043, 3186}));
  EXPECT_EQ(tok().encode("Hello world", false), (std::vector<int32_t>{15043, 3186}));
  EXPECT_EQ(tok().encode("", true), (std::vector<int32_t>{1}));
  EXPECT_EQ(tok().decode({1, 15043, 3186}), "Hello world");
}

TEST(Tokenizer, EncodeMatchesSentencePieceGoldens) {
  const auto& enc = goldens()["encode"];
  ASSERT_GE(enc.size(), 40u);
  for (const auto& g : enc) {
    const std::string text = from_hex(g["text_hex"]);
    const auto want = g["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok().encode(text, g["add_bos"].get<bool>()), want) << g["name"];
  }
}

TEST(Tokenizer, DecodeMatchesSentencePieceGoldens) {
  for (const auto& g : goldens()["encode"]) {
    const auto ids = g["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok().decode(ids), from_hex(g["decoded_hex"])) << g["name"];
  }
  const auto& dec = goldens()["decode"];
  ASSERT_GE(dec.size(), 300u);
  for (const auto& g : dec) {
    const auto ids = g["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok().decode(ids), from_hex(g["text_hex"])) << g["name"];
  }
}

TEST(Tokenizer, RoundTripsValidUtf8) {
  int checked = 0;
  for (const auto& g : goldens()["encode"]) {
    const std::string text = from_hex(g["text_hex"]);
    // U+2581 is SentencePiece's space symbol: it decodes to ' ' by design.
    if (!is_valid_utf8(text) || text.find("\xE2\x96\x81") != std::string::npos) continue;
    EXPECT_EQ(tok().decode(tok().encode(text, true)), text) << g["name"];
    EXPECT_EQ(tok().decode(tok().encode(text, false)), text) << g["name"];
    ++checked;
  }
  EXPECT_GE(checked, 30);
}

TEST(Tokenizer, InvalidUtf8BecomesReplacementCharacters) {
  // Documented behaviour (same as python3-sentencepiece on bytes): each byte
  // that is not part of a valid sequence is encoded as U+FFFD.
  const std::string bad = "a\xff" "b\xe2\x82";
  const std::string repl = "a\xEF\xBF\xBD" "b\xEF\xBF\xBD\xEF\xBF\xBD";
  EXPECT_EQ(tok().encode(bad, true), tok().encode(repl, true));
  EXPECT_EQ(tok().decode(tok().encode(bad, false)), repl);
}

TEST(Tokenizer, SpecialTextIsLiteral) {
  // Special token strings in the input are plain text, not control tokens.
  const auto ids = tok().encode("</s>[PAD]", false);
  for (int32_t id : ids) {
    EXPECT_NE(id, 2);
    EXPECT_NE(id, 32000);
  }
  EXPECT_EQ(tok().decode(ids), "</s>[PAD]");
}

TEST(Tokenizer, PadIsInvisibleAndSplitsByteRuns) {
  EXPECT_EQ(tok().decode({1, 15043, 32000, 3186, 2}), "Hello world");
  EXPECT_EQ(tok().decode({32000, 15043}), "Hello");  // still strips the dummy prefix
  // <0xE2> [PAD] <0x82> <0xAC> behaves like a control token in the middle.
  EXPECT_EQ(tok().decode({229, 32000, 133, 175}), tok().decode({229, 1, 133, 175}));
  EXPECT_EQ(stream_all({229, 32000, 133, 175}), tok().decode({229, 32000, 133, 175}));
}

TEST(Tokenizer, OutOfRangeIdsAreErrors) {
  const std::string msg = error_of([] { tok().decode({1, 40000}); });
  EXPECT_NE(msg.find("40000"), std::string::npos) << msg;
  EXPECT_NE(msg.find("32001"), std::string::npos) << msg;
  EXPECT_NE(error_of([] { tok().decode({-1}); }).find("-1"), std::string::npos);
  EXPECT_NE(error_of([] { tok().decode({32001}); }).find("32001"), std::string::npos);
  EXPECT_NE(error_of([] { tok().id_to_piece(32001); }).find("32001"), std::string::npos);
  EXPECT_NE(error_of([] { tok().check_id(-5); }).find("-5"), std::string::npos);
  StreamDecoder sd(tok());
  EXPECT_THROW(sd.push(99999), hymba::Error);
  EXPECT_NO_THROW(tok().check_id(32000));
}

TEST(Tokenizer, MissingDirectoryIsClearError) {
  const std::string msg = error_of([] { Tokenizer::load("/nonexistent/hymba-tok"); });
  EXPECT_NE(msg.find("/nonexistent/hymba-tok/tokenizer.model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not found"), std::string::npos) << msg;
}

TEST(Tokenizer, CorruptModelIsClearError) {
  const fs::path d = scratch_dir("corrupt");
  write_file(d / "tokenizer.model", "this is definitely not a sentencepiece model \x01\x02\xff");
  const std::string msg = error_of([&] { Tokenizer::load(d.string()); });
  EXPECT_NE(msg.find((d / "tokenizer.model").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("SentencePiece"), std::string::npos) << msg;

  write_file(d / "tokenizer.model", "");
  EXPECT_THROW(Tokenizer::load(d.string()), hymba::Error);
}

TEST(Tokenizer, BadJsonIsClearError) {
  const fs::path d = scratch_dir("badjson");
  fs::copy_file(kTokDir + "/tokenizer.model", d / "tokenizer.model");
  write_file(d / "tokenizer_config.json", "{\"add_bos_token\": tru");
  std::string msg = error_of([&] { Tokenizer::load(d.string()); });
  EXPECT_NE(msg.find("tokenizer_config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("invalid JSON"), std::string::npos) << msg;

  write_file(d / "tokenizer_config.json", "{\"add_bos_token\": \"yes\"}");
  msg = error_of([&] { Tokenizer::load(d.string()); });
  EXPECT_NE(msg.find("add_bos_token"), std::string::npos) << msg;

  write_file(d / "tokenizer_config.json", "{}");
  write_file(d / "added_tokens.json", "{\"[PAD]\": 32005}");  // gap after 31999
  msg = error_of([&] { Tokenizer::load(d.string()); });
  EXPECT_NE(msg.find("32005"), std::string::npos) << msg;
}

TEST(Tokenizer, ConfigIsOptionalAndHonoured) {
  const fs::path d = scratch_dir("noconfig");
  fs::copy_file(kTokDir + "/tokenizer.model", d / "tokenizer.model");
  {
    const Tokenizer t = Tokenizer::load(d.string());
    EXPECT_EQ(t.vocab_size(), 32000);
    EXPECT_EQ(t.pad_id(), -1);
    EXPECT_EQ(t.encode("Hello world", true), (std::vector<int32_t>{1, 15043, 3186}));
  }
  write_file(d / "tokenizer_config.json",
             R"({"add_bos_token": false, "add_eos_token": true, "eos_token": {"content": "</s>"}})");
  write_file(d / "added_tokens.json", R"({"[PAD]": 32000})");
  const Tokenizer t = Tokenizer::load(d.string());
  EXPECT_EQ(t.vocab_size(), 32001);
  EXPECT_EQ(t.encode("Hello world", true), (std::vector<int32_t>{15043, 3186, 2}));
  EXPECT_EQ(t.encode("Hello world", false), (std::vector<int32_t>{15043, 3186}));
}

TEST(StreamDecoder, MatchesDecodeOverCorpus) {
  for (const auto& g : goldens()["encode"]) {
    const auto ids = g["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(stream_all(ids), tok().decode(ids)) << g["name"];
  }
  for (const auto& g : goldens()["decode"]) {
    const auto ids = g["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(stream_all(ids), from_hex(g["text_hex"])) << g["name"];
  }
}

TEST(StreamDecoder, EmitsMultiByteCharacterOnlyWhenComplete) {
  StreamDecoder sd(tok());
  EXPECT_EQ(sd.push(1), "");
  EXPECT_EQ(sd.push(tok().encode("x", false).back()), "x");
  EXPECT_EQ(sd.push(229), "");  // <0xE2>
  EXPECT_EQ(sd.push(133), "");  // <0x82>
  EXPECT_EQ(sd.push(175), "\xE2\x82\xAC");  // <0xAC> -> "€"
  EXPECT_EQ(sd.flush(), "");
}

TEST(StreamDecoder, BrokenSequencesAreReleasedEarly) {
  StreamDecoder sd(tok());
  EXPECT_EQ(sd.push(229), "");                               // <0xE2>: may continue
  EXPECT_EQ(sd.push(68), "\xEF\xBF\xBD" "A");                // <0x41> breaks it
  EXPECT_EQ(sd.push(243), "");                               // <0xF0>
  EXPECT_EQ(sd.push(162), "");                               // <0x9F>
  EXPECT_EQ(sd.flush(), "\xEF\xBF\xBD\xEF\xBF\xBD");         // unfinished at end
}

TEST(StreamDecoder, LeadingSpaceAndSpecialTokens) {
  StreamDecoder sd(tok());
  EXPECT_EQ(sd.push(1), "");
  EXPECT_EQ(sd.push(15043), "Hello");  // dummy-prefix space dropped, as decode does
  EXPECT_EQ(sd.push(3186), " world");
  EXPECT_EQ(sd.push(2), "");
  EXPECT_EQ(sd.push(32000), "");
  EXPECT_EQ(sd.flush(), "");
  // flush() starts a new sequence: the next first piece is stripped again.
  EXPECT_EQ(sd.push(3186), "world");
}

TEST(StreamDecoder, ChatPromptContinuation) {
  // A reply streamed after the chat prompt: the text equals decode(reply).
  const std::string reply = "Sure! Here is 1 € and 😀 and 中文.\nDone.";
  const auto ids = tok().encode(reply, false);
  EXPECT_EQ(stream_all(ids), reply);
}
