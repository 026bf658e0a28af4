"""A Transformer for sequence-to-sequence learning, written from *Attention Is All You Need*."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer.config import TransformerConfig
    from transformer.model import Transformer

__all__ = ["Transformer", "TransformerConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`transformer.Transformer` and `transformer.TransformerConfig`, imported on first use.

    Importing the package must not import torch: the `transformer` command re-executes itself before its
    work starts (`transformer.runtime.reexec_with_allocator_tunables`), and every module of the package
    imports this one first. With the model imported here, each command imported torch twice, and
    `transformer translate` took 4.8 s to translate one sentence instead of 2.5-2.8 s (Zen 3, 2
    cores)."""
    if name == "Transformer":
        from transformer.model import Transformer

        return Transformer
    if name == "TransformerConfig":
        from transformer.config import TransformerConfig

        return TransformerConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
