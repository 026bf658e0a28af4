"""Attention alone, forward + backward: the explicit path against torch's fused kernel, in fp32 and bf16.

    python benchmarks/attention.py                          # keys 12 … 2048, ~2,560 positions per call
    python benchmarks/attention.py --keys 12 48 192 --repeats 20

What `transformer.model.attention.fused_attention` chooses between in training: a decoder-style
self-attention call (the padding mask of each row's length and the causal mask) on
`--positions` query positions split into rows of `keys` positions, 4 heads of 64 (the small config), timed
forward + backward with the variants interleaved; then each variant's peak-memory growth in a fresh
process. No dropout on the weights by default, as in the model (`attention_dropout=0`): with
`--dropout` above 0, torch's CPU kernel falls back to its own written-out math path, so "kernel" then
means that. The rows are

- `fp32 kernel`: torch's fused kernel on fp32 inputs, what fp32 training runs;
- `bf16 kernel`: the same kernel on bf16 inputs, what bf16 autocast would run without our choice;
- `bf16 in the fp32 kernel`: bf16 inputs cast to fp32 for the kernel, the output cast back;
- `bf16 explicit`: `scaled_dot_product_attention` written out, in bf16;
- `fp32 explicit`: the same in fp32, the readable reference;
- `ours, bf16`: `fused_attention` on bf16 inputs, i.e. whichever of the two bf16 paths it picks at that
  length (explicit up to `_BF16_CPU_BACKWARD_MAX_KEYS` keys on the CPU, the kernel past it).

Prints JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from transformer.model.attention import (
    _BF16_CPU_BACKWARD_MAX_KEYS,
    fused_attention,
    scaled_dot_product_attention,
)


def kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def kernel_in_fp32(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    """bf16 inputs cast up for the fp32 kernel and its output cast back: what bf16 training ran before
    the explicit path (the fp32 backward was the fast one on an AMX Xeon)."""
    return kernel(q.float(), k.float(), v.float(), mask, dropout_p).to(q.dtype)


def explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    return scaled_dot_product_attention(q, k, v, mask, dropout_p)[0]


VARIANTS: dict[str, tuple[torch.dtype, Callable[..., Tensor]]] = {
    "fp32 kernel": (torch.float32, kernel),
    "bf16 kernel": (torch.bfloat16, kernel),
    "bf16 in the fp32 kernel": (torch.bfloat16, kernel_in_fp32),
    "bf16 explicit": (torch.bfloat16, explicit),
    "fp32 explicit": (torch.float32, explicit),
    "ours, bf16": (torch.bfloat16, fused_attention),
}


def attention_call(
    variant: str, keys: int, positions: int, heads: int, d_k: int, dropout: float
) -> Callable[[], Tensor]:
    """One forward + backward of `variant` on a fixed random batch of `positions // keys` rows; returns
    the output (so that a test can see every variant compute the same function)."""
    dtype, attend = VARIANTS[variant]
    generator = torch.Generator().manual_seed(0)
    rows = max(1, positions // keys)
    q, k, v, grad = (
        torch.randn(rows, heads, keys, d_k, generator=generator).to(dtype).requires_grad_(i < 3)
        for i in range(4)
    )  # (rows, heads, keys, d_k)
    lengths = torch.randint(max(1, keys * 4 // 5), keys + 1, (rows,), generator=generator)
    padding = torch.arange(keys) < lengths[:, None]  # (rows, keys): a batch padded to its longest row
    causal = torch.ones(keys, keys, dtype=torch.bool).tril()  # (q_len, k_len)
    mask = padding[:, None, None, :] & causal  # (rows, 1, q_len, k_len), as the decoder builds it

    def call() -> Tensor:
        out = attend(q, k, v, mask, dropout)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        return out.detach()

    return call


def memory_point(variant: str, keys: int, args: argparse.Namespace) -> dict[str, float]:
    """Child-process mode: the peak-memory growth of one variant's forward + backward at one length."""
    call = attention_call(variant, keys, args.positions, args.heads, args.d_k, args.dropout)
    return common.peak_rss_growth_mb(call)


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[12, 48, 192, 768, 1024, 2048])
    parser.add_argument("--positions", type=int, default=2560, help="query positions per call (all rows)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-k", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0, help="on the attention weights")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--point", nargs=2, metavar=("VARIANT", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(memory_point(args.point[0], int(args.point[1]), args)))
        return

    shape = ["--positions", str(args.positions), "--heads", str(args.heads), "--d-k", str(args.d_k)]
    shape += ["--dropout", str(args.dropout)]
    result: dict = {"machine": common.machine_info(), "threshold_keys": _BF16_CPU_BACKWARD_MAX_KEYS}
    result["rows"] = []
    for keys in args.keys:
        calls = {
            name: attention_call(name, keys, args.positions, args.heads, args.d_k, args.dropout)
            for name in VARIANTS
        }
        times = common.time_interleaved(calls, args.repeats, warmup=2)
        row: dict = {"keys": keys, "rows × keys": f"{max(1, args.positions // keys)} × {keys}"}
        row |= {f"{name} ms": round(1000 * common.median(times[name]), 1) for name in VARIANTS}
        row["ours vs bf16 kernel"] = common.paired_speedup(times["ours, bf16"], times["bf16 kernel"])
        row["ours vs fp32 kernel"] = common.paired_speedup(times["ours, bf16"], times["fp32 kernel"])
        if not args.no_memory:
            for name in ("fp32 kernel", "bf16 kernel", "bf16 explicit"):
                measured = common.memory_in_child(__file__, ["--point", name, str(keys), *shape])
                row[f"{name} MB"] = measured["growth_mb"]
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    body = (
        f"Forward + backward of one self-attention call: {args.heads} heads of {args.d_k}, ~{args.positions} "
        f"query positions per call in rows of `keys` positions, padding + causal mask, dropout "
        f"{args.dropout}; median ms of {args.repeats} interleaved rounds. `ours, bf16` is `fused_attention`, "
        f"which runs the explicit path up to {_BF16_CPU_BACKWARD_MAX_KEYS} keys on the CPU and the kernel "
        f'past it; "ours vs …" are medians of per-round ratios. MB: peak-memory growth of one call in a '
        f"fresh process.\n\n" + common.markdown_table(result["rows"])
    )
    common.report("Attention forward + backward: explicit vs fused kernel", result, body)


if __name__ == "__main__":
    main()
