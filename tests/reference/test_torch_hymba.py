"""bench/torch_hymba.py (the PyTorch speed baseline) against hymba_ref.py (float64 truth).

Run: /usr/bin/python3 -m unittest -v test_torch_hymba   (from tests/reference)

On tiny random configs (the make_goldens.py key set), in float64:
  * batched prefill logits (every row) == HymbaReference.logits, rel 1e-9;
  * prefill + N decode steps (teacher-forced) == the reference's logits of the
    extended sequence, rel 1e-9 (the prompts are longer than window + meta, and a
    short prompt decodes past several ring-buffer wraps);
  * batch of 3 == each sequence on its own;
  * chunk sizes of the selective scan (1, odd with padding, whole sequence) and
    attention query-block sizes agree.
Plus float32 and bfloat16 smoke runs (looser tolerances).
"""

import os
import random
import sys
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))

from hymba_ref import HymbaDims, HymbaReference, random_state_dict  # noqa: E402
from make_goldens import make_config  # noqa: E402
from torch_hymba import TorchHymba, chunked_selective_scan  # noqa: E402

TOL = 1e-9

CONFIGS = {
    # GQA 4q/2kv, globals first/middle/last, kv groups of 3 and 2, window 8, 4 meta
    "gqa_groups3": (dict(n_layers=8, hidden=64, n_q=4, n_kv=2, vocab=320, intermediate=160,
                         window=8, global_idx=[0, 4, 7], reuse=[[1, 2, 3], [5, 6]], n_mem=4),
                    101),
    # MQA, no meta tokens, no kv reuse, dt_rank auto, plain rope, d_state 16
    "mqa_nometa": (dict(n_layers=5, hidden=48, n_q=4, n_kv=1, vocab=256, intermediate=128,
                        window=6, global_idx=[2], reuse=None, n_mem=0, d_state=16,
                        dt_rank="auto", rope_type=None), 202),
    # MHA, sliding producer at layer 0 with a consumer pair, d_conv 3, expand 1, untied head
    "mha_untied": (dict(n_layers=5, hidden=32, n_q=2, n_kv=2, vocab=200, intermediate=96,
                        window=5, global_idx=[1, 4], reuse=[[2, 3]], n_mem=3, d_state=4,
                        dt_rank=2, d_conv=3, expand=1, rope_type="default", rope_theta=500.0,
                        tie=False), 303),
}


def rel(a, b):
    return float((a - b).norm() / b.norm())


class Case:
    """One config, its weights, and reference logits for a few sequences."""

    _cache = {}

    @classmethod
    def get(cls, name):
        if name not in cls._cache:
            cls._cache[name] = cls(name)
        return cls._cache[name]

    def __init__(self, name):
        ckw, seed = CONFIGS[name]
        self.cfg = make_config(**ckw)
        self.d = HymbaDims(self.cfg)
        self.sd = random_state_dict(self.cfg, seed=seed, dtype=torch.float32)
        self.ref = HymbaReference(self.cfg, self.sd, dtype=torch.float64)
        rng = random.Random(seed)
        span = self.d.window + 1 + self.d.n_mem
        self.T = 2 * span + 3          # prompt longer than window + meta
        self.N = 7                     # teacher-forced decode steps
        self.B = 3
        self.seqs = [[rng.randrange(3, self.d.vocab) for _ in range(self.T + self.N)]
                     for _ in range(self.B)]
        self.ref_logits = [self.ref.logits(s) for s in self.seqs]   # [T+N, vocab] each
        # short prompt, decoding through several ring wraps
        self.T_short, self.N_short = 2, 2 * (self.d.window + 1) + 5
        self.short = [rng.randrange(3, self.d.vocab) for _ in range(self.T_short + self.N_short)]
        self.ref_short = self.ref.logits(self.short)

    def model(self, dtype=torch.float64, **kw):
        return TorchHymba(self.cfg, self.sd, device="cpu", dtype=dtype, **kw)


def run_seqs(model, seqs, T, N):
    """Batched prefill (all rows) + N teacher-forced decode steps -> [B, T+N, vocab]."""
    ids = torch.tensor([s[:T] for s in seqs])
    cache = model.new_cache(batch=len(seqs), capacity=T + N)
    pre = model.prefill(ids, cache, all_logits=True)                # [B, T, vocab]
    outs = [pre]
    for j in range(N):
        # prefill consumed tokens 0..T-1; step j feeds token T+j and yields row T+j
        tok = torch.tensor([s[T + j] for s in seqs])
        outs.append(model.decode(tok, cache)[:, None])
    return torch.cat(outs, dim=1)


