#!/usr/bin/env python3
"""Benchmark the PyTorch Hymba baseline (bench/torch_hymba.py) with random weights.

Measures, each with CUDA events after warm-up, median of --repeats:
  decode   batch-1 decode tok/s at each --decode-ctx (prefill the context, then
           --decode-steps greedy steps; argmax on the device, no host syncs);
  prefill  prefill tok/s of one --prefill-len prompt (cache filled, last-row logits),
           with SDPA (query-blocked sliding window) and, with --flex, flex_attention;
  batch    --batch sequences with --batch-prompt-token prompts decoding together:
           aggregate decode tok/s (and batched prefill tok/s when the prompts are
           really prefilled, see --batch-fill).
Decode runs in the --modes asked: eager, graph (the eager step captured in a CUDA
graph), compile (torch.compile'd step captured in a CUDA graph; falls back to the
compiled step without a graph, or is skipped with a message if compiling fails).

Weights: random, generated on the device in the model dtype from a fixed seed, scaled
like hymba_ref.random_state_dict (activations O(1)); the math does not depend on the
values, only the timings are of interest. Context lengths count real tokens; the
num_memory_tokens meta tokens come on top (positions = ctx + meta).

Output: progress and a table on stderr, the JSON summary on stdout (and --json-out).

Example (device):
  python3 bench/torch_bench.py --preset 1.5b --device cuda \\
      --time-budget 230 --json-out $OUT/torch_bench.json
CPU smoke test:
  /usr/bin/python3 bench/torch_bench.py --config tiny.json --device cpu --dtype fp32 \\
      --decode-ctx 16,40 --decode-steps 4 --prefill-len 64 --batch 3 --batch-prompt 32
"""

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_hymba import HAS_SDPA, HymbaDims, TorchHymba  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
T0 = time.monotonic()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Random weights, made on the device (same recipe as hymba_ref.random_state_dict)
# ---------------------------------------------------------------------------

