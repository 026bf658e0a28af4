"""Translating real text with a trained checkpoint: sentences/s of our search dropping the sentences it
has finished (the default) and keeping them to the end of their batch, and of MarianMTModel.generate
running the same trained weights, on the same batches, in one process.

    python benchmarks/translation.py --checkpoint runs/multi30k-de-en                  # test2016, fp32
    python benchmarks/translation.py --checkpoint runs/multi30k-de-en --precision bf16 --repeats 5
    python benchmarks/translation.py --checkpoint runs/multi30k-de-en --sampling   # also drawn translations

decode.py feeds random weights a fixed amount of work, every sentence of a batch stopping at the same
step; real sentences end at their own lengths, and a batch that `translate` makes holds hundreds of them,
so until the longest one ends most rows decode padding unless the finished sentences leave the batch.
This measures that on the run's own test split, as `transformer translate` decodes it (packed weights,
token-budget batches sorted by length), and counts the sentences each search translates as the
dropping search does. Marian gets the checkpoint's weights through transformer.export's exact mapping
(in memory; needs the `bench` extra), each batch's length limit (its longest source + 50; ours is per
sentence) and the same length penalty α, which it applies as length^α where ours uses ((5 + length)/6)^α:
greedy translations should all agree, beam ones mostly. With --sampling, the translations drawn
unrestricted, from the top 10 and from the nucleus of 0.9 (`--sampling`'s settings), against greedy
search and against `generate(do_sample=True)` with the same settings. Prints JSON and updates
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from transformer.data.corpus import read_split
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.export import marian_config, marian_vocab_order, to_marian_state_dict
from transformer.search import Sampling, SearchConfig, search_name
from transformer.translate import MAX_TOKENS, Translator, source_batches, translate_ids

# What --sampling draws with: unrestricted (back-translation's), from the top 10, from the nucleus of 0.9.
SAMPLINGS = {
    "sampling": Sampling(),
    "sampling, top-k 10": Sampling(top_k=10),
    "sampling, top-p 0.9": Sampling(top_p=0.9),
}


def searches(
    translator: Translator,
    sources: list[list[int]],
    beams: list[int],
    marian: nn.Module | None,
    marian_budgets: Sequence[int] = (),
    sampling: bool = False,
) -> dict[str, Callable[[], list[list[int]]]]:
    """Per beam size: ours dropping finished sentences, ours keeping them, and Marian's generate on the
    same batches and, for each of `marian_budgets`, on batches of that many tokens (smaller batches
    lose less to sentences that have finished, which `generate` keeps decoding). With `sampling`, ours
    and Marian's drawing with each of SAMPLINGS."""
    runs = {}
    for name, how in SAMPLINGS.items() if sampling else ():
        runs[name] = _translate(translator, sources, SearchConfig(beam=1, sampling=how))
        if marian is not None:
            penalty, extra = translator.train_config.length_penalty, SearchConfig().extra_len
            runs[f"{name}, MarianMTModel"] = _generate(marian, sources, 1, penalty, extra, sampling=how)
    penalty = translator.train_config.length_penalty
    for beam in beams:
        kind = search_name(beam)
        config = SearchConfig(beam=beam, length_penalty=penalty)
        runs[f"{kind}, dropping finished"] = _translate(translator, sources, config)
        keeping = dataclasses.replace(config, drop_finished=False)
        runs[f"{kind}, keeping finished"] = _translate(translator, sources, keeping)
        if marian is not None:
            runs[f"{kind}, MarianMTModel"] = _generate(marian, sources, beam, penalty, config.extra_len)
            for budget in marian_budgets:
                runs[f"{kind}, MarianMTModel, {budget}-token batches"] = _generate(
                    marian, sources, beam, penalty, config.extra_len, budget
                )
    return runs


def _translate(translator: Translator, sources: list[list[int]], search: SearchConfig) -> Callable:
    def run() -> list[list[int]]:
        return translate_ids(translator.model, sources, search, max_tokens=MAX_TOKENS)

    return run


def marian_twin(model: nn.Module) -> nn.Module | None:
    """The checkpoint's own weights in a `MarianMTModel`, or None without `transformers` (the `bench`
    extra) or for a model Marian cannot express."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        state = to_marian_state_dict(model)
    except TransformerError:
        return None
    twin = transformers.MarianMTModel(transformers.MarianConfig(**marian_config(model.config)))
    missing, unexpected = twin.load_state_dict(state, strict=False)
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    if unexpected or set(missing) - tied:  # only the embedding's tied copies may be left to the tie
        raise RuntimeError(f"the Marian twin does not take the weights: {missing} {unexpected}")
    return twin.eval()


def _generate(
    marian: nn.Module,
    sources: list[list[int]],
    beam: int,
    penalty: float,
    extra: int,
    max_tokens: int = MAX_TOKENS,
    sampling: Sampling | None = None,
) -> Callable:
    """`generate` on the batches `translate_ids` makes (with `max_tokens`: of that budget), the ids mapped
    there and back; drawing with `sampling`'s settings where given (top_k 0: all tokens, not
    transformers' default of 50)."""
    draw = {"do_sample": False}
    if sampling is not None:
        draw = {"do_sample": True, "top_k": sampling.top_k, "top_p": sampling.top_p}
        draw["temperature"] = sampling.temperature
    order = marian_vocab_order(marian.config.vocab_size)  # the exported model's id -> ours
    to_marian = torch.argsort(order)
    pad = marian.config.pad_token_id

    @torch.inference_mode()
    def run() -> list[list[int]]:
        results: list[list[int]] = [[] for _ in sources]
        for chunk, src in source_batches(sources, beam, max_tokens):
            src = torch.where(src == PAD_ID, pad, to_marian[src])
            out = marian.generate(
                input_ids=src,
                attention_mask=src != pad,
                num_beams=beam,
                **draw,
                **({"length_penalty": penalty} if beam > 1 else {}),  # greedy has none
                max_new_tokens=src.size(1) + extra,  # ours: each source's length with EOS + extra
            )
            for i, row in zip(chunk, order[out[:, 1:]].tolist(), strict=True):
                ids = row[: row.index(EOS_ID)] if EOS_ID in row else row
                results[i] = [t for t in ids if t != PAD_ID]
        return results

    return run


