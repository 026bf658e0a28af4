"""`transformer train` under torchrun: two CPU processes (gloo) give one process's result.

Two processes with `accumulate=1` see, in each optimiser step, the same two batches as one process with
`accumulate=2` (batch 2k on rank 0, batch 2k + 1 on rank 1), and the loss is normalised by the step's
token count over both, so the weights must agree up to floating-point order. The two-process run is
stopped after 2 steps and resumed for 2 more, so resuming under DDP is checked against an uninterrupted
single process too. (With two batches per process the gradients would be summed in another order, and Adam
magnifies that rounding to learning-rate-sized steps of the attention key bias, whose exact gradient is zero;
see transformer/distributed.py.)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, tiny_recipe

from transformer import distributed
from transformer.checkpoint import load_state, load_weights
from transformer.errors import TransformerError
from transformer.train import train

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5

# Every step fits in the first epoch (28 batches of 300 tokens): an epoch's odd last batch would be dropped
# by two processes but trained on by one.
RECIPE = {
    "max_tokens": 300,
    "eval_every": 2,
    "log_every": 1,
    "test_split": "",
    "average_last": 2,
    "threads": 1,
}
MODEL = {**TINY_MODEL, "dropout": 0.0}  # dropout would draw different masks in one and in two processes


def records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def torchrun_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TRANSFORMER_KEEP_ALLOCATOR": "1",  # skip the allocator re-exec: one Python start-up less per rank
        "PYTHONFAULTHANDLER": "1",  # a rank that aborts prints where each of its threads was
    }


# Two CPU processes started by torchrun, with a rendezvous on a free local port; the program follows.
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def on_two(*program: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`program` (a script and its arguments, or `-m module ...`) run by two torchrun processes."""
    return subprocess.run(
        [*TWO_PROCESSES, *program], env=torchrun_env(), capture_output=True, text=True, timeout=timeout
    )


