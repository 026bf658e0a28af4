"""The fast dropout must be dropout: the right rate, independent elements, the right scale and gradient."""

import pytest
import torch

from transformer.model.dropout import Dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_rate_scale_and_gradient(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5
    x.requires_grad_(True)
    out = Dropout(p).train()(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.003  # 1M Bernoulli draws: σ ≈ 0.0005
    assert torch.allclose(out[~dropped], x[~dropped] / (1 - p))
    out.sum().backward()
    assert torch.allclose(x.grad, (~dropped).float() / (1 - p))


def test_elements_are_independent() -> None:
    # Neighbours share one 64-bit draw (four 16-bit lanes): their masks must still be uncorrelated.
    torch.manual_seed(1)
    keep = (Dropout(0.5).train()(torch.ones(4_000_000)) != 0).float()
    pairs = keep.view(-1, 4)
    for i in range(3):
        a, b = pairs[:, i], pairs[:, i + 1]
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(correlation.item()) < 0.005


def test_eval_mode_and_zero_rate_are_identity() -> None:
    x = torch.randn(10, 10)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_seeded_masks_repeat() -> None:
    x = torch.ones(1000)
    torch.manual_seed(5)
    a = Dropout(0.2).train()(x)
    torch.manual_seed(5)
    assert torch.equal(a, Dropout(0.2).train()(x))
    with pytest.raises(ValueError):
        Dropout(1.0)
