"""Export to, and import from, the Hugging Face `MarianMTModel` format.

A MarianMT directory (config.json, model.safetensors, source.spm / target.spm / vocab.json) is what
`transformers` loads with `MarianMTModel.from_pretrained`, and what CTranslate2's converter takes to its
production engine. Marian is the same post-LN encoder–decoder as ours, with four differences, each mapped
exactly here:

* Sinusoidal positions are laid out [sin(ω_0 p) … sin(ω_{d/2-1} p), cos(ω_0 p) … cos(ω_{d/2-1} p)] rather
  than interleaved. Rather than a second table layout, the whole residual stream is permuted: every
  sublayer reads and writes d_model-wide vectors through linear maps and LayerNorms, and LayerNorm's mean
  and variance do not depend on the order of coordinates, so permuting the d_model axis of every
  embedding, residual-side weight and bias (and the LayerNorm parameters) gives a model that computes the
  same logits with positions in Marian's layout. The inner widths (heads, FFN) are left alone.
* Marian models use swish in the FFN and a bias on the output projection (final_logits_bias): our config
  has `activation="swish"` and `output_bias` for them.
* Marian's vocabulary ends with the pad token, and Marian's decoder starts from pad's embedding, which is
  zero: CTranslate2's converter relies on both (it drops the last vocabulary row and starts its decoder
  from a zero embedding). Ours has pad first and starts from BOS's embedding. The export therefore
  reorders the vocabulary the way opus-mt models have it (</s>, <unk>, <s>, the pieces, <pad> last),
  starts the decoder from pad with a zero row, and moves what BOS contributed to the first decoder input,
  √d_model·embedding(BOS), into row 0 of the decoder's position table, which is written into the weights
  (the decoder's position 0 only ever holds the start token). Pad's logit is -inf through
  `final_logits_bias`: our model never learnt to predict pad, and Marian never generates it.
  Transformers' `save_pretrained` leaves the position tables out, so convert the exported directory
  itself, not a re-saved copy of it.
* Marian's tokenizer runs SentencePiece on the raw sentence, where ours adds the word-initial space
  itself (see `transformer.data.tokenizer`): the exported .spm files have `add_dummy_prefix` switched on,
  which gives the same pieces.

Nothing here needs `transformers`: the files are written and read with safetensors and json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from transformer.checkpoint import give_ordinary_mode
from transformer.config import TransformerConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from transformer.errors import TransformerError
from transformer.model import Transformer
from transformer.model.transformer import sinusoidal_table

# Marian reads token ids through vocab.json, so the special pieces must carry these names.
_SPECIAL_PIECES = {"<pad>", "<unk>", "</s>"}


# Token ids of the exported model (opus-mt's order); pad is the last id, vocab_size - 1.
MARIAN_EOS_ID, MARIAN_UNK_ID, MARIAN_BOS_ID = 0, 1, 2
# Positions that differ from Marian's sinusoidal table by more than this are refused on import.
_POSITION_TOLERANCE = 1e-4


def marian_vocab_order(vocab_size: int) -> Tensor:
    """Our token id for each exported id: </s>, <unk>, <s>, the pieces in our order, <pad> last."""
    specials = [EOS_ID, UNK_ID, BOS_ID]
    pieces = [i for i in range(vocab_size) if i not in (*specials, PAD_ID)]
    return torch.tensor([*specials, *pieces, PAD_ID])


def marian_permutation(d_model: int) -> Tensor:
    """Index p such that our interleaved sinusoidal table, columns taken in order p, is Marian's table:
    the even (sin) columns, then the odd (cos) ones. Applied to the whole residual stream."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


