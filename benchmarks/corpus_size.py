"""What a large corpus costs `transformer train` before and while it trains: the time from the command to
the first step, and the process's peak and training memory, on a synthetic corpus of the bundled
Multi30k sentences joined two to a line (WMT14 en-de: 4.5M pairs of ~25 words a side).

    python benchmarks/corpus_size.py                       # 4.5M pairs, 30 steps: ~9 minutes, ~9 GB
    python benchmarks/corpus_size.py --pairs 1000000
    python benchmarks/corpus_size.py --pairs 36000000 --no-peer   # WMT14 en-fr's size: ~40 GB of disk

The run is `transformer train` itself (small model, default settings, no test split), in a child process
whose resident memory is read from /proc every half second: the cost of the data path, which the
training figures elsewhere leave out. The run is then resumed twice for 10 more steps: with the token ids
it kept (`train.ids`), and, as the peer of that resume, without them, tokenising the corpus again as every
resume did before. Prints JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from transformer.data.corpus import read_lines
from transformer.rundir import TRAIN_IDS

MULTI30K = Path(__file__).resolve().parent.parent / "data" / "multi30k"


def write_corpus(out: Path, pairs: int, valid_pairs: int = 200, seed: int = 0) -> None:
    """`pairs` training pairs, each two random Multi30k pairs joined, and Multi30k's first validation
    pairs, as plain text files `transformer train data_dir=out` reads."""
    de, en = read_lines(MULTI30K / "train.de.gz"), read_lines(MULTI30K / "train.en.gz")
    rng = random.Random(seed)
    with (out / "train.de").open("w") as f_de, (out / "train.en").open("w") as f_en:
        for _ in range(pairs):
            i, j = rng.randrange(len(de)), rng.randrange(len(de))
            f_de.write(f"{de[i]} {de[j]}\n")
            f_en.write(f"{en[i]} {en[j]}\n")
    for lang in ("de", "en"):
        lines = read_lines(MULTI30K / f"val.{lang}.gz")[:valid_pairs]
        (out / f"val.{lang}").write_text("\n".join(lines) + "\n")


def watch(command: list[str], interval: float = 0.5) -> dict[str, Any]:
    """Run `command`, reading its memory every `interval` seconds: the peak, the peak from its first
    training step on, and when that step's log line came."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step: list[float] = []
    lines: list[str] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("step ") and not first_step:
                first_step.append(time.monotonic() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = training = private = training_private = 0.0
    while child.poll() is None:
        rss = common.proc_status_mb("VmRSS", child.pid) or 0.0
        # Resident memory counts the pages of mapped files the process has touched (the ids, torch's
        # libraries), which the kernel may drop and read again; its anonymous memory it holds itself.
        own = common.proc_status_mb("RssAnon", child.pid) or 0.0
        peak, private = max(peak, rss), max(private, own)
        if first_step:
            training, training_private = max(training, rss), max(training_private, own)
        time.sleep(interval)
    reader.join()
    if child.returncode:
        raise SystemExit(f"transformer train failed ({child.returncode}):\n" + "\n".join(lines[-10:]))
    return {
        "seconds_to_first_logged_step": round(first_step[0], 1) if first_step else None,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_gb": round(peak / 1024, 2),
        "peak_private_gb": round(private / 1024, 2),
        "training_rss_gb": round(training / 1024, 2),
        "training_private_gb": round(training_private / 1024, 2),
        "log": [line for line in lines if not line.startswith(("trainer_interface", "unigram_model"))],
    }


def train_command(data_dir: Path, run_dir: Path, steps: int, settings: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transformer.cli",
        "train",
        f"data_dir={data_dir}",
        "--out",
        str(run_dir),
        f"max_steps={steps}",
        "log_every=10",
        "eval_every=0",
        "average_last=0",
        "test_split=",
        *settings,
    ]


def main() -> None:
    common.run_as_the_cli_does()  # the child would set the allocator anyway; this way RESULTS.md says so
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4_500_000)
    parser.add_argument("--steps", type=int, default=30, help="training steps (logged every 10)")
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="leave out the resume that tokenises again (at 36M pairs as long as the first tokenising)",
    )
    parser.add_argument("settings", nargs="*", help="more `transformer train` settings, key=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        data.mkdir()
        write_corpus(data, args.pairs)
        measured = watch(train_command(data, run, args.steps, args.settings))
        # Resumed for 10 steps more: with the ids the first run kept, then (the peer) without them.
        resumed = watch([*train_command(data, run, args.steps + 10, args.settings), "--resume"])
        kept_bytes = (run / TRAIN_IDS).stat().st_size
        retokenised = None
        if not args.no_peer:
            (run / TRAIN_IDS).unlink()
            retokenised = watch([*train_command(data, run, args.steps + 20, args.settings), "--resume"])
    result = {
        "machine": common.machine_info(),
        "pairs": args.pairs,
        "steps": args.steps,
        **measured,
        "kept_ids_gb": round(kept_bytes / 1e9, 2),
        "resumed": resumed,
        "resumed_tokenising_again": retokenised,
    }
    first, peak, training = (
        measured[key] for key in ("seconds_to_first_logged_step", "peak_rss_gb", "training_rss_gb")
    )
    peer = (
        f"; {retokenised['seconds_to_first_logged_step']} s without them, tokenising the corpus again "
        f"({retokenised['peak_rss_gb']} GB)"
        if retokenised
        else ". The peer, the resume that tokenises again, was left out (`--no-peer`)"
    )
    body = (
        f"`transformer train` on {args.pairs:,} synthetic pairs (Multi30k's sentences joined two to a "
        f"line), {args.steps} steps of the small model: the first step logged {first} s after the command, "
        f"{peak} GB resident at the peak, {training} GB while training; the process's own memory, not "
        f"mapped from files, peaked at {measured['peak_private_gb']} GB, "
        f"{measured['training_private_gb']} GB while training.\n\n"
        f"`--resume` for 10 steps more logged its first step {resumed['seconds_to_first_logged_step']} s "
        f"after the command, reading the ids the run kept ({result['kept_ids_gb']} GB on disk; "
        f"{resumed['peak_rss_gb']} GB resident at the peak){peer}.\n\n```\n"
        + "\n".join(measured["log"][:6])
        + "\n```"
    )
    # The default size keeps its section; another size gets its own beside it.
    title = "Corpus size" if args.pairs == 4_500_000 else f"Corpus size, {args.pairs:,} pairs"
    common.report(title, result, body)


if __name__ == "__main__":
    main()
