"""Checkpoints must survive crashes, keep tied weights tied, and fail on bad files with a clear message."""

from __future__ import annotations

import os
import random
import shutil
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
)
from transformer.errors import TransformerError


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
