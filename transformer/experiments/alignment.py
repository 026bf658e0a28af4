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

Shared pieces are few, and most of them one word ("in"). For every word, the reference is IBM Model 1
(Brown et al., 1993), fitted by EM on the training corpus: a word-translation table t(e | f) learned from
co-occurrence alone, with no notion of position, so an agreement with it is an agreement about words.
At each target word whose Model 1 alignment is a source piece (not its NULL word), is the most-attended
source position that alignment? Against a random source position, the untrained model, and the diagonal
(the source position at the target position's relative place), which is what attention that only keeps
pace with the target would pick.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.data.batching import collate
from transformer.data.corpus import read_split
from transformer.experiments.common import (
    LANGUAGES,
    Context,
    Result,
    Table,
    Translator,
    in_standard_errors,
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
    # all of test2016: few of its words are shared pieces; Model 1 learns from the whole training corpus
    "tiny": {"sentences": 4, "shown": 2, "model1_pairs": 500},
    "report": {"sentences": 1000, "shown": 3, "model1_pairs": None},
}
MODEL1_ITERATIONS = 5  # GIZA++'s default for Model 1
WEAK_CORRELATION = 0.3  # below it (weak, by the usual reading of a correlation) `position_verdict` says so


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


@dataclass(frozen=True)
class Model1:
    """IBM Model 1's word-translation table t(e | f), kept for the (f, e) pairs that co-occur in training
    (EM gives every other pair 0). Source id `vocab_size` is the NULL word."""

    keys: Tensor  # (pairs,) f * (vocab_size + 1) + e, sorted
    probs: Tensor  # (pairs,) t(e | f), float64
    vocab_size: int

    def t(self, f: Tensor, e: Tensor) -> Tensor:
        """t(e | f) elementwise (0 for a pair never seen together)."""
        key = f * (self.vocab_size + 1) + e
        i = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return torch.where(self.keys[i] == key, self.probs[i], 0.0)


def fit_model1(
    pairs: Sequence[tuple[list[int], list[int]]], vocab_size: int, iterations: int = MODEL1_ITERATIONS
) -> Model1:
    """IBM Model 1 by EM from (source ids, target ids) pairs, every target word free to align to any
    source word or to NULL, starting from a uniform table.

    One tensor entry per (target position, source position or NULL) of every pair, so that each EM
    iteration is a few scatter-adds: E-step, each target word's alignment posterior
    t(e | f_j) / sum_j' t(e | f_j'); M-step, t(e | f) = expected count(f, e) / expected count(f).
    """
    width = vocab_size + 1
    cells_f, cells_e, cells_row = [], [], []
    rows = 0
    for source, target in pairs:
        if not target:  # nothing to align (a source alone, as the textbook's loops, adds nothing)
            continue
        f = torch.tensor([*source, vocab_size])  # NULL last
        e = torch.tensor(target)
        cells_f.append(f.repeat_interleave(len(e)))  # (sources * targets,): f_j for each (j, i)
        cells_e.append(e.repeat(len(f)))
        cells_row.append(torch.arange(len(e)).repeat(len(f)) + rows)  # which target word the cell is of
        rows += len(e)
    if not rows:
        raise ValueError("Model 1 needs at least one sentence pair with a target side")
    keys, cell_key = torch.unique(torch.cat(cells_f) * width + torch.cat(cells_e), return_inverse=True)
    row = torch.cat(cells_row)
    key_f = keys // width
    probs = torch.ones(len(keys), dtype=torch.float64)
    for _ in range(iterations):
        cell = probs[cell_key]
        posterior = cell / torch.zeros(rows, dtype=torch.float64).index_add_(0, row, cell)[row]
        counts = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, cell_key, posterior)
        per_f = torch.zeros(width, dtype=torch.float64).index_add_(0, key_f, counts)
        probs = counts / per_f[key_f]
    return Model1(keys, probs, vocab_size)


def model1_positions(
    model1: Model1, sources: list[list[int]], hypotheses: list[list[int]], is_word: Callable[[int], bool]
) -> list[tuple[int, int, list[int]]]:
    """The target positions (pieces that `is_word`) that Model 1 aligns to a source piece rather than
    NULL, as (sentence, target position, the source positions Model 1 scores highest: one, or several
    where it cannot tell them apart, i.e. a repeated piece, or pieces that always occurred together and
    so were given the same t(e | f))."""
    out = []
    for b, (source, hypothesis) in enumerate(zip(sources, hypotheses, strict=True)):
        if not source:
            continue
        f = torch.tensor([*source, model1.vocab_size])
        for t, piece in enumerate(hypothesis):
            if not is_word(piece):
                continue
            scores = model1.t(f, torch.full_like(f, piece))
            best = scores[:-1].max()
            if best > scores[-1]:  # above NULL (and so above 0)
                out.append((b, t, (scores[:-1] == best).nonzero().flatten().tolist()))
    return out


