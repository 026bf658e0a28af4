"""Linear layers with packed weights: nn.Linear's outputs, the same bits for the same input whatever came
before, never a stale pack, and never on a path that needs gradients."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from transformer import Transformer, packing
from transformer.packing import PackedLinear, pack_linears
from transformer.search import SearchConfig, beam_search, greedy_search

needs_mkl = pytest.mark.skipif(not packing.mkl_packing_available(), reason="this torch build has no MKL")
needs_packing = pytest.mark.skipif(packing.fp32_kernel() is None, reason="this torch build packs no fp32")
IDS = {"bos_id": 2, "eos_id": 3, "pad_id": 0}
FP32_KERNELS = [
    pytest.param("mkl", marks=needs_mkl),
    pytest.param(
        "onednn", marks=pytest.mark.skipif(not packing.onednn_available(), reason="no oneDNN in this build")
    ),
]


@pytest.fixture(params=FP32_KERNELS)
def fp32_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each library that packs fp32 weights, whichever this machine would choose."""
    monkeypatch.setattr(packing, "_kinds", lambda: {torch.float32: request.param})
    return request.param


def packed_pair(bias: bool = True) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    return linear, PackedLinear(linear)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(12, 96), (6, 1, 96), (3, 5, 96)])
def test_packed_linear_computes_what_linear_does(fp32_kernel: str, bias: bool, shape: tuple[int, ...]):
    linear, packed = packed_pair(bias)
    x = torch.randn(shape)
    expected = F.linear(x, linear.weight, linear.bias)
    with torch.no_grad():
        for _ in range(2):  # the first call packs, the second reuses the pack
            torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5)
    rows = x.numel() // 96 if fp32_kernel == "mkl" else None  # MKL packs for a row count, oneDNN for any
    assert packed._packed is not None and packed._packed[0] == rows


