"""Tests of corpus reading, the SentencePiece tokenizer, the tokenised corpus and token-budget batching."""

from __future__ import annotations

import gzip
import itertools
import os
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import runtime
from transformer.data import dataset
from transformer.data.batching import BATCH_ORDER, Batch, collate, token_batches
from transformer.data.corpus import (
    corpus_paths,
    count_pairs,
    filter_pairs,
    iter_split,
    read_lines,
    read_parallel,
    read_split,
)
from transformer.data.dataset import TokenSequences, encode_corpus
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, round_trip_mismatches
from transformer.errors import TransformerError

MULTI30K = Path(__file__).resolve().parents[1] / "data" / "multi30k"
SPLITS = ("train", "val", "test2016")
# Text SentencePiece gets wrong by default: "▁" is its space symbol, NFKC would rewrite "ﬁ", "①" and the
# decomposed "é", repeated spaces would be collapsed; emoji, \x07 and most scripts never occur in Multi30k.
ODD_TEXTS = [
    "a\u2581b",
    "\u2581",
    "\u2581\u2581x \u2581",
    "Emoji 😀🚀 and 漢字 and عربى and Ελληνικά",
    "bell\x07 and nul\x00 and del\x7f",
    "two  spaces,\ttab, three   spaces",
    "ligature ﬁ, circled ①, decomposed e\u0301, fullwidth ＡＢ",
    "a\x0bb\x0cc\u2028d",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd",
    "",
]


def write(path: Path, text: str) -> Path:
    """Write UTF-8 text, gzip-compressed if the name ends in .gz."""
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# ---------------------------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("name", ["text.txt", "text.txt.gz"])
def test_read_lines_strips_and_splits_only_on_newline(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "  a b \n\tc\r\n\nx\x0by\u2028z\nlast")
    assert read_lines(path) == ["a b", "c", "", "x\x0by\u2028z", "last"]


def test_read_lines_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(TransformerError, match=re.escape("nowhere.de")):
        read_lines(tmp_path / "nowhere.de")


def test_read_lines_corrupt_gzip_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.de.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(TransformerError, match=re.escape("broken.de.gz")):
        read_lines(path)


@pytest.mark.parametrize(
    ("src_name", "tgt_name"), [("a.de", "a.en"), ("a.de.gz", "a.en.gz"), ("a.de", "a.en.gz")]
)
def test_read_parallel_two_files(tmp_path: Path, src_name: str, tgt_name: str) -> None:
    src = write(tmp_path / src_name, "Ein Hund .\n  Zwei  Katzen \n")
    tgt = write(tmp_path / tgt_name, "A dog .\nTwo  cats\t\n")
    assert read_parallel(src, tgt) == [("Ein Hund .", "A dog ."), ("Zwei  Katzen", "Two  cats")]


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.tsv.gz"])
def test_read_parallel_tsv(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "Ein Hund .\tA dog .\n Zwei Katzen \t Two cats \n\tempty source\n \n\n")
    assert read_parallel(path) == [
        ("Ein Hund .", "A dog ."),
        ("Zwei Katzen", "Two cats"),
        ("", "empty source"),
        ("", ""),  # blank lines: empty pairs, as blank lines in two files give
        ("", ""),
    ]


@pytest.mark.parametrize("bad_line", ["no tab here", "one\ttwo\tthree"])
def test_read_parallel_tsv_rejects_line_without_exactly_one_tab(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path / "pairs.tsv", f"a\tb\n{bad_line}\nc\td\n")
    with pytest.raises(TransformerError, match=r"pairs\.tsv line 2 has [02] tabs"):
        read_parallel(path)


def test_read_parallel_mismatched_counts_names_both_files(tmp_path: Path) -> None:
    src = write(tmp_path / "train.de.gz", "a\nb\nc\n")
    tgt = write(tmp_path / "train.en.gz", "a\nb\n")
    with pytest.raises(TransformerError) as info:
        read_parallel(src, tgt)
    message = str(info.value)
    assert "train.de.gz has 3 lines but" in message
    assert "train.en.gz has 2:" in message
    assert "aligned line by line" in message


