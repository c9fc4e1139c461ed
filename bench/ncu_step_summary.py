#!/usr/bin/env python3
"""Where one decode step's (or the prompt's) GPU time goes, from an Nsight Compute CSV.

Reads the CSV that `ncu --csv --print-units base --metrics
gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size` writes over a
`hymba bench` run (bench/gpu_bench.sh, PARTS=ncu), takes the kernels of the
last complete decode step (those after the second-to-last token sampling
kernel, up to and including the last one) and prints them grouped by kernel
name: total time, launches and the DRAM read rate, then the step's first
kernels in order. With --prefill it takes the timed prompt instead: from the
last embedding gather before the first sampling kernel up to that kernel
(the meta-token prefix computed at load comes earlier and is left out).
Kernels are timed in isolation (ncu serialises them), so the sum is an upper
bound on the time with overlap.

Usage: python3 bench/ncu_step_summary.py NCU_CSV [--first N] [--prefill]
"""
import argparse
import csv
import sys
from collections import OrderedDict, defaultdict

TIME = "gpu__time_duration.sum"
DRAM = "dram__bytes_read.sum"
SAMPLE_KERNEL = "sample"  # the token sampling kernel ends every decode step
EMBED_KERNEL = "embed_rows"  # the embedding gather starts the prompt and every step


def number(text):
    return float(text.replace(",", "")) if text else 0.0


def read_kernels(path):
    """Kernel id -> {name, grid, metric: value}, in launch order."""
    with open(path, newline="") as f:
        rows = [line for line in f if line.startswith('"')]  # ncu's own log lines are not quoted
    if not rows:
        raise SystemExit(f"{path}: no CSV rows (did ncu profile anything?)")
    reader = csv.DictReader(rows)
    need = {"ID", "Kernel Name", "Grid Size", "Metric Name", "Metric Value"}
    if not need.issubset(reader.fieldnames or []):
        raise SystemExit(f"{path}: not an ncu --csv metrics file (columns {reader.fieldnames})")
    kernels = OrderedDict()
    for r in reader:
        k = kernels.setdefault(int(r["ID"]), {"name": r["Kernel Name"], "grid": r["Grid Size"]})
        k[r["Metric Name"]] = number(r["Metric Value"])
    return kernels


def last_step(kernels):
    ids = list(kernels)
    ends = [i for i in ids if SAMPLE_KERNEL in kernels[i]["name"]]
    if len(ends) < 2:
        raise SystemExit(f"found {len(ends)} sampling kernels: need a run of at least 2 decode steps")
    return [i for i in ids if ends[-2] < i <= ends[-1]]


def prompt_kernels(kernels):
    ids = list(kernels)
    first_sample = next((i for i in ids if SAMPLE_KERNEL in kernels[i]["name"]), None)
    if first_sample is None:
        raise SystemExit("no sampling kernel: the run did not finish its prompt under ncu")
    starts = [i for i in ids if i < first_sample and EMBED_KERNEL in kernels[i]["name"]]
    if not starts:
        raise SystemExit("no embedding kernel before the first sampling kernel")
    return [i for i in ids if starts[-1] <= i <= first_sample]


def short(name, width=80):
    return name.split("(")[0][:width]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--first", type=int, default=40, help="kernels of the step to list in order")
    ap.add_argument("--prefill", action="store_true", help="the timed prompt instead of the last decode step")
    args = ap.parse_args()
    kernels = read_kernels(args.csv)
    step = prompt_kernels(kernels) if args.prefill else last_step(kernels)
    total = sum(kernels[i].get(TIME, 0.0) for i in step)
    what = "the prompt" if args.prefill else "the last decode step"
    print(f"{len(kernels)} kernels profiled; {what}: {len(step)} kernels, {total / 1e3:.1f} us")
    groups = defaultdict(lambda: [0, 0.0, 0.0])
    for i in step:
        g = groups[short(kernels[i]["name"])]
        g[0] += 1
        g[1] += kernels[i].get(TIME, 0.0)
        g[2] += kernels[i].get(DRAM, 0.0)
    print(f"{'us':>9} {'share':>6} {'calls':>5} {'GB/s':>8}  kernel")
    for name, (calls, t, b) in sorted(groups.items(), key=lambda x: -x[1][1]):
        rate = b / t if t > 0 else 0.0  # bytes per ns = GB/s
        print(f"{t / 1e3:9.1f} {100 * t / total if total else 0:5.1f}% {calls:5d} {rate:8.1f}  {name}")
    print(f"--- {what}: its first {min(args.first, len(step))} kernels")
    for i in step[: args.first]:
        k = kernels[i]
        print(f"{k.get(TIME, 0.0) / 1e3:9.1f} us {k.get(DRAM, 0.0) / 1e6:9.2f} MB  grid {k['grid']:>14}  {short(k['name'], 70)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
