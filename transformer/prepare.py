"""What a run needs before its first step: the training text read for its digest, its size and the
tokenizer's sample; the tokenizer, trained or taken from the run it starts from (`init_from`); and the
training ids, tokenised once and kept in the run directory for every process and every resume.

Only rank 0 reads the text and trains the tokenizer (`transformer.distributed.on_main`); the text is read
a block at a time and never held whole, so a corpus of WMT's size fits a small machine (README, "Training
settings").
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from transformer import distributed, rundir
from transformer.config import ModelConfig, TrainConfig, config_to_dict
from transformer.data.corpus import count_pairs, iter_split, read_split, split_paths
from transformer.data.dataset import ENCODE_CHUNK, Corpus, encode_stream, new_counts
from transformer.data.tokenizer import Tokenizer, round_trip_mismatches
from transformer.errors import TransformerError
from transformer.rundir import MetricsLog
from transformer.translate import read_checkpoint

# Training lines whose round trip through the new tokenizer is checked, at most: a fraction that a loss
# shows up in as clearly as in all 2M lines of a full sample, in 3.4 s instead of 35.3 s (Zen 4, two cores).
ROUND_TRIP_LINES = 200_000


def build_tokenizer(
    pairs: list[tuple[str, str]], tc: TrainConfig, run_dir: Path, log: MetricsLog
) -> Tokenizer:
    """Train the joint subword model on the training pairs (both sides; a sample of `tc.tokenizer_lines`
    lines of a larger corpus) and check that those lines (`ROUND_TRIP_LINES` of them at most) round-trip."""
    return train_tokenizer(tokenizer_sample(pairs, tc.tokenizer_lines, tc.seed), len(pairs), tc, run_dir, log)


def train_tokenizer(
    texts: list[str], pairs: int, tc: TrainConfig, run_dir: Path, log: MetricsLog
) -> Tokenizer:
    """`build_tokenizer` from its sample of the `pairs` training pairs: the corpus itself need not be in
    memory while SentencePiece, which holds every line it trains on, takes its peak."""
    if 2 * pairs > tc.tokenizer_lines:
        sample = f"{len(texts):,} of the {2 * pairs:,} lines (tokenizer_lines={tc.tokenizer_lines})"
        tqdm.write(f"tokenizer: training on a sample, {sample}")
    elif len(texts) >= 200_000:  # a minute or more of silence otherwise
        tqdm.write(f"tokenizer: training on {len(texts):,} lines")
    tokenizer = Tokenizer.train(texts, run_dir / "tokenizer.model", vocab_size=tc.vocab_size)
    checked = texts[:: max(1, math.ceil(len(texts) / ROUND_TRIP_LINES))]  # spread over the corpus
    mismatches = round_trip_mismatches(tokenizer, checked)
    log.write(
        event="tokenizer",
        vocab_size=tokenizer.vocab_size,
        lines=len(texts),
        round_trip_lines=len(checked),
        round_trip_mismatches=len(mismatches),
    )
    if mismatches:
        tqdm.write(
            f"warning: {len(mismatches)} of {len(checked)} training lines checked do not survive "
            f"decode(encode(text))"
        )
    if tokenizer.vocab_size < tc.vocab_size:  # SentencePiece stops where the corpus has no more pieces
        tqdm.write(
            f"vocabulary: {tokenizer.vocab_size} pieces, fewer than vocab_size={tc.vocab_size}: "
            f"the training text holds no more"
        )
    return tokenizer


def tokenizer_sample(pairs: Sequence[tuple[str, str]], lines: int, seed: int) -> list[str]:
    """Both sides of every pair, or of a random sample of `lines // 2` pairs when there are more
    (`TokenizerSample`, given the pairs at once)."""
    sample = TokenizerSample(lines, seed, len(pairs))
    sample.add(pairs)
    return sample.take_lines()


class TokenizerSample:
    """The lines SentencePiece trains on, taken from a corpus of `pairs` pairs read a block at a time: both
    sides of every pair, or of `lines // 2` pairs chosen at random when there are more, in corpus order.

    SentencePiece holds every line it trains on in memory (6.3 GB for 2M lines of ~25 words, measured), and
    a sample of millions of lines gives it the same statistics: Marian samples 2M lines by default too.
    The sample is fixed by the seed, so a run's tokenizer is reproducible. Each block's chosen lines are
    kept joined in one string: kept as separate strings, lines lie scattered among those of the blocks
    read and dropped, and keep that memory from being reused (keeping one pair in five so slowed reading
    4.5M pairs from 5.5 s to 7.3 s), and from being handed back to SentencePiece at its peak.
    """

    def __init__(self, lines: int, seed: int, pairs: int) -> None:
        every = 2 * pairs <= lines
        self._chosen = range(pairs) if every else sorted(random.Random(seed).sample(range(pairs), lines // 2))
        self.pairs = 0  # pairs seen
        self._texts: list[str] = []  # each block's chosen lines, joined by newlines

    def add(self, pairs: Sequence[tuple[str, str]]) -> None:
        """The next pairs of the corpus."""
        start, self.pairs = self.pairs, self.pairs + len(pairs)
        chosen = self._chosen[bisect_left(self._chosen, start) : bisect_left(self._chosen, self.pairs)]
        if texts := "\n".join(text for i in chosen for text in pairs[i - start] if text):
            self._texts.append(texts)

    def take_lines(self) -> list[str]:
        """The sample's non-empty lines in corpus order, and the sample emptied."""
        joined, self._texts = "\n".join(self._texts), []
        return joined.split("\n") if joined else []  # no line holds a newline, nor is empty


