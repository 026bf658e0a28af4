"""A SentencePiece subword tokenizer shared by source and target, set up so that decoding gives back the
exact input text.

Two SentencePiece defaults would break the exact round trip, and are handled here:

- Normalization (NFKC, collapsing of repeated spaces) changes the text: it is turned off.
- SentencePiece writes a space as the piece symbol "▁" (U+2581), so a literal "▁" in the input would come
  back as a space. The wrapper encodes a literal "▁" as its UTF-8 byte pieces instead (byte fallback
  decodes those after spaces are restored). This needs the word-initial "▁" that SentencePiece's
  `add_dummy_prefix` adds to be added here instead, as an explicit leading space, because SentencePiece
  would also add it at the start of every stretch of text encoded after a literal "▁".
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from transformer.checkpoint import atomic_write_bytes
from transformer.errors import TransformerError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

_PIECE_SPACE = "\u2581"  # how SentencePiece writes a space inside a piece
# A string that round-trips only if the model was trained the way Tokenizer.train does it.
_PROBE = "a  b\t\u2581c\x07 \U0001f600"


class Tokenizer:
    """Encodes sentences to subword ids (no BOS/EOS) and back; ids 0-3 are PAD, UNK, BOS, EOS."""

    def __init__(self, model_bytes: bytes, path: Path | None = None) -> None:
        """Prefer `Tokenizer.load` or `Tokenizer.train`; this takes a serialized SentencePiece model."""
        self._model_bytes = model_bytes
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._skip_on_decode = frozenset((PAD_ID, BOS_ID, EOS_ID))
        self._literal_piece_space = [
            self._sp.piece_to_id(f"<0x{b:02X}>") for b in _PIECE_SPACE.encode("utf-8")
        ]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_path: str | Path,
        vocab_size: int = 8000,
        model_type: str = "unigram",
    ) -> Tokenizer:
        """Train a joint vocabulary on `texts` (pass both languages) and write the model to `model_path`.

        `vocab_size` is an upper bound: small corpora get a smaller vocabulary instead of an error.
        Training is deterministic: the same texts give a byte-identical model.
        """
        model_path = Path(model_path)
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                # The leading space stands in for add_dummy_prefix, see the module docstring.
                sentence_iterator=(" " + text for text in texts),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                hard_vocab_limit=False,
                num_threads=min(os.cpu_count() or 1, 8),
                minloglevel=2,
            )
        except RuntimeError as e:
            raise TransformerError(f"could not train the tokenizer for {model_path}: {e}") from e
        model_path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic and synced, as a checkpoint is: a kill leaves no truncated model, and a temp file that the
        # run directory's cleanup knows (`rundir.remove_stale_temp_files`).
        atomic_write_bytes(model_path, buffer.getvalue())
        return cls(buffer.getvalue(), model_path)

    @classmethod
    def load(cls, model_path: str | Path) -> Tokenizer:
        """Load a model written by `Tokenizer.train`, checking it follows this module's conventions."""
        model_path = Path(model_path)
        try:
            model_bytes = model_path.read_bytes()
        except FileNotFoundError:
            raise TransformerError(f"tokenizer model {model_path} does not exist") from None
        except OSError as e:
            raise TransformerError(f"cannot read tokenizer model {model_path}: {e}") from e
        try:
            tokenizer = cls(model_bytes, model_path)
        except (RuntimeError, OSError) as e:
            raise TransformerError(f"{model_path} is not a valid SentencePiece model: {e}") from e
        specials = [
            tokenizer._sp.pad_id(),
            tokenizer._sp.unk_id(),
            tokenizer._sp.bos_id(),
            tokenizer._sp.eos_id(),
        ]
        if (
            specials != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
            or tokenizer.decode(tokenizer.encode(_PROBE)) != _PROBE
        ):
            raise TransformerError(
                f"{model_path} is a SentencePiece model not trained by this toolkit "
                "(needs pad/unk/bos/eos ids 0-3, byte fallback, identity normalization, no dummy prefix)"
            )
        return tokenizer

    @property
    def model_bytes(self) -> bytes:
        """The serialized model, e.g. to store it inside a run directory or checkpoint."""
        return self._model_bytes

    def sha256(self) -> str:
        """Hex digest of the model, to notice a tokenizer swapped under a checkpoint on resume."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def piece(self, token_id: int) -> str:
        """The subword string of an id, e.g. to label attention plots."""
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Subword ids of one sentence, without BOS/EOS; none for a blank one (SentencePiece would give
        the lone word-boundary piece, and an empty line would pass for a sentence)."""
        text = _valid_unicode(text)
        if not text.strip():
            return []
        if _PIECE_SPACE not in text:
            return self._sp.encode(" " + text)
        first, *rest = text.split(_PIECE_SPACE)
        ids = self._sp.encode(" " + first)
        for part in rest:
            ids += self._literal_piece_space + self._sp.encode(part)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many sentences, using SentencePiece's multithreaded batch encoder."""
        texts = [_valid_unicode(text) for text in texts]
        encoded = self._sp.encode([" " + text for text in texts])
        for i, text in enumerate(texts):
            if _PIECE_SPACE in text or not text.strip():
                encoded[i] = self.encode(text)
        return encoded

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a sequence of ids; PAD, BOS and EOS are skipped, so raw model output can be passed."""
        return self._decode_one(self._sp.decode(self._content_ids(ids)))

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        texts = self._sp.decode([self._content_ids(ids) for ids in batch])
        return [self._decode_one(text) for text in texts]

    def _content_ids(self, ids: Sequence[int]) -> list[int]:
        return [i for i in map(int, ids) if i not in self._skip_on_decode]

    @staticmethod
    def _decode_one(text: str) -> str:
        # Undo the leading space that encode adds in place of add_dummy_prefix.
        return text.removeprefix(" ")


def _valid_unicode(text: str) -> str:
    """Lone surrogates (from surrogateescape decoding, say) cannot reach SentencePiece: they become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def round_trip_mismatches(tokenizer: Tokenizer, texts: Sequence[str], chunk: int = 100_000) -> list[int]:
    """Indices of the texts that do not decode back to themselves, to warn about lossy tokenization;
    `chunk` texts at a time, so that a large corpus's ids are never all in memory at once."""
    bad = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        decoded = tokenizer.decode_batch(tokenizer.encode_batch(part))
        bad += [start + i for i, (text, back) in enumerate(zip(part, decoded, strict=True)) if text != back]
    return bad
