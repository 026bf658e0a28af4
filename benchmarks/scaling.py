"""Time and memory against source length, for a training step and for greedy decoding with the cache.

    python benchmarks/scaling.py                        # small config, lengths 64 … 2048, batch 2
    python benchmarks/scaling.py --lengths 64 256 1024 --batch 4

Training uses targets as long as the sources; decoding generates `--new-tokens` tokens from each source.
Each (kind, length) point runs in a fresh child process, so that its peak memory is its own. Attention
is quadratic in length and everything else linear, so time per token should stay flat while the
projections dominate and rise once the attention scores do. Prints JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers
from benchmarks.decode import our_search


def point(kind: str, length: int, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Child-process mode: median seconds and peak-memory growth of one kind of work at one length."""
    c = peers.config_for("small", max_len=max(length, new_tokens) + 2)
    torch.manual_seed(0)
    model = peers.ours(c)
    src, tgt = peers.random_batch(batch, length - 1, length)
    if kind == "train":
        run = peers.training_step(model, [(src, tgt)], fused_adam=True, projected=True)  # our trainer's step
    else:
        run = our_search(model.eval(), src, beam=1, new_tokens=new_tokens, cached=True)
    times: list[float] = []
    memory = common.peak_rss_growth_mb(
        lambda: times.extend(common.time_interleaved({kind: run}, repeats, warmup=1)[kind])
    )
    return {"seconds": round(common.median(times), 3), **memory}


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--point", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        kind, length = args.point[0], int(args.point[1])
        print(json.dumps(point(kind, length, args.batch, args.new_tokens, args.repeats)))
        return

    result: dict = {"machine": common.machine_info(), "batch": args.batch, "points": []}
    for length in args.lengths:
        row: dict = {"source length": length}
        for kind in ("train", "decode"):
            extra = ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
            measured = common.memory_in_child(
                __file__, ["--point", kind, str(length), *extra, "--repeats", str(args.repeats)]
            )
            tokens = args.batch * (length if kind == "train" else args.new_tokens)
            row[f"{kind} s"] = measured["seconds"]
            row[f"{kind} ms/token"] = round(1000 * measured["seconds"] / tokens, 2)
            row[f"{kind} memory MB"] = measured["growth_mb"]
        result["points"].append(row)
    body = (
        f"Small config, batch {args.batch}; training: source and target of the given length; decoding: "
        f"greedy with the cache, {args.new_tokens} tokens generated. Memory: growth of the peak RSS of a "
        f"fresh process over the step(s) (Adam state, gradients, activations; not the weights).\n\n"
        + common.markdown_table(result["points"])
    )
    common.report("Scaling with source length", result, body)


if __name__ == "__main__":
    main()
