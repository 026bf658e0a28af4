"""Mixed precision and compilation for training (kept out of the model, which stays fp32 and eager), and
the dtypes of the weights and of the key/value cache for decoding.

bf16 has fp32's exponent range, so autocast alone is enough; fp16 does not, and small gradients would
underflow to zero, so its loss is scaled up before the backward pass and the gradients scaled back down
before the optimiser step (torch's GradScaler, which also skips steps whose gradients overflowed). fp16
is offered on CUDA only: CPUs have no fast fp16 matmuls.

`auto`, the default, picks bf16 where the hardware multiplies bf16 natively (CUDA devices that support it,
CPUs with AVX-512 BF16 or AMX) and fp32 elsewhere: on a CPU without those instructions torch emulates bf16
matmuls at a tenth of the fp32 speed, so bf16 there would be a slowdown, not a speed-up.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from transformer.errors import TransformerError
from transformer.runtime import cpu_flags

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def has_native_bf16(device_type: str = "cpu") -> bool:
    """True where bf16 matmuls run in hardware: CUDA devices that support bf16, CPUs with AVX-512 BF16/AMX."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def emulation_warning(precision: str, device_type: str = "cpu") -> str | None:
    """A warning line when bf16 is asked for where the CPU does not multiply it natively: torch then
    emulates it, and decoding test sentences took 2.8× as long as in fp32 on an AVX2 Zen 3. None where
    bf16 is native, or not asked for (`auto` never picks it there)."""
    if precision == "bf16" and device_type == "cpu" and not has_native_bf16("cpu"):
        return (
            "warning: precision bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): torch "
            "emulates it, several times slower than fp32 here"
        )
    return None


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision `auto` stands for on this device (bf16 where native, else fp32); others unchanged,
    except fp16 off CUDA, which is refused."""
    if precision == "fp16" and device_type != "cuda":
        raise TransformerError("fp16 needs a CUDA device; on a CPU, use bf16 (or fp32)")
    if precision != "auto":
        return precision
    return "bf16" if has_native_bf16(device_type) else "fp32"


def weight_dtype(precision: str, device_type: str = "cpu") -> torch.dtype:
    """The dtype the weights are cast to for decoding under `precision` on this device. Unlike training,
    decoding casts the weights themselves: it needs no fp32 master copy, and autocast would cast every
    weight again at every decoding step."""
    precision = resolve_precision(precision, device_type)
    if precision not in ("fp32", *_DTYPES):
        raise TransformerError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}")
    return _DTYPES.get(precision, torch.float32)


def decoding_cache_dtype(dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype | None:
    """The dtype a decoding cache keeps keys and values in for weights of `dtype` (None: the weights').

    fp32 for bf16 weights on a CPU without AMX: there torch's bf16 attention kernel is slower than its
    fp32 one at decoding shapes, and keeping the cache in fp32 (cast once per step for the new position,
    once per search for the source) runs attention in fp32 on bf16-rounded keys and values. Translating
    test2016 in bf16 with a trained small model on a Zen 5 EPYC, interleaved, that made greedy search
    1.27× and beam 4 1.12× as fast. On AMX CPUs, where bf16 decoding already ran 1.4-1.5× fp32, it is
    unmeasured, so they keep the cache in bf16."""
    wider = device_type == "cpu" and dtype == torch.bfloat16 and "amx_bf16" not in cpu_flags()
    return torch.float32 if wider else None


class MixedPrecision:
    """The autocast context and loss scaling of one precision setting (`auto`, `fp32`, `bf16` or `fp16`)."""

    def __init__(self, precision: str, device_type: str = "cpu") -> None:
        precision = resolve_precision(precision, device_type)
        self.precision, self.device_type = precision, device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")

    @property
    def scales_loss(self) -> bool:
        """True under fp16, whose gradients are scaled (and may overflow) until `step` unscales them."""
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        """Run the forward pass (and the loss) under this; matmuls then use the lower precision."""
        dtype = _DTYPES.get(self.precision)
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # the plain backward unless fp16

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, clip_norm: float) -> None:
        """Unscale (fp16), clip the gradient norm if asked, and step (skipped on fp16 overflow)."""
        if clip_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """The model through torch.compile (inductor; on CPU it needs a C++ compiler) or as it is.

    Token-budget batches vary in shape, so shapes are marked dynamic from the start instead of compiling
    one graph per shape. The compiled module shares the parameters of `model`, which is what is saved.
    """
    return torch.compile(model, dynamic=True) if enabled else model
