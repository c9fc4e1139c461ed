#!/usr/bin/python3
"""Generate the golden cases the C++ tests compare against.

Usage: make_goldens.py --out DIR [--only NAME ...]

For each tiny random Hymba config below, writes
  DIR/<case>/config.json          full key set of the released config, adjusted values
  DIR/<case>/model.safetensors    (or model-0000k-of-00002.safetensors + index json)
  DIR/<case>/golden.json          prompts, float64 reference logits, greedy continuations
and DIR/index.json listing the cases. Deterministic: fixed seeds everywhere.

golden.json:
  {"case", "description", "window" (int|null), "num_memory_tokens", "weights_dtype"
   ("F32"|"BF16"|"F16"), "matmul_input_bf16" (bool), "tolerance" (relative:
   ||logits - ref||_2 / ||ref||_2 over all rows of one prompt), "tolerance_note",
   "checkpoint_files", "prompts": [{"input_ids", "logits" ([T][vocab]), "greedy"
   (n new ids, each a fresh full forward + argmax), "greedy_margins" (top1 - top2
   at each greedy step)}]}

Logits are computed in float64 from the weights read back from the written files
(bf16/f16 values convert exactly), with matmul_input_bf16 as recorded (true only for
the BF16 case). Prompt ids are drawn from [3, vocab); a draw whose greedy continuation
has a near-tie (margin < MIN_MARGIN) is replaced by the next draw, so greedy checks
are meaningful. Prompt lengths: 1, 6, 29 and one of 80-100 tokens, several times
window + num_memory_tokens.
"""

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hymba_ref import HymbaDims, HymbaReference, random_state_dict  # noqa: E402
from safetensors_io import (INDEX_NAME, SINGLE_NAME, load_checkpoint,  # noqa: E402
                            save_file, save_sharded)

N_NEW = 16          # greedy continuation length
TOL = 1e-4          # relative logit tolerance for fp32-exact weights
# bf16 weights: the engine rounds every matmul input to bf16. An fp32 engine and this
# float64 reference then round some values that sit near a bf16 rounding boundary
# differently (one bf16 ulp = 2^-8 relative), and those flips propagate through the
# layers. This reference run in float32 with the same rounding differs from the
# float64 goldens by up to ~7e-3 relative (max ~0.15 absolute) on these models, so
# the bf16 case allows 3e-2 instead of 1e-4.
TOL_BF16 = 3e-2
# Greedy steps whose top1 - top2 margin is this small are near-ties that a correct
# engine may legitimately break the other way; prompts are redrawn (deterministically)
# until every greedy step clears the threshold (bf16: a few times the max abs error).
MIN_MARGIN = 0.02
MIN_MARGIN_BF16 = 0.3
MAX_PROMPT_TRIES = 10

_STORAGE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def make_config(n_layers, hidden, n_q, n_kv, vocab, intermediate, window, global_idx,
                reuse, n_mem, d_state=8, dt_rank=8, d_conv=4, expand=2,
                rope_type="ntk", rope_theta=10000.0, tie=True, dtype="F32"):
    """A config with the full key set of the released Hymba-1.5B config.json."""
    d_inner = expand * hidden
    return {
        "architectures": ["HymbaForCausalLM"],
        "attention_dropout": 0.0,
        "attn_hidden_size": -1,
        "attn_implementation": "flex",
        "attn_implementation_new": "flex",
        "auto_map": {
            "AutoConfig": "configuration_hymba.HymbaConfig",
            "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM",
        },
        "bos_token_id": 1,
        "calc_logits_for_entire_prompt": False,
        "conv_dim": {str(i): d_inner for i in range(n_layers)},
        "eos_token_id": 2,
        "global_attn_idx": global_idx,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "kq_head_dim": -1,
        "kq_norm": "none",
        "kv_reuse_every_i_layer": -1,
        "kv_reuse_group": reuse,
        "kv_weight_reuse": False,
        "layer_type": ["h"] * n_layers,
        "mamba_conv_bias": True,
        "mamba_d_conv": d_conv,
        "mamba_d_state": d_state,
        "mamba_dt_rank": dt_rank,
        "mamba_expand": expand,
        "mamba_inner_layernorms": True,
        "mamba_proj_bias": False,
        "max_position_embeddings": 8192,
        "memory_tokens_interspersed_every": 0,
        "mlp_hidden_act": "silu",
        "model_type": "hymba",
        "num_attention_heads": n_q,
        "num_experts": 1,
        "num_experts_per_tok": 1,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv,
        "num_mamba": 1,
        "num_memory_tokens": n_mem,
        "orig_max_position_embeddings": 2048,
        "output_router_logits": False,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope": True,
        "rope_theta": rope_theta,
        "rope_type": rope_type,
        "router_aux_loss_coef": 0.001,
        "seq_length": 8192,
        "sliding_window": window,
        "tie_word_embeddings": tie,
        "torch_dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype],
        "transformers_version": "4.44.0",
        "use_cache": False,
        "use_mamba_kernels": True,
        "v_head_dim": d_inner // n_q,
        "vocab_size": vocab,
    }


