#!/usr/bin/python3
"""Tokenises the corpus splits with the trained tokenizer, exactly as the engine
does for `hymba perplexity -f FILE`: the whole file as one string through
SentencePiece, with BOS (id 1) in front. Writes DATA/{train,valid,valid_sample}.ids.npy
(uint16). The device needs no sentencepiece: it reads these arrays.

Usage: tokenize_data.py DATA_DIR
"""
import sys

import numpy as np
import sentencepiece as spm

data = sys.argv[1]
sp = spm.SentencePieceProcessor(model_file=f"{data}/tokenizer.model")
assert sp.GetPieceSize() < 65536
for split in ("train", "valid", "valid_sample"):
    with open(f"{data}/{split}.txt", encoding="utf-8") as f:
        text = f.read()
    ids = [sp.bos_id()] + sp.encode(text)
    np.save(f"{data}/{split}.ids.npy", np.asarray(ids, dtype=np.uint16))
    print(f"{split}: {len(text)} chars, {len(ids)} tokens ({len(text) / len(ids):.3f} chars/token)")
