"""Attention against independent references: torch.nn.MultiheadAttention, torch's fused kernel, gradcheck."""

import copy
import math

import pytest
import torch
from torch import nn

from transformer.model.attention import (
    KVCache,
    MultiHeadAttention,
    fused_attention,
    scaled_dot_product_attention,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def copy_into_reference(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.w_q.weight, ours.w_k.weight, ours.w_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.w_q.bias, ours.w_k.bias, ours.w_v.bias]))
        ref.out_proj.weight.copy_(ours.w_o.weight)
        ref.out_proj.bias.copy_(ours.w_o.bias)


def randomise(module: nn.Module) -> None:
    """Random biases too, so that a mistake in any parameter shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["self-causal", "self-is_causal", "self-padding", "cross-padding"])
def test_multi_head_attention_matches_torch(dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(0)
    batch, q_len, k_len, d_model, heads = 3, 6, 6 if kind.startswith("self") else 9, 32, 4
    ours = MultiHeadAttention(d_model, heads, fused=False).to(dtype)
    randomise(ours)
    ref = nn.MultiheadAttention(d_model, heads, batch_first=True).to(dtype)
    copy_into_reference(ours, ref)
    x = torch.randn(batch, q_len, d_model, dtype=dtype)
    memory = None if kind.startswith("self") else torch.randn(batch, k_len, d_model, dtype=dtype)
    kv = x if memory is None else memory

    lengths = torch.tensor([k_len, k_len - 2, 3])
    keep = torch.arange(k_len)[None, :] < lengths[:, None]  # (batch, k_len) True = real token
    is_causal = kind == "self-is_causal"  # the same mask, as torch's flag instead of a tensor
    if kind in ("self-causal", "self-is_causal"):
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril()
        our_mask, ref_kwargs = None if is_causal else allowed, {"attn_mask": ~allowed}
    else:
        our_mask, ref_kwargs = keep[:, None, None, :], {"key_padding_mask": ~keep}

    out, weights = ours(x, memory, our_mask, need_weights=True, is_causal=is_causal)
    ref_out, ref_weights = ref(x, kv, kv, **ref_kwargs, need_weights=True, average_attn_weights=True)
    assert weights.shape == (batch, heads, q_len, k_len)
    assert (out - ref_out).abs().max() < TOL[dtype]
    assert (weights.mean(dim=1) - ref_weights).abs().max() < TOL[dtype]

    ours.fused = True  # the fused kernel gives the same output
    fused_out, _ = ours(x, memory, our_mask, is_causal=is_causal)
    assert (fused_out - ref_out).abs().max() < TOL[dtype]


def test_explicit_matches_fused_kernel_with_masks() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    assert torch.allclose(out, fused_attention(q, k, v, mask), atol=1e-6)


def test_is_causal_adds_the_lower_triangle_to_a_mask_on_both_paths() -> None:
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for mask in (None, padding):
        written = causal if mask is None else mask & causal
        reference = scaled_dot_product_attention(q, k, v, written)[0]
        explicit = scaled_dot_product_attention(q, k, v, mask, is_causal=True)[0]
        fused = fused_attention(q, k, v, mask, is_causal=True)
        grads = [torch.autograd.grad(out.sum(), (q, k, v)) for out in (reference, explicit, fused)]
        for out, grad in zip((explicit, fused), grads[1:], strict=True):
            assert (out - reference).abs().max() < 1e-12
            assert all((a - b).abs().max() < 1e-12 for a, b in zip(grad, grads[0], strict=True))
    with pytest.raises(ValueError, match="self-attention only"):
        MultiHeadAttention(8, 2)(torch.randn(1, 2, 8), torch.randn(1, 3, 8), is_causal=True)


def test_hand_computed_case() -> None:
    # One query, two keys: scores = [1·2, 1·0]/√1 -> weights softmax([2, 0]); output = weighted values.
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[2.0], [0.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    out, weights = scaled_dot_product_attention(q, k, v)
    w0 = math.exp(2) / (math.exp(2) + 1)
    assert weights.flatten().tolist() == pytest.approx([w0, 1 - w0])
    assert out.item() == pytest.approx(10 * w0 + 20 * (1 - w0))
    # The scale is 1/√d_k: with d_k = 4 the same dot product is divided by 2.
    q4, k4 = torch.ones(1, 1, 1, 4) / 2, torch.stack([torch.ones(4), torch.zeros(4)])[None, None]
    _, w4 = scaled_dot_product_attention(q4, k4, torch.zeros(1, 1, 2, 4))
    assert w4[0, 0, 0, 0].item() == pytest.approx(math.exp(1) / (math.exp(1) + 1))


def test_rows_sum_to_one_masked_exactly_zero_fully_masked_no_nan() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # padding
    mask[1, :, 2, :] = False  # query 2 of sequence 1 may see nothing
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    assert not torch.isnan(out).any() and not torch.isnan(weights).any()
    assert torch.all(weights[~mask.expand_as(weights)] == 0.0)  # exactly zero, not merely small
    sums = weights.sum(-1)
    assert torch.allclose(sums[0], torch.ones_like(sums[0]))
    assert torch.all(sums[1, :, 2] == 0.0) and torch.all(out[1, :, 2] == 0.0)
    assert torch.allclose(sums[1, :, [0, 1, 3]], torch.ones(2, 3))
    q.requires_grad_(True)
    scaled_dot_product_attention(q, k, v, mask)[0].sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[1, :, 2] == 0.0)  # it saw nothing
    # The fused kernel also gives zeros, not NaN, for the fully masked row.
    assert torch.allclose(fused_attention(q.detach(), k, v, mask), out, atol=1e-6)


def test_gradcheck_float64() -> None:
    torch.manual_seed(3)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, True, False, False])[None, None, None, :]
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask)[0], (q, k, v))
    mha = MultiHeadAttention(8, 2, fused=False).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mha(x)[0], (x,))


def test_cache_appends_and_reorders() -> None:
    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(3, 5, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    full, _ = mha(x, mask=causal)
    cache = KVCache(max_len=8)
    steps = []
    for t in range(5):
        out, _ = mha(x[:, t : t + 1], cache=cache, layer=0)
        cache.advance()
        steps.append(out)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-6)
    before = cache.prefix(0)[0].clone()  # (rows, heads, 5, d_k)
    assert before.shape == (3, 2, 5, 4)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.prefix(0)[0], before[[2, 2, 0]])
    cache.reorder(torch.tensor([2, 0, 1]))  # back into the first buffers, which the first reorder freed
    assert torch.equal(cache.prefix(0)[0], before[[0, 2, 2]])
    new_x = torch.randn(3, 1, 8)  # a step after reordering appends to the reordered prefix
    out, _ = mha(new_x, cache=cache, layer=0)
    expected, _ = mha(torch.cat([x[[0, 2, 2]], new_x], 1), mask=torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.allclose(out, expected[:, -1:], atol=1e-6)
    cache.advance()
    cache.reorder(torch.tensor([1]))  # fewer rows: new buffers
    assert cache.self_kv[0][0].shape == (1, 8, 2, 4)  # (rows, max_len, heads, d_k): per position
    assert torch.equal(cache.prefix(0)[0][0, :, :5], before[2])
    cache.reorder(torch.tensor([0, 0, 0]))  # more rows (a beam widening): new buffers, the prefix copied
    last_x = torch.randn(3, 1, 8)
    out, _ = mha(last_x, cache=cache, layer=0)
    prefix = torch.cat([x[[2]], new_x[[1]]], 1).expand(3, 6, 8)  # the row kept: x[2], then new_x[1]
    expected, _ = mha(torch.cat([prefix, last_x], 1), mask=torch.ones(7, 7, dtype=torch.bool).tril())
    assert torch.allclose(out, expected[:, -1:], atol=1e-6)


def test_cache_reorder_copies_only_moved_rows_in_place() -> None:
    """When at most half the rows take another row's prefix, those are copied into the same buffers
    (sources read before any row is written, so swaps and chains come out right) and the rest stay."""
    torch.manual_seed(5)
    cache = KVCache(max_len=6)
    k, v = torch.randn(6, 2, 4, 3), torch.randn(6, 2, 4, 3)
    cache.append(0, k, v)
    cache.advance(4)
    buffers = cache.self_kv[0]
    expected_k, expected_v = k, v
    for index in ([1, 0, 2, 3, 4, 5], [0, 0, 2, 2, 4, 5], [2, 1, 3, 3, 4, 5], [0, 1, 2, 3, 4, 5]):
        cache.reorder(torch.tensor(index))
        expected_k, expected_v = expected_k[index], expected_v[index]
        assert cache.self_kv[0][0] is buffers[0] and cache.self_kv[0][1] is buffers[1]  # in place
        k_now, v_now = cache.prefix(0)
        assert torch.equal(k_now, expected_k) and torch.equal(v_now, expected_v)
    cache.reorder(torch.tensor([5, 5, 5, 5, 4, 4]))  # most rows move: gathered into the spare buffers
    assert cache.self_kv[0][0] is not buffers[0]
    assert torch.equal(cache.prefix(0)[0], expected_k[[5, 5, 5, 5, 4, 4]])


def test_a_cache_kept_in_fp32_serves_a_bf16_layer() -> None:
    """KVCache.dtype: a bf16 layer's keys and values are kept (and attended over) in fp32, one step at a
    time, and the layer still hands bf16 on; the result is the bf16 layer's full attention to bf16
    rounding, and the fp32 layer's more closely than bf16 throughout manages."""
    torch.manual_seed(6)
    mha = MultiHeadAttention(16, 2).eval()
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    exact = mha(mha(x, mask=causal)[0], memory)[0]  # fp32: self-attention, then cross-attention
    bf16 = copy.deepcopy(mha).to(torch.bfloat16)
    x16, memory16 = x.bfloat16(), memory.bfloat16()
    rounded = bf16(bf16(x16, mask=causal)[0], memory16)[0]
    cache = KVCache(max_len=8, dtype=torch.float32)
    steps = []
    for t in range(5):
        out, _ = bf16(x16[:, t : t + 1], cache=cache, layer=0)
        out, _ = bf16(out, memory16, cache=cache, layer=1)
        cache.advance()
        steps.append(out)
    stepped = torch.cat(steps, 1)
    assert stepped.dtype == torch.bfloat16
    assert cache.self_kv[0][0].dtype == torch.float32 and cache.cross_kv[1][0].dtype == torch.float32
    torch.testing.assert_close(stepped.float(), rounded.float(), atol=3e-2, rtol=3e-2)
    assert (stepped.float() - exact).abs().max() <= (rounded.float() - exact).abs().max()


