// Hymba's tokenizer: the Llama-2 SentencePiece BPE model plus the HF
// tokenizer_config.json / added_tokens.json extras (BOS/EOS flags, [PAD]).
//
// Behaviour (see docs in the .cpp for the reasoning):
//  * encode() == HF LlamaTokenizer (slow, legacy=true): SentencePiece with its
//    dummy-prefix "▁" and byte fallback, BOS prepended when requested.
//    Text is taken literally: a "<s>" or "[PAD]" inside the text is encoded as
//    ordinary characters, never as the special token.
//  * Invalid UTF-8 input does not throw: like python3-sentencepiece given the
//    same bytes, every byte that is not part of a valid UTF-8 sequence becomes
//    U+FFFD before tokenisation.
//  * decode() == sentencepiece decode: "▁" -> " ", the dummy-prefix space of
//    the first visible piece is dropped, byte-fallback runs are reassembled and
//    each byte that does not form valid UTF-8 becomes U+FFFD. Control tokens
//    (<s>, </s>) and special added tokens ([PAD]) produce no text; <unk>
//    renders as sentencepiece's " ⁇ ".
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace hymba {

class Tokenizer {
 public:
  // Reads dir/tokenizer.model (required) and, when present,
  // dir/tokenizer_config.json and dir/added_tokens.json. Throws hymba::Error
  // naming the file and the problem.
  static Tokenizer load(const std::string& dir);

  // add_bos: add the special tokens the config asks for, like HF's
  // add_special_tokens=True (BOS if add_bos_token, EOS if add_eos_token).
  std::vector<int32_t> encode(const std::string& text, bool add_bos) const;
  std::string decode(const std::vector<int32_t>& ids) const;

  // Full vocabulary including added tokens (32001 for Hymba).
  int vocab_size() const { return vocab_size_; }
  // Size of the SentencePiece model alone (32000 for Hymba).
  int sp_vocab_size() const { return sp_size_; }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }  // -1 when there is none
  int32_t unk_id() const { return unk_id_; }
  bool add_bos_token() const { return add_bos_token_; }
  bool add_eos_token() const { return add_eos_token_; }

  // Raw piece text ("▁Hello", "<0x0A>", "[PAD]"); throws on a bad id.
  const std::string& id_to_piece(int32_t id) const;
  // Throws hymba::Error naming the id and the vocab size if id is invalid.
  void check_id(int32_t id) const;
  bool is_special(int32_t id) const;  // produces no text when decoded

  // How the stream decoder sees a token; exposed so it can be tested.
  enum class Kind : uint8_t { Text, Byte, Unknown, Special };
  Kind kind(int32_t id) const { return info(id).kind; }
  // Text kind: piece with "▁" -> " "; Unknown: its surface (" ⁇ ").
  const std::string& surface(int32_t id) const { return info(id).surface; }
  uint8_t byte_value(int32_t id) const { return info(id).byte; }  // Byte kind

 private:
  struct TokenInfo {
    Kind kind = Kind::Text;
    uint8_t byte = 0;
    std::string piece;
    std::string surface;
  };

  const TokenInfo& info(int32_t id) const {
    check_id(id);
    return info_[static_cast<size_t>(id)];
  }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::vector<TokenInfo> info_;  // one entry per id in [0, vocab_size)
  int vocab_size_ = 0;
  int sp_size_ = 0;
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1;
  bool add_bos_token_ = true;
  bool add_eos_token_ = false;
  bool has_text_added_tokens_ = false;  // non-special added tokens exist
  int32_t control_stand_in_ = -1;       // an SP control id that decode() uses for [PAD]
};

// Incremental detokenizer for generation. push() returns only complete
// UTF-8; the concatenation of all push() results plus flush() equals
// tokenizer.decode(all ids). Keeps a reference to the tokenizer.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok);

  std::string push(int32_t id);
  // End of stream: releases held bytes of an unfinished byte-fallback run
  // (each becomes U+FFFD, as decode does) and resets for a new sequence.
  std::string flush();

 private:
  void drain_bytes(std::string& out, bool run_ended);

  const Tokenizer& tok_;
  std::string pending_;      // bytes of the current byte-fallback run not yet emitted
  bool at_start_ = true;     // no visible piece yet: dummy-prefix "▁" still to strip
};

}  // namespace hymba
