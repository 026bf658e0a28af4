"""Training speed on a GPU: the paper's base model in bf16 against the GPU's measured bf16 matmul peak, and
the time to train it on WMT14 as the paper did, extrapolated from the measured step.

    python benchmarks/gpu.py                     # base, bf16 autocast, ~25k target tokens per batch
    python benchmarks/gpu.py --peers --profile   # also nn.Transformer and MarianMTModel; where ours spends it
    python benchmarks/gpu.py --compile           # also the model under torch.compile, without and with
                                                 # CUDA graphs
    python benchmarks/gpu.py --variants ours "ours, eager loss" "ours, cuDNN attention" "ours, as at 6c532e0"
    python benchmarks/gpu.py --device cpu --config small --shape 16 12 12 --repeats 2 --json   # a dry run

The step is our trainer's (benchmarks/peers.py): projected label-smoothed loss, fused Adam, bf16 autocast,
vocabulary 37,000 as the paper's shared BPE. The peers (`torch.nn.Transformer`, `MarianMTModel` with random
weights) take the step as their users would write it: F.cross_entropy over all logits, fused Adam, bf16
autocast, and torch's choice of attention kernels. Variants of ours change one choice each (`VARIANTS`).
Every variant is built and warmed up, then all take steps in turns. The step's matmul FLOPs
(peers.step_flops) over the median step time give the achieved rate; the peak is the fastest of several
square bf16 products on the same device. --profile adds, for each, the GPU's busy time, its kernels' time
by kind and its costliest kernels (`profile_step`); RESULTS.md shows ours's.

The paper trained base for 100,000 steps of ~25,000 target tokens each (12 hours on 8 P100s): the
extrapolation is those tokens at the measured rate on this one GPU, and on 8 of it with perfect scaling. It
is a lower bound on the time: the batch is random, unpadded and of one shape, where real batches carry some
padding (7 % in Multi30k's) and vary in shape, and no time goes to reading data, validating or saving.

Prints JSON and, without --json, updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers
from transformer.config import TransformerConfig
from transformer.loss import label_smoothed_loss

PAPER_STEPS = 100_000
PAPER_TARGET_TOKENS_PER_STEP = 25_000
PAPER_VOCAB = 37_000


def extrapolate(tokens_per_s: float) -> dict[str, float]:
    """Hours for the paper's base training (100k steps × ~25k target tokens) at `tokens_per_s`."""
    hours = PAPER_STEPS * PAPER_TARGET_TOKENS_PER_STEP / tokens_per_s / 3600
    return {"one_gpu_hours": round(hours, 1), "eight_gpus_hours_perfect_scaling": round(hours / 8, 2)}


ALL_SDPA = ("CUDNN_ATTENTION", *peers.OURS_SDPA)  # torch's default set


def _variant(build: Callable[[TransformerConfig], torch.nn.Module | None], **choices: Any) -> peers.Variant:
    """A row of this benchmark: bf16 autocast, and for ours the attention kernels our trainer allows."""
    return peers.Variant(build, bf16=True, **{"sdpa": peers.OURS_SDPA, **choices})


def _eager_loss() -> peers.LossFn:
    """Our loss as CPUs compute it (its gradient written out, loss.label_smoothed_loss), every position
    projected as on CUDA."""
    return lambda hidden, projection, target, smoothing: label_smoothed_loss(
        projection(hidden), target, smoothing, compiled=False
    )