def random_weights(cfg, seed, device, dtype):
    d = HymbaDims(cfg)
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return t.mul_(std).add_(mean).to(dtype)

    def uniform(*shape, lo, hi):
        return torch.rand(*shape, generator=g, device=device, dtype=torch.float32) * (hi - lo) + lo

    def matrix(out_f, in_f, gain=0.7):
        return normal(out_f, in_f, std=gain / math.sqrt(in_f))

    def norm_weight(n):
        return normal(n, std=0.1, mean=1.0)

    sd = {"model.embed_tokens.weight": normal(d.vocab, d.hidden, std=0.5),
          "model.final_layernorm.weight": norm_weight(d.hidden)}
    if d.n_mem:
        sd["model.memory_tokens"] = normal(d.n_mem, d.hidden)
    if not cfg.get("tie_word_embeddings", True):
        sd["lm_head.weight"] = normal(d.vocab, d.hidden)
    inter = cfg["intermediate_size"]
    for i in range(d.n_layers):
        p = f"model.layers.{i}."
        dt = torch.exp(uniform(d.d_inner, lo=math.log(1e-3), hi=math.log(1e-1)))
        sd.update({
            p + "input_layernorm.weight": norm_weight(d.hidden),
            p + "mamba.in_proj.weight": matrix(d.in_proj_rows(i), d.hidden, gain=1.0),
            p + "mamba.conv1d.weight": normal(d.d_inner, 1, d.d_conv, std=0.3),
            p + "mamba.conv1d.bias": normal(d.d_inner, std=0.1),
            p + "mamba.x_proj.0.weight": matrix(d.dt_rank + 2 * d.d_state, d.d_inner, gain=1.0),
            p + "mamba.dt_proj.0.weight": matrix(d.d_inner, d.dt_rank, gain=0.5),
            p + "mamba.dt_proj.0.bias": (dt + torch.log(-torch.expm1(-dt))).to(dtype),
            p + "mamba.A_log.0": torch.log(uniform(d.d_inner, d.d_state, lo=1.0, hi=16.0)).to(dtype),
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
    return sd


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.results = []
        self.notes = []

    def left(self):
        return self.args.time_budget - (time.monotonic() - T0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn):
        """Seconds for fn(), CUDA events on the GPU, wall clock elsewhere."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def note(self, msg):
        log("note: " + msg)
        self.notes.append(msg)

    def add(self, **r):
        r = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
        self.results.append(r)
        log("result: " + json.dumps(r))

    def ids(self, model, B, T, seed):
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed)
        return torch.randint(3, model.d.vocab, (B, T), generator=g, device=self.dev)

    # -- decode steps in the asked modes ------------------------------------
    def decode_modes(self, model, cache, L0, part, extra):
        """Time greedy decode from position L0 (reset before each repeat) in each mode."""
        a = self.args
        B = cache.batch
        start_tok = self.ids(model, 1, B, 7)[0]
        for mode in a.modes:
            if self.left() < a.min_part_s:
                self.note(f"{part} {mode}: skipped, time budget")
                continue
            if mode == "compile" and self.left() < a.compile_min_s:
                self.note(f"{part} compile: skipped, less than {a.compile_min_s:.0f} s left "
                          "(compiling takes ~20-60 s)")
                continue
            if mode in ("graph", "compile") and not self.cuda:
                self.note(f"{part} {mode}: skipped (needs CUDA)")
                continue
            t_setup = time.monotonic()
            try:
                step, how = self.make_step(model, cache, mode)
            except Exception as e:  # noqa: BLE001 - report and go on
                self.note(f"{part} {mode}: unavailable ({type(e).__name__}: {str(e)[:300]})")
                continue
            setup_s = time.monotonic() - t_setup

            def run():
                t = start_tok
                for _ in range(a.decode_steps):
                    t = step(t).argmax(-1)

            try:
                for _ in range(a.warmup):
                    cache.pos.fill_(L0)
                    run()
                self.sync()
                times = []
                for _ in range(a.repeats):
                    cache.pos.fill_(L0)
                    times.append(self.timed(run))
                    if self.left() < 0:
                        break
            except Exception as e:  # noqa: BLE001
                self.note(f"{part} {mode}: failed while running ({type(e).__name__}: {str(e)[:300]})")
                continue
            med = statistics.median(times)
            if a.profile and self.cuda:
                self.profile(f"{part} {how} batch {B}", lambda: [step(start_tok) for _ in range(4)])
            self.add(part=part, mode=how, batch=B, **extra, steps=a.decode_steps,
                     ms_per_step=1000 * med / a.decode_steps,
                     tok_s=B * a.decode_steps / med, setup_s=setup_s,
                     repeats_s=[round(t, 5) for t in times])

    def make_step(self, model, cache, mode):
        if mode == "eager":
            return (lambda t: model.decode(t, cache)), "eager"
        if mode == "graph":
            return model.decode_graph(cache), "cuda-graph"
        if mode == "compile":
            if model._decode_layer_compiled is None:
                model.compile_decode()
            t = torch.zeros(cache.batch, dtype=torch.long, device=self.dev)
            pos0 = int(cache.pos)
            log(f"compiling the decode layers (batch {cache.batch}) ...")
            model.decode(t, cache, compiled=True)     # compile outside the capture
            model.decode(t, cache, compiled=True)
            cache.pos.fill_(pos0)
            self.sync()
            fn = lambda tt, c: model.decode(tt, c, compiled=True)  # noqa: E731
            try:
                return model.decode_graph(cache, step_fn=fn), "compile+cuda-graph"
            except Exception as e:  # noqa: BLE001
                self.note(f"capturing the compiled step failed ({type(e).__name__}: {str(e)[:200]}); "
                          "timing it without a graph")
                torch.cuda.synchronize()
                return (lambda tt: model.decode(tt, cache, compiled=True)), "compile"
        raise ValueError(mode)

    # -- parts ----------------------------------------------------------------
    def part_decode(self, model):
        a = self.args
        n_extra = a.decode_steps + 8          # graph warm-up steps, a margin
        for ctx in a.decode_ctx:
            if self.left() < a.min_part_s:
                self.note(f"decode ctx {ctx}: skipped, time budget")
                continue
            cache = model.new_cache(batch=1, capacity=ctx + n_extra)
            ids = self.ids(model, 1, ctx, 1)
            t_pre = self.timed(lambda: model.prefill(ids, cache))
            L0 = int(cache.pos)
            self.decode_modes(model, cache, L0, "decode", dict(ctx=ctx, prefill_s=t_pre))
            cache = None  # free the buffers
            self.free()

    def part_prefill(self, model):
        a = self.args
        impls = ["sdpa" if HAS_SDPA else "explicit"] + (["flex"] if a.flex else [])
        first_logits = None
        for impl in impls:
            if self.left() < a.min_part_s:
                self.note(f"prefill {impl}: skipped, time budget")
                continue
            L = a.prefill_len
            cache = model.new_cache(batch=1, capacity=L)
            ids = self.ids(model, 1, L, 2)
            prev = model.attn_impl
            try:
                if impl == "flex":
                    model._init_flex()
                model.attn_impl = impl
                out = {}
                t_first = self.timed(lambda: out.update(x=model.prefill(ids, cache)))  # warm-up
                last = out["x"].float()
                agree = None
                if first_logits is None:
                    first_logits = last
                else:   # same prompt, same weights: compare with the first impl's logits
                    agree = float((last - first_logits).norm() / first_logits.norm())
                for _ in range(max(0, a.warmup - 1)):
                    model.prefill(ids, cache)
                times = []
                for _ in range(a.repeats):
                    times.append(self.timed(lambda: model.prefill(ids, cache)))
                    if self.left() < 0:
                        break
                med = statistics.median(times)
                self.add(part="prefill", attn=impl, batch=1, len=L, s=med, tok_s=L / med,
                         first_call_s=t_first, repeats_s=[round(t, 5) for t in times],
                         **({"logits_rel_diff_vs_" + impls[0]: agree} if agree is not None else {}))
                if a.profile and self.cuda:
                    self.profile(f"prefill {impl} {L}", lambda: model.prefill(ids, cache))
            except Exception as e:  # noqa: BLE001
                self.note(f"prefill {impl}: failed ({type(e).__name__}: {str(e)[:300]})")
            finally:
                model.attn_impl = prev
            cache = None  # free the buffers
            self.free()

    def part_batch(self, model):
        a = self.args
        B, P = a.batch, a.batch_prompt
        if self.left() < a.min_part_s:
            self.note("batch: skipped, time budget")
            return
        try:
            cache = model.new_cache(batch=B, capacity=P + a.decode_steps + 8)
        except RuntimeError as e:
            self.note(f"batch {B}x{P}: cache allocation failed ({str(e)[:200]})")
            return
        sub = max(1, min(B, a.prefill_batch))
        n_sub = (B + sub - 1) // sub
        # Estimate the full prefill from the first sub-batch; replicate when it won't fit.
        t0 = time.monotonic()
        ids = self.ids(model, sub, P, 3)
        model.prefill(ids, cache, rows=slice(0, sub))
        self.sync()
        t_sub = time.monotonic() - t0
        fill = a.batch_fill
        if fill == "auto":
            fill = "prefill" if t_sub * n_sub < 0.5 * self.left() - a.min_part_s else "replicate"
        if fill == "prefill" and n_sub > 1:
            t0 = time.monotonic()
            for j in range(1, n_sub):
                r0, r1 = j * sub, min(B, (j + 1) * sub)
                model.prefill(self.ids(model, r1 - r0, P, 3 + j), cache, rows=slice(r0, r1))
            self.sync()
            t_rest = time.monotonic() - t0
            n_tok = (B - sub) * P
            self.add(part="batch_prefill", batch=B, prompt=P, sub_batch=sub, s=t_rest,
                     tok_s=n_tok / t_rest, note=f"sub-batches 2..{n_sub} (the first was warm-up)")
        elif fill == "replicate":
            cache.copy_row_to_all(0)
            self.note(f"batch: only the first {sub} prompts prefilled (all: ~{t_sub * n_sub:.0f} s); every "
                      "sequence got sequence 0's state (decode cost does not depend on the values)")
        self.decode_modes(model, cache, int(cache.pos), "batch_decode",
                          dict(prompt=P, fill=fill))
        cache = None  # free the buffers
        self.free()

    def profile(self, what, fn):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            self.sync()
        log(f"== profile: {what}")
        log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))

    def free(self):
        if self.cuda:
            torch.cuda.empty_cache()


def self_check(args):
    """Tiny config on the device (fp32) against hymba_ref (float64, CPU): prefill rows and
    teacher-forced decode (eager, CUDA graph, compiled), SDPA and flex. Returns a dict."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "tests", "reference"))
    from hymba_ref import HymbaReference, random_state_dict
    from make_goldens import make_config
    dev = torch.device(args.device)
    # head dims as in Hymba-1.5B (q/k 64, v 128), GQA 2:1, windows/meta/kv groups
    cfg = make_config(n_layers=6, hidden=128, n_q=2, n_kv=1, vocab=320, intermediate=160,
                      window=16, global_idx=[0, 3, 5], reuse=[[1, 2]], n_mem=8)
    sd = random_state_dict(cfg, seed=11, dtype=torch.float32)
    T, N = 70, 6
    g = torch.Generator().manual_seed(12)
    seq = torch.randint(3, cfg["vocab_size"], (T + N,), generator=g)
    ref = HymbaReference(cfg, sd).logits(seq.tolist())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    base = "sdpa" if HAS_SDPA else "explicit"
    modes = ["eager"] + ([m for m in args.modes if m != "eager"] if dev.type == "cuda" else [])
    # (impl, dtype, decode modes, tolerance); flex only changes prefill. bf16 runs are
    # compared with a loose tolerance (bf16 rounding, ~2e-2 on the CPU test) and with
    # each other (flex vs sdpa in the same dtype).
    runs = [(base, torch.float32, modes, 1e-4)]
    if dev.type == "cuda":
        runs.append((base, torch.bfloat16, ["eager"], 6e-2))
    if args.flex:
        runs.append(("flex", torch.bfloat16, ["eager"], 6e-2))
    got_by = {}
    for impl, dtype, impl_modes, tol in runs:
        for mode in impl_modes:
            name = f"{impl}/{str(dtype).replace('torch.', '')}/{mode}"
            try:
                m = TorchHymba(cfg, sd, device=dev, dtype=dtype, attn_impl=impl,
                               scan_chunk=16, attn_block=24)
                cache = m.new_cache(batch=1, capacity=T + N + 8)
                pre = m.prefill(seq[None, :T].to(dev), cache, all_logits=True)[0]
                if mode == "eager":
                    step = lambda t: m.decode(t, cache)  # noqa: E731
                else:
                    snap = {k: v.clone() for k, v in cache.named_buffers()}
                    fn = None
                    if mode == "compile":
                        m.compile_decode()
                        fn = lambda t, c: m.decode(t, c, compiled=True)  # noqa: E731
                    step = m.decode_graph(cache, step_fn=fn)
                    for k, v in cache.named_buffers():
                        v.copy_(snap[k])
                rows = [pre]
                for j in range(N):
                    rows.append(step(seq[T + j:T + j + 1].to(dev)).clone())
                got = torch.cat(rows[:1] + [r.view(1, -1) for r in rows[1:]]).double().cpu()
                got_by[name] = got
                r_pre = float((got[:T] - ref[:T]).norm() / ref[:T].norm())
                r_dec = float((got[T:] - ref[T:]).norm() / ref[T:].norm())
                out[name] = {"prefill_rel": r_pre, "decode_rel": r_dec, "tol": tol,
                             "ok": r_pre < tol and r_dec < tol}
                if impl == "flex" and f"{base}/bfloat16/eager" in got_by:
                    o = got_by[f"{base}/bfloat16/eager"]
                    out[name]["rel_vs_" + base] = float((got - o).norm() / o.norm())
            except Exception as e:  # noqa: BLE001
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
            log(f"self-check {name}: {out[name]}")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def preset_config(name):
    """The released Hymba-1.5B config.json (same values; make_goldens.make_config key set)."""
    if name != "1.5b":
        raise SystemExit(f"unknown preset {name!r}")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "tests", "reference"))
    from make_goldens import make_config
    reuse = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
             [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]
    cfg = make_config(n_layers=32, hidden=1600, n_q=25, n_kv=5, vocab=32001, intermediate=5504,
                      window=1024, global_idx=[0, 15, 31], reuse=reuse, n_mem=128, d_state=16,
                      dt_rank=100, d_conv=4, expand=2, dtype="BF16")
    cfg["v_head_dim"] = 128
    return cfg


