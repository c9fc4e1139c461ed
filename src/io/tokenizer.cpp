#include "io/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace hymba {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // "▁" U+2581
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

std::string replace_space_symbol(std::string_view piece) {
  std::string out;
  out.reserve(piece.size());
  size_t i = 0;
  while (i < piece.size()) {
    if (piece.substr(i, kSpaceSymbol.size()) == kSpaceSymbol) {
      out.push_back(' ');
      i += kSpaceSymbol.size();
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("tokenizer file ", path.string(), ": cannot open for reading");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("tokenizer file ", path.string(), ": invalid JSON (", e.what(), ")");
  }
}

// Special-token entries are either "text" or {"content": "text", ...}.
std::string token_string(const json& v, const fs::path& file, const char* field) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  fail("tokenizer file ", file.string(), ": field \"", field,
       "\" must be a string or an object with a string \"content\"");
}

struct AddedToken {
  std::string content;
  bool special = false;
  bool special_known = false;  // added_tokens.json carries no flag
};

// SentencePiece's UTF-8 acceptance rule (the one its decoder applies to
// byte-fallback runs): returns the length of the valid character starting at
// s[0], or 0 if s[0] is invalid there. `avail` bytes are readable.
size_t valid_utf8_len(const unsigned char* s, size_t avail) {
  const unsigned c = s[0];
  auto trail = [&](size_t i) { return (s[i] & 0xC0) == 0x80; };
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0 && avail >= 2) {
    const uint32_t cp = ((c & 0x1F) << 6) | (s[1] & 0x3F);
    return (trail(1) && cp >= 0x80) ? 2 : 0;
  }
  if ((c & 0xF0) == 0xE0 && avail >= 3) {
    const uint32_t cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    const bool ok = trail(1) && trail(2) && cp >= 0x800 && (cp < 0xD800 || cp >= 0xE000);
    return ok ? 3 : 0;
  }
  if ((c & 0xF8) == 0xF0 && avail >= 4) {
    const uint32_t cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) |
                        (s[3] & 0x3F);
    const bool ok = trail(1) && trail(2) && trail(3) && cp >= 0x10000 && cp <= 0x10FFFF;
    return ok ? 4 : 0;
  }
  return 0;
}

