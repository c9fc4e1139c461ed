#!/usr/bin/env python3
"""Trains the embedded Hymba model, evaluates it the way `hymba perplexity` does,
and exports it in the HF layout.

  python3 train/train.py --data train/data --out OUT [--steps N] [--time-budget S]
  python3 train/train.py --bench --data train/data      # throughput of scan/batch choices
  python3 train/train.py --tiny --steps 3 ...           # CPU smoke test of the whole path

Model: train/hymba_model.py (batched twin of tests/reference/hymba_ref.py, checked
against it at start-up). Data: the token arrays of train/prepare_data.sh.

Held-out evaluation (= `hymba perplexity -m DIR -f FILE --ctx N --stride S`):
tokens x_0..x_{n-1} = BOS + SentencePiece(file text). Windows start at
0, S, 2S, ...; window [b, e) with e = min(b + N, n) runs as a fresh sequence
(meta tokens + x_b..x_{e-1}) and scores x_t for t in [max(prev_e, b + 1), e),
where prev_e is the previous window's end; the last window is the first with
e = n. Every token but x_0 is scored exactly once; the loss is the mean of
-log p(x_t | window prefix) and the perplexity exp(loss). The weights are the
exported bf16 ones and every linear input and the K/V are rounded to bf16, as
the engine computes with bf16 weights.

Writes to OUT: model.safetensors (bf16), config.json, tokenizer.model,
tokenizer_config.json, eval.json, train_log.txt.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
from hymba_model import HymbaLM, check_against_reference, init_state_dict, scan_chunked  # noqa: E402
from make_goldens import make_config  # noqa: E402
from safetensors_io import save_file  # noqa: E402

LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def model_config(tiny=False):
    if tiny:  # CPU smoke tests only
        return make_config(6, 64, 4, 2, 4096, 160, 16, [0, 5], [[1, 2], [3, 4]], 8,
                           d_state=16, dt_rank=4, dtype="BF16")
    # 6 layers: 0 and 5 global, 1-4 sliding (window 128) sharing K/V in pairs.
    cfg = make_config(6, 256, 4, 2, 4096, 640, 128, [0, 5], [[1, 2], [3, 4]], 32,
                      d_state=16, dt_rank=16, dtype="BF16")
    return cfg


# ---------------------------------------------------------------------------
# Evaluation: sliding-window perplexity, the engine's definition
# ---------------------------------------------------------------------------

def windows(n, ctx, stride):
    """[(begin, end, first_scored)] as documented above."""
    out, prev_end, b = [], 0, 0
    while True:
        e = min(b + ctx, n)
        out.append((b, e, max(prev_end, b + 1)))
        if e == n:
            return out
        prev_end = e
        b += stride


@torch.no_grad()
def sliding_nll(model, ids, ctx, stride, device, batch=16):
    """(mean NLL, scored tokens) over ids (a 1-D int array incl. BOS)."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    wins = windows(len(ids), ctx, stride)
    total, count = 0.0, 0
    # group windows of equal length into batches
    by_len = {}
    for w in wins:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for L, ws in by_len.items():
        for i in range(0, len(ws), batch):
            chunk = ws[i:i + batch]
            x = torch.stack([ids_t[b:e] for b, e, _ in chunk])
            logits = model(x, dtype=torch.float32).double()
            logp = torch.log_softmax(logits, dim=-1)
            for j, (b, e, s) in enumerate(chunk):
                # row r predicts token b + r + 1
                rows = torch.arange(s - b - 1, e - b - 1, device=device)
                tgt = ids_t[b + 1 + rows]
                total -= float(logp[j, rows, tgt].sum())
                count += len(rows)
    assert count == len(ids) - 1
    return total / count, count


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def batches(data, batch, seq, gen, device):
    n = len(data) - seq - 1
    while True:
        off = torch.randint(0, n, (batch,), generator=gen)
        x = np.stack([data[o:o + seq + 1] for o in off.tolist()]).astype(np.int64)
        t = torch.from_numpy(x).to(device, non_blocking=True)
        yield t[:, :-1], t[:, 1:]


