"""Corpus-level translation scores computed with sacreBLEU.

Scores come with sacreBLEU's signatures because a bare BLEU number is not comparable across papers: the
tokenizer, casing and smoothing change it by whole points, and the signature records all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF

from transformer.errors import TransformerError


@dataclass(frozen=True)
class Scores:
    """BLEU (cased and lowercased) and chrF of one corpus, with the signatures needed to reproduce them."""

    bleu: float
    bleu_lc: float
    chrf: float
    bleu_signature: str
    bleu_lc_signature: str
    chrf_signature: str
    n_sentences: int

    def to_dict(self) -> dict[str, float | str | int]:
        """A plain dict, e.g. for a JSON metrics file."""
        return asdict(self)

    def format(self) -> str:
        """Three readable lines, one per metric, each with its signature."""
        return (
            f"BLEU    {self.bleu:6.2f}  {self.bleu_signature}  ({self.n_sentences} sentences)\n"
            f"BLEU lc {self.bleu_lc:6.2f}  {self.bleu_lc_signature}\n"
            f"chrF    {self.chrf:6.2f}  {self.chrf_signature}"
        )

    def __str__(self) -> str:
        return self.format()


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Score detokenized hypotheses against one reference each, as sacreBLEU does on raw text.

    Both inputs must be plain (detokenized) text: sacreBLEU applies its own tokenizer (13a), which is what
    makes the numbers comparable with published ones.
    """
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise TransformerError(
            f"cannot score {len(hypotheses)} hypotheses against {len(references)} references: the two must "
            f"have one line per sentence, in the same order"
        )
    if not hypotheses:
        raise TransformerError("nothing to score: the hypotheses and references are empty")
    metrics = {"bleu": BLEU(), "bleu_lc": BLEU(lowercase=True), "chrf": CHRF()}
    # A signature is only known after scoring (it records the number of references), so score first.
    values = {name: metric.corpus_score(hypotheses, [references]).score for name, metric in metrics.items()}
    signatures = {f"{name}_signature": str(metric.get_signature()) for name, metric in metrics.items()}
    return Scores(**values, **signatures, n_sentences=len(hypotheses))