def measure(
    checkpoint: str,
    split: str | None,
    precision: str,
    beams: list[int],
    repeats: int,
    limit: int | None = None,
    with_marian: bool = True,
    marian_budgets: Sequence[int] = (),
    sampling: bool = False,
) -> dict[str, Any]:
    """Rows of seconds and sentences/s per search; per beam size the speed-ups of dropping finished
    sentences, the counts of translations equal to the dropping search's, and the speed-up of the same
    search as Marian's (keeping finished sentences, the same batches) over Marian's."""
    translator = Translator.from_checkpoint(checkpoint, precision=precision)
    tc = translator.train_config
    split = split or tc.test_split
    pairs = read_split(tc.data_dir, split, tc.src_lang, tc.tgt_lang)[:limit]
    sources = [translator.tokenizer.encode(source) for source, _ in pairs]
    marian = marian_twin(translator.model) if with_marian else None
    if marian is not None:
        marian.to(next(translator.model.parameters()).dtype)
    runs = searches(translator, sources, beams, marian, marian_budgets, sampling)
    outputs, times, rows = common.time_translations(runs, repeats)
    ratios: dict[str, Any] = {}
    ranges: dict[str, tuple[float, float]] = {}

    def speedup(fast: str, slow: str, kind: str = "") -> None:
        label = f"{fast} vs {slow.removeprefix(f'{kind}, ')}" if kind else f"{fast} vs {slow}"
        ratios[label] = common.paired_speedup(times[fast], times[slow])
        ranges[label] = common.speedup_range(times[fast], times[slow])

    for beam in beams:
        kind = search_name(beam)
        ours = f"{kind}, dropping finished"
        for way in ("keeping finished", "MarianMTModel"):
            other = f"{kind}, {way}"
            if other in times:
                speedup(ours, other, kind)
                same = sum(a == b for a, b in zip(outputs[ours], outputs[other], strict=True))
                ratios[f"{kind}: translations equal, {way}"] = f"{same} of {len(sources)}"
        if f"{kind}, MarianMTModel" in times:
            speedup(f"{kind}, keeping finished", f"{kind}, MarianMTModel", kind)  # Marian's search
            for budget in marian_budgets:
                speedup(ours, f"{kind}, MarianMTModel, {budget}-token batches", kind)
    for name in SAMPLINGS if sampling else ():
        if "greedy, dropping finished" in times:
            speedup(name, "greedy, dropping finished")
        if f"{name}, MarianMTModel" in times:
            speedup(name, f"{name}, MarianMTModel")
    return {
        "direction": f"{tc.src_lang}→{tc.tgt_lang}",
        "split": split,
        "sentences": len(sources),
        "precision": precision,
        "rows": rows,
        "ratios": ratios,
        "ratio_ranges": ranges,
    }


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory (its best weights)")
    parser.add_argument("--split", help="a split of the run's data directory (default: its test split)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-marian", action="store_true", help="leave MarianMTModel out")
    parser.add_argument("--sampling", action="store_true", help="also draw translations (SAMPLINGS)")
    parser.add_argument(
        "--marian-max-tokens",
        type=int,
        nargs="*",
        default=[1000],
        help=f"also run generate on batches of these token budgets (ours: {MAX_TOKENS})",
    )
    args = parser.parse_args()
    measured = measure(
        args.checkpoint,
        args.split,
        args.precision,
        args.beams,
        args.repeats,
        with_marian=not args.no_marian,
        marian_budgets=args.marian_max_tokens,
        sampling=args.sampling,
    )
    result = {"machine": common.machine_info(), "checkpoint": args.checkpoint, **measured}
    table = common.decoding_markdown(measured["rows"], measured["ratios"], measured["ratio_ranges"])
    body = (
        f"{measured['sentences']} sentences of {measured['split']} through `{args.checkpoint}` "
        f"({measured['precision']}):\n\n{table}"
    )
    title = f"Translation of real text, {measured['direction']}, {measured['precision']}"
    common.report(title + (", sampling" if args.sampling else ""), result, body)


if __name__ == "__main__":
    main()
