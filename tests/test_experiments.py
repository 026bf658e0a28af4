"""The experiments behind `transformer report`: each one's key claim, measured at tiny size, and the
report command itself."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_recipe
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transformer.cli import main
from transformer.config import TransformerConfig
from transformer.data.tokenizer import Tokenizer
from transformer.experiments import (
    alignment,
    cost,
    heads,
    masking,
    paths,
    positional,
    projections,
    scaling,
    warmup,
)
from transformer.experiments.common import (
    Context,
    Table,
    TrainedModel,
    difference,
    mean_sd,
    small_transformer,
)
from transformer.experiments.common import test_sentences as bundled_test_sentences  # not a test
from transformer.experiments.training import remove_causal_mask, remove_scaling, task_for
from transformer.model import MultiHeadAttention, Transformer
from transformer.model.transformer import sinusoidal_table
from transformer.report import Section, render_markdown
from transformer.train import train


@pytest.mark.parametrize(("n", "d"), [(12, 16), (40, 8)])
def test_flop_counts_match_torch_flop_counter(n: int, d: int) -> None:
    x = torch.randn(1, n, d)
    for module, expected in (
        (MultiHeadAttention(d, 4, fused=False), cost.attention_flops(n, d)),
        (nn.GRU(d, d, batch_first=True), cost.recurrent_flops(n, d)),
    ):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        assert counter.get_total_flops() == expected
    assert cost.attention_flops(d, d) == cost.recurrent_flops(d, d)  # the predicted crossover is n = d


def test_crossover_interpolates_in_log_space() -> None:
    assert cost.crossover([10, 100], [1.0, 4.0], [2.0, 2.0]) == pytest.approx(10**1.5)
    assert cost.crossover([10, 100], [1.0, 1.0], [2.0, 2.0]) is None


def test_explicit_attention_memory_grows_with_the_square_of_n() -> None:
    d = 32
    explicit, fused = MultiHeadAttention(d, 8, fused=False).eval(), MultiHeadAttention(d, 8).eval()
    peaks = {}
    for n in (256, 512):
        x = torch.randn(1, n, d)
        with torch.no_grad():
            peaks[n] = (cost.peak_memory(lambda x=x: explicit(x)), cost.peak_memory(lambda x=x: fused(x)))
    weights = 8 * 512 * 512 * 4  # the (heads, n, n) float32 weights at n = 512
    assert peaks[512][0] >= weights
    assert peaks[512][1] < weights / 4
    assert 3.5 < peaks[512][0] / peaks[256][0] < 4.5


def test_memory_slope_is_fitted_over_the_larger_n_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding named the whole grid (n = 16…256) while the slope was fitted over its larger half, and
    over other n for the explicit path, which stops short of the largest."""
    ns = [16, 32, 64, 128, 256]
    assert cost._log_slope([(16, 1), (32, 10**6), *((n, n * n) for n in ns[2:])]) == pytest.approx(2.0)
    assert [len(cost._fitted(ns[:k])) for k in (2, 3, 4, 5)] == [2, 2, 3, 3]
    sizes = {
        **cost.SIZES["tiny"],
        "n": [16],
        "d": [32],
        "memory_d": 32,
        "memory_n": ns,
        "explicit_max_n": 128,
    }
    monkeypatch.setitem(cost.SIZES, "tiny", sizes)
    result = cost.run("tiny", tmp_path, Context())
    assert result.findings[1].endswith(
        "(log–log slope over n = 64…256 for attention (fused) and GRU; n = 32…128 for attention (explicit))."
    )
    assert result.numbers["memory_exponent_n"]["attention (explicit)"] == "32…128"


def test_recurrent_chain_grows_with_n_and_attention_chain_does_not() -> None:
    d = 8
    gru, attention = nn.GRU(d, d, batch_first=True), MultiHeadAttention(d, 2)
    depth = {
        n: (
            paths.dependent_ops(gru, torch.randn(1, n, d))[0],
            paths.dependent_ops(attention, torch.randn(1, n, d))[0],
        )
        for n in (4, 8, 16)
    }
    assert depth[16][0] - depth[8][0] == 2 * (depth[8][0] - depth[4][0]) > 0  # linear in n
    assert depth[4][1] == depth[8][1] == depth[16][1] < depth[4][0]