# (our parameter suffix, Marian's, the axes of the tensor that run along the residual stream)
_ATTENTION = (
    ("w_q.weight", "q_proj.weight", (1,)),
    ("w_q.bias", "q_proj.bias", ()),
    ("w_k.weight", "k_proj.weight", (1,)),
    ("w_k.bias", "k_proj.bias", ()),
    ("w_v.weight", "v_proj.weight", (1,)),
    ("w_v.bias", "v_proj.bias", ()),
    ("w_o.weight", "out_proj.weight", (0,)),
    ("w_o.bias", "out_proj.bias", (0,)),
)
_NORM = (("weight", "weight", (0,)), ("bias", "bias", (0,)))
_FFN = (
    ("ffn.w_1.weight", "fc1.weight", (1,)),
    ("ffn.w_1.bias", "fc1.bias", ()),
    ("ffn.w_2.weight", "fc2.weight", (0,)),
    ("ffn.w_2.bias", "fc2.bias", (0,)),
)


def _parameter_map(config: TransformerConfig) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(our key, Marian key, residual axes) for every weight of the encoder and decoder stacks."""
    for side, n_layers, cross in (
        ("encoder", config.n_encoder_layers, False),
        ("decoder", config.n_decoder_layers, True),
    ):
        for i in range(n_layers):
            ours, theirs = f"{side}.layers.{i}.", f"model.{side}.layers.{i}."
            groups = [
                ("self_attn.", "self_attn.", _ATTENTION),
                ("self_attn_norm.", "self_attn_layer_norm.", _NORM),
            ]
            if cross:
                groups += [("cross_attn.", "encoder_attn.", _ATTENTION)]
                groups += [("cross_attn_norm.", "encoder_attn_layer_norm.", _NORM)]
            groups += [("", "", _FFN), ("ffn_norm.", "final_layer_norm.", _NORM)]
            for our_group, their_group, table in groups:
                for our_name, their_name, axes in table:
                    yield ours + our_group + our_name, theirs + their_group + their_name, axes


def _permute(tensor: Tensor, axes: tuple[int, ...], index: Tensor) -> Tensor:
    for axis in axes:
        tensor = tensor.index_select(axis, index)
    return tensor.contiguous()


def check_exportable(config: object) -> TransformerConfig:
    """The settings Marian can express; anything else is refused before a file is written."""
    if not isinstance(config, TransformerConfig):
        raise TransformerError("only Transformer checkpoints can be exported to Marian (this one is an RNN)")
    problems = []
    if config.positional != "sinusoidal":
        problems.append(f"positional={config.positional} (Marian has sinusoidal positions only)")
    if config.norm_first:
        problems.append("norm_first=true (Marian is post-LN)")
    if config.src_vocab_size != config.tgt_vocab_size:
        problems.append("different source and target vocabulary sizes (the export writes one vocabulary)")
    if config.pad_id != PAD_ID:
        problems.append(f"pad_id={config.pad_id} (the tokenizer's pad id is {PAD_ID})")
    if config.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps={config.layer_norm_eps} (Marian's LayerNorms use 1e-5)")
    if problems:
        raise TransformerError(f"cannot export to Marian: {'; '.join(problems)}")
    return config


def to_marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under Marian's names, with the residual stream permuted to Marian's position layout and
    the vocabulary reordered by `marian_vocab_order`; BOS's input moved into the decoder's position 0.

    Tied matrices are written once, under the name Marian ties the others to, but for shared embeddings
    beside an untied output: those are written under every name."""
    c = check_exportable(model.config)
    ours = model.state_dict()
    p = marian_permutation(c.d_model)
    order = marian_vocab_order(c.tgt_vocab_size)

    def vocabulary_rows(weight: Tensor) -> Tensor:
        rows = _permute(weight, (1,), p).index_select(0, order)  # (vocab, d_model), Marian's ids and layout
        rows[-1] = 0.0  # pad, the decoder's start: a zero embedding, as CTranslate2 assumes
        return rows

    out = {theirs: _permute(ours[key], axes, p) for key, theirs, axes in _parameter_map(c)}
    if c.share_embeddings:
        out["model.shared.weight"] = vocabulary_rows(ours["src_embed.weight"])
        if not c.tie_output:  # transformers 5 ties the two to `shared` only with tie_word_embeddings
            for side in ("encoder", "decoder"):
                out[f"model.{side}.embed_tokens.weight"] = out["model.shared.weight"].clone()
    else:
        out["model.encoder.embed_tokens.weight"] = vocabulary_rows(ours["src_embed.weight"])
        out["model.decoder.embed_tokens.weight"] = vocabulary_rows(ours["tgt_embed.weight"])
    if not c.tie_output:
        out["lm_head.weight"] = vocabulary_rows(ours["out_proj.weight"])
    bias = ours["out_proj.bias"] if c.output_bias else torch.zeros(c.tgt_vocab_size)
    bias = bias.index_select(0, order)
    # Padding and BOS are never generated, as our searches exclude them (`search._Stepper.logits`).
    bias[[-1, MARIAN_BOS_ID]] = float("-inf")
    out["final_logits_bias"] = bias.reshape(1, -1)
    table = sinusoidal_table(c.max_len, c.d_model)[:, p]  # (max_len, d_model), Marian's layout
    out["model.encoder.embed_positions.weight"] = table
    start = table.clone()
    start[0] += math.sqrt(c.d_model) * ours["tgt_embed.weight"][BOS_ID, p]  # what BOS adds at position 0
    out["model.decoder.embed_positions.weight"] = start
    return {key: tensor.detach().cpu().contiguous() for key, tensor in out.items()}


