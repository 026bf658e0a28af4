"""Short trainings on the small Multi30k task, shared by the experiments that compare model variants.

The variants differ from one baseline in one respect each (no positional encoding, no causal mask, no
√d_k scaling, 1 or 8 heads), and are trained with the same data order, steps and schedule; each is trained
once per seed and report and cached in the context. The differences between variants are often a few
hundredths of a nat, the size of the seed-to-seed noise, so the comparisons that are close train every
variant with several seeds (`variant_runs`) and report mean ± sd. Model changes that the config does not
offer (no mask, no scaling) are made with hooks on an unchanged model, so the model code stays the
paper's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from transformer.experiments.common import (
    Context,
    Recipe,
    Task,
    TrainedModel,
    pick,
    seeded,
    small_transformer,
    train_model,
    translation_task,
)
from transformer.model import MultiHeadAttention, Transformer

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "task": (400, 40, 400),  # training pairs, test pairs, vocabulary size
        "model": {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_encoder_layers": 1, "n_decoder_layers": 1},
        "recipe": Recipe(steps=40, max_tokens=800, warmup=20, lr_factor=2.0, eval_every=10),
        "seeds": (1, 2),
    },
    "report": {
        "task": (29000, 300, 2000),
        "model": {"d_model": 128, "n_heads": 4, "d_ff": 512, "n_encoder_layers": 2, "n_decoder_layers": 2},
        "recipe": Recipe(steps=600, max_tokens=1200, warmup=150, lr_factor=0.5, eval_every=50),
        "seeds": (1, 2, 3),  # the first is the recipe's seed: the single-run items use that run
    },
}


def remove_causal_mask(model: Transformer) -> Transformer:
    """Let every decoder self-attention see the whole target (future tokens included)."""

    def drop_mask(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "mask": None, "is_causal": False}

    for block in model.decoder.layers:
        block.self_attn.register_forward_pre_hook(drop_mask, with_kwargs=True)
    return model


def remove_scaling(model: nn.Module) -> nn.Module:
    """Attention logits q·k instead of q·k/√d_k: the queries are multiplied by √d_k on their way in,
    which is the same function of the same parameters, on the fused path as on the explicit one."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            factor = math.sqrt(module.d_k)

            def scale_up(
                _linear: nn.Module, _inputs: tuple, output: Tensor, factor: float = factor
            ) -> Tensor:
                return output * factor

            module.w_q.register_forward_hook(scale_up)
    return model


CHANGES = {"no-mask": remove_causal_mask, "unscaled": remove_scaling}


def task_for(context: Context, preset: str) -> Task:
    n_train, n_test, vocab = pick(preset, SIZES)["task"]
    return translation_task(context, n_train, n_test, vocab)


def variant(
    context: Context,
    preset: str,
    name: str,
    change: str | None = None,
    *,
    seed: int | None = None,
    **config_changes: Any,
) -> tuple[TrainedModel, Task]:
    """Train (once per context and seed) the baseline with `config_changes` and an optional hook `change`.
    The seed sets the initialisation, the dropout and the data order; by default the recipe's."""
    size = pick(preset, SIZES)
    task = task_for(context, preset)
    recipe = size["recipe"] if seed is None else replace(size["recipe"], seed=seed)

    def make() -> TrainedModel:
        seeded(recipe.seed)
        config = small_transformer(task, size["model"], **config_changes)
        model = Transformer(config)
        if change is not None:
            CHANGES[change](model)
        trained = train_model(model, task.train, recipe, config.d_model)
        context.progress(f"trained {name}, seed {recipe.seed}: loss {trained.curve[-1][1]:.3f}")
        return trained

    return context.memo(f"variant:{preset}:{name}:{recipe.seed}", make), task


def variant_runs(
    context: Context, preset: str, name: str, change: str | None = None, **config_changes: Any
) -> tuple[list[TrainedModel], Task]:
    """`variant` once per seed of the preset, the recipe's seed first."""
    runs = [
        variant(context, preset, name, change, seed=seed, **config_changes)[0]
        for seed in pick(preset, SIZES)["seeds"]
    ]
    return runs, task_for(context, preset)


def variant_size(preset: str) -> dict[str, int]:
    """The trainings' model size (d_model, n_heads, d_ff, layers): the baseline's, before any change."""
    return dict(pick(preset, SIZES)["model"])


def baseline(context: Context, preset: str) -> tuple[TrainedModel, Task]:
    return variant(context, preset, "baseline")


def recipe_note(preset: str, task: Task, *, single_seed: bool = False) -> str:
    """How the variants were trained; `single_seed` for an item that uses the recipe's seed only."""
    size = pick(preset, SIZES)
    m, r = size["model"], size["recipe"]
    seeds = f"seed {r.seed}" if single_seed else f"seeds {', '.join(map(str, size['seeds']))}"
    return (
        f"Short trainings on {task.description}; Transformer d_model={m['d_model']}, {m['n_heads']} heads, "
        f"d_ff={m['d_ff']}, {m['n_encoder_layers']}+{m['n_decoder_layers']} layers, {r.steps} Adam steps of "
        f"{r.max_tokens} tokens, warm-up {r.warmup}, lr factor {r.lr_factor} (peak lr "
        f"{r.lr_factor * m['d_model'] ** -0.5 * r.warmup**-0.5:.1e}), {seeds}. BLEU is greedy "
        "on the test sentences listed. These are minutes of training, far from convergence: compare the "
        "variants with each other, not with published scores."
    )
