"""Training speed and memory: ours against torch.nn.Transformer and MarianMTModel, measured in one process.

    python benchmarks/train_step.py                       # small (d 256, 3+3) and base (d 512, 6+6), fp32
    python benchmarks/train_step.py --configs small --compile   # adds ours under torch.compile
    python benchmarks/train_step.py --allocator           # ours, with and without GLIBC_TUNABLES

Every model gets the same embeddings (×√d_model, sinusoidal positions, dropout), tied output projection,
label-smoothed loss and fused Adam (benchmarks/peers.py). The loss is where ours differs as a toolkit:
ours projects only the non-padding positions and writes out the loss's gradient (transformer/loss.py),
the peers take `F.cross_entropy` over all their logits, as their users would. Variants of ours measure our
speed choices: the self-attention projections fused into one matmul, nn.Dropout instead of our cheaper
mask, torch's for-loop Adam (its default on the CPU), bf16 autocast (included where the CPU has bf16
instructions, or with --bf16) and torch.compile (--compile; as `transformer train compile=true`, with the
kernels compile picks). Ours multiplies fp32 in oneDNN where `transformer train` does (AMD CPUs whose
oneDNN beats MKL, transformer/onednn.py); there the variant `ours, MKL linear layers` is ours with torch's
nn.Linear, as the peers run, and `ours, oneDNN weight gradients` (on Zen 4, whose weight gradients are
MKL's) or `ours, MKL weight gradients` (elsewhere) computes the weight gradients in the other library.
The variants take a step in turn, round after round (benchmarks/common.py).
Peak memory is measured per variant in a fresh child process. Prints JSON and updates
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers
from transformer.config import TransformerConfig
from transformer.data.tokenizer import PAD_ID
from transformer.onednn import OneDNNLinear, onednn_trains_faster, use_onednn_linears, weight_gradients_in_mkl
from transformer.precision import has_native_bf16
from transformer.runtime import ALLOCATOR_TUNABLES

# Default batches: about our trainer's token budget for small, and what fits a few-minute run for base.
SHAPES = {"small": (96, 24, 22), "base": (48, 24, 22)}


def _ours(c: TransformerConfig, weight_grad_in_mkl: bool | None = None, **choices: Any) -> torch.nn.Module:
    """Ours with the kernels `transformer train` chooses for its linear layers (oneDNN where it is faster);
    `weight_grad_in_mkl` overrides where their weight gradients are computed (None: as `train` does)."""
    model = peers.ours(c, **choices)
    use_onednn_linears(model)
    for module in model.modules():
        if isinstance(module, OneDNNLinear):
            module.weight_grad_in_mkl = weight_grad_in_mkl
    return model


def _other_weight_gradients() -> str:
    """The variant whose oneDNN linears compute weight gradients in the other library than `train`'s."""
    return "ours, oneDNN weight gradients" if weight_gradients_in_mkl() else "ours, MKL weight gradients"


VARIANTS: dict[str, peers.Variant] = {
    "ours": peers.Variant(_ours),
    "nn.Transformer": peers.Variant(peers.TorchPeer, projected=False),
    "MarianMTModel": peers.Variant(peers.marian_logits, projected=False),
    "ours, fused QKV": peers.Variant(lambda c: _ours(c, fuse_qkv=True)),
    "ours, nn.Dropout": peers.Variant(lambda c: _ours(c, torch_dropout=True)),
    "ours, for-loop Adam": peers.Variant(_ours, fused_adam=False),
    "ours, MKL linear layers": peers.Variant(peers.ours),  # torch's nn.Linear, as the peers run
    "ours, oneDNN weight gradients": peers.Variant(lambda c: _ours(c, weight_grad_in_mkl=False)),
    "ours, MKL weight gradients": peers.Variant(lambda c: _ours(c, weight_grad_in_mkl=True)),
    "ours, bf16 autocast": peers.Variant(_ours, bf16=True),
    "ours, torch.compile": peers.Variant(peers.ours, compile=True),  # compile picks the kernels
}


def steps_for(
    variants: list[str], config_name: str, batches: list[tuple[Tensor, Tensor]], max_len: int = 1024
) -> dict[str, Callable]:
    """Each variant's training step over `batches` on the CPU, for those that can be built here."""
    config = peers.config_for(config_name, max_len)
    steps = {name: VARIANTS[name].step(config, batches, torch.device("cpu")) for name in variants}
    return {name: step for name, step in steps.items() if step is not None}


