#!/usr/bin/env python3
"""Chat-template goldens for hymba.cpp, rendered by Jinja2 (the reference), never
by the C++ code under test.

usage: make_chat_goldens.py TOKENIZER_DIR CONVERSATIONS_JSON OUT_JSON

The template string is read from TOKENIZER_DIR/tokenizer_config.json
("chat_template") and rendered for every conversation in CONVERSATIONS_JSON
exactly as Hugging Face transformers' apply_chat_template does: an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the `tojson`
filter replaced by json.dumps(x, ensure_ascii=False) (transformers overrides
Jinja's HTML-escaping, key-sorting tojson), and the conversation's `tools`,
`contexts` (an extra template variable) and `add_generation_prompt` passed as
template variables (None when absent; add_generation_prompt defaults to False).
Rendered text is tokenized with python3-sentencepiece without BOS (HF tokenizes
the rendered chat with add_special_tokens=False).

Conversations the template rejects (Jinja raises) are recorded with
"error": true and the exception text.
"""
import json
import os
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
import sentencepiece as spm


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def main():
    tok_dir, conv_path, out_path = sys.argv[1:4]
    with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        template_string = json.load(f)["chat_template"]
    with open(conv_path, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    template = hf_environment().from_string(template_string)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    out = {"template": template_string, "cases": []}
    for case in cases:
        conv = case["conversation"]
        entry = {"name": case["name"], "conversation": conv}
        try:
            text = template.render(messages=conv["messages"], tools=conv.get("tools"),
                                   contexts=conv.get("contexts"),
                                   add_generation_prompt=conv.get("add_generation_prompt", False))
        except Exception as e:  # the template rejects this conversation
            entry["error"] = True
            entry["message"] = f"{type(e).__name__}: {e}"
        else:
            entry["error"] = False
            entry["rendered"] = text
            entry["ids"] = sp.encode(text)
        out["cases"].append(entry)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
    print(f"wrote {len(out['cases'])} chat goldens to {out_path}")


if __name__ == "__main__":
    main()
