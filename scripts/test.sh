#!/usr/bin/env bash
# Installs everything (apt), builds, and runs every test (ctest: GoogleTest
# unit tests, PyTorch-reference goldens, fixture checks, CLI tests).
# Tests read ../shared (fixtures, real tokenizer) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
scripts/build.sh
cd build
ctest --output-on-failure --timeout 1500 "$@"