@pytest.mark.parametrize("layout", ["two files", "tsv"])
def test_a_split_read_in_blocks_is_the_split_read_whole(tmp_path: Path, layout: str) -> None:
    """Training streams its split (`iter_split`): the blocks, whatever their size, hold the pairs
    `read_split` returns, in order; files of different lengths fail once both are read."""
    pairs = [(f" Satz {i} ", f"sentence {i} ") for i in range(23)]
    if layout == "tsv":
        write(tmp_path / "train.de-en.tsv.gz", "".join(f"{s}\t{t}\n" for s, t in pairs))
    else:
        write(tmp_path / "train.de.gz", "".join(s + "\n" for s, _ in pairs))
        write(tmp_path / "train.en", "".join(t + "\n" for _, t in pairs))
    whole = read_split(tmp_path, "train", "de", "en")
    assert whole == [(s.strip(), t.strip()) for s, t in pairs]
    for block in (1, 5, 23, 100):
        blocks = list(iter_split(tmp_path, "train", "de", "en", block=block))
        assert [len(b) for b in blocks[:-1]] == [block] * (len(blocks) - 1)
        assert list(itertools.chain.from_iterable(blocks)) == whole
    if layout == "two files":
        write(tmp_path / "train.en", "".join(t + "\n" for _, t in pairs[:-3]))
        blocks = iter_split(tmp_path, "train", "de", "en", block=5)
        assert len(next(blocks)) == 5  # pairs up to where the shorter file ends
        with pytest.raises(TransformerError, match=r"train\.de\.gz has 23 lines but .*train\.en has 20"):
            list(blocks)


@pytest.mark.parametrize(
    "text", ["", "\n", "a\nb\n", "a\nb", "a\r\nb\r\n\n", "\ufeffa\n\xff\n", "a\x0bb\u2028c\n"]
)
@pytest.mark.parametrize("name", ["train.de", "train.de.gz", "train.de-en.tsv.gz"])
def test_count_pairs_counts_the_lines_reading_gives(tmp_path: Path, text: str, name: str) -> None:
    """Sampling a split as it is read needs its size first: counted in bytes, without decoding, it must
    be the number of lines (pairs) that reading gives, with or without a final newline."""
    raw = text.encode("utf-8", errors="surrogateescape").replace("\xff".encode(), b"\xff")
    if name.endswith(".tsv.gz"):
        raw = raw.replace(b"\n", b"\tx\n") + (b"\tx" if raw and not raw.endswith(b"\n") else b"")
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    (tmp_path / "train.en").write_bytes(raw)
    assert count_pairs(tmp_path, "train", "de", "en") == len(read_split(tmp_path, "train", "de", "en"))


def test_corpus_paths_names_a_split_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "train.de").mkdir()  # e.g. an archive unpacked under the file's name
    write(tmp_path / "train.en", "x\n")
    with pytest.raises(TransformerError) as info:
        corpus_paths(tmp_path, "train", "de", "en")
    assert str(info.value) == f"{tmp_path / 'train.de'} is not a file: the train split's text must be one"


def test_corpus_paths_finds_plain_or_gz(tmp_path: Path) -> None:
    write(tmp_path / "val.de", "x\n")
    write(tmp_path / "val.en.gz", "x\n")
    assert corpus_paths(tmp_path, "val", "de", "en") == (tmp_path / "val.de", tmp_path / "val.en.gz")
    # What is missing is answered with what is there: the split's languages, the pair's splits (in either
    # layout), a TSV named target-source.
    with pytest.raises(TransformerError) as info:
        corpus_paths(tmp_path, "val", "de", "fr")
    assert str(info.value) == (
        f"neither val.fr[.gz] nor val.de-fr.tsv[.gz] found in {tmp_path} (its val files are in: de, en)"
    )
    write(tmp_path / "test2016.de-en.tsv.gz", "x\tx\n")
    write(tmp_path / "train.de", "x\n")  # no train.en: not a split of the pair
    with pytest.raises(TransformerError, match=re.escape("(its de-en splits: test2016, val)")):
        corpus_paths(tmp_path, "valid", "de", "en")
    write(tmp_path / "dev.en-de.tsv", "x\tx\n")
    with pytest.raises(
        TransformerError, match=re.escape("(there is dev.en-de.tsv: a TSV is named source-target")
    ):
        corpus_paths(tmp_path, "dev", "de", "en")
    write(tmp_path / "val.de.gz", "x\n")
    with pytest.raises(TransformerError, match=re.escape("both val.de and val.de.gz")):
        corpus_paths(tmp_path, "val", "de", "en")
    with pytest.raises(TransformerError, match="does not exist"):
        corpus_paths(tmp_path / "missing", "val", "de", "en")


