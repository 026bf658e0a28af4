"""Export to and import from Hugging Face MarianMT: `transformers` is the reference the logits are held to."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, dev_dependency
from safetensors.torch import load_file, save_file

from transformer.checkpoint import save_checkpoint
from transformer.cli import main
from transformer.config import TrainConfig, config_to_dict
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.errors import TransformerError
from transformer.export import (
    MARIAN_BOS_ID,
    MARIAN_EOS_ID,
    MARIAN_UNK_ID,
    export_marian,
    load_marian,
    marian_permutation,
    marian_vocab_order,
)
from transformer.model import Transformer
from transformer.model.transformer import sinusoidal_table
from transformer.search import SearchConfig, greedy_search
from transformer.translate import Translator

transformers = dev_dependency("transformers")

TOLERANCE = 1e-5
# Two shapes of model: everything shared and tied, with the options Marian models use (swish, an output
# bias); and separate source / target embeddings with an untied output projection.
VARIANTS = {
    "shared-swish-bias": {
        "share_embeddings": True,
        "tie_output": True,
        "activation": "swish",
        "output_bias": True,
    },
    "separate-relu": {
        "share_embeddings": False,
        "tie_output": False,
        "activation": "relu",
        "output_bias": False,
    },
    "shared-untied": {  # one embedding, a separate output projection
        "share_embeddings": True,
        "tie_output": False,
        "activation": "relu",
        "output_bias": False,
    },
}


def random_run(run_dir: Path, out: Path, **changes) -> Transformer:
    """A run directory with the trained run's tokenizer and a random TINY model of its vocabulary size."""
    vocab = json.loads((run_dir / "config.json").read_text())["model"]["src_vocab_size"]
    config = dataclasses.replace(TINY, src_vocab_size=vocab, tgt_vocab_size=vocab, **changes)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases and LayerNorms away from their 0 / 1 initial values
            parameter.add_(0.1 * torch.randn_like(parameter))
    out.mkdir()
    shutil.copy(run_dir / "tokenizer.model", out / "tokenizer.model")
    run_config = {"model": config_to_dict(config), "train": config_to_dict(TrainConfig())}
    (out / "config.json").write_text(json.dumps(run_config))
    save_checkpoint(out, "best", model)
    return model


def ids(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded source batch and a target batch starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (3, 9), generator=g)
    src[1, 6:] = PAD_ID
    src[2, 3:] = PAD_ID
    tgt = torch.randint(4, vocab, (3, 7), generator=g)
    tgt[:, 0] = BOS_ID
    return src, tgt


def hf_logits(hf, src: torch.Tensor, tgt: torch.Tensor, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=(src != pad_id).long(), decoder_input_ids=tgt).logits


