"""From text to text: tokenise, batch by length, search, detokenise — and the `Translator` API."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from transformer.checkpoint import checkpoint_path, load_weights
from transformer.config import (
    MAX_BEAM,
    ModelConfig,
    TrainConfig,
    check_sampling,
    check_search,
    config_from_dict,
    model_config_class,
)
from transformer.data.batching import collate, token_batches
from transformer.data.dataset import ENCODE_CHUNK, TokenSequences
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.errors import TransformerError
from transformer.model import Transformer, build_model
from transformer.model.ensemble import Ensemble
from transformer.packing import pack_linears
from transformer.precision import decoding_cache_dtype, weight_dtype
from transformer.rundir import reachable_data_dir, read_run_record
from transformer.search import (
    Hypothesis,
    Sampling,
    SearchConfig,
    beam_search_n_best,
    draw_uniforms,
    generate,
    sampling_stream,
)

MAX_TOKENS = 6000  # padded source tokens (EOS included) × beam: what a batch of translations may hold
# Sentences `transformer translate` translates and writes at a time (OpenNMT-py's shard size): a long
# input's translations come out as they are made. Smaller blocks sort fewer sentences by length and end in
# more part-filled batches: on Zen 4, greedy, runs/zen4-s34, 29,000 lines took the same time in blocks of
# 10,000 as in one (59.9 against 61.3 s, two rounds each), 10,000 lines 1.10x as long in blocks of 2,000.
BLOCK_SENTENCES = 10_000


def ready_for_decoding(
    model: nn.Module,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    pack: bool = True,
) -> nn.Module:
    """`model` (changed in place) as `Translator` decodes with it: its weights in `dtype` on `device`,
    packed for the CPU's GEMM kernels (elsewhere `pack_linears` leaves nn.Linear as it is), and for a
    Transformer the KV cache's dtype that suits those weights (`decoding_cache_dtype`). One place for
    these choices, so that benchmarks/decode.py times what `transformer translate` runs; `pack=False`
    keeps nn.Linear (decode.py's `unpacked` rows)."""
    model = model.to(device=device, dtype=dtype)
    if pack:
        pack_linears(model)
    if isinstance(model, Transformer):
        model.cache_dtype = decoding_cache_dtype(dtype, torch.device(device).type)
    return model


def translate_ids(
    model: nn.Module,
    sources: Sequence[list[int]],
    search: SearchConfig,
    *,
    max_tokens: int = MAX_TOKENS,
    device: torch.device | str = "cpu",
    stream: torch.Generator | None = None,
) -> list[list[int]]:
    """Translate token-id sequences (without EOS), batched by length to waste little on padding; the
    results come back in input order. Empty sources give empty translations without running the model.
    With `search.sampling`, the i-th source draws with the i-th row of numbers from `stream` (else from a
    stream seeded by the search): what it is translated to does not depend on the batch it lands in."""
    results: list[list[int]] = [[] for _ in sources]
    uniforms = None
    if search.sampling is not None:
        stream = stream or sampling_stream(search.sampling)
        uniforms = draw_uniforms(stream, len(sources), model.config.max_len)  # (sources, steps at most)
    for chunk, src in source_batches(sources, search.beam, max_tokens):
        outputs = generate(
            model,
            src.to(device),
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            config=search,
            max_len=model.config.max_len,
            uniforms=None if uniforms is None else uniforms[chunk],
        )
        for i, out in zip(chunk, outputs, strict=True):
            results[i] = out
    return results


def n_best(
    model: nn.Module,
    sources: Sequence[list[int]],
    search: SearchConfig,
    *,
    max_tokens: int = MAX_TOKENS,
    device: torch.device | str = "cpu",
) -> list[list[Hypothesis]]:
    """Every hypothesis of each source's beam, best first (`beam_search_n_best` with the project's special
    tokens and the model's length limit), batched as `translate_ids` batches; [] for an empty source."""
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for chunk, src in source_batches(sources, search.beam, max_tokens):
        how = {"bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID, "max_len": model.config.max_len}
        beams = beam_search_n_best(model, src.to(device), config=search, **how)
        for i, hypotheses in zip(chunk, beams, strict=True):
            results[i] = hypotheses
    return results


def source_batches(
    sources: Sequence[list[int]], beam: int, max_tokens: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The non-empty sources in batches of similar length: (their indices, ids + EOS right-padded).
    Beam search turns each sentence into `beam` rows, so the budget of padded source tokens is divided
    by the beam."""
    present = [i for i in range(len(sources)) if sources[i]]
    budget = max(max_tokens // max(beam, 1), 1)
    for batch in token_batches([len(sources[i]) for i in present], [0] * len(present), budget, shuffle=False):
        chunk = [present[j] for j in batch]
        yield chunk, collate([(sources[i], []) for i in chunk]).src


class Translator:
    """A trained model with its tokenizer: `Translator.from_checkpoint(run_dir).translate(["…"], beam=4)`."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_config: TrainConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.train_config = train_config or TrainConfig()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, name: str = "best", device: str = "cpu", precision: str = "fp32"
    ) -> Translator:
        """Load a run directory (its `best` weights unless `name` says otherwise) or a .safetensors file
        whose directory holds config.json and tokenizer.model.

        `precision` is what the weights are cast to for decoding: fp32 (exact), bf16 (on CPUs with
        AVX-512 BF16 or AMX and recent GPUs, decoding's small matmuls run several times faster; the
        scores are ranked in fp32, see `transformer.search`), fp16 (CUDA only), or auto (bf16 where the
        hardware multiplies it natively, else fp32)."""
        weights_file, model_config, train_config, tokenizer = read_checkpoint(path, name)
        model = build_model(model_config)
        load_weights_into(model, weights_file)
        dtype = weight_dtype(precision, torch.device(device).type)
        return cls(ready_for_decoding(model, device, dtype), tokenizer, train_config)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | Path], name: str = "best", device: str = "cpu", precision: str = "fp32"
    ) -> Translator:
        """One checkpoint as `from_checkpoint` loads it; several as an ensemble (`model.ensemble`), which
        needs one tokenizer and one language pair for all. The ensemble searches with the first run's
        settings (beam, length penalty, data)."""
        translators = [cls.from_checkpoint(path, name, device, precision) for path in paths]
        first = translators[0]
        if len(translators) == 1:
            return first
        pair = (first.train_config.src_lang, first.train_config.tgt_lang)
        for path, other in zip(paths[1:], translators[1:], strict=True):
            if other.tokenizer.sha256() != first.tokenizer.sha256():
                raise TransformerError(f"{path} has another tokenizer than {paths[0]}: an ensemble needs one")
            if (theirs := (other.train_config.src_lang, other.train_config.tgt_lang)) != pair:
                both = f"{path} translates {'→'.join(theirs)}, {paths[0]} {'→'.join(pair)}"
                raise TransformerError(f"{both}: an ensemble needs one language pair")
        return cls(Ensemble([t.model for t in translators]), first.tokenizer, first.train_config)

    def translate(
        self,
        sentences: Sequence[str],
        beam: int | None = None,
        length_penalty: float | None = None,
        *,
        strict: bool = False,
        sampling: Sampling | None = None,
    ) -> list[str]:
        """One translation per sentence, in order; empty or blank sentences give empty strings. With
        `sampling`, each translation is drawn from the model's distribution (beam must be None or 1).

        A sentence longer than the model's maximum is truncated with a warning on stderr, or refused
        with `strict`.
        """
        how = {"strict": strict, "block": len(sentences), "sampling": sampling}
        blocks = self.translate_blocks(sentences, beam, length_penalty, **how)
        return [text for block in blocks for text in block]

    def translate_blocks(
        self,
        sentences: Sequence[str],
        beam: int | None = None,
        length_penalty: float | None = None,
        *,
        strict: bool = False,
        block: int = BLOCK_SENTENCES,
        first: int = 1,
        sampling: Sampling | None = None,
        stream: torch.Generator | None = None,
    ) -> Iterator[list[str]]:
        """`translate`'s translations, `block` sentences at a time, so that a long input's can be written
        as they are made (as fairseq-interactive's buffer and OpenNMT-py's shards are). Every sentence is
        tokenised and checked first: one that `strict` refuses stops the generator before any
        translation. `first` is the first sentence's number in warnings and errors. Sampling draws from
        one stream, seeded once per call (the same sentences in the same blocks get the same draws), or
        from `stream` (`search.sampling_stream`), which goes on from where the last call left it."""
        search = self._search(beam, length_penalty, sampling)
        device = self._device()
        stream = stream or sampling_stream(sampling)
        for part in self._source_blocks(sentences, strict, first, block):
            ids = translate_ids(self.model, part, search, device=device, stream=stream)
            yield self.tokenizer.decode_batch(ids)

    def translate_n_best(
        self,
        sentences: Sequence[str],
        n: int,
        beam: int | None = None,
        length_penalty: float | None = None,
        *,
        strict: bool = False,
    ) -> list[list[tuple[str, float]]]:
        """The `n` best translations of each sentence, best first, with the score beam search ranks them
        by (log-probability / lp(length)). A beam holds `beam` hypotheses, so it must be at least `n`
        (default: the larger of the run's beam and `n`); fewer than `n` come back where the beam could not
        be filled. An empty or blank sentence gives [("", 0.0)]."""
        blocks = self.n_best_blocks(sentences, n, beam, length_penalty, strict=strict, block=len(sentences))
        return [best for block in blocks for best in block]

    def n_best_blocks(
        self,
        sentences: Sequence[str],
        n: int,
        beam: int | None = None,
        length_penalty: float | None = None,
        *,
        strict: bool = False,
        block: int = BLOCK_SENTENCES,
        first: int = 1,
    ) -> Iterator[list[list[tuple[str, float]]]]:
        """`translate_n_best`'s lists, `block` sentences at a time (see `translate_blocks`)."""
        if not 1 <= n <= MAX_BEAM:  # n past the largest beam would be refused as a beam no one asked for
            raise TransformerError(
                f"the number of translations per sentence must be 1 to {MAX_BEAM}, got {n}"
            )
        search = self._search(max(self.train_config.beam, n) if beam is None else beam, length_penalty)
        if search.beam < n:
            raise TransformerError(
                f"the {n} best translations need a beam of at least {n}, not {search.beam}"
            )
        for part in self._source_blocks(sentences, strict, first, block):
            results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in part]
            for i, hypotheses in enumerate(n_best(self.model, part, search, device=self._device())):
                if hypotheses:  # else an empty source
                    best = hypotheses[:n]
                    texts = self.tokenizer.decode_batch([h.tokens for h in best])
                    results[i] = [(text, h.score) for text, h in zip(texts, best, strict=True)]
            yield results

    def _source_blocks(
        self, sentences: Sequence[str], strict: bool, first: int, block: int
    ) -> Iterator[list[list[int]]]:
        """The sentences' token ids, `block` sentences at a time; all are encoded and checked at the call,
        so that `strict` refuses before any translation is made."""
        sources, block = self._encode(sentences, strict, first), max(block, 1)
        return (sources[start : start + block] for start in range(0, len(sources), block))

    def _search(
        self, beam: int | None, length_penalty: float | None, sampling: Sampling | None = None
    ) -> SearchConfig:
        """The search asked for, the run's beam size and length penalty where not given; sampling draws
        one hypothesis per sentence, so its beam is 1, and ranks none, so a length penalty would be
        ignored: it is refused instead."""
        tc = self.train_config
        if sampling is not None:
            if beam not in (None, 1):
                raise TransformerError(
                    f"sampling draws one translation per sentence: the beam must be 1, not {beam}"
                )
            if length_penalty is not None:
                raise TransformerError("sampling ranks no translations: it takes no length penalty")
            check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
            beam = 1
        beam = tc.beam if beam is None else beam
        length_penalty = tc.length_penalty if length_penalty is None else length_penalty
        check_search(beam, length_penalty)
        return SearchConfig(beam=beam, length_penalty=length_penalty, sampling=sampling)

    @property
    def max_source_len(self) -> int:
        """Tokens a source sentence may have: the model's maximum, less room for EOS."""
        return self.model.config.max_len - 1

    def _encode(self, sentences: Sequence[str], strict: bool, first: int = 1) -> TokenSequences:
        """Token ids per sentence ([] for a blank one), cut to the model's maximum with a warning on
        stderr, or refused with `strict`; the sentences are numbered from `first` in both. Held 4 bytes a
        token and made `ENCODE_CHUNK` sentences at a time: as lists of ints a million-line input's ids
        took 1.4 GB, on top of its text."""
        sources, limit = TokenSequences(), self.max_source_len
        for start in range(0, len(sentences), ENCODE_CHUNK):
            chunk = source_ids(self.tokenizer, sentences[start : start + ENCODE_CHUNK])
            for n, ids in enumerate(chunk, first + start):
                if len(ids) <= limit:
                    continue
                if strict:
                    raise TransformerError(
                        f"sentence {n} has {len(ids)} tokens, more than the model's maximum of {limit}; "
                        f"--strict refuses it: split the sentence"
                    )
                print(f"warning: sentence {n} has {len(ids)} tokens; truncated to {limit}", file=sys.stderr)
                chunk[n - first - start] = ids[:limit]
            sources.extend(chunk)
        return sources

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


