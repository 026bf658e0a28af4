"""The encoder–decoder Transformer of Vaswani et al. (2017), §3.1–3.5.

The data path: token ids -> embeddings·√d_model + positional encoding -> N encoder blocks -> memory;
target ids (shifted right) -> embeddings + positions -> N decoder blocks (masked self-attention,
encoder–decoder attention, feed-forward) -> linear -> logits over the target vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import TransformerConfig
from transformer.model.attention import AttentionRecord, KVCache, MultiHeadAttention
from transformer.model.dropout import Dropout


class LayerNorm(nn.Module):
    """LN(x) = γ·(x − mean(x)) / √(var(x) + ε) + β over the last dimension (Ba et al. 2016), with the
    biased variance, as torch.nn.LayerNorm computes it.

    Under CUDA's autocast torch computes layer norms in fp32 and returns fp32, so the residual stream of
    a post-LN model, every block's input and output, is fp32 in a bf16 run: each sublayer casts it to
    bf16 again, and the residual additions and norms move twice the bytes. With `in_autocast_dtype` the
    norm takes and returns autocast's dtype instead (statistics still accumulated in fp32 by the
    kernel), so the stream stays in bf16 from the first norm on, as in Megatron-LM's default. None (the
    default): on CUDA only, where a base step in bf16 on an H200 measured faster (benchmarks/gpu.py);
    CPU autocast already keeps a bf16 input in bf16.
    """

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.in_autocast_dtype: bool | None = None  # None: on CUDA only (the class docstring)

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        wanted = device == "cuda" if self.in_autocast_dtype is None else self.in_autocast_dtype
        if not (wanted and torch.is_autocast_enabled(device)):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)  # one fused kernel
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):  # the embeddings' fp32 sum is cast at the first norm
            x = x.to(dtype)
            return F.layer_norm(x, x.shape[-1:], self.weight.to(dtype), self.bias.to(dtype), self.eps)

    def reference(self, x: Tensor) -> Tensor:
        """The formula written out. `forward` computes the same in one fused kernel instead of five passes
        over memory; the tests hold both to torch.nn.LayerNorm."""
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}  # gelu: the exact (erf) form


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x·W_1 + b_1)·W_2 + b_2, applied to each position separately (§3.3); GELU or swish
    in place of max(0, ·) where the config asks."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class PositionalEncoding(nn.Module):
    """Adds position information to the embeddings (§3.5).

    Sinusoidal: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)),
    a fixed table that lets the model attend by relative position, since PE(pos+k) is a linear function of
    PE(pos). `learned` uses a trained table instead; `none` adds nothing (the model is then blind to order).
    """

    def __init__(self, d_model: int, max_len: int = 1024, kind: str = "sinusoidal") -> None:
        super().__init__()
        self.kind = kind
        if kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_model) * d_model**-0.5)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x: (batch, len, d_model); positions start at `offset` (the decoded prefix length)."""
        if self.kind == "none":
            return x
        length = x.size(1)
        if offset + length > self.table.size(0):
            raise ValueError(f"sequence of {offset + length} positions exceeds max_len={self.table.size(0)}")
        return x + self.table[offset : offset + length].to(x.dtype)


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """The (max_len, d_model) table of §3.5, computed in float64 and stored in float32."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d_model/2,)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


class Embedding(nn.Module):
    """Token embeddings multiplied by √d_model (§3.4), so that they are not drowned by the positional
    encoding; initialised N(0, d_model^-0.5) so the scaled result has unit variance."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()
        self.scale = math.sqrt(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight) * self.scale  # (batch, len, d_model)


class Block(nn.Module):
    """One layer of the encoder (self-attention, FFN) or of the decoder (masked self-attention,
    encoder–decoder attention, FFN): each sublayer wrapped as LayerNorm(x + Dropout(Sublayer(x))),
    or x + Dropout(Sublayer(LayerNorm(x))) with pre-LN."""

    def __init__(self, config: TransformerConfig, cross_attention: bool, index: int = 0) -> None:
        super().__init__()
        c = config
        fused = c.attention == "fused"
        self.index = index  # the key of this layer's entries in a KVCache
        self.norm_first = c.norm_first
        self.self_attn = MultiHeadAttention(c.d_model, c.n_heads, c.attention_dropout, fused)
        self.self_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.cross_attn = (
            MultiHeadAttention(c.d_model, c.n_heads, c.attention_dropout, fused) if cross_attention else None
        )
        self.cross_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps) if cross_attention else None
        self.ffn = PositionwiseFeedForward(c.d_model, c.d_ff, c.activation, c.activation_dropout)
        self.ffn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)

    def _residual(self, x: Tensor, norm: LayerNorm, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        record: AttentionRecord | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        weights: dict[str, Tensor] = {}
        need = record is not None

        def self_attention(h: Tensor) -> Tensor:
            out, weights["self"] = self.self_attn(
                h, mask=mask, cache=cache, layer=self.index, need_weights=need, is_causal=is_causal
            )
            return out

        def cross_attention(h: Tensor) -> Tensor:
            out, weights["cross"] = self.cross_attn(
                h, memory, memory_mask, cache=cache, layer=self.index, need_weights=need
            )
            return out

        x = self._residual(x, self.self_attn_norm, self_attention)
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, cross_attention)
        x = self._residual(x, self.ffn_norm, self.ffn)
        if record is not None:
            record.append(weights)
        return x


