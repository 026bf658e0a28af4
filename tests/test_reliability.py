"""Faults a run must survive, odd input translation must take, and bad input that must fail cleanly.

The training runs here are tiny (10 updates of a 1+1-layer model on 200 pairs, 4 validation pairs), so that
killing, resuming and comparing whole runs stays fast.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from transformer import checkpoint, distributed, prepare, rundir
from transformer import train as train_module
from transformer import translate as translate_module
from transformer.checkpoint import load_checkpoint, load_state, load_weights, save_weights
from transformer.cli import main
from transformer.config import TrainConfig
from transformer.data.dataset import Corpus, TokenSequences
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError
from transformer.rundir import (
    IDS_FORMAT,
    TRAIN_IDS,
    TrainingIdsWriter,
    check_resumable,
    drop_partial_line,
    load_training_ids,
    read_run_record,
    resume_point,
)
from transformer.textio import decode_lines, decode_stream, single_line
from transformer.train import MAX_BAD_STEPS, train
from transformer.translate import Translator

MODEL = {**TINY_MODEL, "max_len": 80}  # a short positional table, so over-long input is cheap to make


@pytest.fixture(scope="module")
def quick_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 200 training pairs with only 4 validation pairs, so validations cost little."""
    out = tmp_path_factory.mktemp("quick-data")
    for lang in ("de", "en"):
        shutil.copy(data_dir / f"train.{lang}", out / f"train.{lang}")
        lines = (data_dir / f"val.{lang}").read_text().splitlines()[:4]
        (out / f"val.{lang}").write_text("\n".join(lines) + "\n")
    return out


def quick_recipe(data: Path, **changes: Any) -> TrainConfig:
    """10 updates, validated and saved at 4, 8 and 10, logged every 3: a checkpoint falls inside a log
    window, so a resume must restore the window's partial sums to log what the unbroken run logs. The
    rate cools down from update 5 to 0 at 10, so resuming before, at and inside the cool-down is tested."""
    # One thread in every process: bit-identical weights need the same reduction order in the killed run,
    # the resumed one and the reference (an attention key bias has zero true gradient, so Adam turns any
    # rounding difference in it into a full-size step).
    settings = {
        "max_steps": 10,
        "cooldown": 0.5,
        "eval_every": 4,
        "log_every": 3,
        "average_last": 0,
        "test_split": "",
        "threads": 1,
    }
    return tiny_recipe(data, **{**settings, **changes})


def train_argv(recipe: TrainConfig, out: Path, *extra: str) -> list[str]:
    """`transformer train` arguments that build exactly `recipe` with the MODEL overrides."""
    values = {**dataclasses.asdict(recipe), **{f"model.{key}": value for key, value in MODEL.items()}}
    return ["train", "--out", str(out), *extra, *(f"{key}={value}" for key, value in values.items())]


