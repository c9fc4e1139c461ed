#!/usr/bin/env bash
# The newcomer's command: installs dependencies, builds, and generates English
# from the model shipped in the repository (models/hymba-pd-7m, a 7.4M-
# parameter Hymba trained by this project; see MODELS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
model=models/hymba-pd-7m
build/hymba info -m "$model" --ctx 4096
echo "--- greedy continuation ---"
build/hymba generate -m "$model" -p "And God said" -n 60
echo
echo "--- sampled continuation (temperature 0.8, top-k 40, seed 7) ---"
build/hymba generate -m "$model" -p "In the beginning of the world" -n 80 --temp 0.8 --top-k 40 \
  --repeat-penalty 1.1 --seed 7
echo
echo "--- held-out perplexity (the training script measured 44.57 on this file) ---"
build/hymba perplexity -m "$model" -f "$model/heldout_sample.txt"