def marian_config(config: TransformerConfig) -> dict:
    """The config.json of the exported model."""
    activation = {"relu": "relu", "gelu": "gelu", "swish": "swish"}[config.activation]
    return {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "vocab_size": config.src_vocab_size,
        "decoder_vocab_size": config.tgt_vocab_size,
        "share_encoder_decoder_embeddings": config.share_embeddings,
        "tie_word_embeddings": config.tie_output,
        "d_model": config.d_model,
        "encoder_layers": config.n_encoder_layers,
        "decoder_layers": config.n_decoder_layers,
        "encoder_attention_heads": config.n_heads,
        "decoder_attention_heads": config.n_heads,
        "encoder_ffn_dim": config.d_ff,
        "decoder_ffn_dim": config.d_ff,
        "activation_function": activation,
        "scale_embedding": True,  # ours always multiplies embeddings by √d_model (§3.4)
        "max_position_embeddings": config.max_len,
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout,
        **_marian_special_ids(config.tgt_vocab_size),
        "is_encoder_decoder": True,
        "torch_dtype": "float32",
    }


def _marian_special_ids(vocab_size: int) -> dict[str, int]:
    pad = vocab_size - 1
    return {
        "pad_token_id": pad,
        "bos_token_id": MARIAN_BOS_ID,
        "eos_token_id": MARIAN_EOS_ID,
        "forced_eos_token_id": MARIAN_EOS_ID,
        "decoder_start_token_id": pad,  # with a zero embedding; BOS's input is in the decoder's position 0
    }


def marian_spm(tokenizer: Tokenizer) -> bytes:
    """Our SentencePiece model with `add_dummy_prefix` on: Marian's tokenizer encodes the raw sentence,
    and the dummy prefix supplies the leading space our `Tokenizer.encode` adds by hand."""
    proto = _sentencepiece_proto().ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    proto.normalizer_spec.add_dummy_prefix = True
    return proto.SerializeToString()