def torchrun(
    run_dir: Path, data_dir: Path, max_steps: int, *extra: str, dropout: float = 0.0, succeeds: bool = True
) -> subprocess.CompletedProcess[str]:
    """`transformer train` on two CPU processes, each with one thread."""
    recipe = dataclasses.asdict(tiny_recipe(data_dir, **RECIPE, max_steps=max_steps))
    overrides = [f"{key}={value}" for key, value in {**recipe, **MODEL, "dropout": dropout}.items()]
    done = on_two("-m", "transformer.cli", "train", "--out", str(run_dir), *overrides, *extra, timeout=300)
    assert (done.returncode == 0) == succeeds, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(two-process run stopped at step 2, the same resumed to step 4, one process to step 4)."""
    two = tmp_path_factory.mktemp("ddp")
    torchrun(two, data_dir, 2)
    after_two_steps = {
        "weights": load_weights(two / "last.safetensors"),
        "state": load_state(two / "last.state.pt"),
    }
    torchrun(two, data_dir, 4, "--resume")

    one = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    try:
        train(tiny_recipe(data_dir, **RECIPE, accumulate=2, max_steps=4), MODEL, one)
    finally:
        torch.set_num_threads(threads)
    return two, one, after_two_steps


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_train_like_one_with_their_batches_accumulated(runs) -> None:
    two, one, after_two_steps = runs
    # One record per start: the run and its resumption.
    assert records(two, "distributed") == [{"event": "distributed", "world_size": 2, "backend": "gloo"}] * 2
    # Rank 0 alone logs: every step once, across the resumption.
    two_losses = [r["loss"] for r in records(two, "train")]
    one_losses = [r["loss"] for r in records(one, "train")]
    assert [r["step"] for r in records(two, "train")] == [1, 2, 3, 4]
    assert two_losses == pytest.approx(one_losses, rel=TOLERANCE, abs=0)
    # ...and the padding logged is of both processes' batches, not rank 0's alone
    paddings = [[r["padding"] for r in records(run, "train")] for run in (two, one)]
    assert paddings[0] == pytest.approx(paddings[1], rel=1e-12)
    # The steps' weights, before and after the resumption.
    first = max_difference(after_two_steps["weights"], load_weights(one / "step-0000002.safetensors"))
    resumed = load_weights(two / "last.safetensors")
    last = max_difference(resumed, load_weights(one / "step-0000004.safetensors"))
    assert first <= TOLERANCE and last <= TOLERANCE, (first, last)
    # Validation is sharded over the processes and pooled: the same loss as one process's.
    for a, b in zip(records(two, "valid"), records(one, "valid"), strict=True):
        assert (a["step"], a["loss"]) == (b["step"], pytest.approx(b["loss"], rel=TOLERANCE))
    # The agreement means something: steps 3 and 4 moved the weights far more than the tolerance.
    moved = max_difference(*(load_weights(one / f"step-000000{n}.safetensors") for n in (2, 4)))
    assert moved > 1000 * TOLERANCE


def test_each_process_saves_and_resumes_its_own_random_stream(runs) -> None:
    _, _, after_two_steps = runs
    per_rank = after_two_steps["state"]["rng_per_rank"]
    assert len(per_rank) == 2
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])  # dropout masks differ by rank
    assert torch.equal(after_two_steps["state"]["rng"]["torch"], per_rank[0]["torch"])


def test_a_one_process_run_resumes_mid_epoch_on_two(data_dir: Path, tmp_path: Path) -> None:
    """Stopped at batch 3 of 28 by one process, the epoch's steps for two from there end at batch 27: a
    step must not take the odd last batch, which one process would then train alone (the other would
    skip DDP's all-reduce, and gloo abort)."""
    run = tmp_path / "run"
    train(tiny_recipe(data_dir, **RECIPE, max_steps=3), MODEL, run)
    torchrun(run, data_dir, 20, "--resume")
    assert [r["step"] for r in records(run, "train")][-1] == 20
    assert next(r["epoch"] for r in records(run, "train") if r["step"] == 15) == 0  # batches 25, 26
    assert next(r["epoch"] for r in records(run, "train") if r["step"] == 16) == 1


def test_a_resumed_two_process_run_with_dropout_is_the_unbroken_one(data_dir: Path, tmp_path: Path) -> None:
    """With dropout on, each process's random stream decides its masks: restored per rank on resume, the
    stopped-and-resumed run gives the unbroken run's weights exactly."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    torchrun(unbroken, data_dir, 4, dropout=0.3)
    torchrun(resumed, data_dir, 2, dropout=0.3)
    torchrun(resumed, data_dir, 4, "--resume", dropout=0.3)
    a, b = load_weights(unbroken / "last.safetensors"), load_weights(resumed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(unbroken, "train")] == [r["loss"] for r in records(resumed, "train")]


def test_a_training_split_rank_0_cannot_read_stops_both_processes_with_its_error(
    data_dir: Path, tmp_path: Path
) -> None:
    """Rank 0 alone reads the training text; the other process must stop with rank 0's one-line error,
    not with a traceback of the connection rank 0 closed, and nothing is written."""
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    for lang in ("de", "en"):
        (bad / f"train.{lang}").write_text("\n\n")
    done = torchrun(tmp_path / "run", bad, 2, succeeds=False)
    error = f"error: the 'train' split in {bad} is empty (no line pair with text on both sides)"
    assert done.stderr.count(error) == 2, done.stderr[-3000:]  # one line from each process
    assert "[rank1]" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("blocked", "error"),
    [
        ("step-0000002.safetensors", "could not write checkpoint {path} (Is a directory)"),  # in save()
        ("results.json", "[Errno 21] Is a directory: "),  # an OSError, in finish()
    ],
)
def test_a_file_rank_0_cannot_write_stops_both_processes_with_its_error(
    data_dir: Path, tmp_path: Path, blocked: str, error: str
) -> None:
    """Rank 0 writes the run's files while the other process waits: a write that fails (here onto a
    directory in its place; a full disk alike) stops both with rank 0's one-line error."""
    run = tmp_path / "run"
    (run / blocked).mkdir(parents=True)
    done = torchrun(run, data_dir, 2, succeeds=False)
    line = "error: " + error.format(path=run / blocked)
    assert done.stderr.count(line) == 2, done.stderr[-3000:]
    assert "[rank1]" not in done.stderr


