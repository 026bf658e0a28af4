"""score() must report exactly what sacreBLEU reports, with signatures that make the numbers reproducible."""

from __future__ import annotations

import pytest
import sacrebleu

from transformer.errors import TransformerError
from transformer.evaluate import Scores, score

REFERENCES = ["The cat sat on the mat .", "A man is riding a red bicycle down the street ."]


def test_identical_text_scores_100() -> None:
    result = score(REFERENCES, REFERENCES)
    assert result.bleu == pytest.approx(100.0)
    assert result.bleu_lc == pytest.approx(100.0)
    assert result.chrf == pytest.approx(100.0)
    assert result.n_sentences == 2


def test_matches_sacrebleu_directly() -> None:
    hypotheses = ["The cat sat on a mat .", "A man rides a bike down the road ."]
    result = score(hypotheses, REFERENCES)
    assert result.bleu == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [REFERENCES]).score)
    assert result.chrf == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [REFERENCES]).score)
    assert 0 < result.bleu < 100


def test_hand_checked_bleu() -> None:
    # Hypothesis "the cat sat on the mat" vs reference "the cat sat on a mat": 13a tokens are the words.
    # Precisions 5/6, 3/5, 2/4, 1/3 (n=1..4), equal lengths so BP = 1; BLEU = geometric mean.
    result = score(["the cat sat on the mat"], ["the cat sat on a mat"])
    expected = 100 * ((5 / 6) * (3 / 5) * (2 / 4) * (1 / 3)) ** 0.25
    assert result.bleu == pytest.approx(expected, abs=1e-9)


def test_lowercased_bleu_ignores_case() -> None:
    hypotheses = ["the CAT sat on the mat .", "a man is RIDING a red bicycle down the street ."]
    result = score(hypotheses, REFERENCES)
    assert result.bleu_lc > result.bleu
    assert result.bleu_lc == pytest.approx(100.0)


def test_signatures_and_summary() -> None:
    result = score(REFERENCES, REFERENCES)
    assert "case:lc" in result.bleu_lc_signature
    assert "case:mixed" in result.bleu_signature and "tok:13a" in result.bleu_signature
    assert "nrefs:1" in result.chrf_signature
    lines = str(result).splitlines()
    assert len(lines) == 3
    assert result.bleu_signature in lines[0] and result.chrf_signature in lines[2]
    assert Scores(**result.to_dict()) == result


def test_length_mismatch_is_a_user_error() -> None:
    with pytest.raises(TransformerError, match="3 hypotheses against 2 references"):
        score(["a", "b", "c"], REFERENCES)
    with pytest.raises(TransformerError, match="nothing to score"):
        score([], [])
