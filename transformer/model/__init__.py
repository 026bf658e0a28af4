"""The models. Nothing here imports data, training or device code."""

from transformer.model.attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from transformer.model.transformer import (
    Block,
    Decoder,
    Encoder,
    LayerNorm,
    PositionalEncoding,
    PositionwiseFeedForward,
    Transformer,
)

__all__ = [
    "Block",
    "Decoder",
    "Encoder",
    "KVCache",
    "LayerNorm",
    "MultiHeadAttention",
    "PositionalEncoding",
    "PositionwiseFeedForward",
    "Transformer",
    "scaled_dot_product_attention",
]
