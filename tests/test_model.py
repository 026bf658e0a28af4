"""The whole encoder–decoder against torch.nn.Transformer, and the guarantees of its masks."""

import dataclasses
import math

import pytest
import torch
from conftest import TINY
from torch import nn

from transformer import Transformer, TransformerConfig
from transformer.errors import TransformerError
from transformer.model import LayerNorm, PositionalEncoding
from transformer.model.transformer import Block, causal_masking


def copy_block(ours: Block, ref: nn.Module) -> None:
    """Our block's weights into a torch Transformer{Encoder,Decoder}Layer."""
    pairs = [(ours.self_attn, ref.self_attn), (ours.cross_attn, getattr(ref, "multihead_attn", None))]
    with torch.no_grad():
        for mha, ref_mha in pairs:
            if mha is None:
                continue
            ref_mha.in_proj_weight.copy_(torch.cat([mha.w_q.weight, mha.w_k.weight, mha.w_v.weight]))
            ref_mha.in_proj_bias.copy_(torch.cat([mha.w_q.bias, mha.w_k.bias, mha.w_v.bias]))
            ref_mha.out_proj.weight.copy_(mha.w_o.weight)
            ref_mha.out_proj.bias.copy_(mha.w_o.bias)
        ref.linear1.load_state_dict(ours.ffn.w_1.state_dict())
        ref.linear2.load_state_dict(ours.ffn.w_2.state_dict())
        norms = [ours.self_attn_norm, ours.cross_attn_norm, ours.ffn_norm]
        for i, norm in enumerate(n for n in norms if n is not None):
            getattr(ref, f"norm{i + 1}").load_state_dict(norm.state_dict())


def randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(
                    1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p)
                )
            elif p.dim() == 1:
                p.normal_(0, 0.1)


def make_batch(config: TransformerConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, config.src_vocab_size, (3, 9), generator=g)
    tgt = torch.randint(4, config.tgt_vocab_size, (3, 7), generator=g)
    src[1, 6:] = config.pad_id
    src[2, 3:] = config.pad_id
    return src, tgt


@pytest.mark.parametrize(("norm_first", "activation"), [(False, "relu"), (True, "relu"), (False, "gelu")])
def test_matches_torch_transformer(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, norm_first=norm_first, activation=activation)
    ours = Transformer(config).eval()
    randomise(ours)
    ref = nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        batch_first=True,
        norm_first=norm_first,
        activation=activation,
    ).eval()
    for our_block, ref_block in zip(ours.encoder.layers, ref.encoder.layers, strict=True):
        copy_block(our_block, ref_block)
    for our_block, ref_block in zip(ours.decoder.layers, ref.decoder.layers, strict=True):
        copy_block(our_block, ref_block)
    if norm_first:  # pre-LN ends each stack with a LayerNorm, as nn.Transformer always does
        ref.encoder.norm.load_state_dict(ours.encoder.norm.state_dict())
        ref.decoder.norm.load_state_dict(ours.decoder.norm.state_dict())
    else:  # the paper's post-LN stack has no extra final norm; nn.Transformer adds one, so remove it
        ref.encoder.norm = None
        ref.decoder.norm = None

    src, tgt = make_batch(config)
    logits = ours(src, tgt)
    src_x = ours.src_pos(ours.src_embed(src))
    tgt_x = ours.tgt_pos(ours.tgt_embed(tgt))
    pad = src == config.pad_id
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=torch.bool)
    ref_hidden = ref(src_x, tgt_x, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    ref_logits = ours.out_proj(ref_hidden)
    assert logits.shape == (3, 7, config.tgt_vocab_size)
    assert (logits - ref_logits).abs().max() < 1e-5


def _norms(d: int) -> tuple[LayerNorm, nn.LayerNorm]:
    """Our LayerNorm with random γ and β, and torch's with the same."""
    torch.manual_seed(0)
    ours, ref = LayerNorm(d), nn.LayerNorm(d)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_layer_norm_matches_torch() -> None:
    ours, ref = _norms(16)
    x = torch.randn(4, 5, 16) * 3 + 1
    assert (ours(x) - ref(x)).abs().max() < 1e-5
    assert (ours.reference(x) - ref(x)).abs().max() < 1e-5


def test_layer_norm_in_autocast_dtype_keeps_the_stream_in_bf16() -> None:
    """Asked to (CUDA's default), the norm returns autocast's dtype for an fp32 or bf16 input: the same
    values as torch's fp32 norm to bf16's rounding, and fp32 gradients for its fp32 parameters."""
    ours, ref = _norms(64)
    ours.in_autocast_dtype = True
    x = torch.randn(8, 64) * 3 + 1
    want = ref(x)
    want.sum().backward()
    for given in (x, x.bfloat16()):
        ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(given)
        got.float().sum().backward()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.detach(), atol=0.05, rtol=0.02)
        for mine, theirs in zip(ours.parameters(), ref.parameters(), strict=True):
            assert mine.grad.dtype == torch.float32
            torch.testing.assert_close(mine.grad, theirs.grad, atol=0.05, rtol=0.02)
    ours.in_autocast_dtype = False  # as on the CPU by default: an fp32 input gives fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.float32


def test_positional_encoding_hand_computed() -> None:
    d = 8
    pe = PositionalEncoding(d, max_len=10).table
    for pos in (0, 1, 7):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert pe[0].tolist() == [0.0, 1.0] * 4


