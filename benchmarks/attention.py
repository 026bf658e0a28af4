"""Attention alone: the explicit path against torch's fused kernel, in fp32 and bf16, training and inference.

    python benchmarks/attention.py                 # forward + backward, keys 12 … 2048, ~2,560 positions
    python benchmarks/attention.py --inference     # forward only, the same self-attention shapes
    python benchmarks/attention.py --inference --queries 1 --positions 256 --keys 20 60 200 1024
                                                   # a decoding step: 64 sentences × beam 4, one query each

What `transformer.model.attention.fused_attention` chooses between. By default a decoder-style
self-attention call (the padding mask of each row's length and the causal mask) on `--positions` query
positions split into rows of `keys` positions, 4 heads of 64 (the small config), timed forward + backward
with the variants interleaved; then each variant's peak-memory growth in a fresh process. `--inference`
times the forward pass alone, under `torch.inference_mode`; `--queries` sets the queries per row apart
from the keys, with the padding mask alone, as in cross-attention or a cached decoding step. No dropout
on the weights by default, as in the model (`attention_dropout=0`): with `--dropout` above 0, torch's
CPU kernel falls back to its own written-out math path, so "kernel" then means that. The inputs are
contiguous: the model's are views of per-position projections (and of cached prefixes when decoding),
which the explicit products copy first, one reason its lead here in inference did not survive whole
translations (`fused_attention`'s docstring). The rows are

- `fp32 kernel`: torch's fused kernel on fp32 inputs, what fp32 training and decoding run;
- `bf16 kernel`: the same kernel on bf16 inputs, what bf16 would run without our choice;
- `bf16 in the fp32 kernel`: bf16 inputs cast to fp32 for the kernel, the output cast back;
- `bf16 explicit`: `scaled_dot_product_attention` written out, in bf16;
- `fp32 explicit`: the same in fp32, the readable reference;
- `ours, bf16`: `fused_attention` on bf16 inputs, i.e. whichever of the two bf16 paths it picks: in
  training the explicit one up to `_BF16_CPU_BACKWARD_MAX_KEYS` keys on the CPU and the kernel past it,
  in inference the kernel (its docstring says why).

Prints JSON and updates benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Shape:
    """One attention call: `rows` rows of `queries` queries over `keys` keys, `heads` heads of `d_k`."""

    keys: int
    queries: int
    rows: int
    heads: int = 4
    d_k: int = 64
    dropout: float = 0.0
    inference: bool = False

    @classmethod
    def of(cls, keys: int, args: argparse.Namespace) -> Shape:
        queries = args.queries or keys
        rows = max(1, args.positions // queries)
        return cls(keys, queries, rows, args.heads, args.d_k, args.dropout, args.inference)


def attention_call(variant: str, shape: Shape) -> Callable[[], Tensor]:
    """One call of `variant` (forward + backward, or forward alone in inference) on fixed random inputs;
    returns the output, so that a test can see every variant compute the same function."""
    dtype, attend = VARIANTS[variant]
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (  # (rows, heads, queries | keys, d_k)
        torch.randn(shape.rows, shape.heads, n, shape.d_k, generator=generator).to(dtype)
        for n in (shape.queries, shape.keys, shape.keys, shape.queries)
    )
    lengths = torch.randint(max(1, shape.keys * 4 // 5), shape.keys + 1, (shape.rows,), generator=generator)
    padding = torch.arange(shape.keys) < lengths[:, None]  # (rows, keys): a batch padded to its longest row
    mask = padding[:, None, None, :]  # (rows, 1, 1, k_len), as cross-attention's
    if shape.queries == shape.keys:  # self-attention: (rows, 1, q_len, k_len), as the decoder builds it
        mask = mask & torch.ones(shape.keys, shape.keys, dtype=torch.bool).tril()

    if shape.inference:

        @torch.inference_mode()
        def forward() -> Tensor:
            return attend(q, k, v, mask, 0.0)

        return forward

    for t in (q, k, v):
        t.requires_grad_()

    def forward_backward() -> Tensor:
        out = attend(q, k, v, mask, shape.dropout)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        return out.detach()

    return forward_backward


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[12, 48, 192, 768, 1024, 2048])
    parser.add_argument("--queries", type=int, help="queries per row (default: as many as keys)")
    parser.add_argument("--positions", type=int, default=2560, help="query positions per call (all rows)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-k", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0, help="on the attention weights, in training")
    parser.add_argument("--inference", action="store_true", help="the forward pass alone, no gradients")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--point", nargs=2, metavar=("VARIANT", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:  # child-process mode: the peak-memory growth of one variant's call at one length
        call = attention_call(args.point[0], Shape.of(int(args.point[1]), args))
        print(json.dumps(common.peak_rss_growth_mb(call)))
        return

    same_shape = [a for a in sys.argv[1:] if a not in ("--no-memory",)]
    result: dict = {"machine": common.machine_info(), "threshold_keys": _BF16_CPU_BACKWARD_MAX_KEYS}
    result["rows"] = []
    for keys in args.keys:
        shape = Shape.of(keys, args)
        calls = {name: attention_call(name, shape) for name in VARIANTS}
        times = common.time_interleaved(calls, args.repeats, warmup=2)
        row: dict = {"keys": keys, "rows × queries": f"{shape.rows} × {shape.queries}"}
        row |= {f"{name} ms": round(1000 * common.median(times[name]), 2) for name in VARIANTS}
        row["ours vs bf16 kernel"] = common.paired_speedup(times["ours, bf16"], times["bf16 kernel"])
        row["ours vs fp32 kernel"] = common.paired_speedup(times["ours, bf16"], times["fp32 kernel"])
        if not args.no_memory:
            for name in ("fp32 kernel", "bf16 kernel", "bf16 explicit"):
                measured = common.memory_in_child(__file__, [*same_shape, "--point", name, str(keys)])
                row[f"{name} MB"] = measured["growth_mb"]
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    what = "The forward pass (inference mode)" if args.inference else "Forward + backward"
    masks = "padding + causal mask" if args.queries is None else "padding mask"
    ours = (
        "keeps the kernel in inference"
        if args.inference
        else f"runs the explicit path up to {_BF16_CPU_BACKWARD_MAX_KEYS} keys on the CPU, the kernel past it"
    )
    per_row = "one query" if args.queries == 1 else f"{args.queries or '`keys`'} queries"
    body = (
        f"{what} of one attention call: {args.heads} heads of {args.d_k}, ~{args.positions} query positions "
        f"per call in rows of {per_row}, {masks}, dropout "
        f"{0.0 if args.inference else args.dropout}; median ms of {args.repeats} interleaved rounds. "
        f'`ours, bf16` is `fused_attention`, which {ours}; "ours vs …" are medians of per-round ratios. '
        f"MB: peak-memory growth of one call in a fresh process.\n\n" + common.markdown_table(result["rows"])
    )
    kind = "inference" if args.inference else "forward + backward"
    if args.queries is not None:
        kind += f", {args.queries} {'query' if args.queries == 1 else 'queries'} per row"
    common.report(f"Attention, {kind}: explicit vs fused kernel", result, body)


if __name__ == "__main__":
    main()