def test_hypotheses_share_their_source_in_cross_attention() -> None:
    """Rows 2s and 2s+1 of the queries attend to source s: the same result as repeating every memory row,
    with the keys/values cached once per source and left alone by a beam reorder."""
    torch.manual_seed(6)
    mha = MultiHeadAttention(8, 2).eval()
    randomise(mha)
    memory = torch.randn(3, 5, 8)
    mask = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    x = torch.randn(6, 4, 8)  # two hypotheses per source, four positions each
    memory_rows, mask_rows = memory.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    repeated, w_repeated = mha(x, memory_rows, mask_rows, need_weights=True)  # the explicit path
    shared, w_shared = mha(x, memory, mask, need_weights=True)
    assert torch.allclose(shared, repeated, atol=1e-6)
    assert torch.allclose(w_shared, w_repeated, atol=1e-6)  # (rows, heads, q_len, k_len) either way
    assert torch.allclose(mha(x, memory, mask)[0], repeated, atol=1e-6)  # the fused kernel

    cache = KVCache(max_len=4)
    out, _ = mha(x[:, :1], memory, mask, cache=cache, layer=0)
    assert torch.allclose(out, repeated[:, :1], atol=1e-6)
    cross = cache.cross_kv[0][0]
    assert cross.size(0) == 3  # once per source
    cache.reorder(torch.tensor([1, 1, 2, 2, 5, 4]))
    assert cache.cross_kv[0][0] is cross
    with pytest.raises(ValueError, match="cannot share"):
        mha(torch.randn(4, 1, 8), memory, mask)

    # the search drops source 1 and goes on with the rows of sources 0 and 2
    cache.advance()
    cache.reorder(torch.tensor([0, 1, 4, 5]), sources=torch.tensor([0, 2]))
    assert torch.equal(cache.cross_kv[0][0], cross[[0, 2]])
    out, _ = mha(x[[0, 1, 4, 5], 1:2], memory[[0, 2]], mask[[0, 2]], cache=cache, layer=0)
    assert torch.allclose(out, repeated[[0, 1, 4, 5], 1:2], atol=1e-6)


