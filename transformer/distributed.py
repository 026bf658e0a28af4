"""Training on several processes with DistributedDataParallel, started by `torchrun` (kept out of the model).

torchrun starts one process per GPU (or per CPU share) and tells each who it is through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init` reads that and joins the process group:
NCCL when CUDA is available (process LOCAL_RANK drives GPU LOCAL_RANK), gloo on CPU. Without torchrun
every function here is the identity or a no-op, so the training loop has one code path.

How the work is split, and why the result equals one process's up to floating-point order:

- Every process builds the same list of token-budget batches (same seed), so no sampler state has to be
  shared. An optimiser step consumes `accumulate × world_size` consecutive batches of that list and process
  r takes every world_size-th of them starting at r (`shard`), so one step of N processes sees exactly the
  batches of one step of a single process with `accumulate × N`. The effective batch is therefore
  world_size × accumulate × max_tokens padded tokens.
- Each process scales its summed loss by world_size / (target tokens of the whole step); DDP averages the
  gradients over the processes, which cancels the world_size, so the gradient is the per-token mean over
  the union of the step's batches — what one process computes. The token count of the other processes'
  batches is known without communication, because every process holds the whole batch list.
  "Up to floating-point order": with one batch per process the sums are even bitwise those of one process
  (tests/test_distributed.py). With several per process the gradient is summed in another order, and Adam
  (ε = 1e-9) magnifies the rounding noise of gradients that are zero in exact arithmetic to steps of the
  size of the learning rate: the attention key bias (softmax ignores a constant added to every score)
  then differs by ~lr after a few steps, while it changes no output and the other weights agree to ~1e-7.
- Decisions that could differ between processes (stop on a signal or the time budget) are agreed with a
  collective, so that no process waits forever for a peer that has left the loop.
- Only rank 0 reads the training text, writes files and prints; validation and test decoding are sharded
  over all processes and gathered, so every process gets the same scores and takes the same
  early-stopping decision. What rank 0 does alone goes through `on_main`, so that its failure (a corpus
  it cannot read, a full disk) stops every process with its error.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from transformer.errors import TransformerError

if dist.is_available():  # a torch built without it has no process groups to hold
    # Imported before any process group exists, on purpose: its functions take `group=group.WORLD` as a
    # default argument, evaluated at import. Imported after `init_process_group` (DDP imports it, through
    # torch._dynamo), ten of them would hold the group for the life of the process: `destroy_process_group`
    # would free nothing, and gloo's three threads would run on into the interpreter's teardown (`shutdown`).
    import torch.distributed.nn

T = TypeVar("T")

# How long one collective may wait: long enough for rank 0 to write a large checkpoint while the others
# wait; a process that is really gone is noticed by torchrun, which stops the whole group. Work of rank 0
# that grows with the corpus (reading and tokenising it) has no bound, so the processes meet once a
# HEARTBEAT while it runs (`on_main(..., long=True)`) and no single wait comes near the timeout.
TIMEOUT = datetime.timedelta(minutes=30)
HEARTBEAT = datetime.timedelta(minutes=1)
# How long a Ctrl-C waits for the heartbeat thread to leave its last beat (`_beating`). Left inside a
# collective, the thread aborted the process at exit ("terminate called without an active exception").
CTRL_C_WAIT = datetime.timedelta(seconds=5)


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set the environment for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> torch.device:
    """Join the process group when launched by torchrun (once; later calls only return the device) and
    return the device this process trains on: GPU LOCAL_RANK when CUDA is available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
        atexit.register(_cleanup)
        if dist.get_rank() != 0:  # one voice: the others' progress lines would repeat rank 0's
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - kept open for the process's life
    return device