def measure(
    config_name: str, variants: list[str], batches: list[tuple[Tensor, Tensor]], repeats: int, memory: bool
) -> tuple[dict, float | None]:
    """Every variant steps through the same `batches`, one per round (so the rounds compare alike).

    The warm-up rounds take every batch once, so that the timed steps meet shapes met before, as a
    training run's steps do after its first epoch: oneDNN builds and JIT-compiles a kernel for every new
    shape of a bf16 matmul (on the AMX Xeon a bf16 step over 12 new Multi30k batches took 0.66 s, over
    the same batches again 0.54 s; fp32 0.93 and 0.90 s)."""
    steps = steps_for(variants, config_name, batches)
    warmup = len(batches)
    compile_s = None
    if "ours, torch.compile" in steps:
        # compiled on its first batch, then a whole turn more, so that it steps through the batches in
        # the same order as the others (each step function cycles through them)
        start = time.perf_counter()
        steps["ours, torch.compile"]()
        compile_s = round(time.perf_counter() - start, 1)
        for _ in range(len(batches) - 1):
            steps["ours, torch.compile"]()
    times = common.time_interleaved(steps, repeats, warmup)
    # What each timed round ran (one batch, after the warm-up ones, the same for every variant): the
    # target tokens (not padding) and the padded shapes' FLOPs
    round_batches = [batches[i % len(batches)] for i in range(warmup, warmup + repeats)]
    config = peers.config_for(config_name)
    tokens = [target_tokens([batch]) for batch in round_batches]
    flops = [peers.step_flops(config, s.size(0), s.size(1), t.size(1) - 1) for s, t in round_batches]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "batches.pt"  # for the memory children, written once
        if memory:
            torch.save(batches, saved)
        for variant, ts in times.items():
            # rates per round, then their median: like the speed-ups, robust to a round that was slowed
            rounds = list(zip(tokens, flops, ts, strict=True))
            rows[variant] = {
                "s_per_step": round(common.median(ts), 3),
                "all_s": [round(t, 3) for t in ts],  # the spread shows how noisy the machine was
                "tgt_tokens_per_s": round(common.median([n / t for n, _, t in rounds])),
                "gflops": round(common.median([common.gflops(f, t) for _, f, t in rounds]), 1),
            }
            if memory:
                args = ["--memory-of", variant, "--configs", config_name, "--batches-file", str(saved)]
                rows[variant]["memory"] = common.memory_in_child(__file__, args)
            for peer in ("nn.Transformer", "MarianMTModel", "ours"):
                if peer in times:
                    rows[variant][f"vs_{peer}"] = common.paired_speedup(ts, times[peer])
                    rows[variant][f"vs_{peer}_range"] = common.speedup_range(ts, times[peer])
    return rows, compile_s


def target_tokens(batches: list[tuple[Tensor, Tensor]]) -> int:
    """The tokens the batches' steps predict: the targets after BOS (EOS included), padding excluded."""
    return sum(int((tgt[:, 1:] != PAD_ID).sum()) for _, tgt in batches)


def memory_of(variant: str, config_name: str, batches: list[tuple[Tensor, Tensor]]) -> None:
    """Child-process mode: peak memory of two training steps of one variant, printed as JSON."""
    step = steps_for([variant], config_name, batches)[variant]
    print(json.dumps(common.peak_rss_growth_mb(lambda: (step(), step()))))


