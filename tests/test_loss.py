"""The training loss: label smoothing by hand, and the padding-skipping projection against the plain one."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, padded_projection_case

from transformer import Transformer
from transformer import loss as loss_module
from transformer.config import RNNConfig
from transformer.data.batching import Batch
from transformer.data.tokenizer import PAD_ID
from transformer.loss import (
    ROWS_MULTIPLE,
    label_smoothed_loss,
    label_smoothed_loss_by_reductions,
    projected_loss,
)
from transformer.model import RNNSeq2Seq
from transformer.train import batch_loss


def test_label_smoothing_by_hand() -> None:
    """One position, vocabulary 4, logits log(1, 2, 3, 4) -> p = (0.1, 0.2, 0.3, 0.4); target 3 (PAD_ID is 0,
    so a target of 0 is ignored)."""
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    target = torch.tensor([[3, PAD_ID]])
    eps = 0.1
    expected = (1 - eps) * -math.log(0.4) + eps * -sum(math.log(p) for p in (0.1, 0.2, 0.3, 0.4)) / 4
    assert float(label_smoothed_loss(logits, target, eps)) == pytest.approx(expected, rel=1e-6)


LOSSES = pytest.mark.parametrize(
    "loss_fn", [label_smoothed_loss, label_smoothed_loss_by_reductions], ids=["written-out", "by reductions"]
)


@LOSSES
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_and_gradient_match_torch_cross_entropy(smoothing: float, loss_fn) -> None:
    """The written-out gradient, and autograd's through the loss by reductions, against torch's autograd
    through F.cross_entropy, in float64."""
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 50, dtype=torch.float64, requires_grad=True) * 3
    target = torch.randint(1, 50, (4, 9))
    target[1, 6:] = PAD_ID
    target[3] = PAD_ID  # a sequence of padding only
    ours = loss_fn(logits, target, smoothing)
    theirs = F.cross_entropy(
        logits.flatten(0, 1),
        target.flatten(),
        ignore_index=PAD_ID,
        label_smoothing=smoothing,
        reduction="sum",
    )
    torch.testing.assert_close(ours, theirs)
    (got,) = torch.autograd.grad(ours * 0.7, logits)
    (want,) = torch.autograd.grad(theirs * 0.7, logits)
    torch.testing.assert_close(got, want)
    assert not got[3].any() and not got[1, 6:].any()
    leaf = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, PAD_ID, 10, 1, 7, 7])
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels, smoothing), (leaf,))


@LOSSES
def test_bf16_logits_get_an_fp32_loss_and_a_bf16_gradient(loss_fn) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 40).bfloat16().requires_grad_()
    target = torch.randint(1, 40, (8,))
    loss = loss_fn(logits, target, 0.1)
    loss.backward()
    exact = logits.detach().double().requires_grad_()
    want = F.cross_entropy(exact, target, label_smoothing=0.1, reduction="sum")
    want.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want.detach())
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=4e-3, rtol=1e-2)


@pytest.mark.parametrize("selected", [True, False], ids=["rows selected (CPU)", "every row (CUDA)"])
def test_projecting_only_predicted_positions_changes_nothing(
    selected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways `projected_loss` goes (selecting the predicting rows, or on CUDA projecting every one)
    give the loss and gradients of the whole logits."""
    assert loss_module.selects_rows(torch.device("cpu"))
    assert not loss_module.selects_rows(torch.device("cuda"))
    monkeypatch.setattr(loss_module, "selects_rows", lambda device: selected)
    hidden, projection, target = padded_projection_case()
    skipped = projected_loss(hidden, projection, target, 0.1)
    grads = torch.autograd.grad(skipped, [hidden, projection.weight, projection.bias])
    plain = label_smoothed_loss(F.linear(hidden, projection.weight, projection.bias), target, 0.1)
    expected = torch.autograd.grad(plain, [hidden, projection.weight, projection.bias])
    torch.testing.assert_close(skipped, plain)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not grads[0][2, 2:].any() and not grads[0][0, 5:].any()  # padded positions get no gradient
    rows = []
    projection.register_forward_hook(lambda _module, args, _out: rows.append(args[0].shape[:-1].numel()))
    projected_loss(hidden, projection, target, 0.1)
    assert rows == [ROWS_MULTIPLE if selected else 3 * 7]


