"""The training loss: label-smoothed cross-entropy over the target vocabulary (Szegedy et al. 2016; §5.4)."""

from __future__ import annotations

import torch
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


ROWS_MULTIPLE = 64  # projected rows are padded up to a multiple of this (see projected_loss)


def projected_loss(hidden: Tensor, projection: nn.Module, target: Tensor, smoothing: float) -> Tensor:
    """`label_smoothed_loss(projection(hidden), target, smoothing)`, projecting only the positions that
    predict a token. Why: the vocabulary projection and its softmax are ~40 % of a small model's training
    step (8k vocabulary), and ~7 % of the positions of token-budget batches are padding that the loss
    ignores anyway. Selecting the rows first saved 7 % of the loss's time in a measurement (273 against
    293 ms fp32 for 4,032 positions with 7 % padding, d_model 256); projecting and normalising in row
    chunks, fused with the gradient, did not pay on the CPU (295–342 ms).

    The selected rows are padded with zero rows (labelled PAD, so ignored) up to a multiple of
    `ROWS_MULTIPLE`. Unpadded, the product's shape was new at nearly every step (the count of real target
    tokens: 150 distinct values in the 201 batches of a Multi30k epoch, 76 more in the next), and oneDNN
    builds, JIT-compiles and caches a kernel for every new shape of a bf16 matmul; padded, a handful of
    shapes recur. One pass over 60 Multi30k batches (small model, 2-core AMX Xeon, runs alternating):
    0.65 and 0.64 s per bf16 step unpadded, 0.56 and 0.51 padded; an hour later, the machine faster,
    0.54 and 0.49 against 0.52 and 0.47 (the whole previous commit against this one); fp32 steps 0.91
    and 0.90 against 0.83 and 0.76 — for ≤ 63 extra rows out of ~2,300.
    """
    keep = target != PAD_ID
    rows, labels = hidden[keep], target[keep]  # (n, d_model), (n,)
    short = -rows.size(0) % ROWS_MULTIPLE
    if short:
        rows = torch.cat([rows, rows.new_zeros(short, rows.size(1))])
        labels = torch.cat([labels, labels.new_full((short,), PAD_ID)])
    return label_smoothed_loss(projection(rows), labels, smoothing)
