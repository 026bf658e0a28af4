"""End to end on a 200-pair slice of Multi30k: train, translate, evaluate, average, resume, bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL, tiny_recipe

from transformer import prepare
from transformer import train as train_module
from transformer import translate as translate_module
from transformer.checkpoint import average_weights, load_state, load_weights
from transformer.cli import load_train_settings, main
from transformer.config import TrainConfig, config_from_dict
from transformer.data import dataset as dataset_module
from transformer.data.batching import BATCH_ORDER
from transformer.data.corpus import read_lines, read_split
from transformer.data.dataset import Corpus, encode_corpus
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError
from transformer.evaluate import Scores, score
from transformer.optim import noam_lr
from transformer.precision import decoding_cache_dtype, has_native_bf16
from transformer.prepare import Parent, build_tokenizer
from transformer.rundir import MetricsLog, data_sha256, run_record
from transformer.search import Sampling
from transformer.textio import single_line
from transformer.train import Progress, Window, parse_overrides, train
from transformer.translate import Translator


def records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_training_lowers_loss_and_writes_the_run(run_dir: Path) -> None:
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    for name in ("config.json", "tokenizer.model", "best.safetensors", "last.safetensors", "last.state.pt"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test2016"]) >= {"bleu", "bleu_lc", "chrf", "bleu_signature"}
    assert [r["step"] for r in records(run_dir, "valid")] == [15, 30]
    tokenizer_event = records(run_dir, "tokenizer")[0]
    assert tokenizer_event["round_trip_mismatches"] == 0
    assert records(run_dir, "train")[0]["padding"] < 0.5  # length bucketing keeps padding low
    # The end of the run: the last `average_last` validated checkpoints averaged, and `best` is that average
    # where it validates better than the best single checkpoint, else the best single one; the test split's
    # hypotheses are written beside it.
    steps = ["step-0000015.safetensors", "step-0000030.safetensors"]
    assert [r["checkpoints"] for r in records(run_dir, "average")] == [steps]
    best = load_weights(run_dir / "best.safetensors")
    if results["valid_averaged"] > results["valid_best_single"]:
        expected = average_weights([run_dir / name for name in steps])
    else:
        best_step = max(records(run_dir, "valid"), key=lambda r: r["bleu"])["step"]
        expected = load_weights(run_dir / f"step-{best_step:07d}.safetensors")
    assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)
    assert len((run_dir / "test2016.hyp.en").read_text().splitlines()) == 20


def test_translate_cli_keeps_one_line_per_input_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.de"
    source.write_text("Ein Mann fährt Fahrrad.\n\n   \nZwei Hunde spielen im Schnee.\n")
    assert main(["translate", "--checkpoint", str(run_dir), "--input", str(source), "--beam", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 4
    assert lines[1] == "" and lines[2] == ""
    assert lines[0] and lines[3]


def test_translate_cli_samples_translations_fixed_by_the_seed(run_dir: Path, tmp_path: Path, capsys) -> None:
    """fairseq's --sampling options: one drawn translation per input line, the same for the same seed;
    drawing only the most probable token is greedy search. Options that cannot go together, or leave no
    distribution to draw from, are one error line."""
    lines = ["Ein Mann fährt Fahrrad.", "", "Zwei Hunde spielen im Schnee.", "Eine Frau spielt Gitarre."]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n")
    command = ["translate", "--checkpoint", str(run_dir), "--input", str(source), "--sampling"]

    def printed(*extra: str) -> list[str]:
        """The output's lines: split at "\n" alone, as `transformer`'s tools read lines. A drawn piece may
        hold a character str.splitlines() also splits at (U+2028, say), which stays inside its line."""
        assert main([*command, *extra]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        return out[:-1].split("\n")

    drawn = printed("--temperature", "1.5", "--seed", "3")
    assert len(drawn) == 4 and drawn[1] == ""  # a drawn translation may be empty too: EOS first
    assert printed("--temperature", "1.5", "--seed", "3") == drawn
    assert printed("--temperature", "1.5", "--seed", "4") != drawn
    greedy = Translator.from_checkpoint(run_dir).translate(lines, beam=1)
    assert printed("--sampling-topk", "1") == [single_line(text) for text in greedy]
    assert Translator.from_checkpoint(run_dir).translate(lines, sampling=Sampling(top_k=1)) == greedy
    assert printed("--temperature", "1e-39") == printed("--sampling-topk", "1")  # T → 0: the most probable
    for extra, error in [
        (["--beam", "4"], "the beam must be 1, not 4"),
        (["--nbest", "2"], "--sampling draws one translation per line"),
        (["--length-penalty", "1"], "it takes no length penalty"),
        (["--temperature", "0"], "temperature must be above 0"),
        (["--sampling-topp", "1.5"], "top-p must be in (0, 1]"),
        (["--sampling-topk", "-1"], "top-k must be 0"),
        (["--seed", str(2**64)], "seed must be 0 to 2^64 - 1"),
        (["--seed", "-1"], "seed must be 0 to 2^64 - 1"),
    ]:
        assert main([*command, *extra]) == 2
        assert error in one_error_line(capsys), extra
    assert main([*command[:-1], "--temperature", "0.5"]) == 2  # without --sampling
    assert "need --sampling" in one_error_line(capsys)


class Flushes(io.StringIO):
    """stdout that records what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.at_flush: list[str] = []

    def flush(self) -> None:
        self.at_flush.append(self.getvalue())