@dataclass(frozen=True)
class Agreement:
    """How often the most-attended source position is a reference's (shared pieces, or Model 1), at the
    positions where the reference has one, beside what the controls score there."""

    trained: list[float]  # per decoder layer
    untrained: list[float]  # the same architecture before training, per decoder layer
    diagonal: float  # the source position at the target position's relative place
    chance: float  # a uniformly random source position
    count: int  # target positions scored


def agreement(
    layers: list[Tensor],
    untrained_layers: list[Tensor],
    positions: list[tuple[int, int, list[int]]],
    sources: list[list[int]],
    hypotheses: list[list[int]],
) -> Agreement:
    """Score `positions` ((sentence, target position, the source positions that count as its own)).

    Attention is read at the decoder position that predicts the target piece: row t of a sentence's
    weights, whose input ends at piece t - 1. The diagonal guesses round(t·|source|/|target|), which is
    what attention that only keeps pace with the target would pick."""

    def hit_rate(focus: Callable[[int, int], int]) -> float:
        return sum(focus(b, t) in places for b, t, places in positions) / len(positions)

    def attention(weights: Tensor) -> float:
        argmax = weights.mean(1).argmax(-1)  # (batch, tgt_len), heads averaged
        return hit_rate(lambda b, t: int(argmax[b, t]))

    def diagonal(b: int, t: int) -> int:
        return min(len(sources[b]) - 1, round(t * len(sources[b]) / len(hypotheses[b])))

    return Agreement(
        trained=[attention(weights) for weights in layers],
        untrained=[attention(weights) for weights in untrained_layers],
        diagonal=hit_rate(diagonal),
        chance=sum(len(places) / len(sources[b]) for b, _, places in positions) / len(positions),
        count=len(positions),
    )


def position_verdict(trained: float, mismatched: float, layer: int) -> str:
    """What the mispaired control says the correlation measures, in words chosen by the two numbers. A
    weak trained correlation (or a negative or undefined one) leaves nothing for the control to split
    into words and position: a drop from 0.04 to -0.03 is no evidence that attention follows the words."""
    if not trained >= WEAK_CORRELATION:  # NaN too
        return (
            f"The correlation is too weak to tell what it measures ({trained:.2f} in layer {layer}, "
            f"{mismatched:.2f} with another sentence's source): the mispaired control needs a diagonal "
            f"to take apart."
        )
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


def _rates(a: Agreement) -> str:
    """'48% (layer 1), 61% (layer 2), against 35% for the diagonal, ...': the numbers both verdicts give."""
    return (
        ", ".join(f"{rate:.0%} (layer {i + 1})" for i, rate in enumerate(a.trained))
        + f", against {a.diagonal:.0%} for the diagonal, {a.chance:.0%} for a random source position and "
        + ", ".join(f"{rate:.0%}" for rate in a.untrained)
        + " untrained"
    )


def model1_verdict(a: Agreement) -> str:
    """The words test's answer: the best layer against the diagonal, the guess that position alone
    makes, in standard errors of the difference of the two rates (binomial, over the same positions)."""
    layer = max(range(len(a.trained)), key=lambda i: a.trained[i])
    best = a.trained[layer]
    gap = best - a.diagonal
    error = math.sqrt((best * (1 - best) + a.diagonal * (1 - a.diagonal)) / a.count)
    points = round(100 * abs(gap))
    apart = f"{points} point{'' if points == 1 else 's'} ({in_standard_errors(gap, error)})"
    if gap > 2 * error:
        verdict = "above the diagonal: attention there follows the words, not position alone."
    elif gap < -2 * error:
        verdict = "below the diagonal: position alone picks the aligned piece more often than attention."
    else:
        verdict = "from the diagonal: this test cannot tell attention to the words from position."
    return (
        f"At the {a.count} target pieces (of two or more characters, with a letter) that IBM Model 1, "
        f"fitted on the training corpus, aligns to a source piece, the most-attended source position is "
        f"that piece in {_rates(a)}. Layer {layer + 1}, the best, is {apart} {verdict}"
    )


