"""Tests of the embedded model (models/hymba-pd-7m, see MODELS.md) and of
`hymba perplexity`.

Expected values come from outside the engine:
  * models/hymba-pd-7m/eval.json, written by the training script
    (train/train.py) on the device machine: held-out perplexity with the
    engine's definition, and greedy continuations of fixed prompts;
  * the PyTorch reference (tests/reference/hymba_ref.py) run here on the
    shipped weights;
  * train/hymba_model.py, the batched training twin, checked against the
    reference.

Environment (set by tests/CMakeLists.txt): HYMBA_BIN, HYMBA_TEST_WORK.
"""

import json
import math
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))

BIN = os.environ.get("HYMBA_BIN", os.path.join(ROOT, "build", "hymba"))
MODEL = os.path.join(ROOT, "models", "hymba-pd-7m")
WORK = os.path.join(os.environ.get("HYMBA_TEST_WORK", "/tmp/hymba-test-work"), "embedded")


def run(*args, check=True):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"hymba {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def ids_line(s):
    return [int(x) for x in [l for l in s.strip().split("\n") if l.strip()][-1].split(",")]


def eval_record():
    with open(os.path.join(MODEL, "eval.json")) as f:
        return json.load(f)


class EmbeddedModel(unittest.TestCase):
    def test_files_layout_and_features(self):
        for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
            self.assertTrue(os.path.isfile(os.path.join(MODEL, name)), name)
        total = sum(os.path.getsize(os.path.join(MODEL, n)) for n in os.listdir(MODEL))
        self.assertLessEqual(total, 25 * 1000 * 1000)
        with open(os.path.join(MODEL, "config.json")) as f:
            cfg = json.load(f)
        # every Hymba feature on: meta tokens, global + sliding layers, KV sharing
        self.assertGreater(cfg["num_memory_tokens"], 0)
        self.assertIsNotNone(cfg["sliding_window"])
        self.assertTrue(0 < len(cfg["global_attn_idx"]) < cfg["num_hidden_layers"])
        self.assertTrue(cfg["kv_reuse_group"])
        self.assertLess(cfg["num_key_value_heads"], cfg["num_attention_heads"])
        info = json.loads(run("info", "-m", MODEL, "--json").stdout)
        self.assertEqual(json.dumps(info).count("consumer") > 0, True)

    def test_loads_and_generates_text(self):
        p = run("generate", "-m", MODEL, "-p", "And God said", "-n", "24", "-t", "2")
        text = p.stdout.strip()
        self.assertGreater(len(text), 40)
        words = text.split()
        self.assertGreater(sum(w.strip(",.;:").isalpha() for w in words), 0.8 * len(words))

    def test_perplexity_matches_training_script(self):
        rec = eval_record()["heldout_sample"]
        p = run("perplexity", "-m", MODEL, "-f", os.path.join(MODEL, "heldout_sample.txt"),
                "--ctx", rec["ctx"], "--stride", rec["stride"], "--json", "-t", "2")
        got = json.loads(p.stdout)
        self.assertEqual(got["scored"], rec["tokens_scored"])
        self.assertLess(abs(got["perplexity"] / rec["perplexity"] - 1), 1e-3,
                        f"engine {got['perplexity']} vs training script {rec['perplexity']}")
        self.assertLess(abs(got["loss"] - rec["loss"]), 1e-3)

    def test_greedy_matches_training_script_record(self):
        for prompt, s in eval_record()["samples"].items():
            p = run("generate", "-m", MODEL, "-p", prompt, "-n", len(s["greedy_ids"]), "--print-ids", "-t", "2")
            self.assertEqual(ids_line(p.stdout), s["greedy_ids"], prompt)

    def test_greedy_matches_pytorch_reference(self):
        import torch
        from hymba_ref import HymbaReference
        from safetensors_io import load_file
        with open(os.path.join(MODEL, "config.json")) as f:
            cfg = json.load(f)
        torch.set_num_threads(2)
        ref = HymbaReference(cfg, load_file(os.path.join(MODEL, "model.safetensors")),
                             dtype=torch.float64, matmul_input_bf16=True)
        prompt = "And God said"
        ids = ids_line(run("tokenize", "-m", MODEL, "-p", prompt).stdout)
        want, margins = ref.greedy_with_margins(ids, 16)
        # The engine also keeps K/V in bf16: only clear margins make a fair test.
        self.assertGreater(min(margins), 0.05, margins)
        p = run("generate", "-m", MODEL, "-p", prompt, "-n", 16, "--print-ids", "-t", "2")
        self.assertEqual(ids_line(p.stdout), want)


class TrainingTwin(unittest.TestCase):
    """train/hymba_model.py (batched, chunked scan) computes the reference's function."""

    def test_matches_reference(self):
        sys.path.insert(0, os.path.join(ROOT, "train"))
        from hymba_model import check_against_reference
        from make_goldens import make_config
        cfg = make_config(4, 32, 4, 2, 97, 48, 8, [0, 3], [[1, 2]], 6, d_state=8, dt_rank=4)
        self.assertLess(check_against_reference(cfg, T=30), 1e-9)


class Perplexity(unittest.TestCase):
    """`hymba perplexity` against a direct computation from `hymba logits`."""

    def test_single_window_equals_logits(self):
        ids = [1, 331, 464, 444, 367, 379, 3976, 318, 556, 262, 402]
        logits = json.loads(run("logits", "-m", MODEL, "--ids", ",".join(map(str, ids)),
                                "--all-positions").stdout)["logits"]
        nll = 0.0
        for t in range(1, len(ids)):
            row = logits[t - 1]
            mx = max(row)
            nll += mx + math.log(sum(math.exp(v - mx) for v in row)) - row[ids[t]]
        nll /= len(ids) - 1
        got = json.loads(run("perplexity", "-m", MODEL, "--ids", ",".join(map(str, ids)),
                             "--ctx", 64, "--json").stdout)
        self.assertEqual(got["windows"], 1)
        self.assertEqual(got["scored"], len(ids) - 1)
        self.assertAlmostEqual(got["loss"], nll, delta=1e-5)

    def test_sliding_windows_score_each_token_once(self):
        ids = ",".join(str(3 + (i * 37) % 4000) for i in range(50))
        got = json.loads(run("perplexity", "-m", MODEL, "--ids", ids, "--ctx", 16, "--stride", 5,
                             "--json").stdout)
        self.assertEqual(got["scored"], 49)
        # windows start at 0, 5, ..., 35 (the first to reach the end: 35 + 16 >= 50)
        self.assertEqual(got["windows"], 8)
        self.assertTrue(math.isfinite(got["perplexity"]))

    def test_bad_input(self):
        cases = [
            (["--ids", "1,2,3", "--ctx", 8, "--stride", 8], "stride"),
            (["--ids", "1"], "at least 2 tokens"),
            (["--ids", "1,99999"], "out of range"),
            (["-f", "/nonexistent/file.txt"], "file"),
            ([], "exactly one"),
        ]
        for extra, msg in cases:
            p = run("perplexity", "-m", MODEL, *extra, check=False)
            self.assertEqual(p.returncode, 1, (extra, p.stderr))
            self.assertIn(msg, p.stderr, extra)
            # The error is the last line (a load summary may come before it).
            self.assertTrue(p.stderr.strip().splitlines()[-1].startswith("error:"), p.stderr)


if __name__ == "__main__":
    unittest.main()
