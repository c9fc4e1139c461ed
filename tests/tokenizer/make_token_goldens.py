#!/usr/bin/env python3
"""Token goldens for hymba.cpp's tokenizer tests, produced by python3-sentencepiece
(the reference), never by the C++ code under test.

usage: make_token_goldens.py TOKENIZER_DIR OUT_JSON

HF LlamaTokenizer (slow, legacy=true) tokenizes plain text exactly as
sentencepiece does and prepends BOS (id from sp.bos_id()) for add_special_tokens,
so encode goldens are [bos] + sp.encode(bytes). All strings are stored as hex
bytes so invalid UTF-8 and control characters survive JSON unchanged.
"""
import json
import os
import random
import sys

import sentencepiece as spm

CHAT_EXAMPLE = ("<extra_id_0>System\nYou are a helpful assistant.\n\n"
                "<extra_id_1>User\nHi\n<extra_id_1>Assistant\n")
CHAT_EXAMPLE_IDS = [529, 17833, 29918, 333, 29918, 29900, 29958, 3924, 13, 3492, 526, 263,
                    8444, 20255, 29889, 13, 13, 29966, 17833, 29918, 333, 29918, 29896, 29958,
                    2659, 13, 18567, 13, 29966, 17833, 29918, 333, 29918, 29896, 29958, 7900,
                    22137, 13]


def corpus():
    """(name, bytes, add_bos) triples: text that stresses the tokenizer."""
    u = lambda s: s.encode("utf-8")
    rng = random.Random(20240611)
    long_mixed = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789")
                         for _ in range(4000))
    items = [
        ("hello_world", u("Hello world"), True),
        ("chat_example_no_bos", u(CHAT_EXAMPLE), False),
        ("empty", b"", True),
        ("empty_no_bos", b"", False),
        ("single_space", u(" "), True),
        ("space_runs", u("a  b   c    d     e          f"), True),
        ("leading_spaces", u("   leading spaces"), True),
        ("trailing_spaces", u("trailing spaces   "), True),
        ("only_spaces", u("        "), True),
        ("tabs", u("\tcol1\tcol2\t\tcol4\t"), True),
        ("newlines", u("line one\nline two\n\n\nline five\n"), True),
        ("crlf", u("windows\r\nline\r\nendings\r\n"), True),
        ("mixed_ws", u(" \t \n \r\n\v\f x \u00a0 \u2003 \u3000 y"), True),
        ("emoji", u("I love 🍕 and 🚀!"), True),
        ("emoji_zwj", u("family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 skin 👍🏽 keycap 1️⃣"), True),
        ("cjk", u("你好，世界！日本語のテキスト。한국어 문장입니다."), True),
        ("arabic", u("مرحبا بالعالم، هذا نص عربي."), True),
        ("hebrew_rtl_mix", u("abc שלום עולם 123"), True),
        ("combining", u("e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 \u1e9b\u0323"), True),
        ("nfc_vs_nfd", u("caf\u00e9 vs cafe\u0301"), True),
        ("code_python", u("def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n"), True),
        ("code_cpp", u("template <typename T>\nint main(int argc, char** argv) {\n\tstd::cout << \"hi\\n\";\n\treturn 0;\n}\n"), True),
        ("code_json", u('{"key": null, "arr": [true, false, 1e-9], "nested": {"x": "y"}}'), True),
        ("digits", u("0123456789 3.14159 1,000,000 -42 0x1F 2024-06-11"), True),
        ("long_digits", u("9" * 300), True),
        ("long_word_a", u("a" * 5000), True),
        ("long_word_mixed", u(long_mixed), True),
        ("long_word_cjk", u("字" * 1500), True),
        ("special_strings_literal", u("<s> </s> [PAD] <unk> <0x0A>"), True),
        ("spm_space_symbol", u("\u2581already\u2581spaced \u2581"), True),
        ("math_symbols", u("∀x∈ℝ: x² ≥ 0 ∑ ∫ √ ≠ ≈ ∞"), True),
        ("nul_and_controls", b"a\x00b\x01c\x1fd\x7f", True),
        ("rare_chars", u("\U0001f9ec \U00010348 \ufeff\u200b\u200d \U0010fffd"), True),
        ("replacement_char", u("\ufffd literal"), True),
        ("invalid_lone_ff", b"\xff", True),
        ("invalid_mid", b"abc\xffdef", True),
        ("invalid_truncated_3byte", b"euro \xe2\x82", True),
        ("invalid_truncated_4byte_end", b"\xf0\x9f\x98", True),
        ("invalid_lone_continuation", b"\x80\x81 x \xbf", True),
        ("invalid_overlong", b"\xc0\xaf \xe0\x80\xaf", True),
        ("invalid_surrogate", b"\xed\xa0\x80\xed\xbf\xbf", True),
        ("invalid_above_max", b"\xf4\x90\x80\x80 \xf5\x80\x80\x80", True),
        ("invalid_mixed_valid", b"ok \xe2\x82\xac then \xe2\x28\xa1 then \xf0\x28\x8c\xbc", True),
        ("invalid_no_bos", b"\xfe\xfe hi", False),
        ("plain_no_bos", u("The quick brown fox jumps over the lazy dog."), False),
    ]
    return items


