#!/usr/bin/python3
"""Builds the training corpus of the embedded model from public-domain English
text that Debian packages ship, and splits it deterministically.

Sources (see MODELS.md):
  kjv     bible-kjv-text (+ bible-kjv for the `bible` reader): the King James
          Bible, one document per chapter, one verse per line (no numbers).
  devil   dict-devil: Ambrose Bierce, The Devil's Dictionary (1911), one
          document per entry, paragraphs re-flowed to single lines.
  jargon  dict-jargon: the Jargon File 4.4.7 (public domain), likewise.
  fortune fortunes + fortunes-min (English fortune cookies), one document per
          cookie, lines kept as written (tabs expanded); the art files skipped.

Documents are joined with one blank line ("\\n\\n"). A document goes to the
held-out split when the first byte of sha256("<source>/<key>") is < 6 (about
2.3 %), so the split never depends on order or on the other documents.

Usage: prepare_corpus.py OUTDIR
  writes OUTDIR/train.txt, valid.txt, stats.json and valid_sample.txt (the first
  held-out documents of each source, >= 2000 characters each: the tests' text)
"""
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# Typographic quotes and dashes -> ASCII, so the tokenizer spends no pieces on them.
ASCII_PUNCT = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                             "\u2014": "--", "\u00b4": "'", "\u00ad": ""})


def b64num(s):
    v = 0
    for ch in s:
        v = v * 64 + B64.index(ch)
    return v


def dictd_entries(name):
    """(headword, text) of every entry of /usr/share/dictd/NAME.{index,dict.dz}."""
    with gzip.open(f"/usr/share/dictd/{name}.dict.dz", "rb") as f:
        data = f.read()
    seen = set()
    out = []
    with open(f"/usr/share/dictd/{name}.index", encoding="utf-8") as f:
        for line in f:
            head, off, ln = line.rstrip("\n").split("\t")[:3]
            if head.startswith("00-database") or head.startswith("00database"):
                continue
            key = (off, ln)
            if key in seen:  # several headwords may share one entry
                continue
            seen.add(key)
            o, n = b64num(off), b64num(ln)
            out.append((o, head, data[o:o + n].decode("utf-8", errors="replace")))
    out.sort()
    return [(h, t) for _, h, t in out]


def reflow(text):
    """Blank-line separated blocks -> one line each, inner whitespace collapsed."""
    blocks = re.split(r"\n\s*\n", text.strip("\n"))
    lines = [" ".join(b.split()) for b in blocks]
    return "\n".join(l for l in lines if l)


def kjv_docs():
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, check=True).stdout.decode("utf-8")
    chapters = {}
    order = []
    for line in out.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        key = f"{m.group(1)}{m.group(2)}"
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).strip())
    return [(k, "\n".join(chapters[k])) for k in order]


def fortune_docs():
    root = "/usr/share/games/fortunes"
    skip = {"art", "ascii-art", "translate-me"}
    docs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if "." in name or name in skip or not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for i, cookie in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            lines = [l.expandtabs(8).rstrip() for l in cookie.strip("\n").split("\n")]
            body = "\n".join(lines).strip("\n")
            if len(body) < 20:
                continue
            docs.append((f"{name}/{i}", body))
    return docs


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    sources = {
        "kjv": kjv_docs(),
        "devil": [(h, reflow(t)) for h, t in dictd_entries("devil")],
        "jargon": [(h, reflow(t)) for h, t in dictd_entries("jargon")],
        "fortune": fortune_docs(),
    }
    train, valid = [], []
    sample = []  # a small mixed held-out text for the tests: >= 2000 chars per source
    stats = {}
    for src, docs in sources.items():
        nt = nv = ct = cv = 0
        sample_chars = 0
        for key, text in docs:
            text = text.replace("\r", "").translate(ASCII_PUNCT)
            if not text.strip() or re.search("[\u2500-\u257f]", text):
                continue  # empty, or a box-drawing table
            h = hashlib.sha256(f"{src}/{key}".encode()).digest()[0]
            if h < 6:
                valid.append(text); nv += 1; cv += len(text)
                if sample_chars < 2000:
                    sample.append(text); sample_chars += len(text)
            else:
                train.append(text); nt += 1; ct += len(text)
        stats[src] = {"train_docs": nt, "valid_docs": nv, "train_chars": ct, "valid_chars": cv}
    for name, docs in (("train.txt", train), ("valid.txt", valid), ("valid_sample.txt", sample)):
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
    with open(os.path.join(outdir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