@pytest.fixture(scope="module")
def reference(quick_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(quick_recipe(quick_data), MODEL, out)
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# What must match between runs (timings and throughput may differ).
COMPARED = {"train": ("step", "epoch", "loss", "lr", "padding"), "valid": ("step", "loss", "bleu", "chrf")}


def comparable(run_records: list[dict], after_step: int) -> list[tuple]:
    return [
        (r["event"], *(r[key] for key in COMPARED[r["event"]]))
        for r in run_records
        if r["event"] in COMPARED and r["step"] > after_step
    ]


def assert_same_history(resumed: list[tuple], unbroken: list[tuple]) -> None:
    assert [r[:2] for r in resumed] == [r[:2] for r in unbroken]
    for a, b in zip(resumed, unbroken, strict=True):
        for x, y in zip(a[2:], b[2:], strict=True):
            assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (a, b)


def one_error_line(capsys: pytest.CaptureFixture[str], *, progress: bool = False) -> str:
    """The one `error:` line a failed command printed to stderr. Only a training that got going
    (`progress`) may have printed progress bars before it, and reports on stdout."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in captured.err, err[-5:]
    assert progress or (len(err) == 1 and captured.out == ""), (err, captured.out)
    return errors[0]


# ------------------------------------------------------------------------------------------ SIGKILL

# Runs `transformer train` and SIGKILLs itself at a chosen point: no handler, no cleanup, as a crash or the
# OOM killer would. "step N": after the N-th update's backward pass, before the optimizer step.
# "write FILE K": while the K-th version of checkpoint file FILE is half written to its temp file.
KILLER = """
import os, signal, sys
from transformer import checkpoint, train
from transformer.cli import main

mode, where, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
calls = {}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "step":
    build = train.build_optimizer
    def build_optimizer(*args, **kwargs):
        optimizer, scheduler = build(*args, **kwargs)
        def pre_step(opt, args, kwargs):
            calls["step"] = calls.get("step", 0) + 1
            if calls["step"] == int(where):
                die()
        optimizer.register_step_pre_hook(pre_step)
        return optimizer, scheduler
    train.build_optimizer = build_optimizer
else:
    name, nth = where.split(":")
    atomic_write = checkpoint.atomic_write
    def killing_write(path, write):
        if path.name == name:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == int(nth):
                def half_then_die(tmp):
                    write(tmp)
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                    die()
                return atomic_write(path, half_then_die)
        return atomic_write(path, write)
    checkpoint.atomic_write = killing_write
sys.exit(main(argv))
"""


@pytest.mark.parametrize(
    ("mode", "where", "resumes_from", "step"),
    [
        ("step", "7", "last", 4),  # mid-step: the last save was at step 4
        ("write", "last.safetensors:2", "step-0000008", 8),  # `last` torn: new state, old weights
    ],
)
def test_sigkill_then_resume_equals_an_unbroken_run(
    mode: str, where: str, resumes_from: str, step: int, quick_data: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    argv = train_argv(quick_recipe(quick_data), run)
    done = subprocess.run([sys.executable, str(killer), mode, where, *argv], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]

    # The run directory holds a good checkpoint to go on from, and says which.
    name, weights, state, _ = resume_point(run)
    assert (name, state["progress"]["step"]) == (resumes_from, step)
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    train(quick_recipe(quick_data), MODEL, run, resume=True)
    log = records(run)
    resumed_at = max(i for i, r in enumerate(log) if r["event"] == "resume")
    assert log[resumed_at] == {"event": "resume", "step": step, "checkpoint": resumes_from}
    assert_same_history(comparable(log[resumed_at:], step), comparable(records(reference), step))
    assert {"event": "cooldown", "step": 5, "until": 10} in records(reference)
    for key, value in load_weights(reference / "last.safetensors").items():
        assert torch.equal(load_weights(run / "last.safetensors")[key], value), key
    assert not list(run.glob(".*.tmp-*")), "the killed write's temp file is cleaned up on resume"


def test_sigterm_mid_window_then_resume_logs_what_an_unbroken_run_logs(
    quick_data: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM saves `last` between log records (step 5 here); the resumed log must still match."""
    run = tmp_path / "run"
    original = train_module.build_optimizer

    def signalling_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer, scheduler = original(*args, **kwargs)
        steps = []

        def post_step(opt: Any, args: Any, kwargs: Any) -> None:
            steps.append(1)
            if len(steps) == 5:
                os.kill(os.getpid(), signal.SIGTERM)

        optimizer.register_step_post_hook(post_step)
        return optimizer, scheduler

    monkeypatch.setattr(train_module, "build_optimizer", signalling_optimizer)
    with pytest.raises(train_module.TrainingInterrupted, match="stopped by SIGTERM at step 5"):
        train(quick_recipe(quick_data), MODEL, run)
    monkeypatch.undo()
    assert load_state(run / "last.state.pt")["progress"]["window"]["tokens"] > 0  # steps 4-5 not yet logged
    train(quick_recipe(quick_data), MODEL, run, resume=True)
    assert_same_history(comparable(records(run), 5), comparable(records(reference), 5))


def test_a_fragment_of_a_metrics_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"event": "train", "step": 3}\n{"event": "tr')
    drop_partial_line(path)
    assert path.read_bytes() == b'{"event": "train", "step": 3}\n'
    drop_partial_line(path)
    assert path.read_bytes() == b'{"event": "train", "step": 3}\n'


# --------------------------------------------------------------------------------- NaN / inf losses


def poison_losses(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None, from_call: int = 0) -> None:
    """Make the training loss (not validation's) non-finite on the given calls, or from `from_call` on."""
    original = train_module.batch_loss  # the training loss alone: validation computes its own
    calls = [0]

    def loss(*args: Any) -> torch.Tensor:
        value = original(*args)
        calls[0] += 1
        if (bad_calls is not None and calls[0] in bad_calls) or (bad_calls is None and calls[0] >= from_call):
            return value * float("nan") if calls[0] % 2 else value * float("inf")
        return value

    monkeypatch.setattr(train_module, "batch_loss", loss)


def test_non_finite_losses_are_skipped_and_counted(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_losses(monkeypatch, {3, 6, 7})
    run = tmp_path / "run"
    train(quick_recipe(quick_data, max_steps=8), MODEL, run)
    skipped = [r for r in records(run) if r["event"] == "skipped_step"]
    assert [(r["step"], r["in_a_row"], r["total"]) for r in skipped] == [(2, 1, 1), (4, 1, 2), (4, 2, 3)]
    assert {r["reason"] for r in skipped} == {"non-finite loss"}
    progress = load_state(run / "last.state.pt")["progress"]
    assert (progress["step"], progress["skipped_steps"], progress["batch"]) == (8, 3, 11)
    losses = [r["loss"] for r in records(run) if r["event"] in ("train", "valid")]
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(t).all() for t in load_weights(run / "last.safetensors").values())


def test_repeated_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison_losses(monkeypatch, None, from_call=6)  # updates 1-5 are good; checkpoints at step 4
    run = tmp_path / "run"
    assert main(train_argv(quick_recipe(quick_data), run)) == 2
    line = one_error_line(capsys, progress=True)
    assert f"{MAX_BAD_STEPS} steps in a row had a non-finite loss" in line
    assert f"the last good checkpoint {run / 'last'} is kept" in line
    weights, state = load_checkpoint(run, "last", with_state=True)
    assert state is not None and state["progress"]["step"] == 4
    step4 = load_weights(run / "step-0000004.safetensors")
    assert all(torch.equal(weights[key], value) for key, value in step4.items())
    assert [r["total"] for r in records(run) if r["event"] == "skipped_step"] == list(range(1, 6))


# ------------------------------------------------------------------------ disk full, unwritable dir


def half_then_disk_full(tmp: Path) -> None:
    """A write that the disk cuts short: some bytes, then ENOSPC."""
    tmp.write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills while step 8's weights go to `last.safetensors`, its state already replaced: the
    worst moment, as `last` is left torn."""
    run = tmp_path / "run"
    before: dict[str, str] = {}
    atomic_write = checkpoint.atomic_write
    seen = [0]

    def failing_write(path: Path, write: Any) -> None:
        if path.name == "last.safetensors":
            seen[0] += 1
            if seen[0] == 2:
                before[path.name] = _digest(path)
                return atomic_write(path, half_then_disk_full)
        return atomic_write(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", failing_write)
    assert main(train_argv(quick_recipe(quick_data), run)) == 2
    line = one_error_line(capsys, progress=True)
    assert f"could not write checkpoint {run / 'last.safetensors'} (No space left on device)" in line
    assert "the previous checkpoint files are intact" in line
    assert _digest(run / "last.safetensors") == before["last.safetensors"], "the old weights are untouched"
    assert not list(run.glob(".*.tmp-*")), "no half-written file is left behind"
    # A resume goes on from step 8, saved completely as `step-0000008` just before.
    name, _, state, _ = resume_point(run)
    assert (name, state["progress"]["step"]) == ("step-0000008", 8)


def test_a_full_disk_when_keeping_the_training_ids_is_a_warning(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kept ids only save a resume some time: a run that cannot write them trains on, and says so."""
    run = tmp_path / "run"
    atomic_write = rundir.atomic_write

    def failing_write(path: Path, write: Any) -> None:
        return atomic_write(path, half_then_disk_full if path.name == TRAIN_IDS else write)

    monkeypatch.setattr(rundir, "atomic_write", failing_write)
    assert main(train_argv(quick_recipe(quick_data, max_steps=4, eval_every=0), run)) == 0
    out = capsys.readouterr().out
    assert "warning: the training ids were not kept ([Errno 28] No space left on device)" in out
    assert (run / "last.safetensors").is_file() and not (run / TRAIN_IDS).exists()
    assert not list(run.glob(".*.tmp-*")), "no half-written file is left behind"


def test_an_unwritable_directory_at_checkpoint_time_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """We run as root in CI, where chmod cannot make a directory unwritable: the write fails instead."""
    model = torch.nn.Linear(3, 2)
    checkpoint.save_checkpoint(tmp_path, "last", model, {"progress": {"step": 4}})
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}

    def refuse(obj: Any, path: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.torch, "save", refuse)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(TransformerError, match=r"could not write checkpoint .*\(Permission denied\)"):
        checkpoint.save_checkpoint(tmp_path, "last", model, {"progress": {"step": 8}})
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, "last", with_state=True)[1] == {"progress": {"step": 4}}


