"""Mixed precision and compile options of training, against a plain fp32 step written out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_MODEL, tiny_recipe

from transformer import Transformer, precision
from transformer.errors import TransformerError
from transformer.model import MultiHeadAttention
from transformer.precision import MixedPrecision, maybe_compile


def one_step(mixed: MixedPrecision | None, clip_norm: float) -> list[torch.Tensor]:
    """Parameters after one Adam step of the tiny model, through `mixed` or written out by hand."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    src, tgt = torch.randint(4, 50, (3, 5)), torch.randint(4, 60, (3, 4))
    if mixed is None:
        model(src, tgt).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
    else:
        with mixed.autocast():
            loss = model(src, tgt).square().mean()
        mixed.backward(loss)
        mixed.step(optimizer, model, clip_norm)
    return [p.detach().clone() for p in model.parameters()]


def test_fp32_step_is_the_plain_step() -> None:
    for a, b in zip(one_step(MixedPrecision("fp32"), 0.5), one_step(None, 0.5), strict=True):
        assert torch.equal(a, b)


def test_loss_scaling_unscales_before_clipping_and_stepping() -> None:
    """The fp16 recipe's scaler (run here on CPU in fp32): a 2^10-scaled loss gives the same update."""
    mixed = MixedPrecision("fp32")
    mixed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for a, b in zip(one_step(mixed, 0.5), one_step(None, 0.5), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_runs_matmuls_in_bf16() -> None:
    torch.manual_seed(0)
    model = Transformer(TINY)
    src, tgt = torch.randint(4, 50, (2, 3)), torch.randint(4, 60, (2, 3))
    with MixedPrecision("bf16").autocast():
        logits = model(src, tgt)
    assert logits.dtype == torch.bfloat16
    # the same function, to bf16's 8 bits of mantissa
    torch.testing.assert_close(logits.float(), model(src, tgt), atol=0.05, rtol=0.02)


def test_bf16_gradients_point_where_the_fp32_ones_do() -> None:
    """The backward pass under bf16 autocast: each parameter's gradient close in direction and size to
    fp32's (the master weights, and so their gradients, stay fp32)."""
    grads = {}
    for kind in ("bf16", "fp32"):
        torch.manual_seed(0)
        model = Transformer(TINY)
        src, tgt = torch.randint(4, 50, (3, 5)), torch.randint(4, 60, (3, 4))
        mixed = MixedPrecision(kind)
        with mixed.autocast():
            loss = model(src, tgt).float().square().mean()
        mixed.backward(loss)
        grads[kind] = [p.grad for p in model.parameters() if p.grad is not None]
    skipped = 0
    for low, exact in zip(grads["bf16"], grads["fp32"], strict=True):
        assert low.dtype == torch.float32
        if exact.norm() < 1e-6:  # W_K's bias: softmax ignores a shift of every score, so its gradient is 0
            skipped += 1
            continue
        cos = torch.nn.functional.cosine_similarity(low.flatten(), exact.flatten(), dim=0)
        assert cos > 0.99 and abs(low.norm() / exact.norm() - 1) < 0.05, (cos, low.norm(), exact.norm())
    assert skipped <= sum(isinstance(m, MultiHeadAttention) for m in model.modules())  # one W_K bias each


def test_fp16_is_refused_on_cpu() -> None:
    with pytest.raises(TransformerError, match="fp16 needs a CUDA device"):
        MixedPrecision("fp16", "cpu")


def test_compile_wraps_the_same_parameters() -> None:
    model = Transformer(TINY)
    assert maybe_compile(model, False) is model
    compiled = maybe_compile(model, True)  # compiling itself happens at the first call (minutes on CPU)
    assert list(compiled.parameters()) == list(model.parameters())


def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert MixedPrecision("auto").precision == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # emulated bf16: slow
    assert MixedPrecision("auto").precision == "fp32"
    assert MixedPrecision("bf16").precision == "bf16"  # an explicit choice is kept
    assert precision.resolve_precision("auto", "mps") == "fp32"


def test_bf16_decoding_keeps_its_cache_in_fp32_on_cpus_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # Zen 4/5
    assert precision.decoding_cache_dtype(torch.bfloat16) == torch.float32
    assert precision.decoding_cache_dtype(torch.float32) is None  # fp32 weights: an fp32 cache anyway
    assert precision.decoding_cache_dtype(torch.bfloat16, "cuda") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert precision.decoding_cache_dtype(torch.bfloat16) is None  # unmeasured there: as before


def test_cpu_name_and_flags_come_from_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer import runtime

    text = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: text)
    assert runtime.cpu_name() == "AMD EPYC 9B14"
    assert runtime.cpu_flags() == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert runtime.cpu_vendor() == "" and runtime.cpu_family() is None
    text = "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: text)
    assert runtime.cpu_name() == "AMD EPYC (family 26, model 2)"  # "AMD EPYC" alone: Zen 4 or Zen 5?
    assert runtime.cpu_vendor() == "AuthenticAMD" and runtime.cpu_family() == 26
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: "")  # no /proc/cpuinfo (macOS)
    assert runtime.cpu_flags() == frozenset() and runtime.cpu_name()


def test_bf16_without_bf16_instructions_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "has_native_bf16", lambda device_type="cpu": False)
    assert "several times slower than fp32" in precision.emulation_warning("bf16", "cpu")
    assert precision.emulation_warning("fp32", "cpu") is None
    assert precision.emulation_warning("bf16", "cuda") is None
    monkeypatch.setattr(precision, "has_native_bf16", lambda device_type="cpu": True)
    assert precision.emulation_warning("bf16", "cpu") is None


def test_configure_torch_leaves_cuda_attention_to_torchs_own_kernels() -> None:
    """cuDNN's fused attention is turned off for the process (runtime.configure_torch); flash and
    memory-efficient attention stay on. Restored afterwards: the flag is global."""
    from transformer import runtime

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        runtime.configure_torch()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("compiled", [True, False])
def test_training_says_when_the_loss_is_compiled_first(
    compiled: bool, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """On a GPU the first step compiles the loss, seconds of silence: the model's line says so first."""
    from transformer import train as train_module

    monkeypatch.setattr(train_module, "compiles", lambda device: compiled)  # the loss itself stays eager
    recipe = tiny_recipe(data_dir, max_steps=1, eval_every=1, average_last=0, test_split="")
    train_module.train(recipe, TINY_MODEL, tmp_path)
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))
    assert ("the loss is compiled for this GPU at the first step" in model_line) is compiled
