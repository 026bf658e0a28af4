"""fp32 linear layers through oneDNN: F.linear's outputs and gradients (against float64), the plain path
wherever oneDNN should not run, and a model that trains as it does with nn.Linear."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_MODEL, tiny_recipe
from torch import nn

from transformer import Transformer, onednn
from transformer.experiments.training import remove_scaling
from transformer.onednn import OneDNNLinear, onednn_linear, use_onednn_linears
from transformer.packing import onednn_available
from transformer.train import train

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("mkl", [False, True], ids=["dW in oneDNN", "dW in MKL"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(12,), (3, 5), (1,)])
@pytest.mark.parametrize("features", [(96, 40), (40, 96), (64, 64)])  # (in, out): both forms of dW
def test_forward_and_gradients_are_linears(
    bias: bool, rows: tuple[int, ...], features: tuple[int, int], mkl: bool
) -> None:
    torch.manual_seed(0)
    (d_in, d_out), shape = features, (*rows, features[0])
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(d_out, d_in, requires_grad=True)
    b = torch.randn(d_out, requires_grad=True) if bias else None
    grad = torch.randn(*rows, d_out)
    onednn_linear(x, weight, b, weight_grad_in_mkl=mkl).backward(grad)
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, *([b] if bias else []))]
    exact = F.linear(*inputs) if bias else F.linear(*inputs, None)
    exact.backward(grad.double())
    with torch.no_grad():
        torch.testing.assert_close(onednn_linear(x, weight, b).double(), exact, rtol=1e-5, atol=1e-5)
    for ours, reference in zip([x, weight, *([b] if bias else [])], inputs, strict=True):
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)
        assert ours.grad.is_contiguous()


def test_strided_inputs_and_frozen_weights() -> None:
    """Attention hands the output projection a transposed view; a frozen weight needs no gradient."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 32).transpose(0, 1).requires_grad_()  # (4, 6, 32), not contiguous
    weight = torch.randn(16, 32)
    y = onednn_linear(x, weight)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 6, 16) @ weight, rtol=1e-5, atol=1e-5)
    assert weight.grad is None