def test_filter_pairs_counts_each_reason() -> None:
    pairs = [
        ([1, 2], [3]),  # kept
        ([], [3]),  # empty source
        ([4], []),  # empty target
        ([5] * 4, [6]),  # too long source
        ([7], [8] * 5),  # too long target
        ([], [9] * 9),  # empty and too long: counted as empty only
        ([5] * 3, [6] * 3),  # exactly max_len: kept
    ]
    assert filter_pairs(pairs, max_len=3) == ([0, 6], {"empty": 3, "too_long": 2})
    with pytest.raises(TransformerError, match="max_len"):
        filter_pairs(pairs, max_len=0)


def test_bundled_corpus_reads_aligned_and_stripped() -> None:
    pairs = read_parallel(*corpus_paths(MULTI30K, "train", "de", "en"))
    assert len(pairs) == 29000
    assert all(side == side.strip() and side for pair in pairs for side in pair)
    assert sum("\t" in de for de, _ in pairs) == 1  # the one inner TAB of train.de survives stripping


# ------------------------------------------------------------------------------------------- tokenizer


def corpus_texts(split: str) -> list[str]:
    return [side for pair in read_parallel(*corpus_paths(MULTI30K, split, "de", "en")) for side in pair]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The real setting: 8000 pieces trained on both languages of the Multi30k training split."""
    return Tokenizer.train(corpus_texts("train"), tmp_path_factory.mktemp("tok") / "tokenizer.model", 8000)


def small_corpus() -> list[str]:
    return corpus_texts("val")[:600]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train(small_corpus(), tmp_path_factory.mktemp("small") / "tokenizer.model", 500)


@pytest.mark.parametrize("split", SPLITS)
def test_tokenizer_round_trips_every_bundled_line(tokenizer: Tokenizer, split: str) -> None:
    texts = corpus_texts(split)
    bad = round_trip_mismatches(tokenizer, texts)
    assert not bad, f"{len(bad)} of {len(texts)} {split} lines do not round-trip, e.g. {texts[bad[0]]!r}"


def test_tokenizer_vocabulary_and_special_ids(tokenizer: Tokenizer) -> None:
    assert 4000 < tokenizer.vocab_size <= 8000
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tokenizer.encode("Ein Mann fährt Fahrrad.")
    assert ids and not {PAD_ID, UNK_ID, BOS_ID, EOS_ID} & set(ids)
    assert "".join(map(tokenizer.piece, ids)) == "▁Ein▁Mann▁fährt▁Fahrrad."
    # Model output arrives with BOS, EOS and padding; as a tensor, too.
    assert tokenizer.decode(torch.tensor([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID])) == "Ein Mann fährt Fahrrad."


def test_a_blank_sentence_has_no_tokens(small_tokenizer: Tokenizer) -> None:
    """Not SentencePiece's lone "▁": an empty line must not pass for a sentence of one token."""
    words = small_tokenizer.encode("ein Hund")
    assert small_tokenizer.encode("") == small_tokenizer.encode(" \t ") == []
    assert small_tokenizer.encode_batch(["", "ein Hund", "  "]) == [[], words, []]


def test_tokenizer_round_trips_odd_text_with_byte_fallback(tokenizer: Tokenizer) -> None:
    for text in ODD_TEXTS:
        ids = tokenizer.encode(text)
        assert UNK_ID not in ids, text
        assert tokenizer.decode(ids) == text
    assert [tokenizer.piece(i) for i in tokenizer.encode("😀")] == [
        "▁",
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
    ]


def test_tokenizer_batch_methods_match_single(tokenizer: Tokenizer) -> None:
    texts = [*ODD_TEXTS, "Zwei Hunde spielen im Schnee."]
    encoded = tokenizer.encode_batch(texts)
    assert encoded == [tokenizer.encode(text) for text in texts]
    assert tokenizer.decode_batch(encoded) == texts


