"""Batches sized by a token budget (fairseq's max_tokens) and their padded tensors.

Grouping sentences of similar length keeps padding low, and a token budget instead of a fixed number of
sentences keeps the memory of every batch about the same, short sentences or long.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError


def token_batches(
    src_lens: Sequence[int],
    tgt_lens: Sequence[int],
    max_tokens: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Split example indices into batches of similar length whose padded size fits `max_tokens`.

    Lengths are token counts without BOS/EOS. A batch of n examples costs n * (longest side + 1), the +1
    for the EOS (source, target output) or BOS (target input) that `collate` adds. An example over the
    budget on its own gets a batch of its own. With `shuffle`, equal lengths are ordered randomly and the
    batches come in random order, the same for the same (seed, epoch) and different across epochs.
    """
    if len(src_lens) != len(tgt_lens):
        raise ValueError(f"{len(src_lens)} source lengths but {len(tgt_lens)} target lengths")
    if max_tokens < 1:
        raise TransformerError(f"max_tokens must be at least 1, got {max_tokens}")
    width = [max(s, t) + 1 for s, t in zip(src_lens, tgt_lens, strict=True)]
    # A string seed is hashed with SHA-512: stable across runs and distinct for every (seed, epoch).
    rng = random.Random(f"{seed}:{epoch}")
    order = rng.sample(range(len(width)), len(width)) if shuffle else range(len(width))
    order = sorted(order, key=width.__getitem__)  # stable: ties keep the (shuffled) order

    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        # Sorted ascending, so example i is the widest of the batch so far.
        if batch and (len(batch) + 1) * width[i] > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class Batch:
    """Padded model inputs. Target input is [BOS] + tokens and target output tokens + [EOS] (teacher
    forcing); the source ends with EOS."""

    src: torch.Tensor  # (batch, src_len) long
    tgt_in: torch.Tensor  # (batch, tgt_len) long
    tgt_out: torch.Tensor  # (batch, tgt_len) long
    n_src_tokens: int  # non-pad positions of src
    n_tgt_tokens: int  # non-pad positions of tgt_out: what the loss is averaged over
    padding_fraction: float  # pad positions / all positions of src and tgt_out, to tune batching

    def __len__(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            src=self.src.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
        )


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)


def collate(
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
) -> Batch:
    """Turn (source ids, target ids) pairs without BOS/EOS into a right-padded `Batch`."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    src = _pad([[*src, eos_id] for src, _ in pairs], pad_id)
    tgt_in = _pad([[bos_id, *tgt] for _, tgt in pairs], pad_id)
    tgt_out = _pad([[*tgt, eos_id] for _, tgt in pairs], pad_id)
    n_src = sum(len(src) + 1 for src, _ in pairs)
    n_tgt = sum(len(tgt) + 1 for _, tgt in pairs)
    total = src.numel() + tgt_out.numel()
    return Batch(
        src=src,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        n_src_tokens=n_src,
        n_tgt_tokens=n_tgt,
        padding_fraction=(total - n_src - n_tgt) / total,
    )