// Bytes a sequence starting with lead byte c needs (1 for bytes that can only
// ever be invalid as a start).
size_t needed_len(unsigned c) {
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& dir) {
  const fs::path root(dir);
  const fs::path model_path = root / "tokenizer.model";
  std::error_code ec;
  if (!fs::is_regular_file(model_path, ec))
    fail("tokenizer model ", model_path.string(), ": file not found");

  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->Load(model_path.string());
  if (!status.ok())
    fail("tokenizer model ", model_path.string(),
         ": not a valid SentencePiece model (", status.ToString(), ")");

  Tokenizer t;
  t.sp_size_ = sp->GetPieceSize();
  if (t.sp_size_ <= 0) fail("tokenizer model ", model_path.string(), ": empty vocabulary");
  t.unk_id_ = sp->unk_id();
  t.bos_id_ = sp->bos_id();
  t.eos_id_ = sp->eos_id();
  t.pad_id_ = sp->pad_id();

  // --- Added tokens (ids may overlap the SP vocab, e.g. <unk>/<s>/</s>). ---
  std::map<int32_t, AddedToken> added;
  auto add_token = [&](int64_t id, const std::string& content, bool special, bool known,
                       const fs::path& file) {
    if (id < 0 || id > INT32_MAX)
      fail("tokenizer file ", file.string(), ": added token \"", content, "\" has invalid id ", id);
    auto [it, inserted] = added.try_emplace(static_cast<int32_t>(id));
    if (!inserted && it->second.content != content)
      fail("tokenizer file ", file.string(), ": added token id ", id, " is both \"",
           it->second.content, "\" and \"", content, "\"");
    it->second.content = content;
    if (known) {
      it->second.special = special;
      it->second.special_known = true;
    }
  };

  std::string bos_str, eos_str, pad_str, unk_str;
  auto take_specials = [&](const json& j, const fs::path& file) {
    auto take = [&](const char* field, std::string& dst) {
      if (j.contains(field) && !j[field].is_null()) dst = token_string(j[field], file, field);
    };
    take("bos_token", bos_str);
    take("eos_token", eos_str);
    take("pad_token", pad_str);
    take("unk_token", unk_str);
  };

  const fs::path stm_path = root / "special_tokens_map.json";
  if (fs::exists(stm_path, ec)) {
    const json j = read_json(stm_path);
    if (!j.is_object()) fail("tokenizer file ", stm_path.string(), ": expected a JSON object");
    take_specials(j, stm_path);
  }

  const fs::path added_path = root / "added_tokens.json";
  if (fs::exists(added_path, ec)) {
    const json j = read_json(added_path);
    if (!j.is_object()) fail("tokenizer file ", added_path.string(), ": expected a JSON object");
    for (const auto& [content, id] : j.items()) {
      if (!id.is_number_integer())
        fail("tokenizer file ", added_path.string(), ": id of \"", content, "\" is not an integer");
      add_token(id.get<int64_t>(), content, false, false, added_path);
    }
  }

  const fs::path cfg_path = root / "tokenizer_config.json";
  if (fs::exists(cfg_path, ec)) {
    const json j = read_json(cfg_path);
    if (!j.is_object()) fail("tokenizer file ", cfg_path.string(), ": expected a JSON object");
    auto flag = [&](const char* field, bool& dst) {
      if (!j.contains(field) || j[field].is_null()) return;
      if (!j[field].is_boolean())
        fail("tokenizer file ", cfg_path.string(), ": field \"", field, "\" must be true or false");
      dst = j[field].get<bool>();
    };
    flag("add_bos_token", t.add_bos_token_);
    flag("add_eos_token", t.add_eos_token_);
    take_specials(j, cfg_path);
    if (j.contains("added_tokens_decoder")) {
      const json& d = j["added_tokens_decoder"];
      if (!d.is_object())
        fail("tokenizer file ", cfg_path.string(), ": \"added_tokens_decoder\" must be an object");
      for (const auto& [key, v] : d.items()) {
        int64_t id = -1;
        try {
          size_t used = 0;
          id = std::stoll(key, &used);
          if (used != key.size()) id = -1;
        } catch (const std::exception&) {
          id = -1;
        }
        if (id < 0)
          fail("tokenizer file ", cfg_path.string(), ": added_tokens_decoder key \"", key,
               "\" is not a token id");
        const std::string content = token_string(v, cfg_path, "added_tokens_decoder");
        const bool special = v.is_object() && v.value("special", false);
        add_token(id, content, special, v.is_object() && v.contains("special"), cfg_path);
      }
    }
  }

  // Added ids past the SP vocab must extend it contiguously, otherwise some
  // ids in [0, vocab_size) would name no token at all.
  int32_t next = t.sp_size_;
  for (const auto& [id, tok] : added) {
    if (id < t.sp_size_) {
      if (sp->IdToPiece(id) != tok.content)
        fail("tokenizer: added token id ", id, " is \"", tok.content,
             "\" but the SentencePiece model has \"", sp->IdToPiece(id), "\" there");
      continue;
    }
    if (id != next)
      fail("tokenizer: added token ids must follow the SentencePiece vocabulary (size ",
           t.sp_size_, ") without gaps; expected id ", next, " but found ", id, " (\"",
           tok.content, "\")");
    ++next;
  }
  t.vocab_size_ = next;

  // Token string -> id: added tokens first (HF matches them first), then SP.
  auto resolve = [&](const std::string& s, const char* what) -> int32_t {
    for (const auto& [id, tok] : added)
      if (tok.content == s) return id;
    const int id = sp->PieceToId(s);
    if (id >= 0 && id < t.sp_size_ && sp->IdToPiece(id) == s) return id;
    fail("tokenizer: ", what, " \"", s, "\" is not in the vocabulary");
  };
  if (!bos_str.empty()) t.bos_id_ = resolve(bos_str, "bos_token");
  if (!eos_str.empty()) t.eos_id_ = resolve(eos_str, "eos_token");
  if (!pad_str.empty()) t.pad_id_ = resolve(pad_str, "pad_token");
  if (!unk_str.empty()) t.unk_id_ = resolve(unk_str, "unk_token");
  if (t.add_bos_token_ && t.bos_id_ < 0)
    fail("tokenizer: add_bos_token is set but the model defines no BOS token");
  if (t.add_eos_token_ && t.eos_id_ < 0)
    fail("tokenizer: add_eos_token is set but the model defines no EOS token");

  // Per-id table used by the stream decoder (decode() goes through SP).
  t.info_.resize(static_cast<size_t>(t.vocab_size_));
  std::string unk_surface = sp->DecodeIds({sp->unk_id() >= 0 ? sp->unk_id() : 0});
  for (int32_t id = 0; id < t.sp_size_; ++id) {
    TokenInfo& ti = t.info_[static_cast<size_t>(id)];
    ti.piece = sp->IdToPiece(id);
    if (sp->IsControl(id)) {
      ti.kind = Kind::Special;
      if (t.control_stand_in_ < 0) t.control_stand_in_ = id;
    } else if (sp->IsUnknown(id)) {
      ti.kind = Kind::Unknown;
      ti.surface = unk_surface;
    } else if (sp->IsByte(id)) {
      // Byte pieces are spelled "<0xAB>".
      unsigned v = 0;
      if (ti.piece.size() != 6 || std::sscanf(ti.piece.c_str(), "<0x%2X>", &v) != 1)
        fail("tokenizer model ", model_path.string(), ": malformed byte piece \"", ti.piece,
             "\" (id ", id, ")");
      ti.kind = Kind::Byte;
      ti.byte = static_cast<uint8_t>(v);
    } else {
      ti.kind = Kind::Text;
      ti.surface = replace_space_symbol(ti.piece);
    }
  }
  for (const auto& [id, tok] : added) {
    if (id < t.sp_size_) continue;
    TokenInfo& ti = t.info_[static_cast<size_t>(id)];
    ti.piece = tok.content;
    const bool named = id == t.bos_id_ || id == t.eos_id_ || id == t.pad_id_ || id == t.unk_id_;
    const bool special = tok.special_known ? tok.special : named;
    if (special) {
      ti.kind = Kind::Special;
    } else {
      // Added text tokens are not normalised by SP: emitted verbatim.
      ti.kind = Kind::Text;
      ti.surface = tok.content;
      t.has_text_added_tokens_ = true;
    }
  }
  t.sp_ = std::move(sp);
  return t;
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size_)
    fail("token id ", id, " is out of range for vocabulary of size ", vocab_size_);
}

