"""Run directories and crash-safe checkpoints.

A run directory holds `config.json` (written by the trainer), `tokenizer.model`, and checkpoints. A
checkpoint NAME (`best`, `last`, `step-000500`, ...) is two files:

* `NAME.safetensors` -- the model weights only, so translating or averaging never has to unpickle
  anything and never loads the (twice as large) optimizer state;
* `NAME.state.pt` -- the training state (optimizer, scheduler, step, RNG states, metrics), an arbitrary
  picklable dict, needed only to resume training.

Every file is written through `atomic_write`, so a crash or a full disk leaves either the old file or the
new one under the real name, never a half-written one. The two files of one save share a random
`checkpoint_id`, so a pair torn apart by a crash between the two writes is detected instead of silently
resuming new optimizer moments on old weights.
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from transformer.errors import TransformerError

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
_STATE_FORMAT = "transformer-training-state"
# The layout of run directories and training-state files. Raise it when a change would make an older reader
# misread a newer run (or the reverse); readers refuse other versions instead of guessing. Files written
# before the version was recorded are version 1.
FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^step-(\d+)$")
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; without it a power cut can forget the new directory entry."""
    if not hasattr(os, "O_DIRECTORY"):  # e.g. Windows, where directories cannot be opened this way
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def give_ordinary_mode(path: Path, like: Path | None = None) -> None:
    """Give `path` the permissions a plain `open()` gives a new file (0o666 less the umask), or those of
    `like` where it exists (the file `path` is about to replace).

    safetensors (since 0.8) writes through a temp file of its own, created 0600: the weights would be
    readable by their owner alone, beside a config.json that everyone may read, and a server running as
    another user (a container, a web server's account) could not load them. safetensors issue 782.
    """
    if os.name != "posix":  # Windows has no such mode bits
        return
    if like is not None and like.exists():
        mode = stat.S_IMODE(like.stat().st_mode)
    else:
        umask = os.umask(0o077)  # read by setting it: a restrictive value for the instant it is in force
        os.umask(umask)
        mode = 0o666 & ~umask
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` via `write(tmp)` on a temp file in the same directory, then rename it into place.

    The temp file lives next to `path` so that `os.replace` is a same-filesystem, atomic rename: readers
    see the old content or the new, never a mix. On any error the temp file is removed and the error
    re-raised, and the previous file under `path` is left untouched. The new file has the mode of the one
    it replaces, or a plain new file's (`give_ordinary_mode`), whatever `write` created it with.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        give_ordinary_mode(tmp, like=path)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace `path` with `text` (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def check_format_version(found: object, where: Path) -> None:
    """Refuse a run directory or state file written in another layout than this version reads."""
    if found != FORMAT_VERSION:
        raise TransformerError(
            f"{where} was written by an incompatible version of this toolkit (format version {found!r}; "
            f"this version reads {FORMAT_VERSION}): use the version that wrote it"
        )


# --------------------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _VALID_NAME.match(name) or name.endswith((WEIGHTS_SUFFIX, STATE_SUFFIX)):
        raise TransformerError(
            f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' without a path or "
            f"file extension (e.g. 'best', 'last', 'step-000500')"
        )


def state_path_for(weights_path: Path) -> Path:
    """The `NAME.state.pt` that belongs to `NAME.safetensors`."""
    weights_path = Path(weights_path)
    stem = weights_path.name.removesuffix(WEIGHTS_SUFFIX)
    return weights_path.parent / f"{stem}{STATE_SUFFIX}"


def step_of(name: str) -> int | None:
    """The step number of a `step-N` checkpoint name, None for named ones (`best`, `last`)."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[str]:
    """Names of the checkpoints in `run_dir`: named ones (`best`, `last`) alphabetically, then step-* by step.

    A checkpoint exists when its weights file does; a lone `.state.pt` is the remnant of an interrupted
    save or prune and is not listed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = [p.name.removesuffix(WEIGHTS_SUFFIX) for p in run_dir.glob(f"*{WEIGHTS_SUFFIX}") if p.is_file()]
    named = sorted(n for n in names if step_of(n) is None and not n.startswith("."))
    steps = sorted((n for n in names if step_of(n) is not None), key=lambda n: (step_of(n), n))
    return named + steps


def checkpoint_path(run_dir_or_file: Path, name: str = "best") -> Path:
    """Resolve a run directory (→ `run_dir/NAME.safetensors`) or a direct weights file to a weights path."""
    target = Path(run_dir_or_file)
    if target.is_file():
        if target.name.endswith(STATE_SUFFIX):
            weights = target.parent / (target.name.removesuffix(STATE_SUFFIX) + WEIGHTS_SUFFIX)
            raise TransformerError(
                f"{target} is a training-state file, not model weights: pass {weights} or the run directory"
            )
        return target
    if target.is_dir():
        _check_name(name)
        path = target / f"{name}{WEIGHTS_SUFFIX}"
        if path.is_file():
            return path
        existing = list_checkpoints(target)
        available = ", ".join(existing) if existing else "none"
        raise TransformerError(
            f"no checkpoint named {name!r} in {target} (available: {available}); pick one of those or "
            f"train first"
        )
    raise TransformerError(f"no run directory or checkpoint file at {target}: check the path")


def distinct_checkpoints(targets: Sequence[Path | str]) -> list[Path]:
    """The weights files of `targets` (run directories or files), refusing a checkpoint named twice in any
    spelling (`run` and `run/../run/best.safetensors`, a symlink): an average would count it twice."""
    seen: dict[Path, Path] = {}
    for target in targets:
        path = checkpoint_path(Path(target))
        first = seen.get(path.resolve())
        if first is not None:
            also = "" if first == path else f" (also as {path})"
            raise TransformerError(
                f"the checkpoint {first} is named twice{also}: it would count twice in the average; name "
                f"each checkpoint once"
            )
        seen[path.resolve()] = path
    return list(seen.values())


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------


def _dedupe_shared(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to write and aliases {alias_key: kept_key}.

    Tied weights (shared embedding / output projection) are the same tensor under two keys, and
    safetensors refuses to write shared storage. Identical views are recorded as aliases and written once;
    a tensor that merely overlaps another's storage (a different slice of it) is written as its own copy,
    which loses the sharing but keeps every value exact.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and view in views:
            aliases[key] = views[view]
            continue
        if tensor.numel() > 0 and storage in storages:
            tensor = tensor.clone()
        else:
            views[view] = key
            storages.add(storage)
        kept[key] = tensor
    # Move to CPU only now: copying first would hide which tensors shared storage on the device.
    return {k: t.cpu().contiguous() for k, t in kept.items()}, aliases


def save_checkpoint(
    run_dir: Path,
    name: str,
    model: torch.nn.Module,
    state: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save `model`'s weights as `NAME.safetensors` (with `metadata` in its header) and, if given, `state`
    as `NAME.state.pt`.

    Order: the state file is written first and the weights file last, because the weights file is what
    makes a checkpoint exist (`list_checkpoints`, `checkpoint_path`). A crash between the two writes then
    leaves, for a new name, only an unlisted state file rather than a listed checkpoint that cannot be
    resumed; for a re-used name (`last`, `best`) it leaves the old weights with the new state, which
    `load_checkpoint` detects through the shared `checkpoint_id`. With `state=None` any older state file
    of that name is removed first, so weights are never paired with a stale training state.
    """
    run_dir = Path(run_dir)
    _check_name(name)
    weights_path = run_dir / f"{name}{WEIGHTS_SUFFIX}"
    state_path = state_path_for(weights_path)
    checkpoint_id = uuid.uuid4().hex
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            state_path.unlink(missing_ok=True)
        else:
            envelope = {
                "format": _STATE_FORMAT,
                "version": FORMAT_VERSION,
                "checkpoint_id": checkpoint_id,
                "state": state,
            }
            atomic_write(state_path, lambda tmp: torch.save(envelope, tmp))
    except (OSError, RuntimeError) as error:  # torch.save's zip writer reports a full disk as RuntimeError
        raise _unwritable(weights_path, error) from error
    save_weights(weights_path, model.state_dict(), checkpoint_id, metadata)


def save_weights(
    weights_path: Path,
    weights: dict[str, torch.Tensor],
    checkpoint_id: str | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write a state dict as one safetensors file, atomically (e.g. averaged weights, with no state), with
    `extra` beside the header's own metadata."""
    weights_path = Path(weights_path)
    tensors, aliases = _dedupe_shared(weights)
    metadata = {
        **(extra or {}),
        "format": "pt",
        "checkpoint_id": checkpoint_id or uuid.uuid4().hex,
        "aliases": json.dumps(aliases),
    }
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(weights_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as SafetensorError
        raise _unwritable(weights_path, error) from error


def _unwritable(path: Path, error: Exception) -> TransformerError:
    """One line for a failed write: the OS's reason, or the first line of the library's message (torch
    and safetensors wrap the OS error in their own exception types)."""
    reason = getattr(error, "strerror", None) or str(error).strip().split("\n")[0] or type(error).__name__
    return TransformerError(
        f"could not write checkpoint {path} ({reason}): check free disk space and permissions; the "
        f"previous checkpoint files are intact"
    )


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _unreadable(path: Path, why: object) -> TransformerError:
    return TransformerError(
        f"{path} is not a readable safetensors checkpoint ({why}): "
        f"it may be truncated or from another program"
    )


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata, restoring aliased keys so every state-dict key is present."""
    path = Path(path)
    if path.is_dir():
        raise TransformerError(
            f"{path} is a directory, not a checkpoint file: pass a weights file such as {path / 'best'}"
            f"{WEIGHTS_SUFFIX}"
        )
    if not path.is_file():
        raise TransformerError(f"no checkpoint at {path}: check the path or list the run directory")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open objects are not iterable
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from error
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except json.JSONDecodeError as error:
        raise _unreadable(path, f"bad 'aliases' metadata: {error}") from error
    if not isinstance(aliases, dict):
        raise _unreadable(path, "bad 'aliases' metadata: not a mapping")
    for alias, kept in aliases.items():
        if kept not in tensors or alias in tensors:
            raise _unreadable(path, f"alias {alias!r} -> {kept!r} does not match the stored tensors")
        tensors[alias] = tensors[kept]  # the same tensor object, like tied parameters in the model
    return tensors, metadata


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header, without reading its tensors; {} where the file is
    missing or unreadable (whoever loads it reports that)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load `NAME.safetensors` into a CPU state dict with every key, tied ones included."""
    return _read_weights(path)[0]


def _read_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TransformerError(
            f"no training state at {path}: this checkpoint holds weights only, so training cannot resume "
            f"from it; resume from a checkpoint saved with its state (e.g. 'last')"
        )
    try:
        # weights_only=False: the state holds Python RNG tuples and the like, and the file is our own.
        # Any failure inside unpickling means the same thing to the user (broken or foreign file), so all
        # exceptions from torch.load are reported alike.
        envelope = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise TransformerError(
            f"{path} is not a readable training-state file ({type(error).__name__}: {error}): it may be "
            f"truncated or from another program"
        ) from error
    if not (isinstance(envelope, dict) and envelope.get("format") == _STATE_FORMAT and "state" in envelope):
        raise TransformerError(
            f"{path} is not a training-state file written by this toolkit: it may be from another program"
        )
    check_format_version(envelope.get("version", 1), path)
    return envelope


def load_state(path: Path) -> dict:
    """Load the training-state dict from `NAME.state.pt`, as it was passed to `save_checkpoint`.

    Only load run directories you trust: like any pickle, the file can run code when loaded.
    """
    return _read_state(path)["state"]


def load_checkpoint(
    run_dir_or_file: Path, name: str = "best", *, with_state: bool = False
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load a checkpoint's weights and, with `with_state`, its training state (required then).

    Translation needs only weights, so the state is not read unless asked for. When it is, the two files
    must come from the same save; otherwise a crash tore the pair apart and resuming would combine
    mismatched weights and optimizer state.
    """
    weights_path = checkpoint_path(run_dir_or_file, name)
    weights, metadata = _read_weights(weights_path)
    if not with_state:
        return weights, None
    state_path = state_path_for(weights_path)
    envelope = _read_state(state_path)
    if envelope.get("checkpoint_id") != metadata.get("checkpoint_id"):
        others = ", ".join(n for n in list_checkpoints(weights_path.parent) if n != name) or "none"
        raise TransformerError(
            f"{weights_path} and {state_path} come from different saves (a save was interrupted between "
            f"them): resume from another checkpoint (others here: {others})"
        )
    return weights, envelope["state"]


# --------------------------------------------------------------------------------------------------------
# Averaging and pruning
# --------------------------------------------------------------------------------------------------------


def average_weights(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several checkpoints' weights (Vaswani et al. averaged the last 5 or 20).

    Accumulates in float64 so that averaging many float32/bf16 checkpoints adds no rounding drift, and
    returns each tensor in its dtype in the first checkpoint. Non-floating tensors (integer buffers) cannot
    be averaged meaningfully and are taken from the last checkpoint. Checkpoints are read one at a time,
    so memory stays at about two models however many are averaged. Tied weights (one tensor under several
    keys, as `load_weights` gives them) are averaged once and stay one tensor, so that the average is
    written once, like its checkpoints, not once per key.
    """
    if not paths:
        raise TransformerError("no checkpoints to average: pass at least one checkpoint file")
    first = Path(paths[0])
    reference = load_weights(first)
    dtypes = {key: t.dtype for key, t in reference.items()}
    holder: dict[int, str] = {}  # id of a tensor -> the first key that holds it
    tied_to = {key: holder.setdefault(id(t), key) for key, t in reference.items()}
    sums: dict[str, torch.Tensor] = {
        key: t.to(torch.float64, copy=True) if t.is_floating_point() else t
        for key, t in reference.items()
        if tied_to[key] == key
    }
    for path in paths[1:]:
        path = Path(path)
        weights = load_weights(path)
        missing = sorted(set(reference) - set(weights))
        extra = sorted(set(weights) - set(reference))
        if missing or extra:
            key, where = (missing[0], f"missing from {path}") if missing else (extra[0], f"absent in {first}")
            raise TransformerError(
                f"cannot average {first} and {path}: key {key!r} is {where}; average only checkpoints of the "
                f"same model"
            )
        for key in sums:
            tensor = weights[key]
            if tensor.shape != sums[key].shape:
                raise TransformerError(
                    f"cannot average {first} and {path}: {key!r} has shape {tuple(sums[key].shape)} vs "
                    f"{tuple(tensor.shape)}; average only checkpoints of the same model"
                )
            if dtypes[key].is_floating_point:
                sums[key] += tensor.to(torch.float64)
            else:
                sums[key] = tensor
    count = len(paths)
    means = {
        key: (total / count).to(dtypes[key]) if dtypes[key].is_floating_point else total
        for key, total in sums.items()
    }
    return {key: means[tied_to[key]] for key in reference}


def prune_checkpoints(run_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` step-* checkpoints (both files); return the names deleted.

    `best`, `last` and other named checkpoints are never touched. The weights file goes first so that an
    interrupted prune leaves at most an unlisted state file, never a listed checkpoint without its state.
    """
    if keep < 0:
        raise TransformerError(f"cannot keep {keep} checkpoints: the number to keep must be 0 or more")
    run_dir = Path(run_dir)
    steps = [name for name in list_checkpoints(run_dir) if step_of(name) is not None]
    doomed = steps[: max(len(steps) - keep, 0)]
    for name in doomed:
        weights_path = run_dir / f"{name}{WEIGHTS_SUFFIX}"
        weights_path.unlink(missing_ok=True)
        state_path_for(weights_path).unlink(missing_ok=True)
    return doomed