def children(pid: int) -> list[Path]:
    """The /proc entries of a process's children (in /proc/PID/stat the field after the command's
    closing parenthesis is the state, then the parent's pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(entry)
    return found


def test_a_sigterm_to_one_process_stops_both_at_the_same_step_with_last_saved(
    data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    recipe = dataclasses.asdict(tiny_recipe(data_dir, **{**RECIPE, "eval_every": 0}, max_steps=100_000))
    command = [*TWO_PROCESSES, "-m", "transformer.cli", "train", "--out", str(run)]
    command += [f"{key}={value}" for key, value in {**recipe, **MODEL}.items()]
    launcher = subprocess.Popen(
        command, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not records(run, "train"):  # both are in the loop
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)
    (rank_1,) = [w for w in children(launcher.pid) if b"LOCAL_RANK=1\0" in (w / "environ").read_bytes()]
    os.kill(int(rank_1.name), signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    stopped = re.findall(r"interrupted: stopped by (SIGTERM|a signal to another process) at step (\d+)", err)
    assert sorted(stopped) == sorted(
        [("SIGTERM", stopped[0][1]), ("a signal to another process", stopped[0][1])]
    )
    step = int(stopped[0][1])
    assert load_state(run / "last.state.pt")["progress"]["step"] == step  # written before either left


def test_alone_every_collective_is_the_identity() -> None:
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.usable(7) == 7
    assert distributed.all_sum([1, 2.5]) == [1.0, 2.5] and distributed.from_main("x") == "x"
    assert distributed.map_sharded(lambda part: [2 * x for x in part], [1, 2, 3]) == [2, 4, 6]
    assert distributed.own_state(["only"]) == "only" and distributed.own_state(["a", "b"]) is None
    assert distributed.on_main(lambda: "done") == "done"
    with pytest.raises(TransformerError, match=r"^no such split$"):
        distributed.on_main(partial(failing, TransformerError("no such split")))
    with pytest.raises(OSError, match=r"^disk full$"):
        distributed.on_main(partial(failing, OSError("disk full")))
    with pytest.raises(ValueError, match=r"^a bug$"):  # a bug is not shared: its traceback is what to read
        distributed.on_main(partial(failing, ValueError("a bug")))


def failing(error: Exception) -> None:
    raise error


def test_shutdown_leaves_the_process_group_and_is_a_no_op_outside_one(tmp_path: Path) -> None:
    """A finished run leaves its group itself (`train` calls `shutdown`) rather than at exit."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    assert distributed.active()
    distributed.shutdown()
    assert not distributed.active()
    distributed.shutdown()


@pytest.fixture
def group_of_one(tmp_path: Path):
    """A gloo process group of one process, in which the collectives run for real."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        distributed.shutdown()


def test_long_work_runs_while_the_processes_meet_once_a_heartbeat(group_of_one, monkeypatch) -> None:
    beats = []
    monkeypatch.setattr(distributed, "HEARTBEAT", datetime.timedelta(seconds=0.05))
    monkeypatch.setattr(distributed, "from_main", lambda value: beats.append(value) or value)

    def work() -> str:
        time.sleep(0.5)
        return threading.current_thread().name  # the work keeps the main thread, where signals arrive

    assert distributed.on_main(work, long=True) == "MainThread"
    assert beats[-2:] == [True, None] and len(beats) >= 6 and not any(beats[:-2]), beats
    beats.clear()
    assert distributed.on_main(work) == "MainThread" and beats == [None]  # short work: no beats


def test_what_long_work_raises_is_raised_as_from_short_work(group_of_one) -> None:
    with pytest.raises(TransformerError, match=r"^no such split$"):
        distributed.on_main(partial(failing, TransformerError("no such split")), long=True)
    with pytest.raises(OSError, match=r"^disk full$"):
        distributed.on_main(partial(failing, OSError("disk full")), long=True)
    with pytest.raises(ValueError, match=r"^a bug$") as raised:
        distributed.on_main(partial(failing, ValueError("a bug")), long=True)
    assert raised.traceback[-1].name == "failing"  # the traceback reaches into the work


def test_the_work_of_each_process_runs_while_they_meet_until_all_are_done(group_of_one, monkeypatch) -> None:
    beats = []
    monkeypatch.setattr(distributed, "HEARTBEAT", datetime.timedelta(seconds=0.05))
    monkeypatch.setattr(distributed, "all_sum", lambda values: beats.append(values) or values)
    assert distributed.on_each(lambda: time.sleep(0.5) or "done") == "done"
    assert beats[-1] == [0.0] and len(beats) >= 6 and all(beat == [1.0] for beat in beats[:-1]), beats
    with pytest.raises(TransformerError, match=r"^other text$"):
        distributed.on_each(partial(failing, TransformerError("other text")))
    with pytest.raises(ValueError, match=r"^a bug$"):
        distributed.on_each(partial(failing, ValueError("a bug")))


def test_a_ctrl_c_in_long_work_is_raised_at_once_while_the_others_work_on(group_of_one, monkeypatch) -> None:
    """A KeyboardInterrupt stops the work on the main thread, inside its `with` blocks (which tidy up),
    and is held no longer than CTRL_C_WAIT while the other processes' work goes on."""
    others_done = threading.Event()
    monkeypatch.setattr(distributed, "HEARTBEAT", datetime.timedelta(seconds=0.05))
    monkeypatch.setattr(distributed, "CTRL_C_WAIT", datetime.timedelta(seconds=0.3))
    monkeypatch.setattr(distributed, "all_sum", lambda values: [0.0 if others_done.wait() else 1.0])
    tidied = []

    def work() -> None:
        try:
            raise KeyboardInterrupt
        finally:
            tidied.append(threading.current_thread().name)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        distributed.on_each(work)
    assert 0.3 <= time.monotonic() - started < 1.5 and tidied == ["MainThread"]
    others_done.set()