def test_round_trip_mismatches_reports_lossy_texts() -> None:
    class Lowercasing:
        """Stands in for a lossy tokenizer."""

        def encode_batch(self, texts: list[str]) -> list[str]:
            return [t.lower() for t in texts]

        def decode_batch(self, batch: list[str]) -> list[str]:
            return batch

    assert round_trip_mismatches(Lowercasing(), ["ok", "Not", "fine", "AT all"]) == [1, 3]  # type: ignore[arg-type]


def test_tokenizer_training_is_deterministic_and_loads_back(
    small_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    again = Tokenizer.train(small_corpus(), tmp_path / "again.model", 500)
    assert again.sha256() == small_tokenizer.sha256()
    assert small_tokenizer.path is not None
    loaded = Tokenizer.load(small_tokenizer.path)
    assert loaded.sha256() == small_tokenizer.sha256()
    assert loaded.model_bytes == small_tokenizer.path.read_bytes()
    text = "Ein kleines Mädchen klettert.\u2581"
    assert loaded.encode(text) == small_tokenizer.encode(text)


def test_tokenizer_small_corpus_gets_smaller_vocabulary(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    tiny = Tokenizer.train(["ein Hund", "zwei Hunde"], tmp_path / "tiny.model", 8000)
    assert tiny.vocab_size < 8000
    assert tiny.decode(tiny.encode("drei Katzen 🐱")) == "drei Katzen 🐱"


def test_tokenizer_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TransformerError, match=re.escape("missing.model does not exist")):
        Tokenizer.load(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TransformerError, match=re.escape("corrupt.model is not a valid SentencePiece model")):
        Tokenizer.load(corrupt)
    # Right special ids, but SentencePiece's default NFKC normalization, dummy prefix and no byte fallback.
    foreign = tmp_path / "foreign"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(small_corpus()),
        model_prefix=str(foreign),
        vocab_size=300,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        minloglevel=2,
    )
    with pytest.raises(
        TransformerError, match=re.escape("foreign.model is a SentencePiece model not trained by this")
    ):
        Tokenizer.load(foreign.with_suffix(".model"))


# Arbitrary text, with the characters SentencePiece treats specially made likely. (st.text would merge this
# alphabet into plain "any character" and lose the weighting, hence lists of characters.)
special_chars = st.sampled_from(" \t\n\r\x00\u2581\u3000ﬁ😀")
# Lone surrogates (category Cs) are not text: no UTF-8 file holds them (see the test after this one).
odd_text = st.lists(st.characters(exclude_categories=("Cs",)) | special_chars, max_size=60).map("".join)


@settings(max_examples=100, deadline=None)
@given(text=odd_text)
def test_tokenizer_round_trips_arbitrary_text(small_tokenizer: Tokenizer, text: str) -> None:
    text = text.strip()
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_tokenizer_replaces_lone_surrogates(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.decode(small_tokenizer.encode("a\ud800b")) == "a\ufffdb"
    assert small_tokenizer.decode_batch(small_tokenizer.encode_batch(["\udfffx"])) == ["\ufffdx"]


# -------------------------------------------------------------------------------------------- batching


def random_lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    src = [rng.randint(0, 60) for _ in range(n)]
    tgt = [rng.randint(0, 60) for _ in range(n)]
    src[7] = 300  # longer than the whole budget
    return src, tgt


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_batches_cover_every_index_within_budget(shuffle: bool) -> None:
    src_lens, tgt_lens = random_lengths(500)
    max_tokens = 256
    batches = token_batches(src_lens, tgt_lens, max_tokens, shuffle=shuffle, seed=1, epoch=2)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(500))
    assert len(batches) < 500 / 3  # greedy filling actually groups examples
    assert [7] in batches
    for batch in batches:
        padded = collate([([5] * src_lens[i], [6] * tgt_lens[i]) for i in batch])
        if batch != [7]:
            assert padded.src.numel() <= max_tokens and padded.tgt_out.numel() <= max_tokens
            cost = len(batch) * (max(max(src_lens[i], tgt_lens[i]) for i in batch) + 1)
            assert cost <= max_tokens
    if not shuffle:
        widths = [max(src_lens[i], tgt_lens[i]) for i in itertools.chain.from_iterable(batches)]
        assert widths == sorted(widths)


