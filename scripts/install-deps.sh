#!/usr/bin/env bash
# Installs everything hymba.cpp needs on Debian 12 from Debian's packages.
#   scripts/install-deps.sh          build + run dependencies
#   scripts/install-deps.sh --test   plus the test-time references (PyTorch, SentencePiece for Python)
set -euo pipefail

packages=(build-essential cmake ninja-build pkg-config git
          nlohmann-json3-dev libcli11-dev libsentencepiece-dev)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(libgtest-dev libgmock-dev python3 python3-numpy python3-torch python3-sentencepiece python3-jinja2)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