VARIANTS: dict[str, peers.Variant] = {
    "ours": _variant(peers.ours),
    "ours, torch.compile": _variant(peers.ours, compile=True),
    # compiled, and its kernels replayed as CUDA graphs (this benchmark's batch keeps one shape): the step
    # without the host's kernel launches, which kept the GPU waiting for a quarter of it
    "ours, torch.compile, CUDA graphs": _variant(peers.ours, compile="reduce-overhead"),
    "ours, fused QKV": _variant(lambda c: peers.ours(c, fuse_qkv=True)),
    "ours, unfused QKV": _variant(lambda c: peers.ours(c, fuse_qkv=False)),
    "ours, explicit attention": _variant(lambda c: peers.ours(dataclasses.replace(c, attention="explicit"))),
    "ours, nn.Dropout": _variant(lambda c: peers.ours(c, torch_dropout=True)),
    "ours, F.cross_entropy": _variant(peers.ours, projected=False),  # every logit, no row selection
    "ours, eager loss": _variant(peers.ours, loss=_eager_loss),
    "ours, fp32 LayerNorm output": _variant(lambda c: peers.ours(c, norms_in_autocast_dtype=False)),
    "ours, as at 6c532e0": _variant(  # before the three choices above: eager loss, fp32 norms, cuDNN
        lambda c: peers.ours(c, norms_in_autocast_dtype=False), loss=_eager_loss, sdpa=ALL_SDPA
    ),
    "ours, no padding masks": _variant(lambda c: peers.ours(c, padding_masks=False)),
    # what a trainer that lets the host run ahead of the GPU would gain: four steps, then one wait
    "ours, 4 steps per wait": _variant(peers.ours, steps_per_call=4),
    "ours, cuDNN attention": _variant(peers.ours, sdpa=ALL_SDPA),  # torch's default: cuDNN first on Hopper
    # flash's backward at 32 causal positions took 2.4 ms for 6 calls, memory-efficient 2.1 ms for 12
    "ours, no flash attention": _variant(peers.ours, sdpa=("EFFICIENT_ATTENTION", "MATH")),
    "nn.Transformer": _variant(peers.TorchPeer, projected=False, sdpa=()),  # torch's defaults
    "MarianMTModel": _variant(peers.marian_logits, projected=False, sdpa=()),
}
PEERS = ("nn.Transformer", "MarianMTModel")


def measure(
    config_name: str,
    device: torch.device,
    shape: tuple[int, int, int],
    repeats: int,
    variants: Sequence[str] = ("ours",),
    peak_n: int = 8192,
    vocab: int = PAPER_VOCAB,
    warmup: int = 3,
    profile: bool = False,
) -> dict[str, Any]:
    """Step time, target tokens/s, achieved GFLOP/s, fraction of the bf16 peak, peak memory, and the WMT14
    extrapolation, for each of `variants` (VARIANTS' names), and with `profile` where ours spends the step
    on the device. The same FLOPs are counted for every model: they compute the same function. `vocab` and
    `warmup` shrink the dry run the tests make on the CPU."""
    config = dataclasses.replace(peers.config_for(config_name), src_vocab_size=vocab, tgt_vocab_size=vocab)
    batch, src_len, tgt_len = shape
    src, tgt = (t.to(device) for t in peers.random_batch(batch, src_len, tgt_len))
    tokens = batch * tgt_len  # no padding: every target position is predicted
    flops = peers.step_flops(config, batch, src_len + 1, tgt_len)  # the source ends with EOS
    peak = common.matmul_peak_gflops(torch.bfloat16, peak_n, repeats=10, device=device)
    rows: dict[str, dict[str, Any]] = {}
    steps = {}
    for name in variants:  # built and warmed up one after the other, then timed in turns
        try:
            built = _prepare(VARIANTS[name], config, device, (src, tgt), warmup)
        except Exception as error:  # one variant's failure (a kernel this GPU lacks) leaves the others
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        if built is not None:  # else MarianMTModel without `transformers`
            steps[name], rows[name] = built
    times = common.time_interleaved(steps, repeats, warmup=0)
    for name, step in steps.items():
        per_call = VARIANTS[name].steps_per_call
        per_step = [t / per_call for t in times[name]]
        seconds = common.median(per_step)
        gflops = flops / seconds / 1e9
        rows[name].update(
            s_per_step=round(seconds, 4),
            all_s=[round(t, 4) for t in per_step],
            tgt_tokens_per_s=round(tokens / seconds),
            gflops=round(gflops, 1),
            fraction_of_bf16_peak=round(gflops / peak, 3),
            wmt14_base=extrapolate(tokens / seconds),
        )
        if profile and device.type == "cuda" and per_call == 1:  # its figures are per call
            rows[name]["profile"] = profile_step(step, flops, peak)
    rows = {name: rows[name] for name in variants if name in rows}  # in the order asked for
    if "s_per_step" in rows.get("ours", {}):
        ours = [t / VARIANTS["ours"].steps_per_call for t in times["ours"]]
        for variant, row in rows.items():
            if variant != "ours" and "s_per_step" in row:  # > 1: ours takes less time per step
                theirs = [t / VARIANTS[variant].steps_per_call for t in times[variant]]
                row["ours_speedup"] = common.paired_speedup(ours, theirs)  # per round, as everywhere else
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.machine_info()["cpu"]
    return {
        "device": name,
        "bf16_matmul_peak_gflops": round(peak, 1),
        "batch": {"sentences": batch, "source_tokens": src_len + 1, "target_tokens": tgt_len},
        "variants": rows,
    }


