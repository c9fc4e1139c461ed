#!/bin/bash
# Trains the embedded model's SentencePiece tokenizer (BPE, byte fallback,
# Llama-style special ids: <unk>=0, <s>=1, </s>=2, no pad) on the training split.
#   train/train_tokenizer.sh DATA_DIR [VOCAB]
# Writes DATA_DIR/tokenizer.model (+ .vocab). Deterministic for a given input.
# add_dummy_prefix=false: a prompt's first word is cut as a word at the start
# of a line is in the corpus (verses, cookies and paragraphs start lines).
set -euo pipefail
DATA=${1:?usage: train_tokenizer.sh DATA_DIR [VOCAB]}
VOCAB=${2:-4096}
command -v spm_train >/dev/null || { apt-get update -q && apt-get install -y -q sentencepiece; }
spm_train --input="$DATA/train.txt" --model_prefix="$DATA/tokenizer" \
  --model_type=bpe --vocab_size="$VOCAB" --character_coverage=1.0 --byte_fallback=true \
  --split_digits=true --normalization_rule_name=identity --remove_extra_whitespaces=false \
  --add_dummy_prefix=false --allow_whitespace_only_pieces=true \
  --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 \
  --max_sentence_length=16384 --input_sentence_size=0 --num_threads=2 --minloglevel=1
echo "tokenizer: $DATA/tokenizer.model (vocab $VOCAB)"
