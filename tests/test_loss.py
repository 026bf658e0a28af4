"""The training loss: label smoothing by hand, and the padding-skipping projection against the plain one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from transformer import Transformer
from transformer.data.tokenizer import PAD_ID
from transformer.loss import ROWS_MULTIPLE, label_smoothed_loss, projected_loss


def test_label_smoothing_by_hand() -> None:
    """One position, vocabulary 4, logits log(1, 2, 3, 4) -> p = (0.1, 0.2, 0.3, 0.4); target 3 (PAD_ID is 0,
    so a target of 0 is ignored)."""
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    target = torch.tensor([[3, PAD_ID]])
    eps = 0.1
    expected = (1 - eps) * -math.log(0.4) + eps * -sum(math.log(p) for p in (0.1, 0.2, 0.3, 0.4)) / 4
    assert float(label_smoothed_loss(logits, target, eps)) == pytest.approx(expected, rel=1e-6)


def test_projecting_only_predicted_positions_changes_nothing() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    projection = torch.nn.Linear(16, 50)
    target = torch.randint(4, 50, (3, 7))
    target[0, 5:] = PAD_ID
    target[2, 2:] = PAD_ID
    skipped = projected_loss(hidden, projection, target, 0.1)
    grads = torch.autograd.grad(skipped, [hidden, projection.weight, projection.bias])
    plain = label_smoothed_loss(F.linear(hidden, projection.weight, projection.bias), target, 0.1)
    expected = torch.autograd.grad(plain, [hidden, projection.weight, projection.bias])
    torch.testing.assert_close(skipped, plain)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not grads[0][2, 2:].any() and not grads[0][0, 5:].any()  # padded positions get no gradient


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


def test_unprojected_forward_is_what_the_output_layer_projects() -> None:
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    src, tgt = torch.randint(4, 50, (2, 5)), torch.randint(4, 60, (2, 4))
    torch.testing.assert_close(model.out_proj(model(src, tgt, project=False)), model(src, tgt))