def parse_list(s):
    return [int(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="HF config.json of the model")
    src.add_argument("--preset", help="built-in config: 1.5b (= the released Hymba-1.5B)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--parts", default="decode,prefill,batch",
                    help="comma list of decode, prefill, batch (default all)")
    ap.add_argument("--modes", default="eager,graph,compile",
                    help="decode modes: eager, graph, compile (default all)")
    ap.add_argument("--decode-ctx", default="1024,8192", help="batch-1 decode contexts")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--flex", default="auto", choices=["auto", "on", "off"],
                    help="also time prefill with flex_attention (auto: when torch has it)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batch-prompt", type=int, default=8192)
    ap.add_argument("--batch-fill", default="auto", choices=["auto", "prefill", "replicate"],
                    help="prefill every prompt of the batch, or prefill one sub-batch and copy "
                         "its state to all rows (auto: prefill if the time budget allows)")
    ap.add_argument("--prefill-batch", type=int, default=4,
                    help="sequences per prefill call when filling the batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scan-chunk", type=int, default=64)
    ap.add_argument("--attn-block", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=230.0,
                    help="seconds for the whole script; parts that would start late are skipped")
    ap.add_argument("--min-part-s", type=float, default=10.0,
                    help="do not start a part/mode with less than this left (default 10)")
    ap.add_argument("--compile-min-s", type=float, default=60.0,
                    help="start a torch.compile mode only with this much budget left")
    ap.add_argument("--self-check", action="store_true",
                    help="first compare a tiny fp32 model on the device with hymba_ref "
                         "(prefill + decode, each attention impl and decode mode)")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: print a torch.profiler table for each prefill and decode mode")
    ap.add_argument("--json-out", help="also write the JSON summary here")
    a = ap.parse_args()
    a.parts = [p for p in a.parts.split(",") if p]
    a.modes = [m for m in a.modes.split(",") if m]
    a.decode_ctx = parse_list(a.decode_ctx)
    if a.flex == "auto":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
            a.flex = a.device.startswith("cuda")
        except ImportError:
            a.flex = False
    else:
        a.flex = a.flex == "on"

    if a.config:
        with open(a.config) as f:
            cfg = json.load(f)
    else:
        cfg = preset_config(a.preset)
    b = Bench(a)
    env = {"torch": torch.__version__, "device": str(b.dev), "dtype": a.dtype,
           "sdpa": HAS_SDPA, "cuda": torch.version.cuda if b.cuda else None}
    if b.cuda:
        if not torch.cuda.is_available():
            sys.exit("--device cuda but torch.cuda.is_available() is False")
        env["gpu"] = torch.cuda.get_device_name(b.dev)
    log(f"torch {env['torch']}  device {env['device']}  gpu {env.get('gpu', '-')}  dtype {a.dtype}")
    torch.manual_seed(a.seed)

    check = None
    if a.self_check:
        with torch.no_grad():
            check = self_check(a)
    t = time.monotonic()
    dtype = DTYPES[a.dtype]
    with torch.no_grad():
        sd = random_weights(cfg, a.seed, b.dev, dtype)
        model = TorchHymba(cfg, sd, device=b.dev, dtype=dtype, scan_chunk=a.scan_chunk,
                           attn_block=a.attn_block)
        del sd
        b.sync()
        n_params = sum(t_.numel() for n, t_ in model.named_buffers() if t_.dtype == dtype)
        env["weights_gb"] = round(n_params * torch.empty((), dtype=dtype).element_size() / 1e9, 3)
        log(f"model built in {time.monotonic() - t:.1f} s ({env['weights_gb']} GB in {a.dtype})")
        for part in a.parts:
            getattr(b, "part_" + part)(model)

    summary = {"env": env, "config": os.path.abspath(a.config) if a.config else "preset " + a.preset,
               "args": {k: v for k, v in vars(a).items() if k != "json_out"},
               "self_check": check, "results": b.results, "notes": b.notes,
               "elapsed_s": round(time.monotonic() - T0, 1)}
    log("")
    log(f"{'part':<14}{'mode/attn':<20}{'batch':>6}{'ctx/len':>8}{'tok/s':>12}{'ms/step':>10}")
    for r in b.results:
        log(f"{r['part']:<14}{r.get('mode', r.get('attn', '-')):<20}{r['batch']:>6}"
            f"{r.get('ctx', r.get('len', r.get('prompt', ''))):>8}{r['tok_s']:>12.1f}"
            f"{r.get('ms_per_step', float('nan')):>10.3f}")
    for n in b.notes:
        log("note: " + n)
    text = json.dumps(summary, indent=1)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
