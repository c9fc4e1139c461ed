"""End-to-end tests of the `hymba` command line.

Golden values come from independent references only:
  * ../shared/fixtures/tiny-a (NVIDIA's public reference code),
  * the PyTorch reference in tests/reference (goldens written by the ctest
    fixture `reference_goldens` into $HYMBA_TEST_WORK/goldens, and direct
    reference runs below),
  * python3-sentencepiece on the real tokenizer in ../shared/hymba-1.5b,
  * the spec's arithmetic (../shared/spec/hymba-model.md, sections 1 and 7).

Environment (set by tests/CMakeLists.txt): HYMBA_BIN, HYMBA_SHARED_DIR, HYMBA_TEST_WORK.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))

BIN = os.environ.get("HYMBA_BIN", os.path.join(HERE, "..", "..", "build", "hymba"))
SHARED = os.environ.get("HYMBA_SHARED_DIR", os.path.join(HERE, "..", "..", "..", "shared"))
WORK = os.path.join(os.environ.get("HYMBA_TEST_WORK", "/tmp/hymba-test-work"), "cli")
GOLDENS = os.path.join(os.path.dirname(WORK), "goldens")
FIXTURE = os.path.join(SHARED, "fixtures", "tiny-a")
REAL_1P5B = os.path.join(SHARED, "hymba-1.5b")


def run(*args, check=True, input_text=None):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, input=input_text, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"hymba {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def rel_l2(got, want):
    num = sum((g - w) ** 2 for rg, rw in zip(got, want) for g, w in zip(rg, rw))
    den = sum(w * w for rw in want for w in rw)
    return math.sqrt(num / den)


def last_line(s):
    return [l for l in s.strip().split("\n") if l.strip()][-1]


def ids_line(s):
    return [int(x) for x in last_line(s).split(",")]


class Fixture(unittest.TestCase):
    """tiny-a: outputs of NVIDIA's public Hymba code (fixture README tolerances)."""

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(FIXTURE, "expected.json")) as f:
            cls.fx = json.load(f)

    def test_logits_all_positions(self):
        for case in self.fx["cases"]:
            with self.subTest(case=case["name"]):
                ids = ",".join(map(str, case["input_ids"]))
                got = json.loads(run("logits", "-m", FIXTURE, "--ids", ids, "--all-positions").stdout)["logits"]
                want = case["logits"]
                self.assertEqual(len(got), len(want))
                max_abs = max(abs(g - w) for rg, rw in zip(got, want) for g, w in zip(rg, rw))
                self.assertLessEqual(max_abs, 1e-3)

    def test_last_position_logits(self):
        case = self.fx["cases"][-1]
        ids = ",".join(map(str, case["input_ids"]))
        got = json.loads(run("logits", "-m", FIXTURE, "--ids", ids).stdout)["logits"]
        self.assertEqual(len(got), 1)
        self.assertLessEqual(max(abs(g - w) for g, w in zip(got[0], case["logits"][-1])), 1e-3)

    def test_hugepages_copy_gives_identical_logits(self):
        case = self.fx["cases"][2]
        ids = ",".join(map(str, case["input_ids"]))
        mapped = run("logits", "-m", FIXTURE, "--ids", ids, "--all-positions").stdout
        copied = run("logits", "-m", FIXTURE, "--ids", ids, "--all-positions", "--hugepages").stdout
        self.assertEqual(mapped, copied)

    def test_greedy_generation(self):
        for case in self.fx["cases"]:
            with self.subTest(case=case["name"]):
                ids = ",".join(map(str, case["input_ids"]))
                want = case["greedy"]["tokens"]
                out = run("generate", "-m", FIXTURE, "--ids", ids, "-n", len(want), "--print-ids", "--ignore-eos")
                self.assertEqual(ids_line(out.stdout), want)

    def test_hf_decode_window_matches_reference_cached_decoding(self):
        case = self.fx["cases"][-1]  # len70: diverges from the full-forward rule at step 1
        ids = ",".join(map(str, case["input_ids"]))
        want = case["cache_check"]["free_running_tokens"]
        out = run("generate", "-m", FIXTURE, "--ids", ids, "-n", len(want), "--print-ids", "--ignore-eos",
                  "--hf-decode-window")
        self.assertEqual(ids_line(out.stdout), want)


