"""The paper's optimiser (§5.3): Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 and the warm-up schedule

    lr(step) = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5),

which rises linearly for `warmup` steps and then decays as 1/√step. Post-LN Transformers diverge without
the warm-up; the decay keeps late updates small.

A run with a fixed budget may end the schedule with a cool-down: from a step chosen while training (when
a fraction of the budget is left) the rate falls linearly towards 0, which the step after the budget's last
would reach: the last step still learns (at 0 it would change nothing). The 1/√step
decay never gets small within a short run, and the last updates are the noisiest; the cool-down anneals
them, which is what averaging the last checkpoints only approximates.
"""

from __future__ import annotations

import torch
from torch import nn


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate at optimiser step `step` (counted from 1)."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


class WarmupSchedule:
    """`noam_lr` as the multiplier of a LambdaLR, with an optional linear cool-down at the end.

    It is an object rather than a lambda because LambdaLR saves the attributes of callable objects in its
    state_dict: a resumed run gets back the cool-down's start and end steps with the scheduler's state.
    """

    def __init__(self, d_model: int, warmup: int, factor: float = 1.0) -> None:
        self.d_model, self.warmup, self.factor = d_model, warmup, factor
        self.decay_start: int | None = None  # the last step at the paper's rate
        self.decay_end: int | None = None  # the last step, one rate-step above 0

    def __call__(self, taken: int) -> float:
        """The multiplier of the base lr (1.0) after `taken` steps, i.e. for step taken + 1."""
        step = taken + 1
        if not self.cooling or step <= self.decay_start:
            return noam_lr(step, self.d_model, self.warmup, self.factor)
        peak = noam_lr(self.decay_start, self.d_model, self.warmup, self.factor)
        return peak * max(0.0, (self.decay_end + 1 - step) / (self.decay_end + 1 - self.decay_start))

    def begin_cooldown(self, start: int, end: int) -> None:
        """Fall linearly from the rate of step `start` to that of 0 at step `end + 1`, the first step not
        taken: `end` - `start` steps of equal decrements, the last one at the smallest non-zero rate."""
        if end <= start:
            raise ValueError(f"cool-down must end after it starts, got {start} -> {end}")
        self.decay_start, self.decay_end = start, end

    def cancel_cooldown(self) -> None:
        """Back to the paper's rate (a resumed run given a larger budget cools down anew over it)."""
        self.decay_start = self.decay_end = None

    @property
    def cooling(self) -> bool:
        return self.decay_start is not None

    def done(self, step: int) -> bool:
        """True once the cool-down's last step is taken: the next would be at rate 0."""
        return self.decay_end is not None and step >= self.decay_end


def build_optimizer(
    model: nn.Module, d_model: int, warmup: int, factor: float = 1.0, weight_decay: float = 0.0
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam and the warm-up schedule, as a LambdaLR so that its state is saved and resumed with the run.

    Adam is torch's fused implementation (one kernel over all parameters instead of a dozen small ops
    per tensor): the update of the small model took 8 ms instead of 23 ms on 2 CPU cores, and whole small
    steps ran 0.94-0.97× as fast with the for-loop Adam (benchmarks/train_step.py). Same arithmetic as
    the for-loop Adam, to float rounding."""
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=weight_decay, fused=True
    )
    # LambdaLR multiplies the base lr (1.0) by the schedule of the number of steps taken so far (from 0).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(d_model, warmup, factor))
    return optimizer, scheduler