def _prepare(
    variant: peers.Variant,
    config: TransformerConfig,
    device: torch.device,
    batch: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
) -> tuple[Callable[[], None], dict[str, Any]] | None:
    """A variant's (synchronised) step after `warmup` calls, and the memory those calls took at their
    peak beyond what was allocated before the model was built (the other variants' models stay)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    step = variant.step(config, [batch], device)
    if step is None:
        return None
    step = common.synchronised(step, device)
    for _ in range(warmup):
        step()
    memory = None
    if device.type == "cuda":
        memory = round((torch.cuda.max_memory_allocated(device) - before) / 2**20)
    return step, {"peak_memory_mb": memory}


def profile_step(step: Callable[[], None], flops: float, peak_gflops: float, steps: int = 3) -> dict:
    """Where `steps` calls of a (synchronised) training step spend their time on the GPU, per step:
    wall-clock seconds, seconds with a kernel running, and kernel seconds by kind (`kernel_seconds`).
    `products_only_fraction` is the fraction of the peak the step would reach if everything but its matrix
    products took no time: the ceiling that the products' own speed at these shapes sets."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            wall = (time.perf_counter() - start) / steps
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    spent = kernel_seconds(events)
    per_step = {kind: round(seconds / steps, 5) for kind, seconds in spent.items()}
    products = spent["products"] / steps
    return {
        "wall_s": round(wall, 5),
        **per_step,
        "products_only_fraction": round(flops / products / 1e9 / peak_gflops, 3) if products else None,
        "top_kernels": top_kernels(events, steps),
    }


def top_kernels(events: Sequence[dict], steps: int, count: int = 30) -> list[dict[str, Any]]:
    """The `count` kernels (by name, its first 90 characters) that took the most GPU time: milliseconds and
    calls per step."""
    spent: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "kernel":
            entry = spent.setdefault(event["name"][:90], [0.0, 0])
            entry[0] += event["dur"] / 1e3
            entry[1] += 1
    ranked = sorted(spent.items(), key=lambda item: -item[1][0])[:count]
    return [
        {"kernel": name, "ms": round(ms / steps, 3), "calls": calls / steps} for name, (ms, calls) in ranked
    ]