def test_fused_qkv_projection_equals_separate_projections() -> None:
    """One matmul with W_Q, W_K, W_V stacked gives the three projections' outputs and their gradients."""
    torch.manual_seed(5)
    mha = MultiHeadAttention(16, 4)
    randomise(mha)
    x = torch.randn(3, 7, 16)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    results = []
    for fuse in (True, False):
        mha.fuse_qkv = fuse
        mha.zero_grad()
        out, _ = mha(x, mask=causal)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in mha.parameters()]))
    (fused, fused_grads), (separate, separate_grads) = results
    assert torch.allclose(fused, separate, atol=1e-6)
    for a, b in zip(fused_grads, separate_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_qkv_projections_are_fused_by_default_only_on_cuda() -> None:
    """`fuse_qkv` None (the default) runs the three projections on a CPU tensor (measured no faster fused
    there) and one stacked matmul only on CUDA; True fuses everywhere (w_q's weight is read, the module
    not called) but where a projection has a hook, which must run."""
    mha = MultiHeadAttention(16, 4)
    calls = []
    forward = mha.w_q.forward
    mha.w_q.forward = lambda x: (calls.append("w_q"), forward(x))[1]
    x = torch.randn(2, 5, 16)
    assert mha.fuse_qkv is None
    mha(x)
    assert calls == ["w_q"]
    mha.fuse_qkv = True
    mha(x)
    assert calls == ["w_q"]
    # the report's unscaled variant: a hook scales W_Q's output, fused or not
    unfused = MultiHeadAttention(16, 4)
    unfused.load_state_dict(mha.state_dict())
    for module in (mha, unfused):
        module.w_q.register_forward_hook(lambda module, args, out: out * 3.0)
    unfused.fuse_qkv = False
    assert torch.allclose(mha(x)[0], unfused(x)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("grad", "k_len", "kernel_dtype"),
    [(True, 12, None), (False, 12, torch.bfloat16), (True, 2048, torch.bfloat16)],
)
def test_bf16_training_on_cpu_runs_the_explicit_path(
    monkeypatch: pytest.MonkeyPatch, grad: bool, k_len: int, kernel_dtype: torch.dtype | None
) -> None:
    """The CPU flash-attention backward is slow in bf16 at translation lengths, so training runs the
    explicit path (no kernel call), returns bf16, and gets the gradients of the exact function;
    inference and very long keys keep the bf16 kernel."""
    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = kernel(q, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.bfloat16) for n in (5, k_len, k_len))
    mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
    mask[0, ..., -2:] = False
    for t in (q, k, v):
        t.requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attention(q, k, v, mask)
    assert seen == ([kernel_dtype] if kernel_dtype else []) and out.dtype == torch.bfloat16
    if grad:
        out.float().square().sum().backward()
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = scaled_dot_product_attention(*exact, mask)
        ref.square().sum().backward()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        for ours, theirs in zip((q, k, v), exact, strict=True):
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=5e-2, rtol=5e-2)