def _sentencepiece_proto() -> Any:
    """SentencePiece's model protobuf module, which needs protobuf (the `export` extra): one error line
    without it."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise TransformerError(
            f"export needs protobuf to rewrite the tokenizer ({error}): pip install -e '.[export]'"
        ) from None
    return sentencepiece_model_pb2


def export_marian(checkpoint: str | Path, out: str | Path, name: str = "best") -> Path:
    """Write a checkpoint (a run directory and `name`, or a .safetensors file in one) as a MarianMT
    directory at `out`.

    Everything is written into a temporary directory beside `out`, which is renamed into place at the end:
    an interrupted export leaves no half-written model under `out`."""
    from transformer.translate import Translator  # the loader checks weights against the config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TransformerError(f"{out} already exists and is not an empty directory: choose a new --out")
    _sentencepiece_proto()  # before the model is loaded
    translator = Translator.from_checkpoint(checkpoint, name)
    config = check_exportable(translator.model.config)
    tokenizer = translator.tokenizer
    pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
    if not set(pieces) >= _SPECIAL_PIECES:
        raise TransformerError(f"the tokenizer lacks the pieces {sorted(_SPECIAL_PIECES)} Marian expects")
    tc = translator.train_config
    files: dict[str, bytes] = {
        "config.json": _json(marian_config(config)),
        "generation_config.json": _json(
            {
                **_marian_special_ids(config.tgt_vocab_size),
                "num_beams": tc.beam,
                "max_length": config.max_len,
            }
        ),
        "tokenizer_config.json": _json(
            {
                "tokenizer_class": "MarianTokenizer",
                "source_lang": tc.src_lang,
                "target_lang": tc.tgt_lang,
                "separate_vocabs": False,
                "model_max_length": config.max_len,
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            }
        ),
        "vocab.json": _json(
            {pieces[ours]: i for i, ours in enumerate(marian_vocab_order(len(pieces)).tolist())}
        ),
        "source.spm": marian_spm(tokenizer),
    }
    files["target.spm"] = files["source.spm"]  # one joint vocabulary
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for filename, data in files.items():
            (tmp / filename).write_bytes(data)
        save_file(to_marian_state_dict(translator.model), str(tmp / "model.safetensors"), {"format": "pt"})
        give_ordinary_mode(tmp / "model.safetensors")  # safetensors makes it 0600: see the function
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as error:
        raise TransformerError(f"could not write {out} ({error.strerror or error})") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def load_marian(path: str | Path) -> Transformer:
    """A local MarianMT directory (config.json and model.safetensors or pytorch_model.bin) as our
    `Transformer`, computing the same logits for the same token ids.

    The model keeps Marian's token ids and its decoder start token (config `decoder_start_token_id`,
    usually the pad id); the tokenizer files are not read. Position tables, where the weights hold them
    (as our exports do), must be Marian's sinusoids, except that the decoder's row 0 may carry the start
    token's input, as `to_marian_state_dict` puts it there: that is moved back into the start token's
    embedding."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TransformerError(f"{path} has no readable config.json ({error})") from None
    if hf.get("model_type") != "marian":
        raise TransformerError(
            f"{path / 'config.json'} is not a Marian config (model_type={hf.get('model_type')})"
        )
    marian = _read_marian_weights(path)
    config = _config_from_marian(hf, marian.get("final_logits_bias"), path)
    p_inv = torch.argsort(marian_permutation(config.d_model))
    state = {key: _permute(marian[theirs], axes, p_inv) for key, theirs, axes in _parameter_map(config)}
    shared = marian.get("model.shared.weight")
    src = marian.get("model.encoder.embed_tokens.weight", shared)
    tgt = marian.get("model.decoder.embed_tokens.weight", shared)
    if src is None or tgt is None:
        raise TransformerError(f"{path}: the weights hold no token embeddings")
    lm_head = tgt if config.tie_output else marian.get("lm_head.weight")
    if lm_head is None:
        raise TransformerError(f"{path}: tie_word_embeddings is false but the weights hold no lm_head.weight")
    start_input = _start_position_input(marian, config, path)
    if start_input is not None:
        # The start token's embedding takes its position-0 input; untied, so that neither the source
        # embedding nor the output projection changes with it.
        start = hf.get("decoder_start_token_id", config.pad_id)
        if start != config.pad_id:
            raise TransformerError(
                f"{path}: the decoder's position 0 differs from Marian's sinusoid, which only a decoder "
                f"starting from pad can carry (decoder_start_token_id={start}, pad_token_id={config.pad_id})"
            )
        config = dataclasses.replace(config, share_embeddings=False, tie_output=False)
        tgt = tgt.clone()
        tgt[start] += start_input / math.sqrt(config.d_model)
    state["src_embed.weight"] = _permute(src, (1,), p_inv)
    state["tgt_embed.weight"] = _permute(tgt, (1,), p_inv)
    state["out_proj.weight"] = _permute(lm_head, (1,), p_inv)
    if config.output_bias:
        state["out_proj.bias"] = marian["final_logits_bias"].reshape(-1)
    model = Transformer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise TransformerError(
            f"{path}: weights do not fit config.json ({str(error).splitlines()[-1]})"
        ) from None
    return model.eval()


