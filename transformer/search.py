"""Decoding: greedy search, sampling and batched beam search, for every model family through one small
interface.

A model is decodable when it has `encode(src) -> (memory, src_mask)`, `beam_memory(memory, src_mask, k)`
(the memory for k consecutive hypotheses per source), `decode(tgt, memory, src_mask, cache) -> logits`
(with `project=False`, the features that its `out_proj` maps to logits; the search may change the logits
in place) and `new_cache(max_len)` returning an object with `reorder(index, sources=None)`. The memory is a
tensor or a tuple of tensors with the sources on the first dimension. The search keeps all state in
tensors and never reads a value back to the host inside the loop, except for a "how many have finished?"
check every few steps, which lets a batch stop early and drops the sentences that have finished. On the
CPU, where reading a value costs no wait for a device, a step also reads the count of rows whose next
token is not already fixed (`_rows_to_score`), top-p sampling which rows' nucleus lies among their most
probable tokens (`_nucleus`), and the cache which rows a beam reordering moves (`KVCache.reorder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

# Steps between the host syncs that count the finished sentences, on a GPU and on the CPU, where a read
# costs no wait and checking every other step measured faster (benchmarks/README.md).
CHECK_EVERY, CPU_CHECK_EVERY = 4, 2
# A search carries on without its finished sentences once they are at least this fraction of its batch.
# Every sentence runs until the longest one in its batch ends otherwise: in the batches `translate`
# makes of test2016 (de→en, the small model), 44 % of the decoder's row-steps were spent on finished ones.
DROP_FINISHED = 0.25
BLOCK = 64  # vocabulary entries per block in the two-stage argmax / top-k below
SCORE_ROWS = 32  # `_rows_to_score` rounds its count up to a multiple of this


class Decodable(Protocol):
    def encode(self, src: Tensor) -> tuple[Any, Tensor]: ...
    def beam_memory(self, memory: Any, src_mask: Tensor, k: int) -> tuple[Any, Tensor]: ...
    def decode(
        self, tgt: Tensor, memory: Any, src_mask: Tensor, cache: Any = None, *, project: bool = True
    ) -> Tensor: ...
    def out_proj(self, features: Tensor) -> Tensor: ...
    def new_cache(self, max_len: int | None = None) -> Any: ...


def search_name(beam: int) -> str:
    """What a search is called in reports and tables: "greedy", or "beam k"."""
    return "greedy" if beam == 1 else f"beam {beam}"


@dataclass(frozen=True)
class Sampling:
    """Draw each next token from the model's distribution rather than take the most probable one
    (fairseq's `--sampling`): translations that vary as the data does, which is what back-translation
    wants (Edunov et al., 2018: sampled back-translations trained better models than beam search's).

    `temperature` divides the logits (below 1 sharper, above 1 flatter). `top_k` keeps the k most
    probable tokens (0: all of them). `top_p` keeps the fewest most probable tokens whose probabilities
    reach p (nucleus sampling, Holtzman et al., 2020; 1: all). `seed` fixes the draws of one call."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class SearchConfig:
    beam: int = 4
    length_penalty: float = 0.6  # α of Wu et al. (2016), used by the paper: lp(Y) = ((5 + |Y|) / 6)^α
    extra_len: int = 50  # generate at most source length + extra_len tokens (the paper's limit)
    use_cache: bool = True  # False recomputes the whole prefix every step (a reference, and a benchmark)
    drop_finished: bool = True  # False runs finished sentences to the end: the same results (a reference)
    sampling: Sampling | None = None  # draw the tokens (beam 1 only) rather than take the most probable


class _Stepper:
    """Feeds one new token per hypothesis to the decoder, with the KV cache or by re-running the prefix."""

    def __init__(
        self,
        model: Decodable,
        memory: Any,
        src_mask: Tensor,
        bos: Tensor,
        steps: int,
        cached: bool,
        excluded: tuple[int, ...],
    ):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.cache = model.new_cache(steps) if cached else None  # BOS and the tokens of steps - 1 steps
        self.prefix = bos[:, None]  # (n, 1); with a cache only the newest token is fed
        self.excluded = torch.tensor(excluded, device=bos.device)

    def logits(self, rows: Tensor | None = None) -> Tensor:
        """(n, vocab), or (len(rows), vocab), with -inf for the `excluded` tokens: the search's PAD and BOS,
        which a model gives some probability to and a translation cannot hold (fairseq and Marian exclude
        padding too). The decoder runs on every row (each needs its state), the output layer, the larger
        part of a step, on `rows`."""
        tgt = self.prefix[:, -1:] if self.cache is not None else self.prefix
        if rows is None:
            logits = self.model.decode(tgt, self.memory, self.src_mask, self.cache)[:, -1]
        else:
            features = self.model.decode(tgt, self.memory, self.src_mask, self.cache, project=False)[:, -1]
            logits = self.model.out_proj(features.index_select(0, rows))
        return logits.index_fill_(-1, self.excluded, -math.inf)  # in place: each step's logits are new

    def push(self, tokens: Tensor, index: Tensor | None = None) -> None:
        """Append `tokens` (n,) to the hypotheses, after keeping rows `index` (beam reordering: each row's
        parent is one of the same sentence's beams)."""
        if index is not None:
            self.prefix = self.prefix.index_select(0, index)
            if self.cache is not None:
                self.cache.reorder(index)
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)

    def keep(self, rows: Tensor, sources: Tensor, memory: Any, src_mask: Tensor) -> None:
        """Go on with rows `rows` only, which belong to sources `sources`, whose memory is now `memory`."""
        self.memory, self.src_mask = memory, src_mask
        self.prefix = self.prefix.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows, sources)

    def widen(self, k: int, memory: Any, src_mask: Tensor) -> None:
        """Repeat each row k times (one per source so far, now a beam of k), whose memory is now `memory`."""
        sources = torch.arange(self.prefix.size(0), device=self.prefix.device)
        self.keep(sources.repeat_interleave(k), sources, memory, src_mask)


