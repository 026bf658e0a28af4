"""Our decoding against CTranslate2 running the same checkpoint, exported to MarianMT and converted with
CTranslate2's own converter: sentences/s of each on the same sentences, batches and CPU threads, taking
turns in one run, and how many translations are identical.

python benchmarks/ctranslate2_export.py --checkpoint runs/multi30k-de-en            # test2016, fp32 and int8
python benchmarks/ctranslate2_export.py --checkpoint runs/multi30k-de-en --compute-types float32 --repeats 5

CTranslate2 is an inference engine (C++, its own kernels and caching allocator); we are a PyTorch model
with a search written in Python around it, so this measures what that costs against the engine a
deployment would export to. Its `int8` compute type quantizes the weights (what it recommends on CPU); ours
stays fp32, so only the float32 rows compare like with like. Both sides rank beams by their summed
log-probability (length penalty 0): CTranslate2 divides by length^α where ours uses GNMT's
((5 + length) / 6)^α, so only α = 0 gives both the same objective. Both take the token-budget batches
`translate` makes. CTranslate2 has one length limit per batch where ours has one per sentence (source
length + 50): outputs are compared up to ours. Needs the `export` extra and `transformers` (the converter
reads the directory with it). Prints JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ctranslate2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from transformer.data.corpus import read_split
from transformer.export import export_marian
from transformer.search import SearchConfig, search_name
from transformer.translate import MAX_TOKENS, Translator, source_batches, translate_ids

EXTRA_LEN = SearchConfig().extra_len


def searches(
    translator: Translator,
    sources: list[list[int]],
    engines: dict[str, ctranslate2.Translator],
    beams: list[int],
) -> dict[str, Callable[[], list[list[str]]]]:
    """Per beam size: ours, then CTranslate2 under each compute type, all returning pieces without EOS."""
    tokenizer = translator.tokenizer
    runs: dict[str, Callable[[], list[list[str]]]] = {}
    for beam in beams:

        def ours(beam: int = beam) -> list[list[str]]:
            search = SearchConfig(beam=beam, length_penalty=0.0)
            out = translate_ids(translator.model, sources, search, max_tokens=MAX_TOKENS)
            return [[tokenizer.piece(i) for i in ids] for ids in out]

        kind = search_name(beam)
        runs[f"{kind}, ours"] = ours
        for compute_type, engine in engines.items():
            runs[f"{kind}, CTranslate2 {compute_type}"] = _engine_run(engine, translator, sources, beam)
    return runs


def _engine_run(
    engine: ctranslate2.Translator, translator: Translator, sources: list[list[int]], beam: int
) -> Callable[[], list[list[str]]]:
    """CTranslate2 on the batches ours makes (same sentences together, same order), EOS appended as its
    Marian models expect."""
    piece = translator.tokenizer.piece
    batches = [
        (chunk, [[piece(i) for i in sources[j]] + ["</s>"] for j in chunk])
        for chunk, _ in source_batches(sources, beam, MAX_TOKENS)
    ]

    def run() -> list[list[str]]:
        results: list[list[str]] = [[] for _ in sources]
        for chunk, pieces in batches:
            out = engine.translate_batch(
                pieces,
                beam_size=beam,
                length_penalty=0.0,
                max_decoding_length=max(map(len, pieces)) + EXTRA_LEN,
            )
            for j, result in zip(chunk, out, strict=True):
                results[j] = result.hypotheses[0]
        return results

    return run


def measure(
    checkpoint: str,
    split: str | None,
    beams: list[int],
    compute_types: list[str],
    repeats: int,
    threads: int,
    limit: int | None = None,
) -> dict[str, Any]:
    """Rows of seconds and sentences/s per search; per beam size and compute type our speed relative to
    CTranslate2's (below 1: CTranslate2 is faster) and the count of identical translations."""
    torch.set_num_threads(threads)
    translator = Translator.from_checkpoint(checkpoint)
    tc = translator.train_config
    split = split or tc.test_split
    pairs = read_split(tc.data_dir, split, tc.src_lang, tc.tgt_lang)[:limit]
    room = translator.model.config.max_len - 1  # EOS takes a position
    sources = [translator.tokenizer.encode(source)[:room] for source, _ in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        marian, converted = Path(tmp) / "marian", Path(tmp) / "ct2"
        export_marian(checkpoint, marian)
        ctranslate2.converters.TransformersConverter(str(marian)).convert(str(converted))
        engines = {
            compute_type: ctranslate2.Translator(
                str(converted), device="cpu", compute_type=compute_type, intra_threads=threads
            )
            for compute_type in compute_types
        }
    torch.set_num_threads(threads)  # CTranslate2 sets OpenMP's thread count, which torch shares
    runs = searches(translator, sources, engines, beams)
    outputs, times, rows = common.time_translations(runs, repeats)
    ratios: dict[str, Any] = {}
    for beam in beams:
        kind = search_name(beam)
        ours = f"{kind}, ours"
        for compute_type in compute_types:
            engine = f"CTranslate2 {compute_type}"
            theirs = f"{kind}, {engine}"
            ratios[f"{ours} vs {engine}"] = common.paired_speedup(times[ours], times[theirs])
            same = sum(
                mine == other[: len(source) + EXTRA_LEN]  # within our length limit (ours forces EOS there)
                for mine, other, source in zip(outputs[ours], outputs[theirs], sources, strict=True)
            )
            ratios[f"{kind}: translations equal, {engine}"] = f"{same} of {len(sources)}"
    return {
        "direction": f"{tc.src_lang}→{tc.tgt_lang}",
        "split": split,
        "sentences": len(sources),
        "threads": threads,
        "ctranslate2": ctranslate2.__version__,
        "rows": rows,
        "ratios": ratios,
    }


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory (its best weights)")
    parser.add_argument("--split", help="a split of the run's data directory (default: its test split)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--compute-types", nargs="+", default=["float32", "int8"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measured = measure(
        args.checkpoint, args.split, args.beams, args.compute_types, args.repeats, args.threads
    )
    result = {"machine": common.machine_info(), "checkpoint": args.checkpoint, **measured}
    body = (
        f"{measured['sentences']} sentences of {measured['split']} through `{args.checkpoint}`, "
        f"{measured['threads']} threads each, CTranslate2 {measured['ctranslate2']}; the ratios are our "
        f"speed over CTranslate2's (below 1: it is faster):\n\n"
        f"{common.decoding_markdown(measured['rows'], measured['ratios'])}"
    )
    common.report(f"Against CTranslate2, {measured['direction']}", result, body)


if __name__ == "__main__":
    main()
