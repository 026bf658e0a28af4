"""The comparison card, end to end at toy size: matched parameters, every model trained, the card written."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED, TINY, TINY_MODEL, tiny_recipe

from transformer.cli import main
from transformer.compare import (
    MODELS,
    CompareSettings,
    _budget,
    _mean_std,
    compare,
    count_parameters,
    flops_per_target_token,
    is_bundled_multi30k,
    model_overrides,
    verdicts,
)
from transformer.config import RNNConfig, TrainConfig, TransformerConfig
from transformer.data.batching import collate
from transformer.model import build_model


def test_rnn_sizes_match_the_transformer_within_fifteen_percent() -> None:
    settings = CompareSettings()  # the default recipe: a small Transformer with a joint 8k vocabulary
    reference = count_parameters(TransformerConfig.preset("small", src_vocab_size=8000, tgt_vocab_size=8000))
    for kind in MODELS[1:]:
        overrides = model_overrides(settings, kind)
        count = count_parameters(RNNConfig(kind=kind, src_vocab_size=8000, tgt_vocab_size=8000, **overrides))
        assert abs(count / reference - 1) < 0.15, (kind, overrides, count, reference)
        assert overrides["hidden_size"] >= 256  # the budget goes to the recurrence, not only embeddings


def test_compare_trains_every_model_and_writes_the_card(data_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = tiny_recipe(data_dir, max_steps=4, eval_every=2, average_last=2, lr_factor=1.0, log_every=1)
    overrides = [f"{key}={value}" for key, value in recipe.__dict__.items() if key != "time_budget_minutes"]
    overrides += [f"{key}={value}" for key, value in TINY_MODEL.items()]
    card = tmp_path / "card.md"
    models = ["transformer", "rnn"]  # the other families train through the same calls (tests/test_rnn.py)
    args = ["compare", *overrides, "cooldown=0.5", "--models", *models, "--seeds", "1", "2", "--minutes", "0"]
    args += ["--out", str(tmp_path / "runs")]
    assert main([*args, "--jobs", "2", "--card", str(card)]) == 0  # two worker processes
    text = card.read_text()
    assert "2 runs at a time, each training and decoding on" in text
    assert "the rate falling linearly to 0 over the last 50%" in text  # the recipe's cool-down is stated
    # --minutes 0 is no time limit: max_steps bounds the runs, and the card says so (it said "0 minutes").
    assert "training per run: 4 updates or 100 epochs, whichever ends first;" in text
    assert "minutes of training" not in text
    # The RNNs keep RNNConfig's dropout: the card says so rather than "same pipeline" alone.
    assert "| dropout | 0.1 | 0.3 |" in text and "Model settings are each family's own" in text
    assert "| | Transformer | RNN encoder–decoder |" in text
    assert "±" in text and "nrefs:1|case:lc" in text and "Verdicts" in text
    rows = json.loads(card.with_suffix(".json").read_text())
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted((m, s) for m in models for s in (1, 2))
    assert all(r["training_flops"] > 0 and r["beam4_sentences_per_s"] > 0 and r["updates"] == 4 for r in rows)
    params = {r["model"]: r["parameters"] for r in rows}
    assert all(abs(p / params["transformer"] - 1) < 0.15 for p in params.values()), params
    # A second call, in this process and on the threads the workers trained on, reuses the finished runs
    # and their measurements: nothing is trained or measured again.
    threads = f"threads={max(1, (os.cpu_count() or 1) // 2)}"
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "runs").glob("*/best.safetensors")}
    assert main([*args, threads, "--card", str(tmp_path / "again.md")]) == 0
    assert stamps == {p: p.stat().st_mtime for p in (tmp_path / "runs").glob("*/best.safetensors")}
    assert json.loads((tmp_path / "again.json").read_text()) == rows
    # A measurement kept by an earlier version (FLOPs counted with padding) is taken again, not reused.
    kept = tmp_path / "runs" / "rnn-seed1" / "measured.json"
    old = {k: v for k, v in json.loads(kept.read_text()).items() if k not in ("measure_version", "dropout")}
    kept.write_text(json.dumps({**old, "training_flops": 1.0}))
    assert main([*args, threads, "--card", str(tmp_path / "third.md")]) == 0
    remeasured = json.loads(kept.read_text())
    assert (
        remeasured["training_flops"]
        == next(r for r in rows if r["model"] == "rnn" and r["seed"] == 1)["training_flops"]
    )
    assert stamps == {p: p.stat().st_mtime for p in (tmp_path / "runs").glob("*/best.safetensors")}


def test_the_card_states_the_corpus_and_the_vocabulary_the_runs_actually_used(
    data_dir: Path, tmp_path: Path
) -> None:
    """A custom corpus is not Multi30k, and a small one trains fewer pieces than vocab_size asks for: the
    card must say what the runs used, not what the default recipe would have."""
    recipe = tiny_recipe(data_dir, vocab_size=4000, max_steps=2, eval_every=2, average_last=1)
    settings = CompareSettings(
        models=("transformer",), seeds=(1,), base=recipe, transformer_overrides=tuple(TINY_MODEL.items())
    )
    card = tmp_path / "card.md"
    text = compare(settings, tmp_path / "runs", card, "transformer compare …")
    metrics = (tmp_path / "runs" / "transformer-seed1" / "metrics.jsonl").read_text().splitlines()
    trained = next(r["vocab_size"] for r in map(json.loads, metrics) if r["event"] == "tokenizer")
    # The run records the threads it trained on, not 0 ("torch's default", whatever that was where it ran).
    saved = json.loads((tmp_path / "runs" / "transformer-seed1" / "config.json").read_text())
    assert saved["train"]["threads"] == torch.get_num_threads()
    assert trained < 4000  # 200 sentence pairs cannot fill 4000 pieces
    description = text.splitlines()[2]
    assert description.startswith(f"`{data_dir}` de→en, same pipeline for every model (joint {trained} ")
    assert f"joint {trained} SentencePiece vocabulary, 4000 asked for," in description
    assert "Multi30k" not in description
    assert "| published" not in text  # the published figures are Multi30k's, not this corpus's
    assert "| test2016 BLEU lowercased, greedy |" in text  # the test split's own name
    assert json.loads(card.with_suffix(".json").read_text())[0]["vocab_size"] == trained
    assert is_bundled_multi30k(replace(recipe, data_dir=str(BUNDLED / ".." / "multi30k")))
    assert not is_bundled_multi30k(recipe)


def test_verdicts_judge_lowercased_greedy_bleu_and_name_each_side_s_parameters() -> None:
    def rows(bleu: float, params: int) -> list[dict[str, float]]:
        return [{"beam1_bleu_lc": bleu + delta, "parameters": params} for delta in (-1.0, 1.0)]

    lines = verdicts({"transformer": rows(30.0, 2_000_000), "rnn": rows(21.0, 1_800_000)})
    assert lines == [
        "- RNN encoder–decoder: 21.00 beats the published GRU encoder–decoder (notebook 2) figure 20.6.",
        "- Transformer vs RNN encoder–decoder: +9.00 BLEU (lowercased, greedy) at 2.00M vs 1.80M parameters.",
    ]
    # On another corpus the published figures say nothing about these runs: only the gap is judged.
    assert verdicts({"transformer": rows(30.0, 2_000_000), "rnn": rows(21.0, 1_800_000)}, False) == lines[1:]


def test_a_figure_some_run_did_not_measure_shows_as_a_dash() -> None:
    """A run shorter than log_every steps logs no training speed: its cell reads — rather than 0."""
    assert _mean_std([2100.0, math.nan], ".0f") == "—"
    assert _mean_std([1.0, 3.0], ".1f") == "2.0 ± 1.4"
    assert _mean_std([2100.0], ".0f") == "2100"


def test_a_kept_run_of_other_settings_or_data_is_refused_not_reused(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """A finished run was reused whatever the new settings, and the card then stated the new command."""
    recipe = tiny_recipe(data_dir, max_steps=2, eval_every=2, average_last=1, beam=1, threads=1)
    overrides = [f"{key}={value}" for key, value in recipe.__dict__.items() if key != "time_budget_minutes"]
    overrides += [f"{key}={value}" for key, value in TINY_MODEL.items()]
    runs, card = tmp_path / "runs", tmp_path / "card.md"
    options = ["--models", "transformer", "--seeds", "1", "--minutes", "0", "--out", str(runs)]
    assert main(["compare", *overrides, *options, "--card", str(card)]) == 0
    run = runs / "transformer-seed1"
    # Only the log may differ: the run and its measurement are reused.
    again = tmp_path / "again.md"
    assert main(["compare", *overrides, "log_every=1", *options, "--card", str(again)]) == 0
    assert again.with_suffix(".json").read_text() == card.with_suffix(".json").read_text()

    changed_data = tmp_path / "data"
    shutil.copytree(data_dir, changed_data)
    for lang, line in (("de", "Noch eine Zeile."), ("en", "One more line.")):
        with (changed_data / f"val.{lang}").open("a") as f:
            f.write(line + "\n")
    cases = [
        ("lr_factor=1.0", "the train config differs (lr_factor: 2.0 -> 1.0)"),
        ("d_ff=128", "the model config differs (d_ff: 64 -> 128)"),
        ("max_steps=3", "the train config differs (max_steps: 2 -> 3)"),  # a finished run trains no further
        # the card's speeds would be a run's of other threads (they were reused, and the card stated these)
        ("threads=2", "the train config differs (threads: 1 -> 2)"),
        ("compile=true", "the train config differs (compile: False -> True)"),
        (f"data_dir={changed_data}", f"the valid data in {changed_data} differs from the data"),
    ]
    files = {p: p.read_bytes() for p in [*run.iterdir(), card]}
    capsys.readouterr()
    # Finished; stopped, which compare would resume; killed after saving `step-N` but before `last` (compare
    # looked for `last` only: it held such a run to nothing, then trained anew into its directory).
    for state, gone in [("finished", ()), ("stopped", ("results.json",)), ("killed", ("last.safetensors",))]:
        for name in gone:
            (run / name).unlink()
            files.pop(run / name)
        for change, differs in cases:
            assert main(["compare", *overrides, change, *options, "--card", str(card)]) == 2, (state, change)
            out, err = capsys.readouterr()
            assert err.startswith(f"error: cannot reuse {run} for this card: {differs}"), err
            assert "choose another --out, or delete that run" in err
            assert err.count("\n") == 1 and out == ""
    assert {p: p.read_bytes() for p in [*run.iterdir(), card]} == files, "nothing trained or rewritten"
    # Of the same settings, the killed run is resumed from `step-N`, as `train --resume` would.
    (run / "measured.json").unlink()
    assert main(["compare", *overrides, *options, "--card", str(card)]) == 0, capsys.readouterr().err
    assert (run / "results.json").is_file()  # resumed at its end: averaged and scored, saving no `last`
    assert json.loads(card.with_suffix(".json").read_text())[0]["updates"] == 2


def test_the_time_budget_is_the_users_and_repeated_runs_are_refused(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """--minutes (default 10) replaced a time_budget_minutes given on the command line or in the recipe,
    and the card stated the replacement; a repeated seed or family gave two runs of one directory."""
    budgets = []
    monkeypatch.setattr(
        "transformer.compare.compare", lambda s, *_: budgets.append(s.base.time_budget_minutes)
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("time_budget_minutes: 20\n")
    options = ["--out", str(tmp_path / "runs"), "--card", str(tmp_path / "card.md")]
    for args, budget in [
        ([], 10.0),
        (["time_budget_minutes=15"], 15.0),
        (["--config", str(recipe)], 20.0),
        (["--config", str(recipe), "--minutes", "5"], 5.0),  # the command line beats the recipe
        (["time_budget_minutes=15", "--minutes", "15"], 15.0),
        (["--minutes", "0"], 0.0),  # no time limit, as time_budget_minutes=0
    ]:
        assert main(["compare", *args, *options]) == 0, args
        assert budgets.pop() == budget, args
    capsys.readouterr()
    for args, error in [
        (["time_budget_minutes=15", "--minutes", "10"], "time_budget_minutes=15 and --minutes 10 disagree"),
        (["--minutes", "-1"], "--minutes must be 0 (no time limit) or more, got -1.0"),
        (["--minutes", "nan"], "--minutes must be 0 (no time limit) or more, got nan"),
        (["--minutes", "inf"], "--minutes must be 0 (no time limit) or more, got inf"),
        (["--seeds", "1", "2", "1"], "--seeds names 1 more than once"),
        (["--models", "rnn", "transformer", "rnn"], "--models names rnn more than once"),
    ]:
        assert main(["compare", *args, *options]) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith(f"error: {error}"), err
        assert err.count("\n") == 1 and out == ""
    assert budgets == []


def test_the_card_states_every_limit_that_ends_a_run() -> None:
    assert _budget(TrainConfig(time_budget_minutes=15)) == "15 minutes or 100 epochs, whichever ends first"
    assert _budget(TrainConfig(time_budget_minutes=0, max_steps=4, max_epochs=1)) == (
        "4 updates or 1 epoch, whichever ends first"
    )
    assert _budget(TrainConfig(time_budget_minutes=1, max_steps=4, patience=2)) == (
        "1 minute, 4 updates, 100 epochs or 2 validations without a better BLEU, whichever ends first"
    )
    assert _budget(TrainConfig(time_budget_minutes=0, max_epochs=3)) == "3 epochs"


@pytest.mark.parametrize(
    "config", [TINY, RNNConfig(src_vocab_size=50, tgt_vocab_size=60, emb_dim=16, hidden_size=16)]
)
def test_training_flops_are_counted_without_padding(config: TransformerConfig | RNNConfig) -> None:
    """Counted on one padded batch, a short pair cost as much as the longest beside it: the card's FLOPs
    were 2.2 times too many. Per real target token, a pair's count must not depend on its batch-mates."""
    torch.manual_seed(0)
    model = build_model(config)
    short = [([5, 6], [7]), ([8, 9, 10], [11, 12])]
    long = [(list(range(3, 40)), list(range(3, 45)))]

    def total(pairs: list[tuple[list[int], list[int]]]) -> float:
        return flops_per_target_token(model, pairs) * collate(pairs).n_tgt_tokens

    assert total(short + long) == pytest.approx(total(short) + total(long), rel=1e-9)
    assert total(long) > 0
