"""Item 5: positional encoding.

Self-attention is a function of the *set* of its inputs: permuting the source tokens permutes the encoder's
outputs the same way and changes nothing else. Order has to be added, which the sinusoidal table of §3.5
does: every position gets a distinct vector, and PE(p)·PE(p+k) depends on the offset k only. Measured: the
table, the similarity against offset, equivariance with and without positions, and two short trainings
(several seeds each) that differ only in `positional`, translating the test sources as they are and with
their pieces shuffled. Without positions the encoder's output is permuted with its input and the
cross-attention sums over the source positions, so the translation depends on the multiset of source pieces
only: shuffling cannot change it, while a model that reads the order should get worse.
"""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.config import TransformerConfig
from transformer.experiments.common import (
    Context,
    Result,
    Table,
    Task,
    TrainedModel,
    difference,
    greedy_translations,
    in_standard_errors,
    mean_sd,
    pick,
    pyplot,
    save_figure,
    seeded,
    spread,
    teacher_forced_loss,
)
from transformer.experiments.training import recipe_note, variant_runs
from transformer.model import Transformer
from transformer.model.transformer import sinusoidal_table

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"positions": 64, "d_model": 32, "offsets": 32, "length": 12},
    "report": {"positions": 128, "d_model": 128, "offsets": 64, "length": 20},
}


def permutation_error(model: Transformer, src: Tensor, permutation: Tensor) -> float:
    """max |encode(src[:, π])  −  encode(src)[:, π]|: zero for a permutation-equivariant encoder."""
    with torch.no_grad():
        memory, _ = model.encode(src)
        permuted, _ = model.encode(src[:, permutation])
    return float((permuted - memory[:, permutation]).abs().max())


def offset_similarity(table: Tensor, starts: list[int], offsets: int) -> dict[int, list[float]]:
    """PE(p)·PE(p+k) for k = 0 … offsets−1, for each start p."""
    return {p: [float(table[p] @ table[p + k]) for k in range(offsets)] for p in starts}


def shuffled_sources(task: Task, seed: int = 0) -> Task:
    """The task with every test source's pieces in a random order (EOS, added at batching, stays last)
    and the references unchanged."""
    rng = random.Random(seed)
    sources = [rng.sample(src, len(src)) for src in task.test.src]
    return replace(task, test=replace(task.test, src=sources))