def shared_verdict(a: Agreement, pieces: Counter[str]) -> str:
    [(commonest, times)] = pieces.most_common(1)
    return (
        f"At the {a.count} target positions whose piece also occurs in the source (words the two languages "
        f"write alike, {times} of them {commonest}), the most-attended source position is that piece in "
        f"{_rates(a)}."
    )


def agreement_table(a: Agreement, caption: str) -> Table:
    return Table(
        [
            "decoder layer",
            "trained",
            "untrained (same architecture)",
            "the diagonal",
            "a random source position",
        ],
        [
            [i + 1, f"{rate:.1%}", f"{a.untrained[i]:.1%}", f"{a.diagonal:.1%}", f"{a.chance:.1%}"]
            for i, rate in enumerate(a.trained)
        ],
        caption,
    )


def training_model1(translator: Translator, data_dir: Path, pairs: int | None) -> Model1:
    """Model 1 fitted on the first `pairs` training pairs (all for None), in the translator's pieces."""
    corpus = read_split(data_dir, "train", *LANGUAGES)[:pairs]
    sources = translator.tokenizer.encode_batch([de for de, _ in corpus])
    targets = translator.tokenizer.encode_batch([en for _, en in corpus])
    return fit_model1(list(zip(sources, targets, strict=True)), translator.tokenizer.vocab_size)


@dataclass(frozen=True)
class Attended:
    """Test sentences, the trained model's greedy translations of them, and the cross-attention weights
    (per decoder layer) with which the trained model, the same architecture untrained, and the trained
    model given each translation with another sentence's source read them."""

    sources: list[list[int]]  # without EOS and padding
    hypotheses: list[list[int]]
    trained: list[Tensor]
    untrained: list[Tensor]
    mismatched: list[Tensor]
    other: list[int]  # the sentence whose source each translation is given in `mismatched`


def attend(translator: Translator, sentences: list[str]) -> Attended:
    model = translator.model
    src = sentence_batch(translator, sentences)
    lengths = [int(n) for n in (src != model.config.pad_id).sum(1)]
    hypotheses = translate_ids(
        model, [translator.tokenizer.encode(s) for s in sentences], SearchConfig(beam=1)
    )
    seeded(0)
    untrained = Transformer(model.config).eval()
    # every translation against the next sentence's source: same lengths distribution, unrelated words
    other = [(b + 1) % len(sentences) for b in range(len(sentences))]
    return Attended(
        sources=[src[b, : lengths[b] - 1].tolist() for b in range(len(sentences))],
        hypotheses=hypotheses,
        trained=cross_attention(model, src, hypotheses),
        untrained=cross_attention(untrained, src, hypotheses),
        mismatched=cross_attention(model, src[other], hypotheses),
        other=other,
    )


def word_pieces(translator: Translator) -> Callable[[int], bool]:
    """Pieces that stand for a word or a word's part, not punctuation or a lone letter."""

    def is_word(piece: int) -> bool:
        text = translator.tokenizer.piece(piece).lstrip("▁")
        return len(text) >= 2 and any(c.isalpha() for c in text)

    return is_word


