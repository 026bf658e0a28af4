"""The training loss: label-smoothed cross-entropy over the target vocabulary (Szegedy et al. 2016; §5.4)."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from transformer.data.tokenizer import PAD_ID


def label_smoothed_loss(
    logits: Tensor, target: Tensor, smoothing: float, *, compiled: bool | None = None
) -> Tensor:
    """Summed cross-entropy against (1 − ε)·one-hot + ε/V, padding ignored; computed in at least fp32.
    logits (..., vocab), target (...).

    The same function as `F.cross_entropy(..., label_smoothing=ε, ignore_index=PAD_ID, reduction="sum")`,
    with the gradient written out, ∂loss/∂logits = softmax(logits) − q for each kept row: one new
    (rows, vocabulary) tensor where torch's autograd writes four (whole training steps 1.04-1.06× as fast;
    benchmarks/README.md).

    `compiled` (None: on CUDA, `compiles`) computes it as `label_smoothed_loss_by_reductions` under
    torch.compile instead, which reads the logits twice forward and writes their gradient in one pass,
    with no fp32 copy of them: on an H200 the eager loss's ten passes over fp32 (rows, vocabulary)
    tensors were a fifth of a base step in bf16. CPUs keep the loss written out by hand: compiling took
    ~45 s on a 2-core Zen 1 and needs a C++ compiler, for passes that are a few percent of its
    compute-bound step.
    """
    logits, target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)  # (rows, vocab), (rows,)
    if compiles(logits.device) if compiled is None else compiled:
        # The row count changes from batch to batch: compiled for any count from the first call (left to
        # its own guesses, torch.compile compiles for the first count, then again for any), while the
        # vocabulary size stays a constant of the kernels.
        torch._dynamo.maybe_mark_dynamic(logits, 0)
        torch._dynamo.maybe_mark_dynamic(target, 0)
        return _compiled_loss()(logits, target, smoothing)
    return _LabelSmoothedCrossEntropy.apply(logits, target, smoothing)


def compiles(device: torch.device) -> bool:
    """Whether `label_smoothed_loss` is compiled on `device` by default: on CUDA GPUs that torch.compile's
    kernels (Triton) run on, compute capability 7.0 (Volta) and newer, where Triton is installed and finds
    the C compiler it builds its kernel launchers with (else the first step would fail, deep in
    torch.compile, where the written-out loss works)."""
    return device.type == "cuda" and _triton_runs_on(device.index)


@functools.cache  # asked at every loss; the answer does not change within a process
def _triton_runs_on(cuda_index: int | None) -> bool:
    return (
        torch.cuda.get_device_capability(cuda_index) >= (7, 0)
        and importlib.util.find_spec("triton") is not None
        and bool(os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"))  # as Triton looks
    )


@functools.cache
def _compiled_loss() -> Callable[[Tensor, Tensor, float], Tensor]:
    """`label_smoothed_loss_by_reductions` under torch.compile, made once per process."""
    return torch.compile(label_smoothed_loss_by_reductions)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
        # (rows, vocab), in fp32 at least: bf16 logits would round the log-probabilities to 3 digits
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
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


def label_smoothed_loss_by_reductions(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """`label_smoothed_loss` written as row reductions and elementwise operations only, for a compiler.

    With lse the log-sum-exp of a row, −log p(label) = lse − logit(label) and Σ_v −log p(v) = V·lse −
    Σ_v logit(v), so the loss needs three reductions of the logits and no log-probability tensor, and its
    gradient is one elementwise expression of them. torch.compile can then read the logits once or twice
    forward and write the gradient in one pass, where eager torch makes ~10 passes over fp32 copies. In
    eager mode it is slower than `label_smoothed_loss` (the label's column is picked by comparing every
    column with it)."""
    logits, target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (rows, vocab)
    lse = torch.logsumexp(x, dim=-1)  # (rows,)
    columns = torch.arange(x.size(-1), device=x.device)
    picked = torch.where(columns == target[:, None], x, 0.0).sum(-1)  # the label's logit (padding: × 0 below)
    rows = lse - (1 - smoothing) * picked - (smoothing / x.size(-1)) * x.sum(-1)
    return (rows * (target != PAD_ID)).sum()


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