class Encoder(nn.Module):
    """N blocks of self-attention and feed-forward over the embedded source (§3.1)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(config, cross_attention=False, index=i) for i in range(config.n_encoder_layers)
        )
        # Pre-LN leaves the residual stream unnormalised, so it needs one LayerNorm at the end.
        self.norm = LayerNorm(config.d_model, config.layer_norm_eps) if config.norm_first else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor, record: AttentionRecord | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask, record=record)
        return self.norm(x)


class Decoder(nn.Module):
    """N blocks of masked self-attention, encoder–decoder attention and feed-forward (§3.1)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(config, cross_attention=True, index=i) for i in range(config.n_decoder_layers)
        )
        self.norm = LayerNorm(config.d_model, config.layer_norm_eps) if config.norm_first else nn.Identity()

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        cache: KVCache | None = None,
        record: AttentionRecord | None = None,
    ) -> Tensor:
        offset = cache.length if cache is not None else 0
        mask, is_causal = causal_masking(x.size(1), offset, x.device)
        for layer in self.layers:
            x = layer(x, mask, memory, memory_mask, cache=cache, record=record, is_causal=is_causal)
        if cache is not None:
            cache.advance(x.size(1))
        return self.norm(x)


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(batch, len) ids -> (batch, 1, 1, len) mask, True where a key is a real token."""
    return (ids != pad_id)[:, None, None, :]


def causal_masking(
    q_len: int, offset: int = 0, device: torch.device | None = None
) -> tuple[Tensor | None, bool]:
    """How the decoder's self-attention hides later positions from q_len new queries that follow `offset`
    cached ones: (mask, is_causal).

    A target from its first position (training, decoding without a cache) takes torch's `is_causal`,
    with which the fused kernel skips the blocks above the diagonal instead of reading a mask (training
    steps at 2,048 positions 1.11-1.14× as fast; benchmarks/README.md). New positions after a cached
    prefix take `causal_mask`: `is_causal` would align the first query with the first key."""
    if offset == 0 and q_len > 1:
        return None, True
    return causal_mask(q_len, offset + q_len, offset, device), False


def causal_mask(q_len: int, k_len: int, offset: int = 0, device: torch.device | None = None) -> Tensor | None:
    """(q_len, k_len) mask letting query i (at absolute position offset + i) see keys 0 … offset + i.

    One new position attending to a cached prefix may see all of it: no mask is needed then.
    """
    if q_len == 1:
        return None
    q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


class Transformer(nn.Module):
    """The encoder–decoder: `forward(src, tgt_in) -> logits`, and `encode` / `decode` for generation."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.src_embed = Embedding(c.src_vocab_size, c.d_model, c.pad_id)
        self.tgt_embed = (
            self.src_embed if c.share_embeddings else Embedding(c.tgt_vocab_size, c.d_model, c.pad_id)
        )
        self.src_pos = PositionalEncoding(c.d_model, c.max_len, c.positional)
        self.tgt_pos = PositionalEncoding(c.d_model, c.max_len, c.positional)
        self.dropout = Dropout(c.dropout)  # on the sums of embeddings and positional encodings
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.out_proj = nn.Linear(c.d_model, c.tgt_vocab_size, bias=c.output_bias)
        # the dtype decoding caches keep keys and values in; None: the model's. A decoding setting, not a
        # parameter: who casts the weights for decoding sets it (transformer.translate), see KVCache
        self.cache_dtype: torch.dtype | None = None
        self._init_weights()
        if c.tie_output:
            self.out_proj.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        # Glorot-uniform projections and zero biases (as fairseq and the Annotated Transformer do).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, src: Tensor, record: AttentionRecord | None = None) -> tuple[Tensor, Tensor]:
        """src (batch, src_len) -> memory (batch, src_len, d_model) and its mask (batch, 1, 1, src_len)."""
        src_mask = padding_mask(src, self.config.pad_id)
        x = self.dropout(self.src_pos(self.src_embed(src)))
        return self.encoder(x, src_mask, record), src_mask

    def beam_memory(self, memory: Tensor, src_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The memory for beam search's k hypotheses per source, on consecutive rows: the memory as it is.
        The encoder–decoder attention lets a source's hypotheses share its keys and values (see
        `MultiHeadAttention.forward`), which then are projected, cached and read once instead of k times."""
        return memory, src_mask

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_mask: Tensor,
        cache: KVCache | None = None,
        record: AttentionRecord | None = None,
        *,
        project: bool = True,
    ) -> Tensor:
        """tgt (batch, tgt_len): the whole shifted target, or with a cache only the newest positions.
        `memory` (sources, src_len, d_model) may hold fewer rows than `tgt`: batch // sources consecutive
        rows of `tgt` then share one source (beam search's hypotheses).

        Target padding needs no mask: it sits at the end, where the causal mask already hides it from every
        real position, and the loss ignores the outputs at padded positions. With `project=False` the
        result is the decoder's output before the vocabulary projection (batch, tgt_len, d_model).
        """
        offset = cache.length if cache is not None else 0
        x = self.dropout(self.tgt_pos(self.tgt_embed(tgt), offset))
        x = self.decoder(x, memory, src_mask, cache, record)
        return self.out_proj(x) if project else x  # (batch, tgt_len, tgt_vocab) or (…, d_model)

    def forward(self, src: Tensor, tgt: Tensor, *, project: bool = True) -> Tensor:
        """Logits (batch, tgt_len, tgt_vocab); with `project=False` the features they are projected from,
        for a loss that projects only the positions it needs (transformer.loss.projected_loss)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt, memory, src_mask, project=project)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(max_len=max_len or self.config.max_len, dtype=self.cache_dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are yielded once
