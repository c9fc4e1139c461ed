#!/usr/bin/env bash
# The newcomer's command: installs dependencies, builds, and generates from a
# small model. Until the embedded trained model lands, the model is a
# random-weight "tiny" Hymba written by `hymba init` (so the output is not
# meaningful English): it shows the whole pipeline working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
model=build/models/tiny-random
[[ -f $model/model.safetensors ]] || build/hymba init --preset tiny --dtype f32 --seed 1 --out "$model"
build/hymba info -m "$model" --ctx 4096
echo "--- generating 32 tokens (random weights: ids, not text) ---"
build/hymba generate -m "$model" --ids 1,15043,3186 -n 32 --temp 0.8 --seed 7 --print-ids
