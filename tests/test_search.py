"""Decoding: greedy and beam search against each other, against full recomputation, and on a toy model."""

import copy
import dataclasses
import math

import pytest
import torch
from conftest import TINY

from transformer import Transformer
from transformer import search as search_module
from transformer.search import (
    BLOCK,
    Sampling,
    SearchConfig,
    _parent_slots,
    argmax,
    beam_search,
    beam_search_n_best,
    generate,
    greedy_search,
    sample,
    topk,
)
from transformer.translate import translate_ids

PAD, BOS, EOS = 0, 2, 3
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, src_vocab_size=40, tgt_vocab_size=40, max_len=128, tie_output=True)
    model = Transformer(config).eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses finish at different lengths
        model.out_proj.weight[EOS] += 0.4 * model.out_proj.weight.mean(0)
    return model


def sources() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (6, 9), generator=g)
    src[1, 5:] = PAD
    src[4, 2:] = PAD
    src[:, -1] = torch.where(src[:, -1] == PAD, PAD, EOS)
    return src


def test_beam_one_is_greedy(model: Transformer) -> None:
    greedy = greedy_search(model, sources(), config=SearchConfig(beam=1), max_len=128, **IDS)
    beam = beam_search(model, sources(), config=SearchConfig(beam=1), max_len=128, **IDS)
    assert greedy == beam
    assert len({len(h) for h in greedy}) > 1, "the test needs hypotheses of different lengths"


@pytest.mark.parametrize("beam", [1, 4])
def test_cached_equals_uncached(model: Transformer, beam: int) -> None:
    search = beam_search if beam > 1 else greedy_search
    cached = search(model, sources(), config=SearchConfig(beam=beam), max_len=128, **IDS)
    uncached = search(model, sources(), config=SearchConfig(beam=beam, use_cache=False), max_len=128, **IDS)
    assert cached == uncached