def to_marian(src: torch.Tensor, tgt: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our source and target ids as the exported model's ids, the target starting from pad (the last id)."""
    ids_ = torch.argsort(marian_vocab_order(vocab))  # our id -> exported id
    tgt = ids_[tgt]
    tgt[:, 0] = vocab - 1
    return ids_[src], tgt


def in_our_order(logits: torch.Tensor) -> torch.Tensor:
    """The exported model's logits rearranged to our token ids."""
    return logits[..., torch.argsort(marian_vocab_order(logits.size(-1)))]


def assert_same_logits(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    """Same logits on every token but pad and BOS, which no search generates (-inf in the export)."""
    theirs = in_our_order(theirs)
    never = torch.tensor([PAD_ID, BOS_ID])
    assert torch.isneginf(theirs[..., never]).all()
    kept = torch.ones(theirs.size(-1), dtype=torch.bool).index_fill_(0, never, False)
    error = (theirs[..., kept] - ours[..., kept]).abs().max().item()
    assert error < TOLERANCE, error


def test_our_positions_permuted_are_marians() -> None:
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    theirs = MarianSinusoidalPositionalEmbedding(100, 32).create_weight()
    ours = sinusoidal_table(100, 32)[:, marian_permutation(32)]
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(sinusoidal_table(100, 32), theirs, atol=1e-2), "the layouts must differ"


def test_vocabulary_order_is_opus_mts() -> None:
    order = marian_vocab_order(10).tolist()
    assert order == [EOS_ID, UNK_ID, BOS_ID, 4, 5, 6, 7, 8, 9, PAD_ID]
    assert [order[i] for i in (MARIAN_EOS_ID, MARIAN_UNK_ID, MARIAN_BOS_ID)] == [EOS_ID, UNK_ID, BOS_ID]


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_gives_transformers_the_same_logits(run_dir: Path, tmp_path: Path, variant: str) -> None:
    model = random_run(run_dir, tmp_path / "run", **VARIANTS[variant])
    out = export_marian(tmp_path / "run", tmp_path / "marian")
    hf, info = transformers.MarianMTModel.from_pretrained(out, output_loading_info=True)
    # Nothing missing: the position tables are read from the file, the decoder's with BOS in row 0.
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    vocab = model.config.src_vocab_size
    assert hf.config.decoder_start_token_id == hf.config.pad_token_id == vocab - 1
    assert not hf.get_decoder().embed_tokens.weight[vocab - 1].any()  # starts from a zero embedding
    src, tgt = ids(vocab)
    with torch.no_grad():
        ours = model(src, tgt)
    src_m, tgt_m = to_marian(src, tgt, vocab)
    assert_same_logits(hf_logits(hf.eval(), src_m, tgt_m, vocab - 1), ours)
    # Back again: importing the export gives our model's logits, in the exported ids.
    with torch.no_grad():
        assert_same_logits(load_marian(out)(src_m, tgt_m), ours)


def test_exported_tokenizer_and_greedy_search_match_ours(run_dir: Path, tmp_path: Path) -> None:
    out = export_marian(run_dir, tmp_path / "marian")
    translator = Translator.from_checkpoint(run_dir)
    vocab = translator.tokenizer.vocab_size
    order = marian_vocab_order(vocab)
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    sentences = ["Ein Mann fährt Fahrrad.", "Zwei Hunde  spielen im Schnee!", "  Kinder, (3) am Strand."]
    for sentence in sentences:
        exported = hf_tokenizer(sentence)["input_ids"]
        assert order[exported].tolist() == [*translator.tokenizer.encode(sentence), EOS_ID]
    hf = transformers.MarianMTModel.from_pretrained(out).eval()
    batch = hf_tokenizer(sentences, return_tensors="pt", padding=True)
    generated = hf.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=20)
    src = order[batch["input_ids"]]  # our ids; the padding is our pad
    ours = greedy_search(
        translator.model,
        src,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        config=SearchConfig(beam=1),
        max_len=21,
    )
    theirs = [[t for t in order[row[1:]].tolist() if t not in (EOS_ID, PAD_ID)] for row in generated]
    assert theirs == ours
    assert generated[:, 0].tolist() == [vocab - 1] * len(sentences)  # decoding starts from pad


@pytest.mark.parametrize("shared", [True, False])
def test_import_gives_marians_logits(tmp_path: Path, shared: bool) -> None:
    # A Marian model as opus-mt ships them: swish, the pad id last, the decoder starting from pad, an
    # output bias; random weights. Unshared, the source vocabulary is the larger one.
    pad = 29
    config = transformers.MarianConfig(
        vocab_size=pad + 1 if shared else 40,
        decoder_vocab_size=pad + 1,
        share_encoder_decoder_embeddings=shared,
        tie_word_embeddings=shared,
        d_model=16,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        activation_function="swish",
        scale_embedding=True,
        max_position_embeddings=64,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
    )
    torch.manual_seed(2)
    hf = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            if parameter.requires_grad:  # not the frozen position table, which Marian never saves
                parameter.add_(0.1 * torch.randn_like(parameter))
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path / "marian")
    model = load_marian(tmp_path / "marian")
    assert model.config.pad_id == pad and model.config.output_bias and model.config.activation == "swish"
    g = torch.Generator().manual_seed(3)
    src = torch.randint(0, pad, (2, 8), generator=g)
    src[1, 5:] = pad
    tgt = torch.randint(0, pad, (2, 6), generator=g)
    tgt[:, 0] = pad
    with torch.no_grad():
        error = (model(src, tgt) - hf_logits(hf, src, tgt, pad)).abs().max().item()
    assert error < TOLERANCE, error


