"""Our decoding against CTranslate2 running the same checkpoint, exported to MarianMT and converted with
CTranslate2's own converter: how many translations are identical, and sentences per second for each, on the
same CPU threads in the same run.

python benchmarks/ctranslate2_export.py --checkpoint runs/multi30k-de-en                  # 100 sentences
python benchmarks/ctranslate2_export.py --checkpoint runs/multi30k-de-en --sentences 300 --threads 4

Both sides rank beams by their summed log-probability (length penalty 0): CTranslate2 divides by
length^α where ours uses GNMT's ((5 + length) / 6)^α, so only α = 0 gives both the same objective.
CTranslate2 has one length limit per batch where ours has one per sentence (source length + 50): outputs
are compared up to ours.
Needs the `export` extra and `transformers` (the converter reads the directory with it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ctranslate2
import torch

from transformer.data.corpus import read_lines
from transformer.export import export_marian
from transformer.search import SearchConfig
from transformer.translate import Translator, translate_ids

VALIDATION = Path(__file__).resolve().parent.parent / "data" / "multi30k" / "val.de.gz"
MAX_TOKENS = 6000  # the token budget of a batch, ours (translate_ids' default) and CTranslate2's
EXTRA_LEN = SearchConfig().extra_len


def best_time(run: Callable[[], list[list[str]]], repeats: int) -> tuple[float, list[list[str]]]:
    """The fastest of `repeats` timed runs after one warm-up (the machine is shared), and the output."""
    out = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    translator = Translator.from_checkpoint(args.checkpoint)
    tokenizer = translator.tokenizer
    limit = translator.model.config.max_len - 1
    sources = [tokenizer.encode(s)[:limit] for s in read_lines(VALIDATION)[: args.sentences]]
    pieces = [[tokenizer.piece(i) for i in ids] + ["</s>"] for ids in sources]
    with tempfile.TemporaryDirectory() as tmp:
        marian, converted = Path(tmp) / "marian", Path(tmp) / "ct2"
        export_marian(args.checkpoint, marian)
        ctranslate2.converters.TransformersConverter(str(marian)).convert(str(converted))
        ct2 = ctranslate2.Translator(str(converted), device="cpu", intra_threads=args.threads)

    rows = []
    for beam in args.beams:

        def ours(beam: int = beam) -> list[list[str]]:
            search = SearchConfig(beam=beam, length_penalty=0.0)
            out = translate_ids(translator.model, sources, search, max_tokens=MAX_TOKENS)
            return [[tokenizer.piece(i) for i in ids] for ids in out]

        def theirs(beam: int = beam) -> list[list[str]]:
            results = ct2.translate_batch(
                pieces,
                beam_size=beam,
                length_penalty=0.0,
                max_batch_size=MAX_TOKENS // beam,
                batch_type="tokens",
                max_decoding_length=max(map(len, pieces)) + EXTRA_LEN,
            )
            return [r.hypotheses[0] for r in results]

        our_time, our_out = best_time(ours, args.repeats)
        ct2_time, ct2_out = best_time(theirs, args.repeats)
        rows.append(
            {
                "beam": beam,
                "sentences": len(sources),
                "identical": sum(
                    a == b[: len(p) + EXTRA_LEN - 1]  # within our length limit (ours forces EOS there)
                    for a, b, p in zip(our_out, ct2_out, pieces, strict=True)
                ),
                "ours_sent_per_s": round(len(sources) / our_time, 1),
                "ctranslate2_sent_per_s": round(len(sources) / ct2_time, 1),
                "speedup": round(our_time / ct2_time, 2),
            }
        )
    print(json.dumps({"threads": args.threads, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
