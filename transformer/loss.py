"""The training loss: label-smoothed cross-entropy over the target vocabulary (Szegedy et al. 2016; §5.4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from transformer.data.tokenizer import PAD_ID


def label_smoothed_loss(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Summed cross-entropy against (1 − ε)·one-hot + ε/V, padding ignored; computed in at least fp32.
    logits (..., vocab), target (...).

    The same function as `F.cross_entropy(..., label_smoothing=ε, ignore_index=PAD_ID, reduction="sum")`,
    with the gradient written out, ∂loss/∂logits = softmax(logits) − q for each kept row: one new
    (rows, vocabulary) tensor where torch's autograd writes four (whole training steps 1.04-1.06× as fast;
    benchmarks/README.md)."""
    return _LabelSmoothedCrossEntropy.apply(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), smoothing
    )


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
        # (rows, vocab), in fp32 at least: bf16 logits would round the log-probabilities to 3 digits
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        keep = target != PAD_ID  # (rows,)
        label = target.masked_fill(~keep, 0)  # any valid index; those rows are multiplied by 0 below
        nll = -log_probs.gather(1, label[:, None]).squeeze(1)
        uniform = -log_probs.sum(-1)  # cross-entropy against the uniform distribution, times V
        rows = (1 - smoothing) * nll + (smoothing / log_probs.size(-1)) * uniform
        ctx.save_for_backward(log_probs, label, keep)
        ctx.smoothing, ctx.logits_dtype = smoothing, logits.dtype
        return (rows * keep).sum()  # a NaN anywhere, padding included, shows (the trainer skips the step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        log_probs, label, keep = ctx.saved_tensors
        eps, vocab = ctx.smoothing, log_probs.size(-1)
        scale = (grad * keep)[:, None].to(log_probs.dtype)  # (rows, 1): the incoming gradient, 0 on padding
        out = torch.exp(log_probs).sub_(eps / vocab).mul_(scale)  # (softmax − ε/V)·scale
        out.scatter_add_(1, label[:, None], -(1 - eps) * scale)  # − (1 − ε)·scale at each label
        return out.to(ctx.logits_dtype), None, None


ROWS_MULTIPLE = 64  # projected rows are padded up to a multiple of this (see projected_loss)


def projected_loss(hidden: Tensor, projection: nn.Module, target: Tensor, smoothing: float) -> Tensor:
    """`label_smoothed_loss(projection(hidden), target, smoothing)`, projecting only the positions that
    predict a token. The vocabulary projection and its softmax are ~40 % of a small model's training step
    (8k vocabulary), and ~7 % of the positions of token-budget batches are padding the loss ignores.

    The selected rows are padded with zero rows (labelled PAD, so ignored) up to a multiple of
    `ROWS_MULTIPLE`: unpadded, the product's shape would change with the count of real target tokens at
    nearly every step, and oneDNN builds and JIT-compiles a kernel for every new shape of a bf16 matmul;
    padded, a handful of shapes recur (4-17 % faster bf16 steps, for ≤ 63 extra rows out of ~2,300;
    benchmarks/README.md, "bf16 training").

    On a GPU every position is projected instead: selecting rows by a mask makes the host wait for the
    GPU to count them (a sync per step), which left a launch-bound base step in bf16 on an H200 idle for
    part of the step; the loss ignores the padding rows all the same.
    """
    if not selects_rows(hidden.device):
        return label_smoothed_loss(projection(hidden), target, smoothing)
    keep = target != PAD_ID
    rows, labels = hidden[keep], target[keep]  # (n, d_model), (n,)
    short = -rows.size(0) % ROWS_MULTIPLE
    if short:
        rows = torch.cat([rows, rows.new_zeros(short, rows.size(1))])
        labels = torch.cat([labels, labels.new_full((short,), PAD_ID)])
    return label_smoothed_loss(projection(rows), labels, smoothing)


def selects_rows(device: torch.device) -> bool:
    """Whether `projected_loss` projects only the predicting positions on `device`: not on CUDA, where
    selecting them is a host sync (its docstring)."""
    return device.type != "cuda"
