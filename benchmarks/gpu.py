"""Training speed on a GPU: the paper's base model in bf16 against the GPU's measured bf16 matmul peak, and
the time to train it on WMT14 as the paper did, extrapolated from the measured step.

    python benchmarks/gpu.py                     # base, bf16 autocast, ~25k target tokens per batch
    python benchmarks/gpu.py --compile           # also the model under torch.compile
    python benchmarks/gpu.py --device cpu --config small --shape 16 12 12 --repeats 2 --json   # a dry run

The step is our trainer's (benchmarks/peers.py): projected label-smoothed loss, fused Adam, bf16 autocast,
vocabulary 37,000 as the paper's shared BPE. Its matmul FLOPs (peers.step_flops) over the median step time
give the achieved rate; the peak is the fastest of several square bf16 products on the same device. The
paper trained base for 100,000 steps of ~25,000 target tokens each (12 hours on 8 P100s): the extrapolation
is those tokens at the measured rate on this one GPU, and on 8 of it with perfect scaling. It is a lower
bound on the time: the batch is random, unpadded and of one shape, where real batches carry some padding
(7 % in Multi30k's) and vary in shape, and no time goes to reading data, validating or saving.

Prints JSON and, without --json, updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers

PAPER_STEPS = 100_000
PAPER_TARGET_TOKENS_PER_STEP = 25_000
PAPER_VOCAB = 37_000


def extrapolate(tokens_per_s: float) -> dict[str, float]:
    """Hours for the paper's base training (100k steps × ~25k target tokens) at `tokens_per_s`."""
    hours = PAPER_STEPS * PAPER_TARGET_TOKENS_PER_STEP / tokens_per_s / 3600
    return {"one_gpu_hours": round(hours, 1), "eight_gpus_hours_perfect_scaling": round(hours / 8, 2)}


def measure(
    config_name: str,
    device: torch.device,
    shape: tuple[int, int, int],
    repeats: int,
    compile_model: bool = False,
    peak_n: int = 8192,
    vocab: int = PAPER_VOCAB,
    warmup: int = 3,
) -> dict[str, Any]:
    """Step time, target tokens/s, achieved GFLOP/s, fraction of the bf16 peak, peak memory, and the WMT14
    extrapolation, for ours (and ours under torch.compile). `vocab` and `warmup` shrink the dry run the
    tests make on the CPU."""
    config = dataclasses.replace(peers.config_for(config_name), src_vocab_size=vocab, tgt_vocab_size=vocab)
    batch, src_len, tgt_len = shape
    src, tgt = (t.to(device) for t in peers.random_batch(batch, src_len, tgt_len))
    tokens = batch * tgt_len  # no padding: every target position is predicted
    flops = peers.step_flops(config, batch, src_len + 1, tgt_len)  # the source ends with EOS
    peak = common.matmul_peak_gflops(torch.bfloat16, peak_n, repeats=10, device=device)
    rows = {}
    variants = ["ours", *(["ours, torch.compile"] if compile_model else [])]
    for variant in variants:
        torch.manual_seed(0)
        model = peers.ours(config).to(device)
        if variant == "ours, torch.compile":
            model = torch.compile(model)
        step = peers.training_step(model, [(src, tgt)], bf16=True, fused_adam=True, projected=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = common.synchronised(step, device)
        times = common.time_interleaved({variant: timed}, repeats, warmup=warmup)[variant]
        seconds = common.median(times)
        gflops = flops / seconds / 1e9
        rows[variant] = {
            "s_per_step": round(seconds, 4),
            "all_s": [round(t, 4) for t in times],
            "tgt_tokens_per_s": round(tokens / seconds),
            "gflops": round(gflops, 1),
            "fraction_of_bf16_peak": round(gflops / peak, 3),
            "peak_memory_mb": (
                round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None
            ),
            "wmt14_base": extrapolate(tokens / seconds),
        }
        del model, step, timed  # free the device memory before the next variant
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.machine_info()["cpu"]
    return {
        "device": name,
        "bf16_matmul_peak_gflops": round(peak, 1),
        "batch": {"sentences": batch, "source_tokens": src_len + 1, "target_tokens": tgt_len},
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", default="base", choices=["small", "base"])
    parser.add_argument("--shape", type=int, nargs=3, default=[780, 31, 32], metavar=("BATCH", "SRC", "TGT"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-n", type=int, default=8192, help="size of the square products for the peak")
    parser.add_argument("--compile", action="store_true", help="also the model under torch.compile")
    parser.add_argument("--json", action="store_true", help="print JSON only; leave RESULTS.md alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this benchmark is for a GPU (--device cpu makes a dry run)")
    measured = measure(args.config, device, tuple(args.shape), args.repeats, args.compile, args.peak_n)
    result = {"machine": common.machine_info(), args.config: measured}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = [
        {
            "model": variant,
            "s/step": row["s_per_step"],
            "target tok/s": row["tgt_tokens_per_s"],
            "GFLOP/s": row["gflops"],
            "of bf16 peak": row["fraction_of_bf16_peak"],
            "peak memory (MB)": row["peak_memory_mb"],
            "WMT14 base, 1 GPU (h)": row["wmt14_base"]["one_gpu_hours"],
            "8 GPUs, perfect scaling (h)": row["wmt14_base"]["eight_gpus_hours_perfect_scaling"],
        }
        for variant, row in measured["variants"].items()
    ]
    b = measured["batch"]
    body = (
        f"{measured['device']}; bf16 matmul peak measured in the run: {measured['bf16_matmul_peak_gflops']} "
        f"GFLOP/s. **{args.config}**, bf16 autocast, vocabulary {PAPER_VOCAB}, batch {b['sentences']} × "
        f"{b['source_tokens']} source / {b['target_tokens']} target tokens. WMT14: the paper's "
        f"{PAPER_STEPS:,} steps × {PAPER_TARGET_TOKENS_PER_STEP:,} target tokens at the measured rate.\n\n"
        + common.markdown_table(table)
    )
    common.report(f"GPU training step: {args.config}", result, body)


if __name__ == "__main__":
    main()
