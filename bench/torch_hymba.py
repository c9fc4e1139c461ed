"""Fast PyTorch implementation of Hymba, the speed baseline for the CUDA engine.

tests/reference/hymba_ref.py is the exact float64 reference (full forward, no cache,
sequential scan); this module computes the same model the way a careful PyTorch user
would run it fast, and tests/reference/test_torch_hymba.py checks it against
hymba_ref in float64.

  model = TorchHymba(config, state_dict, device="cuda", dtype=torch.bfloat16)
  cache = model.new_cache(batch=B, capacity=prompt_len + n_new)
  last_logits = model.prefill(ids_BxT, cache)      # [B, vocab] (all rows: all_logits=True)
  logits = model.decode(tokens_B, cache)           # [B, vocab], updates the cache
  step = model.decode_graph(cache, batch=B)        # optional CUDA graph of decode()

Numerics: weights in the model dtype (bf16 on GPU); GEMMs in the model dtype with
fp32 accumulation; RMSNorm statistics, RoPE, softmax, conv, softplus/exp and the
selective-scan state in fp32 ("compute dtype"; float64 when the model dtype is float64,
so the test can compare at 1e-9). The residual stream and activations between ops are
in the model dtype, as in the HF model.

Attention (prefill):
  * global layers: causal SDPA (torch >= 2.0) over GQA-expanded K/V;
  * sliding-window layers (mask k <= q and (q - k <= window or k < n_meta)): queries in
    blocks (default 512); each block runs SDPA over the meta keys plus the keys
    [q_start - window, q_end) with an additive mask, so the cost is O(L * window),
    not O(L^2). With attn_impl="flex" (torch >= 2.5) both kinds go through a compiled
    flex_attention with block masks instead.
  * without SDPA (torch 1.x, this repo's CPU test): the same blocks, explicit softmax.
Attention (decode, one token per sequence): the query's GQA group is folded into the
query-length axis ([B, Hkv, rep, dk]) so K/V are read once, never expanded; SDPA with an
additive validity mask, or the explicit path.

Cache (batch B, all sequences at the same position, as in the benchmark):
  * global owners: K/V buffers of `capacity` positions (meta included), rounded up to 16;
  * sliding-window owners: n_meta fixed slots plus a ring of window + 1 slots (position
    p >= n_meta lives in slot n_meta + (p - n_meta) % (window + 1)); the decode window
    is exactly the prefill mask (q - k <= window, meta always visible). Keys are stored
    post-RoPE, so slot order does not matter and the valid slots are simply j <= pos;
  * consumers of a kv_reuse_group read their producer's buffers;
  * conv state [B, d_inner, d_conv - 1] (last pre-conv inputs, model dtype), SSM state
    [B, d_inner, d_state] in the compute dtype (fp32 on GPU).
  Every cache tensor is a registered buffer updated in place and the position is a
  device tensor, so decode() can be captured in a CUDA graph or torch.compile'd.

Mamba branch (prefill): causal depthwise conv via F.conv1d(padding=d_conv-1); the
selective scan is chunked (default 64 steps): decays exp(delta*A) and inputs
delta*u*B are built for every step at once, all chunks then advance together through
their T steps from a zero state (T in-place steps over [B, n_chunks, d_inner, d_state]),
the chunk-boundary states are carried across chunks (n_chunks small steps), and the
carried state's contribution exp(A * cumsum(delta)) * h_chunk_start is added to every
step in one vectorised pass before y = h . C. Every exponent is <= 0, so this is
stable for any delta and A (the "exp(-cumsum)" factorisation overflows fp32 for large
delta*A). Long sequences are cut into segments of whole chunks (<= 2^28 state elements
per temporary) with the state carried between them. Decode: one recurrence step with
the fp32 state.
"""

import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from hymba_ref import HymbaDims, rope_inv_freq  # noqa: E402

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def _round_up(n, m):
    return (n + m - 1) // m * m


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# ---------------------------------------------------------------------------
# Chunked selective scan
# ---------------------------------------------------------------------------