@pytest.mark.parametrize("attention", ["explicit", "fused"])
def test_decoder_is_causal(attention: str) -> None:
    torch.manual_seed(1)
    config = dataclasses.replace(TINY, attention=attention)
    model = Transformer(config).eval()
    src, tgt = make_batch(config)
    base = model(src, tgt)
    for j in range(1, tgt.size(1)):
        changed = tgt.clone()
        changed[:, j] = (changed[:, j] + 7) % config.tgt_vocab_size
        out = model(src, changed)
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6, rtol=0), f"position < {j} saw token {j}"
        assert not torch.allclose(out[:, j], base[:, j]), "the change must be visible at its own position"


def test_causal_masking_takes_the_flag_only_from_the_first_position() -> None:
    assert causal_masking(5) == (None, True)  # a whole target: torch's is_causal
    assert causal_masking(1, offset=4) == (None, False)  # one new position may see the whole prefix
    mask, is_causal = causal_masking(2, offset=3)  # two new positions after three cached ones
    assert not is_causal and mask.tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.mark.parametrize("attention", ["explicit", "fused"])
def test_source_padding_changes_nothing(attention: str) -> None:
    torch.manual_seed(2)
    config = dataclasses.replace(TINY, attention=attention)
    model = Transformer(config).eval()
    src, tgt = make_batch(config)
    base = model(src, tgt)
    pad = src == config.pad_id
    garbage = src.clone()
    garbage[pad] = torch.randint(4, config.src_vocab_size, (int(pad.sum()),))
    # Real tokens where the padding was, encoded under the original padding mask: they must not matter.
    memory, mask = model.encode(src)
    garbage_memory = model.encoder(model.src_pos(model.src_embed(garbage)), mask)
    keep = ~pad
    assert torch.allclose(memory[keep], garbage_memory[keep], atol=1e-6, rtol=0)
    assert torch.allclose(model.decode(tgt, garbage_memory, mask), base, atol=1e-6, rtol=0)
    # Sequences padded to a longer batch give the same logits as alone.
    alone = model(src[2:3, :3], tgt[2:3])
    assert torch.allclose(alone, base[2:3], atol=1e-5, rtol=0)


def test_permutation_equivariance_without_positions() -> None:
    torch.manual_seed(3)
    src = torch.randint(4, TINY.src_vocab_size, (2, 8))
    perm = torch.randperm(8)
    for positional, equivariant in (("none", True), ("sinusoidal", False), ("learned", False)):
        model = Transformer(dataclasses.replace(TINY, positional=positional)).eval()
        out, _ = model.encode(src)
        out_perm, _ = model.encode(src[:, perm])
        assert torch.allclose(out_perm, out[:, perm], atol=1e-5) is equivariant


def test_learned_positions_are_a_trained_table() -> None:
    model = Transformer(dataclasses.replace(TINY, positional="learned"))
    table = model.src_pos.table
    assert isinstance(table, nn.Parameter) and table.shape == (TINY.max_len, TINY.d_model)
    assert any(p is table for p in model.parameters())  # the optimiser sees it
    src, tgt = make_batch(TINY)
    model(src, tgt).sum().backward()
    assert table.grad[: src.size(1)].abs().sum() > 0 and not table.grad[src.size(1) :].any()


@pytest.mark.parametrize("attention", ["explicit", "fused"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_matches_full(attention: str, norm_first: bool) -> None:
    torch.manual_seed(4)
    config = dataclasses.replace(TINY, attention=attention, norm_first=norm_first)
    model = Transformer(config).eval()
    src, tgt = make_batch(config)
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.new_cache(max_len=tgt.size(1))
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))]
    assert cache.length == tgt.size(1)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_attention_weights_are_recorded() -> None:
    model = Transformer(TINY).eval()
    src, tgt = make_batch(TINY)
    record: list = []
    memory, mask = model.encode(src, record=record)
    model.decode(tgt, memory, mask, record=record)
    assert len(record) == TINY.n_encoder_layers + TINY.n_decoder_layers
    assert record[0]["self"].shape == (3, 4, 9, 9)
    assert record[-1]["cross"].shape == (3, 4, 7, 9)
    assert torch.all(record[-1]["cross"][2, :, :, 3:] == 0)  # padding gets nothing
    assert torch.all(record[-1]["self"][0].triu(1) == 0)  # the future gets nothing


def test_weight_sharing() -> None:
    shared = Transformer(dataclasses.replace(TINY, tgt_vocab_size=50, share_embeddings=True, tie_output=True))
    assert shared.src_embed is shared.tgt_embed and shared.out_proj.weight is shared.tgt_embed.weight
    separate = Transformer(TINY)
    assert separate.src_embed is not separate.tgt_embed
    # Embeddings are multiplied by √d_model.
    ids = torch.tensor([[5]])
    assert torch.allclose(separate.src_embed(ids)[0, 0], separate.src_embed.weight[5] * math.sqrt(32))


def test_presets_are_the_papers() -> None:
    base, big = TransformerConfig.preset("base"), TransformerConfig.preset("big")
    assert (base.d_model, base.n_heads, base.d_ff, base.n_encoder_layers, base.d_k, base.dropout) == (
        512,
        8,
        2048,
        6,
        64,
        0.1,
    )
    assert (big.d_model, big.n_heads, big.d_ff, big.n_decoder_layers, big.d_k, big.dropout) == (
        1024,
        16,
        4096,
        6,
        64,
        0.3,
    )
    assert 60e6 < Transformer(base).num_parameters() < 66e6  # Table 3: 65M
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.d_model = 3  # type: ignore[misc]
    with pytest.raises(TransformerError, match="divisible"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(TransformerError, match="unknown model preset"):
        TransformerConfig.preset("huge")
