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
"""

from __future__ import annotations

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
    "report": {"sentences": 100, "shown": 3},
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
    untrained = mean_correlations(
        cross_attention(Transformer(model.config).eval(), src, hypotheses), lengths, hypotheses
    )
    # every translation against the next sentence's source: same lengths distribution, unrelated words
    other = [(b + 1) % len(pairs) for b in range(len(pairs))]
    mismatched = mean_correlations(
        cross_attention(model, src[other], hypotheses), [lengths[b] for b in other], hypotheses
    )
    correlations = [c for c, _ in trained]
    best = max(range(len(layers)), key=lambda i: correlations[i])
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
    result.numbers = {
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

    result.findings.append(
        "Mean correlation between target position and most-attended source position, per decoder layer: "
        + ", ".join(
            f"layer {i + 1} {c:.2f} (untrained {untrained[i][0]:.2f}, with another sentence's source "
            f"{mismatched[i][0]:.2f})"
            for i, c in enumerate(correlations)
        )
        + f"; layer {best + 1} shown."
    )
    result.notes.append(
        "Heatmaps: cross-attention averaged over heads; rows are target tokens, columns source tokens."
    )
    return result