def test_an_unwritable_metrics_log_is_one_clear_line(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(self: Any, **record: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(rundir.MetricsLog, "write", full_disk)
    assert main(train_argv(quick_recipe(quick_data), tmp_path / "run")) == 1
    assert "No space left on device" in one_error_line(capsys, progress=True)


# ------------------------------------------------------------------------ a new run in a used directory


def test_a_new_run_refuses_a_directory_that_holds_any_checkpoint(
    reference: Path, quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only `last` counted: a step checkpoint left by a run killed at its first validation went into the
    new run's average (of another model: a failure after the training), and an average's `best` was
    replaced."""
    for name in ("step-0000010", "best"):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(reference / f"{name}.safetensors", out)
        assert main(train_argv(quick_recipe(quick_data), out)) == 2
        line = one_error_line(capsys)
        assert f"{out} already holds a run (checkpoints {name}): pass --resume to continue it" in line
        assert [p.name for p in out.iterdir()] == [f"{name}.safetensors"], "nothing is written there"


def test_a_new_run_after_one_that_failed_before_any_checkpoint_logs_its_own_history_alone(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped before its first checkpoint has nothing to resume: a new run in its directory went
    on appending to its metrics.jsonl, two runs' steps in one log. The new run still reads the training
    ids the failed one kept (the same text, tokenizer and max_len)."""
    run = tmp_path / "run"
    poison_losses(monkeypatch, None)  # diverges at once
    with pytest.raises(TransformerError, match="no checkpoint was saved yet"):
        train(quick_recipe(quick_data), MODEL, run)
    assert [r["event"] for r in records(run)].count("skipped_step") == MAX_BAD_STEPS
    monkeypatch.undo()
    train(quick_recipe(quick_data, max_steps=4), MODEL, run)
    events = [r["event"] for r in records(run)]
    assert events.count("tokenizer") == events.count("data") == 1 and "skipped_step" not in events
    assert next(r for r in records(run) if r["event"] == "data")["train_ids_read"]


def test_the_tokenizer_is_written_synced_through_a_temp_file_the_cleanup_knows(
    quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It went through `tokenizer.model.partial`, never synced, which a kill left behind for good."""
    synced: list[int] = []
    renamed: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        fsync(fd)

    def recorded_replace(src: Any, dst: Any) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    path = tmp_path / "tokenizer.model"
    Tokenizer.train((quick_data / "train.en").read_text().splitlines(), path, vocab_size=400)
    assert renamed == [(f".tokenizer.model.tmp-{os.getpid()}", "tokenizer.model")]
    assert path.stat().st_ino in synced


# ------------------------------------------------------------- resuming a changed run, old versions


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def test_resume_refuses_a_changed_tokenizer(reference: Path, quick_data: Path, tmp_path: Path) -> None:
    run = copy_run(reference, tmp_path)
    Tokenizer.train(["ein ganz anderer Text", "other words"], run / "tokenizer.model", vocab_size=400)
    with pytest.raises(TransformerError, match=r"tokenizer\.model is not the one the run started with"):
        train(quick_recipe(quick_data, max_steps=16), MODEL, run, resume=True)
    with pytest.raises(TransformerError, match="not the tokenizer this run was trained with"):
        Translator.from_checkpoint(run)


def test_resume_refuses_changed_data(reference: Path, quick_data: Path, tmp_path: Path) -> None:
    run = copy_run(reference, tmp_path)
    changed = tmp_path / "data"
    shutil.copytree(quick_data, changed)
    lines = (changed / "train.en").read_text().splitlines()
    (changed / "train.en").write_text("\n".join([lines[0] + " Extra.", *lines[1:]]) + "\n")
    with pytest.raises(TransformerError, match=r"the train data in .* differs from the data the run started"):
        train(quick_recipe(changed, max_steps=16), MODEL, run, resume=True)

    # The same text in another place is the same data: the run may follow its data when it moves.
    saved = read_run_record(run)
    moved = {**saved, "train": {**saved["train"], "data_dir": str(tmp_path / "elsewhere")}}
    check_resumable(run, saved, moved)
    with pytest.raises(TransformerError, match="the train config differs"):
        check_resumable(run, {**saved, "data_sha256": None}, moved)  # a record without digests


def test_a_run_recorded_before_a_setting_existed_resumes_as_that_settings_default(
    reference: Path, quick_data: Path, tmp_path: Path
) -> None:
    run = copy_run(reference, tmp_path)
    record = json.loads((run / "config.json").read_text())
    del record["train"]["init_from"]  # as runs started before init_from existed recorded theirs
    (run / "config.json").write_text(json.dumps(record))
    saved = read_run_record(run)
    train(quick_recipe(quick_data, max_steps=12), MODEL, run, resume=True)
    current = read_run_record(run)
    assert current["train"]["init_from"] == "" and records(run)[-1]["event"] == "results"
    check_resumable(run, saved, current)
    # Another value than the default is still a change the record refuses.
    with pytest.raises(
        TransformerError, match=r"the train config differs \(init_from: None -> 'elsewhere'\)"
    ):
        check_resumable(run, saved, {**current, "train": {**current["train"], "init_from": "elsewhere"}})


def test_a_resume_reads_the_training_text_only_when_its_files_changed(
    reference: Path, quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rundir, "RACY_NS", 0)  # the files are copied just before: trust their times at once
    run, data = copy_run(reference, tmp_path), tmp_path / "data"
    shutil.copytree(quick_data, data)
    reads: list[str] = []
    iter_split = prepare.iter_split

    def counted(data_dir: Path, split: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(split)
        return iter_split(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(prepare, "iter_split", counted)
    train(quick_recipe(data, max_steps=12), MODEL, run, resume=True)
    assert reads == ["train"]  # the text moved: read for its digest, kept with its files' stamps
    kept = json.loads((run / rundir.TEXT_DIGEST).read_text())
    assert kept["sha256"] == read_run_record(run)["data_sha256"]["train"]
    assert [Path(f["path"]).name for f in kept["files"]] == ["train.de", "train.en"]
    reads.clear()
    train(quick_recipe(data, max_steps=14), MODEL, run, resume=True)
    assert reads == [] and records(run)[-1]["event"] == "results"
    # Other text of the same size, its modification time put back: the status-change time still tells.
    path = data / "train.en"
    before, text = path.stat(), path.read_text()
    path.write_text(text.replace("a", "e", 1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(TransformerError, match=r"the train data in .* differs from the data the run started"):
        train(quick_recipe(data, max_steps=16), MODEL, run, resume=True)
    assert reads == ["train"]


def test_text_stamps_vouch_only_for_files_unchanged_and_settled(tmp_path: Path) -> None:
    files = [tmp_path / "a.de", tmp_path / "a.en"]
    for path in files:
        path.write_text("text\n")
    taken = rundir.TextStamps.take(files)
    assert taken.settled(files) is None  # written just before they are read
    stamps = taken.files
    later = rundir.TextStamps(stamps, max(s["ctime_ns"] for s in stamps) + rundir.RACY_NS + 1)
    assert later.settled(files) == stamps
    rundir.keep_text_digest(tmp_path, "f" * 64, stamps)
    assert rundir.kept_text_digest(tmp_path, files) == "f" * 64
    assert rundir.kept_text_digest(tmp_path, files[::-1]) is None
    files[1].write_text("other text\n")
    assert later.settled(files) is None
    assert rundir.kept_text_digest(tmp_path, files) is None
    (tmp_path / rundir.TEXT_DIGEST).write_text("{not json")
    assert rundir.kept_text_digest(tmp_path, files) is None


def keep_ids(
    run_dir: Path, corpus: Corpus, counts: dict[str, int], key: dict[str, str], vocab_size: int = 100
) -> None:
    """A corpus's ids kept in `run_dir` in one block."""
    with TrainingIdsWriter(run_dir, key, vocab_size) as writer:
        writer.add(corpus.src, corpus.tgt)
        writer.finish(counts)


def test_kept_training_ids_are_read_back_only_under_their_key(tmp_path: Path) -> None:
    """What `TrainingIdsWriter` kept comes back equal under the same key. Under any other (other text,
    tokenizer or max_len) it is not used; a damaged file is one error, which train turns into a warning."""
    corpus = Corpus(TokenSequences([[5, 6, 7], [], [8]]), TokenSequences([[9], [10, 11], [12, 13, 14]]), [])
    counts = {"pairs": 5, "kept": 3, "empty": 1, "too_long": 1}
    key = {"text": "a" * 64, "tokenizer": "b" * 64, "max_len": "100"}
    assert load_training_ids(tmp_path, key) is None  # nothing kept yet
    keep_ids(tmp_path, corpus, counts, key)
    loaded, loaded_counts = load_training_ids(tmp_path, key)
    assert list(loaded.src) == list(corpus.src) and list(loaded.tgt) == list(corpus.tgt)
    assert loaded_counts == counts and loaded.tgt_text == []
    # Mapped from the file, not copied: a torchrun's processes share the pages.
    assert str(tmp_path / TRAIN_IDS) in Path("/proc/self/maps").read_text()
    nothing = Corpus(TokenSequences(), TokenSequences(), [])  # no pair kept: nothing to map
    (tmp_path / "none").mkdir()
    keep_ids(tmp_path / "none", nothing, {**counts, "kept": 0}, key)
    assert len(load_training_ids(tmp_path / "none", key)[0]) == 0
    for name in key:
        assert load_training_ids(tmp_path, {**key, name: "other"}) is None, name
    # The file is safetensors' own: the same tensors and metadata as its writer gives, whatever the blocks.
    # Its ids are 16-bit for a vocabulary of up to 2^16 pieces, 32-bit past that.
    metadata = {**key, "format": IDS_FORMAT, "counts": json.dumps(counts)}
    for vocab_size, dtype in ((1 << 16, np.uint16), ((1 << 16) + 1, np.int32)):
        arrays = {}
        for side in ("src", "tgt"):
            ids, offsets = getattr(corpus, side).arrays()
            arrays |= {f"{side}.ids": ids.astype(dtype), f"{side}.offsets": offsets}
        reference = tmp_path / f"reference-{vocab_size}.safetensors"
        save_file(arrays, str(reference), metadata=metadata)
        blocks = tmp_path / f"blocks-{vocab_size}"
        blocks.mkdir()
        with TrainingIdsWriter(blocks, key, vocab_size) as writer:
            writer.add(corpus.src[:1], corpus.tgt[:1])
            writer.add([], [])
            writer.add(corpus.src[1:], corpus.tgt[1:])
            writer.finish(counts)
        written = blocks / TRAIN_IDS
        with safe_open(str(written), "numpy") as ours, safe_open(str(reference), "numpy") as theirs:
            assert ours.metadata() == theirs.metadata() and set(ours.keys()) == set(theirs.keys())
            for name in theirs.keys():  # noqa: SIM118
                assert ours.get_tensor(name).dtype == theirs.get_tensor(name).dtype
                assert ours.get_tensor(name).tolist() == theirs.get_tensor(name).tolist()
        assert sorted(p.name for p in blocks.iterdir()) == [TRAIN_IDS], "no part left behind"
        shutil.copy(reference, blocks / TRAIN_IDS)  # either dtype is read (32 bits: files kept before 16)
        loaded, _ = load_training_ids(blocks, key)
        assert list(loaded.src) == list(corpus.src) and list(loaded.tgt) == list(corpus.tgt)
    big = Corpus(TokenSequences([[65535, 65536, 99999]]), TokenSequences([[70000]]), [])
    (tmp_path / "big").mkdir()
    keep_ids(tmp_path / "big", big, {**counts, "kept": 1}, key, vocab_size=100_000)
    loaded, _ = load_training_ids(tmp_path / "big", key)
    assert list(loaded.src) == [[65535, 65536, 99999]] and list(loaded.tgt) == [[70000]]
    path = tmp_path / TRAIN_IDS
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(TransformerError, match=r"train\.ids cannot be read"):
        load_training_ids(tmp_path, key)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(TransformerError, match=r"train\.ids cannot be read"):
        load_training_ids(tmp_path, key)


def test_joining_the_kept_ids_removes_each_part_once_it_is_copied(tmp_path: Path, monkeypatch) -> None:
    """So that joining the parts into train.ids needs about half the ids' size more on disk, not all of
    it: while a part is copied, the parts before it are gone."""
    corpus = Corpus(TokenSequences([[5, 6, 7], [8]]), TokenSequences([[9], [10, 11]]), [])
    left_at_each_copy = []
    real_copy = shutil.copyfileobj

    def copy_noting_parts(source: Any, out: Any, length: int = 0) -> None:
        left_at_each_copy.append(sorted(p.name for p in tmp_path.glob(f".{TRAIN_IDS}.*.tmp-*")))
        real_copy(source, out, length)

    monkeypatch.setattr(shutil, "copyfileobj", copy_noting_parts)
    keep_ids(tmp_path, corpus, {"pairs": 2, "kept": 2, "empty": 0, "too_long": 0}, {"text": "a"})
    assert [len(parts) for parts in left_at_each_copy] == [4, 3, 2, 1], left_at_each_copy
    loaded, _ = load_training_ids(tmp_path, {"text": "a"})
    assert list(loaded.src) == list(corpus.src) and list(loaded.tgt) == list(corpus.tgt)


def test_a_writer_of_training_ids_that_cannot_start_leaves_no_part_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk may stop `TrainingIdsWriter` while it creates its part files, before any `with` holds
    it: the parts it made are removed, and the error is the disk's."""
    opened: list[str] = []
    real_open = Path.open

    def open_until_full(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self.name)
        if len(opened) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_until_full)
    with pytest.raises(OSError, match="No space left"):
        TrainingIdsWriter(tmp_path, {"text": "a" * 64}, 100)
    assert len(opened) == 3 and list(tmp_path.iterdir()) == []


def test_a_resume_reads_the_kept_ids_and_tokenises_again_when_they_are_damaged(
    reference: Path, quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed run takes the training ids its start kept rather than tokenising the corpus again (the
    SIGKILL test above checks that it then trains exactly as the unbroken run). Kept ids that cannot be
    read cost a warning and a new tokenisation, which keeps them again."""
    assert [r["train_ids_read"] for r in records(reference) if r["event"] == "data"] == [False]
    run = copy_run(reference, tmp_path)
    train(quick_recipe(quick_data, max_steps=12), MODEL, run, resume=True)
    assert [r["train_ids_read"] for r in records(run) if r["event"] == "data"] == [False, True]
    assert f"train: token ids read from {run / TRAIN_IDS}" in capsys.readouterr().out

    os.truncate(run / TRAIN_IDS, 100)
    train(quick_recipe(quick_data, max_steps=14), MODEL, run, resume=True)
    assert [r["train_ids_read"] for r in records(run) if r["event"] == "data"] == [False, True, False]
    out = capsys.readouterr().out
    assert "train.ids cannot be read" in out and "tokenising the training data again" in out
    assert kept_ids(run) == kept_ids(reference), "kept again, as at the start"


def test_a_process_without_kept_ids_reads_and_tokenises_the_text_again(
    reference: Path, quick_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 drops the training text while the tokenizer trains, and the processes after it never read
    it: they read the ids rank 0 kept. Rank 0 on a new run, and a process on another machine without
    shared storage, read the text again and tokenise it, to the same ids; only rank 0 writes them. The
    text must be what rank 0 read at the start, or the batches would not be the others'."""
    metadata, _ = kept_ids(reference)
    key = {name: metadata[name] for name in ("text", "tokenizer", "max_len")}
    tc = quick_recipe(quick_data)
    assert str(tc.max_len) == key["max_len"]
    tokenizer = Tokenizer.load(reference / "tokenizer.model")
    kept, kept_counts = load_training_ids(reference, key)
    new_run = tmp_path / "new-run"  # rank 0 on a new run
    new_run.mkdir()
    corpus, counts, was_read = prepare.training_ids(tc, tokenizer, new_run, key)
    assert not was_read and counts == kept_counts and kept_ids(new_run) == kept_ids(reference)
    assert list(corpus.src) == list(kept.src) and list(corpus.tgt) == list(kept.tgt)

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    for run_dir, read in ((tmp_path / "elsewhere", False), (reference, True)):
        run_dir.mkdir(exist_ok=True)
        corpus, counts, was_read = prepare.training_ids(tc, tokenizer, run_dir, key)
        assert was_read == read and counts == kept_counts
        assert list(corpus.src) == list(kept.src) and list(corpus.tgt) == list(kept.tgt)
        assert corpus.src.arrays()[0].dtype == np.uint16  # held or kept: 2 bytes a token
    assert list((tmp_path / "elsewhere").iterdir()) == []

    other = tmp_path / "other-copy"
    shutil.copytree(quick_data, other)
    for lang, line in (("de", "Eine Zeile mehr."), ("en", "One line more.")):
        with (other / f"train.{lang}").open("a") as text:
            text.write(line + "\n")
    for is_rank_0 in (False, True):
        monkeypatch.setattr(distributed, "is_main", lambda is_rank_0=is_rank_0: is_rank_0)
        with pytest.raises(TransformerError, match=r"split in .* is not the text rank 0 read at the start"):
            prepare.training_ids(quick_recipe(other), tokenizer, tmp_path / "elsewhere", key)
    assert list((tmp_path / "elsewhere").iterdir()) == [], "rank 0's parts of train.ids are removed"


def kept_ids(run: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """A run's kept training ids and their metadata (whose order in the file varies from write to write)."""
    with safe_open(str(run / TRAIN_IDS), framework="numpy") as kept:
        return kept.metadata(), {name: kept.get_tensor(name).tolist() for name in kept.keys()}  # noqa: SIM118


def test_a_run_from_an_incompatible_version_is_refused(
    reference: Path, quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(reference, tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["format_version"] == checkpoint.FORMAT_VERSION
    (run / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    assert main(["translate", "--checkpoint", str(run)]) == 2
    assert "incompatible version of this toolkit (format version 99" in one_error_line(capsys)
    assert main(train_argv(quick_recipe(quick_data, max_steps=16), run, "--resume")) == 2
    assert "incompatible version" in one_error_line(capsys)

    envelope = torch.load(run / "last.state.pt", weights_only=False)
    torch.save({**envelope, "version": 2}, run / "last.state.pt")
    with pytest.raises(TransformerError, match=r"last\.state\.pt was written by an incompatible version"):
        load_state(run / "last.state.pt")


# ------------------------------------------------------------------------------ odd translate input


@pytest.fixture(scope="module")
def translator(reference: Path) -> Translator:
    return Translator.from_checkpoint(reference)


def translate_cli(
    run: Path, raw: bytes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    status = main(["translate", "--checkpoint", str(run), "--beam", "1", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


ODD = [
    "Ein Mann fährt Fahrrad.",
    "",
    "  \t ",
    "😀🐕 Hund 🇩🇪",
    "Zwei Hunde — Два пса — 两只狗 — كلبان — שני כלבים",
    "a\x0bb\x0cc\x1dd\x85e\u2028f\x00g\x07h\x1b[31m",
    "\u200b\u200d\ufeff",
    "x\r",  # a lone CR at the end of a line, as CRLF files end every line
]


def test_odd_but_valid_lines_translate_one_line_each(
    reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = "\n".join(ODD).encode() + b"\n"
    status, out, err = translate_cli(reference, raw, monkeypatch, capsys)
    assert status == 0 and err == ""
    lines = out.split("\n")
    assert lines.pop() == "" and len(lines) == len(ODD)
    assert lines[1] == "" and lines[2] == ""  # empty and whitespace-only lines give empty lines
    assert all("\r" not in line for line in lines)
    # No final newline, CRLF line ends, a byte-order mark: the same lines.
    crlf = "\ufeff".encode() + "\r\n".join(ODD[:4]).encode()
    assert decode_lines(crlf) == ODD[:4]
    status, out, err = translate_cli(reference, crlf, monkeypatch, capsys)
    assert (status, err, out.count("\n")) == (0, "", 4)


def test_over_long_lines_are_truncated_with_a_warning_or_refused_when_strict(
    reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = ("Hund " * 200 + "\nEin Mann.\n").encode()
    status, out, err = translate_cli(reference, raw, monkeypatch, capsys)
    assert status == 0 and len(out.split("\n")) == 3
    assert err.startswith("warning: sentence 1 has ") and "truncated to 79" in err
    status, out, err = translate_cli(reference, raw, monkeypatch, capsys, "--strict")
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and "more than the model's maximum of 79; --strict refuses it" in err


def test_warnings_number_sentences_from_where_the_block_starts(
    translator: Translator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line typed at a terminal is translated alone: its warning names its own line, not "sentence 1"."""
    blocks = translator.translate_blocks(["Ein Mann.", "Hund " * 200], beam=1, block=1, first=7)
    assert len(list(blocks)) == 2
    assert capsys.readouterr().err.startswith("warning: sentence 8 has ")


def test_an_input_encoded_in_chunks_translates_and_warns_as_in_one(
    translator: Translator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long input's ids are made `ENCODE_CHUNK` sentences at a time: the chunks must not move a warning's
    sentence number, a truncation, or which sentence `strict` refuses."""
    sentences = ["Ein Mann.", "Hund " * 200, "", "Zwei Katzen.", "Katze " * 150]
    whole = translator.translate(sentences, beam=1)
    warnings = capsys.readouterr().err
    assert warnings.count("warning: sentence") == 2
    monkeypatch.setattr(translate_module, "ENCODE_CHUNK", 2)
    assert translator.translate(sentences, beam=1) == whole
    assert capsys.readouterr().err == warnings
    with pytest.raises(TransformerError, match=r"^sentence 5 has \d+ tokens"):  # in the second chunk
        next(translator.translate_blocks(sentences[2:], beam=1, strict=True, first=3))


def test_invalid_utf8_is_replaced_with_a_warning_or_refused_when_strict(
    reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    raw = b"Ein Hund.\nZwei \xff\xfe Katzen \xc3\n\xe2\x82\n"
    status, out, err = translate_cli(reference, raw, monkeypatch, capsys)
    assert status == 0 and len(out.split("\n")) == 4
    assert err.splitlines() == [
        "warning: stdin is not valid UTF-8 (first at line 2); undecodable bytes were replaced with U+FFFD"
    ]
    assert decode_lines(raw)[1] == "Zwei \ufffd\ufffd Katzen \ufffd"
    capsys.readouterr()
    source = tmp_path / "in.de"
    source.write_bytes(raw)
    assert main(["translate", "--checkpoint", str(reference), "--input", str(source), "--strict"]) == 2
    assert f"{source} line 2 is not valid UTF-8" in one_error_line(capsys)


def test_line_breaks_inside_a_translation_cannot_split_it() -> None:
    assert single_line("a\nb\r\nc\rd") == "a b c d"
    assert single_line("a\x0bb\u2028c") == "a\x0bb\u2028c"  # only what splits lines for `transformer` tools


# Lines of any text, control characters included, but never a line break inside a line.
lines_of_text = st.lists(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n"), max_size=30), max_size=6
)


@settings(max_examples=30, deadline=None)
@given(lines=lines_of_text)
def test_decoding_input_gives_back_its_lines(lines: list[str]) -> None:
    lines = [line.rstrip("\r") for line in lines]  # a line's own final CR cannot be told from CRLF
    if lines:
        lines[0] = lines[0].lstrip("\ufeff")  # nor a leading BOM from a byte-order mark
    text = "".join(line + "\n" for line in lines)
    assert decode_lines(text.encode()) == lines
    # Without the final newline too, unless the last line is empty (then it is not there to see).
    assert decode_lines(text.removesuffix("\n").encode()) == lines or lines[-1:] == [""]


def decoded_at_once(raw: bytes) -> tuple[list[str], str]:
    """The reference `decode_stream` must match: the whole text decoded in one piece, and the first
    undecodable byte's line and offset."""
    try:
        text, bad = raw.decode("utf-8"), ""
    except UnicodeDecodeError as error:
        text = raw.decode("utf-8", errors="replace")
        line = raw.count(b"\n", 0, error.start) + 1
        bad = f"line {line} is not valid UTF-8 ({error.reason} at byte {error.start})"
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines], bad


odd_bytes = st.lists(
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", "\ufeff".encode(), "\u00e4\u20ac\U0001f600".encode(), b"\xff", b"\xe2\x82"]
    )
    | st.binary(max_size=5)
    | st.text(max_size=5).map(str.encode),
    max_size=12,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(raw=odd_bytes, chunk=st.integers(1, 9))
def test_reading_in_chunks_decodes_as_reading_whole(raw: bytes, chunk: int) -> None:
    """A corpus is decoded a chunk at a time: wherever a chunk ends (inside a character, between CR and
    LF, inside a byte-order mark), the lines, the replaced bytes and the line and byte of an error are
    those of the whole text decoded at once."""
    lines, bad = decoded_at_once(raw)
    assert decode_stream(io.BytesIO(raw), chunk=chunk, source="x") == lines
    if bad:
        with pytest.raises(TransformerError, match=re.escape(f"x {bad}; --strict refuses it")):
            decode_stream(io.BytesIO(raw), chunk=chunk, source="x", strict=True)
    else:
        assert decode_stream(io.BytesIO(raw), chunk=chunk, strict=True) == lines


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.lists(st.binary(max_size=16) | lines_of_text.map("\n".join).map(str.encode), max_size=3))
def test_translate_gives_one_line_per_input_line(translator: Translator, raw: list[bytes]) -> None:
    data = b"\n".join(raw)
    lines = decode_lines(data)
    outputs = [single_line(t) for t in translator.translate(lines, beam=1)]
    assert len(outputs) == len(lines)
    assert "".join(out + "\n" for out in outputs).count("\n") == len(lines)
    assert all(out == "" for line, out in zip(lines, outputs, strict=True) if not line.strip())


# ---------------------------------------------------------------------------------------- bad input


def test_empty_training_or_validation_data_writes_nothing(
    quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for split, contents in (("train", ""), ("train", "\n  \n\n"), ("val", "")):
        data = tmp_path / f"data-{split}-{len(contents)}"
        shutil.copytree(quick_data, data)
        for lang in ("de", "en"):
            (data / f"{split}.{lang}").write_text(contents)
        out = tmp_path / f"out-{split}-{len(contents)}"
        assert main(train_argv(quick_recipe(data), out)) == 2
        assert f"the {split!r} split in {data} is empty" in one_error_line(capsys)
        assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_len=-5", "max_len must be positive, got -5"),
        ("max_tokens=-1", "max_tokens must be positive, got -1"),
        ("d_model=-32", "d_model must be positive, got -32"),
        ("n_heads=0", "n_heads must be positive, got 0"),
        ("d_model=-3", "d_model must be positive, got -3"),
        ("length_penalty=nan", "the length penalty α must be in [0, 5]"),
        ("beam=1000", "beam size must be 1 to 128, got 1000"),
        ("max_steps=-3", "max_steps must be 0 or more, got -3"),
        ("log_every=0", "log_every must be positive, got 0"),
        ("label_smoothing=1.5", "label_smoothing must be in [0, 1), got 1.5"),
        ("cooldown=1", "cooldown must be in [0, 1), got 1.0"),
        ("d_ff=wide", "d_ff must be of type int, got 'wide'"),
        ("precision=fp8", "precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ("max_tokens=[1", "max_tokens must be of type int, got '[1'"),  # was a YAML traceback
        ("compile=on", "compile must be of type bool, got 'on'"),
        ("time_budget_minutes=inf", "time_budget_minutes must be a finite number, got inf"),
        ("time_budget_minutes=nan", "time_budget_minutes must be a finite number, got nan"),
        ("weight_decay=nan", "weight_decay must be a finite number, got nan"),
        ("lr_factor=nan", "lr_factor must be a finite number, got nan"),
        ("clip_norm=nan", "clip_norm must be a finite number, got nan"),
        ("layer_norm_eps=nan", "layer_norm_eps must be in (0, 1), got nan"),
        ("layer_norm_eps=0", "layer_norm_eps must be in (0, 1), got 0.0"),
        ("src_vocab_size=100", "src_vocab_size: set by the trainer from the tokenizer"),
        ("model.pad_id=5", "pad_id: set by the trainer from the tokenizer"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(
    setting: str, message: str, quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([*train_argv(quick_recipe(quick_data), out), setting]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("bogus: 1\n", "unknown key(s) bogus for TrainConfig"),
        ("max_tokens: lots\n", "max_tokens must be of type int, got 'lots'"),
        ("model:\n  n_layers_typo: 2\n", "model=transformer has no setting(s) n_layers_typo"),
        ("- a list\n", "must hold a mapping of settings"),
        ("model: 3\n", "must hold a mapping of settings (and `model:` a family or one of its own)"),
        ("model: [1]\n", "must hold a mapping of settings (and `model:` a family or one of its own)"),
        ("model: lstm\n", "model must be one of 'transformer', 'rnn', 'birnn', 'rnn-attention', got 'lstm'"),
        ("model:\n  tgt_vocab_size: 1000\n", "tgt_vocab_size: set by the trainer from the tokenizer"),
        ("init_from: *x\n", "is not valid YAML: found undefined alias 'x'"),
        ("1: 2\n", "unknown key(s) 1 for TrainConfig"),
        ("lr_factor: 1\n# \udcff\n", "is not valid YAML: 'utf-8' codec can't decode byte 0xff"),
        ("max_tokens: [1\n", "is not valid YAML"),
    ],
)
def test_bad_recipe_files_are_one_line(
    recipe: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe, encoding="utf-8", errors="surrogateescape")  # \udcff: the byte 0xff
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_and_run_directories_are_one_line(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def translate(*args: str) -> str:
        assert main(["translate", "--input", str(reference / "config.json"), "--beam", "1", *args]) == 2
        return one_error_line(capsys)

    run = copy_run(reference, tmp_path)
    assert "no run directory or checkpoint file at" in translate(
        "--checkpoint", str(run / "nope.safetensors")
    )
    assert "no checkpoint named 'nope'" in translate("--checkpoint", str(run), "--name", "nope")
    assert "beam size must be 1 to 128, got -1" in translate("--checkpoint", str(run), "--beam", "-1")
    assert "beam size must be 1 to 128, got 100000" in translate("--checkpoint", str(run), "--beam", "100000")
    for alpha in ("nan", "inf", "40"):  # scores overflowed to NaN, and --nbest printed nothing
        assert "the length penalty α must be in [0, 5]" in translate(
            "--checkpoint", str(run), "--nbest", "2", "--length-penalty", alpha
        )

    (run / "best.safetensors").write_bytes(os.urandom(4096))  # foreign bytes
    assert "not a readable safetensors checkpoint" in translate("--checkpoint", str(run))
    other = {"embedding.weight": torch.zeros(3, 4)}  # a well-formed checkpoint of some other model
    save_weights(run / "best.safetensors", other)
    assert "does not fit the model in" in translate("--checkpoint", str(run))

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "d_model": "big"}}))
    assert "d_model must be of type int, got 'big'" in translate("--checkpoint", str(run))
    (run / "config.json").write_text('{"model": ')
    assert "is not a valid run configuration" in translate("--checkpoint", str(run))
    (run / "config.json").unlink()
    assert "has no config.json" in translate("--checkpoint", str(run))


def test_resume_with_every_training_state_truncated_is_one_line(
    reference: Path, quick_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(reference, tmp_path)
    (run / "last.state.pt").write_bytes((run / "last.state.pt").read_bytes()[:100])
    # One truncated state file is survived: the newest step checkpoint holds the same step.
    assert resume_point(run)[0] == "step-0000010"
    for path in run.glob("step-*.state.pt"):
        path.write_bytes(path.read_bytes()[:100])
    before = sorted(p.name for p in run.iterdir())
    assert main(train_argv(quick_recipe(quick_data, max_steps=16), run, "--resume")) == 2
    line = one_error_line(capsys)
    assert "holds no complete checkpoint with training state" in line and "not a readable" in line
    assert sorted(p.name for p in run.iterdir()) == before


def test_translate_to_a_full_disk_is_an_error_not_a_cut_file(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stdout redirected to a file on a full disk: Python buffers the write and only the flush fails,
    which at exit would leave a cut file behind exit status 0."""

    class FullDisk(io.StringIO):
        def flush(self) -> None:
            raise OSError(28, "No space left on device")

    source = tmp_path / "in.de"
    source.write_text("Ein Hund.\nZwei Katzen.\n")
    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert main(["translate", "--checkpoint", str(reference), "--input", str(source), "--beam", "1"]) == 1
    assert "No space left on device" in one_error_line(capsys)


def test_report_refuses_a_run_of_another_family_in_one_line(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An RNN run failed halfway through the report with an AttributeError (no d_model)."""
    run = copy_run(reference, tmp_path)
    record = json.loads((run / "config.json").read_text())
    record["train"]["model"] = "rnn"
    (run / "config.json").write_text(json.dumps(record))
    argv = ["report", "--checkpoint", str(run), "--only", "heads", "--out", str(tmp_path / "report")]
    assert main(argv) == 2
    assert "is a model=rnn run: the report studies a Transformer's attention" in one_error_line(capsys)


def test_an_out_that_is_a_file_is_one_line(quick_data: Path, tmp_path: Path, capsys) -> None:
    """The OS's bare "[Errno 17] File exists" said nothing about --out."""
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    assert main(train_argv(quick_recipe(quick_data), taken)) == 2
    assert "is a file, not a directory; choose another --out" in one_error_line(capsys)
    assert taken.read_text() == "mine\n"