def lr_at(step, steps, peak, warmup, time_frac=0.0):
    """Linear warm-up, then cosine to 10 % over max(step fraction, time fraction)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, max((step - warmup) / max(1, steps - warmup), time_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr, wd, device):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim == 2 and "memory_tokens" not in n else no_decay).append(p)
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}], **kw)


def train_step(model, opt, x, y, amp, accum=1):
    total = 0.0
    for xa, ya in zip(x.chunk(accum), y.chunk(accum)):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xa).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ya.reshape(-1)) / accum
        loss.backward()
        total = total + loss.detach()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, gn


@torch.no_grad()
def quick_valid(model, data, seq, device, amp, n_batches=4, batch=32):
    """Mean loss on fixed valid windows (cheap progress metric, bf16 autocast)."""
    g = torch.Generator().manual_seed(1234)
    it = batches(data, batch, seq, g, device)
    tot = 0.0
    for _ in range(n_batches):
        x, y = next(it)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return tot / n_batches


@torch.no_grad()
def greedy(model, prompt_ids, n, device):
    seq = list(prompt_ids)
    for _ in range(n):
        logits = model(torch.tensor([seq], device=device), dtype=torch.float32)[0, -1]
        seq.append(int(torch.argmax(logits)))
    return seq[len(prompt_ids):]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--time-budget", type=float, default=400.0, help="hard stop for the training loop (s)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--scan", default="chunked", choices=["chunked", "sequential"])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile the chunked scan (falls back to eager)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--bench-configs", default="chunked:16,chunked:32,chunked:64,sequential:32,sequential:96")
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate only the first N held-out tokens (smoke)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    t_start = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    amp = device.type == "cuda"
    log(f"torch {torch.__version__} device {device}"
        + (f" ({torch.cuda.get_device_name()})" if amp else "") + f" args {vars(args)}")

    # 0. the batched model computes the reference's function
    from make_goldens import make_config as mc
    small = mc(4, 32, 4, 2, 97, 48, 8, [0, 3], [[1, 2]], 6, d_state=8, dt_rank=4)
    err = check_against_reference(small, T=30)
    log(f"selftest vs tests/reference/hymba_ref.py (float64, both scans): max |dlogit| = {err:.2e}")
    assert err < 1e-9

    cfg = model_config(args.tiny)
    train_ids = np.load(os.path.join(args.data, "train.ids.npy"))
    valid_ids = np.load(os.path.join(args.data, "valid.ids.npy"))
    sample_ids = np.load(os.path.join(args.data, "valid_sample.ids.npy"))
    if args.eval_limit:
        valid_ids = valid_ids[:args.eval_limit]
    sd = init_state_dict(cfg, args.seed)
    model = HymbaLM(cfg, sd).to(device)
    model.scan, model.chunk = args.scan, args.chunk
    n_params = sum(p.numel() for p in model.parameters())
    log(f"config: {json.dumps({k: cfg[k] for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'intermediate_size', 'vocab_size', 'sliding_window', 'global_attn_idx', 'kv_reuse_group', 'num_memory_tokens', 'mamba_d_state', 'mamba_dt_rank')})}")
    log(f"parameters: {n_params:,} ({2 * n_params / 1e6:.1f} MB in bf16); train tokens {len(train_ids):,}, "
        f"valid tokens {len(valid_ids):,}")
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.bench:
        for spec in args.bench_configs.split(","):
            scan, batch = spec.split(":")[0], int(spec.split(":")[1])
            model.scan = scan
            opt = make_optimizer(model, 1e-4, 0.0, device)
            it = batches(train_ids, batch, args.seq, torch.Generator().manual_seed(0), device)
            try:
                for i in range(6):
                    if i == 2:
                        if amp:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        t0 = time.time()
                    x, y = next(it)
                    loss, _ = train_step(model, opt, x, y, amp)
                float(loss)
                dt = (time.time() - t0) / 4
                mem = torch.cuda.max_memory_allocated() / 2**30 if amp else 0
                log(f"bench scan={scan:10s} batch={batch:3d}: {dt * 1e3:7.1f} ms/step, "
                    f"{batch * args.seq / dt / 1e3:7.1f} k tok/s, peak {mem:.1f} GiB")
            except torch.cuda.OutOfMemoryError:
                log(f"bench scan={scan} batch={batch}: out of memory")
            del opt
            if amp:
                torch.cuda.empty_cache()
        model.scan = args.scan
        if not args.out:
            return

    # 1. train
    opt = make_optimizer(model, args.lr, args.wd, device)
    it = batches(train_ids, args.batch, args.seq, torch.Generator().manual_seed(args.seed), device)
    best = (float("inf"), -1, None)
    t0 = time.time()
    step, ema = 0, None
    hist = []
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, (time.time() - t0) / args.time_budget)
        x, y = next(it)
        if step == 0 and args.compile:
            try:
                model.scan_fn = torch.compile(scan_chunked)
                tc = time.time()
                loss, gn = train_step(model, opt, x, y, amp, args.accum)
                float(loss)
                log(f"torch.compile of the chunked scan: first step {time.time() - tc:.1f}s")
            except Exception as e:  # noqa: BLE001
                log(f"torch.compile unavailable ({type(e).__name__}: {str(e)[:200]}); eager scan")
                model.scan_fn = None
                opt.zero_grad(set_to_none=True)
                loss, gn = train_step(model, opt, x, y, amp, args.accum)
        else:
            loss, gn = train_step(model, opt, x, y, amp, args.accum)
        step += 1
        if step % 25 == 0 or step == args.steps:
            lv = float(loss)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            el = time.time() - t0
            log(f"step {step:5d} loss {lv:.4f} (ema {ema:.4f}) gnorm {float(gn):.2f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step * args.batch * args.seq / el / 1e3:.1f} k tok/s {el:.0f}s")
        stop = time.time() - t0 > args.time_budget
        if step % args.eval_every == 0 or step == args.steps or stop:
            fn, model.scan_fn = model.scan_fn, None  # eager for other shapes (no recompiles)
            vl = quick_valid(model, valid_ids, args.seq, device, amp, n_batches=2)
            model.scan_fn = fn
            hist.append((step, vl))
            log(f"  valid loss (bf16 autocast, fixed windows) {vl:.4f} at step {step}")
            if vl < best[0]:
                best = (vl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if stop:
            log(f"time budget reached at step {step}")
            break
    train_time = time.time() - t0
    tokens_seen = step * args.batch * args.seq
    log(f"trained {step} steps, {tokens_seen:,} tokens ({tokens_seen / len(train_ids):.1f} epochs) in "
        f"{train_time:.0f}s; best quick-valid {best[0]:.4f} at step {best[1]}")
    model.load_state_dict(best[2])
    model.scan_fn = None

    # 2. export bf16 and evaluate exactly those weights with the engine's numerics
    export = {n: t.detach().float().cpu().to(torch.bfloat16).contiguous() for n, t in model.hf_state_dict().items()}
    emodel = HymbaLM(cfg, {n: t.float() for n, t in export.items()}).to(device)
    emodel.emulate_bf16, emodel.scan, emodel.chunk = True, args.scan, args.chunk
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    te = time.time()
    v_nll, v_n = sliding_nll(emodel, valid_ids, args.ctx, args.stride, device)
    s_nll, s_n = sliding_nll(emodel, sample_ids, args.ctx, args.stride, device)
    s2_nll, _ = sliding_nll(emodel, sample_ids, 128, 64, device)
    tr_slice = train_ids[:len(valid_ids)]
    t_nll, _ = sliding_nll(emodel, tr_slice, args.ctx, args.stride, device)
    log(f"held-out (valid.txt, ctx {args.ctx} stride {args.stride}): loss {v_nll:.6f} ppl {math.exp(v_nll):.4f} "
        f"over {v_n} tokens; train-split slice of equal size: loss {t_nll:.6f}; "
        f"valid_sample.txt: loss {s_nll:.6f} ppl {math.exp(s_nll):.4f} (ctx 128 stride 64: {math.exp(s2_nll):.4f}) "
        f"[{time.time() - te:.0f}s]")

    # 3. samples (greedy, engine numerics)
    samples = {}
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(args.data, "tokenizer.model"))
        for p in ("And God said", "The meaning of life is", "A programmer is", "In the beginning"):
            ids = [1] + sp.encode(p)
            out = greedy(emodel, ids, 24 if args.tiny else 60, device)
            samples[p] = {"prompt_ids": ids, "greedy_ids": out, "text": sp.decode(out)}
            log(f"sample {p!r} -> {sp.decode(out)!r}")
    except Exception as e:  # noqa: BLE001
        log(f"samples skipped: {e}")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        save_file(export, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        for name in ("tokenizer.model",):
            shutil.copy(os.path.join(args.data, name), os.path.join(args.out, name))
        shutil.copy(os.path.join(HERE, "tokenizer_config.json"), os.path.join(args.out, "tokenizer_config.json"))
        ev = {
            "definition": "hymba perplexity: BOS + SentencePiece(file); windows of ctx tokens every stride "
                          "tokens, each a fresh sequence, scoring the tokens not scored before; bf16 weights, "
                          "bf16-rounded linear inputs and K/V",
            "heldout": {"file": "valid.txt", "ctx": args.ctx, "stride": args.stride, "tokens_scored": v_n,
                        "loss": v_nll, "perplexity": math.exp(v_nll)},
            "heldout_sample": {"file": "valid_sample.txt", "ctx": args.ctx, "stride": args.stride,
                               "tokens_scored": s_n, "loss": s_nll, "perplexity": math.exp(s_nll)},
            "heldout_sample_ctx128": {"file": "valid_sample.txt", "ctx": 128, "stride": 64,
                                      "loss": s2_nll, "perplexity": math.exp(s2_nll)},
            "train_slice_loss": t_nll,
            "training": {"steps": step, "batch": args.batch, "seq": args.seq, "tokens_seen": tokens_seen,
                         "train_time_s": train_time, "final_train_loss_ema": ema, "best_step": best[1],
                         "quick_valid_history": hist, "args": vars(args), "parameters": n_params,
                         "device": torch.cuda.get_device_name() if amp else "cpu", "torch": torch.__version__},
            "samples": samples,
        }
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(ev, f, indent=1)
        log(f"total wall time {time.time() - t_start:.0f}s; wrote {args.out}")
        with open(os.path.join(args.out, "train_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