def test_packed_fp32_is_fp32_not_a_lower_precision(fp32_kernel: str) -> None:
    """oneDNN may run fp32 products in bf16 or tf32 when torch allows it: a 1,024-term sum must keep
    fp32's ~1e-6 relative error, far below bf16's ~1e-2."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 256)
    x = torch.randn(64, 1024)
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    with torch.no_grad():
        error = (PackedLinear(linear)(x).double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-5


def test_the_same_input_gives_the_same_bits_whatever_came_before(fp32_kernel: str) -> None:
    """MKL's packed GEMM rounds differently from the plain one at 1,024 inputs (on the AMX Xeon), so a layer
    that served some calls unpacked (a row count's first call, as an earlier version did) answered the same
    input in two ways: `transformer doctor` found eval mode non-deterministic."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 64)
    packed = PackedLinear(linear)
    x, other = torch.randn(8, 1024), torch.randn(3, 1024)
    with torch.no_grad():
        first = packed(x)
        assert packed._packed is not None  # packed at the first call
        packed(other)  # another row count: MKL packs again, for 3 rows
        assert packed._packed[0] == (3 if fp32_kernel == "mkl" else None)
        assert torch.equal(packed(x), first)
        assert torch.equal(packed(x), first)


def test_fp32_decoding_goes_to_onednn_on_amd_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL runs AVX2 code on AMD processors (half a Zen 5 core's fp32 rate) and packs again for every row
    count (see transformer/packing.py); training takes oneDNN only with AVX-512."""
    monkeypatch.setattr(packing, "onednn_available", lambda: True)
    monkeypatch.setattr(packing, "mkl_packing_available", lambda: True)
    choose = packing.fp32_kernel.__wrapped__  # uncached
    for vendor, flags, kernel in [
        ("AuthenticAMD", {"avx2", "avx512f"}, "onednn"),
        ("AuthenticAMD", {"avx2"}, "onednn"),
        ("AuthenticAMD", set(), "mkl"),
        ("GenuineIntel", {"avx2", "avx512f"}, "mkl"),
        ("", set(), "mkl"),
    ]:
        monkeypatch.setattr(packing, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(packing, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert choose() == kernel
    monkeypatch.setattr(packing, "mkl_packing_available", lambda: False)
    assert choose() is None  # Intel without MKL: the plain path


def test_a_changed_weight_is_packed_again(fp32_kernel: str) -> None:
    linear, packed = packed_pair()
    x = torch.randn(4, 96)
    with torch.no_grad():
        packed(x), packed(x)
        before = packed(x)
        linear.weight.mul_(2.0)  # an in-place write, as an optimiser step or load_state_dict makes
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, packed(x))


def test_another_weight_tensor_or_dtype_is_packed_again_and_a_packed_layer_copies(fp32_kernel: str) -> None:
    """A weight replaced by another tensor of the same version (load_state_dict(assign=True)), or cast
    in place by `.to` (which bumps no version), is not served from the old pack; copy.deepcopy, which an
    opaque pack would stop, copies all but the pack."""
    _, packed = packed_pair()
    x = torch.randn(4, 96)
    with torch.no_grad():
        for _ in range(2):  # a first weight of version 0 packed, then a second of version 0
            other = {key: torch.randn_like(value) for key, value in packed.state_dict().items()}
            packed.load_state_dict(other, assign=True)
            packed(x)
        assert packed.weight._version == 0
        torch.testing.assert_close(
            packed(x), F.linear(x, other["weight"], other["bias"]), rtol=1e-5, atol=1e-5
        )
        copied = copy.deepcopy(packed)
        torch.testing.assert_close(copied(x), packed(x))
        if packing.onednn_packing_available():
            packed.to(torch.bfloat16)
            low = x.bfloat16()
            expected = F.linear(low, packed.weight, packed.bias).float()
            torch.testing.assert_close(packed(low).float(), expected, rtol=2e-2, atol=2e-2)


@needs_packing
def test_gradients_autocast_and_other_devices_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    linear, packed = packed_pair()

    def refuse(*args, **kwargs):
        raise AssertionError("a packed kernel was called")

    monkeypatch.setattr(packing, "_mkl_linear", refuse)
    monkeypatch.setattr(packing, "_onednn_linear", refuse)
    x = torch.randn(4, 96, requires_grad=True)
    for _ in range(2):
        packed(x).sum().backward()  # gradients on: autograd needs F.linear
    assert linear.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert packed(x).dtype == torch.bfloat16  # autocast's choice is kept
    double = copy.deepcopy(packed).double()  # a dtype neither library packs
    with torch.no_grad():
        for _ in range(2):
            assert double(x.detach().double()).dtype == torch.float64
    assert packed._packed is None and double._packed is None


@pytest.mark.skipif(not packing.onednn_packing_available(), reason="no oneDNN bf16 on this CPU")
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_weights_are_packed_for_onednn_at_once(bias: bool) -> None:
    linear, packed = packed_pair(bias)
    linear.bfloat16()
    x = torch.randn(2, 7, 96).bfloat16()
    with torch.no_grad():
        expected = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(packed(x), expected, rtol=1e-2, atol=1e-2)
        assert packed._packed is not None and packed._packed[0] is None  # any row count, from the first call
        torch.testing.assert_close(packed(x[:1, :3]), expected[:1, :3], rtol=1e-2, atol=1e-2)


def test_pack_linears_keeps_state_dict_ties_and_decoding(fp32_kernel: str) -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, src_vocab_size=40, tgt_vocab_size=40, max_len=64, tie_output=True)
    model = Transformer(config).eval()
    packed = copy.deepcopy(model)
    count = pack_linears(packed)
    assert count == sum(type(m) is nn.Linear for m in model.modules()) > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.state_dict().keys() == model.state_dict().keys()
    assert packed.out_proj.weight is packed.tgt_embed.weight  # the tie survives
    src = torch.randint(4, 40, (5, 7))
    config = SearchConfig(beam=3, extra_len=6)
    for search in (greedy_search, beam_search):
        expected = search(model, src, config=config, max_len=64, **IDS)
        assert search(packed, src, config=config, max_len=64, **IDS) == expected


def test_pack_linears_is_a_no_op_without_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "fp32_kernel", lambda: None)
    monkeypatch.setattr(packing, "onednn_packing_available", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert pack_linears(model) == 0
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))


@needs_packing
def test_ready_for_decoding_casts_packs_and_sets_the_cache_dtype() -> None:
    """What `Translator.from_checkpoint` applies, and benchmarks/decode.py times: the weights in the dtype,
    packed unless asked not to, and the cache dtype that `decoding_cache_dtype` gives those weights."""
    from transformer.precision import decoding_cache_dtype
    from transformer.translate import ready_for_decoding

    model = Transformer(TINY)
    packed = ready_for_decoding(copy.deepcopy(model), dtype=torch.bfloat16)
    plain = ready_for_decoding(copy.deepcopy(model), dtype=torch.bfloat16, pack=False)
    for m in (packed, plain):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert m.cache_dtype == decoding_cache_dtype(torch.bfloat16)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert any(isinstance(m, PackedLinear) for m in packed.modules())  # fp32 packs here, so pack_linears ran
    assert ready_for_decoding(copy.deepcopy(model)).cache_dtype is None  # fp32 weights: the model's dtype
