"""The models. Nothing here imports data, training or device code."""

from torch import nn

from transformer.config import RNNConfig, TransformerConfig
from transformer.model.attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from transformer.model.ensemble import Ensemble
from transformer.model.rnn import RNNSeq2Seq
from transformer.model.transformer import (
    Block,
    Decoder,
    Encoder,
    LayerNorm,
    PositionalEncoding,
    PositionwiseFeedForward,
    Transformer,
)


def build_model(config: TransformerConfig | RNNConfig) -> nn.Module:
    """The model a config describes: every family maps (src, tgt_in) to logits and decodes through
    encode / decode / new_cache, so training and search treat them alike."""
    return Transformer(config) if isinstance(config, TransformerConfig) else RNNSeq2Seq(config)


__all__ = [
    "Block",
    "Decoder",
    "Encoder",
    "Ensemble",
    "KVCache",
    "LayerNorm",
    "MultiHeadAttention",
    "PositionalEncoding",
    "PositionwiseFeedForward",
    "RNNSeq2Seq",
    "Transformer",
    "build_model",
    "scaled_dot_product_attention",
]