# name, description, config kwargs, extra settings. Between them the cases cover:
# GQA/MQA/MHA, kv_reuse groups of 2 and 3 and null, sliding_window null, no meta
# tokens, rope ntk/null/"default", global layers first/middle/last/elsewhere,
# untied head, F32/BF16/F16 weights and a 2-shard checkpoint.
CASES = [
    ("gqa_groups3",
     "GQA 4q/2kv, 8 layers, globals [0,4,7] (first/middle/last), kv_reuse [[1,2,3],[5,6]] "
     "(groups of 3 and 2), window 8, 4 meta tokens, ntk rope, F32",
     dict(n_layers=8, hidden=64, n_q=4, n_kv=2, vocab=320, intermediate=160, window=8,
          global_idx=[0, 4, 7], reuse=[[1, 2, 3], [5, 6]], n_mem=4),
     dict(seed=101)),
    ("mqa_nometa_noreuse",
     "MQA 4q/1kv, 5 layers, global [2] only, kv_reuse null, window 6, no meta tokens, "
     "rope_type null (plain theta), mamba_dt_rank \"auto\" (=3), d_state 16, F32",
     dict(n_layers=5, hidden=48, n_q=4, n_kv=1, vocab=256, intermediate=128, window=6,
          global_idx=[2], reuse=None, n_mem=0, d_state=16, dt_rank="auto", rope_type=None),
     dict(seed=202)),
    ("mha_default_rope",
     "MHA 2q/2kv, 5 layers, globals [1,4], kv_reuse [[2,3]] (layer 0 SWA owns KV), window 5, "
     "3 meta tokens, rope_type \"default\" theta 500, mamba_expand 1, d_conv 3, d_state 4, F32",
     dict(n_layers=5, hidden=32, n_q=2, n_kv=2, vocab=200, intermediate=96, window=5,
          global_idx=[1, 4], reuse=[[2, 3]], n_mem=3, d_state=4, dt_rank=2, d_conv=3,
          expand=1, rope_type="default", rope_theta=500.0),
     dict(seed=303)),
    ("nowindow",
     "sliding_window null (every layer global), GQA 8q/2kv (group 4), 4 layers, kv_reuse null, "
     "5 meta tokens, ntk rope, F32",
     dict(n_layers=4, hidden=64, n_q=8, n_kv=2, vocab=288, intermediate=144, window=None,
          global_idx=[0, 3], reuse=None, n_mem=5),
     dict(seed=404)),
    ("bf16_weights",
     "tiny-a-like layout: GQA 4q/2kv, 6 layers, globals [0,3,5], kv_reuse [[1,2]], window 16, "
     "8 meta tokens; BF16 weights, matmul inputs rounded to bf16",
     dict(n_layers=6, hidden=64, n_q=4, n_kv=2, vocab=320, intermediate=160, window=16,
          global_idx=[0, 3, 5], reuse=[[1, 2]], n_mem=8, dtype="BF16"),
     dict(seed=505)),
    ("f16_weights",
     "GQA 10q/5kv (head dim 8), 4 layers, globals [0,3], kv_reuse [[1,2]], window 4, "
     "2 meta tokens, d_state 16, F16 weights",
     dict(n_layers=4, hidden=80, n_q=10, n_kv=5, vocab=240, intermediate=192, window=4,
          global_idx=[0, 3], reuse=[[1, 2]], n_mem=2, d_state=16, dt_rank=5, dtype="F16"),
     dict(seed=606)),
    ("untied_head",
     "tie_word_embeddings false with a separate lm_head.weight, GQA 6q/3kv, 3 layers, "
     "global [1] (middle), kv_reuse null, window 7, 4 meta tokens, vocab 400, F32",
     dict(n_layers=3, hidden=48, n_q=6, n_kv=3, vocab=400, intermediate=128, window=7,
          global_idx=[1], reuse=None, n_mem=4, tie=False),
     dict(seed=707)),
    ("sharded",
     "2-shard F32 checkpoint + model.safetensors.index.json; GQA 6q/2kv, 7 layers, "
     "globals [3,6], kv_reuse [[0,1,2],[4,5]] (layer 0 is a producer), window 10, 6 meta tokens",
     dict(n_layers=7, hidden=96, n_q=6, n_kv=2, vocab=352, intermediate=224, window=10,
          global_idx=[3, 6], reuse=[[0, 1, 2], [4, 5]], n_mem=6, d_state=16, dt_rank=6),
     dict(seed=808, shards=2)),
]


