"""Item 9: what the encoder–decoder attention of a trained translator looks at.

Each target position's cross-attention is a distribution over the source positions: a soft alignment,
learned without any alignment supervision. For German→English, where word order is mostly shared, it
should run roughly along the diagonal. Measured: heatmaps (mean over heads, per decoder layer) for real
test2016 sentences and their greedy translations, and per layer the mean correlation between a target
position and the source position it attends to most.
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
    sentence_batch,
    test_sentences,
    trained_translator,
)
from transformer.search import SearchConfig
from transformer.translate import translate_ids

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"sentences": 4, "shown": 2},
    "report": {"sentences": 100, "shown": 3},
}


def cross_attention(model: Any, src: Tensor, hypotheses: list[list[int]]) -> list[Tensor]:
    """Per decoder layer, cross-attention weights (batch, heads, tgt_len, src_len) with the model's own
    translations fed back as the target prefix."""
    tgt_in = collate([([1], h) for h in hypotheses]).tgt_in
    record: list[dict[str, Tensor]] = []
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        model.decode(tgt_in, memory, src_mask, record=record)
    return [layer["cross"] for layer in record]


def diagonal_correlation(weights: Tensor, src_len: int, tgt_len: int) -> float:
    """Pearson correlation between target position i and argmax_j weights[i, j] over the real positions."""
    if tgt_len < 2:
        return float("nan")
    focus = weights[:tgt_len, :src_len].argmax(-1).double()
    position = torch.arange(tgt_len, dtype=torch.float64)
    if focus.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([position, focus]))[0, 1])


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
    correlations = []
    for weights in layers:
        mean_heads = weights.mean(1)  # (batch, tgt_len, src_len)
        values = [
            diagonal_correlation(mean_heads[b], int(src_lens[b]) - 1, len(hypotheses[b]))  # without EOS
            for b in range(len(pairs))
        ]
        values = [v for v in values if v == v]
        correlations.append(sum(values) / len(values))
    best = max(range(len(layers)), key=lambda i: correlations[i])
    result.tables.append(
        Table(
            ["decoder layer", "mean corr(target position, most-attended source position)"],
            [[i + 1, c] for i, c in enumerate(correlations)],
            f"{len(pairs)} test2016 sentences and their greedy translations by {translator.description}; "
            "weights averaged over heads; EOS positions excluded.",
        )
    )
    result.numbers = {"correlation_per_layer": correlations, "best_layer": best + 1}

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
        + ", ".join(f"layer {i + 1} {c:.2f}" for i, c in enumerate(correlations))
        + f" (layer {best + 1} shown)."
    )
    result.notes.append(
        "Heatmaps: cross-attention averaged over heads; rows are target tokens, columns source tokens."
    )
    return result
