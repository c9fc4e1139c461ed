#!/bin/bash
# Reproduces train/data/ (corpus splits, tokenizer, token ids) from Debian packages.
#   bash train/prepare_data.sh [DATA_DIR]     (default train/data; needs root for apt)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-train/data}
PKGS="bible-kjv bible-kjv-text dict-devil dict-jargon fortunes fortunes-min sentencepiece python3-sentencepiece python3-numpy"
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi
mkdir -p "$DATA"
/usr/bin/python3 train/prepare_corpus.py "$DATA"
bash train/train_tokenizer.sh "$DATA" 4096
/usr/bin/python3 train/tokenize_data.py "$DATA"
sha256sum "$DATA"/train.txt "$DATA"/valid.txt "$DATA"/valid_sample.txt "$DATA"/tokenizer.model