# Characters that show nothing and say nothing in a sentence to translate: a byte-order mark (where files
# were joined, `cat a b`), a zero-width space, NUL. SentencePiece gives them pieces, which the model then
# translated: "\ufeffEin Mann." came out "Plawcaving man.", a line of one BOM as a sentence of nonsense.
_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\x00"))


def source_ids(tokenizer: Tokenizer, sentences: Sequence[str]) -> list[list[int]]:
    """Token ids per sentence, stripped, without `_INVISIBLE` characters; [] for a blank one, which every
    search answers with an empty translation. Callers decide what a sentence longer than the model takes
    means."""
    return tokenizer.encode_batch([sentence.translate(_INVISIBLE).strip() for sentence in sentences])


def load_run_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    """Read the configs a training run wrote to run_dir/config.json, its data directory as reachable from
    here (`reachable_data_dir`)."""
    saved = read_run_record(run_dir)
    path = run_dir / "config.json"
    model_class = model_config_class(saved["train"].get("model", "transformer"))
    train = {**saved["train"], "data_dir": reachable_data_dir(saved)}
    return (
        config_from_dict(model_class, saved["model"], source=str(path)),
        config_from_dict(TrainConfig, train, source=str(path)),
    )


def read_checkpoint(path: str | Path, name: str = "best") -> tuple[Path, ModelConfig, TrainConfig, Tokenizer]:
    """A run directory's `name` checkpoint, or the .safetensors file `path`, with what its weights need
    from the run directory they lie in: its configs and its tokenizer, checked against its record."""
    weights_file = checkpoint_path(Path(path), name)
    run_dir = weights_file.parent
    model_config, train_config = load_run_config(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    check_tokenizer(run_dir, tokenizer)
    return weights_file, model_config, train_config, tokenizer


def load_weights_into(model: nn.Module, weights_file: Path) -> None:
    """Load a checkpoint's weights into `model`, built from the config.json beside it: all of them, of
    the model's shapes, or one line saying which do not fit."""
    try:
        model.load_state_dict(load_weights(weights_file), strict=True)
    except RuntimeError as error:
        why = str(error).strip().splitlines()[-1].strip()
        config = weights_file.parent / "config.json"
        raise TransformerError(f"{weights_file} does not fit the model in {config}: {why}") from None


def check_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    """A tokenizer.model swapped under a run would turn every translation into quiet nonsense: refuse it."""
    expected = read_run_record(run_dir).get("tokenizer_sha256")
    if expected and expected != tokenizer.sha256():
        raise TransformerError(
            f"{run_dir / 'tokenizer.model'} is not the tokenizer this run was trained with (its sha256 "
            f"differs from config.json's): restore the run's own tokenizer.model"
        )