def test_other_dtypes_autocast_and_empty_inputs_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("oneDNN was called")

    monkeypatch.setattr(onednn, "_product", refuse)
    weight = torch.randn(8, 4)
    assert onednn_linear(torch.randn(3, 4).double(), weight.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_linear(torch.randn(3, 4), weight).dtype == torch.bfloat16  # autocast's choice is kept
    assert onednn_linear(torch.randn(0, 4), weight).shape == (0, 8)


def test_use_onednn_linears_only_where_onednn_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn, "onednn_trains_faster", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert use_onednn_linears(model) == 0 and type(model[0]) is nn.Linear
    monkeypatch.setattr(onednn, "onednn_trains_faster", lambda: True)
    assert use_onednn_linears(model) == 2 and all(type(m) is OneDNNLinear for m in (model[0], model[2]))


def test_a_swapped_model_keeps_its_state_dict_ties_and_training_step() -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, src_vocab_size=40, tgt_vocab_size=40, tie_output=True)
    model = Transformer(config)
    swapped = copy.deepcopy(model)
    count = use_onednn_linears(swapped, force=True)
    assert count == sum(type(m) is nn.Linear for m in model.modules()) > 0
    assert swapped.state_dict().keys() == model.state_dict().keys()
    assert swapped.out_proj.weight is swapped.tgt_embed.weight  # the tie survives
    src, tgt = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 6))
    for m in (model, swapped):
        F.cross_entropy(m(src, tgt).flatten(0, 1), tgt.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), swapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_swap_keeps_the_layers_hooks() -> None:
    """The report's unscaled-attention variant is a forward hook on W_Q, registered before training swaps
    the layers; the swap once dropped it, and "unscaled" trained exactly as "scaled"."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, src_vocab_size=40, tgt_vocab_size=40)).eval()
    src, tgt = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 6))
    plain = model(src, tgt)
    unscaled = remove_scaling(model)(src, tgt)
    assert not torch.allclose(unscaled, plain, atol=1e-3)
    use_onednn_linears(model, force=True)
    assert type(model.encoder.layers[0].self_attn.w_q) is OneDNNLinear
    torch.testing.assert_close(model(src, tgt), unscaled, rtol=1e-4, atol=1e-5)

    calls = []
    holder = nn.Sequential(nn.Linear(4, 3))
    handle = holder[0].register_forward_pre_hook(lambda _module, _args: calls.append(1))
    use_onednn_linears(holder, force=True)
    holder(torch.randn(2, 4))
    handle.remove()  # the handle of a hook registered on the replaced layer still removes it
    holder(torch.randn(2, 4))
    assert type(holder[0]) is OneDNNLinear and calls == [1]


def test_training_with_onednn_linears_follows_the_plain_run(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """What `transformer train` does on an AMD CPU, wherever the tests run."""
    once = {"eval_every": 0, "test_split": "", "average_last": 0}
    recipe = tiny_recipe(data_dir, precision="fp32", max_steps=10, **once)
    monkeypatch.setattr(onednn, "onednn_trains_faster", lambda: False)  # as on an Intel CPU
    train(recipe, TINY_MODEL, tmp_path / "plain")
    assert "oneDNN" not in capsys.readouterr().out
    monkeypatch.setattr(onednn, "onednn_trains_faster", lambda: True)
    train(recipe, TINY_MODEL, tmp_path / "onednn")
    out = capsys.readouterr().out
    assert "fp32 products in oneDNN" in out
    assert ("weight gradients in MKL" in out) == onednn.weight_gradients_in_mkl()  # on Zen 4 (fp32 run)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]

    assert len(losses("plain")) == 2
    assert losses("onednn") == pytest.approx(losses("plain"), rel=1e-4)


def test_weight_gradients_go_to_mkl_on_zen_4_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zen 4 runs AVX-512 on 256-bit units, where MKL's AVX2 kernels keep up; Zen 5's units are 512 bits."""

    def on(vendor: str, family: int | None, flags: set[str]) -> bool:
        monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(onednn, "cpu_family", lambda: family)
        monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset(flags))
        onednn.weight_gradients_in_mkl.cache_clear()
        return onednn.weight_gradients_in_mkl()

    try:
        assert on("AuthenticAMD", 25, {"avx2", "avx512f"})  # Zen 4
        assert not on("AuthenticAMD", 25, {"avx2"})  # Zen 3 (which trains with MKL's nn.Linear anyway)
        assert not on("AuthenticAMD", 26, {"avx2", "avx512f"})  # Zen 5
        assert not on("GenuineIntel", 6, {"avx2", "avx512f"})
        assert not on("", None, set())
    finally:
        monkeypatch.undo()
        onednn.weight_gradients_in_mkl.cache_clear()


def test_a_layer_follows_its_weight_gradient_setting() -> None:
    """`OneDNNLinear.weight_grad_in_mkl` (what the benchmark's variants set) reaches the backward pass:
    MKL's dW is a plain `mm` of the transposed gradient, oneDNN's is not."""
    layer = OneDNNLinear(nn.Linear(8, 8))
    x = torch.randn(5, 8)
    for setting, mkl_calls in ((True, 1), (False, 0)):
        layer.weight_grad_in_mkl = setting
        y = layer(x)
        with torch.profiler.profile() as prof:
            y.sum().backward()
        assert sum(e.count for e in prof.key_averages() if e.key == "aten::mm") == mkl_calls, setting


def test_training_takes_onednn_only_where_avx512_makes_it_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding takes oneDNN on every AMD CPU; training only where MKL would run below the AVX-512 rate."""
    monkeypatch.setattr(onednn, "fp32_kernel", lambda: "onednn")
    monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset({"avx2"}))  # Zen 3
    assert not onednn.onednn_trains_faster()
    monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # Zen 4, Zen 5
    assert onednn.onednn_trains_faster()
    monkeypatch.setattr(onednn, "fp32_kernel", lambda: "mkl")  # Intel
    assert not onednn.onednn_trains_faster()
