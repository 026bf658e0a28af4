"""Item 8: learning-rate warm-up.

The paper's schedule lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) rises linearly for `warmup`
steps, peaks at step = warmup with d_model^-0.5 · warmup^-0.5, then decays as 1/√step. The post-LN
Transformer (LayerNorm after each residual addition, as in the paper) is known to fail at a high learning
rate without it, while pre-LN trains without warm-up (Xiong et al. 2020). Measured: the schedule curves,
and short trainings of a deeper model at a high peak learning rate, over several seeds.
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
        "peak_lr": 3e-3,
    },
    "report": {
        "model": {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_encoder_layers": 4, "n_decoder_layers": 4},
        "steps": 100,
        "warmup": 30,
        "max_tokens": 600,
        "seeds": [1, 2, 3, 4, 5],  # failures counted over five seeds, not an anecdote of one
        "peak_lr": 3e-3,
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
    runs: dict[str, list[dict[str, Any]]] = {}
    peak_lr, warmup = size["peak_lr"], size["warmup"]
    for name, norm_first, warm in SETUPS:
        runs[name] = []
        for seed in size["seeds"]:
            seeded(seed)
            config = small_transformer(task, size["model"], norm_first=norm_first)
            recipe = Recipe(steps=size["steps"], max_tokens=size["max_tokens"], seed=seed, eval_every=10)

            def schedule(step: int, warm: bool = warm) -> float:
                return peak_lr * min(1.0, step / warmup) if warm else peak_lr

            trained = train_model(
                Transformer(config), task.train, recipe, config.d_model, lr_schedule=schedule
            )
            final = trained.curve[-1][1]
            failed = trained.diverged or not math.isfinite(final) or final >= floor
            runs[name].append({"seed": seed, "curve": trained.curve, "final": final, "failed": failed})
    result.tables.append(
        Table(
            ["setup", "failed runs", "final training loss per seed"],
            [
                [
                    name,
                    f"{sum(r['failed'] for r in rs)} / {len(rs)}",
                    ", ".join(f"{r['final']:.2f}" for r in rs),
                ]
                for name, rs in runs.items()
            ],
            f"d_model={size['model']['d_model']}, {size['model']['n_encoder_layers']}+"
            f"{size['model']['n_decoder_layers']} layers, Adam (0.9, 0.98), peak lr {peak_lr}, "
            f"linear warm-up over {warmup} steps or none, then constant; {size['steps']} steps of "
            f"{size['max_tokens']} tokens. A run fails if its loss becomes non-finite or ends at or above "
            f"{floor:.2f} nats, the loss of predicting "
            "target tokens from their frequency alone.",
        )
    )
    result.numbers = {
        "peaks": peaks,
        "unigram_entropy": floor,
        "runs": {
            name: [{k: r[k] for k in ("seed", "final", "failed")} for r in rs] for name, rs in runs.items()
        },
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
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            axes[1].plot(
                [s for s, _ in r["curve"]],
                [loss for _, loss in r["curve"]],
                color=colours[name],
                label=name if i == 0 else None,
                alpha=0.8,
            )
    axes[1].axhline(floor, color="grey", ls=":", lw=0.8, label="unigram entropy")
    axes[1].set(title=f"training loss at peak lr {peak_lr} ({len(size['seeds'])} seeds)", xlabel="step")
    axes[1].legend(fontsize=7)
    result.figures.append(save_figure(fig, out_dir, "warmup.png"))

    result.findings += [
        "The schedule peaks exactly at step = warmup for every (d_model, warmup) above, at "
        "d_model^-0.5 · warmup^-0.5.",
        "Failed runs at peak lr "
        + f"{peak_lr}: "
        + "; ".join(f"{name} {sum(r['failed'] for r in rs)}/{len(rs)}" for name, rs in runs.items())
        + "; mean final loss "
        + ", ".join(f"{name} {sum(r['final'] for r in rs) / len(rs):.2f}" for name, rs in runs.items())
        + ".",
    ]
    return result
