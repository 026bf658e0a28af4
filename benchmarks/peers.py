"""The models the benchmarks compare, built at the same configuration: ours, torch.nn.Transformer with the
layers a translation model needs around it, and Hugging Face's MarianMTModel (random weights, no download;
the optional `bench` dependency group installs `transformers`)."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer import Transformer, TransformerConfig
from transformer.data.batching import collate, token_batches
from transformer.data.corpus import read_split
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.loss import projected_loss
from transformer.model.dropout import Dropout
from transformer.model.transformer import sinusoidal_table

VOCAB = 8000  # the project's joint SentencePiece vocabulary, for both configurations
# torch's fused attention kernels our trainer leaves on: all but cuDNN's (transformer.runtime.configure_torch)
OURS_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# (decoder features, vocabulary projection, target ids, label smoothing) -> summed loss: the projected step's
LossFn = Callable[[Tensor, nn.Module, Tensor, float], Tensor]


def config_for(name: str, max_len: int = 1024) -> TransformerConfig:
    """`small` (d 256, 3+3) or the paper's `base` (d 512, 6+6), with our vocabulary."""
    return TransformerConfig.preset(name, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_len=max_len)


class TorchPeer(nn.Module):
    """nn.Transformer with shared √d_model-scaled embeddings, sinusoidal positions and dropout on their sum,
    a tied output layer: the same model as ours. nn.Transformer also ends its encoder and its decoder with
    a LayerNorm, which a post-LN model does not have (the paper's, ours, Marian's): removed. Its one
    `dropout` also drops attention weights and the feed-forward's hidden units, which ours (and Marian here)
    do at `attention_dropout` and `activation_dropout` (0 by default): set to those. Attention dropout
    above 0 sends torch's CPU attention to its slower math path, which had made the peer 1.08-1.17× slower
    per step (a review of 2026-12-05)."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.core = nn.Transformer(
            c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff, c.dropout, batch_first=True
        )
        self.core.encoder.norm = self.core.decoder.norm = None
        for layer in [*self.core.encoder.layers, *self.core.decoder.layers]:
            layer.dropout = nn.Dropout(c.activation_dropout)  # after the feed-forward's activation
            for attention in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attention is not None:
                    attention.dropout = c.attention_dropout
        self.dropout = nn.Dropout(c.dropout)
        self.register_buffer("pe", sinusoidal_table(c.max_len, c.d_model))
        self.scale = c.d_model**0.5
        self.pad_id = c.pad_id

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        x = self.dropout(self.embed(src) * self.scale + self.pe[: src.size(1)])
        y = self.dropout(self.embed(tgt) * self.scale + self.pe[: tgt.size(1)])
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=torch.bool)
        pad = src == self.pad_id
        hidden = self.core(x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return hidden @ self.embed.weight.t()  # (batch, tgt_len, vocab)


def marian(c: TransformerConfig) -> nn.Module | None:
    """MarianMTModel at our configuration (post-LN, ReLU, scaled shared embeddings, sinusoidal positions,
    tied output), or None when `transformers` is not installed."""
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        return None
    config = MarianConfig(
        vocab_size=c.src_vocab_size,
        decoder_vocab_size=c.tgt_vocab_size,
        d_model=c.d_model,
        encoder_layers=c.n_encoder_layers,
        decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.n_heads,
        decoder_attention_heads=c.n_heads,
        encoder_ffn_dim=c.d_ff,
        decoder_ffn_dim=c.d_ff,
        activation_function=c.activation,
        dropout=c.dropout,
        attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout,
        max_position_embeddings=c.max_len,
        scale_embedding=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        forced_eos_token_id=None,
        decoder_start_token_id=BOS_ID,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    return MarianMTModel(config)


class MarianLogits(nn.Module):
    """(src, tgt_in) -> logits, the interface our training step uses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt).logits


def marian_logits(c: TransformerConfig) -> nn.Module | None:
    """MarianMTModel at our configuration behind the (src, tgt_in) -> logits interface, or None when
    `transformers` is not installed."""
    model = marian(c)
    return MarianLogits(model) if model is not None else None


