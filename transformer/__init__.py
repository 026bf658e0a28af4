"""A Transformer for sequence-to-sequence learning, written from *Attention Is All You Need*."""

from transformer.config import TransformerConfig
from transformer.model import Transformer

__all__ = ["Transformer", "TransformerConfig"]
__version__ = "0.1.0"