@pytest.mark.parametrize("order", [1, BATCH_ORDER])
def test_token_batches_deterministic_per_seed_and_epoch(order: int) -> None:
    src_lens, tgt_lens = random_lengths(300)

    def make(seed: int, epoch: int) -> list[list[int]]:
        return token_batches(src_lens, tgt_lens, 200, shuffle=True, seed=seed, epoch=epoch, order=order)

    state, (_, numpy_key, numpy_pos, *_) = random.getstate(), np.random.get_state()
    assert make(0, 0) == make(0, 0)
    assert make(0, 0) != make(0, 1)
    assert make(0, 0) != make(1, 0)
    assert random.getstate() == state  # the global RNGs are left alone
    _, key, pos, *_ = np.random.get_state()
    assert (key == numpy_key).all() and pos == numpy_pos
    unshuffled = token_batches(src_lens, tgt_lens, 200, shuffle=False, seed=5, epoch=9, order=order)
    assert unshuffled == token_batches(src_lens, tgt_lens, 200, shuffle=False)
    with pytest.raises(TransformerError, match="max_tokens"):
        token_batches(src_lens, tgt_lens, 0, shuffle=False)
    with pytest.raises(TransformerError, match="batch order 3 is unknown"):
        token_batches(src_lens, tgt_lens, 200, shuffle=True, order=3)


def test_the_two_batch_orders_shuffle_differently_and_cut_alike() -> None:
    src_lens, tgt_lens = random_lengths(300)
    first, second = (token_batches(src_lens, tgt_lens, 200, shuffle=True, order=k) for k in (1, 2))
    assert first != second
    assert sorted(map(len, first)) == sorted(map(len, second))


def batches_one_example_at_a_time(
    src_lens: list[int],
    tgt_lens: list[int],
    max_tokens: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    order: int,
) -> list[list[int]]:
    """The reference for `token_batches`: the plain loop it replaced, which cut an example at a time,
    with the shuffles of both batch orders written out. The same batches in the same order keep a run's
    batches, and so its resume, as they were."""
    width = [max(s, t) + 1 for s, t in zip(src_lens, tgt_lens, strict=True)]
    rng = random.Random(f"{seed}:{epoch}")
    numpy_rng = np.random.RandomState([rng.getrandbits(32) for _ in range(4)]) if order == 2 else None
    if not shuffle:
        examples: list[int] = list(range(len(width)))
    elif numpy_rng is None:
        examples = rng.sample(range(len(width)), len(width))
    else:
        examples = numpy_rng.permutation(len(width)).tolist()
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(examples, key=width.__getitem__):
        if batch and (len(batch) + 1) * width[i] > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    if shuffle and numpy_rng is None:
        rng.shuffle(batches)
    elif shuffle:
        batches = [batches[k] for k in numpy_rng.permutation(len(batches))]
    return batches


@given(
    lengths=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), max_size=300),
    max_tokens=st.integers(1, 300),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    order=st.sampled_from([1, 2]),
)
@settings(max_examples=200, deadline=None)
def test_token_batches_are_those_of_cutting_one_example_at_a_time(
    lengths: list[tuple[int, int]], max_tokens: int, shuffle: bool, seed: int, order: int
) -> None:
    src_lens, tgt_lens = [s for s, _ in lengths], [t for _, t in lengths]
    expected = batches_one_example_at_a_time(src_lens, tgt_lens, max_tokens, shuffle, seed, 1, order)
    batches = token_batches(src_lens, tgt_lens, max_tokens, shuffle=shuffle, seed=seed, epoch=1, order=order)
    assert len(batches) == len(expected)
    assert list(batches) == expected and batches[1::2] == expected[1::2]


@pytest.mark.parametrize("order", [1, 2])
def test_token_batches_keep_the_shuffled_order_among_equal_widths(order: int) -> None:
    # Thousands of ties, where an unstable sort would reorder them (small inputs sort stably anyway).
    src_lens, tgt_lens = [i % 4 for i in range(5000)], [0] * 5000
    expected = batches_one_example_at_a_time(src_lens, tgt_lens, 40, True, 7, 1, order)
    assert token_batches(src_lens, tgt_lens, 40, shuffle=True, seed=7, epoch=1, order=order) == expected