def allocator_comparison(args: argparse.Namespace) -> None:
    """Run ours twice in child processes, with and without GLIBC_TUNABLES (glibc reads it at start-up)."""
    runs = {}
    for label, tunables in (("default allocator", None), ("GLIBC_TUNABLES", ALLOCATOR_TUNABLES)):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["TRANSFORMER_KEEP_ALLOCATOR"] = "1"  # the child must not set it for itself
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        argv = [sys.executable, __file__, "--configs", "small", "--variants", "ours", "--no-memory", "--json"]
        argv += ["--repeats", str(args.repeats)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        runs[label] = json.loads(done.stdout)["small"]["variants"]["ours"]["s_per_step"]
    runs["speed-up"] = round(runs["default allocator"] / runs["GLIBC_TUNABLES"], 3)
    print(json.dumps(runs, indent=2))


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "base"], choices=["small", "base"])
    parser.add_argument("--variants", nargs="+", help="default: all that apply")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("BATCH", "SRC_LEN", "TGT_LEN"))
    parser.add_argument(
        "--batches",
        choices=["random", "corpus"],
        default="random",
        help="random: one unpadded batch of --shape; corpus: the trainer's Multi30k batches (padded)",
    )
    parser.add_argument("--max-tokens", type=int, default=2500, help="token budget of the corpus batches")
    parser.add_argument("--bf16", action="store_true", help="measure bf16 autocast even without bf16 CPU")
    parser.add_argument("--compile", action="store_true", help="add ours under torch.compile (slow start)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--batches-file", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON only; leave RESULTS.md alone")
    parser.add_argument("--allocator", action="store_true", help="ours with and without GLIBC_TUNABLES")
    args = parser.parse_args()
    if args.allocator:
        allocator_comparison(args)
        return
    if args.memory_of:
        memory_of(args.memory_of, args.configs[0], torch.load(args.batches_file))
        return

    bf16 = args.bf16 or has_native_bf16()  # emulated bf16 would measure nothing useful
    result = {"machine": common.machine_info(), "fp32_matmul_peak_gflops": common.matmul_peak_gflops()}
    if bf16:
        result["bf16_matmul_peak_gflops"] = common.matmul_peak_gflops(torch.bfloat16)
    corpus = peers.corpus_batches(args.repeats + 2, args.max_tokens) if args.batches == "corpus" else None
    body = []
    for name in args.configs:
        variants = args.variants or [
            "ours",
            "nn.Transformer",
            "MarianMTModel",
            "ours, fused QKV",
            *(["ours, nn.Dropout", "ours, for-loop Adam"] if name == "small" else []),
            *(["ours, MKL linear layers"] if onednn_trains_faster() else []),
            *([_other_weight_gradients()] if onednn_trains_faster() else []),
            *(["ours, bf16 autocast"] if bf16 else []),
            *(["ours, torch.compile"] if args.compile else []),
        ]
        shape = tuple(args.shape) if args.shape else SHAPES[name]
        batches = corpus or [peers.random_batch(*shape)]
        rows, compile_s = measure(name, variants, batches, args.repeats, args.memory)
        peak = result["fp32_matmul_peak_gflops"]
        for row in rows.values():
            row["fraction_of_fp32_peak"] = round(row["gflops"] / peak, 3)
        described = _describe(batches, shape if corpus is None else None, args.max_tokens)
        result[name] = {"batches": described, "variants": rows, "compile_seconds": compile_s}
        body.append(_markdown(name, described, rows, compile_s))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if not bf16:
        body.append(common.bf16_not_measured("bf16 autocast"))
    header = f"fp32 matmul peak measured in the run: {result['fp32_matmul_peak_gflops']:.1f} GFLOP/s"
    if bf16:
        header += f"; bf16: {result['bf16_matmul_peak_gflops']:.1f} GFLOP/s"
    header += "."
    where = " on Multi30k batches" if corpus else ""
    common.report(
        f"Training step{where}: {', '.join(args.configs)}", result, header + "\n\n" + "\n\n".join(body)
    )


def _describe(
    batches: list[tuple[Tensor, Tensor]], shape: tuple[int, int, int] | None, max_tokens: int
) -> str:
    if shape is not None:
        return f"batch {shape[0]}, source {shape[1]} + EOS, target {shape[2]} tokens, no padding"
    positions = sum(src.numel() + tgt[:, 1:].numel() for src, tgt in batches)
    padding = (
        sum(int((src == PAD_ID).sum() + (tgt[:, 1:] == PAD_ID).sum()) for src, tgt in batches) / positions
    )
    sentences = sum(src.size(0) for src, _ in batches) / len(batches)
    return (
        f"{len(batches)} Multi30k de→en training batches of ≤ {max_tokens} tokens in the trainer's order, "
        f"{sentences:.0f} sentences each on average, {padding:.1%} padding"
    )


def _markdown(name: str, described: str, rows: dict, compile_s: float | None) -> str:
    table = []
    for variant, row in rows.items():
        entry = {
            "model": variant,
            "s/step": row["s_per_step"],
            "target tok/s": row["tgt_tokens_per_s"],
            "GFLOP/s": row["gflops"],
            "of fp32 peak": row["fraction_of_fp32_peak"],
            **{f"× {short}": _speedup(row, peer) for peer, short in _PEERS.items()},
        }
        if "memory" in row:
            entry["memory growth, 2 steps (MB)"] = row["memory"]["growth_mb"]
        table.append(entry)
    note = f" torch.compile took {compile_s} s to compile." if compile_s else ""
    return (
        f"**{name}** ({described}; vocabulary {peers.VOCAB}, dropout 0.1); × columns: median over rounds "
        f"of the per-round speed-up (lowest–highest round). Rates: median over rounds of each round's "
        f"rate. GFLOP/s counts every model's padded positions, which ours does not project onto the "
        f"vocabulary.{note}\n\n" + common.markdown_table(table)
    )


_PEERS = {"nn.Transformer": "nn.Transformer", "MarianMTModel": "Marian", "ours": "ours"}


def _speedup(row: dict, peer: str) -> str:
    if f"vs_{peer}" not in row:
        return "–"
    return common.with_range(row[f"vs_{peer}"], row[f"vs_{peer}_range"])


if __name__ == "__main__":
    main()
