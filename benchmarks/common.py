"""What every benchmark script shares: machine facts, the matmul peak, interleaved timing, peak memory,
and the update of benchmarks/RESULTS.md.

The machines are shared and noisy, so a figure is only worth reporting as a ratio against a peer measured
in the same run: `time_interleaved` runs the variants in turn, round after round, so that a burst of load
from elsewhere hits them alike, and reports medians.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from transformer.onednn import onednn_linear
from transformer.packing import onednn_available
from transformer.runtime import cpu_flags, cpu_name, quiet_stderr, reexec_with_allocator_tunables

RESULTS = Path(__file__).with_name("RESULTS.md")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the ones that decide matmul speed


def run_as_the_cli_does() -> None:
    """Re-run this benchmark script under the allocator setting the `transformer` command gives itself
    (transformer/runtime.py), so that its figures are those of training and translating with the tool:
    without it every variant page-faults its large activations in again at every step, a cost that does
    not scale with a variant's speed and so moves the ratios too (MarianMTModel's beam search gained
    more from the setting than ours). TRANSFORMER_KEEP_ALLOCATOR=1 keeps the allocator as it is (as
    `train_step.py --allocator` does for its first child)."""
    reexec_with_allocator_tunables(sys.argv)


def machine_info() -> dict[str, Any]:
    flags = cpu_flags()
    try:
        hf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        hf = None
    return {
        "cpu": cpu_name(),
        "cpu_flags": [f for f in _FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "glibc_tunables": bool(os.environ.get("GLIBC_TUNABLES")),
        "load_average": round(os.getloadavg()[0], 1),  # other work on the machine when the run started
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously to the Python that starts them,
    so a call timed on a GPU ends with this (on the CPU it is nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn`, returning once the device has finished the work it queued: what a timed call must be on a GPU."""

    def call() -> None:
        fn()
        synchronize(device)

    return call


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7, device: torch.device | None = None
) -> float:
    """The machine's measured matmul rate: the fastest of `repeats` square n×n products. The fastest,
    not the median, because other load can only slow a product down: a median taken while the machine
    was busy once came out below what the model's own products reached in the same run. On the CPU the
    products run in MKL (torch's `mm`) and in oneDNN, whichever is faster: on AMD CPUs MKL runs AVX2
    code, at half a Zen 5 core's fp32 rate (transformer/onednn.py)."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    kernels = {"mm": synchronised(lambda: a @ b, device)}
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():  # bf16 `mm` is oneDNN's
        kernels["oneDNN"] = lambda: onednn_linear(a, b)  # a · bᵀ: the same product
    with torch.no_grad():
        for one in kernels.values():
            one()  # warm-up: the first call picks kernels and faults the output in
        times = time_interleaved(kernels, repeats, warmup=0)
    return 2 * n**3 / min(min(ts) for ts in times.values()) / 1e9


def time_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, from `repeats` rounds in which every variant runs once in turn,
    in the given order in even rounds and in reverse in odd ones, so that no variant always runs first
    (two identical training steps timed in a fixed order came out 0.617 s first and 0.561 s second,
    medians of 16 rounds, in one run; equal in another). The first `warmup` rounds (allocation, kernel
    selection, caches) are run but not recorded."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for round_ in range(warmup + repeats):
        for name, fn in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def decoding_row(times: Sequence[float], sentences: int, tokens: int) -> dict[str, Any]:
    """One search's row: its median seconds per call, every call's, and sentences/s and generated tokens/s
    at the median."""
    seconds = median(times)
    return {
        "seconds": round(seconds, 3),
        "all_s": [round(t, 3) for t in times],
        "sentences_per_s": round(sentences / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
    }


def time_translations(
    runs: dict[str, Callable[[], list[list[int]]]], repeats: int
) -> tuple[dict[str, list[list[int]]], dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Searches that each translate the same sentences (label -> a call returning token ids per sentence):
    every one runs once, which is the warm-up and gives the outputs to compare, then `repeats` interleaved
    rounds. Returns the outputs, the seconds of each round and each search's `decoding_row`, whose tokens
    count every output's EOS."""
    outputs = {label: run() for label, run in runs.items()}
    times = time_interleaved(runs, repeats, warmup=0)
    rows = {
        label: decoding_row(ts, len(outputs[label]), sum(len(ids) + 1 for ids in outputs[label]))
        for label, ts in times.items()
    }
    return outputs, times, rows


def decoding_markdown(
    rows: dict[str, dict[str, Any]],
    ratios: dict[str, Any],
    ranges: dict[str, Sequence[float]] | None = None,
) -> str:
    """Searches' rows (label -> `decoding_row`) as a table, then a line per ratio: speed-ups in bold with ×
    and, where `ranges` has them, the lowest and highest per-round speed-up; anything else (counts of
    equal translations) as it is."""
    table = markdown_table([{"search": label, **row} for label, row in rows.items()])
    ranges = ranges or {}
    lines = []
    for k, v in ratios.items():
        spread = f" (rounds {ranges[k][0]}–{ranges[k][1]}×)" if k in ranges else ""
        lines.append(f"- {k}: **{v}×**{spread}" if isinstance(v, float) else f"- {k}: {v}")
    return table + "\n\n" + "\n".join(lines)


def paired_speedup(fast: Sequence[float], slow: Sequence[float]) -> float:
    """How many times faster `fast` ran than `slow`: the median over rounds of slow_i / fast_i.

    Both ran in the same rounds of `time_interleaved`, a moment apart, so each round's ratio cancels the
    load the machine had then; on a busy machine this is steadier than a ratio of the two medians.
    """
    return round(statistics.median(s / f for f, s in zip(fast, slow, strict=True)), 3)


