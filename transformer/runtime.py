"""Process-level settings that must be in place before the work starts (kept out of the model).

glibc returns every allocation above 32 MB to the kernel, so each training step page-faults its large
activations (the logits alone are ~130 MB) back in: ~15 % of CPU time went to the kernel on our 2-core
machines. Raising the mmap and trim thresholds keeps those pages in the process. glibc reads the setting
only at start-up, so the `transformer` command re-executes itself once with it set.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TextIO

ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
_OPT_OUT = "TRANSFORMER_KEEP_ALLOCATOR"  # set to 1 to run under the allocator as it is


@cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ('' where there is none, e.g. on macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(key: str) -> str | None:
    """The value of /proc/cpuinfo's first `key` line (the first processor's); None where there is none."""
    found = re.search(rf"^{key}\s*:\s*(.+)$", _cpuinfo(), re.M)
    return found.group(1).strip() if found else None


def _cpuinfo_number(key: str) -> int | None:
    value = _cpuinfo_field(key)
    return int(value) if value and value.isdigit() else None


def cpu_name() -> str:
    """The CPU's model name, for the machine lines of reports, cards and benchmarks, with its family and
    model numbers where known: virtual machines often report only "AMD EPYC", and a Zen 4 and a Zen 5
    core (families 25 and 26) multiply fp32 at rates a factor of two apart."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"
    family, model = cpu_family(), _cpuinfo_number("model")
    return f"{name} (family {family}, model {model})" if family is not None and model is not None else name


def cpu_family() -> int | None:
    """The CPU's family number (AMD: 23 for Zen 1 and 2, 25 for Zen 3 and 4, 26 for Zen 5; None where
    /proc/cpuinfo is missing): with the flags, it tells how wide the vector units behind them are."""
    return _cpuinfo_number("cpu family")


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD"; "" where /proc/cpuinfo is missing)."""
    return _cpuinfo_field("vendor_id") or ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing): they decide which matmuls are fast."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def configure_torch(threads: int = 0) -> None:
    """Thread count; flush-to-zero for denormal floats: values below 1.2e-38 are rounded to zero
    instead of taking the CPU's slow path (tiny softmax probabilities and gradients produce them); and
    on CUDA, fused attention from torch's own kernels rather than cuDNN's, which torch 2.11 prefers on
    Hopper GPUs: at a base training step's 32 positions cuDNN's forward and backward took 6.8 ms where
    the memory-efficient kernels took 4.7, and the step ran 1.06× as fast without it (benchmarks/gpu.py,
    `ours, cuDNN attention`). Unmasked attention then takes the flash kernel."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.backends.cuda.enable_cudnn_sdp(False)


def _on_glibc() -> bool:
    """Linux with glibc: where the allocator tunables and `malloc_trim` exist."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def release_free_memory() -> None:
    """Hand the heap's free memory back to the operating system (glibc's `malloc_trim`).

    The allocator tunables below keep freed memory in the process, which is what makes the steps fast;
    but reading and tokenising a large corpus frees gigabytes once, before the first step, and without
    this every training process would keep them (measured under the tunables: 2.39 GB resident after
    training the tokenizer on 1M pairs' 2M lines, 0.77 GB after this call). Not glibc: nothing to do."""
    if not _on_glibc():
        return
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reexec_with_allocator_tunables(argv: list[str] | None = None) -> None:
    """Re-run this command with GLIBC_TUNABLES set, unless it is already set, opted out, or not glibc.
    `argv`: the interpreter's arguments for the re-run, by default the `transformer` command's."""
    if os.environ.get("GLIBC_TUNABLES") or os.environ.get(_OPT_OUT) or not _on_glibc():
        return
    env = {**os.environ, "GLIBC_TUNABLES": ALLOCATOR_TUNABLES, _OPT_OUT: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    if argv is None:
        argv = ["-m", "transformer.cli", *sys.argv[1:]]
    os.execve(sys.executable, [sys.executable, *argv], env)


class _ReaderGoneGuard:
    """sys.stdout that, once its reader has gone, sends the rest to /dev/null instead of raising."""

    def __init__(self, stream, note: str) -> None:
        self._stream = stream
        self._note = note

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        # The descriptor itself now points at /dev/null, so the text still buffered, and the flush at exit,
        # go there rather than raising again (as Python's documentation advises for SIGPIPE).
        _to_devnull(self._stream)
        try:
            print(self._note, file=sys.stderr)
        except OSError:  # stderr went to the same pipe (`train 2>&1 | head`): its reader has gone too
            _to_devnull(sys.stderr)

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._stream, name)


def _to_devnull(stream: TextIO) -> None:
    """Point `stream`'s descriptor at /dev/null, so that nothing written to it can fail any more."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, stream.fileno())
    os.close(null)


@contextlib.contextmanager
def outlive_stdout_reader(note: str) -> Iterator[None]:
    """Keep a long job going when the reader of its stdout exits (`transformer train | head`).

    A closed pipe is no reason to lose the steps trained since the last checkpoint: the job goes on with
    its stdout sent to /dev/null, and says so once per process, with `note`, on stderr. What is still
    buffered is flushed before the guard goes, so that the flush at exit finds nothing to fail on.
    """
    real = sys.stdout
    sys.stdout = guard = _ReaderGoneGuard(real, note)
    try:
        yield
    finally:
        guard.flush()
        sys.stdout = real


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints a line on every start and stop; keep them out of the report's log."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