def test_token_batches_of_each_order_stay_those_of_the_version_that_drew_them() -> None:
    """A resumed run, and every process of a run, must draw the batches it drew before: pinned here, so
    that a change of Python's or numpy's random streams (numpy keeps RandomState's frozen) shows."""
    draws = [list(token_batches([2] * 10, [2] * 10, 9, shuffle=True, seed=1, order=k)) for k in (1, 2)]
    assert draws == [[[8, 9, 3], [6, 4, 5], [0, 1, 7], [2]], [[8], [9, 5, 3], [1, 0, 4], [6, 2, 7]]]


def test_token_batches_sort_widths_past_16_bits_too() -> None:
    src_lens = [70_000, 5, 70_000, 65_535, 5]
    batches = token_batches(src_lens, [0] * 5, 10**6, shuffle=False)
    assert list(batches) == [[1, 4, 3, 0, 2]]
    assert token_batches(src_lens, [0] * 5, 70_001, shuffle=False) == [[1, 4], [3], [0], [2]]


def test_collate_shapes_special_tokens_and_padding() -> None:
    batch = collate([([5, 6, 7], [8]), ([9], [10, 11])])
    assert batch.src.tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, PAD_ID], [BOS_ID, 10, 11]]
    assert batch.tgt_out.tolist() == [[8, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert (batch.n_src_tokens, batch.n_tgt_tokens, len(batch)) == (6, 5, 2)
    # src: 2 pads of 8 positions, tgt_out: 1 pad of 6 positions.
    assert batch.padding_fraction == pytest.approx(3 / 14)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_out, batch.tgt_out)
    custom = collate([([4], [])], pad_id=9, bos_id=7, eos_id=8)
    assert (custom.src.tolist(), custom.tgt_in.tolist(), custom.tgt_out.tolist()) == ([[4, 8]], [[7]], [[8]])


def test_corpus_files_lose_their_bom_and_report_bytes_that_are_not_utf8(tmp_path: Path, capsys) -> None:
    """As translate reads its input: a BOM would stay glued to the first sentence, and replaced bytes
    would go unreported."""
    (tmp_path / "a.de").write_bytes(b"\xef\xbb\xbfEin Hund.\r\nZwei \xff Katzen.\n")
    (tmp_path / "a.en").write_bytes(b"A dog.\nTwo cats.\n")
    pairs = read_parallel(tmp_path / "a.de", tmp_path / "a.en")
    assert pairs == [("Ein Hund.", "A dog."), ("Zwei \ufffd Katzen.", "Two cats.")]
    assert "a.de is not valid UTF-8 (first at line 2)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- dataset


@given(st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=6), max_size=12), st.integers(0, 12))
@settings(max_examples=60, deadline=None)
def test_token_sequences_hold_what_lists_hold(sequences: list[list[int]], split: int) -> None:
    """Built at once or in two parts, the flat array gives back every sequence, slice and length."""
    whole = TokenSequences(sequences)
    parts = TokenSequences(sequences[:split])
    parts.extend(sequences[split:])
    for held in (whole, parts):
        assert len(held) == len(sequences)
        assert list(held) == sequences and held[:] == sequences
        assert held[1::2] == sequences[1::2] and held[::-1] == sequences[::-1]
        assert held.lengths().tolist() == [len(s) for s in sequences]
        assert [held.length(i) for i in range(len(held))] == [len(s) for s in sequences]
        if sequences:
            assert held[-1] == sequences[-1] and type(held[0]) is list
        assert list(TokenSequences.from_arrays(*held.arrays())) == sequences  # as saved and read back
    with pytest.raises(IndexError):
        whole[len(sequences)]
    with pytest.raises(IndexError):
        whole[-len(sequences) - 1]


def test_token_sequences_refuse_offsets_that_do_not_cut_up_the_ids() -> None:
    ids, offsets = TokenSequences([[1, 2], [3]]).arrays()
    for bad in ([0, 2], [1, 2, 3], [0, 2, 1, 3], []):
        with pytest.raises(ValueError, match="offsets"):
            TokenSequences.from_arrays(ids, np.array(bad, dtype=np.int64))
    for wrong in (np.int64, np.int16):
        with pytest.raises(ValueError, match="int32 or uint16, and int64"):
            TokenSequences.from_arrays(ids.astype(wrong), offsets)