class _WithoutPaddingMasks(Transformer):
    """Ours, attending to every source position, padding or not: for batches without padding (the GPU
    benchmark's), where it computes what ours does, but with no mask for the fused attention to read."""

    def encode(self, src: Tensor, record=None) -> tuple[Tensor, None]:
        x = self.dropout(self.src_pos(self.src_embed(src)))
        return self.encoder(x, None, record), None


def ours(
    c: TransformerConfig,
    *,
    fuse_qkv: bool | None = None,
    torch_dropout: bool = False,
    padding_masks: bool = True,
    norms_in_autocast_dtype: bool | None = None,
) -> Transformer:
    """Our model; optionally with the self-attention projections fused into one matmul or not (None: the
    model's default, fused on CUDA only), with nn.Dropout instead of our Dropout, or without padding
    masks, or with the layer norms' output in fp32 or autocast's dtype (None: the model's default, the
    latter on CUDA only), to measure those choices."""
    model = Transformer(c) if padding_masks else _WithoutPaddingMasks(c)
    for module in list(model.modules()):
        if hasattr(module, "fuse_qkv") and fuse_qkv is not None:
            module.fuse_qkv = fuse_qkv
        if hasattr(module, "in_autocast_dtype") and norms_in_autocast_dtype is not None:
            module.in_autocast_dtype = norms_in_autocast_dtype
        for name, child in list(module.named_children()):
            if torch_dropout and isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return model


def training_step(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    bf16: bool = False,
    fused_adam: bool = False,
    projected: bool = False,
    loss: LossFn = projected_loss,
) -> Callable[[], None]:
    """One training step per call, on the next of `batches` (src, tgt) in turn: label-smoothed loss per
    target token, backward, Adam (β₂ 0.98). `tgt` holds BOS … EOS: the model reads tgt[:, :-1] and
    predicts tgt[:, 1:]; padding is ignored by the loss.

    With `projected` it is the step our trainer takes (transformer/train.py): only the non-padding
    positions are projected onto the vocabulary, and the loss is ours (transformer/loss.py, its gradient
    written out). Without it, `F.cross_entropy` over all the logits, as the peers' users would write it.
    `fused_adam` is torch's fused Adam, which our trainer uses and any user can ask for; without it, the
    for-loop implementation torch.optim.Adam defaults to on the CPU. `loss` replaces `projected_loss` in
    the projected step (to measure another way of computing it)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=fused_adam)
    prepared = [(src, tgt[:, :-1], tgt[:, 1:], int((tgt[:, 1:] != PAD_ID).sum())) for src, tgt in batches]
    turns = itertools.cycle(prepared)

    def step() -> None:
        src, tgt_in, tgt_out, n_tokens = next(turns)
        optimizer.zero_grad(set_to_none=True)
        # the loss too under autocast, as in the trainer; on the device the batch is on
        with torch.autocast(src.device.type, dtype=torch.bfloat16, enabled=bf16):
            if projected:  # as transformer.train.batch_loss
                value = loss(model(src, tgt_in, project=False), model.out_proj, tgt_out, 0.1)
            else:
                logits = model(src, tgt_in)
                value = F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    tgt_out.flatten(),
                    ignore_index=PAD_ID,
                    label_smoothing=0.1,
                    reduction="sum",
                )
        (value / n_tokens).backward()
        optimizer.step()

    return step


@dataclass(frozen=True)
class Variant:
    """What one row of a training benchmark runs: how its model is built and how its step is taken, so
    that a variant of ours changes one choice and says which."""

    build: Callable[[TransformerConfig], nn.Module | None]  # None: cannot be built here (no `transformers`)
    projected: bool = True  # our trainer's step (the projected loss), else F.cross_entropy over all logits
    bf16: bool = False  # under bf16 autocast
    fused_adam: bool = True
    # the whole model under torch.compile (as `transformer train compile=true`); a string is compile's mode
    # ("reduce-overhead": the compiled kernels replayed as CUDA graphs, for shapes that stay the same)
    compile: bool | str = False
    loss: Callable[[], LossFn] | None = None  # makes the projected step's loss; None: projected_loss
    sdpa: tuple[str, ...] = ()  # the fused attention kernels allowed (SDPBackend names); (): torch's choice
    # Steps per call: on a GPU, timed together with one wait at the end, as a trainer that never waits on
    # the GPU between steps would run (ours waits twice a step: the loss's value, the finiteness check)
    steps_per_call: int = 1

    def step(
        self, config: TransformerConfig, batches: Sequence[tuple[Tensor, Tensor]], device: torch.device
    ) -> Callable[[], None] | None:
        """`steps_per_call` training steps per call over `batches` (on `device`), the model built with
        seed 0; None where the model cannot be built."""
        torch.manual_seed(0)
        model = self.build(config)
        if model is None:
            return None
        model = model.to(device)
        mode = self.compile if isinstance(self.compile, str) else None
        if self.compile:
            model = torch.compile(model, mode=mode)
        step = training_step(
            model,
            batches,
            bf16=self.bf16,
            fused_adam=self.fused_adam,
            projected=self.projected,
            loss=self.loss() if self.loss else projected_loss,
        )
        step = with_attention_kernels(step, self.sdpa) if self.sdpa else step
        step = _new_iterations(step) if mode == "reduce-overhead" else step
        return step if self.steps_per_call == 1 else _repeated(step, self.steps_per_call)


def _new_iterations(step: Callable[[], None]) -> Callable[[], None]:
    """`step`, telling CUDA graphs that each call is a new training iteration: the memory of the previous
    one's outputs may be reused. (Their own guess, a new iteration at each forward after a backward, would
    do too; this does not depend on it.)"""

    def call() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        step()

    return call


def _repeated(step: Callable[[], None], times: int) -> Callable[[], None]:
    def call() -> None:
        for _ in range(times):
            step()

    return call


def with_attention_kernels(step: Callable[[], None], backends: Sequence[str]) -> Callable[[], None]:
    """`step` with torch's fused attention limited to `backends` (SDPBackend names)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = [getattr(SDPBackend, name) for name in backends]

    def call() -> None:
        with sdpa_kernel(allowed):
            step()

    return call


