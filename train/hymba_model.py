"""Batched, trainable twin of tests/reference/hymba_ref.py.

The project's reference (HymbaReference) runs one sequence at a time from a
weight dict, with a per-timestep Python loop for the selective scan: right for
checking, far too slow to train. This module computes the same function

  * over a batch [B, T] of token ids,
  * with the weights as nn.Parameters under their exact HF names (so the state
    dict is the checkpoint),
  * with a choice of selective-scan implementation: "sequential" (the
    reference's loop, batched) or "chunked" (within chunks of `chunk` steps a
    Hillis-Steele prefix scan, across chunks a short loop over the carried
    state; the same recurrence, summed in another order).

It reuses the reference's helpers (HymbaDims, rope_inv_freq, rms_norm,
apply_rope, softplus_thresholded), and check_against_reference() runs both on
the same random weights: the logits agree to ~1e-12 in float64 (train/selftest.py
and tests/cli/test_embedded_model.py run it).

Engine emulation (used for the held-out evaluation, so that the number the
training script records is the number `hymba perplexity` prints for the bf16
checkpoint): `emulate_bf16=True` rounds every linear layer's input to bf16 and
the post-RoPE K and V to bf16, exactly where hymba.cpp does for bf16 weights.
"""

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from hymba_ref import (HymbaDims, apply_rope, param_shapes, rms_norm, rope_inv_freq,  # noqa: E402
                       softplus_thresholded)


def round_bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


# ---------------------------------------------------------------------------
# Selective scan: h_t = a_t * h_{t-1} + b_t (h_{-1} = 0), y_t = <h_t, C_t>
# a, b: [B, L, D, N]; C: [B, L, N] -> y [B, L, D]
# ---------------------------------------------------------------------------

def scan_sequential(a, b, C):
    h = torch.zeros_like(b[:, 0])
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, dim=1)


def scan_chunked(a, b, C, chunk=16):
    Bsz, L, D, N = a.shape
    pad = (-L) % chunk
    if pad:
        a = torch.cat([a, a.new_ones(Bsz, pad, D, N)], dim=1)
        b = torch.cat([b, b.new_zeros(Bsz, pad, D, N)], dim=1)
        C = torch.cat([C, C.new_zeros(Bsz, pad, N)], dim=1)
    nc = (L + pad) // chunk
    a = a.reshape(Bsz, nc, chunk, D, N)
    b = b.reshape(Bsz, nc, chunk, D, N)
    # Hillis-Steele inclusive scan inside each chunk: after the pass with
    # offset k, (a[t], b[t]) composes steps t-2k+1..t; at the end a[t] is the
    # product of a over the chunk up to t and b[t] the state from a zero start.
    off = 1
    while off < chunk:
        b = torch.cat([b[:, :, :off], a[:, :, off:] * b[:, :, :-off] + b[:, :, off:]], dim=2)
        a = torch.cat([a[:, :, :off], a[:, :, off:] * a[:, :, :-off]], dim=2)
        off *= 2
    # Carry the state across chunks (nc short steps on [B, D, N]).
    carry = [torch.zeros_like(b[:, 0, 0])]
    for c in range(nc - 1):
        carry.append(a[:, c, -1] * carry[-1] + b[:, c, -1])
    h0 = torch.stack(carry, dim=1)                                   # [B, nc, D, N]
    h = b + a * h0[:, :, None]
    y = (h * C.reshape(Bsz, nc, chunk, 1, N)).sum(-1)
    return y.reshape(Bsz, nc * chunk, D)[:, :L]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def init_state_dict(cfg, seed):
    """Training initialisation (GPT/Mamba-style), float32."""
    d = HymbaDims(cfg)
    g = torch.Generator().manual_seed(seed)
    out_scale = 1.0 / math.sqrt(2 * d.n_layers)
    sd = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("layernorm.weight") or name.endswith("mamba.D.0"):
            t = torch.ones(shape)
        elif name.endswith("A_log.0"):
            t = torch.log(torch.arange(1, d.d_state + 1, dtype=torch.float32)).expand(shape).clone()
        elif name.endswith("dt_proj.0.bias"):
            u = torch.rand(shape, generator=g)
            dt = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3))).clamp(min=1e-4)
            t = dt + torch.log(-torch.expm1(-dt))          # inverse softplus
        elif name.endswith("dt_proj.0.weight"):
            r = d.dt_rank ** -0.5
            t = (torch.rand(shape, generator=g) * 2 - 1) * r
        elif name.endswith("conv1d.weight"):
            r = 1 / math.sqrt(d.d_conv)
            t = (torch.rand(shape, generator=g) * 2 - 1) * r
        elif name.endswith("conv1d.bias"):
            r = 1 / math.sqrt(d.d_conv)
            t = (torch.rand(shape, generator=g) * 2 - 1) * r
        else:
            std = 0.02
            if name.endswith("out_proj.weight") or name.endswith("down_proj.weight"):
                std *= out_scale
            t = torch.randn(shape, generator=g) * std
        sd[name] = t.float().contiguous()
    return sd