bool Tokenizer::is_special(int32_t id) const {
  check_id(id);
  return info_[static_cast<size_t>(id)].kind == Kind::Special;
}

const std::string& Tokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return info_[static_cast<size_t>(id)].piece;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_bos) const {
  // SentencePiece itself maps invalid UTF-8 bytes to U+FFFD (one per byte)
  // while normalising, exactly as the python binding does for bytes input.
  std::vector<int> pieces;
  const auto status = sp_->Encode(text, &pieces);
  if (!status.ok()) fail("tokenizer: encoding failed (", status.ToString(), ")");
  std::vector<int32_t> ids;
  ids.reserve(pieces.size() + 2);
  if (add_bos && add_bos_token_) ids.push_back(bos_id_);
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_bos && add_eos_token_) ids.push_back(eos_id_);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  bool has_added = false;
  for (int32_t id : ids) {
    check_id(id);
    has_added |= id >= sp_size_;
  }
  if (has_added && (has_text_added_tokens_ || control_stand_in_ < 0)) {
    // SP cannot place verbatim added text (nor hide [PAD] without a control
    // id to stand in); the stream decoder implements the same rules.
    StreamDecoder sd(*this);
    std::string out;
    for (int32_t id : ids) out += sd.push(id);
    return out + sd.flush();
  }
  std::vector<int> sp_ids;
  sp_ids.reserve(ids.size());
  // Special added tokens ([PAD]) are outside SP; a control id stands in so
  // they stay invisible and still split byte-fallback runs.
  for (int32_t id : ids) sp_ids.push_back(id < sp_size_ ? id : control_stand_in_);
  std::string out;
  const auto status = sp_->Decode(sp_ids, &out);
  if (!status.ok()) fail("tokenizer: decoding failed (", status.ToString(), ")");
  return out;
}

// ---------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tok) : tok_(tok) {}

// Emits what the pending byte run already determines. SentencePiece decides
// each character from the bytes [i, i + needed_len) only, so once those are
// present (or a non-trail byte among them makes it invalid regardless) the
// outcome is final; at the end of a run, short sequences are invalid.
void StreamDecoder::drain_bytes(std::string& out, bool run_ended) {
  size_t i = 0;
  const auto* s = reinterpret_cast<const unsigned char*>(pending_.data());
  const size_t n = pending_.size();
  while (i < n) {
    const size_t need = needed_len(s[i]);
    const size_t avail = n - i;
    if (avail < need && !run_ended) {
      bool broken = false;
      for (size_t k = 1; k < avail; ++k) broken |= (s[i + k] & 0xC0) != 0x80;
      if (!broken) break;  // might still become a valid character
    }
    const size_t len = valid_utf8_len(s + i, avail);
    if (len > 0) {
      out.append(pending_, i, len);
      i += len;
    } else {
      out.append(kReplacement);  // one U+FFFD per invalid byte, like SP
      i += 1;
    }
  }
  pending_.erase(0, i);
}

std::string StreamDecoder::push(int32_t id) {
  tok_.check_id(id);
  std::string out;
  switch (tok_.kind(id)) {
    case Tokenizer::Kind::Special:
      // Invisible, but it ends a byte-fallback run (SP decodes runs of
      // consecutive byte pieces only) and keeps the dummy-prefix state.
      drain_bytes(out, true);
      break;
    case Tokenizer::Kind::Byte:
      at_start_ = false;
      pending_.push_back(static_cast<char>(tok_.byte_value(id)));
      drain_bytes(out, false);
      break;
    case Tokenizer::Kind::Unknown:
      drain_bytes(out, true);
      at_start_ = false;
      out += tok_.surface(id);
      break;
    case Tokenizer::Kind::Text: {
      drain_bytes(out, true);
      // Only the first visible piece loses its dummy-prefix "▁" (one, even
      // for "▁▁"); added text tokens are verbatim and never stripped.
      const bool strip = at_start_ && id < tok_.sp_vocab_size() &&
                         std::string_view(tok_.id_to_piece(id)).starts_with(kSpaceSymbol);
      out.append(tok_.surface(id), strip ? 1 : 0, std::string::npos);
      at_start_ = false;
      break;
    }
  }
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  drain_bytes(out, true);
  at_start_ = true;
  return out;
}

}  // namespace hymba
