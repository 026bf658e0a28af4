"""Ensembles: the average of the members' probabilities, computed independently, through every search."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY

from transformer import Transformer
from transformer.cli import main
from transformer.config import RNNConfig
from transformer.data.tokenizer import Tokenizer
from transformer.model import RNNSeq2Seq
from transformer.model.ensemble import Ensemble
from transformer.search import SearchConfig, beam_search_n_best, greedy_search
from transformer.translate import Translator

PAD, BOS, EOS = 0, 2, 3
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
VOCAB = 40


def members() -> list[torch.nn.Module]:
    """Two Transformers of different sizes and an RNN with attention: one vocabulary, three families of
    memory, mask and cache."""
    torch.manual_seed(0)
    small = dataclasses.replace(
        TINY, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_len=128, output_bias=True
    )
    wider = dataclasses.replace(small, d_model=48, n_heads=4, d_ff=96, max_len=64)
    rnn = RNNConfig(
        kind="rnn-attention",
        emb_dim=16,
        hidden_size=24,
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        dropout=0.0,
    )
    models = [Transformer(small).eval(), Transformer(wider).eval(), RNNSeq2Seq(rnn).eval()]
    with torch.no_grad():  # EOS likely enough that hypotheses end at different lengths; never padding,
        for model in models[:2]:  # which trained models do not predict and hypotheses leave out
            model.out_proj.bias[EOS] += 1.0
            model.out_proj.bias[PAD] = float("-inf")
    return models


def sources() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (5, 8), generator=g)
    src[1, 4:] = PAD
    src[:, -1] = torch.where(src[:, -1] == PAD, PAD, EOS)
    return src


def test_the_ensemble_averages_its_members_probabilities() -> None:
    models = members()
    ensemble = Ensemble(models)
    src, tgt = sources(), torch.randint(4, VOCAB, (5, 6))
    with torch.no_grad():
        memory, mask = ensemble.encode(src)
        log_probs = ensemble.decode(tgt, memory, mask)  # (5, 6, VOCAB)
        probs = [model(src, tgt).double().softmax(-1) for model in models]
    expected = torch.stack(probs).mean(0).log()
    torch.testing.assert_close(log_probs.double(), expected, atol=1e-5, rtol=0)
    assert ensemble.config.max_len == 64  # the longest every member takes


def test_an_ensemble_of_one_decodes_as_its_member() -> None:
    model = members()[0]
    for beam in (1, 3):
        config = SearchConfig(beam=beam, extra_len=6)
        alone = beam_search_n_best(model, sources(), config=config, max_len=128, **IDS)
        ensembled = beam_search_n_best(Ensemble([model]), sources(), config=config, max_len=128, **IDS)
        assert [[h.tokens for h in hyps] for hyps in ensembled] == [
            [h.tokens for h in hyps] for hyps in alone
        ]
        for a, b in zip(ensembled, alone, strict=True):
            assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_ensemble_search_with_cache_and_dropping_equals_full_recomputation(beam: int) -> None:
    """The members' caches (KV caches and a recurrent state) are reordered and cut together: the cached
    search that drops finished sentences finds what recomputing every prefix finds."""
    ensemble = Ensemble(members())
    config = SearchConfig(beam=beam, extra_len=10)
    cached = beam_search_n_best(ensemble, sources(), config=config, max_len=64, **IDS)
    full = dataclasses.replace(config, use_cache=False, drop_finished=False)
    recomputed = beam_search_n_best(ensemble, sources(), config=full, max_len=64, **IDS)
    assert [[h.tokens for h in hyps] for hyps in cached] == [[h.tokens for h in hyps] for hyps in recomputed]
    assert len({len(hyps[0].tokens) for hyps in cached}) > 1, "the test needs hypotheses of different lengths"
    if beam == 1:
        greedy = greedy_search(ensemble, sources(), config=config, max_len=64, **IDS)
        assert greedy == [hyps[0].tokens for hyps in cached]
    # each hypothesis's log-probability is the ensemble's, teacher-forced
    for row, hyps in enumerate(cached):
        tgt = torch.tensor([[BOS, *hyps[0].tokens, EOS]])
        with torch.no_grad():
            memory, mask = ensemble.encode(sources()[row : row + 1])
            log_probs = ensemble.decode(tgt[:, :-1], memory, mask)[0]
        log_probs[:, [PAD, BOS]] = -math.inf  # the search's own tokens, which no translation holds
        log_probs = log_probs.log_softmax(-1)  # renormalised over the others
        forced = len(hyps[0].tokens) + 1 >= int((sources()[row] != PAD).sum()) + config.extra_len
        terms = log_probs.gather(1, tgt[0, 1:, None])[:, 0]
        assert hyps[0].log_prob == pytest.approx(float(terms[:-1].sum() if forced else terms.sum()), abs=1e-4)


def test_members_must_share_the_target_vocabulary() -> None:
    other = Transformer(dataclasses.replace(TINY, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="share one target vocabulary"):
        Ensemble([members()[0], other])


def test_translate_and_evaluate_take_several_checkpoints(run_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.de"
    source.write_text("Ein Mann fährt Fahrrad.\n\nZwei Hunde spielen im Schnee.\n")
    twice = ["translate", "--checkpoint", str(run_dir), str(run_dir), "--input", str(source), "--beam", "2"]
    assert main(twice) == 0
    ensembled = capsys.readouterr().out
    assert main(["translate", "--checkpoint", str(run_dir), "--input", str(source), "--beam", "2"]) == 0
    assert ensembled == capsys.readouterr().out  # a model with itself: the same probabilities
    assert isinstance(Translator.from_checkpoints([run_dir, run_dir]).model, Ensemble)

    assert main(["evaluate", "--checkpoint", str(run_dir), str(run_dir), "--beam", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{run_dir} + {run_dir} (best), test2016, greedy:")

    # a run with another tokenizer (its own, as config.json records): refused in one line
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    texts = [line for line in source.read_text().splitlines() if line] * 50
    tokenizer = Tokenizer.train(texts, other / "tokenizer.model", 300)
    record = json.loads((other / "config.json").read_text())
    record["tokenizer_sha256"] = tokenizer.sha256()
    (other / "config.json").write_text(json.dumps(record))
    assert main(["translate", "--checkpoint", str(run_dir), str(other), "--input", str(source)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {other} has another tokenizer than {run_dir}: an ensemble needs one"

    # a run of the same tokenizer and the reverse direction: refused, naming both pairs
    reverse = tmp_path / "reverse"
    shutil.copytree(run_dir, reverse)
    record = json.loads((reverse / "config.json").read_text())
    record["train"]["src_lang"], record["train"]["tgt_lang"] = "en", "de"
    (reverse / "config.json").write_text(json.dumps(record))
    assert main(["translate", "--checkpoint", str(run_dir), str(reverse), "--input", str(source)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {reverse} translates en→de, {run_dir} de→en: an ensemble needs one language pair"
