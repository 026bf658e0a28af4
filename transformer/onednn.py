"""fp32 linear layers through oneDNN, for training on CPUs whose MKL runs below the hardware's rate.

torch multiplies fp32 matrices on the CPU with MKL, and MKL chooses its kernels by the processor's vendor:
on AMD processors it runs AVX2 code, half the fp32 rate of a Zen 5 core's 512-bit units. oneDNN, also in
every x86 build of torch, chooses by instruction set. On 2 cores of a Zen 5 EPYC, at a small model's
training shapes (4,096 rows), oneDNN ran the forward products 2.3-2.5× and the input gradients' 2.0-2.4×
as fast as MKL (346-405 against 157-173 GFLOP/s); the weight gradients, read transposed, 1.1-1.6×.

`OneDNNLinear` is `nn.Linear` with those three products sent to oneDNN; `use_onednn_linears(model)`
swaps it in where `onednn_trains_faster` says oneDNN is the faster library. Like packing, this
is a kernel choice made outside the model: the parameters and the state dict stay `nn.Linear`'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.packing import SharedLinear, fp32_kernel, onednn_available, replace_linears
from transformer.runtime import cpu_flags

__all__ = ["OneDNNLinear", "onednn_linear", "onednn_trains_faster", "use_onednn_linears"]


def onednn_trains_faster() -> bool:
    """Whether oneDNN's fp32 products train faster than MKL's here: on AMD CPUs with AVX-512, where MKL
    runs AVX2 code. Decoding takes oneDNN on every AMD CPU (`fp32_kernel`), for its one pack per weight;
    training packs nothing, and on an AVX2-only Zen 3 a small model's step ran 1.16× as fast with MKL's
    products as with oneDNN's (`benchmarks/train_step.py`, 8 interleaved rounds, 2026-12-03)."""
    return fp32_kernel() == "onednn" and "avx512f" in cpu_flags()


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (…, in) · weightᵀ (+ bias) by oneDNN; `weight` (out, in) may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b with all three products in oneDNN: dx = dy·W, dW = dyᵀ·x, db = Σ dy.

    dW sums over the rows, the first dimension of both dy and x, and oneDNN's linear sums over the last:
    its first operand is copied transposed, so the narrower of the two takes that place. Measured at 2,496
    rows (Zen 5, by hand): 256 → 1,024 as (xᵀ·dy)ᵀ 5.2 ms against 7.0 ms as dyᵀ·x and MKL's 8.2 ms;
    1,024 → 256 as dyᵀ·x 4.7 ms against 7.3 ms and 8.1 ms; 256 → 256 as dyᵀ·x 2.2 ms against 2.6 and 2.3."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t(), None)  # (…, in)
        rows = grad.reshape(-1, grad.size(-1))  # (n, out)
        if ctx.needs_input_grad[1]:
            x_rows = x.reshape(-1, x.size(-1))  # (n, in)
            if x_rows.size(1) < rows.size(1):  # in < out: xᵀ is the narrower operand to copy
                grad_weight = _product(x_rows.t(), rows.t(), None).t().contiguous()  # (out, in)
            else:
                grad_weight = _product(rows.t(), x_rows.t(), None)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` through oneDNN for fp32 tensors on the CPU outside autocast; `F.linear` otherwise."""
    fp32_cpu = x.dtype == weight.dtype == torch.float32 and x.is_cpu and x.numel() > 0
    if not fp32_cpu or torch.is_autocast_enabled("cpu"):  # under autocast, autocast chooses dtype and kernel
        return F.linear(x, weight, bias)
    return _OneDNNLinearFunction.apply(x, weight, bias)


class OneDNNLinear(SharedLinear):
    """`nn.Linear` whose fp32 CPU products, forward and backward, run in oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", oneDNN"


def use_onednn_linears(model: nn.Module, *, force: bool = False) -> int:
    """Replace every `nn.Linear` of `model` by a `OneDNNLinear` sharing its weights, where oneDNN is the
    faster fp32 library on this CPU (or with `force`, where it exists at all); returns how many."""
    if not onednn_available() or not (force or onednn_trains_faster()):
        return 0
    return replace_linears(model, OneDNNLinear)
