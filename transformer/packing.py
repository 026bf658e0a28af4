"""Linear layers that keep their weights packed in the layout the CPU's GEMM kernels read, while a model
decodes.

A decoding loop multiplies the same weights by a few rows (the live hypotheses) at every step: 64 rows
against the 8k × 256 output projection, say. At so few rows a GEMM spends much of its time rearranging the
weight into the blocks its kernel reads, and it does so on every call. The math libraries can do that
once; torch exposes it through the operators inductor uses for frozen CPU graphs:

- fp32: MKL's packed GEMM (`mkl._mkl_reorder_linear_weight`, `mkl._mkl_linear`, i.e. `cblas_sgemm_pack`).
  `?gemm_pack` takes the product's m, n and k, and torch's operator reads the packed weight only for the
  row count (m) it was packed for, falling back to the plain GEMM otherwise. So a layer packs again when the
  number of rows changes: once per batch for the encoder's layers, once per search for the decoder's. That
  costs little (~20 µs for a 256 × 256 weight, 40-220 µs for 256 × 1024, 0.5-0.7 ms for the 8k × 256
  output projection, against 1.1 ms for one 20-row product with it), and every call reads a packed weight.
  (On a Zen 3 EPYC the output projection's packing took 1.0-4.9 ms for 46-428 rows, and translating
  test2016 with the small model, whose searches drop finished sentences and so change their row count
  every few steps, still ran 1.06× as fast greedy and 1.00× in beam 4 packed as plain.)
  Packing only for counts that repeat would serve a count's first call unpacked: the same input would then
  give results that differ in the last bits with the layer's history (`transformer doctor` caught that as
  non-determinism).
- bf16: oneDNN's blocked weight layout (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`),
  which serves any row count: packed on the first call.
- fp32 on AMD CPUs: oneDNN too. MKL picks its kernels by vendor and runs AVX2 code on AMD processors,
  half the fp32 rate of a Zen 5 core's 512-bit units; oneDNN picks by instruction set. On 2 cores of a
  Zen 5 EPYC, oneDNN's packed fp32 products ran 2.3-3× MKL's at the decoding shapes (235-416 against
  109-170 GFLOP/s) and 435 against 186 GFLOP/s at 2048³. On an AVX2-only Zen 3 its one pack for every
  row count is what pays (`fp32_kernel`).

Measured alone on 2 cores of an AMX Xeon at 64 rows, the small and base models' linear layers ran
1.0-1.4× (fp32) and 1.4-2.3× (bf16) as fast, with the same results up to the order of float rounding;
benchmarks/decode.py measures whole searches with and without (the `unpacked` rows).

The packed copy is rebuilt when the weight changes: torch bumps a tensor's version on every in-place write
(an optimiser step, `load_state_dict`). Only inference on the CPU in fp32 or bf16 takes this path: with
gradients on, under autocast, for other dtypes or devices, or without the operators, `PackedLinear` is
`nn.Linear`. The commands that only decode apply it to the model they load (`pack_linears`), outside the
model's own code like the other kernel choices.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.runtime import cpu_flags, cpu_vendor

__all__ = [
    "PackedLinear",
    "SharedLinear",
    "fp32_kernel",
    "mkl_packing_available",
    "onednn_available",
    "onednn_packing_available",
    "pack_linears",
    "replace_linears",
]


@cache
def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM (x86 builds; not ARM or macOS)."""
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


@cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear operators. x86 only: these are the operators
    inductor uses there; on ARM builds oneDNN runs through other libraries, untested here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@cache