@dataclasses.dataclass(frozen=True)
class Parent:
    """The run a new run starts from (`TrainConfig.init_from`): the checkpoint its weights start as, and
    what must stay the parent's for them to mean anything, its model and its tokenizer."""

    weights_file: Path
    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer_bytes: bytes

    @classmethod
    def read(cls, init_from: str) -> Parent:
        try:
            weights_file, model_config, train_config, tokenizer = read_checkpoint(init_from)
        except TransformerError as error:
            raise TransformerError(f"init_from={init_from}: {error}") from None
        return cls(weights_file, model_config, train_config, tokenizer.model_bytes)

    def adopted_by(self, tc: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
        """`tc` with the parent's model family, preset and vocabulary, which the new run's record must
        name for the run to be rebuilt and resumed; model overrides that would change the model refused."""
        saved = config_to_dict(self.model_config)
        changed = sorted(key for key, value in overrides.items() if key not in saved or saved[key] != value)
        if changed:
            raise TransformerError(
                f"init_from={tc.init_from} starts from that run's model: {', '.join(changed)} cannot change "
                f"(drop the model settings, or train a new model without init_from)"
            )
        parent = self.train_config
        if (parent.src_lang, parent.tgt_lang) != (tc.src_lang, tc.tgt_lang):  # allowed, seldom meant
            tqdm.write(
                f"warning: init_from={tc.init_from} translates {parent.src_lang}→{parent.tgt_lang}, this run "
                f"{tc.src_lang}→{tc.tgt_lang}, with that run's tokenizer"
            )
        return dataclasses.replace(tc, model=parent.model, preset=parent.preset, vocab_size=parent.vocab_size)


def training_ids(
    tc: TrainConfig, tokenizer: Tokenizer, run_dir: Path, key: dict[str, str]
) -> tuple[Corpus, dict[str, int], bool]:
    """The training split's ids, filter counts, and whether the ids were read rather than tokenised.

    Read from the run directory when kept there for this text, tokenizer and max_len: on resume, and
    under torchrun in every process but the first, which wait for rank 0 to tokenise and keep them
    rather than each running SentencePiece over the corpus on the same cores. A process without kept ids
    (rank 0 on a new run; one that cannot see rank 0's file, on several machines without shared storage)
    reads the text and tokenises it as it reads. Every process that can see the file trains from it,
    mapped into memory: one copy for all of them.
    """
    work = partial(_kept_or_tokenised, run_dir, tc, tokenizer, key)
    first = distributed.on_main(work, long=True)  # rank 0 keeps the ids, for the others to read
    return distributed.on_each(work if first is None else lambda: first)  # the others, with rank 0's result


def _kept_or_tokenised(
    run_dir: Path, tc: TrainConfig, tokenizer: Tokenizer, key: dict[str, str]
) -> tuple[Corpus, dict[str, int], bool]:
    """The ids kept in the run directory, else tokenised: by rank 0 into the run directory, by another
    process (whose machine cannot see rank 0's file) in its memory."""
    loaded = _read_training_ids(run_dir, key)
    if loaded is not None:
        return (*loaded, True)
    if distributed.is_main():
        return (*_tokenise_into(run_dir, tc, tokenizer, key), False)
    return (*_tokenise_training_text(tc, tokenizer, key), False)


def _tokenise_into(
    run_dir: Path, tc: TrainConfig, tokenizer: Tokenizer, key: dict[str, str]
) -> tuple[Corpus, dict[str, int]]:
    """Rank 0's ids of the training split, written into the run directory as they are made, then trained
    from mapped: the process never holds them (0.61 GB at 4.5M pairs), and their pages are the other
    processes' too, and the kernel's to drop. Where they cannot be written, tokenised again in memory."""
    counts = new_counts()
    try:
        with rundir.TrainingIdsWriter(run_dir, key, tokenizer.vocab_size) as writer:
            for src, tgt in _training_text_ids(tc, tokenizer, key, counts):
                writer.add(src, tgt)
            writer.finish(counts)
    except OSError as error:  # a full disk: the checkpoints will say so too
        distributed.warn(f"warning: the training ids were not kept ({error}): a resume will tokenise again")
        return _tokenise_training_text(tc, tokenizer, key)
    return rundir.load_training_ids(run_dir, key) or _tokenise_training_text(tc, tokenizer, key)


def _tokenise_training_text(
    tc: TrainConfig, tokenizer: Tokenizer, key: dict[str, str]
) -> tuple[Corpus, dict[str, int]]:
    """The training split's ids and filter counts, in this process's memory."""
    corpus, counts = Corpus.empty(tokenizer.vocab_size), new_counts()
    for src, tgt in _training_text_ids(tc, tokenizer, key, counts):
        corpus.src.extend(src)
        corpus.tgt.extend(tgt)
    return corpus, counts


def _training_text_ids(
    tc: TrainConfig, tokenizer: Tokenizer, key: dict[str, str], counts: dict[str, int]
) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    """The source and target ids of the training split's kept pairs, tokenised a block at a time as the
    text is read; `counts` adds up the filter's counts. The text must be what rank 0 read at the start
    (of which `key["text"]` is the digest): on other text this process's batches would not be the
    others', and the run record would name text it was not trained on."""
    digest = rundir.DataDigest()
    blocks = iter_split(tc.data_dir, tc.train_split, tc.src_lang, tc.tgt_lang, block=ENCODE_CHUNK)
    for block, _, src, tgt in encode_stream(blocks, tokenizer, tc.max_len, counts, shows_bars()):
        digest.update(block)
        yield src, tgt
    if digest.hexdigest() != key["text"]:
        raise TransformerError(
            f"the {tc.train_split!r} split in {tc.data_dir}, read by rank {distributed.rank()}, is not the "
            f"text rank 0 read at the start: every machine needs the same copy, unchanged while a run starts"
        )


def _read_training_ids(run_dir: Path, key: dict[str, str]) -> tuple[Corpus, dict[str, int]] | None:
    try:
        loaded = rundir.load_training_ids(run_dir, key)
    except TransformerError as error:  # kept ids are a saving, not a need: tokenise again
        distributed.warn(f"warning: {error}: tokenising the training data again")
        return None
    if loaded is not None:
        tqdm.write(f"train: token ids read from {run_dir / rundir.TRAIN_IDS}")
    return loaded


def shows_bars() -> bool:
    """Progress bars: on the first process, at a terminal (no redraws in a log file)."""
    return distributed.is_main() and sys.stderr.isatty()


@dataclasses.dataclass(frozen=True)
class TrainingText:
    """What a run needs of its training text before tokenising it."""

    digest: str  # rundir.data_sha256 of its pairs
    pairs: int
    sample: TokenizerSample | None  # the tokenizer's lines, on a new run
    stamps: list[dict[str, Any]] | None = None  # its files' state, to keep with the digest (rundir)


def training_text(tc: TrainConfig, run_dir: Path, *, resume: bool, sample: bool) -> TrainingText:
    """What the run needs of its training text (with `sample`, the lines to train a tokenizer on). A
    resume whose text files are as they were takes the digest kept in the run directory
    (`rundir.kept_text_digest`); else one pass over the text (`scan_training_text`), with the files'
    stamps where they can vouch for it, for the next resume."""
    files = split_paths(tc.data_dir, tc.train_split, tc.src_lang, tc.tgt_lang)
    if resume and (digest := rundir.kept_text_digest(run_dir, files)) is not None:
        return TrainingText(digest, 0, None)
    before = rundir.TextStamps.take(files)
    text = scan_training_text(tc, sample=sample)
    return dataclasses.replace(text, stamps=before.settled(files))


def keep_text_digest(run_dir: Path, text: TrainingText) -> None:
    """Keep the text's digest in the run directory where its files' stamps can vouch for it."""
    if text.stamps:
        rundir.keep_text_digest(run_dir, text.digest, text.stamps)


def scan_training_text(tc: TrainConfig, *, sample: bool) -> TrainingText:
    """One pass over the training split, a block at a time: it is never in memory whole (a whole 4.5M-pair
    split is 2.3 GB of strings; WMT14 en-fr's 36M pairs would be ~18 GB)."""
    split = (tc.data_dir, tc.train_split, tc.src_lang, tc.tgt_lang)
    chosen = TokenizerSample(tc.tokenizer_lines, tc.seed, count_pairs(*split)) if sample else None
    digest, pairs, with_text = rundir.DataDigest(), 0, False
    for block in iter_split(*split, block=ENCODE_CHUNK):
        digest.update(block)
        if chosen is not None:
            chosen.add(block)
        pairs += len(block)
        with_text = with_text or any(src and tgt for src, tgt in block)
    if not with_text:
        raise _empty_split(tc, tc.train_split)
    return TrainingText(digest.hexdigest(), pairs, chosen)


def read_pairs(tc: TrainConfig, split: str) -> list[tuple[str, str]]:
    """A split's pairs; an empty split is one clear error."""
    pairs = read_split(tc.data_dir, split, tc.src_lang, tc.tgt_lang)
    if not any(src and tgt for src, tgt in pairs):
        raise _empty_split(tc, split)
    return pairs


def _empty_split(tc: TrainConfig, split: str) -> TransformerError:
    return TransformerError(
        f"the {split!r} split in {tc.data_dir} is empty (no line pair with text on both sides)"
    )