def test_export_refuses_what_marian_cannot_express(run_dir: Path, tmp_path: Path) -> None:
    random_run(run_dir, tmp_path / "pre-ln", norm_first=True)
    with pytest.raises(TransformerError, match="norm_first"):
        export_marian(tmp_path / "pre-ln", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(TransformerError, match="not an empty directory"):
        export_marian(run_dir, tmp_path / "taken")


def test_import_refuses_positions_it_cannot_compute(run_dir: Path, tmp_path: Path) -> None:
    # Only the decoder's row 0 may depart from the sinusoids (it carries the start token's input).
    out = export_marian(run_dir, tmp_path / "marian")
    weights = load_file(out / "model.safetensors")
    weights["model.decoder.embed_positions.weight"][3] += 0.01
    save_file(weights, out / "model.safetensors")
    with pytest.raises(TransformerError, match="decoder's position table"):
        load_marian(out)


def test_export_cli(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(run_dir), "--format", "marian", "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert files >= {"config.json", "model.safetensors", "source.spm", "target.spm", "vocab.json"}
    mode = {(out / name).stat().st_mode for name in ("config.json", "model.safetensors")}
    assert len(mode) == 1, "the weights are as readable as the config (safetensors makes them 0600)"
    assert main(["export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)]) != 0
    assert "onnx" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """CTranslate2 sets the OpenMP thread count, which torch shares: give torch its count back, so that
    later tests (which compare runs bit for bit across processes) see the thread count they started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def ct2_translator(hf_dir: Path, out: Path):
    """The exported directory through CTranslate2's own converter, loaded for CPU."""
    ctranslate2 = dev_dependency("ctranslate2")
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out))
    return ctranslate2.Translator(str(out), device="cpu", intra_threads=1)


@pytest.mark.parametrize("trained", [True, False])
def test_ctranslate2_translates_like_greedy_search(run_dir: Path, tmp_path: Path, trained: bool) -> None:
    # The trained tiny model repeats a token; the random untied one wanders over the vocabulary.
    if trained:
        checkpoint = run_dir
    else:
        checkpoint = tmp_path / "run"
        model = random_run(run_dir, checkpoint, **{**VARIANTS["separate-relu"], "output_bias": True})
        with torch.no_grad():
            model.out_proj.bias[PAD_ID] = -1e4  # as training leaves it: pad is never predicted
        save_checkpoint(checkpoint, "best", model)
    ct2 = ct2_translator(export_marian(checkpoint, tmp_path / "marian"), tmp_path / "ct2")
    translator = Translator.from_checkpoint(checkpoint)
    tokenizer = translator.tokenizer
    search = SearchConfig(beam=1, extra_len=8)
    sentences = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Kinder am Strand."]
    for sentence in sentences:
        src = torch.tensor([[*tokenizer.encode(sentence), EOS_ID]])
        (ours,) = greedy_search(
            translator.model, src, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, config=search, max_len=64
        )
        pieces = [tokenizer.piece(i) for i in src[0].tolist()]
        # Our search forces EOS at src length + extra_len, so at most one token fewer comes before it.
        (result,) = ct2.translate_batch(
            [pieces], beam_size=1, max_decoding_length=len(pieces) + search.extra_len - 1
        )
        assert result.hypotheses[0] == [tokenizer.piece(i) for i in ours], sentence


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctranslate2_scores_tokens_like_our_model(run_dir: Path, tmp_path: Path, variant: str) -> None:
    # Every variant's token log-probabilities, teacher-forced: the full distribution, not just the argmax.
    model = random_run(run_dir, tmp_path / "run", **VARIANTS[variant])
    ct2 = ct2_translator(export_marian(tmp_path / "run", tmp_path / "marian"), tmp_path / "ct2")
    tokenizer = Translator.from_checkpoint(tmp_path / "run").tokenizer
    src, tgt = ids(model.config.src_vocab_size)
    with torch.no_grad():
        logits = model(src, tgt)
    logits[..., [PAD_ID, BOS_ID]] = float("-inf")  # the export never generates pad or BOS
    targets = torch.cat([tgt[:, 1:], torch.full((tgt.size(0), 1), EOS_ID)], 1)
    ours = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (batch, tgt_len)

    def pieces(rows: torch.Tensor) -> list[list[str]]:
        return [[tokenizer.piece(i) for i in row if i != PAD_ID] for row in rows.tolist()]

    results = ct2.score_batch(pieces(src), pieces(tgt[:, 1:]))
    theirs = torch.tensor([r.log_probs for r in results])  # (batch, tgt_len): EOS's log-probability last
    error = (theirs - ours).abs().max().item()
    assert error < TOLERANCE, error


def test_without_protobuf_export_is_one_error_line_before_the_model_loads(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import sentencepiece

    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)  # import fails,
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)  # if imported before too
    monkeypatch.setattr(Translator, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "marian")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: export needs protobuf to rewrite the tokenizer")
