"""An ensemble of trained models decoded as one: at every step, the average of their next-token
probabilities (fairseq's and OpenNMT's ensembles).

Each member keeps its own memory, mask and cache, so members of different families (a Transformer and
an RNN baseline) or sizes can be combined, as long as they share one vocabulary. The ensemble is a
`Decodable` (transformer.search) like its members: the searches need no change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn


class Ensemble(nn.Module):
    """Members that share a target vocabulary, decoded together: log((1/N)·Σ_i p_i(y | prefix, source)).

    `decode(..., project=False)` returns the members' decoder features side by side, (rows, len, Σ width),
    so that the search can pick the rows it scores (`search._rows_to_score`) before `out_proj` maps each
    member's part to its log-probabilities and averages their probabilities.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        vocab = {m.config.tgt_vocab_size for m in members}
        if len(vocab) != 1:
            raise ValueError(
                f"an ensemble's models must share one target vocabulary, not sizes {sorted(vocab)}"
            )
        self.members = nn.ModuleList(members)
        # the longest sequence every member can take; pad_id, vocabulary sizes: the members' own
        self.config = dataclasses.replace(members[0].config, max_len=min(m.config.max_len for m in members))
        self._widths: list[int] = []  # each member's feature width, as `decode` last gave them

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members)

    def encode(self, src: Tensor) -> tuple[tuple[Any, ...], Tensor]:
        """Each member's (memory, mask), sources first; the first member's mask stands for them all."""
        encoded = tuple(m.encode(src) for m in self.members)
        return encoded, encoded[0][1]

    def beam_memory(
        self, memory: tuple[Any, ...], src_mask: Tensor, k: int
    ) -> tuple[tuple[Any, ...], Tensor]:
        widened = tuple(
            m.beam_memory(mem, mask, k) for m, (mem, mask) in zip(self.members, memory, strict=True)
        )
        return widened, widened[0][1]

    def decode(
        self,
        tgt: Tensor,
        memory: tuple[Any, ...],
        src_mask: Tensor,
        cache: EnsembleCache | None = None,
        *,
        project: bool = True,
    ) -> Tensor:
        """Log-probabilities (rows, tgt_len, vocab) averaged over the members in probability; with
        `project=False`, the members' features side by side, for `out_proj`."""
        caches = cache.members if cache is not None else [None] * len(self.members)
        features = [
            m.decode(tgt, mem, mask, member_cache, project=False)
            for m, (mem, mask), member_cache in zip(self.members, memory, caches, strict=True)
        ]
        self._widths = [f.size(-1) for f in features]
        joined = torch.cat(features, dim=-1)
        return self.out_proj(joined) if project else joined

    def out_proj(self, features: Tensor) -> Tensor:
        """Each member's logits from its part of `features`, to log-probabilities in fp32, then
        log of their mean probability (log-sum-exp, so that no probability underflows)."""
        parts = features.split(self._widths, dim=-1)
        log_probs = [
            torch.log_softmax(m.out_proj(f).float(), dim=-1) for m, f in zip(self.members, parts, strict=True)
        ]
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))

    def new_cache(self, max_len: int | None = None) -> EnsembleCache:
        return EnsembleCache([m.new_cache(max_len) for m in self.members])


@dataclasses.dataclass
class EnsembleCache:
    """The members' decoding caches, reordered together."""

    members: list[Any]

    def reorder(self, index: Tensor, sources: Tensor | None = None) -> None:
        for cache in self.members:
            cache.reorder(index, sources)
