#!/usr/bin/python3
"""Validate hymba_ref.py against the tiny-a fixture (outputs of NVIDIA's own code).

Usage: check_fixture.py [PATH]
  PATH is the shared directory (containing fixtures/tiny-a) or the fixture
  directory itself; default: <repo root>/../shared.

Checks, for every case of expected.json: float64 reference logits within 1e-4
(max abs) of the stored float32 logits, and greedy tokens (fresh full forward per
step) equal to greedy.tokens. Exits non-zero on any failure.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hymba_ref import HymbaReference  # noqa: E402
from safetensors_io import load_checkpoint  # noqa: E402

LOGIT_TOL = 1e-4


def fixture_dir(arg):
    if arg is None:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        arg = os.path.join(repo, "..", "shared")
    if os.path.exists(os.path.join(arg, "expected.json")):
        return arg
    return os.path.join(arg, "fixtures", "tiny-a")


def main():
    torch.set_num_threads(1)  # tiny matmuls: more threads only add overhead
    fdir = fixture_dir(sys.argv[1] if len(sys.argv) > 1 else None)
    with open(os.path.join(fdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(fdir, "expected.json")) as f:
        expected = json.load(f)
    model = HymbaReference(config, load_checkpoint(fdir), dtype=torch.float64)

    ok = True
    overall = 0.0
    for case in expected["cases"]:
        ids = case["input_ids"]
        # The fixture stores float32 values with 9 significant digits.
        want = np.asarray(case["logits"], dtype=np.float64).astype(np.float32).astype(np.float64)
        got = model.logits(ids).numpy()
        diff = float(np.max(np.abs(got - want)))
        overall = max(overall, diff)
        n_new = case["greedy"]["new_tokens"]
        tokens, margins = model.greedy_with_margins(ids, n_new)
        tok_ok = tokens == case["greedy"]["tokens"]
        logit_ok = diff <= LOGIT_TOL
        ok &= tok_ok and logit_ok
        print(f"{case['name']:>6}: T={len(ids):3d} max|dlogit|={diff:.3e} "
              f"{'ok' if logit_ok else 'FAIL'}; greedy {n_new} tokens "
              f"{'match' if tok_ok else 'MISMATCH'} (min margin {min(margins):.4f})")
        if not tok_ok:
            print("   got     ", tokens)
            print("   expected", case["greedy"]["tokens"])
    print(f"overall max |dlogit| = {overall:.3e} (tolerance {LOGIT_TOL:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