def corpus_batches(count: int, max_tokens: int = 2500, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """The first `count` training batches our trainer would make from the bundled Multi30k de→en: a joint
    SentencePiece model of VOCAB pieces trained on the spot (a few seconds), token-budget batches of
    `max_tokens` in the trainer's shuffled order. Real lengths, so real padding (~7 %), which a loss over
    all positions pays for and ours skips. Returns (src, tgt) pairs, tgt = BOS … EOS."""
    root = Path(__file__).resolve().parent.parent / "data" / "multi30k"
    pairs = read_split(root, "train", "de", "en")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer.train([t for pair in pairs for t in pair], Path(tmp) / "sp.model", VOCAB)
        src = tokenizer.encode_batch([s for s, _ in pairs])
        tgt = tokenizer.encode_batch([t for _, t in pairs])
    order = token_batches([len(s) for s in src], [len(t) for t in tgt], max_tokens, shuffle=True, seed=seed)
    out = []
    for ids in order[:count]:
        batch = collate([(src[i], tgt[i]) for i in ids])
        out.append((batch.src, torch.cat([batch.tgt_in[:, :1], batch.tgt_out], dim=1)))
    return out


def random_batch(batch: int, src_len: int, tgt_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sources of `src_len` tokens + EOS, targets BOS + `tgt_len` tokens (the model sees tgt_len steps)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, src_len + 1), generator=g)
    src[:, -1] = EOS_ID
    tgt = torch.randint(4, VOCAB, (batch, tgt_len + 1), generator=g)
    tgt[:, 0] = BOS_ID
    return src, tgt


def step_flops(c: TransformerConfig, batch: int, src_len: int, tgt_len: int, backward: bool = True) -> float:
    """Matmul FLOPs of a forward pass (×3 with the backward): projections, FFN, attention, vocabulary."""
    d, f = c.d_model, c.d_ff
    enc = batch * src_len * c.n_encoder_layers * (4 * d * d + 2 * d * f) * 2
    dec = batch * tgt_len * c.n_decoder_layers * (4 * d * d + 2 * d * f) * 2
    cross = c.n_decoder_layers * batch * (tgt_len + src_len) * 2 * d * d * 2  # Q·W_Q… and memory·W_K, W_V
    attn = (
        batch * c.n_encoder_layers * 4 * src_len**2 * d
        + batch * c.n_decoder_layers * 4 * tgt_len * (tgt_len + src_len) * d
    )
    vocab = batch * tgt_len * d * c.tgt_vocab_size * 2
    return (3 if backward else 1) * (enc + dec + cross + attn + vocab)
