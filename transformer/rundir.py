"""What a run directory promises across crashes and resumes.

A run may be killed at any instant (SIGKILL, power cut, full disk). Checkpoint files are replaced
atomically (`checkpoint.atomic_write`), but a checkpoint is two files, and a kill between their two
renames leaves `last` torn: new training state beside old weights. `resume_point` then falls back to the
newest complete checkpoint, which the evaluation save order (`best`, `step-N`, then `last`) makes the same
step, or the one before it, whose resume validates that step again. `best` records the validation BLEU it
was saved with, so that it is replaced only by better weights, whatever the resumed progress knows of.
A resumed run must also be the run it claims to continue: `config.json` records the model and training
settings, the tokenizer's and the data's sha256 and the format version, and `check_resumable` refuses a
resume under which any of those changed, saying what changed. For the same reason
`average_into` averages only checkpoints of one tokenizer and model, and writes only into a new directory.
The training split's token ids are kept beside the checkpoints (`TRAIN_IDS`), under a key of what they
derive from, so that a resume reads them instead of tokenising the corpus again.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from transformer import distributed
from transformer.checkpoint import (
    FORMAT_VERSION,
    STATE_SUFFIX,
    WEIGHTS_SUFFIX,
    atomic_write,
    atomic_write_text,
    average_weights,
    check_format_version,
    list_checkpoints,
    load_checkpoint,
    save_weights,
    state_path_for,
    step_of,
)
from transformer.config import TrainConfig, model_config_class
from transformer.data.dataset import Corpus, TokenSequences, fits_16_bits
from transformer.errors import TransformerError

# Settings a resume may change: budgets, how often to validate and log, threads and compilation, the
# step size, which a run that diverged must lower to go on (train's message says so), and the test split,
# scored after training; not what is trained.
MAY_CHANGE = frozenset(
    {
        "test_split",
        "max_epochs",
        "max_steps",
        "time_budget_minutes",
        "patience",
        "eval_every",
        "log_every",
        "threads",
        "compile",
        "lr_factor",
        "warmup",
        "clip_norm",
    }
)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed, so a killed run keeps its history.
    A `fresh` log (a new run's) starts empty: a run that failed in the directory before it leaves one."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        if fresh and distributed.is_main():
            path.unlink(missing_ok=True)

    def write(self, **record: Any) -> None:
        if not distributed.is_main():  # rank 0 logs for all processes
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def data_sha256(pairs: Sequence[tuple[str, str]]) -> str:
    """A digest of a split's sentence pairs as the trainer reads them (after stripping), so a plain and a
    gzipped copy of the same text agree but any changed, added or removed line does not."""
    digest = DataDigest()
    digest.update(pairs)
    return digest.hexdigest()


class DataDigest:
    """`data_sha256` of pairs given a block at a time, as a large split is read (`corpus.iter_split`)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, pairs: Sequence[tuple[str, str]]) -> None:
        for src, tgt in pairs:  # faster than one update of the block joined (0.6 s a million, not 1.0 s)
            self._sha.update(f"{src}\t{tgt}\n".encode("utf-8", errors="surrogatepass"))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


TEXT_DIGEST = "train.text.json"  # the training text's digest, with the state of the files it was read from