def dropped_sentences(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, for every time a search drops finished sentences, how many it goes on with."""
    kept: list[int] = []
    keep = search_module._Stepper.keep

    def spy(self, rows, sources, memory, src_mask):
        if rows.numel() < self.prefix.size(0):  # not beam search widening its first step's rows
            kept.append(sources.numel())
        keep(self, rows, sources, memory, src_mask)

    monkeypatch.setattr(search_module._Stepper, "keep", spy)
    return kept


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("beam", [1, 4])
def test_dropping_finished_sentences_changes_nothing(
    model: Transformer, beam: int, use_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search goes on without the sentences that have finished (all their hypotheses ended): every
    sentence's hypotheses, log-probabilities and scores come out as when all run to the end."""
    kept = dropped_sentences(monkeypatch)
    src = sources()
    config = SearchConfig(beam=beam, use_cache=use_cache, extra_len=12)
    dropping = beam_search_n_best(model, src, config=config, max_len=128, **IDS)
    assert kept and kept[-1] < src.size(0), "the test needs a search that drops sentences"
    keeping = beam_search_n_best(
        model, src, config=dataclasses.replace(config, drop_finished=False), max_len=128, **IDS
    )
    assert len(kept) == 1 or kept == sorted(kept, reverse=True)
    for a, b in zip(dropping, keeping, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-5)
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    if beam == 1:
        kept.clear()
        greedy = greedy_search(model, src, config=config, max_len=128, **IDS)
        assert kept, "greedy search should have dropped sentences too"
        assert greedy == [hyps[0].tokens for hyps in keeping]


def test_length_limit_is_source_plus_extra(model: Transformer) -> None:
    src = sources()
    out = greedy_search(model, src, config=SearchConfig(beam=1, extra_len=3), max_len=128, **IDS)
    limits = (src != PAD).sum(1) + 3
    # The limit counts the forced EOS, which is stripped from the output; an untrained model runs into it.
    assert all(len(h) <= int(limit) - 1 for h, limit in zip(out, limits, strict=True))
    assert any(len(h) == int(limit) - 1 for h, limit in zip(out, limits, strict=True))
    assert SearchConfig().extra_len == 50  # the paper's limit: source length + 50


class ToyModel:
    """A 'model' whose next-token distribution depends only on the last token. Greedy takes A1 (0.6), then
    A2, A3 and EOS (0.5): probability 0.3 over 4 tokens. Starting with B (0.4) and ending at once (0.9) is
    more probable, 0.36 over 2 tokens; only a length penalty makes the longer sequence win."""

    A1, A2, A3, B = 4, 5, 6, 7

    def __init__(self) -> None:
        table = torch.full((8, 8), 1e-9)
        table[BOS, self.A1], table[BOS, self.B] = 0.6, 0.4
        table[self.A1, self.A2] = table[self.A2, self.A3] = 1.0
        table[self.A3, EOS], table[self.A3, self.B] = 0.5, 0.5
        table[self.B, EOS], table[self.B, self.A1] = 0.9, 0.1
        table[EOS, EOS] = 1.0
        self.log_table = (table / table.sum(1, keepdim=True)).log()

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(src.size(0), 1, 1), torch.ones(src.size(0), 1, 1, 1, dtype=torch.bool)

    def beam_memory(self, memory, src_mask, k):
        return memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0)

    def decode(self, tgt, memory, src_mask, cache=None, *, project=True) -> torch.Tensor:
        return self.log_table[tgt[:, -1:]]  # (n, 1, vocab); its own features

    def out_proj(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def new_cache(self, max_len=None):
        return None


def toy_search(search, beam: int, alpha: float) -> list[int]:
    config = SearchConfig(beam=beam, length_penalty=alpha, use_cache=False)
    return search(ToyModel(), torch.full((1, 3), 9), config=config, max_len=50, **IDS)[0]


def test_beam_search_finds_what_greedy_misses() -> None:
    a1, a2, a3, b = ToyModel.A1, ToyModel.A2, ToyModel.A3, ToyModel.B
    assert toy_search(greedy_search, 1, 0.0) == [a1, a2, a3]  # probability 0.3
    assert toy_search(beam_search, 2, 0.0) == [b]  # probability 0.36


def test_no_search_picks_or_draws_padding_or_bos() -> None:
    """A translation cannot hold the search's own tokens, which the output would drop silently: no
    search takes them, even where the model makes them the most probable (as fairseq and Marian do for
    padding)."""
    toy = ToyModel()
    toy.log_table[:, [PAD, BOS]] = math.log(50.0)  # after every token: 50 against the others' 1
    a1, a2, a3, b = ToyModel.A1, ToyModel.A2, ToyModel.A3, ToyModel.B
    src, config = torch.full((300, 3), 9), SearchConfig(beam=1, use_cache=False)
    assert greedy_search(toy, src[:1], config=config, max_len=50, **IDS) == [[a1, a2, a3]]
    assert beam_search(toy, src[:1], config=dataclasses.replace(config, beam=2), max_len=50, **IDS) == [[b]]
    drawn = greedy_search(
        toy, src, config=dataclasses.replace(config, sampling=Sampling()), max_len=50, **IDS
    )
    # Every drawn step is one the table allows (probability 0.1 or more); a padding or BOS token drawn,
    # then dropped from the output, would leave a step from one of them to anything (1e-9 each).
    steps = [
        (prev, token) for tokens in drawn for prev, token in zip([BOS, *tokens], [*tokens, EOS], strict=True)
    ]
    assert min(ToyModel().log_table[prev, token].exp().item() for prev, token in steps) > 0.09
    assert {tuple(tokens) for tokens in drawn} >= {(a1, a2, a3), (b,)}  # drawn, not searched


def test_length_penalty_rewards_length() -> None:
    # score / ((5 + |Y|) / 6)^α with α = 1, |Y| counting EOS: [B] -0.876, [A1 A2 A3] -0.803, and
    # [A1 A2 A3 B] (0.6 · 0.5 · 0.9 = 0.27 over 5 tokens) -0.785, the best.
    a1, a2, a3, b = ToyModel.A1, ToyModel.A2, ToyModel.A3, ToyModel.B
    assert toy_search(beam_search, 2, 1.0) == [a1, a2, a3, b]
    normalised = [math.log(p) / ((5 + n) / 6) for p, n in ((0.36, 2), (0.3, 4), (0.27, 5))]
    assert normalised == sorted(normalised)


def test_n_best_lists_the_final_beam_with_its_probabilities() -> None:
    # α = 1 (see above): [A1 A2 A3 B] (0.27 over 5 tokens) beats [A1 A2 A3] (0.3 over 4 tokens).
    a1, a2, a3, b = ToyModel.A1, ToyModel.A2, ToyModel.A3, ToyModel.B
    config = SearchConfig(beam=2, length_penalty=1.0, use_cache=False)
    (n_best,) = beam_search_n_best(ToyModel(), torch.full((1, 3), 9), config=config, max_len=50, **IDS)
    assert [h.tokens for h in n_best] == [[a1, a2, a3, b], [a1, a2, a3]]
    assert [h.log_prob for h in n_best] == pytest.approx([math.log(0.27), math.log(0.3)], abs=1e-6)
    assert [h.score for h in n_best] == pytest.approx([math.log(0.27) / (10 / 6), math.log(0.3) / (9 / 6)])


def test_n_best_agrees_with_beam_search_and_teacher_forcing(model: Transformer) -> None:
    src = sources()
    config = SearchConfig(beam=4, extra_len=12)  # short enough to be quick, long enough for EOS to be chosen
    best = beam_search(model, src, config=config, max_len=128, **IDS)
    n_best = beam_search_n_best(model, src, config=config, max_len=128, **IDS)
    assert [hyps[0].tokens for hyps in n_best] == best
    limits = ((src != PAD).sum(1) + config.extra_len).tolist()
    natural = 0
    for row, hyps in enumerate(n_best):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:  # the log-probability the model gives the whole hypothesis, EOS included...
            tgt = torch.tensor([[BOS, *h.tokens, EOS]])
            with torch.no_grad():
                logits = model(src[row : row + 1], tgt[:, :-1])
            logits[..., [PAD, BOS]] = -math.inf  # ...among the tokens a translation may hold...
            log_probs = logits.log_softmax(-1)
            terms = log_probs[0].gather(1, tgt[0, 1:, None])[:, 0]
            forced = len(h.tokens) + 1 >= limits[row]  # ...unless the length limit forced EOS, at no cost
            natural += not forced
            assert h.log_prob == pytest.approx(float(terms[:-1].sum() if forced else terms.sum()), abs=1e-4)
    assert natural >= 2, "the test needs hypotheses that end by choosing EOS"


def test_bf16_weights_decode_like_fp32(model: Transformer) -> None:
    """`--precision bf16` casts the weights: the decoder's log-probabilities stay within bf16 rounding of
    fp32's, through the cache, and greedy search picks the same tokens almost everywhere (a broken cast,
    of the positional table or the cache say, would leave ~1/40 agreement)."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    src = sources()
    fp32 = greedy_search(model, src, config=SearchConfig(beam=1), max_len=128, **IDS)
    bf16 = greedy_search(low, src, config=SearchConfig(beam=1), max_len=128, **IDS)
    pairs = [(a, b) for x, y in zip(fp32, bf16, strict=True) for a, b in zip(x, y, strict=False)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs) and len(pairs) > 20
    tgt = torch.tensor([[BOS, *fp32[0][:8]]])
    with torch.inference_mode():
        exact = model.decode(tgt, *model.encode(src[:1])).log_softmax(-1)
        memory, src_mask = low.encode(src[:1])
        cache = low.new_cache()
        steps = []
        for t in range(tgt.size(1)):
            steps.append(low.decode(tgt[:, t : t + 1], memory, src_mask, cache).float().log_softmax(-1))
    assert memory.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(steps, dim=1), exact, atol=0.1, rtol=0.0)


@pytest.mark.parametrize("vocab", [BLOCK * 9, BLOCK * 9 + 17])
def test_blockwise_argmax_is_torch_argmax(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    scores = torch.randn(7, vocab, generator=g)
    scores[0, 5] = scores[0, vocab - 3] = 50.0  # a tie across blocks: the first index wins
    scores[1, BLOCK + 1] = scores[1, BLOCK + 2] = 50.0  # a tie within a block
    scores[2] = float("-inf")
    scores[2, vocab - 1] = 0.0  # the maximum in the padded last block
    scores[3] = -1.0  # all equal
    expected = scores.argmax(-1)
    assert torch.equal(argmax(scores), expected)
    assert expected[:4].tolist() == [5, BLOCK + 1, vocab - 1, 0]
    short = torch.randn(3, 40, generator=g)  # a vocabulary smaller than one block
    assert torch.equal(argmax(short), short.argmax(-1))


@pytest.mark.parametrize("vocab", [BLOCK * 9, BLOCK * 9 + 17])
@pytest.mark.parametrize("k", [1, 4])
def test_blockwise_topk_is_torch_topk(vocab: int, k: int) -> None:
    g = torch.Generator().manual_seed(vocab + k)
    scores = torch.randn(11, vocab, generator=g)
    scores[0, :k] = 10.0 + torch.arange(k)  # the k best all in one block
    scores[1, torch.arange(k) * BLOCK + 3] = 10.0 + torch.arange(k)  # one in each of k blocks
    scores[2, vocab - 1] = 20.0  # in the padded last block
    values, indices = topk(scores, k)
    expected_values, expected_indices = scores.topk(k)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)  # no ties among the random scores
    assert torch.equal(scores.gather(1, indices), values)


def test_parent_slots_keep_each_parents_first_child_in_place() -> None:
    # Beams 0 and 1 have children (0 two of them), 2 and 3 none: hypothesis 0 stays in beam 0, 2 (the
    # child of beam 1) goes to beam 1, and 0's second and third children, 1 and 3, to beams 2 and 3.
    assert _parent_slots(torch.tensor([[0, 0, 1, 0]])).tolist() == [[0, 2, 1, 3]]
    g = torch.Generator().manual_seed(6)
    parent = torch.randint(0, 5, (200, 5), generator=g)
    order = _parent_slots(parent)
    assert torch.equal(order.sort(1).values, torch.arange(5).expand(200, 5))  # a permutation per sentence
    placed = parent.gather(1, order)  # the parent of the hypothesis each beam now holds
    in_place = placed == torch.arange(5)
    distinct = torch.tensor([len(set(row)) for row in parent.tolist()])
    assert torch.equal(in_place.sum(1), distinct)  # one hypothesis stays in each beam that has children


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("beam", [1, 4])
def test_scoring_only_open_rows_changes_nothing(
    model: Transformer, beam: int, use_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output layer scores only the rows whose next token is not fixed (finished ones, those at their
    length limit): the same hypotheses, log-probabilities and scores as scoring every row."""
    config = SearchConfig(beam=beam, use_cache=use_cache, extra_len=12)
    search = lambda: beam_search_n_best(model, sources(), config=config, max_len=128, **IDS)  # noqa: E731
    everything = search()
    greedy_everything = greedy_search(model, sources(), config=config, max_len=128, **IDS)
    scored = []
    rows_to_score = search_module._rows_to_score

    def spy(constrained: torch.Tensor) -> torch.Tensor | None:
        scored.append(rows_to_score(constrained))
        return scored[-1]

    monkeypatch.setattr(search_module, "SCORE_ROWS", 1)  # no rounding up: the few open rows of a small batch
    monkeypatch.setattr(search_module, "_rows_to_score", spy)
    some = search()
    assert any(rows is not None and 0 < rows.numel() < 6 * beam for rows in scored), "the path must run"
    for a, b in zip(some, everything, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-5)
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    assert greedy_search(model, sources(), config=config, max_len=128, **IDS) == greedy_everything


# A row of four tokens with probabilities 0.5, 0.3, 0.15, 0.05, and what each sampling setting leaves of
# it, computed by hand: top-k keeps the k largest and renormalises; top-p keeps the most probable tokens
# until the mass before the next one reaches p (0.5 + 0.3 = 0.8 >= 0.75 stops after two); a temperature T
# raises the probabilities to 1/T.
FOUR = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (Sampling(), FOUR),
        (Sampling(top_k=3), [p / 0.95 for p in FOUR[:3]] + [0.0]),
        (Sampling(top_k=1), [1.0, 0.0, 0.0, 0.0]),
        (Sampling(top_p=0.75), [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (Sampling(top_p=0.8001), [p / 0.95 for p in FOUR[:3]] + [0.0]),
        (Sampling(top_p=0.4), [1.0, 0.0, 0.0, 0.0]),
        (Sampling(temperature=2.0), [math.sqrt(p) / sum(map(math.sqrt, FOUR)) for p in FOUR]),
        (Sampling(temperature=0.5, top_k=2), [0.25 / 0.34, 0.09 / 0.34, 0.0, 0.0]),
    ],
)
def test_sampling_draws_from_the_softmax_that_top_k_top_p_and_temperature_leave(
    sampling: Sampling, expected: list[float]
) -> None:
    rows = 40_000
    logits = torch.tensor(FOUR).log().expand(rows, 4)
    drawn = sample(
        logits, sampling, torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    frequencies = torch.bincount(drawn, minlength=4).double() / rows
    for frequency, p in zip(frequencies.tolist(), expected, strict=True):
        # 4.5 standard deviations of a binomial frequency: a wrong distribution is off by far more
        assert abs(frequency - p) <= 4.5 * math.sqrt(p * (1 - p) / rows) + 1e-12, (frequencies, expected)


def test_sampling_only_the_most_probable_token_is_greedy_search(model: Transformer) -> None:
    greedy = greedy_search(model, sources(), config=SearchConfig(beam=1), max_len=128, **IDS)
    for sampling in (Sampling(top_k=1, seed=5), Sampling(top_p=1e-6, temperature=3.0)):
        config = SearchConfig(beam=1, sampling=sampling)
        assert generate(model, sources(), config=config, max_len=128, **IDS) == greedy


def test_sampling_is_fixed_by_its_seed_and_varies_with_it(model: Transformer) -> None:
    def drawn(seed: int, **how) -> list[list[int]]:
        config = SearchConfig(beam=1, sampling=Sampling(temperature=2.0, seed=seed), **how)
        return greedy_search(model, sources(), config=config, max_len=128, **IDS)

    first = drawn(1)
    assert drawn(1) == first and drawn(2) != first
    assert drawn(1, use_cache=False) == first  # the same draws, whichever way the steps are computed
    greedy = greedy_search(model, sources(), config=SearchConfig(beam=1), max_len=128, **IDS)
    assert first != greedy
    with pytest.raises(ValueError, match="beam must be 1"):
        generate(model, sources(), config=SearchConfig(beam=4, sampling=Sampling()), max_len=128, **IDS)


def test_a_sentence_draws_the_same_whichever_rows_a_step_scores_drops_or_batches(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sentence inverts its own row of uniform numbers, a column a step: its draws do not depend on
    dropping finished sentences, on the CPU's scoring of unfinished rows only (a GPU scores them all), or
    on the other sentences of its batch."""
    config = SearchConfig(beam=1, sampling=Sampling(temperature=2.0, seed=3))
    first = greedy_search(model, sources(), config=config, max_len=128, **IDS)
    assert len({len(h) for h in first}) > 1, "the test needs sentences that finish at different steps"
    keeping = dataclasses.replace(config, drop_finished=False)
    assert greedy_search(model, sources(), config=keeping, max_len=128, **IDS) == first
    ids = [row[row != PAD][:-1].tolist() for row in sources()]
    one_batch = translate_ids(model, ids, config, max_tokens=10_000)
    assert translate_ids(model, ids, config, max_tokens=12) == one_batch  # a sentence or two a batch
    with monkeypatch.context() as patch:
        patch.setattr(search_module, "_rows_to_score", lambda constrained: None)  # as on a GPU
        assert greedy_search(model, sources(), config=config, max_len=128, **IDS) == first
        assert translate_ids(model, ids, config, max_tokens=12) == one_batch


def test_a_nucleus_is_found_among_the_top_candidates_or_by_sorting_the_row() -> None:
    """On the CPU each row's nucleus is looked for among its NUCLEUS_CANDIDATES most probable tokens and,
    where wider, in the whole sorted row: either way the tokens a numpy sort keeps."""
    g = torch.Generator().manual_seed(0)
    vocab = 4 * search_module.NUCLEUS_CANDIDATES
    flat = torch.rand(vocab, generator=g) * 0.01  # a nucleus of most of the row: sorted whole
    peaked = torch.randn(vocab, generator=g) * 4.0  # a nucleus of a few tokens: among the candidates
    scores = torch.stack([peaked, flat, peaked.flip(0), flat.flip(0)])
    for top_p in (0.3, 0.9):
        kept = search_module._nucleus(scores, top_p)
        probs = scores.double().softmax(-1).numpy()
        widths = []
        for row, p in enumerate(probs):
            order = (-p).argsort(kind="stable")
            before = p[order].cumsum() - p[order]
            nucleus = set(order[before < top_p].tolist())
            assert set(torch.isfinite(kept[row]).nonzero()[:, 0].tolist()) == nucleus, (row, top_p)
            assert torch.equal(kept[row][list(nucleus)], scores[row][list(nucleus)])
            widths.append(len(nucleus))
        assert min(widths) < search_module.NUCLEUS_CANDIDATES < max(widths), widths  # both ways taken


def test_a_token_of_probability_zero_is_never_drawn() -> None:
    """Zeros first, last and between, as top-k and top-p leave them; and uniform numbers at the top of
    their range, which inverting the cumulative sum must still map inside the row."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(20_000, 5)
    uniform = torch.rand(20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    drawn = search_module._draw(probs, uniform)
    counts = torch.bincount(drawn, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0 and abs(counts[1] / 20_000 - 0.25) < 0.015, counts
    highest = torch.full((3,), 1.0 - 2.0**-53, dtype=torch.float64)  # torch.rand's largest float64
    assert search_module._draw(probs[:3] * 0.999999, highest).tolist() == [3, 3, 3]