class Goldens(unittest.TestCase):
    """Random tiny configs covering every config variant, against tests/reference."""

    def test_every_case_via_cli(self):
        with open(os.path.join(GOLDENS, "index.json")) as f:
            cases = [c["name"] for c in json.load(f)["cases"]]
        self.assertGreaterEqual(len(cases), 8)
        for name in cases:
            d = os.path.join(GOLDENS, name)
            with open(os.path.join(d, "golden.json")) as f:
                g = json.load(f)
            p = max(g["prompts"], key=lambda p: len(p["input_ids"]))  # the one that wraps the ring
            with self.subTest(case=name):
                ids = ",".join(map(str, p["input_ids"]))
                got = json.loads(run("logits", "-m", d, "--ids", ids, "--all-positions",
                                     "--cache-type", "f32").stdout)["logits"]
                self.assertLess(rel_l2(got, p["logits"]), g["tolerance"])
                out = run("generate", "-m", d, "--ids", ids, "-n", len(p["greedy"]), "--print-ids",
                          "--ignore-eos", "--cache-type", "f32", "--chunk", "7")
                self.assertEqual(ids_line(out.stdout), p["greedy"])


class InitAndInfo(unittest.TestCase):
    def setUp(self):
        os.makedirs(WORK, exist_ok=True)

    def test_1p5b_preset_config_is_the_released_config(self):
        out = os.path.join(WORK, "cfg-1.5b")
        run("init", "--preset", "1.5b", "--config-only", "--out", out)
        with open(os.path.join(out, "config.json")) as f:
            ours = json.load(f)
        with open(os.path.join(REAL_1P5B, "config.json")) as f:
            real = json.load(f)
        self.assertEqual(ours, real)

    def test_info_matches_spec_arithmetic(self):
        # Spec section 7: 1.5B at 8192 tokens, bf16 K/V.
        j = json.loads(run("info", "-m", REAL_1P5B, "--ctx", 8192, "--json").stdout)
        self.assertEqual(j["params"], 1522797824)          # spec section 1
        self.assertEqual(j["cache_bytes"]["global_kv"], 47923200)
        self.assertEqual(j["cache_bytes"]["sliding_kv"], 30965760)
        self.assertEqual(j["cache_bytes"]["ssm"], 32 * 3200 * 16 * 4)   # fp32 state
        self.assertEqual(j["cache_bytes"]["conv"], 32 * 3200 * 3 * 4)   # 3 taps, fp32
        self.assertEqual(j["cache_growth_per_token"], 3 * 1920)  # only the 3 global layers grow
        roles = [l["role"] for l in j["layers"]]
        self.assertEqual([i for i, r in enumerate(roles) if r == "global"], [0, 15, 31])
        self.assertEqual(roles.count("producer"), 14)
        self.assertEqual(roles.count("consumer"), 15)
        self.assertEqual(j["layers"][18]["kv_layer"], 16)

    def test_info_human_readable(self):
        out = run("info", "-m", REAL_1P5B).stdout
        self.assertIn("consumer", out)
        self.assertIn("1522797824", out)

    def test_init_checkpoint_matches_reference_implementation(self):
        # The random checkpoint `hymba init` writes must load in the
        # independent reference and give the same logits as the engine.
        import torch
        from hymba_ref import HymbaReference
        from safetensors_io import load_checkpoint
        out = os.path.join(WORK, "tiny-init")
        run("init", "--preset", "tiny", "--dtype", "f32", "--seed", 3, "--out", out)
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        ref = HymbaReference(cfg, load_checkpoint(out))
        ids = [1, 15043, 3186, 29892, 920, 526, 366, 29973] * 12   # 96 tokens: past the 64-token window
        want = ref.logits(ids).tolist()
        got = json.loads(run("logits", "-m", out, "--ids", ",".join(map(str, ids)), "--all-positions").stdout)["logits"]
        self.assertLess(rel_l2(got, want), 1e-4)

    def test_init_bf16_and_f16(self):
        for dt in ("bf16", "f16"):
            out = os.path.join(WORK, "tiny-" + dt)
            run("init", "--preset", "tiny", "--dtype", dt, "--out", out)
            with open(os.path.join(out, "model.safetensors"), "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            self.assertEqual(dtypes, {dt.upper()})
            j = json.loads(run("logits", "-m", out, "--ids", "1,2,3").stdout)
            self.assertTrue(all(math.isfinite(x) for x in j["logits"][0]))


class Tokenize(unittest.TestCase):
    def test_spec_vectors(self):
        self.assertEqual(last_line(run("tokenize", "-m", REAL_1P5B, "-p", "Hello world").stdout), "1,15043,3186")
        chat = ("<extra_id_0>System\nYou are a helpful assistant.\n\n<extra_id_1>User\nHi\n"
                "<extra_id_1>Assistant\n")
        want = [529, 17833, 29918, 333, 29918, 29900, 29958, 3924, 13, 3492, 526, 263, 8444, 20255, 29889, 13, 13,
                29966, 17833, 29918, 333, 29918, 29896, 29958, 2659, 13, 18567, 13, 29966, 17833, 29918, 333, 29918,
                29896, 29958, 7900, 22137, 13]
        self.assertEqual(ids_line(run("tokenize", "-m", REAL_1P5B, "-p", chat, "--no-bos").stdout), want)

    def test_file_input_matches_sentencepiece(self):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(REAL_1P5B, "tokenizer.model"))
        text = "Ünïcödé  spaces\ttabs\nnew lines 😀 中文字符 and a veryveryverylongwordwithoutspaces"
        os.makedirs(WORK, exist_ok=True)
        path = os.path.join(WORK, "text.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self.assertEqual(ids_line(run("tokenize", "-m", REAL_1P5B, "-f", path).stdout), [1] + sp.encode(text))

    def test_tokenizer_only_directory(self):
        d = os.path.join(WORK, "tok-only")
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(REAL_1P5B, "tokenizer.model"), d)
        self.assertEqual(last_line(run("tokenize", "-m", d, "-p", "Hello world").stdout), "1,15043,3186")