def heatmaps(translator: Translator, seen: Attended, layer: int, shown: int, out_dir: Path) -> str:
    """Cross-attention (mean over heads) of one decoder layer for the first `shown` sentences."""
    plt = pyplot()
    fig, axes = plt.subplots(1, shown, figsize=(5 * shown, 4.8))
    for b, ax in enumerate([axes] if shown == 1 else list(axes)):
        src_tokens = [translator.tokenizer.piece(i) for i in seen.sources[b]] + ["</s>"]
        tgt_tokens = [translator.tokenizer.piece(i) for i in seen.hypotheses[b]] + ["</s>"]
        weights = seen.trained[layer][b].mean(0)[: len(tgt_tokens), : len(src_tokens)]
        ax.imshow(weights.numpy(), cmap="Greys", vmin=0)
        ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=7)
        ax.set_title(f"sentence {b + 1}, decoder layer {layer + 1}", fontsize=9)
    return save_figure(fig, out_dir, "alignment.png")


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "alignment",
        "Attention in a trained translator",
        "Encoder–decoder attention learns a soft alignment between target and source words, without "
        "alignment supervision.",
    )
    translator = trained_translator(context, preset)
    pairs = test_sentences(context.data_dir)[: size["sentences"]]
    seen = attend(translator, [de for de, _ in pairs])
    lengths = [len(source) + 1 for source in seen.sources]  # with EOS
    trained = mean_correlations(seen.trained, lengths, seen.hypotheses)
    untrained = mean_correlations(seen.untrained, lengths, seen.hypotheses)
    mismatched = mean_correlations(seen.mismatched, [lengths[b] for b in seen.other], seen.hypotheses)
    correlations = [c for c, _ in trained]
    best = max(range(len(correlations)), key=lambda i: correlations[i])

    def scored(positions: list[tuple[int, int, list[int]]]) -> Agreement | None:
        return (
            agreement(seen.trained, seen.untrained, positions, seen.sources, seen.hypotheses)
            if positions
            else None
        )

    is_word = word_pieces(translator)
    shared_places = shared_positions(seen.sources, seen.hypotheses, is_word)
    shared = scored(shared_places)
    pieces = Counter(translator.tokenizer.piece(seen.hypotheses[b][t]) for b, t, _ in shared_places)
    model1 = training_model1(translator, context.data_dir, size["model1_pairs"])
    context.progress(f"trained IBM Model 1: t(e | f) for {len(model1.keys)} co-occurring piece pairs")
    aligned = scored(model1_positions(model1, seen.sources, seen.hypotheses, is_word))

    if aligned:
        result.tables.append(
            agreement_table(
                aligned,
                f"Target pieces of two or more characters with a letter ({aligned.count} positions) that IBM "
                f"Model 1 ({MODEL1_ITERATIONS} EM iterations on the training pairs, in the same pieces) "
                f"aligns to a source piece rather than to NULL: how often the most-attended source position, "
                f"at the position that predicts the piece, is one Model 1 scores highest (several where it "
                f"cannot tell them apart: a repeated piece, or pieces that always occurred together).",
            )
        )
    result.tables.append(
        Table(
            [
                "decoder layer",
                "trained",
                "untrained (same architecture)",
                "trained, translation paired with another source",
            ],
            [
                [i + 1, *(f"{runs[i][0]:.3f} ({runs[i][1]})" for runs in (trained, untrained, mismatched))]
                for i in range(len(correlations))
            ],
            "Mean corr(target position, most-attended source position), with the number of sentences "
            "where it is defined in brackets (it is not where every target position attends to the same "
            "source position); EOS positions excluded.",
        )
    )
    if shared:
        common = ", ".join(f"{piece} ({n})" for piece, n in pieces.most_common(6))
        result.tables.append(
            agreement_table(
                shared,
                f"Target pieces of two or more characters with a letter that also occur in the source "
                f"({shared.count} positions; most often {common}): how often the most-attended source "
                f"position, at the position that predicts the piece, is that piece.",
            )
        )
    result.numbers = {
        "correlation_per_layer": correlations,
        "sentences_per_layer": [n for _, n in trained],
        "untrained_per_layer": [c for c, _ in untrained],
        "mismatched_per_layer": [c for c, _ in mismatched],
        "best_layer": best + 1,
        "model1_table_entries": len(model1.keys),
    }
    for name, measured in (("model1", aligned), ("shared_piece", shared)):
        if measured:
            result.numbers |= {
                f"{name}_hit_rate": measured.trained,
                f"{name}_hit_rate_untrained": measured.untrained,
                f"{name}_diagonal": measured.diagonal,
                f"{name}_chance": measured.chance,
                f"{name}_positions": measured.count,
            }
    result.figures.append(heatmaps(translator, seen, best, size["shown"], out_dir))
    result.findings += (
        model1_verdict(aligned) if aligned else "Model 1 aligns no target piece of these translations.",
        shared_verdict(shared, pieces)
        if shared
        else "No target piece of these translations is in its source.",
        "Mean correlation between target position and most-attended source position, per decoder layer: "
        + ", ".join(
            f"layer {i + 1} {c:.2f} (untrained {untrained[i][0]:.2f}, with another sentence's source "
            f"{mismatched[i][0]:.2f})"
            for i, c in enumerate(correlations)
        )
        + f"; layer {best + 1} shown.",
        position_verdict(correlations[best], mismatched[best][0], best + 1),
    )
    result.notes += [
        f"Measured on {len(pairs)} test2016 sentences and their greedy translations by "
        f"{translator.description}; attention weights averaged over heads.",
        "Heatmaps: cross-attention averaged over heads; rows are target tokens, columns source tokens.",
    ]
    return result
