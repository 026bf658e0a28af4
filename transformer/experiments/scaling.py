"""Item 3: why the dot products are divided by √d_k.

For q and k with independent unit-variance components, q·k = Σᵢ qᵢkᵢ is a sum of d_k unit-variance terms,
so var(q·k) = d_k. Unscaled, the logits of a softmax over n keys then have a spread of √d_k: the softmax
saturates (low entropy, one weight near 1) and its Jacobian diag(p) − ppᵀ, hence the gradient flowing to
the logits, vanishes. Dividing by √d_k restores unit variance whatever d_k is. Measured on random vectors,
then on short trainings (several seeds) that differ only in the scaling (see `training.remove_scaling`).

The gradient is read out through one random scalar per key, L = Σⱼ wⱼuⱼ, so ∂L/∂logits = (diag(p) − ppᵀ)u
measures the softmax's Jacobian alone. A read-out through d_k-dimensional values would multiply it by a
norm that itself grows as √d_k and hide the effect.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from transformer.experiments.common import (
    Context,
    Result,
    Table,
    difference,
    in_standard_errors,
    loss_cells,
    pick,
    pyplot,
    save_figure,
    spread,
    teacher_forced_loss,
)
from transformer.experiments.training import recipe_note, variant_runs

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"d_k": [4, 16, 64], "samples": 4000, "keys": 32},
    "report": {"d_k": [4, 16, 64, 256, 1024], "samples": 20000, "keys": 64},
}


def dot_product_variance(d_k: int, samples: int, generator: torch.Generator) -> float:
    """Sample variance of q·k for q, k with i.i.d. N(0, 1) components."""
    q = torch.randn(samples, d_k, generator=generator, dtype=torch.float64)
    k = torch.randn(samples, d_k, generator=generator, dtype=torch.float64)
    return float((q * k).sum(-1).var())


def softmax_statistics(d_k: int, n_keys: int, scaled: bool, generator: torch.Generator) -> dict[str, float]:
    """Entropy (nats), largest weight, and ‖∂L/∂logits‖ of softmax(q·K/√d_k or q·K) for 256 random
    queries over n_keys random keys, with L = Σⱼ wⱼuⱼ for one N(0, 1) scalar uⱼ per key: a read-out whose
    size does not depend on d_k, so the gradient shows the softmax's Jacobian alone."""
    q = torch.randn(256, 1, d_k, generator=generator, dtype=torch.float64)
    k = torch.randn(256, n_keys, d_k, generator=generator, dtype=torch.float64)
    u = torch.randn(256, n_keys, generator=generator, dtype=torch.float64)
    logits = (q @ k.transpose(1, 2)).squeeze(1) / (math.sqrt(d_k) if scaled else 1.0)  # (256, n_keys)
    logits.requires_grad_(True)
    weights = torch.softmax(logits, dim=-1)
    (weights * u).sum().backward()
    with torch.no_grad():
        entropy = -(weights * weights.clamp_min(1e-300).log()).sum(-1)
        return {
            "entropy": float(entropy.mean()),
            "max_weight": float(weights.max(-1).values.mean()),
            "grad_norm": float(logits.grad.norm(dim=-1).mean()),
        }


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "scaling",
        "The 1/√d_k scaling of the dot products",
        "For unit-variance q and k, q·k has variance d_k; large dot products push the softmax into regions "
        "with extremely small gradients, which the 1/√d_k factor prevents.",
    )
    generator = torch.Generator().manual_seed(0)
    rows, stats = [], {}
    for d_k in size["d_k"]:
        var = dot_product_variance(d_k, size["samples"], generator)
        scaled_var = var / d_k
        raw = softmax_statistics(d_k, size["keys"], False, generator)
        scaled = softmax_statistics(d_k, size["keys"], True, generator)
        stats[d_k] = {"variance": var, "scaled_variance": scaled_var, "unscaled": raw, "scaled": scaled}
        rows.append(
            [
                d_k,
                var,
                scaled_var,
                raw["entropy"],
                scaled["entropy"],
                raw["max_weight"],
                scaled["max_weight"],
                raw["grad_norm"],
                scaled["grad_norm"],
            ]
        )
    result.numbers["random"] = stats
    result.tables.append(
        Table(
            [
                "d_k",
                "var(q·k)",
                "var(q·k/√d_k)",
                "entropy unscaled",
                "entropy scaled",
                "max weight unscaled",
                "max weight scaled",
                "‖∂L/∂logits‖ unscaled",
                "‖∂L/∂logits‖ scaled",
            ],
            rows,
            f"{size['samples']} random pairs for the variance; softmax over {size['keys']} random keys for "
            f"256 queries (uniform attention has entropy ln {size['keys']} = {math.log(size['keys']):.2f}); "
            "L = Σⱼ wⱼuⱼ with one N(0, 1) scalar uⱼ per key.",
        )
    )

    with_scaling, task = variant_runs(context, preset, "heads-1", n_heads=1)
    without, _ = variant_runs(context, preset, "heads-1-unscaled", "unscaled", n_heads=1)
    d_model = with_scaling[0].model.config.d_model
    runs = {"scaled (q·k/√d_k)": with_scaling, "unscaled (q·k)": without}
    training = {
        name: {
            "train_loss": [trained.curve[-1][1] for trained in trained_runs],
            "test_loss": [teacher_forced_loss(trained.model, task.test) for trained in trained_runs],
        }
        for name, trained_runs in runs.items()
    }
    result.numbers["training"] = training
    result.numbers["curves"] = {name: [t.curve for t in trained_runs] for name, trained_runs in runs.items()}
    result.tables.append(
        Table(
            ["logits", "final training loss", "test loss (teacher-forced)", "test loss per seed"],
            [[name, *loss_cells(v)] for name, v in training.items()],
            f"Short trainings with one head of d_k={d_model}, identical except for the scaling; mean ± sd "
            f"over {len(with_scaling)} seeds.",
        )
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ds = size["d_k"]
    axes[0].loglog(ds, [stats[d]["variance"] for d in ds], "o-", label="var(q·k)")
    axes[0].loglog(ds, [stats[d]["scaled_variance"] for d in ds], "s-", label="var(q·k/√d_k)")
    axes[0].loglog(ds, ds, ":", color="grey", label="d_k")
    axes[0].set(title="dot-product variance", xlabel="d_k")
    for key, style in (("unscaled", "--"), ("scaled", "-")):
        axes[1].semilogx(
            ds, [stats[d][key]["max_weight"] for d in ds], "o" + style, label=f"max weight, {key}"
        )
        axes[1].semilogx(
            ds, [stats[d][key]["grad_norm"] for d in ds], "s" + style, label=f"‖∂L/∂logits‖, {key}"
        )
    axes[1].set(title=f"softmax over {size['keys']} keys", xlabel="d_k")
    for (name, trained_runs), colour in zip(runs.items(), ("tab:blue", "tab:red"), strict=True):
        for i, trained in enumerate(trained_runs):
            axes[2].plot(
                [s for s, _ in trained.curve],
                [loss for _, loss in trained.curve],
                color=colour,
                alpha=0.8,
                label=name if i == 0 else None,
            )
    axes[2].set(title=f"training loss, 1 head, d_k={d_model}", xlabel="step", ylabel="cross-entropy")
    for ax in axes:
        ax.legend(fontsize=7)
    result.figures.append(save_figure(fig, out_dir, "scaling.png"))

    largest = ds[-1]
    scaled_test = training["scaled (q·k/√d_k)"]["test_loss"]
    unscaled_test = training["unscaled (q·k)"]["test_loss"]
    gap, gap_se = difference(unscaled_test, scaled_test)
    result.findings += [
        "var(q·k) / d_k = "
        + ", ".join(f"{stats[d]['scaled_variance']:.3f} (d_k={d})" for d in ds)
        + ": the variance grows as d_k, and the scaled logits keep unit variance.",
        f"At d_k={largest}, unscaled: mean max weight {stats[largest]['unscaled']['max_weight']:.2f}, "
        "entropy "
        f"{stats[largest]['unscaled']['entropy']:.2f} nats, gradient to the logits "
        f"{stats[largest]['unscaled']['grad_norm']:.2e}; "
        f"scaled: {stats[largest]['scaled']['max_weight']:.2f}, "
        f"{stats[largest]['scaled']['entropy']:.2f} nats, {stats[largest]['scaled']['grad_norm']:.2e}.",
        "With the read-out L = Σⱼ wⱼuⱼ, ‖∂L/∂logits‖ scaled stays at "
        + ", ".join(f"{stats[d]['scaled']['grad_norm']:.3f}" for d in ds)
        + f" for d_k = {', '.join(map(str, ds))}; unscaled it is "
        + ", ".join(f"{stats[d]['unscaled']['grad_norm']:.3f}" for d in ds)
        + f", {stats[largest]['unscaled']['grad_norm'] / stats[largest]['scaled']['grad_norm']:.2f} of the "
        f"scaled gradient at d_k={largest}.",
        f"Training with one head of d_k={d_model} ({len(with_scaling)} seeds): test loss "
        f"{spread(scaled_test, 3)} scaled vs {spread(unscaled_test, 3)} unscaled (difference "
        f"{gap:+.3f}, {in_standard_errors(gap, gap_se)}); final training "
        f"loss {spread(training['scaled (q·k/√d_k)']['train_loss'], 3)} vs "
        f"{spread(training['unscaled (q·k)']['train_loss'], 3)}.",
    ]
    result.notes.append(recipe_note(preset, task))
    return result
