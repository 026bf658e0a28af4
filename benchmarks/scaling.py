"""Time and memory against source length, for a training step and for greedy decoding with the cache: ours
against torch.nn.Transformer (training) and MarianMTModel (training and decoding), small config.

    python benchmarks/scaling.py                        # lengths 64 … 2048, batch 2
    python benchmarks/scaling.py --lengths 64 256 1024 --batch 4

Training uses targets as long as the sources and each model's own step (as benchmarks/train_step.py: ours as
`transformer train` steps, the peers with F.cross_entropy over all logits; every model with torch's fused
Adam, `peers.Variant`'s default); decoding generates `--new-tokens` tokens from each source (ours with
packed weights, as `transformer translate` loads a model; Marian's `generate`). At each length the models
run interleaved in one process for the times, and each again in a fresh child process for its peak memory,
which a process keeps only one high-water mark of. Attention is quadratic in length and everything else
linear, so time per token should stay flat while the projections dominate and rise once the attention scores
do; a model that writes the attention weights out grows its memory with the square of the length. Prints
JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers, train_step
from benchmarks.decode import marian_search, our_search
from transformer.translate import ready_for_decoding

MODELS = {"train": ["ours", "nn.Transformer", "MarianMTModel"], "decode": ["ours", "MarianMTModel"]}


def runs_for(
    kind: str, length: int, batch: int, new_tokens: int, models: list[str] | None = None
) -> dict[str, Callable[[], object]]:
    """One call per model of `kind` ("train": one step; "decode": one greedy search) at source length
    `length`; MarianMTModel is left out where `transformers` is missing."""
    models = models or MODELS[kind]
    max_len = max(length, new_tokens) + 2
    # sources of `length` tokens (EOS included); the decoder reads `length` positions, BOS first
    src, tgt = peers.random_batch(batch, length - 1, length)
    if kind == "train":
        return train_step.steps_for(models, "small", [(src, tgt)], max_len)
    c = peers.config_for("small", max_len)
    runs = {}
    for model in models:
        torch.manual_seed(0)
        if model == "ours":
            ours = ready_for_decoding(peers.ours(c).eval())
            runs[model] = our_search(ours, src, beam=1, new_tokens=new_tokens, cached=True)
        elif (marian := peers.marian(c)) is not None:
            runs[model] = marian_search(marian.eval(), src, beam=1, new_tokens=new_tokens)
    return runs


def memory_point(kind: str, length: int, model: str, batch: int, new_tokens: int) -> dict[str, float]:
    """Child-process mode: the peak-memory growth of one model's warm-up call and one more."""
    (run,) = runs_for(kind, length, batch, new_tokens, [model]).values()
    return common.peak_rss_growth_mb(lambda: (run(), run()))


def measure(kind: str, length: int, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Seconds per call of each model (median of interleaved rounds), ours' speed-up over each peer, and
    each model's memory growth from its own child process."""
    runs = runs_for(kind, length, batch, new_tokens)
    times = common.time_interleaved(runs, repeats)
    tokens = batch * (length if kind == "train" else new_tokens)
    row: dict[str, Any] = {}
    for model, ts in times.items():
        row[f"{model} ms/token"] = round(1000 * common.median(ts) / tokens, 2)
    for model in times:
        if model != "ours":
            row[f"ours × {model}"] = common.paired_speedup(times["ours"], times[model])
    sizes = ["--batch", str(batch), "--new-tokens", str(new_tokens)]
    for model in times:
        args = ["--memory-of", kind, str(length), model, *sizes]
        row[f"{model} MB"] = common.memory_in_child(__file__, args)["growth_mb"]
    return row


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-of", nargs=3, metavar=("KIND", "LENGTH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        kind, length, model = args.memory_of
        print(json.dumps(memory_point(kind, int(length), model, args.batch, args.new_tokens)))
        return

    result: dict[str, Any] = {"machine": common.machine_info(), "batch": args.batch}
    tables = []
    for kind, what in (("train", "a training step"), ("decode", "a greedy search")):
        rows = [
            {"source length": length, **measure(kind, length, args.batch, args.new_tokens, args.repeats)}
            for length in args.lengths
        ]
        result[kind] = rows
        tables.append(f"**{what}**:\n\n{common.markdown_table(rows)}")
    body = (
        f"Small config, batch {args.batch}. Training: source and target of the given length, ms per target "
        f"token; decoding: greedy with the cache, {args.new_tokens} tokens generated, ms per generated "
        f"token. Times: medians of {args.repeats} interleaved rounds; `ours × peer`: the median of the "
        f"per-round speed-ups. MB: growth of the peak RSS of a fresh process over a warm-up call and one "
        f"more (Adam state, gradients, activations, caches; not the weights, but ours' decoding rows include "
        f"the copy of the weights its packed products read, made on the first call: 29 MB for the small "
        f"model).\n\n" + "\n\n".join(tables)
    )
    common.report("Scaling with source length", result, body)


if __name__ == "__main__":
    main()