def chunked_selective_scan(delta, du, Bm, Cm, A, chunk=64, h0=None, max_block_elems=1 << 28):
    """h_t = exp(delta_t A) h_{t-1} + du_t B_t ; y_t = h_t . C_t  (no D term, no gate).

    delta, du: [Bsz, L, D]; Bm, Cm: [Bsz, L, N]; A: [D, N]; all in the state dtype.
    Returns y [Bsz, L, D] and the final state [Bsz, D, N]. The sequence is processed in
    segments of whole chunks (at most max_block_elems state elements per temporary),
    the state carried from one segment to the next.
    """
    Bsz, L, D = delta.shape
    N = A.shape[1]
    T = max(1, min(chunk, L))
    seg = max(T, (max_block_elems // max(1, Bsz * D * N)) // T * T)   # steps per segment
    h = h0 if h0 is not None else delta.new_zeros(Bsz, D, N)
    if L <= seg:
        return _scan_segment(delta, du, Bm, Cm, A, T, h, h0 is not None)
    ys = []
    for s0 in range(0, L, seg):
        s1 = min(L, s0 + seg)
        y, h = _scan_segment(delta[:, s0:s1], du[:, s0:s1], Bm[:, s0:s1], Cm[:, s0:s1], A, T, h,
                             h0 is not None or s0 > 0)
        ys.append(y)
    return torch.cat(ys, dim=1), h


def _scan_segment(delta, du, Bm, Cm, A, T, h0, has_h0):
    Bsz, L, D = delta.shape
    N = A.shape[1]
    C = (L + T - 1) // T
    pad = C * T - L
    if pad:  # delta = 0, du = 0: decay 1 and no input, the state passes unchanged
        delta = F.pad(delta, (0, 0, 0, pad))
        du = F.pad(du, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, pad))
    delta = delta.reshape(Bsz, C, T, D)
    Bm = Bm.reshape(Bsz, C, T, N)
    Cm = Cm.reshape(Bsz, C, T, N)
    # 1. Every chunk from a zero state, all chunks at once: T in-place steps over
    #    [Bsz, C, D, N]; hs[:, :, t] becomes the chunk-local state after step t.
    decay = torch.exp(delta[..., None] * A)                              # [Bsz,C,T,D,N]
    hs = du.reshape(Bsz, C, T, D)[..., None] * Bm[:, :, :, None, :]      # drive, then states
    for t in range(1, T):
        hs[:, :, t].addcmul_(decay[:, :, t], hs[:, :, t - 1])
    del decay
    # 2. Carry the state across chunk boundaries (C small steps).
    S = torch.cumsum(delta, dim=2)                        # [Bsz, C, T, D], within-chunk
    chunk_decay = torch.exp(S[:, :, -1, :, None] * A)     # [Bsz, C, D, N]
    carry = h0
    starts = []
    for c in range(C):
        starts.append(carry)
        carry = torch.addcmul(hs[:, c, T - 1], chunk_decay[:, c], carry)
    # 3. Add the carried state's decayed contribution exp(A S_t) H_chunk_start to every
    #    step (exponents <= 0), then y_t = h_t . C_t.
    first = 0 if has_h0 else 1   # chunk 0 starts from zero: nothing to add
    if C > first:
        H0 = torch.stack(starts[first:], dim=1)[:, :, None]            # [Bsz, C', 1, D, N]
        hs[:, first:].addcmul_(torch.exp(S[:, first:, :, :, None] * A), H0)
    y = (hs.mul_(Cm[:, :, :, None, :])).sum(-1)                         # [Bsz, C, T, D]
    return y.reshape(Bsz, C * T, D)[:, :L], carry


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

class HymbaCache(torch.nn.Module):
    """Per-layer decode state for `batch` sequences that share one position."""

    def __init__(self, model, batch, capacity):
        super().__init__()
        d = model.d
        dev, dt, sdt = model.device, model.dtype, model.cdt
        self.batch = batch
        self.capacity = capacity            # positions, meta included
        self.ring = (d.window + 1) if d.window is not None else None
        self.k, self.v = [None] * d.n_layers, [None] * d.n_layers
        self.conv, self.ssm = [], []
        for i in range(d.n_layers):
            if d.owns_kv(i):
                if d.is_global[i]:
                    slots = _round_up(capacity, 16)
                else:
                    slots = _round_up(d.n_mem + self.ring, 16)
                k = torch.zeros(batch, d.n_kv, slots, d.d_k, device=dev, dtype=dt)
                v = torch.zeros(batch, d.n_kv, slots, d.d_v, device=dev, dtype=dt)
                self.register_buffer(f"k{i}", k)
                self.register_buffer(f"v{i}", v)
                self.k[i], self.v[i] = k, v
            conv = torch.zeros(batch, d.d_inner, d.d_conv - 1, device=dev, dtype=dt)
            ssm = torch.zeros(batch, d.d_inner, d.d_state, device=dev, dtype=sdt)
            self.register_buffer(f"conv{i}", conv)
            self.register_buffer(f"ssm{i}", ssm)
            self.conv.append(conv)
            self.ssm.append(ssm)
        for i in range(d.n_layers):   # consumers read the producer's buffers
            if not d.owns_kv(i):
                self.k[i], self.v[i] = self.k[d.kv_source[i]], self.v[d.kv_source[i]]
        # position of the next token (device scalar, updated in place by decode)
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=dev))
        self.global_slots = _round_up(capacity, 16)
        self.sliding_slots = _round_up(d.n_mem + self.ring, 16) if self.ring else 0
        self.sliding_real = d.n_mem + self.ring if self.ring else 0
        self.n_mem = d.n_mem

    def copy_row_to_all(self, row=0):
        """Benchmark helper: give every sequence the state of sequence `row`."""
        for buf in self.buffers():
            if buf.dim() > 0:
                buf.copy_(buf[row:row + 1].expand_as(buf))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class TorchHymba(torch.nn.Module):
    def __init__(self, config, state_dict, device="cpu", dtype=torch.float32,
                 attn_impl="auto", scan_chunk=64, attn_block=512):
        super().__init__()
        self.cfg = config
        self.d = d = HymbaDims(config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cdt = torch.float64 if dtype == torch.float64 else torch.float32
        self.scan_chunk = scan_chunk
        self._decode_layer_compiled = None
        self.attn_block = attn_block
        if attn_impl == "auto":
            attn_impl = "sdpa" if HAS_SDPA else "explicit"
        if attn_impl == "sdpa" and not HAS_SDPA:
            raise RuntimeError("this torch has no scaled_dot_product_attention")
        self.attn_impl = attn_impl
        self._flex = None
        self._block_masks = {}
        if attn_impl == "flex":
            self._init_flex()
        self.rep = d.n_q // d.n_kv
        self.scale = 1.0 / math.sqrt(d.d_k)

        def W(name, dtype_=None):   # model-dtype (or given) tensor on the device
            t = state_dict[name].to(device=self.device, dtype=dtype_ or dtype)
            return t.contiguous()

        cdt = self.cdt
        self._n = 0

        def reg(t):
            self.register_buffer(f"w{self._n}", t)
            self._n += 1
            return t

        self.embed = reg(W("model.embed_tokens.weight"))
        self.lm_head = (self.embed if config.get("tie_word_embeddings", True)
                        else reg(W("lm_head.weight")))
        self.final_norm = reg(W("model.final_layernorm.weight", cdt))
        self.meta = reg(W("model.memory_tokens")) if d.n_mem else None
        inv = rope_inv_freq(config, d.d_k, torch.float64)
        self.inv_freq = reg(inv.to(device=self.device, dtype=cdt)) if inv is not None else None

        self.layers = []
        for i in range(d.n_layers):
            p = f"model.layers.{i}."
            m = p + "mamba."
            e = p + "moe.experts.0."
            L = {
                "in_norm": W(p + "input_layernorm.weight", cdt),
                "in_proj": W(m + "in_proj.weight"),
                "conv_w": W(m + "conv1d.weight", cdt)[:, 0, :].contiguous(),   # [D, K]
                "conv_b": W(m + "conv1d.bias", cdt),
                "x_proj": W(m + "x_proj.0.weight"),
                "dt_proj": W(m + "dt_proj.0.weight"),
                "dt_bias": W(m + "dt_proj.0.bias", cdt),
                "A": -torch.exp(W(m + "A_log.0", cdt)),
                "Dskip": W(m + "D.0", cdt),
                "dt_norm": W(m + "dt_layernorm.weight", cdt),
                "B_norm": W(m + "B_layernorm.weight", cdt),
                "C_norm": W(m + "C_layernorm.weight", cdt),
                "pa1": W(m + "pre_avg_layernorm1.weight", cdt),
                "pa2": W(m + "pre_avg_layernorm2.weight", cdt),
                "out_proj": W(m + "out_proj.weight"),
                "mlp_norm": W(p + "pre_moe_layernorm.weight", cdt),
                # gate and up fused into one GEMM
                "gate_up": torch.cat([W(e + "gate_proj.weight"), W(e + "up_proj.weight")], 0),
                "down": W(e + "down_proj.weight"),
            }
            L["conv_w3"] = L["conv_w"][:, None, :]   # F.conv1d layout [D, 1, K]
            for k_ in list(L):
                L[k_] = reg(L[k_]) if k_ != "conv_w3" else L[k_]
            self.layers.append(L)
        self.inter = config["intermediate_size"]

    # -- helpers -------------------------------------------------------------
    def new_cache(self, batch, capacity):
        """Cache for `batch` sequences of up to `capacity` real tokens (meta added here)."""
        return HymbaCache(self, batch, capacity + self.d.n_mem)

    def _rms(self, x, w):
        xf = x.to(self.cdt)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.d.eps) * w).to(self.dtype)

    def _rope(self, x, cos, sin):
        xf = x.to(self.cdt)
        return (xf * cos + _rotate_half(xf) * sin).to(self.dtype)

    def _split(self, i, u):
        d = self.d
        if d.owns_kv(i):
            return torch.split(u, [d.attn_hidden, d.n_kv * d.d_k, d.n_kv * d.d_v,
                                   d.d_inner, d.d_inner], dim=-1)
        q, x, z = torch.split(u, [d.attn_hidden, d.d_inner, d.d_inner], dim=-1)
        return q, None, None, x, z

    def _attend(self, q, k, v, mask=None, causal=False):
        """q [B,H,Lq,dk], k [B,H,Lk,dk], v [B,H,Lk,dv]; mask additive, broadcastable."""
        if self.attn_impl in ("sdpa", "flex"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        s = torch.matmul(q.to(self.cdt), k.to(self.cdt).transpose(-1, -2)) * self.scale
        if causal:
            Lq, Lk = q.shape[-2], k.shape[-2]
            allowed = (torch.arange(Lk, device=q.device)[None, :]
                       <= torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq))
            s = s.masked_fill(~allowed, float("-inf"))
        if mask is not None:
            s = s + mask
        return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)

    def _expand_kv(self, t):
        if self.rep == 1:
            return t
        B, H, L, dd = t.shape
        return t[:, :, None].expand(B, H, self.rep, L, dd).reshape(B, H * self.rep, L, dd)

    def _init_flex(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self._create_block_mask = create_block_mask
        self._flex = torch.compile(flex_attention, dynamic=False)

    def _flex_attention(self, q, k, v, is_global):
        d = self.d
        L = q.shape[2]
        key = (L, is_global)
        if key not in self._block_masks:
            W_, M_ = d.window, d.n_mem
            if is_global:
                def mask_mod(b, h, qi, ki):
                    return ki <= qi
            else:
                def mask_mod(b, h, qi, ki):
                    return (ki <= qi) & (((qi - ki) <= W_) | (ki < M_))
            self._block_masks[key] = self._create_block_mask(
                mask_mod, None, None, L, L, device=q.device)
        return self._flex(q, k, v, block_mask=self._block_masks[key], enable_gqa=self.rep > 1)

    # -- prefill ---------------------------------------------------------------
    def _prefill_attention(self, q, k, v, is_global):
        """q [B,Hq,L,dk], k/v [B,Hkv,L,*] post-RoPE -> [B, L, Hq*dv]."""
        d = self.d
        B, _, L, _ = q.shape
        if self.attn_impl == "flex":
            out = self._flex_attention(q, k, v, is_global)
            return out.transpose(1, 2).reshape(B, L, d.n_q * d.d_v)
        W_ = d.window
        if is_global or L <= W_ + 1:   # the window cannot bind: plain causal
            out = self._attend(q, self._expand_kv(k), self._expand_kv(v), causal=True)
            return out.transpose(1, 2).reshape(B, L, d.n_q * d.d_v)
        M_ = d.n_mem
        out = q.new_empty(B, L, d.n_q, d.d_v)
        Qb = max(1, self.attn_block)
        for qs in range(0, L, Qb):
            qe = min(L, qs + Qb)
            lo = max(0, qs - W_)
            if lo <= M_:
                kpos = torch.arange(0, qe, device=q.device)
                kb, vb = k[:, :, :qe], v[:, :, :qe]
            else:
                kpos = torch.cat([torch.arange(0, M_, device=q.device),
                                  torch.arange(lo, qe, device=q.device)])
                kb = torch.cat([k[:, :, :M_], k[:, :, lo:qe]], dim=2)
                vb = torch.cat([v[:, :, :M_], v[:, :, lo:qe]], dim=2)
            qpos = torch.arange(qs, qe, device=q.device)[:, None]
            allowed = (kpos[None, :] <= qpos) & (((qpos - kpos[None, :]) <= W_) | (kpos[None, :] < M_))
            mdt = self.cdt if self.attn_impl == "explicit" else q.dtype
            mask = torch.zeros(allowed.shape, dtype=mdt, device=q.device).masked_fill(
                ~allowed, float("-inf"))
            o = self._attend(q[:, :, qs:qe], self._expand_kv(kb), self._expand_kv(vb), mask=mask)
            out[:, qs:qe] = o.transpose(1, 2)
        return out.reshape(B, L, d.n_q * d.d_v)

    def _prefill_mamba(self, i, x, z, cache, rows):
        d, P = self.d, self.layers[i]
        B, L, _ = x.shape
        K = d.d_conv
        conv = F.conv1d(x.to(self.cdt).transpose(1, 2), P["conv_w3"], P["conv_b"],
                        padding=K - 1, groups=d.d_inner)[..., :L]
        u = F.silu(conv).transpose(1, 2).to(self.dtype)                 # [B, L, D]
        r = F.linear(u, P["x_proj"])
        dt_raw, Bm, Cm = torch.split(r, [d.dt_rank, d.d_state, d.d_state], dim=-1)
        dt_n = self._rms(dt_raw, P["dt_norm"])
        Bm = self._rms(Bm, P["B_norm"]).to(self.cdt)
        Cm = self._rms(Cm, P["C_norm"]).to(self.cdt)
        delta = F.softplus(F.linear(dt_n, P["dt_proj"]).to(self.cdt) + P["dt_bias"])
        uf = u.to(self.cdt)
        y, h_last = chunked_selective_scan(delta, delta * uf, Bm, Cm, P["A"], self.scan_chunk)
        y = (y + P["Dskip"] * uf) * F.silu(z.to(self.cdt))
        if cache is not None:
            cache.ssm[i][rows].copy_(h_last)
            tail = x[:, -(K - 1):].transpose(1, 2) if K > 1 else x[:, :0].transpose(1, 2)
            cs = cache.conv[i][rows]
            cs.zero_()
            if tail.shape[-1]:
                cs[..., K - 1 - tail.shape[-1]:].copy_(tail)
        return y

    def _store_kv(self, i, k, v, cache, rows):
        d = self.d
        L = k.shape[2]
        K_, V_ = cache.k[i], cache.v[i]
        if d.is_global[i]:
            if L > K_.shape[2]:
                raise ValueError("prompt longer than the cache capacity")
            K_[rows, :, :L] = k
            V_[rows, :, :L] = v
            return
        M_, R = d.n_mem, cache.ring
        m = min(L, M_)
        K_[rows, :, :m] = k[:, :, :m]
        V_[rows, :, :m] = v[:, :, :m]
        if L > M_:
            p = torch.arange(max(M_, L - R), L, device=k.device)
            slots = M_ + (p - M_) % R
            K_[rows].index_copy_(2, slots, k[:, :, p])
            V_[rows].index_copy_(2, slots, v[:, :, p])

    def prefill(self, ids, cache=None, rows=None, all_logits=False):
        """ids [B, T] (equal lengths). Fills cache rows `rows` (default 0..B-1)."""
        d = self.d
        ids = torch.as_tensor(ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if rows is None:
            rows = slice(0, B)
        h = F.embedding(ids, self.embed)
        if d.n_mem:
            h = torch.cat([self.meta[None].expand(B, -1, -1), h], dim=1)
        L = h.shape[1]
        cos = sin = None
        if self.inv_freq is not None:
            ang = torch.arange(L, device=self.device, dtype=self.cdt)[:, None] * self.inv_freq
            ang = torch.cat([ang, ang], dim=-1)
            cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]   # [L, 1, dk]
        shared = {}
        for i, P in enumerate(self.layers):
            u = F.linear(self._rms(h, P["in_norm"]), P["in_proj"])
            q, k, v, x, z = self._split(i, u)
            q = q.reshape(B, L, d.n_q, d.d_k)
            if cos is not None:
                q = self._rope(q, cos, sin)
            q = q.transpose(1, 2)
            if d.owns_kv(i):
                k = k.reshape(B, L, d.n_kv, d.d_k)
                if cos is not None:
                    k = self._rope(k, cos, sin)
                k = k.transpose(1, 2).contiguous()
                v = v.reshape(B, L, d.n_kv, d.d_v).transpose(1, 2).contiguous()
                shared[i] = (k, v)
                if cache is not None:
                    self._store_kv(i, k, v, cache, rows)
            else:
                k, v = shared[d.kv_source[i]]
            attn = self._prefill_attention(q, k, v, d.is_global[i])
            ssm = self._prefill_mamba(i, x, z, cache, rows)
            h = self._fuse_and_mlp(P, h, attn, ssm)
        if cache is not None:
            cache.pos.fill_(L)
        h = h[:, d.n_mem:] if all_logits else h[:, -1]
        return F.linear(self._rms(h, self.final_norm), self.lm_head)

    def _fuse_and_mlp(self, P, h, attn, ssm):
        m = ((self._rms(attn, P["pa1"]).to(self.cdt) + self._rms(ssm, P["pa2"]).to(self.cdt)) / 2)
        h = h + F.linear(m.to(self.dtype), P["out_proj"])
        gu = F.linear(self._rms(h, P["mlp_norm"]), P["gate_up"])
        g, up = gu.split(self.inter, dim=-1)
        return h + F.linear(F.silu(g) * up, P["down"])

    # -- decode ------------------------------------------------------------------
    def decode(self, tokens, cache, compiled=False):
        """One token per sequence: tokens [B] -> logits [B, vocab]; advances the cache.

        compiled=True runs the layers through compile_decode()'s compiled function."""
        d = self.d
        pos = cache.pos
        h = F.embedding(tokens, self.embed)                             # [B, H]
        cos = sin = None
        if self.inv_freq is not None:
            ang = pos.to(self.cdt) * self.inv_freq
            ang = torch.cat([ang, ang])
            cos, sin = torch.cos(ang), torch.sin(ang)
        neg = float("-inf")
        mdt = self.cdt if self.attn_impl == "explicit" else self.dtype
        jg = torch.arange(cache.global_slots, device=self.device)
        mask_g = torch.zeros(cache.global_slots, dtype=mdt, device=self.device).masked_fill(jg > pos, neg)
        slot_g = pos.view(1)
        mask_s = slot_s = None
        if cache.ring:
            js = torch.arange(cache.sliding_slots, device=self.device)
            mask_s = torch.zeros(cache.sliding_slots, dtype=mdt, device=self.device).masked_fill(
                (js > pos) | (js >= cache.sliding_real), neg)
            slot_s = (d.n_mem + torch.remainder(pos - d.n_mem, cache.ring)).view(1)
        layer_fn = self._decode_layer_compiled if compiled else self._decode_layer
        for i, P in enumerate(self.layers):
            glob = d.is_global[i]
            h = layer_fn(P, h, cos, sin, cache.k[i], cache.v[i], cache.conv[i], cache.ssm[i],
                         mask_g if glob else mask_s, slot_g if glob else slot_s,
                         d.owns_kv(i))
        pos.add_(1)
        return F.linear(self._rms(h, self.final_norm), self.lm_head)

    def _decode_layer(self, P, h, cos, sin, Kc, Vc, conv_state, ssm_state, mask, slot, owns):
        """One decoder layer for one token per sequence; updates the layer's cache in place.

        Everything layer-specific comes in as arguments, so a torch.compile of this
        function is shared by all layers of the same kind (global/sliding, owner/consumer).
        """
        d = self.d
        B = h.shape[0]
        u = F.linear(self._rms(h, P["in_norm"]), P["in_proj"])
        if owns:
            q, k, v, x, z = torch.split(u, [d.attn_hidden, d.n_kv * d.d_k, d.n_kv * d.d_v,
                                            d.d_inner, d.d_inner], dim=-1)
        else:
            q, x, z = torch.split(u, [d.attn_hidden, d.d_inner, d.d_inner], dim=-1)
        q = q.reshape(B, d.n_q, d.d_k)
        if cos is not None:
            q = self._rope(q, cos, sin)
        if owns:
            k = k.reshape(B, d.n_kv, d.d_k)
            if cos is not None:
                k = self._rope(k, cos, sin)
            Kc[:, :, slot] = k[:, :, None]     # index_put_: in place, graph-safe
            Vc[:, :, slot] = v.reshape(B, d.n_kv, 1, d.d_v)
        qg = q.view(B, d.n_kv, self.rep, d.d_k)   # GQA group folded into the query axis
        o = self._attend(qg, Kc, Vc, mask=mask.view(1, 1, 1, -1))     # [B, Hkv, rep, dv]
        attn = o.reshape(B, d.n_q * d.d_v)
        ssm = self._decode_mamba(P, x, z, conv_state, ssm_state)
        return self._fuse_and_mlp(P, h, attn, ssm)

    def _decode_mamba(self, P, x, z, cs, s):
        d = self.d
        win = torch.cat([cs, x[:, :, None]], dim=-1)                       # [B, D, K]
        xi = (win.to(self.cdt) * P["conv_w"]).sum(-1) + P["conv_b"]
        cs.copy_(win[:, :, 1:])
        u = F.silu(xi).to(self.dtype)
        r = F.linear(u, P["x_proj"])
        dt_raw, Bm, Cm = torch.split(r, [d.dt_rank, d.d_state, d.d_state], dim=-1)
        dt_n = self._rms(dt_raw, P["dt_norm"])
        Bm = self._rms(Bm, P["B_norm"]).to(self.cdt)
        Cm = self._rms(Cm, P["C_norm"]).to(self.cdt)
        delta = F.softplus(F.linear(dt_n, P["dt_proj"]).to(self.cdt) + P["dt_bias"])   # [B, D]
        uf = u.to(self.cdt)
        decay = torch.exp(delta[:, :, None] * P["A"])
        s.copy_(torch.addcmul((delta * uf)[:, :, None] * Bm[:, None, :], decay, s))
        y = torch.matmul(s, Cm[:, :, None]).squeeze(-1) + P["Dskip"] * uf
        return y * F.silu(z.to(self.cdt))

    def compile_decode(self, **kw):
        """torch.compile the per-layer decode function (used by decode(compiled=True))."""
        if not hasattr(torch, "compile"):
            raise RuntimeError("torch.compile needs torch >= 2.0")
        try:
            dyn = importlib.import_module("torch._dynamo")
            dyn.config.cache_size_limit = max(dyn.config.cache_size_limit, 64)
        except Exception:  # noqa: BLE001
            pass
        self._decode_layer_compiled = torch.compile(self._decode_layer, dynamic=False, **kw)

    # -- CUDA graph of one decode step ---------------------------------------------
    def decode_graph(self, cache, step_fn=None, warmup=2):
        """Capture one decode step in a CUDA graph; returns step(tokens) -> logits.

        step_fn(tokens, cache) defaults to self.decode (pass one that runs compiled
        kernels to capture those). The warm-up runs `warmup` real decode steps (they advance the cache).
        """
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        fn = step_fn or self.decode
        static_tokens = torch.zeros(cache.batch, dtype=torch.long, device=self.device)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn(static_tokens, cache)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(static_tokens, cache)

        def step(tokens):
            static_tokens.copy_(tokens)
            graph.replay()
            return static_out
        step.graph = graph
        step.warmup_steps = warmup
        return step
