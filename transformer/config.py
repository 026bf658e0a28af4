"""Configuration: frozen dataclasses, saved in every checkpoint, with the paper's presets.

A config is a value, not a bag of globals: it is built once (from a preset, a YAML file and `key=value`
overrides), written beside the weights, and read back to rebuild exactly the model that was trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformer.errors import TransformerError


def check_finite(config: Any) -> None:
    """Refuse a NaN or infinite float setting: NaN fails no `<=`/`<` a range check makes to refuse it
    (`lr_factor <= 0`), and inf passes `>= 0` only to overflow later (an infinite time budget)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TransformerError(f"{field.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder–decoder, named as in Vaswani et al. (2017)."""

    src_vocab_size: int = 8000
    tgt_vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # P_drop of the paper: sublayer outputs and embedding sums
    attention_dropout: float = 0.0  # on attention weights (not in the paper; fairseq's attention_dropout)
    activation_dropout: float = 0.0  # inside the FFN, after the activation (not in the paper)
    activation: Literal["relu", "gelu", "swish"] = "relu"  # swish (SiLU): what Marian models use
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN (trains without warm-up)
    positional: Literal["sinusoidal", "learned", "none"] = "sinusoidal"
    max_len: int = 1024  # longest sequence the positional table covers
    share_embeddings: bool = False  # one embedding matrix for source and target (needs a joint vocabulary)
    tie_output: bool = True  # the pre-softmax projection reuses the target embedding (paper §3.4)
    output_bias: bool = False  # a bias on the pre-softmax projection (Marian's final_logits_bias)
    pad_id: int = 0
    attention: Literal["fused", "explicit"] = "fused"  # fused: torch SDPA kernel; explicit: the formula
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_ff", "max_len", "src_vocab_size", "tgt_vocab_size"):
            if getattr(self, name) <= 0:
                raise TransformerError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise TransformerError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise TransformerError(
                "share_embeddings needs src_vocab_size == tgt_vocab_size (a joint vocabulary)"
            )
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise TransformerError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TransformerError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.layer_norm_eps < 1.0:  # 0 divides by 0 on a constant row; 1 swamps the variance
            raise TransformerError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")
        check_finite(self)

    @property
    def d_k(self) -> int:
        """Width of one head's queries and keys (and values: d_v = d_k in the paper)."""
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named preset (`small`, `base`, `big`), with any field overridden."""
        if name not in MODEL_PRESETS:
            raise TransformerError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)


# Table 3 of the paper: base (65M parameters) and big (213M) with a shared 37k BPE vocabulary, three-way
# weight tying (§3.4), P_drop 0.1 and 0.3 (the EN-DE big model). `small` is sized for a 2-core CPU and
# Multi30k: 3+3 layers of width 256.
MODEL_PRESETS: dict[str, TransformerConfig] = {
    "small": TransformerConfig(
        d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, share_embeddings=True
    ),
    "base": TransformerConfig(
        src_vocab_size=37000,
        tgt_vocab_size=37000,
        d_model=512,
        n_heads=8,
        d_ff=2048,
        dropout=0.1,
        share_embeddings=True,
    ),
    "big": TransformerConfig(
        src_vocab_size=37000,
        tgt_vocab_size=37000,
        d_model=1024,
        n_heads=16,
        d_ff=4096,
        dropout=0.3,
        share_embeddings=True,
    ),
}


@dataclass(frozen=True)
class RNNConfig:
    """The recurrent baselines (`transformer.model.rnn`): what the Transformer is compared against."""

    kind: Literal["rnn", "birnn", "rnn-attention"] = "rnn-attention"
    cell: Literal["gru", "lstm"] = "gru"
    src_vocab_size: int = 8000
    tgt_vocab_size: int = 8000
    emb_dim: int = 256
    hidden_size: int = 512
    n_layers: int = 1
    dropout: float = 0.3
    attention: Literal["additive", "dot"] = "additive"  # scoring of `rnn-attention`
    # With a joint vocabulary, source and target can share one embedding and the output layer can reuse it
    # through a projection to emb_dim (Press & Wolf 2017): the Transformer's sharing, for fair comparisons.
    share_embeddings: bool = False
    tie_output: bool = False
    pad_id: int = 0
    max_len: int = 1024  # longest sequence: longer sources are cut, and searches end, at this length

    def __post_init__(self) -> None:
        for name in ("emb_dim", "hidden_size", "n_layers", "src_vocab_size", "tgt_vocab_size", "max_len"):
            if getattr(self, name) <= 0:
                raise TransformerError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise TransformerError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise TransformerError(
                "share_embeddings needs one joint vocabulary (src_vocab_size == tgt_vocab_size)"
            )
        check_finite(self)


ModelConfig = TransformerConfig | RNNConfig

# Model settings the trainer sets from the tokenizer: not the user's, and not carried over by a resume.
SET_BY_TRAINER = frozenset({"src_vocab_size", "tgt_vocab_size", "pad_id"})


def model_config_class(family: str) -> type[TransformerConfig] | type[RNNConfig]:
    """The config class of a model family (`TrainConfig.model`)."""
    return TransformerConfig if family == "transformer" else RNNConfig


def model_width(config: ModelConfig) -> int:
    """The width the warm-up schedule scales by (d_model^-0.5; the hidden size for RNNs)."""
    return config.d_model if isinstance(config, TransformerConfig) else config.hidden_size


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict[str, Any], *, source: str = "config") -> Any:
    """Build a dataclass from a dict, refusing unknown keys and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - set(fields)))  # a YAML key may be a number
    if unknown:
        raise TransformerError(f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    checked = {key: _coerce(hints[key], value, f"{source}: {key}") for key, value in values.items()}
    return cls(**checked)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check (and gently convert, e.g. int -> float, "3" -> 3 from the command line) one value.

    A command-line value comes as the string typed and is read by the field's type alone: "no" stays a
    language code, "2016" a split name, "010" is ten."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise TransformerError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and str(value).lower() in ("none", "null"):  # None, or "none" typed
            return None
        inner = [a for a in args if a is not type(None)]
        for arg in inner[:-1]:  # the first type that takes it: `int | str` reads "3" as 3, "de" as "de"
            try:
                return _coerce(arg, value, where)
            except TransformerError:
                pass
        return _coerce(inner[-1], value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):  # YAML's reading of `no`, `on` or `2016`, unquoted
            raise TransformerError(f"{where} must be of type str, got {value!r}: quote it in a YAML recipe")
    else:
        return value
    raise TransformerError(f"{where} must be of type {hint.__name__}, got {value!r}")


def save_json(config: Any, path: Path) -> None:
    path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


@dataclass(frozen=True)
class TrainConfig:
    """What is trained on, and how. Defaults are the bundled Multi30k recipe for a 2-core CPU."""

    model: Literal["transformer", "rnn", "birnn", "rnn-attention"] = "transformer"
    preset: str = "small"  # the TransformerConfig preset that model overrides start from (transformer only)
    data_dir: str = "data/multi30k"
    src_lang: str = "de"
    tgt_lang: str = "en"
    train_split: str = "train"
    valid_split: str = "val"
    test_split: str = "test2016"
    vocab_size: int = 8000  # joint SentencePiece vocabulary
    tokenizer_lines: int = 2_000_000  # lines (both sides) the vocabulary is trained on; more are sampled
    max_len: int = 128  # training pairs longer than this (in tokens, either side) are dropped
    max_tokens: int = 2500  # padded tokens per batch (the larger of source and target side)
    accumulate: int = 1  # batches per optimiser step
    lr_factor: float = 0.8
    warmup: int = 500
    # the last fraction of the run (of time_budget_minutes, or of max_steps or max_epochs, whichever ends
    # first) in which the learning rate falls linearly to 0; 0 keeps the paper's 1/√step decay to the end
    cooldown: float = 0.2
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0 disables gradient clipping
    max_epochs: int = 100
    max_steps: int = 0  # 0: no limit
    time_budget_minutes: float = 37.0  # then average and evaluate; 0: no limit
    eval_every: int = 250  # optimiser steps between validations; 0: once per epoch
    patience: int = 0  # stop after this many validations without a better BLEU; 0: never
    average_last: int = 4  # average the last N validated checkpoints at the end (0 or 1: don't)
    beam: int = 4
    length_penalty: float = 0.6
    valid_beam: int = 1  # validation BLEU during training decodes greedily, for speed
    # auto: bf16 autocast where the hardware has bf16 matmuls (CPUs with AVX-512 BF16 or AMX, recent GPUs),
    # else fp32; fp16 (with loss scaling) on CUDA only
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model for training: for GPUs (on CPUs slower, README)
    seed: int = 1
    threads: int = 0  # torch intra-op threads; 0: torch's default
    log_every: int = 20
    # a run directory (its best checkpoint) or a checkpoint file to start from, as fairseq's --restore-file
    # with its optimizer, schedule and data loader reset: fine-tuning takes its tokenizer, model and weights
    init_from: str = ""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "tokenizer_lines", "max_len", "max_tokens", "accumulate", "warmup")
        for name in (*positive, "max_epochs", "log_every", "lr_factor"):
            if getattr(self, name) <= 0:
                raise TransformerError(f"{name} must be positive, got {getattr(self, name)}")
        check_search(self.beam, self.length_penalty)
        check_search(self.valid_beam, self.length_penalty)
        counts = ("max_steps", "eval_every", "patience", "average_last", "threads")
        for name in (*counts, "time_budget_minutes", "clip_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise TransformerError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0.0 <= self.cooldown < 1.0:
            raise TransformerError(f"cooldown must be in [0, 1), got {self.cooldown}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TransformerError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.src_lang == self.tgt_lang:
            raise TransformerError(f"src_lang and tgt_lang are both {self.src_lang!r}")
        check_finite(self)  # last: a range check's own message is the clearer where it catches NaN


# Bounds that stop a typo, not a choice: translation quality peaks at beams of about 4-10 and falls
# beyond (Koehn & Knowles 2017), while a beam of 100,000 exhausts memory without a word; and ((5 + |Y|)/6)^α
# overflows float32 for long outputs once α passes ~17, which leaves every hypothesis scored NaN.
MAX_BEAM = 128
MAX_LENGTH_PENALTY = 5.0


def check_search(beam: int, length_penalty: float) -> None:
    """Refuse a beam size or length penalty α that no search can use (α NaN fails too)."""
    if not 1 <= beam <= MAX_BEAM:
        raise TransformerError(f"beam size must be 1 to {MAX_BEAM}, got {beam}")
    if not 0.0 <= length_penalty <= MAX_LENGTH_PENALTY:
        raise TransformerError(
            f"the length penalty α must be in [0, {MAX_LENGTH_PENALTY:g}] (0: none; the paper's 0.6), "
            f"got {length_penalty}"
        )


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
    """Refuse sampling settings that leave no distribution to draw from (NaN fails too), and a seed that
    torch's generators cannot take (64 bits)."""
    if not 0 <= seed < 2**64:
        raise TransformerError(f"the sampling seed must be 0 to 2^64 - 1, got {seed}")
    if not (0.0 < temperature < math.inf):
        raise TransformerError(f"the sampling temperature must be above 0, got {temperature}")
    if top_k < 0:
        raise TransformerError(f"top-k must be 0 (all tokens) or more, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise TransformerError(f"top-p must be in (0, 1] (1: all tokens), got {top_p}")