def test_a_warning_of_another_rank_is_on_stderr_with_its_rank(monkeypatch, capsys) -> None:
    """Ranks but 0 have their stdout silenced: their warnings (kept ids they cannot read) go to stderr."""
    distributed.warn("warning: rank 0's")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    distributed.warn("warning: the kept ids cannot be read")
    out, err = capsys.readouterr()
    assert out == "warning: rank 0's\n" and err == "[rank 1] warning: the kept ids cannot be read\n"


def test_a_ctrl_c_while_waiting_for_the_others_still_waits_for_the_beats(group_of_one, monkeypatch) -> None:
    """Rank 0's work in `training_ids` returns at once, and it waits for the others': a Ctrl-C there still
    waits CTRL_C_WAIT for the heartbeat thread, which is inside a collective. (An interrupted Thread.join
    marks the thread ended, and the join after it returned at once: the process aborted at exit.)"""
    others_done = threading.Event()
    monkeypatch.setattr(distributed, "HEARTBEAT", datetime.timedelta(seconds=0.05))
    monkeypatch.setattr(distributed, "CTRL_C_WAIT", datetime.timedelta(seconds=0.5))
    monkeypatch.setattr(distributed, "all_sum", lambda values: [0.0 if others_done.wait() else 1.0])
    main = threading.main_thread().ident
    threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()  # a Ctrl-C while waiting
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        distributed.on_each(lambda: "done")
    assert 0.2 + 0.5 <= time.monotonic() - started < 2.0
    others_done.set()


# Two ranks whose group times out after 2 s, waiting for 4 s of one rank's work (the mode is argv[1]):
# rank 0's, waited for with `long` or in one collective, or rank 1's alone, each rank doing its own.
TIMEOUT_SCRIPT = """
import datetime, sys, time
from transformer import distributed
from transformer.errors import TransformerError
distributed.TIMEOUT = datetime.timedelta(seconds=2)
distributed.HEARTBEAT = datetime.timedelta(seconds=0.2)
distributed.init()
mode, rank = sys.argv[1], distributed.rank()
if mode in ("long", "short"):
    done = distributed.on_main(lambda: time.sleep(4) or "done", long=mode == "long")
    assert done == ("done" if rank == 0 else None), done
else:
    def work():
        time.sleep(4 * rank)
        if mode == "each, rank 1 fails" and rank == 1:
            raise TransformerError("rank 1 read other text")
        return rank
    assert distributed.on_each(work) == rank
assert distributed.from_main("after") == "after"
distributed.shutdown()
"""


def test_long_work_of_one_rank_outlasts_the_groups_timeout(tmp_path: Path) -> None:
    """Tokenising a corpus of 80M pairs or more on two cores takes longer than the 30 minutes one
    collective may wait (TIMEOUT): here 4 s of work against a 2 s timeout, by rank 0 while the others
    wait, or by the others while rank 0 waits. Waited for in one collective, the other rank times out
    (the control, which shows the timeout is real)."""
    script = tmp_path / "timeout.py"
    script.write_text(TIMEOUT_SCRIPT)
    for mode in ("long", "each"):
        beating = on_two(str(script), mode)
        assert beating.returncode == 0, beating.stderr[-3000:]
    failing = on_two(str(script), "each, rank 1 fails")
    assert failing.returncode != 0 and failing.stderr.count("TransformerError: rank 1 read other text") == 2
    waiting = on_two(str(script), "short")
    assert waiting.returncode != 0 and "Timed out" in waiting.stderr, waiting.stderr[-3000:]


# Each rank of a two-process group: a DDP step as in training, `shutdown`, then the names of the threads left.
SHUTDOWN_SCRIPT = """
import os, sys, torch
from transformer import distributed
distributed.init()
model = distributed.wrap(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()
del model
distributed.shutdown()
tasks = os.listdir("/proc/self/task")
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in tasks]
open(sys.argv[1] + os.environ["RANK"], "w").write(" ".join(names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from Linux's /proc")
def test_shutdown_joins_gloos_threads(tmp_path: Path) -> None:
    """After `shutdown` no gloo thread runs on into the interpreter's teardown, where a rank once aborted.
    They did while anything still held the group: `torch.distributed.nn`, imported by DDP after the group
    existed, holds it in ten functions' default arguments (transformer/distributed.py imports it first)."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    done = on_two(str(script), str(tmp_path / "threads-"))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        threads = (tmp_path / f"threads-{rank}").read_text().split()
        assert threads and not [name for name in threads if "gloo" in name], threads


def test_shards_are_disjoint_equal_in_steps_and_interleave_back(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shards = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard(range(10)))
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert distributed.interleave(shards) == list(range(10))
    assert distributed.usable(10) == 9 and distributed.usable(0) == 0  # every process: 3 batches
    with pytest.raises(TransformerError, match="only 2 batches for 3 processes"):
        distributed.usable(2)