def test_recall_batch_puts_the_key_l_steps_from_both_ends() -> None:
    src, tgt_in, tgt_out = paths.recall_batch(6, 5, torch.Generator().manual_seed(0))
    assert src.shape == (6, 11) and tgt_in.shape == tgt_out.shape == (6, 1)
    is_key = src >= paths.FIRST_KEY
    assert is_key.sum(1).tolist() == [1] * 6 and is_key[:, 5].all()
    assert torch.equal(tgt_out[:, 0], src[:, 5])


def test_unscaled_dot_products_have_variance_d_k() -> None:
    generator = torch.Generator().manual_seed(0)
    for d_k in (16, 64, 256):
        assert abs(scaling.dot_product_variance(d_k, 4000, generator) / d_k - 1) < 0.1
    raw = scaling.softmax_statistics(256, 32, False, generator)
    scaled = scaling.softmax_statistics(256, 32, True, generator)
    assert raw["max_weight"] > 0.8 > 0.3 > scaled["max_weight"]
    assert raw["entropy"] < 0.5 * scaled["entropy"]


def test_scalar_readout_gradient_is_flat_in_d_k_only_when_scaled() -> None:
    """With one scalar per key the gradient measures the softmax alone: the scaled logits keep it at the
    d_k=4 size whatever d_k is, the unscaled ones saturate and lose it."""
    generator = torch.Generator().manual_seed(0)
    scaled = {d: scaling.softmax_statistics(d, 32, True, generator)["grad_norm"] for d in (4, 16, 64, 256)}
    unscaled = scaling.softmax_statistics(256, 32, False, generator)["grad_norm"]
    for d_k, value in scaled.items():
        assert scaled[4] / 2 < value < 2 * scaled[4], d_k
    assert unscaled < scaled[256] / 2


def test_remove_scaling_gives_softmax_of_raw_dot_products() -> None:
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2)
    x = torch.randn(1, 5, 16)
    q = module.w_q(x).view(1, 5, 2, 8).transpose(1, 2)
    k = module.w_k(x).view(1, 5, 2, 8).transpose(1, 2)
    remove_scaling(module)
    _, weights = module(x, need_weights=True)
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(-2, -1), dim=-1))


def test_diagonal_dominates_without_projections() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16, 64)
    without = projections.diagonal_mass(projections.identity_attention(x))
    with_projections = projections.diagonal_mass(
        projections.projected_attention(projections.random_projections(64, 4), x)
    )
    assert without > 0.9
    assert with_projections < 3 / 16  # near uniform (1/16)


def test_uniform_baseline_is_averaged_per_token_as_the_diagonal_mass_is() -> None:
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    uniform = mask[:, None, None, :].float().expand(2, 3, 6, 6) / mask.sum(1)[:, None, None, None]
    assert projections.uniform_mass(mask) == pytest.approx(projections.diagonal_mass(uniform, mask))
    assert projections.uniform_mass(mask) == pytest.approx(2 / 8)  # not (1/2 + 1/6) / 2


def test_identity_baseline_splits_into_the_same_heads() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16, 64)
    per_head = projections.identity_attention(x, heads=4)
    slices = x.view(8, 16, 4, 16).transpose(1, 2)
    torch.testing.assert_close(per_head, torch.softmax(slices @ slices.transpose(-2, -1) / 4.0, dim=-1))
    torch.testing.assert_close(
        projections.identity_attention(x)[:, 0], torch.softmax(x @ x.transpose(-2, -1) / 8.0, dim=-1)
    )
    # self-score ≈ √d_k per head instead of √d: the diagonal still dominates, but less
    one_head, four_heads = (
        projections.diagonal_mass(w) for w in (projections.identity_attention(x), per_head)
    )
    assert 3 / 16 < four_heads < one_head - 0.1


def test_encoder_is_permutation_equivariant_only_without_positions() -> None:
    torch.manual_seed(0)
    src = torch.randint(4, 50, (2, 9))
    permutation = torch.randperm(9)
    errors = {}
    for kind in ("none", "sinusoidal"):
        model = Transformer(TransformerConfig(**{**TINY.__dict__, "positional": kind})).eval()
        errors[kind] = positional.permutation_error(model, src, permutation)
    assert errors["none"] < 1e-5
    assert errors["sinusoidal"] > 1e-2


