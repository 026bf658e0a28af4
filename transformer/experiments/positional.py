"""Item 5: positional encoding.

Self-attention is a function of the *set* of its inputs: permuting the source tokens permutes the encoder's
outputs the same way and changes nothing else. Order has to be added, which the sinusoidal table of §3.5
does: every position gets a distinct vector, and PE(p)·PE(p+k) depends on the offset k only. Measured: the
table, the similarity against offset, equivariance with and without positions, and BLEU of two short
trainings that differ only in `positional`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.config import TransformerConfig
from transformer.experiments.common import (
    Context,
    Result,
    Table,
    greedy_bleu,
    pick,
    pyplot,
    save_figure,
    seeded,
    teacher_forced_loss,
)
from transformer.experiments.training import recipe_note, variant
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
    spread = max(
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

    with_pe, task = variant(context, preset, "baseline")
    without_pe, _ = variant(context, preset, "no-pe", positional="none")
    scores = {}
    for name, trained in (("sinusoidal", with_pe), ("none", without_pe)):
        scores[name] = {
            "bleu": greedy_bleu(trained.model, task),
            "test_loss": teacher_forced_loss(trained.model, task.test),
            "train_loss": trained.curve[-1][1],
        }
    result.tables.append(
        Table(
            ["positional", "greedy BLEU", "test loss (teacher-forced)", "final training loss"],
            [[k, v["bleu"], v["test_loss"], v["train_loss"]] for k, v in scores.items()],
            "Two short trainings, identical except for `positional`.",
        )
    )
    result.numbers = {"permutation_error": errors, "similarity_spread": spread, "training": scores}

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
        f"PE(p)·PE(p+k) is the same function of k for p in {starts} (largest difference {spread:.1e}): it "
        "depends on the offset only.",
        f"Short training: greedy BLEU {scores['sinusoidal']['bleu']:.1f} with sinusoidal positions vs "
        f"{scores['none']['bleu']:.1f} without (test loss {scores['sinusoidal']['test_loss']:.2f} vs "
        f"{scores['none']['test_loss']:.2f}).",
    ]
    result.notes.append(recipe_note(preset, task))
    result.notes.append(
        "Without positions the decoder still learns some order from its causal mask (position t sees t "
        "tokens), so the no-PE model is not a pure bag of words on the target side."
    )
    return result