def speedup_range(fast: Sequence[float], slow: Sequence[float]) -> tuple[float, float]:
    """The lowest and highest per-round speed-up behind `paired_speedup`: printed beside it, so that a
    reader sees how far the rounds disagreed before trusting its third decimal."""
    ratios = [s / f for f, s in zip(fast, slow, strict=True)]
    return round(min(ratios), 2), round(max(ratios), 2)


def with_range(speedup: float, spread: Sequence[float]) -> str:
    """1.288 and (1.21, 1.35) -> "1.288 (1.21–1.35)", the way the tables print a speed-up."""
    return f"{speedup} ({spread[0]}–{spread[1]})"


def bf16_not_measured(what: str) -> str:
    """The line a benchmark adds where it left bf16 out."""
    return (
        f"{what} not measured: this CPU has no bf16 matmul instructions (avx512_bf16/amx_bf16), where "
        f"torch's bf16 matmuls run far below fp32 speed (`--bf16` measures it anyway)."
    )


# The operators that multiply matrices (linear layers: torch's own, MKL's and oneDNN's packed kernels;
# batched products of explicit attention) and those that run attention as one fused kernel.
PRODUCT_OPS = frozenset(
    {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkl::_mkl_linear", "mkldnn::_linear_pointwise"}
)
ATTENTION_OPS = frozenset(
    {
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
    }
)


def time_by_kind(fn: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Where a call of `fn` spends its time, in seconds, from torch's profiler (CPU): in matrix products,
    in fused attention kernels, in every other operator, and outside operators altogether (Python,
    module calls, the dispatcher: the call's time less its operators' own times). Each of `calls` calls
    is profiled alone; the one of median length is reported, whole, so that its parts add up.

    The profiler adds a few microseconds to every operator, so the small ones and the call as a whole
    come out slower than unprofiled; a product of a few hundred microseconds hardly changes.
    """
    from torch.profiler import ProfilerActivity, profile

    measured = []
    for _ in range(calls):
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        spent = {"products": 0.0, "attention": 0.0, "other": 0.0}
        for op in prof.key_averages():
            is_attention = op.key in ATTENTION_OPS
            kind = "products" if op.key in PRODUCT_OPS else "attention" if is_attention else "other"
            spent[kind] += op.self_cpu_time_total / 1e6
        outside = max(seconds - sum(spent.values()), 0.0)
        measured.append({"seconds": seconds, **spent, "outside ops": outside})
    return sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """VmRSS (now), VmHWM (peak) or RssAnon (its own, not mapped from files) of a process from
    /proc/<pid>/status, in MB; None off Linux or once the process has gone."""
    try:
        match = re.search(rf"^{field}:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 2**10 if match else None


def _current_rss_mb() -> float:
    now = proc_status_mb("VmRSS")
    return now if now is not None else _max_rss_mb()


def _max_rss_mb() -> float:
    """The peak RSS of this process image. Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss
    would still hold the parent's size at fork time, so it is only the fallback."""
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_rss_growth_mb(fn: Callable[[], object]) -> dict[str, float]:
    """Run `fn` and report how far the process's peak resident memory rose above what it held before.

    Only meaningful in a fresh process (see `memory_in_child`): the kernel keeps one high-water mark per
    process, which is reset here where Linux allows it, so that a peak reached while building the model
    or packing its weights is not taken for `fn`'s.
    """
    _reset_peak_rss()
    before = _current_rss_mb()
    fn()
    peak = _max_rss_mb()
    return {"peak_rss_mb": round(peak, 1), "growth_mb": round(max(peak - before, 0.0), 1)}


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux 4.0+: writing 5 to clear_refs); elsewhere nothing."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_in_child(script: str, args: Sequence[str]) -> dict[str, float]:
    """Run `python script *args` (a script's single-variant memory mode) and read the JSON it prints."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows with the same keys -> a Markdown table (the keys are the header)."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def update_results(title: str, command: str, body: str, machine: dict[str, Any]) -> None:
    """Replace (or append) the `## title` section of RESULTS.md with this run's figures."""
    flags = ", ".join(machine["cpu_flags"]) or "none of " + ", ".join(_FLAGS)
    section = (
        f"## {title}\n\n`{command}` — {machine['date']}; {machine['cpu']}, {machine['logical_cores']} "
        f"logical cores ({flags}), torch {machine['torch']} with {machine['torch_threads']} threads, "
        f"transformers {machine['transformers']}, GLIBC_TUNABLES "
        f"{'set' if machine['glibc_tunables'] else 'unset'}, load average {machine['load_average']} at the "
        f"start.\n\n{body.strip()}\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n" + _PREAMBLE
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text + "\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def report(title: str, result: dict[str, Any], body: str, device: str | None = None) -> None:
    """Print the JSON result and update RESULTS.md with `body` (Markdown) under `title — <machine>`: the
    processor's name, or `device` (a GPU's) where the figures are the GPU's. Each kind of machine keeps its
    own latest section, so a run on one does not replace the figures another's text cites."""
    print(json.dumps(result, indent=2))
    command = "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    machine = result["machine"]
    update_results(f"{title} — {device or machine['cpu']}", command, body, machine)


_PREAMBLE = (
    "Written by the scripts in this folder (each updates its own section). Every figure is a ratio or a\n"
    "median measured in one run, the variants interleaved, because the machines are shared and noisy.\n"
)