def test_translate_cli_writes_a_long_input_block_by_block(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """As fairseq-interactive's buffer and OpenNMT-py's shards: what is translated is written, so a long
    input shows progress and a stopped run keeps its first blocks; the output is that of one block, and
    n-best lists are numbered by input line across blocks. A sentence --strict refuses in the last block
    still stops the run before anything is written."""
    lines = ["Ein Mann fährt Fahrrad.", "", "Zwei Hunde spielen im Schnee.", "Eine Frau.", "Ein Kind lacht."]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n")
    whole = Translator.from_checkpoint(run_dir).translate(lines, beam=2)
    monkeypatch.setattr(translate_module, "BLOCK_SENTENCES", 2)
    command = ["translate", "--checkpoint", str(run_dir), "--input", str(source), "--beam", "2"]
    for extra in ([], ["--nbest", "2"]):
        stdout = Flushes()
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main([*command, *extra]) == 0
        written = [text.count("\n") for text in stdout.at_flush]
        if not extra:
            assert written == [2, 4, 5] and stdout.getvalue().splitlines() == whole
        else:  # the blank line has one row; the others two, or one where the beam could not fill two
            rows = stdout.getvalue().splitlines()
            numbers = [int(row.split("\t")[0]) for row in rows]
            assert numbers == sorted(numbers) and set(numbers) == {0, 1, 2, 3, 4} and len(written) == 3
            assert next(row.split("\t")[2] for row in rows if row.startswith("4\t")) == whole[4]
    source.write_text("\n".join([*lines, "Hund " * 3000]) + "\n")
    stdout = Flushes()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main([*command, "--strict"]) == 2
    assert stdout.getvalue() == "" and "sentence 6 has" in one_error_line(capsys)


class Terminal:
    """stdin as a terminal: each readline hands out the next typed line and notes what had been printed
    by then, so that a test can tell a translation printed as its line was typed from one printed at the
    end."""

    def __init__(self, typed: list[bytes], capsys: pytest.CaptureFixture) -> None:
        self.buffer = self
        self.typed = iter(typed)
        self.capsys = capsys
        self.printed_before_each_read: list[tuple[str, str]] = []

    def isatty(self) -> bool:
        return True

    def readline(self) -> bytes:
        self.printed_before_each_read.append(self.capsys.readouterr())
        return next(self.typed, b"")


def test_translate_at_a_terminal_answers_each_line_as_it_is_typed(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    expected = Translator.from_checkpoint(run_dir).translate(["Ein Mann fährt Fahrrad.", "Zwei Hunde."])
    terminal = Terminal([b"Ein Mann f\xc3\xa4hrt Fahrrad.\n", b"caf\xe9\n", b"\n", b"Zwei Hunde."], capsys)
    monkeypatch.setattr(sys, "stdin", terminal)
    assert main(["translate", "--checkpoint", str(run_dir), "--strict"]) == 0
    terminal.printed_before_each_read.append(capsys.readouterr())
    out = [printed.out for printed in terminal.printed_before_each_read]
    err = [printed.err for printed in terminal.printed_before_each_read]
    # each answer is printed before the next line is read; the last read finds the end of input
    assert out == ["", f"{expected[0]}\n", "", "\n", f"{expected[1]}\n", ""]
    assert "Ctrl-D ends" in err[0]
    # a bad line is its own error (numbered as typed) and the session goes on
    assert err[2].startswith("error: stdin line 2 is not valid UTF-8") and err[2].count("\n") == 1

    terminal = Terminal([b"Ein Mann f\xc3\xa4hrt Fahrrad.\n", b"Zwei Hunde.\n"], capsys)
    monkeypatch.setattr(sys, "stdin", terminal)
    assert main(["translate", "--checkpoint", str(run_dir), "--nbest", "2"]) == 0
    terminal.printed_before_each_read.append(capsys.readouterr())
    numbers = [[row.split("\t")[0] for row in p.out.splitlines()] for p in terminal.printed_before_each_read]
    assert numbers[0] == [] and numbers[1] == ["0", "0"] and numbers[2] == ["1", "1"]


def test_translate_at_a_terminal_draws_from_one_stream_for_the_session(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """With --sampling, a line typed twice is drawn anew, as in fairseq-interactive, not the seed's same
    draw again; the session as a whole is still fixed by the seed."""
    line = "Ein Mann fährt Fahrrad mit zwei Hunden im Schnee."
    command = ["translate", "--checkpoint", str(run_dir), "--sampling", "--temperature", "3", "--seed", "4"]

    def session() -> list[str]:
        terminal = Terminal([line.encode() + b"\n"] * 3, capsys)
        monkeypatch.setattr(sys, "stdin", terminal)
        assert main(command) == 0
        terminal.printed_before_each_read.append(capsys.readouterr())
        out = "".join(printed.out for printed in terminal.printed_before_each_read)
        return out[:-1].split("\n")  # at "\n" alone, as in the test above

    first = session()
    assert len(first) == 3 and len(set(first)) > 1
    alone = Translator.from_checkpoint(run_dir).translate([line], sampling=Sampling(3.0, seed=4))
    assert first[0] == single_line(alone[0])  # the session's first draw is the seed's
    assert session() == first


def test_translate_cli_prints_n_best_lists(run_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.de"
    source.write_text("Ein Mann fährt Fahrrad.\n\nZwei Hunde spielen im Schnee.\n")
    command = ["translate", "--checkpoint", str(run_dir), "--input", str(source), "--nbest", "3"]
    assert main(command) == 0
    by_line: dict[int, list[tuple[float, str]]] = {}
    for row in capsys.readouterr().out.splitlines():
        line, score, text = row.split("\t")
        by_line.setdefault(int(line), []).append((float(score), text))
    assert sorted(by_line) == [0, 1, 2] and by_line[1] == [(0.0, "")]  # the blank line keeps its place
    for line in (0, 2):
        scores = [score for score, _ in by_line[line]]
        assert 2 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    # Each list starts with what a beam of 3 (the least that holds 3) translates the line to.
    best = Translator.from_checkpoint(run_dir).translate(source.read_text().splitlines(), beam=3)
    assert [by_line[line][0][1] for line in (0, 1, 2)] == best

    # The length penalty reaches the scores: with α = 0 a score is the log-probability itself.
    assert main([*command, "--length-penalty", "0"]) == 0
    unpenalised = [float(row.split("\t")[1]) for row in capsys.readouterr().out.splitlines()]
    assert unpenalised[0] < by_line[0][0][0]  # log p / ((5 + |Y|) / 6)^0.6 is nearer 0 than log p

    assert main([*command, "--beam", "2"]) == 2
    assert "beam of at least 3" in one_error_line(capsys)
    for n in ("0", "200"):  # not a beam of 200, which was never asked for
        assert main([*command[:-1], n]) == 2
        assert "translations per sentence must be 1 to 128, got " + n in one_error_line(capsys)


def test_invisible_characters_are_left_out_of_the_sentence_to_translate(run_dir: Path) -> None:
    """A BOM where files were joined, a zero-width space, NUL: a line of them is blank, and beside words
    they change nothing (SentencePiece had given them pieces, which the model translated)."""
    translator = Translator.from_checkpoint(run_dir)
    plain = translator.translate(["Ein Mann fährt Fahrrad."], beam=1)
    marked = ["\ufeffEin Mann fährt Fahrrad.", "Ein Mann\u200b fährt Fahrrad.\x00", "\ufeff", " \u200b\x00 "]
    assert translator.translate(marked, beam=1) == plain * 2 + ["", ""]


def test_translator_api(run_dir: Path) -> None:
    translator = Translator.from_checkpoint(run_dir)
    out = translator.translate(["Ein Mann.", "", "Eine Frau."], beam=2)
    assert len(out) == 3 and out[1] == "" and all(isinstance(s, str) for s in out)
    assert translator.translate(["Ein Mann."], beam=1) == translator.translate(["Ein Mann."], beam=1)


def test_evaluate_cli_json(run_dir: Path, data_dir: Path, capsys, monkeypatch) -> None:
    assert main(["evaluate", "--checkpoint", str(run_dir), "--beam", "1", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n_sentences"] == 20
    assert "case:lc" in scores["bleu_lc_signature"]
    # The command scores exactly what the Python API translates, against the split's references.
    sources, references = read_lines(data_dir / "test2016.de"), read_lines(data_dir / "test2016.en")
    expected = score(Translator.from_checkpoint(run_dir).translate(sources, beam=1), references)
    assert scores == expected.to_dict()
    # --beam and --length-penalty reach the search
    searched = []
    real_translate = Translator.translate

    def spy(self, sentences, beam=None, length_penalty=None, **kwargs):
        searched.append((beam, length_penalty))
        return real_translate(self, sentences, beam, length_penalty, **kwargs)

    monkeypatch.setattr(Translator, "translate", spy)
    assert (
        main(["evaluate", "--checkpoint", str(run_dir), "--beam", "2", "--length-penalty", "2", "--json"])
        == 0
    )
    assert searched == [(2, 2.0)]
    monkeypatch.undo()
    capsys.readouterr()

    # Given files, and another split of the run's data, scored the same way; --source needs --reference.
    val_de, val_en = data_dir / "val.de", data_dir / "val.en"
    expected = score(
        Translator.from_checkpoint(run_dir).translate(read_lines(val_de), beam=1), read_lines(val_en)
    )
    files = ["--source", str(val_de), "--reference", str(val_en)]
    for given in (files, ["--split", "val"]):
        assert main(["evaluate", "--checkpoint", str(run_dir), "--beam", "1", "--json", *given]) == 0
        assert json.loads(capsys.readouterr().out) == expected.to_dict()
    assert main(["evaluate", "--checkpoint", str(run_dir), "--source", str(val_de)]) == 2
    assert one_error_line(capsys) == "error: --source and --reference go together"
    assert main(["evaluate", "--checkpoint", str(run_dir), *files, "--split", "val"]) == 2  # not one ignored
    assert (
        one_error_line(capsys) == "error: --split and --source/--reference each name what is scored: give one"
    )


def test_evaluate_finds_a_relative_data_dir_from_elsewhere(
    run_dir: Path, data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # A run trained from its project directory with data_dir=data/multi30k records the absolute path too:
    # `evaluate` run from another directory reads the data through it.
    record = json.loads((run_dir / "config.json").read_text())
    assert record["data_dir_absolute"] == str(data_dir.resolve())
    monkeypatch.chdir(data_dir.parent)
    relative = run_record({}, {"data_dir": data_dir.name}, "", {})
    assert relative["data_dir_absolute"] == str(data_dir.resolve())

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    record["train"]["data_dir"] = data_dir.name
    (moved / "config.json").write_text(json.dumps(record))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--checkpoint", str(moved), "--beam", "1", "--json"]) == 0
    sources, references = read_lines(data_dir / "test2016.de"), read_lines(data_dir / "test2016.en")
    expected = score(Translator.from_checkpoint(run_dir).translate(sources, beam=1), references)
    assert json.loads(capsys.readouterr().out) == expected.to_dict()

    # Without the absolute path (runs written before it was recorded) the error says where it looked.
    del record["data_dir_absolute"]
    (moved / "config.json").write_text(json.dumps(record))
    assert main(["evaluate", "--checkpoint", str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: data directory {data_dir.name} does not exist (looked for from {elsewhere})"


def test_average_cli_makes_a_loadable_run(run_dir: Path, tmp_path: Path, capsys) -> None:
    steps = sorted(run_dir.glob("step-*.safetensors"))
    assert len(steps) == 2
    out = tmp_path / "averaged"
    assert main(["average", "--checkpoints", *map(str, steps), "--out", str(out)]) == 0
    averaged, expected = load_weights(out / "best.safetensors"), average_weights(steps)
    assert averaged.keys() == expected.keys() and all(torch.equal(averaged[k], expected[k]) for k in averaged)
    for name in ("config.json", "tokenizer.model"):  # what a Translator needs beside the weights
        assert (out / name).read_bytes() == (run_dir / name).read_bytes()
    assert Translator.from_checkpoint(out).translate(["Ein Hund."], beam=1)[0]
    assert capsys.readouterr().out == f"averaged 2 checkpoints into {out / 'best.safetensors'}\n"
    # One checkpoint is a copy, said so; one named twice would count twice, refused.
    single = tmp_path / "single.safetensors"
    assert main(["average", "--checkpoints", str(steps[0]), "--out", str(single)]) == 0
    captured = capsys.readouterr()
    assert "the result is a copy of it" in captured.err and "averaged 1 checkpoint into" in captured.out
    assert main(["average", "--checkpoints", str(steps[0]), str(steps[0]), "--out", str(single)]) == 2
    assert "is named twice: it would count twice in the average" in capsys.readouterr().err


def test_resume_continues_from_the_saved_step(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    train(tiny_recipe(data_dir, max_steps=40), TINY_MODEL, run, resume=True)
    steps = [r["step"] for r in records(run, "train")]
    assert steps[:6] == [5, 10, 15, 20, 25, 30] and steps[6:] == [35, 40]
    assert [r["step"] for r in records(run, "valid")] == [15, 30, 40]
    # The first run had cooled its rate down to 0 at its budget's end (cooldown 0.2 of 30 steps); given 10
    # more steps, the rate returns to the paper's schedule and cools down again over the new budget's end.
    assert records(run, "cooldown_reset") == [{"event": "cooldown_reset", "step": 30}]
    assert [r["until"] for r in records(run, "cooldown")] == [30, 40]
    assert next(r["lr"] for r in records(run, "train") if r["step"] == 35) > 0
    elapsed = [r["elapsed"] for r in records(run, "train")]
    assert elapsed[6] > elapsed[5], "the run's clock (and its time budget) continues across a resume"


def test_a_step_budget_that_ends_with_an_epoch_counts_the_epoch_and_validates_once(
    data_dir: Path, tmp_path: Path
) -> None:
    once = {"eval_every": 0, "test_split": "", "average_last": 0}  # validate once per epoch
    train(tiny_recipe(data_dir, max_steps=0, max_epochs=1, **once), TINY_MODEL, tmp_path / "epoch")
    steps = load_state(tmp_path / "epoch" / "last.state.pt")["progress"]["step"]
    # The same steps, now ended by max_steps at the epoch's last batch rather than by max_epochs.
    run = tmp_path / "budget"
    train(tiny_recipe(data_dir, max_steps=steps, max_epochs=5, **once), TINY_MODEL, run)
    progress = load_state(run / "last.state.pt")["progress"]
    assert (progress["step"], progress["epoch"], progress["batch"]) == (steps, 1, 0)
    assert [r["step"] for r in records(run, "valid")] == [steps]
    # Given more steps, the run goes on with the second epoch, without validating the saved step again.
    train(tiny_recipe(data_dir, max_steps=steps + 2, max_epochs=5, **once), TINY_MODEL, run, resume=True)
    assert [(r["step"], r["epoch"]) for r in records(run, "valid")] == [(steps, 1), (steps + 2, 1)]


def test_progress_reads_what_older_runs_saved() -> None:
    progress = Progress(step=7, epoch=2, batch=3, best_bleu=4.5, window=Window(loss=1.5, tokens=9))
    assert Progress.from_dict(progress.to_dict()) == progress
    assert progress.to_dict()["window"] == {"loss": 1.5, "tokens": 9, "pad": 0.0, "batches": 0}
    # A run saved before some fields existed resumes with their defaults; a field it no longer has is ignored.
    old = Progress.from_dict({"step": 7, "epoch": 2, "batch": 3, "retired_field": 1})
    assert old == Progress(step=7, epoch=2, batch=3, batch_order=1) and old.validated_step == -1
    # but for the batch order: such a run shuffled with the first one, and a new run with the newest
    assert Progress().batch_order == BATCH_ORDER == 2


def test_a_run_saved_with_the_first_batch_order_ends_its_epoch_with_it(
    run_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run saved mid-epoch before the second batch order existed resumes onto the batches it would have
    taken, then draws its next epochs with the newest order."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    envelope = torch.load(run / "last.state.pt", weights_only=True)
    progress = envelope["state"]["progress"]
    assert progress["batch"] > 0, "the fixture's run must end mid-epoch"
    del progress["batch_order"]  # as the runs before it saved their progress
    torch.save(envelope, run / "last.state.pt")
    orders: list[tuple[int, int]] = []
    batches = dataset_module.token_batches

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs["shuffle"]:
            orders.append((kwargs["epoch"], kwargs["order"]))
        return batches(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "token_batches", spy)
    train(tiny_recipe(data_dir, max_steps=60), TINY_MODEL, run, resume=True)
    epoch = progress["epoch"]
    assert orders[:2] == [(epoch, 1), (epoch + 1, 2)]
    assert load_state(run / "last.state.pt")["progress"]["batch_order"] == 2


def test_init_from_starts_a_new_run_from_the_parents_weights_model_and_tokenizer(
    run_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    child = tmp_path / "child"
    # A rate so small that a step leaves the weights where they started: the parent's best ones, not the
    # seed's random ones. The model settings, the parent's own, are no change.
    recipe = tiny_recipe(
        data_dir,
        init_from=str(run_dir),
        max_steps=1,
        lr_factor=1e-9,
        eval_every=0,
        average_last=0,
        test_split="",
    )
    train(recipe, TINY_MODEL, child)
    assert (child / "tokenizer.model").read_bytes() == (run_dir / "tokenizer.model").read_bytes()
    parent, record = (
        json.loads((run_dir / "config.json").read_text()),
        json.loads((child / "config.json").read_text()),
    )
    assert record["model"] == parent["model"] and record["train"]["init_from"] == str(run_dir)
    best = load_weights(run_dir / "best.safetensors")
    for key, value in load_weights(child / "last.safetensors").items():
        torch.testing.assert_close(value, best[key], atol=1e-6, rtol=0, msg=key)
    assert records(child, "init") == [
        {"event": "init", "checkpoint": str((run_dir / "best.safetensors").resolve())}
    ]
    assert not records(child, "tokenizer")  # none trained
    # A new optimizer and schedule: the steps count from 0 again (the parent took 30).
    assert load_state(child / "last.state.pt")["progress"]["step"] == 1
    # A resume goes on from the run's own checkpoint, not from the parent again.
    train(dataclasses.replace(recipe, max_steps=2), TINY_MODEL, child, resume=True)
    assert load_state(child / "last.state.pt")["progress"]["step"] == 2 and len(records(child, "init")) == 1


def test_init_from_refuses_a_missing_parent_and_another_model(
    run_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(TransformerError, match=r"init_from=.*nowhere: .*nowhere"):
        train(tiny_recipe(data_dir, init_from=str(tmp_path / "nowhere")), TINY_MODEL, tmp_path / "a")
    with pytest.raises(TransformerError, match=r"starts from that run's model: d_ff, n_heads cannot change"):
        model = {**TINY_MODEL, "n_heads": 4, "d_ff": 128}
        train(tiny_recipe(data_dir, init_from=str(run_dir)), model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing


def test_init_from_takes_the_parents_model_family_and_warns_of_another_direction(
    run_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = Parent.read(str(run_dir))
    tc = tiny_recipe(data_dir, init_from=str(run_dir), model="rnn", preset="base", vocab_size=9000)
    adopted = parent.adopted_by(tc, {"d_model": 32})  # the parent's own width: no change
    assert (adopted.model, adopted.preset, adopted.vocab_size) == ("transformer", "small", 400)
    assert "warning" not in capsys.readouterr().out
    parent.adopted_by(dataclasses.replace(tc, src_lang="en", tgt_lang="de"), {})
    assert f"init_from={run_dir} translates de→en, this run en→de" in capsys.readouterr().out


def test_resume_refuses_a_changed_model(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with pytest.raises(TransformerError, match="d_model: 32 -> 48"):
        train(tiny_recipe(data_dir, max_steps=40), {**TINY_MODEL, "d_model": 48}, run, resume=True)


def test_tokens_per_second_leave_out_building_an_epochs_batches(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch's batches take a minute to build at 36M pairs; counted as training time, they made the
    first record of every epoch report a tenth of the speed."""
    build = Corpus.batches

    def slow(self: Corpus, *args: object, **kwargs: object) -> object:
        time.sleep(2.0)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(Corpus, "batches", slow)
    run = tmp_path / "run"
    train(tiny_recipe(data_dir, max_steps=2, log_every=1, eval_every=0, average_last=0), TINY_MODEL, run)
    first = records(run, "train")[0]
    assert first["tokens_seen"] / first["tokens_per_s"] < 1.0  # two tiny steps' seconds, not the 2 s sleep


def test_a_smaller_vocabulary_than_asked_for_is_announced(data_dir: Path, tmp_path: Path, capsys) -> None:
    pairs = list(zip(read_lines(data_dir / "val.de"), read_lines(data_dir / "val.en"), strict=True))
    tokenizer = build_tokenizer(
        pairs, tiny_recipe(data_dir, vocab_size=8000), tmp_path, MetricsLog(tmp_path / "m")
    )
    assert tokenizer.vocab_size < 8000
    assert f"vocabulary: {tokenizer.vocab_size} pieces, fewer than vocab_size=8000" in capsys.readouterr().out


def test_a_corpus_over_tokenizer_lines_trains_the_vocabulary_on_a_seeded_sample(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """SentencePiece keeps every line it trains on in memory: a large corpus gives it a sample, both
    sides of `tokenizer_lines // 2` pairs, the same for the same seed."""
    pairs = list(zip(read_lines(data_dir / "train.de"), read_lines(data_dir / "train.en"), strict=True))
    assert prepare.tokenizer_sample(pairs, 400, seed=1) == [t for pair in pairs for t in pair]
    sample = prepare.tokenizer_sample(pairs, 101, seed=1)
    assert len(sample) == 100 and set(sample) < {t for pair in pairs for t in pair}
    assert sample == prepare.tokenizer_sample(pairs, 101, seed=1)
    assert sample != prepare.tokenizer_sample(pairs, 101, seed=2)
    chosen = list(zip(sample[::2], sample[1::2], strict=True))
    assert chosen == [pair for pair in pairs if pair in chosen]  # whole pairs, in the corpus's order

    log = MetricsLog(tmp_path / "m.jsonl")
    build_tokenizer(pairs, tiny_recipe(data_dir, tokenizer_lines=101), tmp_path, log)
    out = capsys.readouterr().out
    assert "tokenizer: training on a sample, 100 of the 400 lines (tokenizer_lines=101)" in out
    assert json.loads((tmp_path / "m.jsonl").read_text())["lines"] == 100
    # Not a sample where only blank sides were left out
    build_tokenizer([*pairs[:100], ("", "")], tiny_recipe(data_dir, tokenizer_lines=202), tmp_path, log)
    assert "sample" not in capsys.readouterr().out


def test_the_training_text_read_in_blocks_gives_the_digest_and_sample_of_the_whole(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train` reads its training split once, a block at a time, for its digest, its size and the
    tokenizer's sample (kept a block at a time): the same as the whole split gives at once."""
    pairs = read_split(data_dir, "train", "de", "en")
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", 7)
    for lines in (101, 400):
        tc = tiny_recipe(data_dir, tokenizer_lines=lines)
        text = prepare.scan_training_text(tc, sample=True)
        assert (text.digest, text.pairs) == (data_sha256(pairs), len(pairs))
        assert text.sample.take_lines() == prepare.tokenizer_sample(pairs, lines, tc.seed)
        assert text.sample.take_lines() == []  # taken
    assert prepare.scan_training_text(tc, sample=False).sample is None


def test_a_runs_tokenizer_is_the_one_its_text_gives(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """`train` trains SentencePiece on a sample it took a block at a time while reading the text: the same
    lines as from the whole text, so the same model, byte for byte."""
    pairs = read_split(data_dir, "train", "de", "en")
    tokenizer = build_tokenizer(pairs, tiny_recipe(data_dir), tmp_path, MetricsLog(tmp_path / "m.jsonl"))
    assert tokenizer.model_bytes == (run_dir / "tokenizer.model").read_bytes()


def test_the_round_trip_check_takes_at_most_round_trip_lines_spread_over_the_sample(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2M-line sample took 31 s to check; `ROUND_TRIP_LINES` evenly spaced lines show a lossy tokenizer
    as well, from every part of the corpus, and the log says how many were checked."""
    pairs = list(zip(read_lines(data_dir / "train.de"), read_lines(data_dir / "train.en"), strict=True))
    checked: list[Sequence[str]] = []
    check = prepare.round_trip_mismatches

    def spy(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
        checked.append(texts)
        return check(tokenizer, texts)

    monkeypatch.setattr(prepare, "round_trip_mismatches", spy)
    monkeypatch.setattr(prepare, "ROUND_TRIP_LINES", 30)
    log = MetricsLog(tmp_path / "m.jsonl")
    build_tokenizer(pairs, tiny_recipe(data_dir), tmp_path, log)
    texts = [t for pair in pairs for t in pair]
    assert len(texts) == 400 and checked == [texts[::14]]  # 29 lines, 14 apart, from first to last part
    event = json.loads((tmp_path / "m.jsonl").read_text())
    assert (event["lines"], event["round_trip_lines"], event["round_trip_mismatches"]) == (400, 29, 0)


def test_early_stopping_ends_the_run_patience_validations_after_its_best(
    data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    bleu = iter([10.0, 12.0, 11.0, 9.0, 50.0, 50.0])  # best at the second validation, then two worse ones

    def validate(*args) -> tuple[float, Scores]:
        return 1.0, Scores(next(bleu), 0.0, 0.0, "", "", "", 20)

    monkeypatch.setattr(train_module, "validate", validate)
    recipe = tiny_recipe(data_dir, max_steps=60, eval_every=5, patience=2, test_split="", average_last=0)
    train(recipe, TINY_MODEL, tmp_path / "run")
    assert [r["step"] for r in records(tmp_path / "run", "valid")] == [5, 10, 15, 20]
    progress = load_state(tmp_path / "run" / "last.state.pt")["progress"]
    assert (progress["step"], progress["best_bleu"], progress["stale_evals"]) == (20, 12.0, 2)


def scored_by_step(monkeypatch: pytest.MonkeyPatch, bleu: dict[int, float], average: float) -> dict[str, int]:
    """Validations score the BLEU `bleu` gives their step, the average of the last checkpoints `average`;
    returns where the step being validated is noted."""
    step = {"now": 0}
    evaluate_and_save = train_module.TrainingLoop.evaluate_and_save

    def noting_the_step(self) -> bool:
        step["now"] = self.progress.step
        try:
            return evaluate_and_save(self)
        finally:
            step["now"] = 0  # then `finish` validates the average

    def validate(*args) -> tuple[float, Scores]:
        return 1.0, Scores(bleu[step["now"]] if step["now"] else average, 0.0, 0.0, "", "", "", 20)

    monkeypatch.setattr(train_module.TrainingLoop, "evaluate_and_save", noting_the_step)
    monkeypatch.setattr(train_module, "validate", validate)
    return step


def test_a_resume_replaces_an_averaged_best_only_with_better_weights(
    data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first run's average (BLEU 20) beat its checkpoints (12) and became `best`. Resumed for more
    steps, a checkpoint of 15 beats the run's best single one, not the average: `best` stays."""
    scored_by_step(monkeypatch, {5: 10.0, 10: 12.0, 15: 15.0, 20: 11.0}, average=20.0)
    run = tmp_path / "run"
    train(tiny_recipe(data_dir, max_steps=10, eval_every=5, test_split=""), TINY_MODEL, run)
    averaged = load_weights(run / "best.safetensors")
    assert not all(
        torch.equal(averaged[key], value)
        for key, value in load_weights(run / "step-0000010.safetensors").items()
    )
    scored_by_step(monkeypatch, {5: 10.0, 10: 12.0, 15: 15.0, 20: 11.0}, average=5.0)
    results = train(
        tiny_recipe(data_dir, max_steps=20, eval_every=5, test_split=""), TINY_MODEL, run, resume=True
    )
    assert results["valid_best_single"] == 15.0 and results["valid_averaged"] == 5.0
    best = load_weights(run / "best.safetensors")
    assert all(torch.equal(best[key], value) for key, value in averaged.items())


class Killed(BaseException):
    """A kill at a checkpoint save: nothing after it runs, nothing catches it."""


@pytest.mark.parametrize(
    ("killed_step", "killed_at"), [(10, "best"), (10, "step-0000010"), (10, "last"), (5, "step-0000005")]
)
def test_a_kill_between_the_saves_of_a_validation_leaves_best_the_best_after_a_resume(
    data_dir: Path, tmp_path: Path, monkeypatch, killed_step: int, killed_at: str
) -> None:
    """The validation at step 10 improves on step 5's (BLEU 12 against 10): whichever of its saves a kill
    stops, the resumed run's `best` is step 10's weights. Killed after `best` at the first validation,
    the run has `best` alone to resume from."""
    step = scored_by_step(monkeypatch, {5: 10.0, 10: 12.0}, average=0.0)
    save_checkpoint, kills = train_module.checkpoint.save_checkpoint, [killed_at]

    def killing(run_dir, name, *args, **kwargs) -> None:
        if step["now"] == killed_step and name in kills:
            kills.remove(name)  # once: the resumed run saves it
            raise Killed
        save_checkpoint(run_dir, name, *args, **kwargs)

    monkeypatch.setattr(train_module.checkpoint, "save_checkpoint", killing)
    recipe, run = tiny_recipe(data_dir, max_steps=10, eval_every=5, test_split=""), tmp_path / "run"
    with pytest.raises(Killed):
        train(recipe, TINY_MODEL, run)
    train(recipe, TINY_MODEL, run, resume=True)
    best, tenth = (load_weights(run / f"{name}.safetensors") for name in ("best", "step-0000010"))
    assert all(torch.equal(best[key], tenth[key]) for key in tenth)


def test_same_seed_same_losses(data_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = tiny_recipe(data_dir, max_steps=10, eval_every=0, test_split="", average_last=0)
    for name in ("a", "b"):
        train(recipe, TINY_MODEL, tmp_path / name)
    captured = capsys.readouterr()  # not a terminal: no progress bar redrawn, a plain line per log instead
    assert "\r" not in captured.err and "step 5 (epoch 1): loss " in captured.out
    assert records(tmp_path / "a", "train") and [r["loss"] for r in records(tmp_path / "a", "train")] == [
        r["loss"] for r in records(tmp_path / "b", "train")
    ]


def test_settings_from_overrides_and_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("src_lang: en\ntgt_lang: de\nmodel:\n  dropout: 0.3\n")
    tc, model = load_train_settings(
        str(recipe), {"max_tokens": "1234", "d_model": "64", "model.n_heads": "2"}
    )
    assert (tc.src_lang, tc.tgt_lang, tc.max_tokens) == ("en", "de", 1234)
    assert model == {"dropout": 0.3, "d_model": 64, "n_heads": 2}


def test_model_settings_are_checked_against_the_preset_and_misspellings_get_a_suggestion() -> None:
    _, model = load_train_settings(None, {"d_model": "252"})  # 4 heads in the small preset: 63 each
    assert model == {"d_model": 252}
    with pytest.raises(TransformerError, match="d_model=252 must be divisible by n_heads=8"):
        load_train_settings(None, {"d_model": "252", "preset": "base"})
    with pytest.raises(TransformerError, match="did you mean 'time_budget_minutes'"):
        load_train_settings(None, {"time_budget_minute": "3"})


def test_a_setting_given_again_overrides_the_earlier_value() -> None:
    assert parse_overrides(["seed=1", " max_steps = 5", "seed=2"]) == {"seed": "2", "max_steps": "5"}
    for given, d_model in (
        (["d_model=128", "model.d_model=512", "d_model=256"], 256),
        (["model.d_model=64"], 64),
    ):
        _, model = load_train_settings(None, parse_overrides(given))
        assert model == {"d_model": d_model}


def test_a_budget_is_raised_against_the_checkpoints_not_the_record_of_a_resume_that_failed(
    run_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A resume writes config.json before its first save: one that stops in between leaves the larger
    budget recorded. The next resume must still see it raised against the one the checkpoint's cool-down
    was planned for, reset the cool-down and train to the new end."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    record = json.loads((run / "config.json").read_text())
    record["train"]["max_steps"] = 40  # as the failed resume left it
    (run / "config.json").write_text(json.dumps(record))
    train(tiny_recipe(data_dir, max_steps=40), TINY_MODEL, run, resume=True)
    assert records(run, "cooldown_reset") == [{"event": "cooldown_reset", "step": 30}]
    assert [r["step"] for r in records(run, "train")][-1] == 40


def test_a_missing_test_split_or_an_unusable_validation_split_stops_the_run_before_it_trains(
    run_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Both were found only at the end, or at the first validation, after the training they waste. The
    test split may change on a resume: it is scored after training."""
    with pytest.raises(TransformerError, match="tset2016"):
        train(tiny_recipe(data_dir, test_split="tset2016"), TINY_MODEL, tmp_path / "typo")
    assert not list((tmp_path / "typo").glob("*.safetensors"))
    with pytest.raises(
        TransformerError, match="the 'val' split has no pair left to validate on: 20 of 20 have more"
    ):
        train(tiny_recipe(data_dir, max_len=3), {**TINY_MODEL, "max_len": 4}, tmp_path / "short")
    assert not list((tmp_path / "short").glob("*.safetensors"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    results = train(tiny_recipe(data_dir, test_split="val"), TINY_MODEL, run, resume=True)
    assert "val" in results and "test2016" not in results


def test_command_line_values_are_read_by_their_settings_type(tmp_path: Path) -> None:
    """Not as YAML 1.1, which made Norwegian False, a split named 2016 an int, 010 eight, and `*x` a
    syntax error; a bool still takes 1 and 0."""
    given = {"src_lang": "no", "tgt_lang": "on", "test_split": "2016", "max_steps": "010", "init_from": "*x"}
    tc, model = load_train_settings(None, {**given, "compile": "1", "share_embeddings": "0"})
    assert [getattr(tc, key) for key in given] == ["no", "on", "2016", 10, "*x"]
    assert (tc.compile, model) == (True, {"share_embeddings": False})
    with pytest.raises(TransformerError, match=r"max_tokens must be of type int, got '\[1'"):
        load_train_settings(None, {"max_tokens": "[1"})
    recipe = tmp_path / "recipe.yaml"  # where YAML reads an unquoted `no` as false, the error says so
    recipe.write_text("src_lang: no\n")
    with pytest.raises(TransformerError, match="src_lang must be of type str, got False: quote it in a YAML"):
        load_train_settings(str(recipe), {})

    @dataclasses.dataclass(frozen=True)
    class Settings:  # no config has a union field yet: the first member that takes the value wins
        steps: int | None = 0
        name: int | str = 0

    assert config_from_dict(Settings, {"steps": "none", "name": "de"}) == Settings(None, "de")
    assert config_from_dict(Settings, {"steps": "3", "name": "3"}) == Settings(3, 3)


def test_the_tokenizer_sets_the_vocabulary_sizes_and_padding_id(tmp_path: Path) -> None:
    for given in ({"src_vocab_size": "100"}, {"model.tgt_vocab_size": "1000"}, {"pad_id": "5"}):
        with pytest.raises(TransformerError, match="set by the trainer from the tokenizer"):
            load_train_settings(None, given)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  src_vocab_size: 1000\n")
    with pytest.raises(TransformerError, match="src_vocab_size: set by the trainer from the tokenizer"):
        load_train_settings(str(recipe), {})
    # and where train() is given them from Python, the tokenizer's win
    config = train_module.model_config_for(tiny_recipe(tmp_path), {"src_vocab_size": 100, "pad_id": 5}, 400)
    assert (config.src_vocab_size, config.tgt_vocab_size, config.pad_id) == (400, 400, 0)


def test_a_recipe_chooses_the_model_family(tmp_path: Path) -> None:
    """`model: rnn` as `model=rnn` does; where `model:` holds settings, `kind:` among them."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: rnn\n")
    assert load_train_settings(str(recipe), {}) == (TrainConfig(model="rnn"), {})
    recipe.write_text("model:\n  kind: birnn\n  hidden_size: 64\n")
    assert load_train_settings(str(recipe), {}) == (TrainConfig(model="birnn"), {"hidden_size": 64})
    assert load_train_settings(str(recipe), {"model": "rnn"})[0].model == "rnn"  # the command line's wins
    assert load_train_settings(None, parse_overrides(["model=rnn", "kind=birnn"]))[0].model == "birnn"
    config = train_module.model_config_for(TrainConfig(model="rnn"), {"kind": "birnn"}, 400)
    assert config.kind == "rnn"


def test_resume_goes_on_with_the_runs_own_settings(run_dir: Path, tmp_path: Path, capsys) -> None:
    """`--resume` alone takes the settings the run started with (not the defaults); settings given with it
    change them where a resume may (`max_steps`), and are refused where it may not."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["train", "--out", str(run), "--resume", "d_model=64"]) == 2
    assert "the model config differs (d_model: 32 -> 64)" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 0  # its budget is spent: nothing to train
    assert "nothing to train: the run's budget is spent at step 30" in capsys.readouterr().out
    assert [r["step"] for r in records(run, "train")][-1] == 30
    assert main(["train", "--out", str(run), "--resume", "max_steps=40", "eval_every=5"]) == 0
    assert [r["step"] for r in records(run, "valid")] == [15, 30, 35, 40]
    # the step size too, as the message of a run stopped on a non-finite loss tells its user to change it
    argv = [
        "train",
        "--out",
        str(run),
        "--resume",
        "max_steps=45",
        "lr_factor=0.5",
        "warmup=20",
        "clip_norm=1",
        "log_every=1",
    ]
    assert main(argv) == 0
    assert [r["step"] for r in records(run, "valid")][-1] == 45
    # ...and the schedule takes them: the cool-down over steps 41-45 falls from step 41's rate under the
    # new factor and warm-up
    lr = {r["step"]: r["lr"] for r in records(run, "train")}
    peak = noam_lr(41, 32, 20, 0.5)
    assert [lr[41], lr[42]] == pytest.approx([peak, peak * 4 / 5], rel=1e-9)


def test_the_command_re_executes_before_it_imports_torch() -> None:
    """`transformer` re-executes itself with the allocator setting at the start of `main`: torch imported
    before that would be imported twice (2.3 s of every command on 2 cores). The package's own names still
    load on first use."""
    code = (
        "import sys, transformer.cli; print('torch' in sys.modules); "
        "from transformer import Transformer, TransformerConfig; "
        "print(Transformer.__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "Transformer", "True"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_gives_one_clear_line(run_dir: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "no_such_key=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown setting 'no_such_key'" in one_error_line(capsys)
    assert main(["train", "max_tokens=lots", "--out", str(tmp_path / "x")]) == 2
    assert "max_tokens must be of type int" in one_error_line(capsys)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.de").write_text("a\nb\nc\n")
    (broken / "train.en").write_text("a\nb\n")
    assert main(["train", f"data_dir={broken}", "--out", str(tmp_path / "y")]) == 2
    line = one_error_line(capsys)
    assert "has 3 lines" in line and "has 2" in line and "train.de" in line and "train.en" in line

    assert main(["translate", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "nothing" in one_error_line(capsys)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt)
    weights = corrupt / "best.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["evaluate", "--checkpoint", str(corrupt)]) == 2
    assert "truncated" in one_error_line(capsys)

    assert (
        main(["translate", "--checkpoint", str(run_dir), "--beam", "0", "--input", str(data_dir / "val.de")])
        == 2
    )
    assert "beam size" in one_error_line(capsys)


def test_sigterm_saves_and_exits_cleanly(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = {**dataclasses.asdict(tiny_recipe(data_dir, max_steps=100_000, eval_every=0)), **TINY_MODEL}
    command = [sys.executable, "-m", "transformer.cli", "train", "--out", str(out)]
    command += [f"{key}={value}" for key, value in settings.items() if key != "test_split"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not records(out, "train"):  # training has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM at step ")
    state = load_state(out / "last.state.pt")
    assert state["progress"]["step"] >= 5
    train(
        tiny_recipe(data_dir, max_steps=state["progress"]["step"] + 5, eval_every=0),
        TINY_MODEL,
        out,
        resume=True,
    )
    assert load_state(out / "last.state.pt")["progress"]["step"] == state["progress"]["step"] + 5


@pytest.mark.parametrize("stdout", ["line by line", "in blocks", "with stderr"])
def test_training_outlives_the_reader_of_its_stdout(data_dir: Path, tmp_path: Path, stdout: str) -> None:
    """`transformer train | head -1`: the run goes on to its end and says so once on stderr, whether its
    stdout is written line by line or in blocks (a pipe's default, the last block written at exit), and
    when stderr went into the same pipe (`2>&1 | head`)."""
    out = tmp_path / "run"
    settings = {**dataclasses.asdict(tiny_recipe(data_dir, log_every=1)), **TINY_MODEL}
    command = [sys.executable, "-m", "transformer.cli", "train", "--out", str(out)]
    command += [f"{key}={value}" for key, value in settings.items() if key != "test_split"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env |= {"PYTHONUNBUFFERED": "1"} if stdout == "line by line" else {}
    stderr = subprocess.STDOUT if stdout == "with stderr" else subprocess.PIPE
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    if stdout == "line by line":
        assert process.stdout.readline().startswith("train: ")
    process.stdout.close()  # the reader exits, as head does
    err = process.stderr.read() if process.stderr else ""
    assert process.wait(timeout=120) == 0, err
    if process.stderr:
        assert err.count("stdout's reader has gone: training goes on") == 1, err
        assert "Traceback" not in err and "Broken pipe" not in err and "Exception ignored" not in err
    assert load_state(out / "last.state.pt")["progress"]["step"] == settings["max_steps"]
    assert (out / "best.safetensors").is_file()


def test_the_default_recipe_file_spells_out_the_defaults() -> None:
    """`transformer train` and `transformer train --config experiments/multi30k-de-en.yaml` are one run."""
    from transformer.cli import load_train_settings
    from transformer.config import TrainConfig, TransformerConfig

    recipe = Path(__file__).resolve().parent.parent / "experiments" / "multi30k-de-en.yaml"
    tc, model = load_train_settings(str(recipe), {})
    assert tc == TrainConfig()
    assert TransformerConfig.preset(tc.preset, **model) == TransformerConfig.preset(tc.preset)


def test_decoding_precision(run_dir: Path, tmp_path: Path, capsys) -> None:
    """`--precision bf16` decodes with bf16 weights (one line out per line in, as in fp32); fp16 needs
    CUDA and says so in one line."""
    translator = Translator.from_checkpoint(run_dir, precision="bf16")
    assert {p.dtype for p in translator.model.parameters()} == {torch.bfloat16}
    assert translator.model.cache_dtype == decoding_cache_dtype(torch.bfloat16)  # this CPU's rule
    assert Translator.from_checkpoint(run_dir).model.cache_dtype is None
    out = translator.translate(["Ein Mann.", "", "Eine Frau."], beam=2)
    assert len(out) == 3 and out[1] == "" and out[0]
    source = tmp_path / "in.de"
    source.write_text("Ein Mann fährt Fahrrad.\n\nZwei Hunde.\n")
    args = ["translate", "--checkpoint", str(run_dir), "--input", str(source), "--precision"]
    assert main([*args, "bf16"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split("\n")) == 4
    # where torch emulates bf16, the command says it will be slow
    assert ("without bf16 instructions" in captured.err) == (not has_native_bf16("cpu"))
    assert main([*args, "fp16"]) == 2
    assert "fp16 needs a CUDA device" in one_error_line(capsys)


def test_blank_lines_are_dropped_as_empty_pairs(data_dir: Path, tmp_path: Path) -> None:
    """A blank or whitespace-only side has no tokens, so its pair is dropped and counted as empty (the
    tokenizer used to give it SentencePiece's lone word-boundary piece, and it was trained on)."""
    pairs = list(zip(read_lines(data_dir / "val.de"), read_lines(data_dir / "val.en"), strict=True))
    tokenizer = prepare.build_tokenizer(pairs, tiny_recipe(data_dir), tmp_path, MetricsLog(tmp_path / "m"))
    corpus, stats = encode_corpus([("", "Two dogs."), ("Zwei Hunde.", "  "), pairs[0]], tokenizer, 64)
    assert stats == {"pairs": 3, "kept": 1, "empty": 2, "too_long": 0} and len(corpus) == 1


def test_an_over_long_validation_line_is_left_out_of_validation(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """Training filters its own split by max_len; a validation line longer than the model takes would
    crash the first validation, after the steps before it were trained: it is left out, with a warning."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    with open(data / "val.de", "a") as f:
        f.write(" ".join(["Hund"] * 400) + "\n")
    with open(data / "val.en", "a") as f:
        f.write("A dog.\n")
    train(tiny_recipe(data, max_steps=15), {**TINY_MODEL, "max_len": 128}, tmp_path / "run")
    assert "warning: 1 val pairs have more than the model's 127 tokens a side" in capsys.readouterr().out
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_a_max_len_beyond_the_models_is_refused_before_anything_is_written(
    data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(TransformerError, match=r"max_len=64 lets through .* \(model.max_len=32,"):
        train(tiny_recipe(data_dir), {**TINY_MODEL, "max_len": 32}, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_new_run_removes_the_temp_files_of_a_run_killed_before_its_first_checkpoint(
    data_dir: Path, tmp_path: Path
) -> None:
    """A new run killed while it kept its training ids leaves their parts (gigabytes at WMT's size); a
    resume has no checkpoint to start from, so the next new run in the directory removes them. Those of
    a live process are another run's, and stay."""
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = run / f".train.ids.src.ids.tmp-{int(dead.stdout)}"
    live = run / f".train.ids.src.ids.tmp-{os.getpid()}"
    for path in (stale, live):
        path.write_bytes(b"ids")
    with pytest.raises(TransformerError, match=r"max_len=64 lets through"):  # stops after the tokenizer
        train(tiny_recipe(data_dir), {**TINY_MODEL, "max_len": 32}, run)
    assert not stale.exists() and live.exists()


def test_settings_may_follow_the_options() -> None:
    from transformer.cli import _parse, build_parser

    args = _parse(build_parser(), ["train", "max_steps=5", "--out", "x", "data_dir=d", "lr_factor=1"])
    assert args.overrides == ["max_steps=5", "data_dir=d", "lr_factor=1"] and args.out == "x"
    with pytest.raises(SystemExit):  # what is not a setting is still argparse's error
        _parse(build_parser(), ["train", "--out", "x", "--bogus"])
    with pytest.raises(SystemExit):  # and a command without settings takes none
        _parse(build_parser(), ["average", "--checkpoints", "a", "--out", "b", "k=v"])