def _select(memory: Any, index: Tensor) -> Any:
    """Sources `index` of an encoder memory: a tensor or a tuple of tensors, sources first."""
    if isinstance(memory, Tensor):
        return memory.index_select(0, index)
    return type(memory)(_select(m, index) for m in memory)


def argmax(scores: Tensor) -> Tensor:
    """scores (rows, vocab) -> (rows,) index of each row's maximum, the first one on ties, as
    `scores.argmax(-1)` returns it.

    On CPU torch's argmax over a long row is a scalar loop with index bookkeeping, twenty times slower
    than a plain `amax` of the same scores and ~5 % of a small model's greedy step. So the scores are cut
    into blocks: the block holding the maximum is found from the blocks' maxima, then the index within
    that one block (a quarter of the time; benchmarks/README.md). Other devices use torch's kernel."""
    if scores.device.type != "cpu":
        return scores.argmax(-1)
    blocks = _blocks(scores)  # (rows, n_blocks, BLOCK)
    best = blocks.amax(-1).argmax(-1)  # (rows,) the first block holding the row's maximum
    within = blocks[torch.arange(scores.size(0), device=scores.device), best].argmax(-1)  # (rows,)
    return best * BLOCK + within


def sampling_stream(sampling: Sampling | None) -> torch.Generator | None:
    """The random stream that `sampling` draws from, seeded by it (None without sampling). It lives on the
    CPU whatever the model's device, so that a seed gives the same uniform numbers everywhere."""
    return None if sampling is None else torch.Generator().manual_seed(sampling.seed)


def draw_uniforms(stream: torch.Generator | None, sentences: int, steps: int) -> Tensor:
    """(sentences, steps) float64 uniform numbers in [0, 1) from `stream`: one per sentence and step, which
    `sample` turns into that step's token. Drawn before the search, a row a sentence, so that a sentence's
    tokens depend on its row and the seed alone: not on which rows a step scores (`_rows_to_score`, on the
    CPU only) or when finished sentences are dropped, as one number per scored row and step would."""
    return torch.rand((sentences, steps), dtype=torch.float64, generator=stream)