def order_test(trained: TrainedModel, task: Task, shuffled: Task) -> dict[str, float]:
    """BLEU on the test sources as they are and shuffled, the share of translations that the shuffling
    leaves unchanged, and the teacher-forced test loss."""
    original, bleu = greedy_translations(trained.model, task)
    permuted, shuffled_bleu = greedy_translations(trained.model, shuffled)
    same = sum(a == b for a, b in zip(original, permuted, strict=True)) / len(original)
    return {
        "bleu": bleu,
        "shuffled_bleu": shuffled_bleu,
        "unchanged": same,
        "test_loss": teacher_forced_loss(trained.model, task.test),
        "train_loss": trained.curve[-1][1],
    }


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "positional",
        "Positional encoding",
        "Attention has no notion of order: without positional encodings the encoder is permutation-"
        "equivariant. Sinusoidal encodings give every position a distinct code whose dot products depend on "
        "the relative offset.",
    )
    table = sinusoidal_table(size["positions"], size["d_model"])
    starts = [0, size["positions"] // 4, size["positions"] - size["offsets"]]
    similarity = offset_similarity(table, starts, size["offsets"])
    offset_spread = max(
        max(abs(a - b) for a, b in zip(similarity[starts[0]], similarity[p], strict=True)) for p in starts
    )

    seeded(0)
    errors = {}
    src = torch.randint(4, 50, (4, size["length"]))
    permutation = torch.randperm(size["length"], generator=torch.Generator().manual_seed(1))
    for positional in ("none", "sinusoidal"):
        config = TransformerConfig(
            src_vocab_size=50,
            tgt_vocab_size=50,
            d_model=size["d_model"],
            n_heads=4,
            d_ff=2 * size["d_model"],
            n_encoder_layers=2,
            n_decoder_layers=1,
            dropout=0.0,
            positional=positional,
        )
        model = Transformer(config).eval()
        errors[positional] = permutation_error(model, src, permutation)
    result.tables.append(
        Table(
            ["positional", "max |encode(permuted) − permuted(encode)|"],
            [[k, v] for k, v in errors.items()],
            f"A random 2-layer encoder (d_model={size['d_model']}), "
            f"4 random sources of {size['length']} tokens, "
            "one random permutation.",
        )
    )

    with_pe, task = variant_runs(context, preset, "baseline")
    without_pe, _ = variant_runs(context, preset, "no-pe", positional="none")
    shuffled = shuffled_sources(task)
    scores: dict[str, list[dict[str, float]]] = {
        name: [order_test(trained, task, shuffled) for trained in runs]
        for name, runs in (("sinusoidal", with_pe), ("none", without_pe))
    }

    column = functools.partial(per_seed, scores)

    result.tables.append(
        Table(
            [
                "positional",
                "greedy BLEU",
                "BLEU, shuffled sources",
                "translations unchanged by the shuffle",
                "test loss (teacher-forced)",
                "final training loss",
                "BLEU per seed",
            ],
            [
                [
                    name,
                    spread(column(name, "bleu"), 1),
                    spread(column(name, "shuffled_bleu"), 1),
                    f"{mean_sd(column(name, 'unchanged'))[0]:.0%}",
                    spread(column(name, "test_loss")),
                    spread(column(name, "train_loss")),
                    ", ".join(f"{v:.1f}" for v in column(name, "bleu")),
                ]
                for name in scores
            ],
            f"Short trainings identical except for `positional`, mean ± sd over {len(with_pe)} seeds; "
            f"{len(task.test)} test sentences, translated as they are and with each source's pieces in a "
            "random order.",
        )
    )
    result.numbers = {"permutation_error": errors, "similarity_spread": offset_spread, "training": scores}

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    image = axes[0].imshow(table.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    axes[0].set(title="sinusoidal PE", xlabel="dimension", ylabel="position")
    fig.colorbar(image, ax=axes[0])
    for p, values in similarity.items():
        axes[1].plot(range(size["offsets"]), values, label=f"PE({p})·PE({p}+k)")
    axes[1].set(title="similarity vs offset", xlabel="offset k", ylabel="dot product")
    axes[1].legend(fontsize=8)
    result.figures.append(save_figure(fig, out_dir, "positional.png"))

    result.findings += [
        f"Encoder without positions: max |encode(permuted) − permuted(encode)| = {errors['none']:.1e} "
        f"(equivariant up to float rounding); with sinusoidal positions: {errors['sinusoidal']:.2f}.",
        f"PE(p)·PE(p+k) is the same function of k for p in {starts} (largest difference "
        f"{offset_spread:.1e}): it depends on the offset only.",
        *training_findings(scores),
    ]
    result.notes.append(recipe_note(preset, task))
    result.notes.append(
        "Without positions the encoder is a bag of words: its outputs are a function of the multiset of "
        "source pieces, each output travelling with its own token, and the cross-attention sums over the "
        "source positions, so nothing downstream can recover the source order. The decoder still learns "
        "some order from its causal mask (position t sees t tokens), so the target side is not a bag of "
        "words. BLEU over a few hundred short sentences moves by about ±1.5 between otherwise equal "
        "models; the seeds' spread is the yardstick for the differences here."
    )
    return result


def per_seed(scores: dict[str, list[dict[str, float]]], name: str, key: str) -> list[float]:
    """One measurement of one model kind, a value per seed."""
    return [run[key] for run in scores[name]]


def training_findings(scores: dict[str, list[dict[str, float]]]) -> list[str]:
    """What the short trainings show, worded from the numbers (which model is ahead, and by how many
    standard errors of the difference), not from the expectation."""

    column = functools.partial(per_seed, scores)

    seeds = len(scores["sinusoidal"])
    bleu_gap, bleu_se = difference(column("sinusoidal", "bleu"), column("none", "bleu"))
    loss_gap, loss_se = difference(column("none", "test_loss"), column("sinusoidal", "test_loss"))
    ahead = "with" if loss_gap > 0 else "without"
    drop = mean_sd(column("sinusoidal", "bleu"))[0] - mean_sd(column("sinusoidal", "shuffled_bleu"))[0]
    drop_none = mean_sd(column("none", "bleu"))[0] - mean_sd(column("none", "shuffled_bleu"))[0]
    return [
        f"Short trainings ({seeds} seeds, mean ± sd): greedy BLEU {spread(column('sinusoidal', 'bleu'), 1)} "
        f"with sinusoidal positions vs {spread(column('none', 'bleu'), 1)} without (difference "
        f"{bleu_gap:+.1f}, {in_standard_errors(bleu_gap, bleu_se)}); test loss "
        f"{spread(column('sinusoidal', 'test_loss'))} vs {spread(column('none', 'test_loss'))} "
        f"(the model {ahead} positions lower by {abs(loss_gap):.2f}, "
        f"{in_standard_errors(loss_gap, loss_se)}).",
        f"Shuffling the source pieces: the no-PE model's BLEU {spread(column('none', 'bleu'), 1)} → "
        f"{spread(column('none', 'shuffled_bleu'), 1)} (change {-drop_none:+.1f}; "
        f"{mean_sd(column('none', 'unchanged'))[0]:.0%} of its translations identical): it cannot see the "
        f"source order. With positions {spread(column('sinusoidal', 'bleu'), 1)} → "
        f"{spread(column('sinusoidal', 'shuffled_bleu'), 1)} (change {-drop:+.1f}): that model reads the "
        "order.",
        "After these few minutes of training on Multi30k's short, descriptive sentences, a model that sees "
        "only the bag of source pieces loses "
        + ("little or nothing" if bleu_gap < 2 * bleu_se else f"{bleu_gap:.1f} BLEU")
        + " against one that sees their order: the order matters to the model with positions (its BLEU "
        "falls when the order is destroyed) more than it adds to its score here.",
    ]
