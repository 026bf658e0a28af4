"""Load on the translation service over loopback: latency percentiles and throughput, batched against the
same server with batching switched off (one request per model call), measured in the same run.

python benchmarks/serve_load.py --checkpoint runs/multi30k-de-en            # 200 requests, 16 concurrent
python benchmarks/serve_load.py --checkpoint runs/multi30k-de-en --requests 40 --concurrency 8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import torch

from transformer.data.corpus import read_lines
from transformer.serve import Limits, LoadReport, create_app, load, running_server
from transformer.translate import Translator

VALIDATION = Path(__file__).resolve().parent.parent / "data" / "multi30k" / "val.de.gz"


def measure(
    translator: Translator, limits: Limits, sentences: list[str], args: argparse.Namespace
) -> LoadReport:
    with running_server(create_app(translator, limits), host="127.0.0.1") as url:
        asyncio.run(
            load(url, sentences, requests=args.concurrency, concurrency=args.concurrency, beam=args.beam)
        )
        return asyncio.run(load(url, sentences, args.requests, args.concurrency, beam=args.beam))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    translator = Translator.from_checkpoint(args.checkpoint)
    sentences = read_lines(VALIDATION)[: args.requests]  # one real sentence per request
    runs = {
        "batched": measure(translator, Limits(), sentences, args),
        "one request per model call": measure(
            translator, Limits(max_batch_sentences=1, batch_window_s=0.0), sentences, args
        ),
    }
    batched, single = runs["batched"], runs["one request per model call"]
    ratio = (batched.requests / batched.seconds) / (single.requests / single.seconds)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, beam {args.beam}")
    for name, report in runs.items():
        print(f"{name:>27}: {report.summary()}")
    print(f"batching serves {ratio:.2f}x the requests per second")
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "errors": r.errors,
                        "requests_per_s": r.requests / r.seconds,
                        **{f"p{q}_ms": r.percentile(q) for q in (50, 90, 99)},
                    }
                    for name, r in runs.items()
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
