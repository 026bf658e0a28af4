"""Item 1: cost per layer (the paper's Table 1), self-attention against a recurrent layer.

Per layer of width d over n positions, self-attention costs O(n²·d) and a recurrent layer O(n·d²), so
self-attention should be the cheaper one while n < d. Counted exactly for the layers measured here:

- multi-head self-attention: projections Q, K, V and the output, 4 · 2·n·d², plus QKᵀ and the weighted sum
  of values, 2 · 2·n²·d: 8·n·d² + 4·n²·d FLOPs;
- a GRU layer: three gates, each with an input and a recurrent d×d product per step: 12·n·d² FLOPs

(multiply–adds count as 2 FLOPs; biases, softmax and gate nonlinearities are lower order and left out,
as torch's FlopCounterMode leaves them out: tests/test_experiments.py checks both formulas against it, on
nn.GRU and on the attention's explicit path, whose matrix products the counter sees). The two are equal at
n = d. Wall time and peak memory are measured on the CPU, batch 1, forward pass without gradients; the
explicit attention path materialises the (heads, n, n) weights, the fused path does not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.experiments.common import (
    Context,
    Result,
    Table,
    peak_memory,
    pick,
    pyplot,
    save_figure,
    seeded,
    time_call,
)
from transformer.model import MultiHeadAttention

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n": [16, 64], "d": [32, 64], "heads": 4, "max_gflop": 1.0, "min_seconds": 0.005},
    "report": {
        "n": [16, 64, 256, 1024, 4096],
        "d": [64, 256, 1024],
        "heads": 8,
        "max_gflop": 40.0,  # cells whose larger layer costs more are skipped (n = 4096 with d = 1024)
        "min_seconds": 0.2,
        "memory_d": 256,
        "memory_n": [256, 512, 1024, 2048, 4096],
        "explicit_max_n": 2048,  # beyond this the explicit path's weights alone take 1 GiB
    },
}


def attention_flops(n: int, d: int) -> int:
    """FLOPs of one multi-head self-attention layer (any number of heads) over n positions of width d."""
    return 8 * n * d * d + 4 * n * n * d


def recurrent_flops(n: int, d: int) -> int:
    """FLOPs of one GRU layer with input and hidden width d over n steps."""
    return 12 * n * d * d


def layers(d: int, heads: int) -> dict[str, nn.Module]:
    seeded(0)
    return {
        "attention (fused)": MultiHeadAttention(d, heads, fused=True).eval(),
        "attention (explicit)": MultiHeadAttention(d, heads, fused=False).eval(),
        "GRU": nn.GRU(d, d, batch_first=True).eval(),
    }


def crossover(ns: list[int], attention: list[float], recurrent: list[float]) -> float | None:
    """The n at which attention stops being the cheaper layer: log-linear interpolation between the two grid
    points where the sign of log(attention / recurrent) changes; None if it never does on the grid."""
    ratios = [math.log(a / r) for a, r in zip(attention, recurrent, strict=True)]
    for i in range(1, len(ns)):
        if ratios[i - 1] < 0 <= ratios[i]:
            t = -ratios[i - 1] / (ratios[i] - ratios[i - 1])
            return math.exp(math.log(ns[i - 1]) + t * (math.log(ns[i]) - math.log(ns[i - 1])))
    return None


def run(preset: str, out_dir: Path, context: Context) -> Result:
    size = pick(preset, SIZES)
    result = Result(
        "cost",
        "Cost per layer: self-attention vs recurrent (Table 1)",
        "Self-attention costs O(n²·d) per layer and a recurrent layer O(n·d²): self-attention is cheaper "
        "when the sequence is shorter than the representation (n < d), the usual case in translation.",
    )
    timings: dict[int, dict[str, list[float]]] = {}
    rows = []
    for d in size["d"]:
        modules = layers(d, size["heads"])
        timings[d] = {"n": [], "attention": [], "recurrent": []}
        for n in size["n"]:
            if max(attention_flops(n, d), recurrent_flops(n, d)) > size["max_gflop"] * 1e9:
                continue
            x = torch.randn(1, n, d)
            with torch.no_grad():
                fused, gru = modules["attention (fused)"], modules["GRU"]
                t_fused = time_call(lambda x=x, m=fused: m(x), size["min_seconds"], 5)
                t_gru = time_call(lambda x=x, m=gru: m(x), size["min_seconds"], 5)
            timings[d]["n"].append(n)
            timings[d]["attention"].append(t_fused)
            timings[d]["recurrent"].append(t_gru)
            rows.append(
                [
                    n,
                    d,
                    attention_flops(n, d) / 1e6,
                    recurrent_flops(n, d) / 1e6,
                    t_fused * 1e3,
                    t_gru * 1e3,
                    "attention" if t_fused < t_gru else "GRU",
                ]
            )
    result.tables.append(
        Table(
            ["n", "d", "attention MFLOP", "GRU MFLOP", "attention ms", "GRU ms", "faster"],
            rows,
            "Analytic FLOPs and measured forward time (median) of one layer, batch 1, fused attention path.",
        )
    )
    cross_rows = []
    for d in size["d"]:
        t = timings[d]
        measured = crossover(t["n"], t["attention"], t["recurrent"]) if t["n"] else None
        cross_rows.append([d, d, "none on the grid" if measured is None else f"{measured:.0f}"])
        result.numbers[f"crossover_d{d}"] = measured
    result.tables.append(
        Table(
            ["d", "predicted crossover n (FLOPs equal: n = d)", "measured crossover n (wall time)"],
            cross_rows,
            "Where attention stops being faster than the GRU. 'none on the grid': attention was faster at "
            "every n measured.",
        )
    )
    result.numbers["timings"] = timings

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for d in size["d"]:
        ns = size["n"]
        (line,) = axes[0].loglog(ns, [attention_flops(n, d) for n in ns], label=f"attention d={d}")
        axes[0].loglog(
            ns, [recurrent_flops(n, d) for n in ns], "--", color=line.get_color(), label=f"GRU d={d}"
        )
        t = timings[d]
        if t["n"]:
            axes[1].loglog(t["n"], t["attention"], "o-", color=line.get_color(), label=f"attention d={d}")
            axes[1].loglog(t["n"], t["recurrent"], "s--", color=line.get_color(), label=f"GRU d={d}")
    axes[0].set(title="FLOPs per layer (analytic)", xlabel="sequence length n", ylabel="FLOPs")
    axes[1].set(title="forward time per layer (measured, CPU)", xlabel="sequence length n", ylabel="seconds")
    for ax in axes:
        ax.legend(fontsize=7)
    result.figures.append(save_figure(fig, out_dir, "cost-flops-time.png"))

    memory_d = size.get("memory_d", size["d"][-1])
    memory_n = size.get("memory_n", size["n"])
    explicit_max = size.get("explicit_max_n", max(memory_n))
    modules = layers(memory_d, size["heads"])
    memory: dict[str, list[tuple[int, int]]] = {
        "attention (fused)": [],
        "attention (explicit)": [],
        "GRU": [],
    }
    for n in memory_n:
        x = torch.randn(1, n, memory_d)
        for name, module in modules.items():
            if name == "attention (explicit)" and n > explicit_max:
                continue
            with torch.no_grad():
                memory[name].append((n, peak_memory(lambda module=module, x=x: module(x))))
    result.numbers["peak_memory"] = memory
    slopes = {name: _log_slope(points) for name, points in memory.items()}
    result.numbers["memory_exponent"] = slopes
    fitted = {name: f"{_fitted(points)[0][0]}…{points[-1][0]}" for name, points in memory.items()}
    result.numbers["memory_exponent_n"] = fitted
    weights_bytes = {n: size["heads"] * n * n * 4 for n, _ in memory["attention (explicit)"]}
    result.tables.append(
        Table(
            ["n", "fused MiB", "explicit MiB", "(heads·n² weights) MiB", "GRU MiB"],
            [
                [
                    n,
                    _mib(memory["attention (fused)"], n),
                    _mib(memory["attention (explicit)"], n),
                    weights_bytes[n] / 2**20 if n in weights_bytes else "-",
                    _mib(memory["GRU"], n),
                ]
                for n in memory_n
            ],
            f"Peak tensor memory of one forward pass, d={memory_d}, {size['heads']} heads, batch 1 (profiler "
            f"allocation events). Explicit beyond n={explicit_max} skipped.",
        )
    )
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (name, points), style in zip(memory.items(), ("o-", "s-", "x--"), strict=True):
        ax.loglog(
            [n for n, _ in points],
            [b / 2**20 for _, b in points],
            style,
            label=f"{name} (slope {slopes[name]:.2f})",
        )
    ax.set_xticks(memory_n, [str(n) for n in memory_n])
    ax.minorticks_off()
    ax.set(title=f"peak memory of one layer, d={memory_d}", xlabel="sequence length n", ylabel="MiB")
    ax.legend(fontsize=8)
    result.figures.append(save_figure(fig, out_dir, "cost-memory.png"))

    def cross_text(d: int) -> str:
        value = result.numbers[f"crossover_d{d}"]
        return f"d={d}: {'beyond the grid' if value is None else f'n≈{value:.0f}'}"

    result.findings += [
        "FLOPs: the counts cross exactly at n = d (8·n·d² + 4·n²·d = 12·n·d²); measured wall-time "
        "crossovers "
        f"(attention becomes slower than the GRU): {'; '.join(cross_text(d) for d in size['d'])}.",
        f"Peak memory grows as n^{slopes['attention (explicit)']:.2f} on the explicit path "
        "(the (heads, n, n) "
        f"weights), n^{slopes['attention (fused)']:.2f} on the fused path and n^{slopes['GRU']:.2f} for the "
        f"GRU (log–log slope over {_fitted_text(fitted)}).",
    ]
    result.notes.append(
        "On a CPU at batch 1 the GRU's n small sequential matrix–vector products are slow per FLOP, while "
        "attention runs a few large matrix products: the measured crossover sits well above the FLOP "
        "prediction. That gap is item 2's point (O(n) sequential steps), not a counting error."
    )
    return result


def _fitted(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The points a memory slope is fitted over: the last ⌊k/2⌋ + 1 of k (all of 2, 2 of 3, 3 of 4 or 5),
    the larger n, where the growing term dominates the fixed cost of weights and buffers."""
    return points[len(points) // 2 - (len(points) % 2 == 0) :] if len(points) > 2 else points


def _fitted_text(fitted: dict[str, str]) -> str:
    """'n = 1024…4096', or the range each layer was fitted over where they differ (the explicit path stops
    short of the largest n)."""
    names: dict[str, list[str]] = {}
    for name, span in fitted.items():
        names.setdefault(span, []).append(name)
    if len(names) == 1:
        return f"n = {next(iter(names))}"
    return "; ".join(f"n = {span} for {' and '.join(group)}" for span, group in names.items())


def _log_slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of log(bytes) against log(n) over `_fitted(points)`."""
    points = _fitted(points)
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(b, 1)) for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _mib(points: list[tuple[int, int]], n: int) -> float | str:
    return next((b / 2**20 for m, b in points if m == n), "-")
