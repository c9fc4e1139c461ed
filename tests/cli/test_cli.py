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
        self.check_step_spread(j)

    def check_step_spread(self, j):
        # The per-step times are ordered, and their mean (decode_step_ms, from
        # the whole timed stretch) lies between the fastest and slowest step
        # (1 % of slack: the stretch also holds the timer's own instructions).
        q = [j["decode_step_ms_" + k] for k in ("min", "median", "p90", "max")]
        self.assertGreater(q[0], 0)
        self.assertEqual(q, sorted(q))
        self.assertGreaterEqual(j["decode_step_ms"], q[0] * 0.99)
        self.assertLessEqual(j["decode_step_ms"], q[3] * 1.01)

    def test_bench_batch_json(self):
        for fill in ("prefill", "replicate"):
            j = json.loads(run("bench", "-m", FIXTURE, "--prompt-len", 9, "--gen-len", 3, "--batch", 3,
                               "--batch-fill", fill, "--json", "--device", "cpu").stdout)
            self.assertEqual(j["batch"], 3)
            self.assertEqual(j["device"], "cpu")
            self.assertGreater(j["decode_tok_s"], 0)
            # Three sequences' caches, allocated exactly as the layout formula says.
            self.assertEqual(j["cache_bytes"]["total"], j["cache_bytes_formula"])
            self.assertEqual(j["timed_decode_steps"], 2)  # the batch's first step is its warm-up
            self.check_step_spread(j)
        one = json.loads(run("bench", "-m", FIXTURE, "--prompt-len", 9, "--gen-len", 3, "--json").stdout)
        self.assertEqual(j["cache_bytes"]["total"], 3 * one["cache_bytes"]["total"])

    def test_unavailable_device_is_clear_error(self):
        if shutil.which("nvidia-smi") and run("--version").stdout.find("cuda") >= 0:
            self.skipTest("this machine may have a CUDA GPU")
        r = run("logits", "-m", FIXTURE, "--ids", "1,2", "--device", "cuda", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("--device cuda", r.stderr)
        r = run("logits", "-m", FIXTURE, "--ids", "1,2", "--device", "tpu", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--device", r.stderr)

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



# ---------------------------------------------------------------- chat
CHAT_GOLDENS = os.path.join(os.path.dirname(WORK), "chat_goldens.json")
SPEC_CHAT_IDS = [529, 17833, 29918, 333, 29918, 29900, 29958, 3924, 13, 3492, 526, 263, 8444, 20255, 29889, 13, 13,
                 29966, 17833, 29918, 333, 29918, 29896, 29958, 2659, 13, 18567, 13, 29966, 17833, 29918, 333, 29918,
                 29896, 29958, 7900, 22137, 13]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def run_bytes(*args, input_bytes=None):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, input=input_bytes, timeout=600)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return path


def id_lines(stdout):
    return [[int(x) for x in l.split(",")] for l in stdout.split("\n") if l and all(p.isdigit() for p in l.split(","))]


class Chat(unittest.TestCase):
    """Chat format (goldens: Jinja2 via the ctest fixture chat_goldens; the spec's
    test vector), `hymba template`, `generate --chat` and `hymba chat`."""

    @classmethod
    def setUpClass(cls):
        cls.dir = os.path.join(WORK, "chat")
        os.makedirs(cls.dir, exist_ok=True)
        with open(CHAT_GOLDENS, encoding="utf-8") as f:
            cls.goldens = json.load(f)
        # A tiny random model with the real tokenizer beside it.
        cls.tiny = os.path.join(cls.dir, "tiny")
        shutil.rmtree(cls.tiny, ignore_errors=True)
        run("init", "--preset", "tiny", "--dtype", "f32", "--seed", 3, "--out", cls.tiny)
        for f in TOKENIZER_FILES:
            shutil.copy(os.path.join(REAL_1P5B, f), cls.tiny)

    def expect_error(self, args, *needles, input_bytes=None):
        p = run_bytes(*args, input_bytes=input_bytes)
        err = p.stderr.decode("utf-8", "replace")
        self.assertEqual(p.returncode, 1, f"expected a clean failure: {args}\n{err}")
        for n in needles:
            self.assertIn(n, err)
        self.assertNotIn("terminate called", err)
        return err

    def test_template_matches_jinja2_for_every_conversation(self):
        n_ok = n_err = 0
        for case in self.goldens["cases"]:
            with self.subTest(case=case["name"]):
                path = write_json(os.path.join(self.dir, case["name"] + ".json"), case["conversation"])
                if case["error"]:
                    self.expect_error(["template", "-m", REAL_1P5B, "-f", path], "error:")
                    n_err += 1
                    continue
                p = run_bytes("template", "-m", REAL_1P5B, "-f", path)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(p.stdout.decode("utf-8"), case["rendered"])  # exact: no newline added
                ids = run("template", "-m", REAL_1P5B, "-f", path, "--ids").stdout
                self.assertEqual(ids_line(ids), case["ids"])
                n_ok += 1
        self.assertGreaterEqual(n_ok, 20)
        self.assertGreaterEqual(n_err, 4)

    def test_spec_vector_and_stdin(self):
        conv = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "Hi"}], "add_generation_prompt": True}
        p = run_bytes("template", "-m", REAL_1P5B, "-f", "-", "--ids", input_bytes=json.dumps(conv).encode())
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(ids_line(p.stdout.decode()), SPEC_CHAT_IDS)  # no BOS on the chat path

    def test_template_from_tokenizer_only_directory(self):
        d = os.path.join(self.dir, "config-only")
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(REAL_1P5B, "tokenizer_config.json"), d)
        conv = write_json(os.path.join(self.dir, "hi.json"),
                          {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True})
        self.assertEqual(run("template", "-m", d, "-f", conv).stdout,
                         "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n")
        self.expect_error(["template", "-m", d, "-f", conv, "--ids"], "tokenizer.model")

    def test_template_bad_input(self):
        bad = os.path.join(self.dir, "bad.json")
        with open(bad, "w") as f:
            f.write('{"messages": [')
        self.expect_error(["template", "-m", REAL_1P5B, "-f", bad], "not valid JSON")
        nomsg = write_json(os.path.join(self.dir, "nomsg.json"), {"add_generation_prompt": True})
        self.expect_error(["template", "-m", REAL_1P5B, "-f", nomsg], "no \"messages\"")
        notlist = write_json(os.path.join(self.dir, "notlist.json"), {"messages": "hi"})
        self.expect_error(["template", "-m", REAL_1P5B, "-f", notlist], "must be an array")
        nocontent = write_json(os.path.join(self.dir, "nocontent.json"), {"messages": [{"role": "user"}]})
        self.expect_error(["template", "-m", REAL_1P5B, "-f", nocontent], "content")
        self.expect_error(["template", "-m", REAL_1P5B, "-f", os.path.join(self.dir, "missing.json")], "missing.json")
        # An unknown role is skipped by Hymba's template (as Jinja2 does): rendered, with a warning.
        odd = write_json(os.path.join(self.dir, "odd.json"),
                         {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "u"}]})
        p = run("template", "-m", REAL_1P5B, "-f", odd)
        self.assertEqual(p.stdout, "<extra_id_0>System\n\n<extra_id_1>User\nu\n")
        self.assertIn("developer", p.stderr)

    def non_hymba_dir(self):
        d = os.path.join(self.dir, "chatml")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.tiny, d)
        with open(os.path.join(d, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        cfg["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        write_json(os.path.join(d, "tokenizer_config.json"), cfg)
        return d

    def test_non_hymba_template_is_refused_unless_forced(self):
        d = self.non_hymba_dir()
        conv = write_json(os.path.join(self.dir, "hi2.json"), {"messages": [{"role": "user", "content": "Hi"}]})
        for args in (["template", "-m", d, "-f", conv], ["generate", "-m", d, "--chat", "-p", "Hi"],
                     ["chat", "-m", d]):
            self.expect_error(args, "not Hymba", "--chat-format hymba", input_bytes=b"")
        self.assertEqual(run("template", "-m", d, "-f", conv, "--chat-format", "hymba").stdout,
                         "<extra_id_0>System\n\n<extra_id_1>User\nHi\n")
        run("generate", "-m", d, "--chat", "-p", "Hi", "-n", 2, "--chat-format", "hymba")

    def test_generate_chat_is_the_template_without_bos(self):
        conv = write_json(os.path.join(self.dir, "one.json"),
                          {"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello there"}], "add_generation_prompt": True})
        ids = last_line(run("template", "-m", self.tiny, "-f", conv, "--ids").stdout)
        want = ids_line(run("generate", "-m", self.tiny, "--ids", ids, "-n", 10, "--temp", 1, "--seed", 4,
                            "--print-ids").stdout)
        got = ids_line(run("generate", "-m", self.tiny, "--chat", "--system", "Be brief.", "-p", "Hello there",
                           "-n", 10, "--temp", 1, "--seed", 4, "--print-ids").stdout)
        self.assertEqual(got, want)
        self.expect_error(["generate", "-m", self.tiny, "--chat", "--ids", "1,2"], "--chat")
        self.expect_error(["generate", "-m", self.tiny, "--system", "x", "-p", "Hi"], "--system needs --chat")

    def test_chat_multi_turn_equals_recomputing_the_conversation(self):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(REAL_1P5B, "tokenizer.model"))
        common = ["-n", 12, "--temp", 1, "--top-k", 50]
        p = run("chat", "-m", self.tiny, "--system", "Be nice.", *common, "--seed", 20, "--print-ids", "--stats",
                input_text="First question\nSecond question\n")
        answers = id_lines(p.stdout)
        self.assertEqual(len(answers), 2, p.stdout)
        self.assertIn("[turn 2:", p.stderr)
        stats2 = [l for l in p.stderr.split("\n") if l.startswith("[turn 2:")][0]
        self.assertNotIn("reused 0,", stats2)  # the second turn reuses the first turn's cache
        # The same conversation from scratch: the first answer as text, a fresh cache, turn 2's seed.
        first = answers[0][:-1] if answers[0][-1] == 2 else answers[0]
        conv = write_json(os.path.join(self.dir, "two.json"), {"messages": [
            {"role": "system", "content": "Be nice."}, {"role": "user", "content": "First question"},
            {"role": "assistant", "content": sp.decode(first)}, {"role": "user", "content": "Second question"}],
            "add_generation_prompt": True})
        ids = last_line(run("template", "-m", self.tiny, "-f", conv, "--ids").stdout)
        want = ids_line(run("generate", "-m", self.tiny, "--ids", ids, *common, "--seed", 21, "--stop", "</s>",
                            "--print-ids").stdout)
        self.assertEqual(answers[1], want)

    def test_chat_commands_and_ctrl_c(self):
        import select
        import signal
        import time
        proc = subprocess.Popen([BIN, "chat", "-m", self.tiny, "-n", "100000", "--ignore-eos", "--stats"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.stdin.write(b"Talk for a long time\n")
            proc.stdin.flush()
            got = b""
            deadline = time.time() + 120
            while len(got) < 4 and time.time() < deadline:  # the answer is streaming
                r, _, _ = select.select([proc.stdout], [], [], 1.0)
                if r:
                    got += os.read(proc.stdout.fileno(), 4096)
            self.assertGreaterEqual(len(got), 4, "no streamed output")
            proc.send_signal(signal.SIGINT)  # stops the answer, not the session
            out, err = proc.communicate(b"/reset\n/exit\n", timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = err.decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn("[answer stopped]", err)
        self.assertIn("stop: cancelled", err)
        self.assertIn("[conversation cleared]", err)

    def test_chat_context_full_is_reported_and_session_continues(self):
        p = run("chat", "-m", self.tiny, "--ctx", 40, "-n", 4, "--stats",
                input_text="a " * 60 + "\nshort\n")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("no longer fits", p.stderr)
        self.assertIn("[turn 1:", p.stderr)  # the next message was answered

    def test_help_documents_chat_options(self):
        out = run("chat", "--help").stdout
        for opt in ("--model", "--system", "--chat-format", "--n-predict", "--temp", "--top-k", "--top-p", "--min-p",
                    "--repeat-penalty", "--seed", "--ctx", "--stop", "--ignore-eos", "--print-ids", "--stats",
                    "--threads"):
            self.assertIn(opt, out)
        out = run("generate", "--help").stdout
        for opt in ("--chat", "--system", "--chat-format"):
            self.assertIn(opt, out)
        out = run("template", "--help").stdout
        for opt in ("--model", "--file", "--chat-format", "--ids"):
            self.assertIn(opt, out)
        out = run("--help").stdout
        for cmd in ("chat", "template"):
            self.assertIn(cmd, out)


if __name__ == "__main__":
    unittest.main()