def file_stamps(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """What a file's content cannot change without changing, as git's index takes it: its place, size,
    and modification and status-change times. The kernel sets the last on every write, whatever a tool
    then does to the modification time (`touch -d`, `cp -p`)."""
    stamps = []
    for path in paths:
        st = path.stat()
        place = {"path": str(path.resolve()), "device": st.st_dev, "inode": st.st_ino}
        stamps.append({**place, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns})
    return stamps


def keep_text_digest(run_dir: Path, digest: str, stamps: list[dict[str, Any]]) -> None:
    """Keep the training text's digest with the stamps of its files (`TextStamps.settled`), for a resume to
    take instead of reading the text again (70 s at WMT14 en-fr's 36M pairs)."""
    atomic_write_text(run_dir / TEXT_DIGEST, json.dumps({"sha256": digest, "files": stamps}, indent=2) + "\n")


def kept_text_digest(run_dir: Path, paths: Sequence[Path]) -> str | None:
    """The training text's kept digest if its files are still as they were when it was taken, else None
    (also for a run that kept none, or an unreadable record): the text is then read again."""
    try:
        kept = json.loads((run_dir / TEXT_DIGEST).read_text())
        if kept["files"] == file_stamps(paths) and isinstance(kept["sha256"], str):
            return kept["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


RACY_NS = 1_000_000_000  # a file changed this shortly before it is read may change again unseen


@dataclasses.dataclass(frozen=True)
class TextStamps:
    """A text's files' stamps (`file_stamps`), taken at `taken_ns` (the epoch's ns) before reading them."""

    files: list[dict[str, Any]]
    taken_ns: int

    @classmethod
    def take(cls, paths: Sequence[Path]) -> TextStamps:
        return cls(file_stamps(paths), time.time_ns())

    def settled(self, paths: Sequence[Path]) -> list[dict[str, Any]] | None:
        """The stamps, read again once the files are read, if they can vouch for what was read: the files
        did not change while they were read, nor `RACY_NS` before (a change within one tick of the file
        system's clock would leave the times as they were: git's "racily clean" files). Else None, and
        the digest is not kept."""
        recent = self.taken_ns - RACY_NS
        if file_stamps(paths) != self.files or any(s["ctime_ns"] >= recent for s in self.files):
            return None
        return self.files


TRAIN_IDS = "train.ids"  # a safetensors file, named apart from the checkpoints (`*.safetensors`)
IDS_FORMAT = "1"  # raised when the filtering or the layout changes, which the key cannot see
# safetensors' names of the dtypes the kept ids use
_NUMPY_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64}
# train.ids's arrays, in the file's order: the int64 offsets first, so that every array is aligned.
_IDS_ARRAYS = ("src.offsets", "tgt.offsets", "src.ids", "tgt.ids")


def ids_dtype(vocab_size: int) -> str:
    """The dtype train.ids keeps a vocabulary's ids in: 16 bits where every id fits, as in fairseq's
    binarised data, which halves the file, its pages shared by a torchrun's processes, and a resume's read
    (WMT14 en-fr's 36M pairs: 4.9 GB, not 9.2); 32 bits past 65,536 pieces."""
    return "U16" if fits_16_bits(vocab_size) else "I32"


class TrainingIdsWriter:
    """Keep the training split's ids in the run directory, so that a resumed run (and under torchrun every
    process but the first) reads them instead of tokenising the corpus again: about two minutes at WMT14's
    4.5M pairs on two cores. `key` names what the ids derive from (digests of the text and the tokenizer,
    and max_len); the filter's counts go along for the log.

    The ids are given a block at a time, as the training split is tokenised: each block goes to disk at
    once, into one part file per array, so the process never holds the corpus's ids (0.61 GB at 4.5M
    pairs in 16 bits, 4.9 GB at WMT14 en-fr's 36M). `vocab_size` sets their dtype (`ids_dtype`).
    `finish` joins the parts into a safetensors file, written atomically, removing each part once it is
    copied; the parts are removed however it ends (named as temp files, so that a resume, or a new run in
    the directory, also removes those of a killed run)."""

    def __init__(self, run_dir: Path, key: dict[str, str], vocab_size: int) -> None:
        self._path, self._key = run_dir / TRAIN_IDS, key
        ids = ids_dtype(vocab_size)
        self._dtypes = {"src.offsets": "I64", "tgt.offsets": "I64", "src.ids": ids, "tgt.ids": ids}
        self._parts = {name: run_dir / f".{TRAIN_IDS}.{name}.tmp-{os.getpid()}" for name in _IDS_ARRAYS}
        self._files: dict[str, BinaryIO] = {}
        self._ends = {"src": 0, "tgt": 0}  # tokens written so far, a side
        try:
            for name, path in self._parts.items():
                self._files[name] = path.open("wb")
            for side in self._ends:
                self._files[f"{side}.offsets"].write(np.zeros(1, np.int64).tobytes())
        except BaseException:  # no `with` holds the writer yet: remove what was made
            self.__exit__()
            raise

    def add(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> None:
        """The next sentences' ids, a side each."""
        for side, sequences in (("src", src), ("tgt", tgt)):
            lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
            dtype = _NUMPY_DTYPES[self._dtypes[f"{side}.ids"]]
            ids = np.fromiter(chain.from_iterable(sequences), dtype, int(lengths.sum()))
            self._files[f"{side}.ids"].write(ids.tobytes())
            self._files[f"{side}.offsets"].write((self._ends[side] + np.cumsum(lengths)).tobytes())
            self._ends[side] += len(ids)

    def finish(self, counts: dict[str, int]) -> None:
        """Write train.ids from the parts, with `counts` (the filter's) beside the key."""
        for file in self._files.values():
            file.close()
        header: dict[str, Any] = {
            "__metadata__": {**self._key, "format": IDS_FORMAT, "counts": json.dumps(counts)}
        }
        start = 0
        for name, dtype in self._dtypes.items():
            size = self._parts[name].stat().st_size
            shape = [size // np.dtype(_NUMPY_DTYPES[dtype]).itemsize]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
            start += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                out.write(struct.pack("<Q", len(encoded)) + encoded)
                for name in _IDS_ARRAYS:
                    with self._parts[name].open("rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
                    # Gone once copied: the disk holds the ids and one part more at the most (~1.5 times
                    # the ids, not twice). A failed join tokenises again anyway (prepare._tokenise_into).
                    self._parts[name].unlink()

        atomic_write(self._path, write)

    def __enter__(self) -> TrainingIdsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for name, file in self._files.items():
            file.close()
            self._parts[name].unlink(missing_ok=True)


def load_training_ids(run_dir: Path, key: dict[str, str]) -> tuple[Corpus, dict[str, int]] | None:
    """The ids and counts `TrainingIdsWriter` kept under the same `key`, or None: none kept, or kept for
    other text, another tokenizer or max_len. A file that cannot be read raises TransformerError.

    The ids are a read-only memory map of the file, not a copy: under torchrun the processes share one
    copy in the page cache (WMT14 en-de's is 0.61 GB), which the kernel may also drop under memory
    pressure and read again."""
    path = run_dir / TRAIN_IDS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as saved:  # checks the header against the file
            metadata = saved.metadata() or {}
        if any(metadata.get(name) != value for name, value in {**key, "format": IDS_FORMAT}.items()):
            return None
        arrays = _mapped_arrays(path)
        src, tgt = (
            TokenSequences.from_arrays(arrays[f"{side}.ids"], arrays[f"{side}.offsets"])
            for side in ("src", "tgt")
        )
        counts = json.loads(metadata["counts"])
        if not len(src) == len(tgt) == counts["kept"]:
            raise ValueError(f"{len(src)} source and {len(tgt)} target sentences for {counts['kept']} pairs")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise TransformerError(f"{path} cannot be read ({error})") from error
    return Corpus(src, tgt, []), counts


def _mapped_arrays(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only memory maps, from the header's offsets: safetensors'
    own numpy loader copies each tensor into the process. Call it on a file `safe_open` has accepted,
    which checks that the offsets lie inside the file."""
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    arrays = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _NUMPY_DTYPES[tensor["dtype"]], tuple(tensor["shape"])
        start = tensor["data_offsets"][0]
        if math.prod(shape) == 0:  # nothing to map (mmap refuses an empty range)
            arrays[name] = np.empty(shape, dtype)
        else:
            arrays[name] = np.memmap(path, dtype, mode="r", offset=8 + header_size + start, shape=shape)
    return arrays


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


def _settings_differ(
    saved: dict[str, Any],
    current: dict[str, Any],
    may_change: frozenset[str],
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """The settings of `current` that differ from `saved`, as `key: old -> new`, in `current`'s order; keys
    in `may_change` are not compared. A setting `saved` lacks (a run started before it existed) ran as its
    default does: a new setting's default keeps the behaviour from before it."""
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key not in may_change and saved.get(key, (defaults or {}).get(key)) != value
    ]


def _field_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


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
    family = model_config_class(current["train"].get("model", "transformer"))
    defaults = {"model": _field_defaults(family), "train": _field_defaults(TrainConfig)}
    for section in ("model", "train"):
        differ = _settings_differ(saved[section], current[section], may_change, defaults[section])
        if differ:
            return f"the {section} config differs ({'; '.join(differ)})"
    return None


def check_resumable(run_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run under a different tokenizer, data or settings, naming what differs."""
    why = run_difference(saved, current)
    if why:
        raise TransformerError(f"cannot resume {run_dir}: {why}")


def create_run_dir(run_dir: Path) -> None:
    """Create the run directory given as --out (and its parents), saying what is wrong with it where it
    cannot be one, rather than the OS's bare `[Errno 17] File exists`."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # run_dir, or a directory above it, is a file
        blocking = next(p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir())
        raise TransformerError(
            f"cannot create the run directory {run_dir}: {blocking} is a file, not a directory; choose "
            f"another --out"
        ) from None
    except OSError as error:
        raise _uncreatable(run_dir, error) from error


def _uncreatable(run_dir: Path, error: OSError) -> TransformerError:
    return TransformerError(
        f"cannot create the run directory {run_dir} ({error.strerror or error}): choose an --out where you "
        f"can write"
    )


def resume_point(run_dir: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The newest complete checkpoint with training state: (name, weights, state, notes on skipped ones).

    `last` is preferred unless it is torn or unreadable, or a `step-N` checkpoint is newer than it (a kill
    after saving `step-N` but before `last` was replaced). `best`, saved first at each validation, is the
    run's only checkpoint where a kill came right after it at the first validation: then it is the one
    (an averaged `best` has no training state).
    """
    notes: list[str] = []
    chosen: tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None = None
    try:
        weights, state = load_checkpoint(run_dir, "last", with_state=True)
        chosen = ("last", weights, state or {})
    except TransformerError as error:
        notes.append(f"last: {error}")
    last_step = chosen[2]["progress"]["step"] if chosen else -1
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
    if chosen is None and list_checkpoints(run_dir) == ["best"]:
        try:
            weights, state = load_checkpoint(run_dir, "best", with_state=True)
            if state and "progress" in state:
                return "best", weights, state, notes
        except TransformerError as error:
            notes.append(f"best: {error}")
    if chosen is None:
        raise TransformerError(
            f"cannot resume {run_dir}: it holds no complete checkpoint with training state ({notes[0]})"
        )
    return (*chosen, notes)


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files of atomic writes whose process died before renaming them (`.NAME.tmp-PID`),
    and training states whose weights are gone: a save killed between its two files, or a prune between
    its two deletes, leaves one, which nothing lists or reads (`checkpoint.list_checkpoints`). Call it as
    a run starts, before its first save: that writes the state first, alone for a moment."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    for path in Path(run_dir).glob(f"*{STATE_SUFFIX}"):
        if not path.with_name(path.name.removesuffix(STATE_SUFFIX) + WEIGHTS_SUFFIX).exists():
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


# --------------------------------------------------------------------------------------------------------
# Averaging checkpoints into a new file or run directory
# --------------------------------------------------------------------------------------------------------


def _model_identity(run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """What must agree for checkpoints of two runs to be averaged, beyond their shapes: the sha256 of the
    tokenizer (the file where there is one, else what config.json records), as another tokenizer of the
    same size gives the same ids other pieces, and the model family and settings. None where the run does
    not say. A setting the record lacks (a run made before it existed) is its default, as in a resume
    (`run_difference`), so that records of before and after a new setting compare alike both ways."""
    record = read_run_record(run_dir) if (run_dir / "config.json").is_file() else None
    tokenizer = run_dir / "tokenizer.model"
    if tokenizer.is_file():
        digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    else:
        digest = (record or {}).get("tokenizer_sha256")
    if record is None:
        return digest, None
    family = record["train"].get("model", "transformer")
    return digest, {"model": family, **_field_defaults(model_config_class(family)), **record["model"]}


def _model_mismatch(run_a: Path, run_b: Path) -> str | None:
    """How the runs `run_a` and `run_b` hold different models, or None when nothing they record says so."""
    (tokenizer_a, model_a), (tokenizer_b, model_b) = _model_identity(run_a), _model_identity(run_b)
    if tokenizer_a and tokenizer_b and tokenizer_a != tokenizer_b:
        digests = f"{_short(tokenizer_a)}… vs {_short(tokenizer_b)}…"
        return f"their tokenizers differ (tokenizer.model sha256 {digests})"
    differ = _settings_differ(model_a, model_b, frozenset()) if model_a and model_b else []
    return f"their model settings differ ({'; '.join(differ)})" if differ else None


def _runs_of(paths: Sequence[Path]) -> dict[Path, Path]:
    """The run directories the checkpoint files `paths` lie in, resolved -> as given, in order."""
    runs: dict[Path, Path] = {}
    for path in paths:
        runs.setdefault(Path(path).resolve().parent, Path(path).parent)
    return runs


def _check_one_model(runs: dict[Path, Path]) -> None:
    """Refuse checkpoints from runs with another tokenizer or model settings than the first's: of the same
    shapes, their average is a valid file of a meaningless model."""
    first, *others = runs.values()
    for run in others:
        why = _model_mismatch(first, run)
        if why:
            raise TransformerError(
                f"cannot average checkpoints of {first} and {run}: {why}; average only checkpoints of one "
                f"model"
            )


def _check_destination(out: Path, runs: dict[Path, Path]) -> None:
    """Refuse an --out that would replace another run's weights, or the checkpoints' own run's `best`.

    A weights file may go anywhere but into the directory of a run of another model, or over a run's
    `best`, `last` or `step-N` (whose `.state.pt` would then be another save's). A run directory must be
    new (or empty), like `export`'s: averaging into the checkpoints' own run would silently replace the
    `best` it trained, so that takes a file path, as fairseq's and OpenNMT's averaging scripts do."""
    first = next(iter(runs.values()))
    if out.suffix == WEIGHTS_SUFFIX:
        parent = out.parent
        name = out.name.removesuffix(WEIGHTS_SUFFIX)
        trainers = name in ("best", "last") or step_of(name) is not None
        if trainers and ((parent / "config.json").is_file() or state_path_for(out).exists()):
            raise TransformerError(
                f"{out} is a checkpoint of the run in {parent}, which the average would replace: write it "
                f"beside it under another name, e.g. --out {parent / ('average' + WEIGHTS_SUFFIX)}"
            )
        if parent.resolve() not in runs and parent.is_dir():
            why = _model_mismatch(first, parent)
            if why:
                raise TransformerError(
                    f"cannot write the average into {parent}, another model's run directory: {why}; choose "
                    f"another --out"
                )
        return
    if out.exists() and not out.is_dir():
        raise TransformerError(
            f"--out {out} is an existing file: give a new directory, or a path ending in {WEIGHTS_SUFFIX} "
            f"for the weights alone"
        )
    if not out.exists() or not any(out.iterdir()):
        return
    if out.resolve() in runs:
        beside = out / f"average{WEIGHTS_SUFFIX}"
        raise TransformerError(
            f"{out} is the run directory the checkpoints come from, and its best{WEIGHTS_SUFFIX} would be "
            f"replaced: write the average beside it as a file, e.g. --out {beside} (then translate with "
            f"--name average)"
        )
    raise TransformerError(
        f"{out} already exists and is not an empty directory: choose a new --out (a directory, or a path "
        f"ending in {WEIGHTS_SUFFIX})"
    )


def _write_run_dir(out: Path, source: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Make `out` a run directory of the averaged weights as `best`, with `source`'s config.json and
    tokenizer.model (what a Translator needs). It is built under a temporary name and renamed into place,
    so a failure leaves no half-written directory behind (which a retry would refuse as not empty)."""
    made = not out.exists()
    create_run_dir(out)  # an --out that cannot be a directory fails here, before any work
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        for name in ("config.json", "tokenizer.model"):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        save_weights(tmp / f"best{WEIGHTS_SUFFIX}", weights)
        os.replace(tmp, out)  # replaces the empty directory
    except OSError as error:
        raise _uncreatable(out, error) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
        if made and not any(out.iterdir()):  # the rename did not happen: no empty directory left either
            out.rmdir()
    return out / f"best{WEIGHTS_SUFFIX}"


def average_into(paths: Sequence[Path], out: Path) -> Path:
    """Average the checkpoint files `paths` into `out`, a `.safetensors` file or a new run directory, and
    return the weights file written. Everything is checked before the (slow) averaging starts."""
    out = Path(out)
    runs = _runs_of(paths)
    _check_one_model(runs)
    _check_destination(out, runs)
    weights = average_weights(paths)
    if out.suffix == WEIGHTS_SUFFIX:
        save_weights(out, weights)
        return out
    return _write_run_dir(out, next(iter(runs.values())), weights)
