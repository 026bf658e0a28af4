"""Item 7: the decoder's causal mask.

Masked scores are set to −∞ before the softmax, so future positions get exactly zero weight and each row
is the softmax over the visible prefix alone (renormalised, not merely truncated). Without the mask, a
decoder trained with teacher forcing can read the very token it is asked to predict from its input (the
target shifted right holds it one position later): its teacher-forced loss falls towards zero, but at
generation time that future does not exist yet and the output is garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
from transformer.model import scaled_dot_product_attention
from transformer.model.transformer import causal_mask
from transformer.search import SearchConfig
from transformer.translate import translate_ids

SIZES: dict[str, dict[str, Any]] = {"tiny": {"n": 8, "d_k": 16}, "report": {"n": 16, "d_k": 64}}


def mask_check(n: int, d_k: int) -> dict[str, float]:
    """Weights of masked (causal) attention on random inputs: the largest weight on a future position,
    the largest |row sum − 1|, and the largest difference from a softmax over the visible prefix only."""
    seeded(0)
    q, k, v = (torch.randn(2, 4, n, d_k) for _ in range(3))
    _, weights = scaled_dot_product_attention(q, k, v, causal_mask(n, n))
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    scores = q @ k.transpose(-2, -1) / d_k**0.5
    prefix_error = max(
        float((weights[..., i, : i + 1] - torch.softmax(scores[..., i, : i + 1], dim=-1)).abs().max())
        for i in range(n)
    )
    return {
        "max_future_weight": float(weights[..., future].abs().max()),
        "max_row_sum_error": float((weights.sum(-1) - 1).abs().max()),
        "max_prefix_softmax_error": prefix_error,
        "weights": weights[0, 0],
    }


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "masking",
        "Masking in the decoder",
        "The decoder's self-attention must not see future target tokens: masked positions get zero weight, "
        "and a model trained without the mask learns to copy the answer from its input and cannot generate.",
    )
    check = mask_check(size["n"], size["d_k"])
    weights = check.pop("weights")
    result.tables.append(
        Table(
            ["measure", "value"],
            [[k.replace("_", " "), v] for k, v in check.items()],
            "Explicit attention with the causal mask, random q, k, v "
            f"(2×4 heads, n={size['n']}, d_k={size['d_k']}).",
        )
    )

    masked, task = variant(context, preset, "baseline")
    unmasked, _ = variant(context, preset, "no-mask", "no-mask")
    scores, examples = {}, {}
    first = task.test.src[:1]
    for name, trained in (("with causal mask", masked), ("without causal mask", unmasked)):
        scores[name] = {
            "train_loss": trained.curve[-1][1],
            "test_loss": teacher_forced_loss(trained.model, task.test),
            "bleu": greedy_bleu(trained.model, task),
        }
        output = translate_ids(trained.model, first, SearchConfig(beam=1))[0]
        examples[name] = task.tokenizer.decode(output)
    result.tables.append(
        Table(
            [
                "decoder",
                "final training loss",
                "test loss (teacher-forced)",
                "greedy BLEU",
                "greedy output, sentence 1",
            ],
            [[k, v["train_loss"], v["test_loss"], v["bleu"], examples[k][:80]] for k, v in scores.items()],
            f"Reference for sentence 1: {task.test.tgt_text[0]}",
        )
    )
    result.numbers = {"check": check, "training": scores}

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].imshow(weights.numpy(), cmap="viridis")
    axes[0].set(title="causal attention weights (one head)", xlabel="key position", ylabel="query position")
    for name, trained in (("with causal mask", masked), ("without causal mask", unmasked)):
        axes[1].plot([s for s, _ in trained.curve], [loss for _, loss in trained.curve], label=name)
    axes[1].set(title="teacher-forced training loss", xlabel="step", ylabel="cross-entropy")
    axes[1].legend(fontsize=8)
    result.figures.append(save_figure(fig, out_dir, "masking.png"))

    with_mask, without = scores["with causal mask"], scores["without causal mask"]
    result.findings += [
        f"Future positions receive weight {check['max_future_weight']:.1g} (exactly zero); rows sum to 1 "
        f"within {check['max_row_sum_error']:.1e} and equal the softmax over the prefix alone within "
        f"{check['max_prefix_softmax_error']:.1e}.",
        f"Trained without the mask: teacher-forced test loss {without['test_loss']:.3f} "
        f"(vs {with_mask['test_loss']:.3f} "
        f"with it), but greedy BLEU {without['bleu']:.1f} (vs {with_mask['bleu']:.1f}).",
    ]
    result.notes.append(recipe_note(preset, task, single_seed=True))
    return result