def _cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group at the end of a finished run, every process together: a barrier, then
    `destroy_process_group` while the interpreter is whole, which joins gloo's threads and closes its
    sockets. A rank twice aborted in its teardown after a finished two-process run on the CPU ("terminate
    called without an active exception", CI of 2026-12-04 and 2026-12-05): its group was still alive then,
    held by `torch.distributed.nn`'s default arguments (see the import above), so gloo's threads outlived
    this call. The exit hook (`_cleanup`) stays for runs that fail."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, prints and writes checkpoints."""
    return rank() == 0


def warn(message: str) -> None:
    """A warning of this process: written by rank 0 as any line, by the others on stderr with their rank,
    since their stdout is silenced (`init`) and what they warn of (ids they cannot read, say) is theirs."""
    if is_main():
        tqdm.write(message)  # above a progress bar, if one is drawn
    else:
        print(f"[rank {rank()}] {message}", file=sys.stderr, flush=True)


def backend() -> str | None:
    return dist.get_backend() if active() else None


def wrap(model: nn.Module) -> nn.Module:
    """The module to run training forwards through: DDP around `model` when distributed, else `model`.

    Keep using `model` itself for everything else (saving, validation, decoding): DDP only adds the
    gradient all-reduce to the backward pass, and rank 0 must be able to run the model alone.
    Buffers are not synchronised on every forward: ours are constant tables, identical everywhere.
    """
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
    """Around the forward and backward of a micro-batch: skip DDP's all-reduce unless `sync`, so that
    gradient accumulation communicates once per optimiser step, on its last micro-batch."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def usable(n_batches: int) -> int:
    """How many of an epoch's batches are trained on: a multiple of world_size, so that every process
    runs the same number of steps (a process with no batch would leave the others waiting in all-reduce).
    The dropped tail differs between epochs because the batches are shuffled."""
    if 0 < n_batches < world_size():
        raise TransformerError(
            f"only {n_batches} batches for {world_size()} processes: lower max_tokens or use fewer processes"
        )
    return n_batches - n_batches % world_size()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: items rank, rank + world_size, ... (all of them when alone)."""
    return list(items[rank() :: world_size()])


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Undo `shard`: parts[r] holds items r, r + len(parts), ...; returns all items in their order."""
    out: list[T] = [None] * sum(len(part) for part in parts)  # type: ignore[list-item]
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def map_sharded(fn: Callable[[list[T]], list[Any]], items: Sequence[T]) -> list[Any]:
    """`fn(items)`, computed as fn on each process's shard and gathered, so N processes share the work."""
    return interleave(all_gather(fn(shard(items))))


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the GPU; gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Sum numbers over the processes (in float64 so that token counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any: how stop decisions (a signal that reached one
    process, a clock that ran out on one) are agreed so that all leave the loop together."""
    return all_sum([float(flag)])[0] > 0


def from_main(value: T) -> T:
    """Rank 0's `value` on every process (a picklable object; the others pass anything, e.g. None)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def on_main(work: Callable[[], T], *, long: bool = False) -> T | None:
    """`work()` run by rank 0 alone (reading the corpus, writing a checkpoint): its result there, None in
    the others, which wait for it. A TransformerError or OSError (a full disk) it raises is raised in
    every process, so that all stop with rank 0's one-line error rather than the others with a traceback
    of the connection rank 0 closed when it left.

    `long` is for work whose time grows with the corpus, without bound: tokenising WMT14 en-fr's 36M
    pairs takes ~13 minutes on two cores, so ~80M would outlast the group's 30-minute TIMEOUT in one
    collective and stop the run. With it, every process meets once a HEARTBEAT until the work is done
    (`_beating`)."""
    result, failure = None, None
    if is_main():
        try:
            result = _beating(work, from_main) if long and active() else work()
        except (TransformerError, OSError) as error:
            failure = error
    elif long and active():
        while not from_main(None):  # rank 0's beats: False while the work runs, True once it is over
            pass
    _raise_shared(failure, from_main(_shareable(failure)))
    return result


def on_each(work: Callable[[], T]) -> T:
    """`work()` in every process at once, each its own, and its result there: long work of the others
    while rank 0 has none (tokenising their own copy of the text, where the ids rank 0 kept are out of
    sight). As in `on_main(long=True)`, the processes meet once a HEARTBEAT until all are done
    (`_beating`), and an error of one process (TransformerError, OSError) is raised in all, the lowest
    rank's first."""
    if not active():
        return work()
    result, failure = None, None
    try:
        result = _beating(work, lambda over: all_sum([float(not over)])[0] == 0)
    except (TransformerError, OSError) as error:
        failure = error
    shared = [error for error in all_gather(_shareable(failure)) if error]
    _raise_shared(failure, shared[0] if shared else None)
    return result  # type: ignore[return-value]  # a failure was raised


def _shareable(failure: Exception | None) -> tuple[bool, str] | None:
    return (isinstance(failure, OSError), str(failure)) if failure else None


def _raise_shared(own: Exception | None, shared: tuple[bool, str] | None) -> None:
    """Raise this process's own error, or else the one another process shared (`_shareable`)."""
    if own:
        raise own
    if shared:
        is_os_error, message = shared
        raise OSError(message) if is_os_error else TransformerError(message)


def _beating(work: Callable[[], T], over: Callable[[bool], bool]) -> T:
    """`work()`, while a second thread meets the other processes once a HEARTBEAT: `over` takes whether
    this process's work is done, and is a collective that says whether all the work is.

    The work keeps the main thread, where signals arrive: a Ctrl-C stops it inside its `with` blocks,
    which tidy up as they would without the beats (a writer removes its temp files). The heartbeat
    thread only sends one small collective a minute. After a Ctrl-C it is waited for CTRL_C_WAIT at
    most: torchrun sends the signal to every process, whose beats then end at once, while a process
    interrupted alone should not wait for the others' work (its thread is a daemon, left behind)."""
    finished, beaten = threading.Event(), threading.Event()  # this process's work; the beats' end
    device = _collective_device()

    def beat() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is the thread's own
            while not over(finished.wait(HEARTBEAT.total_seconds())):
                pass
        finally:
            beaten.set()

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    interrupted = False
    try:
        return work()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:  # the processes leave the beats together, before an error is shared
        finished.set()
        # An Event, not Thread.join: a Ctrl-C inside join (Python 3.11) marks the thread as ended, and the
        # join after it returns at once, leaving the thread in a collective as the process exits (abort).
        try:
            beaten.wait(CTRL_C_WAIT.total_seconds() if interrupted else None)
        except KeyboardInterrupt:  # while waiting for the others' work
            beaten.wait(CTRL_C_WAIT.total_seconds())
            raise


def all_gather(value: T) -> list[T]:
    """Every process's `value`, in rank order, on every process."""
    if not active():
        return [value]
    out: list[T | None] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out  # type: ignore[return-value]


@torch.no_grad()
def sync_from_main(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process's `model` (e.g. after rank 0 alone loaded
    averaged weights from its disk)."""
    if not active():
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def seed_rank(seed: int, step: int = 0) -> None:
    """Give every process but rank 0 its own torch random stream (dropout masks), derived from the seed,
    its rank and the step, so that a run is reproducible and the processes do not drop out alike. Rank 0
    keeps the stream it has, so a one-process run is unchanged."""
    if rank() == 0:
        return
    digest = hashlib.sha256(f"{seed}:{rank()}:{step}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


def own_state(per_rank: Sequence[T]) -> T | None:
    """This process's entry of a per-rank list saved by a run with as many processes; None when the
    run had a different number of processes (its per-process states do not map onto these)."""
    return per_rank[rank()] if len(per_rank) == world_size() else None
