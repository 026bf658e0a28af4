"""Mixed precision and compilation for training (kept out of the model, which stays fp32 and eager).

bf16 has fp32's exponent range, so autocast alone is enough; fp16 does not, and small gradients would
underflow to zero, so its loss is scaled up before the backward pass and the gradients scaled back down
before the optimiser step (torch's GradScaler, which also skips steps whose gradients overflowed). fp16
is offered on CUDA only: CPUs have no fast fp16 matmuls.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from transformer.errors import TransformerError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The autocast context and loss scaling of one precision setting (`fp32`, `bf16` or `fp16`)."""

    def __init__(self, precision: str, device_type: str = "cpu") -> None:
        if precision == "fp16" and device_type != "cuda":
            raise TransformerError("precision=fp16 needs a CUDA device; use precision=bf16 on CPU")
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