class HymbaLM(nn.Module):
    def __init__(self, cfg, state_dict):
        super().__init__()
        self.cfg = cfg
        self.d = HymbaDims(cfg)
        self.names = list(param_shapes(cfg).keys())
        for n in self.names:
            t = state_dict[n]
            assert tuple(t.shape) == tuple(param_shapes(cfg)[n]), n
            self.register_parameter(n.replace(".", "__"), nn.Parameter(t.detach().clone()))
        inv = rope_inv_freq(cfg, self.d.d_k, torch.float64)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.scan = "chunked"
        self.chunk = 8
        self.scan_fn = None  # optional replacement of scan_chunked (e.g. torch.compile'd)
        self.emulate_bf16 = False
        self.use_sdpa = hasattr(F, "scaled_dot_product_attention")

    def p(self, name):
        return getattr(self, name.replace(".", "__"))

    def hf_state_dict(self):
        return {n: self.p(n).detach() for n in self.names}

    def _linear(self, x, w):
        if self.emulate_bf16:
            x = round_bf16(x)
        out = x @ w.t().to(x.dtype)
        return out.to(x.dtype)  # under autocast the product is bf16; keep the stream fp32

    def _mask(self, L, is_global, device):
        q = torch.arange(L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        allowed = k <= q
        if not is_global:
            allowed &= ((q - k) <= self.d.window) | (k < self.d.n_mem)
        return allowed

    def _attention(self, q, k, v, is_global):
        """q [B,L,Hq,dk], k [B,L,Hkv,dk], v [B,L,Hkv,dv] -> [B, L, Hq*dv]."""
        d = self.d
        Bsz, L = q.shape[:2]
        rep = d.n_q // d.n_kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        mask = self._mask(L, is_global, q.device)
        if self.use_sdpa and not self.emulate_bf16 and q.dtype != torch.float64:
            dt = torch.bfloat16 if q.is_cuda else q.dtype
            out = F.scaled_dot_product_attention(q.transpose(1, 2).to(dt), k.transpose(1, 2).to(dt),
                                                 v.transpose(1, 2).to(dt), attn_mask=mask)
            out = out.transpose(1, 2).to(q.dtype)
        else:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d.d_k)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(Bsz, L, d.n_q * d.d_v)

    def _mamba(self, pre, x, z):
        d = self.d
        Bsz, L, _ = x.shape
        w = self.p(pre + "conv1d.weight")                       # [D, 1, K]
        conv = F.conv1d(F.pad(x.transpose(1, 2), (d.d_conv - 1, 0)), w.to(x.dtype),
                        self.p(pre + "conv1d.bias").to(x.dtype), groups=d.d_inner)
        u = F.silu(conv.transpose(1, 2))                        # [B, L, D]
        r = self._linear(u, self.p(pre + "x_proj.0.weight"))
        dt_raw, Bm, Cm = torch.split(r, [d.dt_rank, d.d_state, d.d_state], dim=-1)
        dt_n = rms_norm(dt_raw, self.p(pre + "dt_layernorm.weight"), d.eps)
        Bm = rms_norm(Bm, self.p(pre + "B_layernorm.weight"), d.eps)
        Cm = rms_norm(Cm, self.p(pre + "C_layernorm.weight"), d.eps)
        delta = softplus_thresholded(self._linear(dt_n, self.p(pre + "dt_proj.0.weight"))
                                     + self.p(pre + "dt_proj.0.bias"))
        A = -torch.exp(self.p(pre + "A_log.0").to(x.dtype))
        a = torch.exp(delta[..., None] * A)                     # [B, L, D, N]
        b = (delta * u)[..., None] * Bm[:, :, None, :]
        if self.scan == "sequential":
            y = scan_sequential(a, b, Cm)
        elif self.scan_fn is not None:
            y = self.scan_fn(a, b, Cm, self.chunk)
        else:
            y = scan_chunked(a, b, Cm, self.chunk)
        y = y + self.p(pre + "D.0") * u
        return y * F.silu(z)

    def _layer(self, i, h, cos, sin, kv_store):
        d = self.d
        pre = f"model.layers.{i}."
        Bsz, L, _ = h.shape
        u = self._linear(rms_norm(h, self.p(pre + "input_layernorm.weight"), d.eps),
                         self.p(pre + "mamba.in_proj.weight"))
        if d.owns_kv(i):
            sizes = [d.attn_hidden, d.n_kv * d.d_k, d.n_kv * d.d_v, d.d_inner, d.d_inner]
            q, k, v, x, z = torch.split(u, sizes, dim=-1)
            k = apply_rope(k.reshape(Bsz * L, d.n_kv, d.d_k), cos, sin).reshape(Bsz, L, d.n_kv, d.d_k)
            v = v.reshape(Bsz, L, d.n_kv, d.d_v)
            if self.emulate_bf16:
                k, v = round_bf16(k), round_bf16(v)
            kv_store[i] = (k, v)
        else:
            q, x, z = torch.split(u, [d.attn_hidden, d.d_inner, d.d_inner], dim=-1)
            k, v = kv_store[d.kv_source[i]]
        q = apply_rope(q.reshape(Bsz * L, d.n_q, d.d_k), cos, sin).reshape(Bsz, L, d.n_q, d.d_k)
        attn = self._attention(q, k, v, d.is_global[i])
        ssm = self._mamba(pre + "mamba.", x, z)
        m = (rms_norm(attn, self.p(pre + "mamba.pre_avg_layernorm1.weight"), d.eps)
             + rms_norm(ssm, self.p(pre + "mamba.pre_avg_layernorm2.weight"), d.eps)) / 2
        h = h + self._linear(m, self.p(pre + "mamba.out_proj.weight"))
        a = rms_norm(h, self.p(pre + "pre_moe_layernorm.weight"), d.eps)
        e = pre + "moe.experts.0."
        gated = F.silu(self._linear(a, self.p(e + "gate_proj.weight"))) * self._linear(a, self.p(e + "up_proj.weight"))
        return h + self._linear(gated, self.p(e + "down_proj.weight"))

    def hidden(self, ids, dtype=torch.float32):
        """Final-normed hidden states [B, T, hidden] of real tokens (meta rows dropped)."""
        d = self.d
        Bsz, T = ids.shape
        h = self.p("model.embed_tokens.weight")[ids].to(dtype)
        if d.n_mem:
            h = torch.cat([self.p("model.memory_tokens").to(dtype).expand(Bsz, -1, -1), h], dim=1)
        L = h.shape[1]
        pos = torch.arange(L, device=ids.device, dtype=torch.float64)
        angles = pos[:, None] * self.inv_freq.to(ids.device)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos = torch.cos(angles).to(dtype).repeat(Bsz, 1)
        sin = torch.sin(angles).to(dtype).repeat(Bsz, 1)
        kv_store = {}
        for i in range(d.n_layers):
            h = self._layer(i, h, cos, sin, kv_store)
        h = h[:, d.n_mem:]
        return rms_norm(h, self.p("model.final_layernorm.weight"), d.eps)

    def head(self):
        if self.cfg.get("tie_word_embeddings", True):
            return self.p("model.embed_tokens.weight")
        return self.p("lm_head.weight")

    def forward(self, ids, dtype=torch.float32):
        """Logits [B, T, vocab]."""
        return self._linear(self.hidden(ids, dtype), self.head())


def check_against_reference(cfg, seed=0, T=40, batch=2, atol=1e-9):
    """Max |logit difference| between HymbaLM (both scans) and HymbaReference, float64."""
    from hymba_ref import HymbaReference, random_state_dict
    sd = random_state_dict(cfg, seed, torch.float64)
    ref = HymbaReference(cfg, sd, dtype=torch.float64)
    model = HymbaLM(cfg, sd).double()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, cfg["vocab_size"], (batch, T), generator=g)
    worst = 0.0
    for scan in ("sequential", "chunked"):
        model.scan = scan
        for chunk in ((16, 5) if scan == "chunked" else (None,)):
            if chunk:
                model.chunk = chunk
            with torch.no_grad():
                got = model(ids, dtype=torch.float64)
            for b in range(batch):
                want = ref.logits(ids[b].tolist())
                worst = max(worst, float((got[b] - want).abs().max()))
    # bf16 emulation vs the reference's matmul_input_bf16 (K/V rounding aside)
    return worst
