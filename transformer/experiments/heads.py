"""Item 6: multi-head attention.

h heads of width d_model/h cost about the same as one head of width d_model, but each head has its own
softmax, so the heads can attend to different positions at once ("different representation subspaces",
§3.2.2). Measured: per-head maps of the trained translator on a real sentence; head diversity as the mean
Jensen–Shannon divergence between the attention distributions of every pair of heads (trained vs the same
architecture at initialisation); and 1 vs 4 vs 8 heads at equal d_model in short trainings.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.experiments.common import (
    Context,
    Result,
    Table,
    TrainedModel,
    difference,
    in_standard_errors,
    loss_cells,
    pick,
    pyplot,
    save_figure,
    seeded,
    sentence_batch,
    spread,
    teacher_forced_loss,
    test_sentences,
    trained_translator,
)
from transformer.experiments.training import recipe_note, variant_runs, variant_size
from transformer.model import Transformer

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"sentences": 4},
    "report": {"sentences": 50},
}
HEAD_COUNTS = (1, 4, 8)


def head_comparison(losses: dict[int, dict[str, list[float]]]) -> str:
    """Which head counts differ by more than the seeds do: each against the best, in standard errors."""
    means = {h: sum(v["test_loss"]) / len(v["test_loss"]) for h, v in losses.items()}
    best = min(means, key=means.__getitem__)
    parts = []
    for h in losses:
        if h == best:
            continue
        gap, se = difference(losses[h]["test_loss"], losses[best]["test_loss"])
        parts.append(f"{h} head(s) {gap:+.3f} ({in_standard_errors(gap, se)})")
    return f"Against {best} heads, the lowest: " + ", ".join(parts) + "."


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between distributions along the last dimension."""
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def head_diversity(weights: Tensor, query_mask: Tensor) -> float:
    """Mean over pairs of heads and real queries of JS(head i ‖ head j); weights (batch, heads, q, k),
    query_mask (batch, q)."""
    values = [
        js_divergence(weights[:, i], weights[:, j])[query_mask]
        for i, j in itertools.combinations(range(weights.size(1)), 2)
    ]
    return float(torch.cat(values).mean()) if values else 0.0


def encoder_records(model: Transformer, src: Tensor) -> list[dict[str, Tensor]]:
    record: list[dict[str, Tensor]] = []
    with torch.no_grad():
        model.encode(src, record)
    return record


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "heads",
        "Multi-head attention",
        "Several heads attend to different positions and relations at once; one head averages them away.",
    )
    translator = trained_translator(context, preset)
    model = translator.model
    sentences = [de for de, _ in test_sentences(context.data_dir)[: size["sentences"]]]
    src = sentence_batch(translator, sentences)
    mask = src != model.config.pad_id
    trained_records = encoder_records(model, src)
    seeded(0)
    fresh = Transformer(model.config).eval()
    fresh_records = encoder_records(fresh, src)
    diversity_rows, diversity = [], {}
    for layer, (trained, initial) in enumerate(zip(trained_records, fresh_records, strict=True)):
        values = (head_diversity(trained["self"], mask), head_diversity(initial["self"], mask))
        diversity[layer + 1] = values
        diversity_rows.append([f"encoder layer {layer + 1}", *values])
    result.tables.append(
        Table(
            ["layer", "mean pairwise JS, trained", "mean pairwise JS, at initialisation"],
            diversity_rows,
            f"Encoder self-attention, {model.config.n_heads} heads, {len(sentences)} test2016 sentences; "
            f"JS divergence in nats (at most ln 2 = {math.log(2):.3f}). "
            f"Trained model: {translator.description}.",
        )
    )

    runs: dict[int, list[TrainedModel]] = {}
    for heads in HEAD_COUNTS:
        # the baseline's head count is the baseline run itself, shared with the other items
        name = "baseline" if heads == variant_size(preset)["n_heads"] else f"heads-{heads}"
        runs[heads], task = variant_runs(context, preset, name, n_heads=heads)
    losses = {
        heads: {
            "train_loss": [trained.curve[-1][1] for trained in trained_runs],
            "test_loss": [teacher_forced_loss(trained.model, task.test) for trained in trained_runs],
        }
        for heads, trained_runs in runs.items()
    }
    d_model = variant_size(preset)["d_model"]  # of the trainings, not of the translator studied above
    result.tables.append(
        Table(
            ["heads", "d_k", "final training loss", "test loss (teacher-forced)", "test loss per seed"],
            [[h, d_model // h, *loss_cells(v)] for h, v in losses.items()],
            f"Short trainings at d_model={d_model}, identical except for n_heads; mean ± sd over "
            f"{len(runs[HEAD_COUNTS[0]])} seeds.",
        )
    )
    result.numbers = {"diversity": diversity, "heads": losses}

    plt = pyplot()
    example = src[:1, : int(mask[0].sum())]
    tokens = [translator.tokenizer.piece(int(i)) for i in example[0]]
    last = encoder_records(model, example)[-1]["self"][0]  # (heads, n, n)
    heads = last.size(0)
    fig, axes = plt.subplots(1, heads + 1, figsize=(3.2 * (heads + 1), 3.6))
    for h in range(heads):
        axes[h].imshow(last[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        axes[h].set_title(f"head {h + 1}", fontsize=9)
        axes[h].set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        axes[h].set_yticks(range(len(tokens)), tokens if h == 0 else [], fontsize=6)
    for h, trained_runs in runs.items():
        colour = None
        for i, trained in enumerate(trained_runs):
            (line,) = axes[-1].plot(
                [s for s, _ in trained.curve],
                [loss for _, loss in trained.curve],
                color=colour,
                alpha=0.8,
                label=f"{h} head(s)" if i == 0 else None,
            )
            colour = line.get_color()
    axes[-1].set(title="training loss", xlabel="step")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"last encoder layer, per head: {sentences[0][:60]}", fontsize=9)
    result.figures.append(save_figure(fig, out_dir, "heads.png"))

    result.findings += [
        "Head diversity (mean pairwise JS, encoder layers 1…): trained "
        + ", ".join(f"{v[0]:.3f}" for v in diversity.values())
        + " vs at initialisation "
        + ", ".join(f"{v[1]:.3f}" for v in diversity.values())
        + " nats.",
        "Equal d_model, short trainings, test loss (mean ± sd over seeds): "
        + ", ".join(f"{h} head(s) {spread(v['test_loss'], 3)}" for h, v in losses.items())
        + ". "
        + head_comparison(losses),
    ]
    result.notes.append(recipe_note(preset, task))
    return result
