"""Largest absolute errors of our modules against their independent references (the figures the tests bound).

python benchmarks/reference_errors.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_attention import copy_into_reference, randomise
from test_model import TINY, copy_block, make_batch
from test_model import randomise as randomise_model

from transformer import Transformer
from transformer.model import LayerNorm, MultiHeadAttention, PositionalEncoding
from transformer.model.attention import fused_attention, scaled_dot_product_attention


def mha_errors(dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 4, fused=False).to(dtype)
    randomise(ours)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).to(dtype)
    copy_into_reference(ours, ref)
    x, memory = torch.randn(3, 6, 32, dtype=dtype), torch.randn(3, 9, 32, dtype=dtype)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    keep = torch.arange(9)[None, :] < torch.tensor([9, 7, 3])[:, None]
    out, w = ours(x, mask=causal, need_weights=True)
    ref_out, ref_w = ref(x, x, x, attn_mask=~causal)
    out2, w2 = ours(x, memory, keep[:, None, None, :], need_weights=True)
    ref_out2, ref_w2 = ref(x, memory, memory, key_padding_mask=~keep)
    return {
        "output": max((out - ref_out).abs().max().item(), (out2 - ref_out2).abs().max().item()),
        "weights": max((w.mean(1) - ref_w).abs().max().item(), (w2.mean(1) - ref_w2).abs().max().item()),
    }


def transformer_error(norm_first: bool) -> float:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, norm_first=norm_first)
    ours = Transformer(config).eval()
    randomise_model(ours)
    ref = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    for a, b in zip(
        [*ours.encoder.layers, *ours.decoder.layers], [*ref.encoder.layers, *ref.decoder.layers], strict=True
    ):
        copy_block(a, b)
    if norm_first:
        ref.encoder.norm.load_state_dict(ours.encoder.norm.state_dict())
        ref.decoder.norm.load_state_dict(ours.decoder.norm.state_dict())
    else:
        ref.encoder.norm = ref.decoder.norm = None
    src, tgt = make_batch(config)
    pad = src == config.pad_id
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=torch.bool)
    hidden = ref(
        ours.src_pos(ours.src_embed(src)),
        ours.tgt_pos(ours.tgt_embed(tgt)),
        tgt_mask=causal,
        src_key_padding_mask=pad,
        memory_key_padding_mask=pad,
    )
    return (ours(src, tgt) - ours.out_proj(hidden)).abs().max().item()


def main() -> None:
    torch.manual_seed(0)
    ln, ref_ln = LayerNorm(16), nn.LayerNorm(16)
    x = torch.randn(4, 5, 16) * 3 + 1
    pe = PositionalEncoding(8, 10).table
    import math

    hand = torch.tensor(
        [
            [
                math.sin(p / 10000 ** (2 * (i // 2) / 8))
                if i % 2 == 0
                else math.cos(p / 10000 ** (2 * (i // 2) / 8))
                for i in range(8)
            ]
            for p in range(10)
        ]
    )
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    model = Transformer(TINY).eval()
    src, tgt = make_batch(TINY)
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.new_cache(tgt.size(1))
    steps = torch.cat(
        [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))], 1
    )
    errors = {
        "MultiHeadAttention vs nn.MultiheadAttention, float32": mha_errors(torch.float32),
        "MultiHeadAttention vs nn.MultiheadAttention, float64": mha_errors(torch.float64),
        "Transformer vs nn.Transformer logits, post-LN": transformer_error(False),
        "Transformer vs nn.Transformer logits, pre-LN": transformer_error(True),
        "LayerNorm (kernel) vs nn.LayerNorm": (ln(x) - ref_ln(x)).abs().max().item(),
        "LayerNorm (formula) vs nn.LayerNorm": (ln.reference(x) - ref_ln(x)).abs().max().item(),
        "PositionalEncoding vs hand-computed": (pe - hand).abs().max().item(),
        "fused vs explicit attention": (
            scaled_dot_product_attention(q, k, v, mask)[0] - fused_attention(q, k, v, mask)
        )
        .abs()
        .max()
        .item(),
        "cached vs full decoding logits": (steps - full).abs().max().item(),
    }
    print(json.dumps(errors, indent=2))


if __name__ == "__main__":
    main()
