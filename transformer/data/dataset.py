"""Tokenised parallel text, held compactly enough for WMT-sized corpora.

A Python list of token ids costs about 36 bytes a token (an 8-byte pointer to a 28-byte int object):
WMT14 en-de's 4.5M pairs, some 270M tokens, would take ~10 GB in every training process, eight times over
under `torchrun --nproc_per_node=8`. `TokenSequences` keeps all sequences of a split in one flat array of
ids with their offsets, 2 bytes a token where the vocabulary fits 16 bits (4 past that), and hands out a
sentence as a list when it is asked for one; read from a run's kept ids, the arrays are a memory map that
the processes share.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain
from typing import overload

import numpy as np
from tqdm import tqdm

from transformer.data.batching import BATCH_ORDER, TokenBatches, token_batches
from transformer.data.corpus import filter_pairs
from transformer.data.tokenizer import Tokenizer

ENCODE_CHUNK = 100_000  # pairs tokenised at a time: bounds the transient lists of ids, not the result


def fits_16_bits(vocab_size: int) -> bool:
    """Whether a vocabulary's ids fit 16 bits (65,536 pieces or fewer): a corpus of them is then held and
    kept in half the memory, as fairseq's binarised data is."""
    return vocab_size <= 1 << 16


class TokenSequences(Sequence[list[int]]):
    """Token-id sequences in one flat array of ids: `seqs[i]` is sequence i as a list of ints. The ids are
    16-bit given a `vocab_size` that `fits_16_bits`, else 32-bit; arrays given to `from_arrays` hold
    either.

    Built with `extend`, the arrays are the process's own. `from_arrays` keeps the arrays it is given,
    and a memory map of a kept file (`transformer.rundir.load_training_ids`) stays one: the processes of
    a torchrun that map one file share its pages, where each would otherwise hold a copy."""

    def __init__(self, sequences: Iterable[Sequence[int]] = (), *, vocab_size: int | None = None) -> None:
        narrow = vocab_size is not None and fits_16_bits(vocab_size)
        self._ids: array | np.ndarray = array("H" if narrow else "i")  # every sequence's ids, in a row
        self._offsets: array | np.ndarray = array("q", [0])  # sequence i: _ids[_offsets[i] : _offsets[i + 1]]
        self.extend(sequences)

    def extend(self, sequences: Iterable[Sequence[int]]) -> None:
        if isinstance(self._ids, np.ndarray):
            raise TypeError("sequences held in given arrays (`from_arrays`) cannot be extended")
        sequences = list(sequences)
        self._ids.extend(chain.from_iterable(sequences))
        ends = accumulate((len(s) for s in sequences), initial=self._offsets[-1])
        next(ends)  # `initial` itself: the end of the sequences already held
        self._offsets.extend(ends)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> list[int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[list[int]]: ...
    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} of {len(self)}")
        index %= len(self)
        return self._ids[self._offsets[index] : self._offsets[index + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Every sequence's number of tokens, without building the sequences."""
        return np.diff(self._offsets)

    def length(self, index: int) -> int:
        """Sequence `index`'s number of tokens (0 <= index < len), without building it."""
        return int(self._offsets[index + 1] - self._offsets[index])

    @property
    def nbytes(self) -> int:
        """The memory the ids and offsets take."""
        return len(self._ids) * self._ids.itemsize + len(self._offsets) * self._offsets.itemsize

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, offsets) as numpy arrays over this object's memory, not copies: for saving."""
        return np.asarray(self._ids), np.asarray(self._offsets, dtype=np.int64)  # int32 or uint16 ids

    @classmethod
    def from_arrays(cls, ids: np.ndarray, offsets: np.ndarray) -> TokenSequences:
        """The sequences in `arrays()`'s layout, held in the arrays given (not copied, so a memory map
        stays one) and not extensible; refuses arrays of another type or offsets that do not cut `ids` up."""
        if ids.dtype not in (np.int32, np.uint16) or offsets.dtype != np.int64 or ids.ndim != 1:
            raise ValueError(
                f"ids and offsets must be 1-d int32 or uint16, and int64, not {ids.dtype}, {offsets.dtype}"
            )
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids):
            raise ValueError(f"offsets do not run from 0 to the {len(ids)} ids")
        if (np.diff(offsets) < 0).any():
            raise ValueError("offsets decrease")
        sequences = cls()
        # Plain ndarray views: slicing an np.memmap itself took twice as long per sentence.
        sequences._ids, sequences._offsets = np.asarray(ids), np.asarray(offsets)
        return sequences