def sample(logits: Tensor, sampling: Sampling, uniform: Tensor) -> Tensor:
    """logits (rows, vocab), uniform (rows,) numbers in [0, 1) -> (rows,) a token drawn from each row's
    softmax(logits / temperature), restricted to its `top_k` most probable tokens and then to the nucleus
    of mass `top_p` of what is left, renormalised.

    The row's maximum is subtracted before dividing, and the temperature taken as at least float32's
    smallest normal number, so that a tiny temperature draws the most probable token, as its limit does,
    rather than an infinity over another (NaN)."""
    logits = logits.float()
    temperature = max(sampling.temperature, torch.finfo(torch.float32).tiny)
    scores = (logits - logits.amax(-1, keepdim=True)).div_(temperature)  # (rows, vocab)
    candidates = None  # (rows, n) the token each column of `scores` is, where not every token is one
    if 0 < sampling.top_k < scores.size(-1):
        scores, candidates = topk(scores, sampling.top_k)  # (rows, k), most probable first
    if sampling.top_p < 1:
        scores = _nucleus(scores, sampling.top_p)
    drawn = _draw(scores.softmax(-1), uniform)  # (rows,) a column of `scores`
    return drawn if candidates is None else candidates.gather(-1, drawn[:, None])[:, 0]


# The most probable tokens a row's nucleus is looked for among first, on the CPU: sorting 64 rows of 8,000
# scores took 15.1 ms, their top 256 2.4 ms (Zen 4). A row whose nucleus is wider is sorted whole.
NUCLEUS_CANDIDATES = 256


def _nucleus(scores: Tensor, top_p: float) -> Tensor:
    """scores (rows, n) -> the same with -inf but for each row's nucleus (Holtzman et al., 2020): its
    most probable tokens, each of which has less than `top_p` of the probability in the tokens ranked
    before it.

    On the CPU a row's nucleus is taken from its top NUCLEUS_CANDIDATES where it lies inside them, which
    their mass reaching top_p proves; the check reads values back, so other devices sort every row."""
    probs = scores.softmax(-1)
    kept = torch.full_like(scores, -math.inf)
    rows = torch.arange(scores.size(0), device=scores.device)  # the rows still to do
    if scores.device.type == "cpu" and scores.size(-1) > NUCLEUS_CANDIDATES:
        ranked, order = topk(probs, NUCLEUS_CANDIDATES)  # (rows, candidates)
        inside = ranked.sum(-1) >= top_p  # (rows,)
        _keep_nucleus(kept, scores, ranked[inside], order[inside], rows[inside], top_p)
        rows = rows[~inside]
    if rows.numel():
        ranked, order = probs[rows].sort(dim=-1, descending=True)
        _keep_nucleus(kept, scores, ranked, order, rows, top_p)
    return kept


def _keep_nucleus(
    kept: Tensor, scores: Tensor, ranked: Tensor, order: Tensor, rows: Tensor, top_p: float
) -> None:
    """Copy into `kept` the scores of rows `rows`' nuclei, given each row's probabilities `ranked`,
    largest first, and the columns `order` they are in."""
    before = ranked.cumsum(-1) - ranked  # the mass of the more probable tokens: 0 for the first, kept
    nucleus = scores[rows].gather(-1, order).masked_fill(before >= top_p, -math.inf)
    kept[rows] = kept[rows].scatter(-1, order, nucleus)