class Sampling(unittest.TestCase):
    def model(self):
        return os.path.join(GOLDENS, "gqa_groups3")

    def sample(self, seed, extra=()):
        return ids_line(run("generate", "-m", self.model(), "--ids", "5,6,7", "-n", 24, "--temp", "1.5",
                            "--seed", seed, "--print-ids", "--ignore-eos", *extra).stdout)

    def test_same_seed_same_output(self):
        self.assertEqual(self.sample(11), self.sample(11))
        self.assertEqual(self.sample(11, ("--top-k", 20, "--top-p", 0.9, "--min-p", 0.02, "--repeat-penalty", 1.3)),
                         self.sample(11, ("--top-k", 20, "--top-p", 0.9, "--min-p", 0.02, "--repeat-penalty", 1.3)))

    def test_different_seeds_differ(self):
        self.assertNotEqual(self.sample(1), self.sample(2))

    def test_top_k_1_is_greedy(self):
        greedy = ids_line(run("generate", "-m", self.model(), "--ids", "5,6,7", "-n", 12, "--print-ids",
                              "--ignore-eos").stdout)
        topk1 = ids_line(run("generate", "-m", self.model(), "--ids", "5,6,7", "-n", 12, "--print-ids",
                             "--ignore-eos", "--temp", "0.7", "--top-k", "1", "--seed", "9").stdout)
        self.assertEqual(greedy, topk1)


class BenchAndVersion(unittest.TestCase):
    def test_bench_json(self):
        j = json.loads(run("bench", "-m", FIXTURE, "--prompt-len", 20, "--gen-len", 5, "--json").stdout)
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_bytes"):
            self.assertGreater(j[k], 0)
        self.assertEqual(set(j["cache_bytes"]), {"global_kv", "sliding_kv", "ssm", "conv", "total"})
        cb = j["cache_bytes"]
        self.assertEqual(cb["total"], cb["global_kv"] + cb["sliding_kv"] + cb["ssm"] + cb["conv"])

    def test_version_names_backends(self):
        out = run("--version").stdout
        self.assertIn("hymba", out)
        self.assertIn("cpu", out)

    def test_help_documents_every_option(self):
        out = run("generate", "--help").stdout
        for opt in ("--model", "--prompt", "--ids", "--n-predict", "--temp", "--top-k", "--top-p", "--min-p",
                    "--repeat-penalty", "--seed", "--threads", "--print-ids", "--ctx", "--stop"):
            self.assertIn(opt, out)


