"""Load on the translation service over loopback: latency percentiles and throughput, batched against the
same server with batching switched off (one request per model call), measured in the same run.

    python benchmarks/serve_load.py --checkpoint runs/multi30k-de-en            # 200 requests, 16 concurrent
    python benchmarks/serve_load.py --checkpoint runs/multi30k-de-en --requests 40 --concurrency 8 --json

Both servers run side by side and take the load in turn, round after round, in alternating order (as
benchmarks/common.py times everything else), so that the machine's load hits them alike: requests/s is
the median over rounds, the speed-up the median of the per-round ratios with its lowest and highest
round, and the latency percentiles are over every round's requests. Prints JSON and, without --json,
updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from transformer.data.corpus import read_lines
from transformer.serve import Limits, LoadReport, create_app, load, running_server
from transformer.translate import Translator

VALIDATION = Path(__file__).resolve().parent.parent / "data" / "multi30k" / "val.de.gz"
SERVERS = {
    "batched": Limits(),
    "one request per model call": Limits(max_batch_sentences=1, batch_window_s=0.0),
}


def measure(
    translator: Translator, sentences: list[str], requests: int, concurrency: int, beam: int, repeats: int
) -> dict[str, list[LoadReport]]:
    """Each server's load reports, one per round, after a warm-up round of `concurrency` requests each."""
    reports: dict[str, list[LoadReport]] = {name: [] for name in SERVERS}
    with contextlib.ExitStack() as servers:
        urls = {
            name: servers.enter_context(running_server(create_app(translator, limits)))
            for name, limits in SERVERS.items()
        }
        for url in urls.values():
            asyncio.run(load(url, sentences, requests=concurrency, concurrency=concurrency, beam=beam))
        order = list(urls.items())
        for round_ in range(repeats):
            for name, url in order if round_ % 2 == 0 else reversed(order):
                reports[name].append(asyncio.run(load(url, sentences, requests, concurrency, beam=beam)))
    return reports


def summarise(reports: dict[str, list[LoadReport]]) -> dict[str, Any]:
    """Per server: errors, median requests/s and latency percentiles; the batched server's speed-up."""
    rows = {}
    for name, rounds in reports.items():
        pooled = LoadReport(
            requests=sum(r.requests for r in rounds),
            concurrency=rounds[0].concurrency,
            errors=sum(r.errors for r in rounds),
            seconds=sum(r.seconds for r in rounds),
            latencies_ms=[ms for r in rounds for ms in r.latencies_ms],
        )
        rows[name] = {
            "errors": pooled.errors,
            "requests_per_s": round(common.median([r.requests / r.seconds for r in rounds]), 1),
            **{f"p{q}_ms": round(pooled.percentile(q)) for q in (50, 90, 99)},
        }
    seconds = {name: [r.seconds for r in rounds] for name, rounds in reports.items()}
    fast, slow = seconds["batched"], seconds["one request per model call"]
    return {
        "rows": rows,
        "batched_speedup": common.paired_speedup(fast, slow),
        "batched_speedup_range": common.speedup_range(fast, slow),
    }


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON only; leave RESULTS.md alone")
    args = parser.parse_args()
    translator = Translator.from_checkpoint(args.checkpoint)
    sentences = read_lines(VALIDATION)[: args.requests]  # one real sentence per request
    reports = measure(translator, sentences, args.requests, args.concurrency, args.beam, args.repeats)
    result = {"machine": common.machine_info(), "checkpoint": args.checkpoint, **summarise(reports)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = common.markdown_table([{"server": name, **row} for name, row in result["rows"].items()])
    low, high = result["batched_speedup_range"]
    body = (
        f"{args.requests} one-sentence requests of the validation split, {args.concurrency} at a time, beam "
        f"{args.beam}, through `{args.checkpoint}` (fp32), {args.repeats} rounds:\n\n{table}\n\n"
        f"- batched vs one request per model call: **{result['batched_speedup']}×** the requests per "
        f"second (rounds {low}–{high}×)"
    )
    common.report("Serving under load", result, body)


if __name__ == "__main__":
    main()
