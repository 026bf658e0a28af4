"""`transformer doctor` passes a sound checkpoint and catches a model that breaks its promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

from transformer import translate as translate_module
from transformer.cli import main
from transformer.data.tokenizer import Tokenizer
from transformer.doctor import run_checks
from transformer.model import attention as attention_module
from transformer.model import transformer as transformer_module
from transformer.train import train
from transformer.translate import Translator, ready_for_decoding


def test_a_trained_checkpoint_passes(run_dir: Path, capsys) -> None:
    assert main(["doctor", "--checkpoint", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "FAIL" not in table and table.count("pass") == 9


def test_a_decoder_that_sees_the_future_fails(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(transformer_module, "causal_masking", lambda *args, **kwargs: (None, False))
    failed = {c.name for c in run_checks(run_dir) if c.status == "FAIL"}
    assert {"decoder cannot see future tokens", "cached == full decoding"} <= failed
    assert main(["doctor", "--checkpoint", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {len(failed)} check(s) failed")


def test_each_broken_promise_fails_its_own_check(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three more ways to break a model, each caught by the check written for it: attention that reads
    padding, softmax over a source with no real token (0/0), and a tokenizer that loses text."""

    def failed_checks() -> set[str]:
        return {c.name for c in run_checks(run_dir) if c.status == "FAIL"}

    with monkeypatch.context() as m:
        m.setattr(
            transformer_module,
            "padding_mask",
            lambda ids, pad_id: torch.ones_like(ids, dtype=torch.bool)[:, None, None, :],
        )
        assert "padding does not change outputs" in failed_checks()

    def naive(q, k, v, mask=None, dropout_p=0.0, is_causal=False):  # no care for a row with no key
        if is_causal:
            mask = attention_module._with_causal(mask, q.size(-2), k.size(-2), q.device)
        scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1) @ v

    with monkeypatch.context() as m:
        m.setattr(attention_module, "fused_attention", naive)
        assert "no NaN on fully padded input" in failed_checks()

    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "decode_batch", lambda self, ids: ["" for _ in ids])
        assert failed_checks() == {"tokenizer round-trips the validation set"}

    def scrambled(model, device="cpu", dtype=torch.float32, **kwargs):  # a bf16 cast that mixes up rows
        if dtype == torch.bfloat16:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter[torch.randperm(parameter.size(0))])
        return ready_for_decoding(model, device, dtype, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(translate_module, "ready_for_decoding", scrambled)
        assert failed_checks() == {"bf16 weights agree with fp32"}


def test_an_attention_lstm_passes(data_dir: Path, tmp_path: Path) -> None:
    """The recurrent model whose checks failed: NaN from attention over a fully padded source (with either
    scoring; dot here), and an LSTM that crashed under bf16 autocast on a CPU without native bf16."""
    recipe = tiny_recipe(data_dir, model="rnn-attention", max_steps=6, eval_every=3, test_split="")
    train(recipe, {"cell": "lstm", "attention": "dot", "emb_dim": 32, "hidden_size": 32}, tmp_path)
    checks = {c.name: c.status for c in run_checks(tmp_path)}
    assert checks.pop("fused == explicit attention") == "skip"  # not a Transformer
    assert checks["no NaN on fully padded input"] == "pass" and "bf16 agrees with fp32" in checks
    assert set(checks.values()) == {"pass"}


def test_a_model_too_short_for_every_validation_pair_is_one_error_line(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The sample is the first pairs the model can take whole; none at all is said in one line, not a
    traceback from collating nothing."""
    monkeypatch.setattr(Translator, "max_source_len", property(lambda self: 1))
    assert main(["doctor", "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: doctor needs validation pairs the model can take: none of the 20 in 'val'")
