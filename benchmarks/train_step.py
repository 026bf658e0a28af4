"""Training-step speed: ours against torch.nn.Transformer at the same size, measured in one process.

    python benchmarks/train_step.py                 # small config (d 256, 3+3), fp32, 2 threads
    python benchmarks/train_step.py --allocator     # the same, run twice: with and without GLIBC_TUNABLES

A third variant is ours with torch's nn.Dropout, to measure our cheaper dropout mask. All get the same
embeddings (×√d_model, sinusoidal positions), tied output projection,
label-smoothed cross-entropy and Adam; the variants are timed in turn, step after step, so that machine
noise hits them alike. Prints JSON: median seconds per step, target tokens/s, achieved GFLOP/s and the
fraction of the machine's fp32 matmul peak (measured here too), and ratios against nn.Transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from transformer import Transformer, TransformerConfig
from transformer.model.dropout import Dropout
from transformer.model.transformer import sinusoidal_table
from transformer.runtime import ALLOCATOR_TUNABLES


class TorchPeer(nn.Module):
    """nn.Transformer with the embeddings and output layer a translation model needs."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.core = nn.Transformer(
            c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff, c.dropout, batch_first=True
        )
        self.register_buffer("pe", sinusoidal_table(c.max_len, c.d_model))
        self.scale = c.d_model**0.5
        self.causal = None

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        x = self.embed(src) * self.scale + self.pe[: src.size(1)]
        y = self.embed(tgt) * self.scale + self.pe[: tgt.size(1)]
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=torch.bool)
        hidden = self.core(
            x, y, tgt_mask=causal, src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0
        )
        return hidden @ self.embed.weight.t()


def with_torch_dropout(model: nn.Module) -> nn.Module:
    """Our model with torch's per-element Bernoulli dropout in place of our cheaper mask."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return model


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def step_flops(c: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs of one forward+backward (3× forward): projections, FFN, attention scores, vocabulary."""
    d, f = c.d_model, c.d_ff
    enc_tok = batch * src_len * c.n_encoder_layers * (4 * d * d + 2 * d * f) * 2
    dec_tok = batch * tgt_len * c.n_decoder_layers * (8 * d * d + 2 * d * f) * 2
    attn = (
        batch * c.n_encoder_layers * 4 * src_len**2 * d
        + batch * c.n_decoder_layers * 4 * tgt_len * (tgt_len + src_len) * d
    )
    vocab = batch * tgt_len * d * c.tgt_vocab_size * 2
    return 3 * (enc_tok + dec_tok + attn + vocab)


def measure(steps: int, batch: int, src_len: int, tgt_len: int) -> dict:
    torch.manual_seed(0)
    config = TransformerConfig.preset("small", src_vocab_size=8000, tgt_vocab_size=8000)
    src = torch.randint(4, 8000, (batch, src_len))
    tgt = torch.randint(4, 8000, (batch, tgt_len + 1))
    models = {
        "ours": Transformer(config),
        "ours with nn.Dropout": with_torch_dropout(Transformer(config)),
        "nn.Transformer": TorchPeer(config),
    }
    optimizers = {
        k: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9) for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), label_smoothing=0.1)
            loss.backward()
            optimizers[name].step()
            if i >= 2:  # the first steps allocate and warm caches
                times[name].append(time.perf_counter() - start)
    peak = matmul_peak()
    flops = step_flops(config, batch, src_len, tgt_len)
    result = {
        "config": "small d256 3+3, vocab 8000, fp32",
        "batch": [batch, src_len, tgt_len],
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(peak, 1),
        "glibc_tunables": bool(os.environ.get("GLIBC_TUNABLES")),
    }
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {
            "s_per_step": round(median, 3),
            "tgt_tokens_per_s": round(batch * tgt_len / median),
            "gflops": round(flops / median / 1e9, 1),
            "fraction_of_peak": round(flops / median / 1e9 / peak, 3),
        }
    result["ours_vs_nn.Transformer"] = round(
        result["nn.Transformer"]["s_per_step"] / result["ours"]["s_per_step"], 3
    )
    result["our_dropout_speed_up"] = round(
        result["ours with nn.Dropout"]["s_per_step"] / result["ours"]["s_per_step"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--src-len", type=int, default=24)
    parser.add_argument("--tgt-len", type=int, default=22)
    parser.add_argument("--allocator", action="store_true", help="run with and without GLIBC_TUNABLES")
    args = parser.parse_args()
    if args.allocator:
        runs = {}
        for label, tunables in (("default allocator", None), ("GLIBC_TUNABLES", ALLOCATOR_TUNABLES)):
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            argv = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch)]
            runs[label] = json.loads(
                subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
            )
        runs["speed-up of ours"] = round(
            runs["default allocator"]["ours"]["s_per_step"] / runs["GLIBC_TUNABLES"]["ours"]["s_per_step"], 3
        )
        print(json.dumps(runs, indent=2))
        return
    print(json.dumps(measure(args.steps, args.batch, args.src_len, args.tgt_len), indent=2))


if __name__ == "__main__":
    main()