def kernel_seconds(events: Sequence[dict]) -> dict[str, float]:
    """GPU kernels of a Chrome trace (torch.profiler's export) summed by kind: matrix products, attention,
    the optimiser, everything else; `busy` is the time at least one kernel ran (overlaps counted once),
    `kernels` the number launched. Kinds are told by the kernel's name (cuBLAS's Hopper kernels are
    `nvjet_…`, older ones `…gemm…`; flash and memory-efficient attention are `…flash…`, `…fmha…`)."""
    kinds = {"products": 0.0, "attention": 0.0, "optimiser": 0.0, "other": 0.0}
    spans = []
    for event in events:
        if event.get("cat") != "kernel":
            continue
        name, start, seconds = event["name"].lower(), event["ts"] / 1e6, event["dur"] / 1e6
        spans.append((start, start + seconds))
        if any(key in name for key in ("flash", "fmha", "attention", "sdpa")):
            kinds["attention"] += seconds
        elif any(key in name for key in ("gemm", "nvjet", "xmma", "cutlass")):
            kinds["products"] += seconds
        elif "adam" in name or "multi_tensor" in name:
            kinds["optimiser"] += seconds
        else:
            kinds["other"] += seconds
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return {"busy": busy, **kinds, "kernels": len(spans)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", default="base", choices=["small", "base"])
    parser.add_argument("--shape", type=int, nargs=3, default=[780, 31, 32], metavar=("BATCH", "SRC", "TGT"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-n", type=int, default=8192, help="size of the square products for the peak")
    parser.add_argument("--variants", nargs="+", default=["ours"], choices=list(VARIANTS))
    parser.add_argument(
        "--compile", action="store_true", help="also ours under torch.compile, without and with CUDA graphs"
    )
    parser.add_argument("--peers", action="store_true", help="also nn.Transformer and MarianMTModel")
    parser.add_argument("--profile", action="store_true", help="also where ours spends its step on the GPU")
    parser.add_argument("--json", action="store_true", help="print JSON only; leave RESULTS.md alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this benchmark is for a GPU (--device cpu makes a dry run)")
    compiled = ["ours, torch.compile", "ours, torch.compile, CUDA graphs"]
    variants = [*args.variants, *(compiled if args.compile else [])]
    variants += PEERS if args.peers else []
    measured = measure(
        args.config,
        device,
        tuple(args.shape),
        args.repeats,
        list(dict.fromkeys(variants)),
        args.peak_n,
        profile=args.profile,
    )
    result = {"machine": common.machine_info(), args.config: measured}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    common.report(
        f"Training step on a GPU: {args.config}", result, render(args.config, measured), measured["device"]
    )


_COLUMNS = (
    "model",
    "s/step",
    "target tok/s",
    "GFLOP/s",
    "of bf16 peak",
    "peak memory (MB)",
    "WMT14 base, 1 GPU (h)",
    "8 GPUs, perfect scaling (h)",
    "ours faster",
)


def render(config_name: str, measured: dict[str, Any]) -> str:
    """RESULTS.md's section for one `measure` result: the table, and where ours spent its step."""
    table = [
        {"model": variant, "s/step": row["error"], **dict.fromkeys(_COLUMNS[2:], "")}
        if "error" in row
        else {
            "model": variant,
            "s/step": row["s_per_step"],
            "target tok/s": row["tgt_tokens_per_s"],
            "GFLOP/s": row["gflops"],
            "of bf16 peak": row["fraction_of_bf16_peak"],
            "peak memory (MB)": row["peak_memory_mb"],
            "WMT14 base, 1 GPU (h)": row["wmt14_base"]["one_gpu_hours"],
            "8 GPUs, perfect scaling (h)": row["wmt14_base"]["eight_gpus_hours_perfect_scaling"],
            "ours faster": f"{row['ours_speedup']}×" if "ours_speedup" in row else "",
        }
        for variant, row in measured["variants"].items()
    ]
    b = measured["batch"]
    body = (
        f"{measured['device']}; bf16 matmul peak measured in the run: {measured['bf16_matmul_peak_gflops']} "
        f"GFLOP/s. **{config_name}**, bf16 autocast, vocabulary {PAPER_VOCAB}, batch {b['sentences']} × "
        f"{b['source_tokens']} source / {b['target_tokens']} target tokens. WMT14: the paper's "
        f"{PAPER_STEPS:,} steps × {PAPER_TARGET_TOKENS_PER_STEP:,} target tokens at the measured rate.\n\n"
        + common.markdown_table(table)
    )
    profiled = dict(measured["variants"].get("ours", {}).get("profile") or {})
    if profiled:
        top = profiled.pop("top_kernels")[:12]
        body += "\n\nWhere ours spends a step on the GPU (torch.profiler, seconds per step):\n\n" + (
            common.markdown_table([profiled])
        )
        body += "\n\nIts twelve costliest kernels (ms and calls per step):\n\n" + common.markdown_table(
            [{**kernel, "kernel": f"`{kernel['kernel']}`"} for kernel in top]
        )
    return body


if __name__ == "__main__":
    main()
