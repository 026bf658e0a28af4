"""fp32 linear layers through oneDNN, for training on CPUs whose MKL runs below the hardware's rate.

torch multiplies fp32 matrices on the CPU with MKL, and MKL chooses its kernels by the processor's vendor:
on AMD processors it runs AVX2 code, half the fp32 rate of a Zen 5 core's 512-bit units. oneDNN, also in
every x86 build of torch, chooses by instruction set. On 2 cores of a Zen 5 EPYC, at a small model's
training shapes (4,096 rows), oneDNN ran the forward products 2.3-2.5× and the input gradients' 2.0-2.4×
as fast as MKL (346-405 against 157-173 GFLOP/s); the weight gradients, read transposed, 1.1-1.6×.

`OneDNNLinear` is `nn.Linear` with those three products sent to oneDNN (on Zen 4 the weight gradient
stays in MKL: `weight_gradients_in_mkl`); `use_onednn_linears(model)` swaps it in where
`onednn_trains_faster` says oneDNN is the faster library. Like packing, this
is a kernel choice made outside the model: the parameters and the state dict stay `nn.Linear`'s.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.packing import SharedLinear, fp32_kernel, onednn_available, replace_linears
from transformer.runtime import cpu_family, cpu_flags, cpu_vendor

__all__ = [
    "OneDNNLinear",
    "onednn_linear",
    "onednn_trains_faster",
    "use_onednn_linears",
    "weight_gradients_in_mkl",
]


def onednn_trains_faster() -> bool:
    """Whether oneDNN's fp32 products train faster than MKL's here: on AMD CPUs with AVX-512, where MKL
    runs AVX2 code. Decoding takes oneDNN on every AMD CPU (`fp32_kernel`), for its one pack per weight;
    training packs nothing, and on an AVX2-only Zen 3 a small model's step ran 1.16× as fast with MKL's
    products as with oneDNN's (`benchmarks/train_step.py`, 8 interleaved rounds, 2026-12-03)."""
    return fp32_kernel() == "onednn" and "avx512f" in cpu_flags()


@cache  # asked at every backward pass of every layer
def weight_gradients_in_mkl() -> bool:
    """Whether `OneDNNLinear` leaves its weight gradients to MKL: on Zen 4 (AMD family 25 with AVX-512),
    whose cores run AVX-512 instructions on 256-bit units, so that MKL's AVX2 kernels multiply as fast as
    oneDNN's there. MKL then wins by reading the transposed operand in place, where oneDNN copies it
    first, and torch's transposed copy is slow (one thread, ~10× a plain copy of the same bytes: 49 copies,
    20-27 ms of a 670-ms small step). On Zen 5, with 512-bit units, MKL's AVX2 weight gradients are the
    slow ones. Measured by `benchmarks/train_step.py` (`ours, oneDNN weight gradients`)."""
    return cpu_vendor() == "AuthenticAMD" and cpu_family() == 25 and "avx512f" in cpu_flags()


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (…, in) · weightᵀ (+ bias) by oneDNN; `weight` (out, in) may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b with the products in oneDNN: dx = dy·W, dW = dyᵀ·x, db = Σ dy.

    dW sums over the rows, the first dimension of both dy and x, and oneDNN's linear sums over the last:
    its first operand is copied transposed, so the narrower of the two takes that place. Measured at 2,496
    rows (Zen 5, by hand): 256 → 1,024 as (xᵀ·dy)ᵀ 5.2 ms against 7.0 ms as dyᵀ·x and MKL's 8.2 ms;
    1,024 → 256 as dyᵀ·x 4.7 ms against 7.3 ms and 8.1 ms; 256 → 256 as dyᵀ·x 2.2 ms against 2.6 and 2.3.
    With `weight_grad_in_mkl` dW is MKL's instead, which reads the transposed views as they are
    (`weight_gradients_in_mkl`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, weight_grad_in_mkl: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.weight_grad_in_mkl = bias is not None, weight_grad_in_mkl
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
            if ctx.weight_grad_in_mkl:
                grad_weight = rows.t().mm(x_rows)  # (out, in)
            elif x_rows.size(1) < rows.size(1):  # in < out: xᵀ is the narrower operand to copy
                grad_weight = _product(x_rows.t(), rows.t(), None).t().contiguous()  # (out, in)
            else:
                grad_weight = _product(rows.t(), x_rows.t(), None)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias, None


def onednn_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, weight_grad_in_mkl: bool | None = None
) -> Tensor:
    """`F.linear` through oneDNN for fp32 tensors on the CPU outside autocast; `F.linear` otherwise.
    `weight_grad_in_mkl` (None: `weight_gradients_in_mkl()`) leaves the weight's gradient to MKL."""
    fp32_cpu = x.dtype == weight.dtype == torch.float32 and x.is_cpu and x.numel() > 0
    if not fp32_cpu or torch.is_autocast_enabled("cpu"):  # under autocast, autocast chooses dtype and kernel
        return F.linear(x, weight, bias)
    in_mkl = weight_gradients_in_mkl() if weight_grad_in_mkl is None else weight_grad_in_mkl
    return _OneDNNLinearFunction.apply(x, weight, bias, in_mkl)


class OneDNNLinear(SharedLinear):
    """`nn.Linear` whose fp32 CPU products, forward and backward, run in oneDNN (the weight gradient in
    MKL where `weight_gradients_in_mkl` says; `weight_grad_in_mkl` True or False decides it instead)."""

    weight_grad_in_mkl: bool | None = None  # None: weight_gradients_in_mkl(); the benchmarks set it

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias, weight_grad_in_mkl=self.weight_grad_in_mkl)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", oneDNN"


def use_onednn_linears(model: nn.Module, *, force: bool = False) -> int:
    """Replace every `nn.Linear` of `model` by a `OneDNNLinear` sharing its weights, where oneDNN is the
    faster fp32 library on this CPU (or with `force`, where it exists at all); returns how many."""
    if not onednn_available() or not (force or onednn_trains_faster()):
        return 0
    return replace_linears(model, OneDNNLinear)