def _draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """probs (rows, n), uniform (rows,) -> (rows,) a column drawn from each row by inverting its cumulative
    sum at its uniform number: a token of probability 0 is never drawn. torch.multinomial and the
    exponential race (gpt-fast's) each took 10 ms a step for 64 rows of 8,000 on the CPU (one random
    number per entry), this 0.3 ms; none of them synchronises with the GPU but torch.multinomial."""
    cdf = probs.double().cumsum(-1)  # (rows, n); float64, so that rounding does not shift the steps
    total = cdf[:, -1:]  # (rows, 1)
    u = uniform.to(cdf.dtype)[:, None] * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # below the total, should u round up
    return torch.searchsorted(cdf, u, right=True)[:, 0]  # the first column whose step rises above u


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores (rows, vocab) -> the k largest scores of each row and their indices (rows, k), largest
    first, as `scores.topk(k)` returns them (which of several equal scores is taken may differ).

    Two stages, for the same reason as `argmax`: a row's k largest scores lie in at most k blocks, and
    those blocks are among the k with the largest maxima (a block outside them has k blocks above it, each
    holding a larger score), so the top k of those k blocks' scores are the top k of the row."""
    if scores.device.type != "cpu" or k * BLOCK >= scores.size(-1):
        return scores.topk(k, dim=-1)
    blocks = _blocks(scores)  # (rows, n_blocks, BLOCK)
    best_blocks = blocks.amax(-1).topk(k, dim=-1).indices  # (rows, k)
    candidates = blocks.gather(1, best_blocks[..., None].expand(-1, -1, BLOCK))  # (rows, k, BLOCK)
    values, position = candidates.flatten(1).topk(k, dim=-1)  # (rows, k), position in k·BLOCK
    block = best_blocks.gather(1, torch.div(position, BLOCK, rounding_mode="floor"))
    return values, block * BLOCK + position % BLOCK


def _blocks(scores: Tensor) -> Tensor:
    """(rows, vocab) -> (rows, ⌈vocab / BLOCK⌉, BLOCK), the end padded with -inf (a copy) if needed."""
    rows, vocab = scores.shape
    short = -vocab % BLOCK
    if short:
        scores = torch.nn.functional.pad(scores, (0, short), value=float("-inf"))
    return scores.reshape(rows, -1, BLOCK)


def _length_limits(src: Tensor, pad_id: int, extra_len: int, model_max_len: int) -> Tensor:
    return ((src != pad_id).sum(1) + extra_len).clamp(max=model_max_len - 1)  # (batch,)


@torch.inference_mode()
def greedy_search(
    model: Decodable,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    config: SearchConfig,
    max_len: int,
    uniforms: Tensor | None = None,
) -> list[list[int]]:
    """Pick the most probable token at every step, or with `config.sampling` draw it, inverting
    `uniforms` (batch, at least the steps), a row a sentence (`draw_uniforms`; default: from the stream
    `sampling.seed` seeds). Returns token ids without BOS and EOS."""
    memory, src_mask = model.encode(src)
    limits = _length_limits(src, pad_id, config.extra_len, max_len)
    steps = int(limits.max())
    batch = src.size(0)
    if config.sampling is not None:
        if uniforms is None:
            uniforms = draw_uniforms(sampling_stream(config.sampling), batch, steps)
        uniforms = uniforms.to(src.device)
    bos = src.new_full((batch,), bos_id)
    stepper = _Stepper(model, memory, src_mask, bos, steps, config.use_cache, (pad_id, bos_id))
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    sentence = torch.arange(batch, device=src.device)  # the sentence each row decodes
    output = src.new_full((batch, steps), pad_id)  # rows land here when they are dropped, or at the end
    check_every = _check_every(src.device)
    for t in range(steps):
        at_limit = t + 1 >= limits
        rows = _rows_to_score(finished | at_limit)
        logits = stepper.logits(rows)
        if config.sampling is None:
            picked = argmax(logits)
        else:  # each scored row draws with its sentence's number for this step
            scored = sentence if rows is None else sentence[rows]
            picked = sample(logits, config.sampling, uniforms[scored, t])
        (next_token,) = _in_place(rows, finished.numel(), picked)
        next_token = torch.where(at_limit, eos_id, next_token)  # the length limit forces EOS
        next_token = torch.where(finished, pad_id, next_token)
        finished |= next_token == eos_id
        stepper.push(next_token)
        if (t + 1) % check_every == 0:
            done = int(finished.sum())
            if done == finished.numel():
                break
            if config.drop_finished and done >= DROP_FINISHED * finished.numel():
                output[sentence[finished], : t + 1] = stepper.prefix[finished, 1:]  # final: set aside
                keep = (~finished).nonzero()[:, 0]  # the rows (= sources) that go on
                sentence, limits, finished = sentence[keep], limits[keep], finished[keep]
                memory, src_mask = _select(memory, keep), src_mask.index_select(0, keep)
                stepper.keep(keep, keep, memory, src_mask)
    output[sentence, : stepper.prefix.size(1) - 1] = stepper.prefix[:, 1:]
    return _strip(output, eos_id, pad_id)


