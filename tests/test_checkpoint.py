"""Checkpoints must survive crashes, keep tied weights tied, and fail on bad files with a clear message."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from transformer import checkpoint
from transformer.checkpoint import (
    atomic_write,
    atomic_write_text,
    average_weights,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    save_weights,
)
from transformer.cli import main
from transformer.errors import TransformerError
from transformer.rundir import create_run_dir, remove_stale_temp_files, run_record


class Tied(nn.Module):
    """Embedding shared with the output projection, as in the paper's section 3.4."""

    def __init__(self, vocab: int = 7, dim: int = 4, hidden: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.middle = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([2.0]))


def _fresh(seed: int, **kwargs: int) -> Tied:
    torch.manual_seed(seed)
    return Tied(**kwargs)


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    model = _fresh(0)
    save_checkpoint(tmp_path, "best", model)
    with safe_open(str(tmp_path / "best.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert len(stored) == len(model.state_dict()) - 1  # the tied matrix is written once

    weights = load_weights(tmp_path / "best.safetensors")
    assert set(weights) == set(model.state_dict())
    other = _fresh(1)
    other.load_state_dict(weights, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert other.out.weight is other.embed.weight


def test_state_round_trips_optimizer_and_rng(tmp_path: Path) -> None:
    model = _fresh(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.out(model.middle(model.embed(torch.tensor([1, 2])))).sum().backward()
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "step": 3,
        "loss": 1.5,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    save_checkpoint(tmp_path, "last", model, state)
    loaded = load_state(tmp_path / "last.state.pt")
    assert loaded["step"] == 3 and loaded["loss"] == 1.5
    assert loaded["python_rng"] == state["python_rng"]
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    for index, slot in optimizer.state_dict()["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][index]["exp_avg"], slot["exp_avg"])
    restored = torch.optim.Adam(_fresh(1).parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])

    weights, resumed = load_checkpoint(tmp_path, "last", with_state=True)
    assert resumed is not None and resumed["step"] == 3
    assert set(weights) == set(model.state_dict())


def test_torn_pair_is_detected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "last", _fresh(0), {"step": 1})
    shutil.copy(tmp_path / "last.state.pt", tmp_path / "old.state")
    save_checkpoint(tmp_path, "last", _fresh(1), {"step": 2})
    shutil.copy(tmp_path / "old.state", tmp_path / "last.state.pt")  # as if the weights write had failed
    with pytest.raises(TransformerError, match="different saves"):
        load_checkpoint(tmp_path, "last", with_state=True)
    load_checkpoint(tmp_path, "last")  # weights alone are still usable for translation


def test_saving_without_state_drops_stale_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "best", _fresh(0), {"step": 1})
    save_checkpoint(tmp_path, "best", _fresh(1))
    assert not (tmp_path / "best.state.pt").exists()
    with pytest.raises(TransformerError, match="no training state"):
        load_checkpoint(tmp_path, "best", with_state=True)


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic_write_text(target, "old content")

    def crash_midway(tmp: Path) -> None:
        tmp.write_bytes(b"new con")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, crash_midway)
    assert target.read_text() == "old content"
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_write_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(tmp_path) == ["a.txt"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX mode bits")
def test_written_files_are_as_readable_as_a_plain_file(tmp_path: Path, umask_022: None) -> None:
    """safetensors creates its files 0600. Checkpoints get a plain new file's mode (0644 under umask 022),
    like config.json beside them, so that a server running as another user can load them. A replaced
    file keeps its own mode."""
    save_checkpoint(tmp_path, "best", _fresh(0), {"progress": {"step": 1}})
    atomic_write_text(tmp_path / "config.json", "{}")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"best.safetensors": 0o644, "best.state.pt": 0o644, "config.json": 0o644}

    os.chmod(tmp_path / "best.safetensors", 0o640)
    save_checkpoint(tmp_path, "best", _fresh(1), {"progress": {"step": 2}})
    assert stat.S_IMODE((tmp_path / "best.safetensors").stat().st_mode) == 0o640

    def private(tmp: Path) -> None:
        tmp.touch(mode=0o600)

    atomic_write(tmp_path / "new.bin", private)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644


def _first_half_of_real_checkpoint(tmp_path: Path) -> bytes:
    save_checkpoint(tmp_path / "real", "best", _fresh(0))
    data = (tmp_path / "real" / "best.safetensors").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["empty", "random", "text", "truncated"])