def test_shuffled_sources_cannot_change_a_translator_without_positions() -> None:
    """The direct test of a bag-of-words encoder: the no-PE model translates shuffled sources exactly as
    the originals (same strings, same BLEU); the same model with positions does not."""
    task = task_for(Context(), "tiny")
    shuffled = positional.shuffled_sources(task)
    assert shuffled.test.src != task.test.src
    assert [sorted(s) for s in shuffled.test.src] == [sorted(s) for s in task.test.src]
    model = {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_encoder_layers": 1, "n_decoder_layers": 1}
    scores = {}
    for kind in ("none", "sinusoidal"):
        torch.manual_seed(0)
        config = small_transformer(task, model, positional=kind, dropout=0.0)
        trained = as_trained(Transformer(config).eval())
        scores[kind] = positional.order_test(trained, task, shuffled)
    assert scores["none"]["unchanged"] == 1.0
    assert scores["none"]["shuffled_bleu"] == scores["none"]["bleu"]
    assert scores["sinusoidal"]["unchanged"] < 1.0


def as_trained(model: nn.Module) -> TrainedModel:
    """A model wrapped as a training result (no training needed for what is tested on it)."""
    return TrainedModel(model, [(0, math.nan)], 0.0, False)


def test_sinusoidal_similarity_depends_on_offset_only() -> None:
    similarity = positional.offset_similarity(sinusoidal_table(64, 32), [0, 10, 30], 20)
    for start in (10, 30):
        assert similarity[start] == pytest.approx(similarity[0], abs=1e-4)
    assert similarity[0][0] == pytest.approx(16.0)  # sin² + cos² over d_model/2 pairs


def test_js_divergence_and_head_diversity() -> None:
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(heads.js_divergence(p, q)) == pytest.approx(math.log(2))
    assert float(heads.js_divergence(p, p)) == 0.0
    same = torch.softmax(torch.randn(2, 1, 5, 5), -1).expand(2, 3, 5, 5)
    assert heads.head_diversity(same, torch.ones(2, 5, dtype=torch.bool)) == pytest.approx(0.0, abs=1e-7)


def test_masked_future_weights_are_exactly_zero() -> None:
    check = masking.mask_check(8, 16)
    assert check["max_future_weight"] == 0.0
    assert check["max_row_sum_error"] < 1e-6
    assert check["max_prefix_softmax_error"] < 1e-6


def test_without_causal_mask_earlier_outputs_see_later_tokens() -> None:
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    src, tgt = torch.randint(4, 50, (1, 6)), torch.randint(4, 60, (1, 5))
    changed = tgt.clone()
    changed[0, -1] = (tgt[0, -1] + 1 - 4) % 56 + 4  # a different last token
    with torch.no_grad():
        masked_delta = (model(src, tgt) - model(src, changed))[0, :-1].abs().max()
        remove_causal_mask(model)
        unmasked_delta = (model(src, tgt) - model(src, changed))[0, :-1].abs().max()
    assert masked_delta == 0.0
    assert unmasked_delta > 1e-3


@pytest.mark.parametrize(("d_model", "warmup_steps"), [(512, 4000), (256, 100), (1024, 8000)])
def test_warmup_schedule_peaks_at_warmup(d_model: int, warmup_steps: int) -> None:
    step, lr = warmup.schedule_peak(d_model, warmup_steps, 3 * warmup_steps)
    assert step == warmup_steps
    assert lr == pytest.approx(d_model**-0.5 * warmup_steps**-0.5)


def test_unigram_entropy() -> None:
    assert warmup.unigram_entropy([[5, 6], [5]]) == pytest.approx(
        -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    )


def test_diagonal_correlation() -> None:
    assert alignment.diagonal_correlation(torch.eye(6), 6, 6) == pytest.approx(1.0)
    assert alignment.diagonal_correlation(torch.eye(6).flip(0), 6, 6) == pytest.approx(-1.0)
    column = torch.zeros(6, 6)
    column[:, 2] = 1.0  # every target position on one source position: undefined, not 0
    assert math.isnan(alignment.diagonal_correlation(column, 6, 6))


def test_mean_correlation_leaves_undefined_sentences_out() -> None:
    column = torch.zeros(4, 4)
    column[:, 1] = 1.0
    weights = torch.stack([torch.eye(4), column])[:, None]  # (batch 2, 1 head, 4, 4)
    [(mean, defined)] = alignment.mean_correlations([weights], [5, 5], [[7] * 4, [7] * 4])
    assert (mean, defined) == (pytest.approx(1.0), 1)


def test_agreement_counts_attention_on_the_reference_positions() -> None:
    # source pieces 5 6 7 6 (EOS dropped); the translation 6 9 7: 6 occurs twice, 9 never, 7 once
    weights = torch.zeros(1, 1, 3, 5)
    weights[0, 0, 0, 3] = 1.0  # predicting 6: on the second 6, a hit
    weights[0, 0, 1, 0] = 1.0  # predicting 9: not in the source, not counted
    weights[0, 0, 2, 1] = 1.0  # predicting 7: on a 6, a miss
    untrained = torch.full((1, 1, 3, 5), 0.2)  # ties: argmax takes the first position, piece 5

    def measure(sources: list[list[int]], is_word: Callable[[int], bool]) -> alignment.Agreement | None:
        positions = alignment.shared_positions(sources, [[6, 9, 7]], is_word)
        if not positions:
            return None
        return alignment.agreement([weights], [untrained], positions, sources, [[6, 9, 7]])

    measured = measure([[5, 6, 7, 6]], lambda piece: True)
    assert (measured.trained, measured.untrained, measured.count) == ([0.5], [0.0], 2)
    assert measured.chance == pytest.approx((2 / 4 + 1 / 4) / 2)
    # the diagonal guesses round(t * 4 / 3): position 0 (a 5: miss) for t=0, position 3 (a 6: miss) for t=2
    assert measured.diagonal == 0.0
    # source 6 5 8 7: the diagonal's positions 0 (a 6) and 3 (a 7) are both the pieces predicted
    assert measure([[6, 5, 8, 7]], lambda piece: True).diagonal == 1.0
    assert measure([[5, 6, 7, 6]], lambda piece: piece != 6).count == 1
    assert measure([[5, 8]], lambda piece: True) is None


def model1_by_loops(
    pairs: list[tuple[list[int], list[int]]], iterations: int
) -> dict[tuple[int, int], float]:
    """IBM Model 1's EM as the textbook writes it (Koehn, Statistical MT, fig. 4.3), one word at a time,
    with a NULL source word ("NULL")."""
    t: dict[tuple[object, int], float] = {}
    for source, target in pairs:
        for f in [*source, "NULL"]:
            for e in target:
                t[f, e] = 1.0
    for _ in range(iterations):
        count: dict[tuple[object, int], float] = dict.fromkeys(t, 0.0)
        total: dict[object, float] = {}
        for source, target in pairs:
            for e in target:
                z = sum(t[f, e] for f in [*source, "NULL"])
                for f in [*source, "NULL"]:
                    count[f, e] += t[f, e] / z
                    total[f] = total.get(f, 0.0) + t[f, e] / z
        t = {(f, e): count[f, e] / total[f] for f, e in t}
    return t


def test_model1_is_the_textbook_em() -> None:
    generator = random.Random(0)
    pairs = [
        (
            [generator.randrange(8) for _ in range(generator.randint(0, 5))],  # some empty: NULL only
            [generator.randrange(8) for _ in range(generator.randint(1, 5))],
        )
        for _ in range(30)
    ]
    expected = model1_by_loops(pairs, iterations=4)
    model1 = alignment.fit_model1(pairs, vocab_size=8, iterations=4)
    assert len(model1.keys) == len(expected)
    for (f, e), value in expected.items():
        f_id = 8 if f == "NULL" else f
        assert float(model1.t(torch.tensor(f_id), torch.tensor(e))) == pytest.approx(value, rel=1e-12)
    assert float(model1.t(torch.tensor(3), torch.tensor(99))) == 0.0  # never seen together


def test_model1_aligns_the_textbook_example() -> None:
    """Koehn's example: "das Haus" / "the house", "das Buch" / "the book", "ein Buch" / "a book"; EM finds
    the word pairs from co-occurrence alone."""
    das, haus, buch, ein, the, house, book, a = range(8)
    pairs = [([das, haus], [the, house]), ([das, buch], [the, book]), ([ein, buch], [a, book])]
    model1 = alignment.fit_model1(pairs, vocab_size=8, iterations=10)
    positions = alignment.model1_positions(
        model1, [[ein, buch, das, haus]], [[a, book, the, house]], lambda p: True
    )
    assert positions == [(0, 0, [0]), (0, 1, [1]), (0, 2, [2]), (0, 3, [3])]
    assert alignment.model1_positions(model1, [[haus]], [[a, book]], lambda p: p != a) == []  # t = 0
    # "the" and "Haus" did occur together, but "the" is better explained by NULL than by "Haus"
    assert (
        0
        < float(model1.t(torch.tensor(haus), torch.tensor(the)))
        < float(model1.t(torch.tensor(8), torch.tensor(the)))
    )
    assert alignment.model1_positions(model1, [[haus]], [[the]], lambda p: True) == []
    with pytest.raises(ValueError, match="at least one sentence pair"):
        alignment.fit_model1([([das], [])], vocab_size=8)


def test_model1_verdict_reads_the_best_layer_against_the_diagonal() -> None:
    above = alignment.Agreement(
        trained=[0.4, 0.6], untrained=[0.1, 0.1], diagonal=0.3, chance=0.07, count=900
    )
    text = alignment.model1_verdict(above)
    assert "in 40% (layer 1), 60% (layer 2), against 30% for the diagonal, 7% for a random" in text
    # standard error √((0.6·0.4 + 0.3·0.7) / 900) = 0.0224: 0.3 is 13.4 of them
    assert text.endswith(
        "Layer 2, the best, is 30 points (13.4 standard errors) above the diagonal: attention there "
        "follows the words, not position alone."
    )
    below = dataclasses.replace(above, trained=[0.25, 0.2])  # 0.05 / 0.0210 = 2.4
    assert alignment.model1_verdict(below).endswith(
        "Layer 1, the best, is 5 points (2.4 standard errors) below the diagonal: position alone picks "
        "the aligned piece more often than attention."
    )
    level = dataclasses.replace(above, trained=[0.31, 0.2])  # 0.01 / 0.0217 = 0.5
    assert alignment.model1_verdict(level).endswith(
        "is 1 point (0.5 standard errors) from the diagonal: this test cannot tell attention to the "
        "words from position."
    )


def test_position_verdict_follows_the_mispaired_control() -> None:
    assert "more than attention to the words" in alignment.position_verdict(0.75, 0.70, 2)
    assert "follows the words" in alignment.position_verdict(0.75, 0.30, 2)
    # a correlation near zero, negative or undefined has no diagonal for the control to take apart
    for trained, mismatched in ((0.04, -0.03), (-0.3, -0.1), (-0.3, -0.5), (math.nan, 0.1)):
        text = alignment.position_verdict(trained, mismatched, 2)
        assert text.startswith("The correlation is too weak to tell what it measures"), (trained, mismatched)


def test_longest_recalled_distance_stops_at_the_first_failure() -> None:
    def grid(*accuracies: float) -> dict[int, dict[str, float]]:
        return {L: {"accuracy": a} for L, a in zip((4, 16, 64, 128), accuracies, strict=True)}

    assert paths.longest_recalled(grid(1.0, 0.95, 0.3, 0.92)) == 16
    assert paths.longest_recalled(grid(1.0, 1.0, 1.0, 1.0)) == 128
    assert paths.longest_recalled(grid(0.5, 1.0, 1.0, 1.0)) is None


def test_largest_learning_rate_and_verdict() -> None:
    floor = 5.0
    finals = {1e-3: [4.0, 4.2], 3e-3: [4.5, 4.6], 1e-2: [4.9, 5.1]}
    assert warmup.largest_learning_rate(finals, floor) == 3e-3
    assert warmup.largest_learning_rate({1e-3: [4.0, math.inf]}, floor) is None  # one seed diverged
    text = warmup.verdict({"post-LN, warm-up": 3e-3, "post-LN, no warm-up": 1e-3, "pre-LN, no warm-up": 1e-2})
    assert "Warm-up lets post-LN take a larger learning rate." in text
    assert "Pre-LN learns without warm-up at a rate where post-LN does not." in text
    text = warmup.verdict({"post-LN, warm-up": None, "post-LN, no warm-up": None, "pre-LN, no warm-up": None})
    assert "does not change" in text and "does not learn at a larger rate" in text


def test_mean_sd_and_difference() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([4.0]) == (4.0, 0.0)
    gap, error = difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert gap == pytest.approx(1.0)
    assert error == pytest.approx(math.sqrt(2 / 3))


def test_table_escapes_pipes() -> None:
    assert Table(["|x|"], [[1.5], ["a|b"]]).markdown().splitlines() == [
        "| \\|x\\| |",
        "|---|",
        "| 1.5 |",
        "| a\\|b |",
    ]


def test_report_command_writes_markdown_html_and_figures(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    args = ["report", "--preset", "tiny", "--checkpoint", str(run_dir), "--out", str(out)]
    assert main([*args, "--only", "projections", "alignment"]) == 0
    markdown = (out / "seed-claims.md").read_text()
    assert "transformer report --only projections" in markdown and "![" in markdown
    assert "<table>" in (out / "seed-claims.html").read_text()
    assert (out / "projections.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".partial-*"))
    # the uniform baseline per token, as the diagonal masses beside it: 1/mean(n), not mean(1/n)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    lengths = [
        len(tokenizer.encode(de)) + 1
        for de, _ in bundled_test_sentences()[: projections.SIZES["tiny"]["sentences"]]
    ]
    record = json.loads((out / "seed-claims.json").read_text())
    uniform = record["results"]["projections"]["trained"]["uniform"]
    assert uniform == pytest.approx(len(lengths) / sum(lengths))
    assert uniform != pytest.approx(sum(1 / n for n in lengths) / len(lengths))


def _edited_run(run_dir: Path, to: Path, **train: str) -> Path:
    """A copy of a run whose record says other training settings."""
    shutil.copytree(run_dir, to)
    record = json.loads((to / "config.json").read_text())
    record["train"].update(train)
    (to / "config.json").write_text(json.dumps(record))
    return to


def test_report_refuses_another_family_or_pair_in_one_line_the_default_run_too(
    run_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default runs/multi30k-de-en went unchecked (an RNN there: AttributeError halfway through), and
    an en→de run was fed German sources, exit 0."""
    out = ["--preset", "tiny", "--only", "projections", "--out", str(tmp_path / "report")]
    recipe = tiny_recipe(data_dir, model="rnn", max_steps=4, eval_every=2)
    train(recipe, {"emb_dim": 32, "hidden_size": 32}, tmp_path / "runs" / "multi30k-de-en")
    monkeypatch.chdir(tmp_path)
    assert main(["report", *out]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "error: runs/multi30k-de-en (the default --checkpoint) is a model=rnn run: the report studies a "
        "Transformer's attention, give a Transformer run with --checkpoint"
    )
    en_de = _edited_run(run_dir, tmp_path / "en-de", src_lang="en", tgt_lang="de")
    assert main(["report", "--checkpoint", str(en_de), *out]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "en-de translates en→de, the report's experiments de→en" in error
    assert not (tmp_path / "report").exists()


def test_report_command_refuses_unknown_experiments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", "--only", "nonsense", "--out", str(tmp_path / "r")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_every_other_section_of_the_report_runs_and_draws(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The sections the test above leaves out, at the tiny preset: each writes its section and its figure,
    and says as it goes which models it has trained."""
    out = tmp_path / "reports"
    others = ["cost", "paths", "scaling", "positional", "heads", "masking", "warmup"]
    args = ["report", "--preset", "tiny", "--checkpoint", str(run_dir), "--out", str(out), "--only", *others]
    assert main(args) == 0
    log = capsys.readouterr().err
    assert re.search(r"s\]     trained transformer at L=8: held-out accuracy \d\.\d\d$", log, re.MULTILINE)
    assert re.search(r"trained no-pe, seed 2: loss \d+\.\d{3}$", log, re.MULTILINE)
    assert re.search(r"trained pre-LN, no warm-up, peak lr [\d.e-]+, seed \d: loss", log)
    markdown = (out / "seed-claims.md").read_text()
    assert not re.search(r"\{[a-z_]+\}", markdown)  # no caption left with an unformatted placeholder
    for key in others:
        assert f"transformer report --only {key} " in markdown, key
    figures = [
        "cost-flops-time",
        "cost-memory",
        "paths",
        "scaling",
        "positional",
        "heads",
        "masking",
        "warmup",
    ]
    for figure in figures:
        assert (out / f"{figure}.png").read_bytes()[:4] == b"\x89PNG", figure


def _section(markdown: str, title: str) -> str:
    """A section's text below its numbered heading, up to the next section."""
    start = re.search(rf"^## \d+\. {re.escape(title)}$", markdown, re.MULTILINE).end()
    following = re.search(r"^## ", markdown[start:], re.MULTILINE)
    return markdown[start : start + following.start() if following else len(markdown)]


def test_report_header_names_an_earlier_runs_trained_model_only_where_it_differs() -> None:
    def run(command: str, translator: str, machine: str = "Zen 3") -> dict[str, str]:
        return {"command": command, "date": "today", "machine": machine, "translator": translator}

    header = {**run("report --only alignment", "model A"), "preset": "report", "minutes": "2"}
    earlier = [run("report --only heads", "model A"), run("report --only cost", "not used", "Zen 5")]
    earlier.append(run("report --only positional", "model B"))
    sections = [
        Section(key, key, "a finding", "the body\n", section_run)
        for key, section_run in zip(
            ["alignment", "heads", "cost", "positional"], [header, *earlier], strict=True
        )
    ]
    lines = render_markdown(sections, header).splitlines()
    assert "  - section 2: `report --only heads` on today" in lines
    assert "  - section 3: `report --only cost` on today, Zen 5" in lines
    assert "  - section 4: `report --only positional` on today; trained model: model B" in lines


def test_report_only_refreshes_its_sections_and_keeps_the_others(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "reports"
    args = ["report", "--preset", "tiny", "--checkpoint", str(run_dir), "--out", str(out)]
    assert main([*args, "--only", "masking"]) == 0
    first_markdown = (out / "seed-claims.md").read_text()
    first = json.loads((out / "seed-claims.json").read_text())
    assert "earlier run" not in first_markdown
    assert main([*args, "--only", "cost"]) == 0
    markdown = (out / "seed-claims.md").read_text()
    record = json.loads((out / "seed-claims.json").read_text())
    # numbered in the report's order, the kept section word for word, and named as the earlier run's
    assert markdown.index("## 1. Cost per layer") < markdown.index("## 2. Masking in the decoder")
    assert _section(markdown, "Masking in the decoder") == _section(first_markdown, "Masking in the decoder")
    assert f"  - section 2: `{first['header']['command']}` on {first['header']['date']}" in markdown
    assert "| 2 | Masking in the decoder | Future positions receive weight 0" in markdown
    assert record["runs"] == {"cost": record["header"], "masking": first["header"]}
    assert record["results"]["masking"] == first["results"]["masking"] and "cost" in record["results"]
    assert "Masking in the decoder" in (out / "seed-claims.html").read_text()

    # a report of another preset (one written before the preset was recorded counts as `report`) is
    # refused in one line and left as it was
    del record["runs"], record["header"]["preset"]
    (out / "seed-claims.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main([*args, "--only", "masking"]) != 0
    assert "--preset report" in capsys.readouterr().err.strip()
    assert (out / "seed-claims.md").read_text() == markdown

    # a section the record does not know (an edited report) is refused rather than dropped
    del record["results"]["masking"]
    record["runs"] = {"cost": record["header"]}
    (out / "seed-claims.json").write_text(json.dumps(record))
    assert main([*args, "--only", "cost"]) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Masking in the decoder" in error
    assert (out / "seed-claims.md").read_text() == markdown