def prompt_lengths(window, n_mem):
    # Length 1, two short ones, and one much longer than window + meta so an engine's
    # sliding-window ring buffer wraps several times (window null: a long global prompt).
    span = (window or 16) + n_mem
    return [1, 6, 29, min(100, max(80, 6 * span))]


def fmt(x):
    """Shorten floats to 10 significant digits (far below any tolerance, smaller files)."""
    return float(f"{x:.10g}")


def make_case(out_dir, name, desc, ckw, extra):
    dtype = ckw.get("dtype", "F32")
    config = make_config(**ckw)
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    # Remove files of a previous run (e.g. shards) so the directory is exactly this case.
    for f in os.listdir(case_dir):
        if f.endswith(".safetensors") or f in (INDEX_NAME, "config.json", "golden.json"):
            os.remove(os.path.join(case_dir, f))

    with open(os.path.join(case_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    sd = random_state_dict(config, seed=extra["seed"], dtype=_STORAGE[dtype])
    if extra.get("shards"):
        files = save_sharded(sd, case_dir, extra["shards"]) + [INDEX_NAME]
    else:
        save_file(sd, os.path.join(case_dir, SINGLE_NAME), metadata={"format": "pt"})
        files = [SINGLE_NAME]

    # Goldens come from the weights as read back from disk (also checks the writer).
    stored = load_checkpoint(case_dir)
    assert set(stored) == set(sd) and all(torch.equal(stored[k], sd[k]) for k in sd)
    bf16_inputs = dtype == "BF16"
    model = HymbaReference(config, stored, dtype=torch.float64, matmul_input_bf16=bf16_inputs)

    dims = HymbaDims(config)
    rng = random.Random(extra["seed"])
    prompts = []
    min_margin = MIN_MARGIN_BF16 if bf16_inputs else MIN_MARGIN
    for T in prompt_lengths(dims.window, dims.n_mem):
        best = None
        for _ in range(MAX_PROMPT_TRIES):
            ids = [rng.randrange(3, dims.vocab) for _ in range(T)]  # avoid unk/bos/eos ids
            tokens, margins = model.greedy_with_margins(ids, N_NEW, stop_below=min_margin)
            if best is None or min(margins) > min(best[2]):
                best = (ids, tokens, margins)
            if len(tokens) == N_NEW:
                break   # every step cleared the threshold
        ids, tokens, margins = best
        if len(tokens) < N_NEW:   # no draw passed: keep the best one, fully decoded
            tokens, margins = model.greedy_with_margins(ids, N_NEW)
        prompts.append({
            "input_ids": ids,
            "logits": [[fmt(v) for v in row] for row in model.logits(ids).tolist()],
            "greedy": tokens,
            "greedy_margins": [fmt(m) for m in margins],
        })

    golden = {
        "case": name,
        "description": desc,
        "window": dims.window,
        "num_memory_tokens": dims.n_mem,
        "weights_dtype": dtype,
        "matmul_input_bf16": bf16_inputs,
        "tolerance": TOL_BF16 if bf16_inputs else TOL,
        "tolerance_note": ("relative: ||logits - ref||_2 / ||ref||_2 over all rows of a prompt"
                           + ("; looser because bf16 rounding of matmul inputs can flip by one"
                              " bf16 ulp between an fp32 engine and this float64 reference"
                              if bf16_inputs else "")),
        "checkpoint_files": files,
        "prompts": prompts,
    }
    with open(os.path.join(case_dir, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    min_margin = min(min(p["greedy_margins"]) for p in prompts)
    return {"name": name, "description": desc, "weights_dtype": dtype,
            "sharded": bool(extra.get("shards")), "min_greedy_margin": min_margin}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--only", nargs="*", help="generate only these cases (index lists them only)")
    args = ap.parse_args()
    # One thread: these matmuls are tiny, and extra OpenMP threads only slow the run
    # down (several-fold when other jobs share the CPU). Results do not depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    entries = []
    t_all = time.time()
    for name, desc, ckw, extra in CASES:
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        entries.append(make_case(args.out, name, desc, ckw, extra))
        print(f"{name:>20}: {time.time() - t0:5.1f} s, min greedy margin "
              f"{entries[-1]['min_greedy_margin']:.3f}", flush=True)
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump({"format": "hymba-reference-goldens-v1",
                   "generator": "tests/reference/make_goldens.py",
                   "cases": entries}, f, indent=2)
        f.write("\n")
    print(f"wrote {len(entries)} cases to {args.out} in {time.time() - t_all:.1f} s")


if __name__ == "__main__":
    main()