@dataclass(frozen=True)
class Hypothesis:
    """One finished hypothesis of a beam: its tokens (without BOS and EOS), its log-probability (EOS
    included, but for an EOS that the length limit forced, which costs nothing, as a hypothesis cut at
    the limit does in Hugging Face's generate) and the score it was ranked by, log_prob / lp(length)."""

    tokens: list[int]
    log_prob: float
    score: float


@torch.inference_mode()
def beam_search(
    model: Decodable,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    config: SearchConfig,
    max_len: int,
) -> list[list[int]]:
    """Keep the `beam` best hypotheses per sentence, ranked by log-probability / lp(length); return the
    best one of each sentence."""
    hypotheses, scores, lengths = _beam(
        model, src, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, config=config, max_len=max_len
    )
    best = (scores / _penalty(lengths, config)).argmax(-1)  # (batch,)
    return _strip(hypotheses[torch.arange(src.size(0), device=src.device), best], eos_id, pad_id)


@torch.inference_mode()
def beam_search_n_best(
    model: Decodable,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    config: SearchConfig,
    max_len: int,
) -> list[list[Hypothesis]]:
    """The same search, returning every hypothesis the beam holds at the end, best first: the
    alternatives a person may want to see. Fewer than `beam` come back when the vocabulary could not fill
    the beam (the empty slots have score -inf)."""
    hypotheses, scores, lengths = _beam(
        model, src, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, config=config, max_len=max_len
    )
    normalised = scores / _penalty(lengths, config)
    order = normalised.argsort(dim=-1, descending=True)  # (batch, k)
    ranked = hypotheses.gather(1, order[..., None].expand_as(hypotheses))  # (batch, k, len), best first
    k = order.size(1)
    tokens = _strip(ranked.flatten(0, 1), eos_id, pad_id)  # read back once, not per hypothesis
    log_probs, ranked_by = scores.gather(1, order).tolist(), normalised.gather(1, order).tolist()
    return [
        [
            Hypothesis(tokens[row * k + j], log_probs[row][j], ranked_by[row][j])
            for j in range(k)
            if ranked_by[row][j] > -math.inf
        ]
        for row in range(order.size(0))
    ]


def _penalty(lengths: Tensor, config: SearchConfig) -> Tensor:
    """lp(Y) = ((5 + |Y|) / 6)^α of Wu et al. (2016), |Y| counting EOS."""
    return ((5.0 + lengths) / 6.0) ** config.length_penalty