def decode_cases(sp):
    """Id sequences whose sentencepiece decode the stream decoder must match."""
    byte = lambda v: sp.piece_to_id("<0x%02X>" % v)
    bs = lambda data: [byte(v) for v in data]
    cases = [
        ("bos_space_hello", [1, 29871, 15043]),
        ("space_space_hello", [29871, 29871, 15043]),
        ("double_space_piece_first", [259, 15043]),
        ("byte_then_hello", [3, 15043]),
        ("unk_then_hello", [0, 15043]),
        ("unk_alone", [0]),
        ("bos_eos_only", [1, 2, 1]),
        ("controls_between", [1, 15043, 2, 3186, 1]),
        ("euro_bytes", bs(b"\xe2\x82\xac")),
        ("euro_bytes_then_text", bs(b"\xe2\x82\xac") + [3186]),
        ("emoji_bytes", bs("😀".encode())),
        ("bytes_split_by_bos", bs(b"\xe2") + [1] + bs(b"\x82\xac")),
        ("truncated_then_text", bs(b"\xe2\x82") + [15043]),
        ("truncated_then_ascii_byte", bs(b"\xe2\x82A")),
        ("overlong_bytes", bs(b"\xe0\x80\x80")),
        ("surrogate_bytes", bs(b"\xed\xa0\x80")),
        ("fffd_bytes", bs(b"\xef\xbf\xbd")),
        ("space_symbol_bytes", bs("\u2581".encode()) + [15043]),
        ("trailing_truncated", [15043] + bs(b"\xf0\x9f\x98")),
        ("lead_then_lead", bs(b"\xe2\xe2\x82\xac")),
    ]
    rng = random.Random(1234)
    n = sp.vocab_size()
    leads = [0xC3, 0xCE, 0xE2, 0xE4, 0xED, 0xE0, 0xF0, 0xF4, 0xF5, 0xC0, 0xFF]
    for k in range(300):
        seq = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.25:
                seq.append(byte(rng.choice(leads)))
            elif r < 0.5:
                seq.append(byte(rng.randint(0x80, 0xBF)))
            elif r < 0.6:
                seq.append(byte(rng.randint(0, 0xFF)))
            elif r < 0.68:
                seq.append(rng.choice([0, 1, 2]))
            else:
                seq.append(rng.randint(3, n - 1))
        cases.append(("random_%03d" % k, seq))
    return cases


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_token_goldens.py TOKENIZER_DIR OUT_JSON")
    tok_dir, out_path = sys.argv[1], sys.argv[2]
    model = os.path.join(tok_dir, "tokenizer.model")
    if not os.path.isfile(model):
        sys.exit("make_token_goldens.py: %s not found" % model)
    sp = spm.SentencePieceProcessor(model_file=model)
    bos = sp.bos_id()

    enc = []
    for name, data, add_bos in corpus():
        ids = sp.encode(data)  # bytes in: sentencepiece's own invalid-UTF-8 handling
        if add_bos:
            ids = [bos] + ids
        enc.append({"name": name, "text_hex": data.hex(), "add_bos": add_bos, "ids": ids,
                    "decoded_hex": sp.decode(ids).encode("utf-8").hex()})

    by_name = {e["name"]: e for e in enc}
    if by_name["hello_world"]["ids"] != [1, 15043, 3186]:
        sys.exit("make_token_goldens.py: 'Hello world' gave %s, spec says [1, 15043, 3186]"
                 % by_name["hello_world"]["ids"])
    if by_name["chat_example_no_bos"]["ids"] != CHAT_EXAMPLE_IDS:
        sys.exit("make_token_goldens.py: chat example disagrees with the spec test vector")

    dec = [{"name": name, "ids": ids, "text_hex": sp.decode(ids).encode("utf-8").hex()}
           for name, ids in decode_cases(sp)]

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"generator": "python3-sentencepiece " + spm.__version__,
                   "sp_vocab_size": sp.vocab_size(), "bos_id": bos, "eos_id": sp.eos_id(),
                   "encode": enc, "decode": dec}, f, indent=1)
    os.replace(tmp, out_path)  # never leave a half-written golden file behind
    print("wrote %d encode and %d decode goldens to %s" % (len(enc), len(dec), out_path))


if __name__ == "__main__":
    main()