def test_load_weights_rejects_bad_files(tmp_path: Path, kind: str) -> None:
    if kind == "truncated":
        contents = _first_half_of_real_checkpoint(tmp_path)
    else:
        contents = {"empty": b"", "random": random.Random(0).randbytes(4096), "text": b"not a checkpoint\n"}[
            kind
        ]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(contents)
    with pytest.raises(TransformerError, match="not a readable safetensors checkpoint") as error:
        load_weights(path)
    assert str(path) in str(error.value)


def test_load_weights_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(TransformerError, match="no checkpoint at") as error:
        load_weights(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("contents", [b"", b"garbage bytes", b"PK\x03\x04 half a zip"])
def test_load_state_rejects_bad_files(tmp_path: Path, contents: bytes) -> None:
    path = tmp_path / "last.state.pt"
    path.write_bytes(contents)
    with pytest.raises(TransformerError, match="not a readable training-state file") as error:
        load_state(path)
    assert str(path) in str(error.value)


def test_load_state_rejects_foreign_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.state.pt"
    torch.save({"something": 1}, path)
    with pytest.raises(TransformerError, match="not a training-state file written by this toolkit"):
        load_state(path)


def test_checkpoint_path_and_listing(tmp_path: Path) -> None:
    model = _fresh(0)
    for name in ["step-1000", "best", "step-000500", "last"]:
        save_checkpoint(tmp_path, name, model)
    assert list_checkpoints(tmp_path) == ["best", "last", "step-000500", "step-1000"]
    assert checkpoint_path(tmp_path) == tmp_path / "best.safetensors"
    assert checkpoint_path(tmp_path / "last.safetensors") == tmp_path / "last.safetensors"
    with pytest.raises(TransformerError, match=r"no checkpoint named 'final'.*best, last, step-000500"):
        checkpoint_path(tmp_path, "final")
    with pytest.raises(TransformerError, match="no run directory or checkpoint file"):
        checkpoint_path(tmp_path / "elsewhere")
    with pytest.raises(TransformerError, match="invalid checkpoint name"):
        save_checkpoint(tmp_path, "../escape", model)


def test_average_weights_is_the_mean(tmp_path: Path) -> None:
    first, second = _fresh(0), _fresh(1)
    save_checkpoint(tmp_path, "step-1", first)
    save_checkpoint(tmp_path, "step-2", second)
    averaged = average_weights([tmp_path / "step-1.safetensors", tmp_path / "step-2.safetensors"])
    assert set(averaged) == set(first.state_dict())
    for key, value in first.state_dict().items():
        expected = (value.double() + second.state_dict()[key].double()) / 2
        assert averaged[key].dtype == value.dtype
        torch.testing.assert_close(averaged[key], expected.to(value.dtype), rtol=0, atol=0)
    model = _fresh(2)
    model.load_state_dict(averaged, strict=True)
    # The tied embedding stays one tensor: written once, the average is the size of its checkpoints.
    assert averaged["out.weight"] is averaged["embed.weight"]
    save_weights(tmp_path / "avg.safetensors", averaged)
    assert (tmp_path / "avg.safetensors").stat().st_size == (tmp_path / "step-1.safetensors").stat().st_size


def test_average_weights_rejects_different_models(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "a", _fresh(0))
    save_checkpoint(tmp_path, "b", nn.Linear(4, 7))
    save_checkpoint(tmp_path, "c", _fresh(0, hidden=5))
    with pytest.raises(TransformerError, match=r"key 'embed\.weight' is missing from"):
        average_weights([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    with pytest.raises(TransformerError, match=r"'middle\.(weight|bias)' has shape \(4,.*\) vs \(5,.*\)"):
        average_weights([tmp_path / "a.safetensors", tmp_path / "c.safetensors"])
    with pytest.raises(TransformerError, match="no checkpoints to average"):
        average_weights([])


def test_prune_keeps_newest_steps(tmp_path: Path) -> None:
    model = _fresh(0)
    for step in [100, 200, 300, 1000]:
        save_checkpoint(tmp_path, f"step-{step:06d}", model, {"step": step})
    save_checkpoint(tmp_path, "best", model, {"step": 100})
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert deleted == ["step-000100", "step-000200"]
    assert list_checkpoints(tmp_path) == ["best", "step-000300", "step-001000"]
    assert not (tmp_path / "step-000100.state.pt").exists()
    assert (tmp_path / "step-000300.state.pt").exists()
    assert prune_checkpoints(tmp_path, keep=5) == []


def test_a_state_left_alone_by_an_interrupted_save_or_prune_is_removed_as_a_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save writes the state first, a prune deletes it last: a kill between leaves a `.state.pt` that
    nothing lists or reads, and that stayed for good (a state is as large as two models)."""
    model = _fresh(0)
    for step in (1, 2):
        save_checkpoint(tmp_path, f"step-{step}", model, {"step": step})
    save_checkpoint(tmp_path, "best", model)  # weights alone
    unlink = Path.unlink

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL between the two files

    def killed_at_the_state(path: Path, missing_ok: bool = False) -> None:
        (killed if path.name.endswith(".state.pt") else unlink)(path, missing_ok=missing_ok)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "unlink", killed_at_the_state)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoints(tmp_path, keep=1)
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "save_weights", killed)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, "step-3", model, {"step": 3})
    assert sorted(p.name for p in tmp_path.glob("*.state.pt")) == [
        "step-1.state.pt",
        "step-2.state.pt",
        "step-3.state.pt",
    ]
    assert sorted(remove_stale_temp_files(tmp_path)) == ["step-1.state.pt", "step-3.state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "step-2.safetensors",
        "step-2.state.pt",
    ]
    load_checkpoint(tmp_path, "step-2", with_state=True)


# ---------------------------------------------------------------------------------- full disk, average


# How the writing libraries report a full disk: in their own exception types, not as OSError.
FULL_DISK = {
    "save_file": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
}


@pytest.mark.parametrize(("module", "writer"), [(checkpoint, "save_file"), (torch, "save")])
def test_a_full_disk_inside_the_writing_library_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: object, writer: str
) -> None:
    """safetensors writes the weights, torch.save the training state; either may fail half-way."""
    save_checkpoint(tmp_path, "last", _fresh(0), {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_then_fail(obj: object, path: object, **kwargs: object) -> None:
        Path(str(path)).write_bytes(b"\0" * 100)
        raise FULL_DISK[writer]

    monkeypatch.setattr(module, writer, half_then_fail)
    with pytest.raises(TransformerError, match="could not write checkpoint") as raised:
        save_checkpoint(tmp_path, "last", _fresh(1), {"step": 2})
    reason = str(FULL_DISK[writer])
    assert f"{tmp_path / 'last.safetensors'} ({reason}): check free disk space" in str(raised.value)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys(), "the temp file is removed"
    # The old weights stay; a state file replaced already is told apart by its checkpoint id
    # (test_torn_pair_is_detected).
    assert after["last.safetensors"] == before["last.safetensors"]


def _run(directory: Path, tokenizer: bytes = b"pieces", **model: int) -> Path:
    """A run directory as `train` leaves one, without training: two step checkpoints, a best, a tokenizer
    and config.json recording the tokenizer's sha256 and the model settings."""
    for seed, name in enumerate(("step-1", "step-2", "best")):
        save_checkpoint(directory, name, _fresh(seed))
    (directory / "tokenizer.model").write_bytes(tokenizer)
    record = run_record(
        {"d_model": 4, **model}, {"data_dir": "data"}, hashlib.sha256(tokenizer).hexdigest(), {}
    )
    atomic_write_text(directory / "config.json", json.dumps(record))
    return directory


def _average(capsys: pytest.CaptureFixture[str], *checkpoints: Path, out: Path) -> str:
    """`transformer average`'s one stderr line, or '' when it succeeded."""
    status = main(["average", "--checkpoints", *map(str, checkpoints), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (status == 0) == (err == []) and len(err) <= 1, (status, err)
    return err[0] if err else ""


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_average_refuses_checkpoints_of_other_tokenizers_or_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Of the same shapes, checkpoints of runs with another tokenizer averaged silently into nonsense."""
    run = _run(tmp_path / "run")
    retokenized = _run(tmp_path / "retokenized", tokenizer=b"other pieces")
    resized = _run(tmp_path / "resized", d_model=8)
    twin = _run(tmp_path / "twin")  # another run of the same tokenizer and model: may be averaged
    out = tmp_path / "avg"
    line = _average(capsys, run / "step-1.safetensors", retokenized / "step-2.safetensors", out=out)
    assert f"cannot average checkpoints of {run} and {retokenized}: their tokenizers differ" in line
    line = _average(capsys, run / "step-1.safetensors", resized / "step-2.safetensors", out=out)
    assert "their model settings differ (d_model: 4 -> 8)" in line
    assert not out.exists()
    assert _average(capsys, run / "step-1.safetensors", run / "step-2.safetensors", out=out) == ""
    assert (
        _average(capsys, run / "step-1.safetensors", twin / "step-2.safetensors", out=tmp_path / "a2") == ""
    )


def test_average_takes_a_setting_a_run_does_not_record_as_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run recorded before a model setting existed ran as its default: it averages with a run that
    records the default, in either order, and not with one that records another value."""
    old = _run(tmp_path / "old")  # records d_model alone
    new = _run(tmp_path / "new", dropout=0.1)  # dropout's default
    changed = _run(tmp_path / "changed", dropout=0.3)
    rnn = _run(tmp_path / "rnn")
    record = json.loads((rnn / "config.json").read_text())
    record["train"]["model"] = "rnn"
    atomic_write_text(rnn / "config.json", json.dumps(record))

    def average(first: Path, second: Path) -> str:
        out = tmp_path / f"avg-{first.name}-{second.name}"
        return _average(capsys, first / "step-1.safetensors", second / "step-2.safetensors", out=out)

    assert average(old, new) == "" and average(new, old) == ""
    assert "their model settings differ (dropout: 0.1 -> 0.3)" in average(old, changed)
    assert "their model settings differ (dropout: 0.3 -> 0.1)" in average(changed, old)
    assert "their model settings differ (model: 'transformer' -> 'rnn'" in average(old, rnn)


def test_average_writes_only_into_a_new_directory_or_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path / "run")
    steps = (run / "step-1.safetensors", run / "step-2.safetensors")
    other = _run(tmp_path / "other", tokenizer=b"other pieces")
    kept = {path: _contents(path) for path in (run, other)}

    line = _average(capsys, *steps, out=other)  # another run: its best was silently replaced
    assert f"{other} already exists and is not an empty directory: choose a new --out" in line
    line = _average(capsys, *steps, out=run)  # the checkpoints' own run: its trained best was replaced
    assert f"{run} is the run directory the checkpoints come from" in line
    assert f"--out {run / 'average.safetensors'}" in line
    line = _average(capsys, *steps, out=other / "average.safetensors")  # a file into another model's run
    assert f"cannot write the average into {other}, another model's run directory: their tokenizers" in line
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert f"--out {notes} is an existing file" in _average(capsys, *steps, out=notes)
    assert notes.read_text() == "mine"
    assert "is a file, not a directory" in _average(capsys, *steps, out=notes / "avg")
    if Path("/proc/self").is_dir():  # a place no directory can be made
        assert "cannot create the run directory /proc/avg (No such file" in _average(
            capsys, *steps, out=Path("/proc/avg")
        )
    assert {path: _contents(path) for path in (run, other)} == kept

    # What may be written: a file beside the checkpoints, a new or an empty directory.
    assert _average(capsys, *steps, out=run / "average.safetensors") == ""
    expected = average_weights(steps)
    for key, value in load_weights(run / "average.safetensors").items():
        assert torch.equal(value, expected[key]), key
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "avg", tmp_path / "empty"):
        assert _average(capsys, *steps, out=out) == ""
        assert sorted(_contents(out)) == ["best.safetensors", "config.json", "tokenizer.model"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["avg"], "no temporary directory left"


def test_average_refuses_to_replace_a_checkpoint_of_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given as a file, a run's `best`, `last` or a `step-N` was replaced silently, its `.state.pt` then
    another save's; given as the run directory, `best` was already refused."""
    run = _run(tmp_path / "run")
    save_checkpoint(run, "last", _fresh(3), {"step": 2})
    steps = (run / "step-1.safetensors", run / "step-2.safetensors")
    bare = tmp_path / "bare"  # no config.json, but a checkpoint with its training state
    save_checkpoint(bare, "step-3", _fresh(4), {"step": 3})
    kept = {path: _contents(path) for path in (run, bare)}
    for out in (*(run / f"{name}.safetensors" for name in ("best", "last", "step-1", "step-9")), *steps):
        line = _average(capsys, *steps, out=out)
        assert f"{out} is a checkpoint of the run in {run}, which the average would replace" in line
        assert f"--out {run / 'average.safetensors'}" in line
    line = _average(capsys, *steps, out=bare / "step-3.safetensors")
    assert f"is a checkpoint of the run in {bare}" in line
    assert {path: _contents(path) for path in (run, bare)} == kept
    assert _average(capsys, *steps, out=tmp_path / "averages" / "best.safetensors") == ""  # in no run


def test_average_into_a_full_disk_leaves_no_half_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A half-written --out directory would be refused as not empty when the average is tried again."""
    run = _run(tmp_path / "run")

    def full_disk(tensors: object, path: str, **kwargs: object) -> None:
        raise FULL_DISK["save_file"]

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    line = _average(
        capsys, run / "step-1.safetensors", run / "step-2.safetensors", out=tmp_path / "out" / "avg"
    )
    assert "(Error while serializing: I/O error: No space left on device (os error 28))" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_a_checkpoint_named_twice_in_any_spelling_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path / "run")
    (tmp_path / "link.safetensors").symlink_to(run / "best.safetensors")
    for again in (run / ".." / "run" / "best.safetensors", tmp_path / "link.safetensors", run):
        line = _average(capsys, run, again, out=tmp_path / "avg")
        assert f"the checkpoint {run / 'best.safetensors'} is named twice" in line
        assert "it would count twice in the average" in line
    assert not (tmp_path / "avg").exists()


def test_an_out_directory_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    """`train --out FILE` said `[Errno 17] File exists`."""
    existing = tmp_path / "in.txt"
    existing.write_text("text")
    refusal = f"cannot create the run directory {existing}: {existing} is a file, not a directory"
    with pytest.raises(TransformerError, match=re.escape(refusal)):
        create_run_dir(existing)
    with pytest.raises(TransformerError, match=re.escape(f"{existing} is a file, not a directory; choose")):
        create_run_dir(existing / "run")
    if Path("/proc/self").is_dir():  # a place no directory can be made
        with pytest.raises(TransformerError, match=r"create the run directory /proc/run \(No such file"):
            create_run_dir(Path("/proc/run"))
    create_run_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert existing.read_text() == "text"
