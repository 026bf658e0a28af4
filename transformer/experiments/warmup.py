"""Item 8: learning-rate warm-up.

The paper's schedule lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) rises linearly for `warmup`
steps, peaks at step = warmup with d_model^-0.5 · warmup^-0.5, then decays as 1/√step. The post-LN
Transformer (LayerNorm after each residual addition, as in the paper) is known to fail at a high learning
rate without it, while pre-LN trains without warm-up (Xiong et al. 2020). Measured: the schedule curves,
and short trainings of a deeper model over a sweep of peak learning rates, over several seeds, for post-LN
with and without warm-up and pre-LN without it. What is compared is the final loss at each rate and the
largest rate at which each setup still learns: warm-up is expected to move that rate up for post-LN. The
runs are long against the warm-up (which takes 10% of them), so the lower total learning rate of the
warmed-up runs is a small part of the difference.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from transformer.experiments.common import (
    Context,
    Recipe,
    Result,
    Table,
    pick,
    pyplot,
    save_figure,
    seeded,
    small_transformer,
    spread,
    train_model,
)
from transformer.experiments.training import task_for
from transformer.model import Transformer
from transformer.optim import noam_lr

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_encoder_layers": 2, "n_decoder_layers": 2},
        "steps": 20,
        "warmup": 5,
        "max_tokens": 600,
        "seeds": [1, 2],
        "peak_lrs": [1e-3, 1e-2],
        "eval_every": 5,
    },
    "report": {
        "model": {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_encoder_layers": 4, "n_decoder_layers": 4},
        "steps": 300,
        "warmup": 30,
        "max_tokens": 600,
        "seeds": [1, 2],
        "peak_lrs": [3e-3, 6e-3, 1e-2],  # 300-step probes: post-LN learns at 3e-3 and not at 1e-2
        "eval_every": 25,
    },
}
SCHEDULES = {"warmup": [1000, 4000, 8000], "d_model": [256, 512, 1024]}
SETUPS = (
    ("post-LN, warm-up", False, True),
    ("post-LN, no warm-up", False, False),
    ("pre-LN, no warm-up", True, False),
)


def schedule_peak(d_model: int, warmup: int, last_step: int) -> tuple[int, float]:
    """The step at which noam_lr is largest over 1 … last_step, and the rate there."""
    step = max(range(1, last_step + 1), key=lambda s: noam_lr(s, d_model, warmup))
    return step, noam_lr(step, d_model, warmup)


def unigram_entropy(targets: list[list[int]]) -> float:
    """Cross-entropy (nats) of predicting every target token (and EOS) from its corpus frequency alone."""
    counts = Counter(token for sentence in targets for token in [*sentence, -1])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


# A run that ends this many nats under the unigram entropy has learned more than word frequencies; runs
# that learn end about a nat under it after these steps, runs that fail at or just under it.
LEARNS_BY = 0.25


def largest_learning_rate(final: dict[float, list[float]], floor: float) -> float | None:
    """The largest peak rate whose mean final loss is LEARNS_BY nats or more under `floor` (the loss of
    predicting tokens from their frequency), None if none is; a diverged run counts as not learning."""
    learning = [lr for lr, losses in final.items() if mean_loss(losses) <= floor - LEARNS_BY]
    return max(learning, default=None)


def mean_loss(losses: list[float]) -> float:
    """Mean final loss over seeds; infinite if any seed diverged."""
    return sum(losses) / len(losses) if all(math.isfinite(v) for v in losses) else math.inf


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "warmup",
        "Learning-rate warm-up",
        "The learning rate rises linearly for warmup_steps, then decays with the inverse square root of the "
        "step; without warm-up the (post-LN) Transformer trains badly or diverges.",
    )
    last = 20000
    peaks = []
    for d_model in SCHEDULES["d_model"]:
        for warmup in SCHEDULES["warmup"]:
            step, lr = schedule_peak(d_model, warmup, last)
            peaks.append([d_model, warmup, step, lr, d_model**-0.5 * warmup**-0.5])
    result.tables.append(
        Table(
            ["d_model", "warmup", "measured peak step", "peak lr", "d_model^-0.5 · warmup^-0.5"],
            peaks,
            f"transformer.optim.noam_lr (factor 1) over steps 1…{last}.",
        )
    )

    task = task_for(context, preset)
    floor = unigram_entropy(task.train.tgt)
    warmup, lrs = size["warmup"], size["peak_lrs"]
    # runs[setup][lr] = one result per seed
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for name, norm_first, warm in SETUPS:
        runs[name] = {}
        for peak_lr in lrs:
            runs[name][peak_lr] = []
            for seed in size["seeds"]:
                seeded(seed)
                config = small_transformer(task, size["model"], norm_first=norm_first)
                recipe = Recipe(
                    steps=size["steps"],
                    max_tokens=size["max_tokens"],
                    seed=seed,
                    eval_every=size["eval_every"],
                )

                def schedule(step: int, warm: bool = warm, peak: float = peak_lr) -> float:
                    return peak * min(1.0, step / warmup) if warm else peak

                trained = train_model(
                    Transformer(config), task.train, recipe, config.d_model, lr_schedule=schedule
                )
                final = math.inf if trained.diverged else trained.curve[-1][1]
                context.progress(f"trained {name}, peak lr {peak_lr:g}, seed {seed}: loss {final:.3f}")
                runs[name][peak_lr].append({"seed": seed, "curve": trained.curve, "final": final})
    finals = {
        name: {lr: [r["final"] for r in rs] for lr, rs in by_lr.items()} for name, by_lr in runs.items()
    }
    largest = {name: largest_learning_rate(by_lr, floor) for name, by_lr in finals.items()}

    def cell(losses: list[float]) -> str:
        return spread(losses) if all(math.isfinite(v) for v in losses) else "diverged"

    result.tables.append(
        Table(
            [
                "setup",
                *[f"final loss at lr {lr:g}" for lr in lrs],
                f"largest lr learning (≥ {LEARNS_BY} nats under unigram)",
            ],
            [
                [
                    name,
                    *[cell(finals[name][lr]) for lr in lrs],
                    "none" if largest[name] is None else largest[name],
                ]
                for name in runs
            ],
            f"d_model={size['model']['d_model']}, {size['model']['n_encoder_layers']}+"
            f"{size['model']['n_decoder_layers']} layers, Adam (0.9, 0.98); the peak lr is reached by a "
            f"linear warm-up over {warmup} steps or at once, then held; {size['steps']} steps of "
            f"{size['max_tokens']} tokens; final loss = mean training loss over the last "
            f"{size['eval_every']} steps, mean ± sd over {len(size['seeds'])} seeds. Predicting target "
            f"tokens from their frequency alone gives {floor:.2f} nats.",
        )
    )
    result.numbers = {
        "peaks": peaks,
        "unigram_entropy": floor,
        "final_loss": {name: {str(lr): v for lr, v in by_lr.items()} for name, by_lr in finals.items()},
        "largest_learning_lr": largest,
    }

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = list(range(1, last + 1, 50))
    for warmup_steps in SCHEDULES["warmup"]:
        axes[0].plot(
            steps, [noam_lr(s, 512, warmup_steps) for s in steps], label=f"d_model 512, warmup {warmup_steps}"
        )
    for d_model in (256, 1024):
        axes[0].plot(
            steps, [noam_lr(s, d_model, 4000) for s in steps], "--", label=f"d_model {d_model}, warmup 4000"
        )
    axes[0].set(title="noam_lr schedule", xlabel="step", ylabel="learning rate")
    axes[0].legend(fontsize=7)
    colours = dict(zip(runs, ("tab:green", "tab:red", "tab:blue"), strict=True))

    def drawable(values: list[float]) -> list[float]:  # a diverged run leaves a gap, not an infinity
        return [v if math.isfinite(v) else math.nan for v in values]

    for name, by_lr in finals.items():
        means = drawable([mean_loss(by_lr[lr]) for lr in lrs])
        axes[1].semilogx(lrs, means, "o-", color=colours[name], label=name)
        for lr in lrs:
            axes[1].scatter([lr] * len(by_lr[lr]), drawable(by_lr[lr]), color=colours[name], s=10, alpha=0.5)
    axes[1].axhline(floor, color="grey", ls=":", lw=0.8, label="unigram entropy")
    axes[1].set(
        title=f"final training loss after {size['steps']} steps ({len(size['seeds'])} seeds)",
        xlabel="peak learning rate",
        ylabel="cross-entropy",
    )
    axes[1].legend(fontsize=7)
    result.figures.append(save_figure(fig, out_dir, "warmup.png"))

    result.findings += [
        verdict(largest),
        "Final loss per peak lr ("
        + ", ".join(f"{lr:g}" for lr in lrs)
        + f"; {len(size['seeds'])} seeds, {size['steps']} steps): "
        + "; ".join(f"{name} " + ", ".join(cell(finals[name][lr]) for lr in lrs) for name in runs)
        + f" (unigram entropy {floor:.2f}).",
        "The schedule peaks exactly at step = warmup for every (d_model, warmup) above, at "
        "d_model^-0.5 · warmup^-0.5.",
    ]
    return result


def verdict(largest: dict[str, float | None]) -> str:
    """The comparison the claim is about, in words chosen by the measured largest learning rates."""

    def rate(name: str) -> float:
        return largest[name] or 0.0

    def text(name: str) -> str:
        return "no lr of the sweep" if largest[name] is None else f"lr {largest[name]:g}"

    post_warm, post_cold, pre_cold = "post-LN, warm-up", "post-LN, no warm-up", "pre-LN, no warm-up"
    parts = [
        f"Largest peak lr at which each setup learns: {post_warm} {text(post_warm)}, {post_cold} "
        f"{text(post_cold)}, {pre_cold} {text(pre_cold)}."
    ]
    if rate(post_warm) > rate(post_cold):
        parts.append("Warm-up lets post-LN take a larger learning rate.")
    elif rate(post_warm) == rate(post_cold):
        parts.append("On this sweep warm-up does not change the largest rate at which post-LN learns.")
    else:
        parts.append("On this sweep post-LN learns at a larger rate without warm-up than with it.")
    if rate(pre_cold) > rate(post_cold):
        parts.append("Pre-LN learns without warm-up at a rate where post-LN does not.")
    else:
        parts.append("Without warm-up, pre-LN does not learn at a larger rate than post-LN on this sweep.")
    return " ".join(parts)
