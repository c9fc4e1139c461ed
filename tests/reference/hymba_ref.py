"""Independent PyTorch reference of the Hymba forward pass (no cache).

Written from shared/spec/hymba-model.md section 4; section numbers below refer to it.
Every call runs the whole meta-prefixed sequence from scratch, so the code is the
plain math with no cache, no kernels and no intermediate rounding. It computes in
float64 by default (float32 on request).

Config-driven for the whole family: layer count, head counts (MHA/GQA/MQA),
global_attn_idx, kv_reuse_group, sliding_window null, num_memory_tokens 0,
rope_type "ntk"/"default"/null, rope false, tied or separate lm_head.

Option `matmul_input_bf16=True` rounds the input of every linear layer (not the
embedding lookup) to bfloat16 before the product, like the C++ engine does when
its weights are bf16; everything else stays in full precision.
"""

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

class HymbaDims:
    """Derived sizes and per-layer roles of a Hymba config (spec sections 2-3)."""

    def __init__(self, cfg):
        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.vocab = cfg["vocab_size"]
        self.n_q = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        if self.n_q % self.n_kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        attn_hidden = cfg.get("attn_hidden_size", -1)
        self.attn_hidden = self.hidden if attn_hidden in (-1, None) else attn_hidden
        kq = cfg.get("kq_head_dim", -1)
        self.d_k = self.attn_hidden // self.n_q if kq in (-1, None) else kq
        self.d_inner = cfg["mamba_expand"] * self.hidden
        # The value head dim is recomputed from d_inner, whatever v_head_dim says (spec 2).
        self.d_v = self.d_inner // self.n_q
        dt_rank = cfg["mamba_dt_rank"]
        self.dt_rank = math.ceil(self.hidden / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_state = cfg["mamba_d_state"]
        self.d_conv = cfg["mamba_d_conv"]
        self.n_mem = cfg.get("num_memory_tokens", 0) or 0
        self.window = cfg.get("sliding_window")  # None => every layer global
        self.eps = cfg["rms_norm_eps"]

        # Per-layer roles. A layer is global when there is no window at all or it is
        # listed in global_attn_idx. kv_source[i] is the layer whose K/V layer i uses:
        # itself (it owns K/V), or the first layer of its kv_reuse_group.
        glob = set(cfg.get("global_attn_idx") or [])
        self.is_global = [self.window is None or i in glob for i in range(self.n_layers)]
        self.kv_source = list(range(self.n_layers))
        for group in cfg.get("kv_reuse_group") or []:
            producer = group[0]
            for consumer in group[1:]:
                if consumer <= producer:
                    raise ValueError("kv_reuse_group: consumers must come after the producer")
                if self.is_global[consumer] != self.is_global[producer]:
                    raise ValueError("kv_reuse_group mixes global and sliding-window layers")
                self.kv_source[consumer] = producer

    def owns_kv(self, i):
        return self.kv_source[i] == i

    def in_proj_rows(self, i):
        """Output rows of layer i's in_proj: Q, [K, V,] x, z (spec 3)."""
        kv = self.n_kv * (self.d_k + self.d_v) if self.owns_kv(i) else 0
        return self.attn_hidden + kv + 2 * self.d_inner


def rope_inv_freq(cfg, dim, dtype=torch.float64):
    """Inverse RoPE frequencies (spec 4.4/4.5), or None when RoPE is off."""
    if not cfg.get("rope", True):
        return None
    base = float(cfg.get("rope_theta", 10000.0))
    rope_type = cfg.get("rope_type")
    if rope_type == "ntk":
        # Static NTK base scaling; factor 2 is hard-coded in the reference model.
        factor = 2.0
        max_pos = cfg["max_position_embeddings"]
        orig = cfg["orig_max_position_embeddings"]
        base = base * (factor * max_pos / orig - (factor - 1)) ** (dim / (dim - 2))
    elif rope_type not in (None, "default"):
        raise NotImplementedError(f"rope_type {rope_type!r}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return (1.0 / base ** exponents).to(dtype)


def param_shapes(cfg):
    """{HF tensor name: shape} in the order of spec section 3."""
    d = HymbaDims(cfg)
    inter = cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (d.vocab, d.hidden)}
    if d.n_mem:
        shapes["model.memory_tokens"] = (d.n_mem, d.hidden)
    for i in range(d.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d.hidden,),
            p + "mamba.in_proj.weight": (d.in_proj_rows(i), d.hidden),
            p + "mamba.conv1d.weight": (d.d_inner, 1, d.d_conv),
            p + "mamba.conv1d.bias": (d.d_inner,),
            p + "mamba.x_proj.0.weight": (d.dt_rank + 2 * d.d_state, d.d_inner),
            p + "mamba.dt_proj.0.weight": (d.d_inner, d.dt_rank),
            p + "mamba.dt_proj.0.bias": (d.d_inner,),
            p + "mamba.A_log.0": (d.d_inner, d.d_state),
            p + "mamba.D.0": (d.d_inner,),
            p + "mamba.dt_layernorm.weight": (d.dt_rank,),
            p + "mamba.B_layernorm.weight": (d.d_state,),
            p + "mamba.C_layernorm.weight": (d.d_state,),
            p + "mamba.pre_avg_layernorm1.weight": (d.d_inner,),
            p + "mamba.pre_avg_layernorm2.weight": (d.d_inner,),
            p + "mamba.out_proj.weight": (d.hidden, d.d_inner),
            p + "pre_moe_layernorm.weight": (d.hidden,),
            p + "moe.experts.0.gate_proj.weight": (inter, d.hidden),
            p + "moe.experts.0.up_proj.weight": (inter, d.hidden),
            p + "moe.experts.0.down_proj.weight": (d.hidden, inter),
        })
    shapes["model.final_layernorm.weight"] = (d.hidden,)
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (d.vocab, d.hidden)
    return shapes