@dataclasses.dataclass
class Corpus:
    """Tokenised pairs of one split, with the raw target text kept for BLEU (none for training splits)."""

    src: TokenSequences
    tgt: TokenSequences
    tgt_text: list[str]

    def __len__(self) -> int:
        return len(self.src)

    @classmethod
    def empty(cls, vocab_size: int) -> Corpus:
        """A corpus to extend with a tokenizer's ids: 16-bit where its vocabulary fits, half the memory."""
        return cls(TokenSequences(vocab_size=vocab_size), TokenSequences(vocab_size=vocab_size), [])

    def batches(
        self, max_tokens: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, order: int = BATCH_ORDER
    ) -> TokenBatches:
        """Pair indices in token-budget batches (transformer.data.batching.token_batches)."""
        lengths = self.src.lengths(), self.tgt.lengths()
        return token_batches(*lengths, max_tokens, shuffle=shuffle, seed=seed, epoch=epoch, order=order)


def encode_corpus(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    max_len: int | None,
    *,
    keep_text: bool = True,
    progress: bool = False,
) -> tuple[Corpus, dict[str, int]]:
    """Tokenise pairs, dropping empty ones and (with `max_len`) over-long ones; returns the counts too.

    The pairs are tokenised `ENCODE_CHUNK` at a time (`encode_stream`), so that only one chunk's ids are
    ever Python lists. `keep_text=False` keeps no reference text: training needs none. `progress` shows a
    bar when there is more than one chunk (4.5M pairs take about two minutes on two cores).
    """
    corpus, counts = Corpus.empty(tokenizer.vocab_size), new_counts()
    chunks = (pairs[start : start + ENCODE_CHUNK] for start in range(0, len(pairs), ENCODE_CHUNK))
    progress = progress and len(pairs) > ENCODE_CHUNK
    for chunk, keep, src, tgt in encode_stream(chunks, tokenizer, max_len, counts, progress, len(pairs)):
        corpus.src.extend(src)
        corpus.tgt.extend(tgt)
        if keep_text:
            corpus.tgt_text.extend(chunk[i][1] for i in keep)
    return corpus, counts


def new_counts() -> dict[str, int]:
    """The filter's counts, as `encode_stream` adds them up."""
    return {"pairs": 0, "kept": 0, "empty": 0, "too_long": 0}


def encode_stream(
    blocks: Iterable[Sequence[tuple[str, str]]],
    tokenizer: Tokenizer,
    max_len: int | None,
    counts: dict[str, int],
    progress: bool = False,
    total: int | None = None,
) -> Iterator[tuple[Sequence[tuple[str, str]], list[int], list[list[int]], list[list[int]]]]:
    """Each block, the indices of its pairs kept, and their source and target ids, tokenised a block at a
    time; `counts` (`new_counts`) adds up the pairs read, kept and dropped, for whoever keeps the ids
    (`encode_corpus` in memory, training into its run directory as it reads)."""
    with tqdm(total=total, desc="tokenising", unit=" pairs", leave=False, disable=not progress) as bar:
        for block in blocks:
            src = tokenizer.encode_batch([s for s, _ in block])
            tgt = tokenizer.encode_batch([t for _, t in block])
            keep, dropped = filter_pairs(list(zip(src, tgt, strict=True)), max_len or 10**9)
            yield block, keep, [src[i] for i in keep], [tgt[i] for i in keep]
            counts["pairs"] += len(block)
            counts["kept"] += len(keep)
            for reason, n in dropped.items():
                counts[reason] += n
            bar.update(len(block))
