"""Batches sized by a token budget (fairseq's max_tokens) and their padded tensors.

Grouping sentences of similar length keeps padding low, and a token budget instead of a fixed number of
sentences keeps the memory of every batch about the same, short sentences or long.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import overload

import numpy as np
import torch

from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError

BATCH_ORDER = 2
"""How `token_batches` shuffles. A run saves the version it drew an epoch's batches with (`train.Progress`),
so that a resume mid-epoch takes the batches it would have taken:
1. Python's `random.sample` (runs from before 2026-12-05): at WMT14 en-fr's 36M pairs an epoch's batches
   took 58 s and 1.7 GB above the lengths, every epoch, in every process;
2. numpy's `RandomState.permutation`, seeded from the same (seed, epoch) stream: 4.2-5.5 s and
   0.56 GB there."""


def token_batches(
    src_lens: Sequence[int] | np.ndarray,
    tgt_lens: Sequence[int] | np.ndarray,
    max_tokens: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    order: int = BATCH_ORDER,
) -> TokenBatches:
    """Split example indices into batches of similar length whose padded size fits `max_tokens`.

    Lengths are token counts without BOS/EOS. A batch of n examples costs n * (longest side + 1), the +1
    for the EOS (source, target output) or BOS (target input) that `collate` adds. The examples are sorted
    by that width and cut greedily: a batch takes the next example unless, with it, it would exceed the
    budget; an example over the budget on its own gets a batch of its own. With `shuffle`, equal widths
    are ordered randomly and the batches come in random order, the same for the same (seed, epoch) and
    different across epochs; `order` is the version of that shuffle (`BATCH_ORDER`).
    """
    src, tgt = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source lengths but {len(tgt)} target lengths")
    if max_tokens < 1:
        raise TransformerError(f"max_tokens must be at least 1, got {max_tokens}")
    width = _narrowed(np.maximum(src, tgt) + 1)
    n = len(width)
    if shuffle:
        examples, batch_permutation = _shuffles(n, seed, epoch, order)
    else:
        examples, batch_permutation = np.arange(n), np.arange
    examples = examples.astype(np.int32 if n < 2**31 else np.int64)  # 4 bytes an example, kept all epoch
    examples = examples[np.argsort(width[examples], kind="stable")]  # stable: ties keep the shuffled order
    starts = _batch_starts(width[examples], max_tokens)
    return TokenBatches(examples, np.append(starts, n), batch_permutation(len(starts)))


def _shuffles(n: int, seed: int, epoch: int, order: int) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    """A random order of n examples, and what gives a random order of the batches, for shuffle `order`."""
    # A string seed is hashed with SHA-512: stable across runs and distinct for every (seed, epoch).
    rng = random.Random(f"{seed}:{epoch}")
    if order == 1:

        def batch_permutation(count: int) -> np.ndarray:
            batches = list(range(count))
            rng.shuffle(batches)
            return np.array(batches, dtype=np.int64)

        return np.array(rng.sample(range(n), n), dtype=np.int64), batch_permutation
    if order != BATCH_ORDER:
        raise TransformerError(
            f"batch order {order} is unknown to this version (it knows 1 and {BATCH_ORDER})"
        )
    # numpy's legacy RandomState, whose streams numpy keeps frozen (NEP 19): a Generator's methods may
    # change between versions, and processes that drew other batches would train on other data.
    state = np.random.RandomState([rng.getrandbits(32) for _ in range(4)])
    return state.permutation(n), state.permutation


def _narrowed(width: np.ndarray) -> np.ndarray:
    """`width` as 16-bit integers where they fit (every real sentence's): a quarter of the memory, and
    numpy's stable sort of them is a radix sort, in a third of the time."""
    return width.astype(np.uint16) if len(width) and width.max() < 2**16 else width


def _batch_starts(width: np.ndarray, max_tokens: int) -> np.ndarray:
    """Where each batch begins among examples sorted by `width`: the greedy cut, made a run of equal widths
    at a time (a batch of width w holds max_tokens // w examples, at least one) rather than an example at
    a time, which took 2.9 s of the 7.7 s of 4.5M pairs' batches."""
    if len(width) == 0:
        return np.empty(0, dtype=np.int64)
    run_starts = np.flatnonzero(np.diff(width, prepend=width[0] - 1))  # sorted: where each value begins
    values = width[run_starts]
    run_ends = [*run_starts[1:].tolist(), len(width)]
    starts = [0]
    size = 0  # examples in the open batch
    for value, begin, end in zip(values.tolist(), run_starts.tolist(), run_ends, strict=True):
        room = max(max_tokens // value, 1)  # the most examples a batch this wide may hold
        if size >= room:  # the open batch cannot take one of these: a new one begins
            starts.append(begin)
            size = 0
        taken = min(room - size, end - begin)
        size += taken
        if begin + taken < end:  # full batches of `room`, then an open one to go on in the next run
            new = range(begin + taken, end, room)
            starts.extend(new)
            size = end - new[-1]
    return np.array(starts, dtype=np.int64)


class TokenBatches(Sequence[list[int]]):
    """Token-budget batches: example indices sorted by width in one array, cut at `bounds`, batch `k`
    being cut `batch_order[k]`. Each batch is a list of ints when taken; the whole takes 4 bytes an
    example, where a list of lists of ints took ~36 (1.3 GB a process at WMT14 en-fr's 36M pairs)."""

    def __init__(self, indices: np.ndarray, bounds: np.ndarray, batch_order: np.ndarray) -> None:
        self._indices, self._bounds, self._order = indices, bounds, batch_order

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, k: int) -> list[int]: ...
    @overload
    def __getitem__(self, k: slice) -> list[list[int]]: ...
    def __getitem__(self, k: int | slice) -> list[int] | list[list[int]]:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        cut = int(self._order[k])
        return self._indices[self._bounds[cut] : self._bounds[cut + 1]].tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal by contents, as lists are


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
