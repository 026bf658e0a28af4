"""Item 9: what the encoder–decoder attention of a trained translator looks at.

Each target position's cross-attention is a distribution over the source positions: a soft alignment,
learned without any alignment supervision. For German→English, where word order is mostly shared, it
should run roughly along the diagonal. Measured: heatmaps (mean over heads, per decoder layer) for real
test2016 sentences and their greedy translations, and per layer the mean correlation between a target
position and the source position it attends to most.

A correlation means little alone: longer sentences on both sides, or attention that drifts rightwards
with the target position whatever the words are, give one too. So the same number is measured for two
controls on the same sentences and translations: the same architecture untrained (what the metric gives
before anything is learned), and the trained model with every translation paired with another sentence's
source (what position alone gives, without the words that should be aligned).

The correlation cannot tell attention to the right word from attention that only keeps pace with the
target. Words that both languages write the same (German and English "in", names, some colours: one
piece in the joint vocabulary) can: at each target position whose next piece also occurs in the source,
is the most-attended source position an occurrence of that piece? Against the rate attention to a random
source position would give, and against the untrained model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.data.batching import collate
from transformer.experiments.common import (
    Context,
    Result,
    Table,
    pick,
    pyplot,
    save_figure,
    seeded,
    sentence_batch,
    test_sentences,
    trained_translator,
)
from transformer.model import Transformer
from transformer.search import SearchConfig
from transformer.translate import translate_ids

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"sentences": 4, "shown": 2},
    "report": {"sentences": 1000, "shown": 3},  # all of test2016: few of its words are shared pieces
}


def cross_attention(model: Any, src: Tensor, hypotheses: list[list[int]]) -> list[Tensor]:
    """Per decoder layer, cross-attention weights (batch, heads, tgt_len, src_len) with the model's own
    translations fed back as the target prefix."""
    # collate builds the decoder input (BOS + tokens, padded); the sources come separately, as `src`,
    # so each pair's source side is left empty
    tgt_in = collate([([], h) for h in hypotheses]).tgt_in
    record: list[dict[str, Tensor]] = []
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        model.decode(tgt_in, memory, src_mask, record=record)
    return [layer["cross"] for layer in record]


def diagonal_correlation(weights: Tensor, src_len: int, tgt_len: int) -> float:
    """Pearson correlation between target position i and argmax_j weights[i, j] over the real positions;
    NaN where it is undefined (fewer than two target positions, or every one attending to the same source
    position), so that such sentences are left out of the mean rather than counted as 0."""
    if tgt_len < 2:
        return float("nan")
    focus = weights[:tgt_len, :src_len].argmax(-1).double()
    position = torch.arange(tgt_len, dtype=torch.float64)
    if focus.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([position, focus]))[0, 1])


def mean_correlations(
    layers: list[Tensor], src_lens: list[int], hypotheses: list[list[int]]
) -> list[tuple[float, int]]:
    """Per decoder layer: the mean diagonal correlation (head-averaged weights, EOS positions excluded)
    over the sentences where it is defined, and how many those are."""
    means = []
    for weights in layers:
        mean_heads = weights.mean(1)  # (batch, tgt_len, src_len)
        values = [
            diagonal_correlation(mean_heads[b], src_lens[b] - 1, len(hypotheses[b]))  # without EOS
            for b in range(len(hypotheses))
        ]
        defined = [v for v in values if v == v]
        means.append((sum(defined) / len(defined) if defined else float("nan"), len(defined)))
    return means


def shared_positions(
    sources: list[list[int]], hypotheses: list[list[int]], is_word: Callable[[int], bool]
) -> list[tuple[int, int, list[int]]]:
    """The target positions whose piece (`is_word`) also occurs in the source (`sources` without EOS), as
    (sentence, target position, the source positions holding that piece)."""
    return [
        (b, t, places)
        for b, (source, hypothesis) in enumerate(zip(sources, hypotheses, strict=True))
        for t, piece in enumerate(hypothesis)
        if is_word(piece) and (places := [j for j, s in enumerate(source) if s == piece])
    ]


def shared_piece_attention(
    layers: list[Tensor], positions: list[tuple[int, int, list[int]]], sources: list[list[int]]
) -> list[tuple[float, float, int]]:
    """Per decoder layer, over the `shared_positions`: how often the head-averaged attention's
    most-attended source position, at the position that predicts the piece, is an occurrence of it; the
    rate a uniformly random source position would give; and how many such positions there are."""
    if not positions:
        return [(math.nan, math.nan, 0)] * len(layers)
    chance = sum(len(places) / len(sources[b]) for b, _, places in positions) / len(positions)
    out = []
    for weights in layers:
        focus = weights.mean(1).argmax(-1)  # (batch, tgt_len): row t predicts hypotheses[b][t]
        hits = sum(int(focus[b, t]) in places for b, t, places in positions)
        out.append((hits / len(positions), chance, len(positions)))
    return out


def position_verdict(trained: float, mismatched: float, layer: int) -> str:
    """What the mispaired control says the correlation measures, in words chosen by the two numbers."""
    if mismatched >= 0.8 * trained:
        return (
            f"Most of that correlation survives pairing each translation with another sentence's source "
            f"({mismatched:.2f} against {trained:.2f} in layer {layer}): it measures attention moving "
            f"along the source as the target grows, more than attention to the words being translated."
        )
    return (
        f"Pairing each translation with another sentence's source lowers it to {mismatched:.2f} (from "
        f"{trained:.2f} in layer {layer}): the attention follows the words, not position alone."
    )


def shared_verdict(
    shared: list[tuple[float, float, int]], untrained: list[tuple[float, float, int]], pieces: Counter[str]
) -> str:
    count = shared[0][2]
    if count == 0:
        return "No target piece of these translations occurs in their source, so none tests the words."
    [(commonest, times)] = pieces.most_common(1)
    return (
        f"At the {count} target positions whose piece also occurs in the source (words the two languages "
        f"write alike, {times} of them {commonest}), the most-attended source position is that piece in "
        + ", ".join(f"{rate:.0%} (layer {i + 1})" for i, (rate, _, _) in enumerate(shared))
        + f" of them, against {shared[0][1]:.0%} for a random source position and "
        + ", ".join(f"{rate:.0%}" for rate, _, _ in untrained)
        + " untrained."
    )


def shared_table(
    shared: list[tuple[float, float, int]], untrained: list[tuple[float, float, int]], pieces: Counter[str]
) -> Table:
    common = ", ".join(f"{piece} ({n})" for piece, n in pieces.most_common(6))
    return Table(
        ["decoder layer", "trained", "untrained (same architecture)", "a random source position"],
        [
            [i + 1, f"{rate:.1%}", f"{untrained[i][0]:.1%}", f"{chance:.1%}"]
            for i, (rate, chance, _) in enumerate(shared)
        ],
        f"Target pieces that also occur in the source ({shared[0][2]} positions of the same translations; "
        f"pieces of two characters or more with a letter; most often {common}): how often the most-attended "
        f"source position, at the position that predicts the piece, is that piece.",
    )


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "alignment",
        "Attention in a trained translator",
        "Encoder–decoder attention learns a soft alignment between target and source words, without "
        "alignment supervision.",
    )
    translator = trained_translator(context, preset)
    model = translator.model
    pairs = test_sentences(context.data_dir)[: size["sentences"]]
    src = sentence_batch(translator, [de for de, _ in pairs])
    src_lens = (src != model.config.pad_id).sum(1)
    hypotheses = translate_ids(
        model, [translator.tokenizer.encode(de) for de, _ in pairs], SearchConfig(beam=1)
    )
    layers = cross_attention(model, src, hypotheses)
    lengths = [int(n) for n in src_lens]
    trained = mean_correlations(layers, lengths, hypotheses)
    seeded(0)
    untrained_layers = cross_attention(Transformer(model.config).eval(), src, hypotheses)
    untrained = mean_correlations(untrained_layers, lengths, hypotheses)
    # every translation against the next sentence's source: same lengths distribution, unrelated words
    other = [(b + 1) % len(pairs) for b in range(len(pairs))]
    mismatched = mean_correlations(
        cross_attention(model, src[other], hypotheses), [lengths[b] for b in other], hypotheses
    )
    correlations = [c for c, _ in trained]
    best = max(range(len(layers)), key=lambda i: correlations[i])
    sources = [src[b, : lengths[b] - 1].tolist() for b in range(len(pairs))]  # without EOS

    def is_word(piece: int) -> bool:  # not punctuation, not a letter left over from a split word
        text = translator.tokenizer.piece(piece).lstrip("▁")
        return len(text) >= 2 and any(c.isalpha() for c in text)

    positions = shared_positions(sources, hypotheses, is_word)
    shared = shared_piece_attention(layers, positions, sources)
    shared_untrained = shared_piece_attention(untrained_layers, positions, sources)
    pieces = Counter(translator.tokenizer.piece(hypotheses[b][t]) for b, t, _ in positions)
    rows = [
        [i + 1, *(f"{runs[i][0]:.3f} ({runs[i][1]})" for runs in (trained, untrained, mismatched))]
        for i in range(len(layers))
    ]
    result.tables.append(
        Table(
            [
                "decoder layer",
                "trained",
                "untrained (same architecture)",
                "trained, translation paired with another source",
            ],
            rows,
            f"Mean corr(target position, most-attended source position), with the number of sentences "
            f"where it is defined in brackets (it is not where every target position attends to the same "
            f"source position). {len(pairs)} test2016 sentences and their greedy translations by "
            f"{translator.description}; weights averaged over heads; EOS positions excluded.",
        )
    )
    if shared[0][2]:
        result.tables.append(shared_table(shared, shared_untrained, pieces))
    result.numbers = {
        "shared_piece_hit_rate": [rate for rate, _, _ in shared],
        "shared_piece_hit_rate_untrained": [rate for rate, _, _ in shared_untrained],
        "shared_piece_chance": shared[0][1],
        "shared_piece_positions": shared[0][2],
        "correlation_per_layer": correlations,
        "sentences_per_layer": [n for _, n in trained],
        "untrained_per_layer": [c for c, _ in untrained],
        "mismatched_per_layer": [c for c, _ in mismatched],
        "best_layer": best + 1,
    }

    plt = pyplot()
    shown = size["shown"]
    fig, axes = plt.subplots(1, shown, figsize=(5 * shown, 4.8))
    axes = [axes] if shown == 1 else list(axes)
    for b, ax in enumerate(axes):
        src_tokens = [translator.tokenizer.piece(int(i)) for i in src[b, : int(src_lens[b])]]
        tgt_tokens = [translator.tokenizer.piece(i) for i in hypotheses[b]] + ["</s>"]
        weights = layers[best][b].mean(0)[: len(tgt_tokens), : len(src_tokens)]
        ax.imshow(weights.numpy(), cmap="Greys", vmin=0)
        ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=7)
        ax.set_title(f"sentence {b + 1}, decoder layer {best + 1}", fontsize=9)
    result.figures.append(save_figure(fig, out_dir, "alignment.png"))

    result.findings += (
        shared_verdict(shared, shared_untrained, pieces),
        "Mean correlation between target position and most-attended source position, per decoder layer: "
        + ", ".join(
            f"layer {i + 1} {c:.2f} (untrained {untrained[i][0]:.2f}, with another sentence's source "
            f"{mismatched[i][0]:.2f})"
            for i, c in enumerate(correlations)
        )
        + f"; layer {best + 1} shown.",
        position_verdict(correlations[best], mismatched[best][0], best + 1),
    )
    result.notes.append(
        "Heatmaps: cross-attention averaged over heads; rows are target tokens, columns source tokens."
    )
    return result