def _start_position_input(marian: dict[str, Tensor], config: TransformerConfig, path: Path) -> Tensor | None:
    """What the decoder's position 0 adds to Marian's sinusoid, or None where the weights hold no
    decoder table or it adds nothing; refuses any other departure from the sinusoids."""
    d = config.d_model
    start_input = None
    for side in ("encoder", "decoder"):
        table = marian.get(f"model.{side}.embed_positions.weight")
        if table is None:
            continue
        expected = sinusoidal_table(table.size(0), d)[:, marian_permutation(d)]  # Marian's layout
        difference = table - expected
        if side == "decoder":
            start_input, difference = difference[0], difference[1:]
        if table.size(1) != d or difference.abs().max() > _POSITION_TOLERANCE:
            raise TransformerError(f"{path}: the {side}'s position table is not Marian's sinusoidal table")
    if start_input is None or start_input.abs().max() <= _POSITION_TOLERANCE:
        return None
    return start_input


def _config_from_marian(hf: dict, bias: Tensor | None, path: Path) -> TransformerConfig:
    """Our config for a Marian config, refusing what our model cannot compute."""

    def same(a: str, b: str) -> int:
        if hf[a] != hf[b]:
            raise TransformerError(f"{path}: {a}={hf[a]} differs from {b}={hf[b]}; ours needs them equal")
        return hf[a]

    activation = hf.get("activation_function", "gelu")
    if activation not in ("relu", "gelu", "swish", "silu"):
        raise TransformerError(f"{path}: activation_function={activation} is not one of relu, gelu, swish")
    if not hf.get("scale_embedding", False):
        raise TransformerError(f"{path}: scale_embedding=false; our embeddings are always scaled by √d_model")
    try:
        share = hf.get("share_encoder_decoder_embeddings", True)
        vocab = hf["vocab_size"]
        return TransformerConfig(
            src_vocab_size=vocab,
            tgt_vocab_size=vocab if share else (hf.get("decoder_vocab_size") or vocab),
            d_model=hf["d_model"],
            n_heads=same("encoder_attention_heads", "decoder_attention_heads"),
            d_ff=same("encoder_ffn_dim", "decoder_ffn_dim"),
            n_encoder_layers=hf["encoder_layers"],
            n_decoder_layers=hf["decoder_layers"],
            dropout=hf.get("dropout", 0.1),
            attention_dropout=hf.get("attention_dropout", 0.0),
            activation_dropout=hf.get("activation_dropout", 0.0),
            activation="swish" if activation == "silu" else activation,
            max_len=hf.get("max_position_embeddings", 1024),
            share_embeddings=share,
            tie_output=hf.get("tie_word_embeddings", True),
            output_bias=bias is not None and bool(bias.any()),
            pad_id=hf["pad_token_id"],
        )
    except KeyError as error:
        raise TransformerError(f"{path / 'config.json'} lacks {error}") from None


def _read_marian_weights(path: Path) -> dict[str, Tensor]:
    """model.safetensors, or the older pytorch_model.bin (read with weights_only: no code runs)."""
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise TransformerError(f"{path} has neither model.safetensors nor pytorch_model.bin")