def onednn_packing_available() -> bool:
    """Whether this torch build can pack bf16 weights for oneDNN on this CPU."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@cache
def fp32_kernel() -> str | None:
    """The library whose packed fp32 products decode fastest here: "onednn" on AMD CPUs, "mkl" elsewhere,
    None where torch has neither.

    On AMD CPUs with AVX-512 MKL runs AVX2 code, half the rate (above). On an AVX2-only Zen 3 both run AVX2
    code, but oneDNN packs a weight once for any row count where MKL packs again for every new count, and
    a search changes its count as sentences finish and the output layer skips fixed rows: 4-5 % of the time
    of translating test2016 went to MKL's packing (46 packs of the output projection greedy, 125 in beam
    4). With oneDNN the same translations came 1.06× as fast greedy and in beam 4, and decode.py's random
    batches 1.07× / 1.02× (small, greedy / beam 4) and 1.09× / 1.06× (base), interleaved, 5-8 rounds,
    2026-12-03. Training has its own rule (`transformer.onednn.onednn_trains_faster`)."""
    if onednn_available() and cpu_vendor() == "AuthenticAMD" and "avx2" in cpu_flags():
        return "onednn"
    return "mkl" if mkl_packing_available() else None


class SharedLinear(nn.Linear):
    """An `nn.Linear` made on the Parameters of another, which it replaces: tied weights stay tied and the
    state dict keeps its keys. The base of the layers that change only how the product is computed.

    It takes over the replaced layer's hooks too (the same dicts, so their handles still remove them): the
    report's unscaled-attention variant scales W_Q's output with a forward hook, and when the trainer's swap
    to `OneDNNLinear` dropped it, "unscaled" trained exactly as "scaled" (reports of 2026-12-02)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        for name, value in vars(linear).items():
            if "hook" in name:  # _forward_hooks, _forward_pre_hooks, _backward_hooks, _state_dict_hooks, …
                setattr(self, name, value)


class PackedLinear(SharedLinear):
    """`nn.Linear` whose CPU inference in fp32 or bf16 reads a packed copy of its weight.

    The packed copy is a plain attribute, never saved, copied or pickled (a copy packs anew). It is rebuilt
    when the weight is another tensor (a `load_state_dict(assign=True)`, a cast) or changed in place; but a
    write through `weight.data` does not bump the version it checks (autograd does not see it either):
    code that edits weights that way should edit an unpacked model."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        # (rows or None, the weight's version, storage and dtype, pack)
        self._packed: tuple[int | None, tuple[int, int, torch.dtype], Tensor] | None = None

    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle take: all but the pack, an opaque tensor neither can read."""
        return {**self.__dict__, "_packed": None}

    def forward(self, x: Tensor) -> Tensor:
        # ~25 calls per decoding step: cheapest checks first; both kernels take x (…, in) as it is
        weight = self.weight
        kind = _kind(x, weight)
        if kind == "mkl":
            rows = x.numel() // self.in_features
            return _mkl_linear(x, self._packed_for(weight, rows), weight, self.bias, rows)
        if kind == "onednn":
            return _onednn_linear(x, self._packed_for(weight, None), self.bias)
        return F.linear(x, weight, self.bias)

    def _packed_for(self, weight: Tensor, rows: int | None) -> Tensor:
        """The weight packed for `rows` rows (None: any count), kept while the weight and count stay."""
        version, cached = (weight._version, weight.data_ptr(), weight.dtype), self._packed
        if cached is not None and cached[0] == rows and cached[1] == version:
            return cached[2]
        packed = _mkl_pack(weight.detach(), rows) if rows is not None else _onednn_pack(weight.detach())
        self._packed = (rows, version, packed)
        return packed

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed"


def _kind(x: Tensor, weight: Tensor) -> str | None:
    """Which packed kernel serves `x`: "mkl" (fp32), "onednn" (bf16) or None (the plain path)."""
    if torch.is_grad_enabled() or x.dtype != weight.dtype or not x.is_cpu:
        return None
    if torch.is_autocast_enabled("cpu") or x.numel() == 0:
        return None
    return _kinds().get(x.dtype)


@cache
def _kinds() -> dict[torch.dtype, str]:
    fp32 = fp32_kernel()
    kinds = {torch.float32: fp32} if fp32 else {}
    return kinds | ({torch.bfloat16: "onednn"} if onednn_packing_available() else {})


def _mkl_pack(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _mkl_linear(x: Tensor, packed: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:
    """x (…, in) · weightᵀ + bias, reading `packed`; MKL uses `weight` for another count of rows."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _onednn_pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (…, in) · weightᵀ + bias, `packed` being the weight in oneDNN's layout."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear` sharing its weights; returns how many.
    A no-op where torch has neither packed GEMM. For models that decode: training never takes the path."""
    if not (fp32_kernel() or onednn_packing_available()):
        return 0
    return replace_linears(model, PackedLinear)


def replace_linears(model: nn.Module, replacement: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every plain `nn.Linear` of `model` by `replacement(linear)`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, replacement(child))
                count += 1
    return count