# ---------------------------------------------------------------------------
# Small math helpers
# ---------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """RMSNorm in full precision (no intermediate rounding)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def round_to_bf16(x):
    """Round to the nearest bfloat16 (via float32, as an fp32 engine would) and back."""
    return x.to(torch.float32).to(torch.bfloat16).to(x.dtype)


def softplus_thresholded(v):
    """softplus(v) = v if v > 20 else log(1 + e^v) (spec 4.6 step 4)."""
    return torch.where(v > 20, v, torch.log1p(torch.exp(torch.clamp(v, max=20))))


def apply_rope(x, cos, sin):
    """Non-interleaved rotate_half RoPE over the last dim; x: [L, heads, d]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class HymbaReference:
    def __init__(self, config, state_dict, dtype=torch.float64, matmul_input_bf16=False):
        self.cfg = config
        self.d = HymbaDims(config)
        self.dtype = dtype
        self.matmul_input_bf16 = matmul_input_bf16
        # Weights exactly as stored (bf16/f16 convert exactly to float32/64).
        self.w = {k: v.to(dtype) for k, v in state_dict.items()}
        self._check_shapes()
        if config.get("tie_word_embeddings", True):
            self.lm_head = self.w["model.embed_tokens.weight"]
        else:
            self.lm_head = self.w["lm_head.weight"]
        self.inv_freq = rope_inv_freq(config, self.d.d_k, dtype)

    # -- sanity: the state dict must have the spec section 3 layout --------------
    def _check_shapes(self):
        for name, shape in param_shapes(self.cfg).items():
            if name not in self.w:
                raise KeyError(f"missing tensor {name}")
            if tuple(self.w[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(self.w[name].shape)} != {shape}")

    def _linear(self, x, weight):
        """y = W x for rows of x (nn.Linear layout, no bias)."""
        if self.matmul_input_bf16:
            x = round_to_bf16(x)
        return x @ weight.T

    # -- 4.4 attention ---------------------------------------------------------
    def _mask(self, L, is_global):
        """Boolean [L, L] mask, True where query q may see key k (positions include meta)."""
        q = torch.arange(L)[:, None]
        k = torch.arange(L)[None, :]
        allowed = k <= q
        if not is_global:
            allowed &= ((q - k) <= self.d.window) | (k < self.d.n_mem)
        return allowed

    def _attention(self, q, k, v, is_global):
        """q [L,Hq,dk], k [L,Hkv,dk], v [L,Hkv,dv] (post-RoPE) -> [L, Hq*dv], head-major."""
        d = self.d
        L = q.shape[0]
        rep = d.n_q // d.n_kv
        # Query head h uses KV head h // rep (repeat-interleave, spec 4.4 GQA).
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d.d_k)
        scores = scores.masked_fill(~self._mask(L, is_global), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v)
        return out.reshape(L, d.n_q * d.d_v)

    # -- 4.6 Mamba branch --------------------------------------------------------
    def _mamba(self, p, x, z):
        """x, z: [L, d_inner] -> SSM branch output [L, d_inner]."""
        d, w = self.d, self.w
        L = x.shape[0]
        # 1. causal depthwise conv with bias, then SiLU:
        #    xi_t = b + sum_k w[:, k] * x_{t-K+1+k}, x before the start = 0, so w[:, K-1]
        #    multiplies the current token. (Written as shifted sums: clearer than
        #    F.conv1d and much faster on this CPU build.)
        K = d.d_conv
        weight = w[p + "conv1d.weight"][:, 0, :]                     # [d_inner, K]
        padded = torch.cat([torch.zeros(K - 1, d.d_inner, dtype=x.dtype), x], dim=0)
        conv = w[p + "conv1d.bias"].expand(L, -1).clone()
        for k in range(K):
            conv += weight[:, k] * padded[k:k + L]
        u = F.silu(conv)                                              # [L, d_inner]
        # 2-3. x_proj, split into dt / B / C, inner RMSNorms with learned weights.
        r = self._linear(u, w[p + "x_proj.0.weight"])
        dt_raw, B, C = torch.split(r, [d.dt_rank, d.d_state, d.d_state], dim=-1)
        dt_n = rms_norm(dt_raw, w[p + "dt_layernorm.weight"], d.eps)
        B = rms_norm(B, w[p + "B_layernorm.weight"], d.eps)
        C = rms_norm(C, w[p + "C_layernorm.weight"], d.eps)
        # 4. dt_proj without bias; the bias is added inside the softplus.
        delta = softplus_thresholded(self._linear(dt_n, w[p + "dt_proj.0.weight"])
                                     + w[p + "dt_proj.0.bias"])      # [L, d_inner]
        # 5-6. selective scan from a zero state over every position (meta included).
        A = -torch.exp(w[p + "A_log.0"])                              # [d_inner, N]
        decay = torch.exp(delta[:, :, None] * A[None])                # [L, d_inner, N]
        drive = (delta * u)[:, :, None] * B[:, None, :]               # [L, d_inner, N]
        h = torch.zeros(d.d_inner, d.d_state, dtype=x.dtype)
        ys = []
        for t in range(L):
            h = decay[t] * h + drive[t]
            ys.append(h @ C[t])
        y = torch.stack(ys) + w[p + "D.0"] * u
        return y * F.silu(z)

    # -- 4.3 decoder layer -----------------------------------------------------
    def _layer(self, i, h, cos, sin, kv_store):
        d, w = self.d, self.w
        p = f"model.layers.{i}."
        u = self._linear(rms_norm(h, w[p + "input_layernorm.weight"], d.eps),
                         w[p + "mamba.in_proj.weight"])
        L = h.shape[0]
        if d.owns_kv(i):
            sizes = [d.attn_hidden, d.n_kv * d.d_k, d.n_kv * d.d_v, d.d_inner, d.d_inner]
            q, k, v, x, z = torch.split(u, sizes, dim=-1)
            k = k.reshape(L, d.n_kv, d.d_k)
            v = v.reshape(L, d.n_kv, d.d_v)
            if cos is not None:
                k = apply_rope(k, cos, sin)
            kv_store[i] = (k, v)   # post-RoPE, for this layer's consumers
        else:
            q, x, z = torch.split(u, [d.attn_hidden, d.d_inner, d.d_inner], dim=-1)
            k, v = kv_store[d.kv_source[i]]
        q = q.reshape(L, d.n_q, d.d_k)
        if cos is not None:
            q = apply_rope(q, cos, sin)
        attn = self._attention(q, k, v, d.is_global[i])
        ssm = self._mamba(p + "mamba.", x, z)
        # Branch fusion: each branch RMS-normalised with its own weight, then averaged.
        m = (rms_norm(attn, w[p + "mamba.pre_avg_layernorm1.weight"], d.eps)
             + rms_norm(ssm, w[p + "mamba.pre_avg_layernorm2.weight"], d.eps)) / 2
        h = h + self._linear(m, w[p + "mamba.out_proj.weight"])
        # SwiGLU MLP (single expert).
        a = rms_norm(h, w[p + "pre_moe_layernorm.weight"], d.eps)
        e = p + "moe.experts.0."
        gated = F.silu(self._linear(a, w[e + "gate_proj.weight"])) * self._linear(a, w[e + "up_proj.weight"])
        return h + self._linear(gated, w[e + "down_proj.weight"])

    # -- public API ----------------------------------------------------------------
    def logits(self, input_ids):
        """Logits [T, vocab] for real tokens t_0..t_{T-1} (full forward, no cache)."""
        d = self.d
        ids = torch.as_tensor(list(input_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("empty input")
        # 4.1: meta tokens at positions 0..M-1, then the token embeddings.
        h = self.w["model.embed_tokens.weight"][ids]
        if d.n_mem:
            h = torch.cat([self.w["model.memory_tokens"], h], dim=0)
        L = h.shape[0]
        cos = sin = None
        if self.inv_freq is not None:
            angles = torch.arange(L, dtype=self.dtype)[:, None] * self.inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1)   # rotate_half pairs i and i + d/2
            cos, sin = torch.cos(angles), torch.sin(angles)
        kv_store = {}
        for i in range(d.n_layers):
            h = self._layer(i, h, cos, sin, kv_store)
        h = h[d.n_mem:]   # meta rows are dropped before the LM head
        h = rms_norm(h, self.w["model.final_layernorm.weight"], d.eps)
        return self._linear(h, self.lm_head)

    def greedy_with_margins(self, prompt_ids, n_new, stop_below=None):
        """Greedy decoding, each step a fresh full forward. Returns (tokens, top1-top2 margins).

        With stop_below, stops early (fewer than n_new tokens) at the first step whose
        margin is below it: used to reject prompts with near-tie continuations cheaply.
        """
        seq = list(prompt_ids)
        tokens, margins = [], []
        for _ in range(n_new):
            last = self.logits(seq)[-1]
            top = torch.topk(last, 2)
            nxt = int(torch.argmax(last))
            tokens.append(nxt)
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(nxt)
            if stop_below is not None and margins[-1] < stop_below:
                break
        return tokens, margins

    def greedy(self, prompt_ids, n_new):
        return self.greedy_with_margins(prompt_ids, n_new)[0]


# ---------------------------------------------------------------------------
# Random weights in the HF layout (spec section 3)
# ---------------------------------------------------------------------------

def random_state_dict(config, seed, dtype=torch.float32):
    """Random weights under the exact HF tensor names, scaled so activations stay O(1).

    Values are drawn in float64 from a seeded generator and cast to `dtype`
    (float32, bfloat16 or float16), so the same seed gives the same model up to
    the storage rounding.
    """
    d = HymbaDims(config)
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g, dtype=torch.float64)

    def uniform(*shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    def matrix(out_f, in_f, gain=0.7):
        # N(0, gain/sqrt(fan_in)): each output is O(gain) for O(1) inputs.
        return normal(out_f, in_f, std=gain / math.sqrt(in_f))

    def norm_weight(n):
        return normal(n, std=0.1, mean=1.0)

    # Embeddings N(0, 0.5) and residual-branch outputs (out_proj, down_proj) with gain
    # 1.4: with tied N(0,1) embeddings and weaker layers the current token's own
    # embedding dominates the last hidden state, so greedy decoding just repeats the
    # input token, which makes a poor decode test.
    sd = {
        "model.embed_tokens.weight": normal(d.vocab, d.hidden, std=0.5),
        "model.final_layernorm.weight": norm_weight(d.hidden),
    }
    if d.n_mem:
        sd["model.memory_tokens"] = normal(d.n_mem, d.hidden)
    if not config.get("tie_word_embeddings", True):
        # Separate head: logits of std ~ sqrt(hidden) for a useful greedy spread.
        sd["lm_head.weight"] = normal(d.vocab, d.hidden, std=1.0)
    inter = config["intermediate_size"]
    for i in range(d.n_layers):
        p = f"model.layers.{i}."
        # dt bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1].
        dt = torch.exp(uniform(d.d_inner, lo=math.log(1e-3), hi=math.log(1e-1)))
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        sd.update({
            p + "input_layernorm.weight": norm_weight(d.hidden),
            p + "mamba.in_proj.weight": matrix(d.in_proj_rows(i), d.hidden, gain=1.0),
            p + "mamba.conv1d.weight": normal(d.d_inner, 1, d.d_conv, std=0.3),
            p + "mamba.conv1d.bias": normal(d.d_inner, std=0.1),
            p + "mamba.x_proj.0.weight": matrix(d.dt_rank + 2 * d.d_state, d.d_inner, gain=1.0),
            p + "mamba.dt_proj.0.weight": matrix(d.d_inner, d.dt_rank, gain=0.5),
            p + "mamba.dt_proj.0.bias": dt_bias,
            p + "mamba.A_log.0": torch.log(uniform(d.d_inner, d.d_state, lo=1.0, hi=16.0)),
            p + "mamba.D.0": normal(d.d_inner, std=0.1, mean=1.0),
            p + "mamba.dt_layernorm.weight": norm_weight(d.dt_rank),
            p + "mamba.B_layernorm.weight": norm_weight(d.d_state),
            p + "mamba.C_layernorm.weight": norm_weight(d.d_state),
            p + "mamba.pre_avg_layernorm1.weight": norm_weight(d.d_inner),
            p + "mamba.pre_avg_layernorm2.weight": norm_weight(d.d_inner),
            p + "mamba.out_proj.weight": matrix(d.hidden, d.d_inner, gain=1.4),
            p + "pre_moe_layernorm.weight": norm_weight(d.hidden),
            p + "moe.experts.0.gate_proj.weight": matrix(inter, d.hidden, gain=1.0),
            p + "moe.experts.0.up_proj.weight": matrix(inter, d.hidden, gain=1.0),
            p + "moe.experts.0.down_proj.weight": matrix(d.hidden, inter, gain=1.4),
        })
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
