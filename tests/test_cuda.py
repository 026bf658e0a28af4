"""The CUDA paths against what the CPU computes, where a GPU is: CI has none, so here they are skipped, and a
session lent a GPU runs them with `bash benchmarks/gpu_checks.sh`. They cover the choices made for CUDA
tensors only: torch's fused dropout (transformer/model/dropout.py), the stacked Q/K/V projection
(`MultiHeadAttention.fuse_qkv`), the loss that projects every position (`loss.selects_rows`) and is
compiled (`label_smoothed_loss`), layer norms in autocast's dtype (`LayerNorm.in_autocast_dtype`), and a
few training steps in bf16 and in fp16 with loss scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, padded_projection_case, tiny_recipe

from transformer.loss import label_smoothed_loss, projected_loss
from transformer.model import LayerNorm
from transformer.model.attention import MultiHeadAttention
from transformer.model.dropout import Dropout
from transformer.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_dropout_drops_at_its_rate_and_rescales_the_rest() -> None:
    x = torch.ones(1000, 1000, device=CUDA)
    y = Dropout(0.1).train()(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.002  # 10⁶ draws: the standard error is 0.0003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert torch.equal(Dropout(0.1).eval()(x), x)


def test_the_stacked_projection_gives_the_cpus_attention_and_gradients() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 5, 32)
    want, _ = mha(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in mha.parameters()]
    mha.zero_grad()
    calls = []
    mha.to(CUDA).w_q.register_forward_hook(lambda *_: calls.append("w_q"))
    got, _ = mha(x.to(CUDA))
    got.square().sum().backward()
    assert calls == []  # stacked: w_q's weight is read, the module not called
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    for p, grad in zip(mha.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad.cpu(), grad, atol=1e-4, rtol=1e-4)


def test_projecting_every_position_gives_the_cpus_loss_and_gradients() -> None:
    hidden, projection, target = padded_projection_case()
    want = projected_loss(hidden, projection, target, 0.1)  # the CPU selects the predicting rows
    want_grads = torch.autograd.grad(want, [hidden, projection.weight])
    hidden_cuda = hidden.detach().to(CUDA).requires_grad_()
    projection.to(CUDA)
    got = projected_loss(hidden_cuda, projection, target.to(CUDA), 0.1)
    got_grads = torch.autograd.grad(got, [hidden_cuda, projection.weight])
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-4)


def test_the_compiled_loss_gives_the_cpus_loss_and_gradients() -> None:
    """bf16 logits of two row counts (compiled for one, then for any), against the CPU's written-out loss."""
    torch.manual_seed(0)
    for rows in (96, 130):
        logits = (torch.randn(rows, 1000) * 4).bfloat16().requires_grad_()
        target = torch.randint(1, 1000, (rows,))
        target[-7:] = 0  # padding
        want = label_smoothed_loss(logits, target, 0.1)
        (want_grad,) = torch.autograd.grad(want * 0.5, logits)
        on_gpu = logits.detach().to(CUDA).requires_grad_()
        got = label_smoothed_loss(on_gpu, target.to(CUDA), 0.1)
        (got_grad,) = torch.autograd.grad(got * 0.5, on_gpu)
        assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(got_grad.cpu().float(), want_grad.float(), atol=1e-3, rtol=1e-2)
        assert not got_grad[-7:].any()


def test_layer_norms_keep_bf16_under_autocast_on_the_gpu() -> None:
    torch.manual_seed(0)
    norm = LayerNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(8, 64) * 3 + 1
    want = norm(x)
    norm.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = norm(x.to(CUDA))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), want.detach(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_runs_on_the_gpu(precision: str, data_dir: Path, tmp_path: Path) -> None:
    """A few steps through the trainer: the run says it trained on CUDA in this precision, and the loss
    is finite and falls."""
    recipe = tiny_recipe(data_dir, precision=precision, max_steps=12, eval_every=6, log_every=2)
    train(recipe, TINY_MODEL, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    chosen = next(r for r in records if r["event"] == "precision")
    assert chosen["device"] == "cuda" and chosen["precision"] == precision
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