class TestTorchHymba(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)

    def check_case(self, name, **model_kw):
        c = Case.get(name)
        m = c.model(**model_kw)
        got = run_seqs(m, c.seqs, c.T, c.N)        # rows 0..T+N-1
        for b in range(c.B):
            ref = c.ref_logits[b]
            r_pre = rel(got[b, :c.T], ref[:c.T])
            r_dec = rel(got[b, c.T:], ref[c.T:])
            self.assertLess(r_pre, TOL, f"{name} b={b} prefill rel {r_pre:.3e}")
            self.assertLess(r_dec, TOL, f"{name} b={b} decode rel {r_dec:.3e}")
        # one at a time == batched
        for b in range(c.B):
            one = run_seqs(m, [c.seqs[b]], c.T, c.N)[0]
            r = rel(one, got[b])
            self.assertLess(r, 1e-12, f"{name} b={b} single vs batched rel {r:.3e}")
        # short prompt, many decode steps (ring buffer fills, then wraps)
        s = run_seqs(m, [c.short], c.T_short, c.N_short)[0]
        r = rel(s, c.ref_short)
        self.assertLess(r, TOL, f"{name} short prompt + long decode rel {r:.3e}")
        return got

    def test_gqa_groups3(self):
        self.check_case("gqa_groups3", scan_chunk=5, attn_block=7)

    def test_mqa_nometa(self):
        self.check_case("mqa_nometa", scan_chunk=4, attn_block=3)

    def test_mha_untied(self):
        self.check_case("mha_untied", scan_chunk=64, attn_block=512)

    def test_chunk_and_block_sizes_agree(self):
        c = Case.get("gqa_groups3")
        ids = torch.tensor([s[:c.T] for s in c.seqs])
        base = c.model(scan_chunk=c.T + 50, attn_block=1000).prefill(ids, all_logits=True)
        for chunk, block in [(1, 1), (3, 5), (16, 64)]:
            got = c.model(scan_chunk=chunk, attn_block=block).prefill(ids, all_logits=True)
            self.assertLess(rel(got, base), 1e-12, f"chunk {chunk} block {block}")

    def test_scan_matches_sequential(self):
        g = torch.Generator().manual_seed(5)
        Bsz, L, D, N = 2, 37, 6, 4
        delta = torch.rand(Bsz, L, D, generator=g, dtype=torch.float64) * 3   # large steps too
        u = torch.randn(Bsz, L, D, generator=g, dtype=torch.float64)
        Bm = torch.randn(Bsz, L, N, generator=g, dtype=torch.float64)
        Cm = torch.randn(Bsz, L, N, generator=g, dtype=torch.float64)
        A = -torch.rand(D, N, generator=g, dtype=torch.float64) * 40 - 0.5     # up to 120 per step
        h_init = torch.randn(Bsz, D, N, generator=g, dtype=torch.float64)
        for h0 in (None, h_init):
            h = h_init.clone() if h0 is not None else torch.zeros(Bsz, D, N, dtype=torch.float64)
            ys = []
            for t in range(L):
                h = (torch.exp(delta[:, t, :, None] * A) * h
                     + (delta * u)[:, t, :, None] * Bm[:, t, None, :])
                ys.append((h * Cm[:, t, None, :]).sum(-1))
            y_ref = torch.stack(ys, 1)
            # chunk sizes 1 / dividing / not dividing / whole / larger than L; the small
            # block limit splits the sequence into several segments (state carried over)
            for chunk in (1, 4, 10, 37, 64):
                for block in (1 << 28, Bsz * D * N * 8):
                    y, hl = chunked_selective_scan(delta, delta * u, Bm, Cm, A, chunk, h0=h0,
                                                   max_block_elems=block)
                    what = f"chunk {chunk} block {block} h0 {h0 is not None}"
                    self.assertLess(rel(y, y_ref), 1e-12, what)
                    self.assertLess(rel(hl, h), 1e-12, what + " final state")
                    self.assertTrue(torch.isfinite(y).all())

    def test_float32_and_bfloat16(self):
        c = Case.get("gqa_groups3")
        ref = torch.stack(c.ref_logits)
        got32 = run_seqs(c.model(dtype=torch.float32, scan_chunk=8), c.seqs, c.T, c.N)
        self.assertEqual(got32.dtype, torch.float32)
        self.assertLess(rel(got32.double(), ref), 1e-4)
        gotbf = run_seqs(c.model(dtype=torch.bfloat16, scan_chunk=8), c.seqs, c.T, c.N)
        self.assertEqual(gotbf.dtype, torch.bfloat16)
        self.assertLess(rel(gotbf.double(), ref), 6e-2)


if __name__ == "__main__":
    unittest.main()