class BadInput(unittest.TestCase):
    """Each kind of bad input: non-zero exit, a message naming the problem, no crash."""

    @classmethod
    def setUpClass(cls):
        os.makedirs(WORK, exist_ok=True)

    def expect_error(self, args, *needles):
        p = run(*args, check=False)
        self.assertNotEqual(p.returncode, 0, f"expected failure: {args}")
        self.assertLess(p.returncode, 128, "killed by a signal")
        for n in needles:
            self.assertIn(n, p.stderr)
        self.assertNotIn("terminate called", p.stderr)
        return p

    def copy_fixture(self, name):
        d = os.path.join(WORK, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(FIXTURE, d)
        return d

    def edit_config(self, d, **changes):
        path = os.path.join(d, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(path, "w") as f:
            json.dump(cfg, f)

    def test_missing_model_dir(self):
        self.expect_error(["logits", "-m", os.path.join(WORK, "nope"), "--ids", "1"], "nope", "does not exist")

    def test_config_not_json(self):
        d = self.copy_fixture("bad-json")
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{not json")
        self.expect_error(["logits", "-m", d, "--ids", "1"], "config.json", "not valid JSON")

    def test_unsupported_config_values(self):
        for field, value in (("kq_norm", "rms"), ("num_experts", 4), ("memory_tokens_interspersed_every", 4)):
            with self.subTest(field=field):
                d = self.copy_fixture("bad-" + field)
                self.edit_config(d, **{field: value})
                self.expect_error(["logits", "-m", d, "--ids", "1"], field)

    def test_wrong_shape_in_config(self):
        d = self.copy_fixture("bad-hidden")
        self.edit_config(d, vocab_size=400)
        self.expect_error(["logits", "-m", d, "--ids", "1"], "model.embed_tokens.weight", "shape")

    def test_truncated_weights(self):
        d = self.copy_fixture("truncated")
        path = os.path.join(d, "model.safetensors")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        self.expect_error(["logits", "-m", d, "--ids", "1"], "model.safetensors", "truncated")

    def test_garbage_weights(self):
        d = self.copy_fixture("garbage")
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(b"\xff" * 64)
        self.expect_error(["logits", "-m", d, "--ids", "1"], "model.safetensors")

    def test_missing_weights(self):
        d = self.copy_fixture("noweights")
        os.remove(os.path.join(d, "model.safetensors"))
        self.expect_error(["logits", "-m", d, "--ids", "1"], "model.safetensors")

    def test_token_id_out_of_range(self):
        self.expect_error(["logits", "-m", FIXTURE, "--ids", "1,320"], "320", "out of range")
        self.expect_error(["generate", "-m", FIXTURE, "--ids", "99999"], "99999", "out of range")

    def test_malformed_ids(self):
        self.expect_error(["logits", "-m", FIXTURE, "--ids", "1,x,3"], "'x'")
        self.expect_error(["logits", "-m", FIXTURE, "--ids", "1,,3"], "empty")
        self.expect_error(["logits", "-m", FIXTURE, "--ids", "-4"], "-4")

    def test_prompt_longer_than_context(self):
        self.expect_error(["generate", "-m", FIXTURE, "--ids", ",".join(["5"] * 50), "--ctx", "10"],
                          "50 tokens", "context")

    def test_text_prompt_without_tokenizer(self):
        self.expect_error(["generate", "-m", FIXTURE, "-p", "hello"], "tokenizer.model")

    def test_tokenize_missing_and_corrupt_tokenizer(self):
        self.expect_error(["tokenize", "-m", FIXTURE, "-p", "hi"], "tokenizer.model")
        d = os.path.join(WORK, "bad-tok")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(b"this is not a sentencepiece model")
        self.expect_error(["tokenize", "-m", d, "-p", "hi"], "tokenizer.model")

    def test_bad_sampling_options(self):
        self.expect_error(["generate", "-m", FIXTURE, "--ids", "1", "--temp", "-1"], "temp")
        self.expect_error(["generate", "-m", FIXTURE, "--ids", "1", "--top-p", "0"], "top")

    def test_usage_errors(self):
        self.expect_error(["generate", "--ids", "1"], "--model")
        self.expect_error(["logits", "-m", FIXTURE, "--ids", "1", "--bogus"], "bogus")
        self.expect_error(["init", "--preset", "huge", "--out", os.path.join(WORK, "x")], "huge")
        self.expect_error(["generate", "-m", FIXTURE], "--ids")


if __name__ == "__main__":
    unittest.main()
