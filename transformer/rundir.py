"""What a run directory promises across crashes and resumes.

A run may be killed at any instant (SIGKILL, power cut, full disk). Checkpoint files are replaced
atomically (`checkpoint.atomic_write`), but a checkpoint is two files, and a kill between their two
renames leaves `last` torn: new training state beside old weights. `resume_point` then falls back to the
newest complete checkpoint, which the evaluation save order (`step-N`, then `best`, then `last`) makes the
same step. A resumed run must also be the run it claims to continue: `config.json` records the model and
training settings, the tokenizer's and the data's sha256 and the format version, and `check_resumable`
refuses a resume under which any of those changed, saying what changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import (
    FORMAT_VERSION,
    check_format_version,
    list_checkpoints,
    load_checkpoint,
    step_of,
)
from transformer.errors import TransformerError

# Settings a resume may change: budgets, how often to validate and log, threads and compilation; not
# what is trained or how.
MAY_CHANGE = frozenset(
    {
        "max_epochs",
        "max_steps",
        "time_budget_minutes",
        "patience",
        "eval_every",
        "log_every",
        "threads",
        "compile",
    }
)


def data_sha256(pairs: Sequence[tuple[str, str]]) -> str:
    """A digest of a split's sentence pairs as the trainer reads them (after stripping), so a plain and a
    gzipped copy of the same text agree but any changed, added or removed line does not."""
    digest = hashlib.sha256()
    for src, tgt in pairs:
        digest.update(f"{src}\t{tgt}\n".encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()


def run_record(
    model: dict[str, Any], train: dict[str, Any], tokenizer_sha256: str, data: dict[str, str]
) -> dict[str, Any]:
    """The contents of config.json: enough to rebuild the model, and to recognise the run on resume.

    `train["data_dir"]` stays as it was given, often relative to where training ran (`data/multi30k`);
    `data_dir_absolute` beside it lets the commands that read the run's data (`evaluate`, `doctor`) find
    it from another directory (`reachable_data_dir`)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "train": train,
        "tokenizer_sha256": tokenizer_sha256,
        "data_sha256": data,
        "data_dir_absolute": str(Path(train["data_dir"]).resolve()),
    }


def reachable_data_dir(saved: dict[str, Any]) -> str:
    """The run's data directory as this process can reach it: as given at training time when that path
    exists from here, else the absolute path recorded beside it if that exists (a relative path is
    relative to where training ran), else as given, for the reader's error to name."""
    given = saved["train"]["data_dir"]
    absolute = saved.get("data_dir_absolute")  # not in runs written before 2026-12-03
    if not Path(given).is_dir() and absolute and Path(absolute).is_dir():
        return absolute
    return given


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """config.json of a run directory, checked to be a run of a layout this version reads."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TransformerError(
            f"{run_dir} has no config.json: is it a run directory written by `transformer train`?"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TransformerError(f"{path} is not a valid run configuration ({error})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)):
        raise TransformerError(f"{path} is not a valid run configuration (no 'model' section)")
    if not isinstance(saved.get("train"), dict):
        raise TransformerError(f"{path} is not a valid run configuration (no 'train' section)")
    check_format_version(saved.get("format_version", 1), path)
    return saved


def _short(digest: object) -> str:
    return f"{digest}"[:12]


def _settings_differ(saved: dict[str, Any], current: dict[str, Any], may_change: frozenset[str]) -> list[str]:
    """The settings of `current` that differ from `saved`, as `key: old -> new`, in `current`'s order; keys
    in `may_change` are not compared."""
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key not in may_change and saved.get(key) != value
    ]


def run_difference(
    saved: dict[str, Any], current: dict[str, Any], may_change: frozenset[str] = MAY_CHANGE
) -> str | None:
    """Why `current` (a `run_record`) is not the run `saved` records, or None when it is: the tokenizer
    first (a new one changes the vocabulary size too, but the tokenizer is the cause), then the data, then
    the model and training settings outside `may_change`.

    Records written before a field existed (no data digests, say) are not held to that field. The data
    directory may move when the data digests show the text itself is unchanged.
    """
    if saved.get("tokenizer_sha256", current["tokenizer_sha256"]) != current["tokenizer_sha256"]:
        return (
            f"tokenizer.model is not the one the run started with (sha256 "
            f"{_short(saved['tokenizer_sha256'])}… -> {_short(current['tokenizer_sha256'])}…)"
        )
    for split, digest in (saved.get("data_sha256") or {}).items():
        now = current["data_sha256"].get(split)
        if now != digest:
            return (
                f"the {split} data in {current['train']['data_dir']} differs from the data the run started "
                f"with (sha256 {_short(digest)}… -> {_short(now)}…); train a new run for new data"
            )
    may_change = may_change | ({"data_dir"} if saved.get("data_sha256") else set())
    for section in ("model", "train"):
        differ = _settings_differ(saved[section], current[section], may_change)
        if differ:
            return f"the {section} config differs ({'; '.join(differ)})"
    return None


def check_resumable(run_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run under a different tokenizer, data or settings, naming what differs."""
    why = run_difference(saved, current)
    if why:
        raise TransformerError(f"cannot resume {run_dir}: {why}")


def resume_point(run_dir: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The newest complete checkpoint with training state: (name, weights, state, notes on skipped ones).

    `last` is preferred unless it is torn or unreadable, or a `step-N` checkpoint is newer than it (a kill
    after saving `step-N` but before `last` was replaced).
    """
    notes: list[str] = []
    best: tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None = None
    try:
        weights, state = load_checkpoint(run_dir, "last", with_state=True)
        best = ("last", weights, state or {})
    except TransformerError as error:
        notes.append(f"last: {error}")
    last_step = best[2]["progress"]["step"] if best else -1
    for name in reversed(list_checkpoints(run_dir)):
        step = step_of(name)
        if step is None or step <= last_step:
            break
        try:
            weights, state = load_checkpoint(run_dir, name, with_state=True)
        except TransformerError as error:
            notes.append(f"{name}: {error}")
            continue
        return name, weights, state or {}, notes
    if best is None:
        raise TransformerError(
            f"cannot resume {run_dir}: it holds no complete checkpoint with training state ({notes[0]})"
        )
    return (*best, notes)


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files of atomic writes whose process died before renaming them (`.NAME.tmp-PID`)."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # exists, but belongs to someone else
    return True


def drop_partial_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last complete line: a kill mid-append leaves a fragment."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