def test_token_sequences_from_arrays_hold_the_arrays_given_not_copies() -> None:
    """So that a memory map of kept ids stays one (shared by a torchrun's processes); such sequences
    cannot grow, since the arrays are not theirs."""
    for dtype in (np.int32, np.uint16):  # uint16: the ids of a kept file of a vocabulary of 2^16 or less
        ids, offsets = np.array([4, 5, 65535], dtype=dtype), np.array([0, 1, 3], dtype=np.int64)
        held = TokenSequences.from_arrays(ids, offsets)
        assert all(np.shares_memory(a, b) for a, b in zip(held.arrays(), (ids, offsets), strict=True))
        assert list(held) == [[4], [5, 65535]] and held.lengths().tolist() == [1, 2] and held.length(1) == 2
        assert type(held[1][1]) is int and held.nbytes == 3 * ids.itemsize + 3 * 8
        with pytest.raises(TypeError, match="cannot be extended"):
            held.extend([[7]])


def test_token_sequences_take_4_bytes_a_token_or_2_of_a_vocabulary_of_2_to_the_16() -> None:
    """The point of the class: a 30-token sentence in ~128 bytes, not a list's ~1,100; ~68 where every id
    fits 16 bits, and 32-bit ids past that."""
    sentences = [list(range(65_506, 65_536))] * 1000
    assert TokenSequences(sentences).nbytes == 30_000 * 4 + 1001 * 8
    for vocab_size, width in ((1 << 16, 2), ((1 << 16) + 1, 4)):
        held = TokenSequences(sentences, vocab_size=vocab_size)
        assert held.nbytes == 30_000 * width + 1001 * 8 and list(held) == sentences
        assert held.arrays()[0].dtype == (np.uint16 if width == 2 else np.int32)
        assert list(TokenSequences.from_arrays(*held.arrays())) == sentences
    with pytest.raises(OverflowError):  # an id the vocabulary does not have is not wrapped around
        TokenSequences([[1 << 16]], vocab_size=1 << 16)


def test_encode_corpus_in_chunks_equals_encoding_at_once(
    small_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks that split the pairs anywhere (here every 7) keep the ids, the texts and the counts of
    dropped pairs of one pass over everything."""
    pairs = read_parallel(*corpus_paths(MULTI30K, "val", "de", "en"))[:60]
    pairs[3] = ("", "A dog.")
    pairs[10] = ("Ein Hund " * 80, "A dog.")
    src = small_tokenizer.encode_batch([s for s, _ in pairs])
    tgt = small_tokenizer.encode_batch([t for _, t in pairs])
    keep, dropped = filter_pairs(list(zip(src, tgt, strict=True)), 120)
    assert dropped == {"empty": 1, "too_long": 1}
    monkeypatch.setattr(dataset, "ENCODE_CHUNK", 7)
    corpus, counts = encode_corpus(pairs, small_tokenizer, 120)
    assert list(corpus.src) == [src[i] for i in keep] and list(corpus.tgt) == [tgt[i] for i in keep]
    assert corpus.tgt_text == [pairs[i][1] for i in keep]
    assert counts == {"pairs": 60, "kept": 58, "empty": 1, "too_long": 1}
    unkept, _ = encode_corpus(pairs, small_tokenizer, 120, keep_text=False)
    assert unkept.tgt_text == [] and list(unkept.src) == list(corpus.src)
    widths = {max(len(src[i]), len(tgt[i])) + 1 for i in keep}
    assert {max(corpus.src.length(i), corpus.tgt.length(i)) + 1 for i in range(58)} == widths


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_returns_what_the_allocator_tunables_keep() -> None:
    """Under the trainer's tunables glibc keeps freed memory; after tokenising, the trainer hands it back.
    Measured in a fresh interpreter with the tunables, as `transformer train` runs."""
    script = """
import sys
from transformer.runtime import release_free_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
texts = [f"{i:600}" for i in range(400_000)]  # ~250 MB from malloc's heap (pymalloc takes <= 512 bytes)
keep = texts[::1000]                           # survivors scattered through it, as the corpus's ids are
del texts
freed = rss()
release_free_memory()
print(freed, rss())
"""
    env = {**os.environ, "GLIBC_TUNABLES": runtime.ALLOCATOR_TUNABLES}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    freed, released = map(int, out.stdout.split())
    assert freed - released > 150, (freed, released)  # MB handed back
