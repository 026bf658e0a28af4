"""The training loss: label-smoothed cross-entropy over the target vocabulary (Szegedy et al. 2016; §5.4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from transformer.data.tokenizer import PAD_ID


def label_smoothed_loss(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Summed cross-entropy against (1 − ε)·one-hot + ε/V, padding ignored.
    logits (..., vocab), target (...)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=smoothing,
        reduction="sum",
    )


def projected_loss(hidden: Tensor, projection: nn.Module, target: Tensor, smoothing: float) -> Tensor:
    """`label_smoothed_loss(projection(hidden), target, smoothing)`, projecting only the positions that
    predict a token. Why: the vocabulary projection and its softmax are ~40 % of a small model's training
    step (8k vocabulary), and ~7 % of the positions of token-budget batches are padding that the loss
    ignores anyway. Selecting the rows first saved 7 % of the loss's time in a measurement (273 against
    293 ms fp32 for 4,032 positions with 7 % padding, d_model 256); projecting and normalising in row
    chunks, fused with the gradient, did not pay on the CPU (295–342 ms)."""
    keep = target != PAD_ID
    return label_smoothed_loss(projection(hidden[keep]), target[keep], smoothing)