def _beam(
    model: Decodable,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    config: SearchConfig,
    max_len: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The beam search itself: returns the kept hypotheses (batch, k, len), their log-probabilities
    (batch, k) and lengths (batch, k).

    All sentences' beams are one batch of batch·beam rows. A finished hypothesis stays in its beam with a
    frozen score (its only continuation is padding at no cost), so it competes with the live ones until a
    better one pushes it out; a sentence is finished when all its kept hypotheses are, and the search
    ends when every sentence is.
    """
    k = config.beam
    batch, device = src.size(0), src.device
    encoded, encoded_mask = model.encode(src)  # per source; `beam_memory` gives the hypotheses theirs
    limits = _length_limits(src, pad_id, config.extra_len, max_len)[:, None]  # (batch, 1)
    steps = int(limits.max())
    # A sentence's k hypotheses start as one and the same empty one: the first step decodes it on one row
    # per sentence, and `widen` then gives each sentence its k rows.
    memory, src_mask = model.beam_memory(encoded, encoded_mask, 1)
    bos = src.new_full((batch,), bos_id)
    stepper = _Stepper(model, memory, src_mask, bos, steps, config.use_cache, (pad_id, bos_id))
    sentence = torch.arange(batch, device=device)  # the sentence each beam decodes
    out_tokens = src.new_full((batch, k, steps), pad_id)  # beams land here when dropped, or at the end
    check_every = _check_every(device)
    out_scores = torch.zeros(batch, k, device=device)
    out_lengths = torch.zeros(batch, k, device=device)

    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start as the same empty hypothesis: keep only one of them alive
    lengths = torch.zeros(batch, k, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    row_offset = (torch.arange(batch, device=device) * k)[:, None]  # (batch, 1)

    # A finished hypothesis may only continue with padding, one at its length limit only with EOS, both
    # at no cost: such a row's candidates are that one token at log-probability 0 and nothing else.
    only_one = torch.full((k,), float("-inf"), device=device)
    only_one[0] = 0.0
    for t in range(steps):
        constrained = (finished | (t + 1 >= limits))[..., None]  # (sentences, k, 1)
        rows = _rows_to_score(constrained.view(-1)) if t > 0 else None
        log_probs = torch.log_softmax(stepper.logits(rows).float(), dim=-1)  # (rows scored, vocab)
        # The length penalty is the same for all candidates of one row, so a row's k best candidates
        # overall are among its k most probable tokens: rank those k·k instead of all k·vocab.
        width = min(k, log_probs.size(-1))
        top = _in_place(rows, constrained.numel(), *topk(log_probs, width))  # (batch·k | t=0: batch, width)
        if t == 0:  # from here on each sentence has k rows, the first of them alive (see `scores`)
            top = tuple(x.repeat_interleave(k, 0) for x in top)
            stepper.widen(k, *model.beam_memory(encoded, encoded_mask, k))
        top_log_probs, top_tokens = (x.view(-1, k, width) for x in top)
        top_log_probs = torch.where(constrained, only_one[:width], top_log_probs)
        top_tokens = torch.where(constrained, torch.where(finished, pad_id, eos_id)[..., None], top_tokens)

        candidates = scores[..., None] + top_log_probs  # (sentences, k, width)
        cand_lengths = lengths + (~finished).float()  # (sentences, k)
        ranked = (candidates / _penalty(cand_lengths, config)[..., None]).view(-1, k * width)
        _, flat = ranked.topk(k, dim=-1)  # (sentences, k), best first
        flat = flat.gather(1, _parent_slots(flat // width))  # each hypothesis in its parent's row if free
        parent, token = flat // width, top_tokens.view(-1, k * width).gather(1, flat)

        scores = candidates.view(-1, k * width).gather(1, flat)
        lengths = cand_lengths.gather(1, parent)
        finished = finished.gather(1, parent) | (token == eos_id)
        stepper.push(token.view(-1), (parent + row_offset).view(-1))
        if (t + 1) % check_every == 0:
            ended = finished.all(1)  # (sentences,)
            done = int(ended.sum())
            if done == ended.numel():
                break
            if config.drop_finished and done >= DROP_FINISHED * ended.numel():
                gone = sentence[ended]  # their beams are final: set them aside
                out_tokens[gone, :, : t + 1] = stepper.prefix.view(-1, k, t + 2)[ended, :, 1:]
                out_scores[gone], out_lengths[gone] = scores[ended], lengths[ended]
                keep = (~ended).nonzero()[:, 0]  # the sentences that go on, and their k rows each
                sentence, limits, scores = sentence[keep], limits[keep], scores[keep]
                lengths, finished = lengths[keep], finished[keep]
                row_offset = (torch.arange(keep.numel(), device=device) * k)[:, None]
                encoded, encoded_mask = _select(encoded, keep), encoded_mask.index_select(0, keep)
                memory, src_mask = model.beam_memory(encoded, encoded_mask, k)
                rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)
                stepper.keep(rows, keep, memory, src_mask)

    out_tokens[sentence, :, : stepper.prefix.size(1) - 1] = stepper.prefix[:, 1:].view(
        sentence.numel(), k, -1
    )
    out_scores[sentence], out_lengths[sentence] = scores, lengths
    return out_tokens, out_scores, out_lengths


def _check_every(device: torch.device) -> int:
    return CPU_CHECK_EVERY if device.type == "cpu" else CHECK_EVERY


def _rows_to_score(constrained: Tensor) -> Tensor | None:
    """constrained (rows,): True where the next token is fixed (padding after EOS, EOS at the length limit)
    -> the rows the output layer must score, or None for all of them.

    In the batches `translate` makes of test2016, 12 % (greedy) and 17 % (beam 4) of the row-steps were of
    finished rows, whose output layer scoring only the others saves (benchmarks/README.md). The count is
    rounded up to a multiple of SCORE_ROWS, so that kernels built per shape meet few shapes. Finding the
    rows reads a count back, so only on the CPU, where that costs no wait.
    """
    if constrained.device.type != "cpu":
        return None
    live = int((~constrained).sum())
    n = max(-(-live // SCORE_ROWS), 1) * SCORE_ROWS
    if n >= constrained.numel():
        return None
    return torch.argsort(constrained.to(torch.uint8), stable=True)[:n]  # the unconstrained ones first


def _in_place(rows: Tensor | None, n: int, *scored: Tensor) -> tuple[Tensor, ...]:
    """Results for rows `rows` of n (each tensor's first dimension) put back in their rows, zeros in the
    others (whose tokens the search fixes anyway)."""
    if rows is None:
        return scored
    return tuple(x.new_zeros(n, *x.shape[1:]).index_copy_(0, rows, x) for x in scored)


def _parent_slots(parent: Tensor) -> Tensor:
    """parent (sentences, k): the beam each new hypothesis (ranked best first) extends -> slot (sentences,
    k): the hypothesis each beam is to hold, beam s taking new hypothesis slot[s].

    Which beam holds which hypothesis does not matter to the search, but the beam is the row where the
    hypothesis's keys and values lie in the KV cache: one placed in another beam's row takes a copy of its
    parent's prefix (`KVCache.reorder`). So each parent's first child stays in its parent's beam, and the
    further children take the beams that no new hypothesis extends, in order. There are exactly as many of
    those as there are further children (k hypotheses; one first child per beam with children), so every
    one finds a beam: 18-26 % of the rows move per step, against 36-40 % in ranked order
    (benchmarks/README.md).
    """
    k = parent.size(1)
    beams = torch.arange(k, device=parent.device)
    same_parent = parent[:, :, None] == parent[:, None, :]  # (sentences, k, k)
    first = ~(same_parent & (beams[None, :] < beams[:, None])).any(-1)  # (sentences, k) its parent's first
    has_child = (parent[:, :, None] == beams).any(1)  # (sentences, k) beams that some hypothesis extends
    free = torch.argsort(has_child.to(torch.uint8), dim=1, stable=True)  # the childless beams first
    further = ((~first).cumsum(1) - 1).clamp(min=0)  # the i-th further child takes the i-th free beam
    # (meaningless where `first`, which the where below leaves out)
    destination = torch.where(first, parent, free.gather(1, further))  # (sentences, k), a permutation
    return torch.empty_like(destination).scatter_(1, destination, beams.expand_as(destination))


def _strip(tokens: Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    """(batch, len) -> lists of ids up to (not including) the first EOS."""
    out = []
    for row in tokens.tolist():
        ids = row[: row.index(eos_id)] if eos_id in row else row
        out.append([i for i in ids if i != pad_id])
    return out


def generate(
    model: Decodable,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    config: SearchConfig,
    max_len: int,
    uniforms: Tensor | None = None,
) -> list[list[int]]:
    """Beam search, or greedy when beam == 1 (which beam search would also reduce to, more slowly), or
    sampling (`config.sampling`, with beam 1, inverting `uniforms`: `greedy_search`)."""
    how = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "config": config, "max_len": max_len}
    if config.sampling is not None:
        if config.beam != 1:
            raise ValueError(f"sampling draws one hypothesis per source: beam must be 1, not {config.beam}")
        return greedy_search(model, src, **how, uniforms=uniforms)
    return (greedy_search if config.beam == 1 else beam_search)(model, src, **how)
