"""The paper's optimiser (§5.3): Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 and the warm-up schedule

    lr(step) = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5),

which rises linearly for `warmup` steps and then decays as 1/√step. Post-LN Transformers diverge without
the warm-up; the decay keeps late updates small.
"""

from __future__ import annotations

import torch
from torch import nn


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate at optimiser step `step` (counted from 1)."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def build_optimizer(
    model: nn.Module, d_model: int, warmup: int, factor: float = 1.0, weight_decay: float = 0.0
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam and the warm-up schedule, as a LambdaLR so that its state is saved and resumed with the run."""
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=weight_decay
    )
    # LambdaLR multiplies the base lr (1.0) by the lambda of the number of steps taken so far (from 0).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda taken: noam_lr(taken + 1, d_model, warmup, factor)
    )
    return optimizer, scheduler