def test_projected_rows_come_in_multiples_that_recur() -> None:
    """12 real target tokens are projected as ROWS_MULTIPLE rows, the extra ones ignored by the loss."""
    shapes = []
    projection = torch.nn.Linear(16, 50)
    projection.register_forward_hook(lambda _module, args, _out: shapes.append(tuple(args[0].shape)))
    target = torch.randint(4, 50, (3, 7))
    target[:, 4:] = PAD_ID
    hidden = torch.randn(3, 7, 16)
    loss = projected_loss(hidden, projection, target, 0.1)
    assert shapes == [(ROWS_MULTIPLE, 16)]
    plain = label_smoothed_loss(projection(hidden[:, :4]), target[:, :4], 0.1)
    torch.testing.assert_close(loss, plain)


@pytest.mark.parametrize("tie_output", [False, True])
def test_unprojected_forward_is_what_the_output_layer_projects(tie_output: bool) -> None:
    """Every model family: the trainer's loss (`batch_loss`, projecting only the predicted positions of
    the unprojected forward) is the loss of the whole logits."""
    torch.manual_seed(0)
    rnn_sizes = {"src_vocab_size": 50, "tgt_vocab_size": 60, "emb_dim": 16, "hidden_size": 24}
    models = [
        Transformer(dataclasses.replace(TINY, tie_output=tie_output, share_embeddings=False)),
        RNNSeq2Seq(RNNConfig(kind="rnn-attention", dropout=0.0, tie_output=tie_output, **rnn_sizes)),
    ]
    src, tgt = torch.randint(4, 50, (2, 5)), torch.randint(4, 60, (2, 5))
    tgt[1, 3:] = PAD_ID
    batch = Batch(src, tgt[:, :-1], tgt[:, 1:], n_src_tokens=10, n_tgt_tokens=6, padding_fraction=0.0)
    for model in models:
        model.eval()
        logits = model(batch.src, batch.tgt_in)
        torch.testing.assert_close(model.out_proj(model(src, batch.tgt_in, project=False)), logits)
        want = label_smoothed_loss(logits, batch.tgt_out, 0.1)
        torch.testing.assert_close(batch_loss(model, model, batch, 0.1), want)


def test_the_compiled_loss_is_compiled_once_for_every_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of every shape, some square (which torch.compile would otherwise take as a hint that batch
    and length are one size), reuse one compiled graph: counted with a backend that compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss_module.label_smoothed_loss_by_reductions, backend=counter)
    monkeypatch.setattr(loss_module, "_compiled_loss", lambda: compiled)
    torch.manual_seed(0)
    for batch, length in [(4, 7), (5, 5), (3, 9), (8, 2), (6, 6), (2, 11)]:
        logits = torch.randn(batch, length, 30, requires_grad=True)
        target = torch.randint(1, 30, (batch, length))
        target[0, -1] = PAD_ID
        got = label_smoothed_loss(logits, target, 0.1, compiled=True)
        want = label_smoothed_loss(logits, target, 0.1, compiled=False)
        torch.testing.assert_close(got, want)
        got.backward()
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("capability", "triton", "compiler", "compiled"),
    [
        ((9, 0), True, True, True),
        ((7, 0), True, True, True),
        ((6, 0), True, True, False),
        ((9, 0), False, True, False),
        ((9, 0), True, False, False),
    ],
)
def test_the_loss_is_compiled_on_gpus_that_triton_runs_on(
    capability: tuple[int, int],
    triton: bool,
    compiler: bool,
    compiled: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Volta (7.0) and newer with Triton and a C compiler; a P100 (6.0), or a machine without Triton or
    without a compiler for Triton's launchers, keeps the written-out loss; CPUs always do."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(loss_module.importlib.util, "find_spec", lambda name: object() if triton else None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(loss_module.shutil, "which", lambda name: f"/usr/bin/{name}" if compiler else None)
    loss_module._triton_runs_on.cache_clear()
    try:
        assert loss_module.compiles(torch.device("cuda", 0)) is compiled
        assert not loss_module.compiles(torch.device("cpu"))
    finally:
        loss_module._triton_runs_on.cache_clear()
