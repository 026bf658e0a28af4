"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017, §3.2).

Masks are boolean and broadcast to (batch, heads, q_len, k_len): True means "may attend". Padding masks
have shape (batch, 1, 1, k_len); the causal mask has shape (q_len, k_len), or is given as `is_causal`, as
torch's attention takes it, when the queries start at the first key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BF16_CPU_BACKWARD_MAX_KEYS = 1024  # bf16 training's explicit path on the CPU, up to this many keys
# The attention weights a forward pass records when asked: one dict per layer, {"self": (batch, heads,
# q_len, k_len), "cross": …}, in the order the layers run (encoder, then decoder).
AttentionRecord = list[dict[str, Tensor]]


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """softmax(QKᵀ/√d_k)·V, written out; returns (output, weights). `is_causal` lets query i see keys
    0 … i only (on top of `mask`), as torch's `is_causal` does.

    The readable reference, the path that can return the weights, and bf16 training's path on the CPU
    (`fused_attention`). Masked scores are set to -inf, so masked keys get exactly zero weight, not the
    small one a -1e9 fill leaves. A query with no key to attend to (0/0 = NaN) instead attends to every
    key and is then multiplied by zero: zero weights, zero output, no NaN in the gradients. That is
    worked out on the boolean mask, smaller than the scores, not by two more `masked_fill`s of scores
    and weights, which cost 1.1-1.35× (benchmarks/README.md).
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (batch, heads, q_len, k_len)
    if is_causal:
        mask = _with_causal(mask, q.size(-2), k.size(-2), q.device)
    weights = torch.softmax(scores, dim=-1) if mask is None else masked_softmax(scores, mask)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (batch, heads, q_len, d_k), (batch, heads, q_len, k_len)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over the last dimension of the entries `mask` allows (True), exactly 0 for the others; a row
    with no entry allowed, which would be 0/0 = NaN, attends to every entry and is then multiplied by zero.
    Shared by this module's attention and the recurrent baselines' (`model.rnn.SourceAttention`)."""
    has_any_key = mask.any(dim=-1, keepdim=True)  # (…, 1)
    scores = scores.masked_fill(~(mask | ~has_any_key), float("-inf"))
    return torch.softmax(scores, dim=-1) * has_any_key  # the rows with no key to attend to become zeros


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """The same function through torch's fused kernel (flash / memory-efficient), which never writes the
    (q_len, k_len) weights out. On the CPU it gives fully masked rows zeros, like the explicit path; with
    dropout on the weights (`attention_dropout` > 0) torch's CPU kernel falls back to written-out math.

    One exception: bf16 training on the CPU runs the explicit path, in bf16, up to
    `_BF16_CPU_BACKWARD_MAX_KEYS` keys. There torch's flash backward is slow in bf16, and writing the
    weights out costs less than any kernel: forward + backward of one call took 3.8-53 ms against the
    bf16 kernel's 16-73 ms and the fp32 kernel's 5.9-96 ms (12 to 2,048 keys, Zen 5), and whole bf16
    steps ran 1.11× as fast, at the price of scores and weights rounded to bf16. Past that length the
    weights every call keeps for the backward pass take too much memory. Inference keeps the kernel: the
    explicit path is faster call for call but translated real text no faster. `is_causal` lets the kernel
    skip the blocks above the diagonal instead of reading a mask. The measurements behind each choice
    are in benchmarks/README.md ("Each speed change").
    """
    if (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and torch.is_grad_enabled()
        and q.requires_grad
        and k.size(-2) <= _BF16_CPU_BACKWARD_MAX_KEYS
    ):
        return scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)[0]
    if is_causal and mask is not None:  # torch takes one or the other
        mask, is_causal = _with_causal(mask, q.size(-2), k.size(-2), q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def _with_causal(mask: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """`mask` and the causal mask (q_len, k_len) of torch's `is_causal`, which aligns the first query with
    the first key."""
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
    return causal if mask is None else mask & causal


@dataclass
class KVCache:
    """Keys and values kept between decoding steps, for every decoder layer.

    Self-attention keys/values grow by one position per step and are written into buffers preallocated
    for `max_len` positions, so a step costs no copy of the prefix. The buffers are laid out per position,
    (rows, max_len, heads, d_k), as the projections give them, and attention reads them through a
    transposed view: a row's prefix is then one block of memory, which a step writes to and a beam's
    reorder copies as one piece instead of one per head (whole beam-4 searches ran 1.02-1.04× as fast as
    with per-head buffers; benchmarks/README.md). Cross-attention keys/values depend only
    on the source and are computed once, for each source (not for each of its beam's hypotheses).
    `reorder` follows the surviving hypotheses of a beam, and drops the sentences a search has finished.
    With `dtype` set, keys and values are kept in that dtype rather than the model's (a bf16 model's in
    fp32: see `transformer.precision.decoding_cache_dtype`), and attention runs in it.
    """

    max_len: int
    dtype: torch.dtype | None = None  # None: keys and values as the model computes them
    length: int = 0  # positions filled so far
    # layer -> self-attention's (keys, values), each (rows, max_len, heads, d_k)
    self_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # layer -> cross-attention's (keys, values), each (sources, heads, src_len, d_k)
    cross_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _spare: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)  # see `reorder`

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values (rows, heads, new, d_k) at positions [length, length + new) and
        return the whole prefix, (rows, heads, length + new, d_k) views of the buffers."""
        k, v = self._as_kept(k), self._as_kept(v)
        if layer not in self.self_kv:
            shape = (k.size(0), self.max_len, k.size(1), k.size(3))  # (rows, max_len, heads, d_k)
            self.self_kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        k_buf, v_buf = self.self_kv[layer]
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; step would reach {end}")
        k_buf[:, self.length : end] = k.transpose(1, 2)
        v_buf[:, self.length : end] = v.transpose(1, 2)
        return self.prefix(layer, end)

    def prefix(self, layer: int, end: int | None = None) -> tuple[Tensor, Tensor]:
        """A layer's self-attention keys and values at positions [0, end) (default: the `length` filled by
        the steps so far), (rows, heads, end, d_k) each: views of the buffers, as attention reads them."""
        k_buf, v_buf = self.self_kv[layer]
        end = self.length if end is None else end
        return k_buf[:, :end].transpose(1, 2), v_buf[:, :end].transpose(1, 2)

    def keep_cross(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a layer's cross-attention keys/values, computed once per search, and return them."""
        k, v = self._as_kept(k), self._as_kept(v)
        self.cross_kv[layer] = (k, v)  # (sources, heads, src_len, d_k)
        return k, v

    def _as_kept(self, t: Tensor) -> Tensor:
        return t if self.dtype is None else t.to(self.dtype)

    def advance(self, n: int = 1) -> None:
        """Called once per decoding step, after every layer has appended."""
        self.length += n

    @torch.no_grad()  # decoding state, not part of any graph
    def reorder(self, index: Tensor, sources: Tensor | None = None) -> None:
        """Keep batch rows `index` (beam search: the parents of the surviving hypotheses), each taken from
        a row of the same source. The cross-attention keys/values, cached once per source, stay as they
        are, unless `sources` names the sources that remain (the search dropped finished sentences, and
        `index` then holds the rows of those sources only).

        Only the filled prefix of the self-attention buffers is copied, in one of three ways:
        - a different number of rows: into new buffers (`_rows_of_prefix`);
        - on the CPU, where finding them costs no wait, when at most half of the rows take another row's
          prefix (beam search keeps most hypotheses in their parent's row, `search._parent_slots`): only
          those rows, in place;
        - otherwise every row, gathered straight into a second set of buffers that then takes the first
          one's place (a third of the time of gathering into a temporary and copying it back).
        """
        n, moved = self.length, _moved_rows(index)
        for layer, (k, v) in self.self_kv.items():
            if index.numel() != k.size(0):  # a different number of rows: new buffers, the prefix copied
                self.self_kv[layer] = (_rows_of_prefix(k, index, n), _rows_of_prefix(v, index, n))
                self._spare.pop(layer, None)
            elif moved is not None:
                for buffer in (k[:, :n], v[:, :n]):
                    buffer.index_copy_(0, moved, buffer.index_select(0, index[moved]))
            else:
                spare_k, spare_v = self._spare.pop(layer, None) or (torch.empty_like(k), torch.empty_like(v))
                torch.index_select(k[:, :n], 0, index, out=spare_k[:, :n])
                torch.index_select(v[:, :n], 0, index, out=spare_v[:, :n])
                self.self_kv[layer], self._spare[layer] = (spare_k, spare_v), (k, v)
        for layer, (k, v) in self.cross_kv.items():
            if sources is not None and sources.numel() < k.size(0):  # else all remain, in their order
                self.cross_kv[layer] = (k.index_select(0, sources), v.index_select(0, sources))


def _rows_of_prefix(buffer: Tensor, index: Tensor, n: int) -> Tensor:
    """A new buffer like `buffer` (rows, max_len, heads, d_k) with rows `index`, of which only the first n
    positions are copied (the rest is never read before it is written). Copying whole rows, most of them
    not yet filled, also made the kernel map fresh pages for them: the prefix copy takes a third of the
    time (benchmarks/README.md)."""
    out = buffer.new_empty(index.numel(), *buffer.shape[1:])
    torch.index_select(buffer[:, :n], 0, index, out=out[:, :n])
    return out


def _moved_rows(index: Tensor) -> Tensor | None:
    """The rows i with index[i] != i, if they are at most half of them and finding them needs no host
    sync (on the CPU); else None."""
    if index.device.type != "cpu":
        return None
    moved = (index != torch.arange(index.numel())).nonzero()[:, 0]
    return moved if 2 * moved.numel() <= index.numel() else None


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, …, head_h)·W_O, head_i = Attention(Q·W_Q_i, K·W_K_i, V·W_V_i).

    The h per-head projections are stored side by side in one (d_model, d_model) matrix per role, so all
    heads are projected by one matmul and then split: (batch, len, d_model) -> (batch, heads, len, d_k).
    In self-attention, where Q, K and V are projections of the same x, `fuse_qkv` stacks W_Q, W_K and W_V
    at call time and projects x once (one larger matmul, one read of x); the parameters stay the paper's
    three matrices, so checkpoints and the comparison with nn.MultiheadAttention do not change. By default
    (None) it is on for CUDA tensors only: on CPUs neither training steps nor cached decoding measured
    faster with it (0.94-1.05×, benchmarks/README.md), while a base training step in bf16 on an H200 ran
    1.11× as fast (benchmarks/gpu.py). True or False applies it everywhere or nowhere.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.fused = fused
        self.fuse_qkv: bool | None = None  # None: on CUDA only (the class docstring); the benchmarks set it

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_k).transpose(1, 2)  # (batch, heads, len, d_k)

    def _self_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x·W_Q, x·W_K, x·W_V, each (batch, len, d_model): one matmul with the stacked weights, or three."""
        fuse = x.device.type == "cuda" if self.fuse_qkv is None else self.fuse_qkv
        projections = (self.w_q, self.w_k, self.w_v)
        if not fuse or any(p._forward_hooks or p._forward_pre_hooks for p in projections):
            # (a hook is the projection's: the report's unscaled variant scales W_Q's output with one)
            return self.w_q(x), self.w_k(x), self.w_v(x)
        weight = torch.cat([self.w_q.weight, self.w_k.weight, self.w_v.weight])  # (3·d_model, d_model)
        bias = torch.cat([self.w_q.bias, self.w_k.bias, self.w_v.bias])
        return F.linear(x, weight, bias).chunk(3, dim=-1)  # views; _split_heads keeps them strided

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Self-attention when `memory` is None, else encoder–decoder attention: queries from `x`
        (rows, q_len, d_model), keys and values from `memory` (sources, k_len, d_model). `is_causal`
        (self-attention only) lets query i see keys 0 … i on top of `mask`.

        In encoder–decoder attention `rows` may be a multiple of `sources`: beam search's hypotheses, each
        source's `rows // sources` of them on consecutive rows. They all attend to the same keys and
        values, so their queries are set side by side as one source's query positions, and the keys and
        values are projected (and cached, and read) once per source instead of once per hypothesis.

        With a `cache`, self-attention appends this step's keys/values to the prefix, and cross-attention
        projects `memory` only on the first step. Returns (output, per-head weights or None).
        """
        rows, q_len, d_model = x.shape
        if memory is None:
            q, k, v = map(self._split_heads, self._self_projections(x))  # (rows, heads, len, d_k) each
            if cache is not None:
                k, v = cache.append(layer, k, v)  # (rows, heads, prefix_len, d_k)
        else:
            sources = memory.size(0)
            if is_causal:
                raise ValueError("is_causal applies to self-attention only")
            if rows % sources:
                raise ValueError(f"{rows} query rows cannot share the memory of {sources} sources")
            # (sources, heads, group·q_len, d_k): a source's hypotheses' queries side by side
            q = self._split_heads(self.w_q(x).view(sources, -1, d_model))
            if cache is not None and layer in cache.cross_kv:
                k, v = cache.cross_kv[layer]
            else:
                k, v = self._split_heads(self.w_k(memory)), self._split_heads(self.w_v(memory))
                if cache is not None:
                    k, v = cache.keep_cross(layer, k, v)
        dtype, q = q.dtype, q.to(k.dtype)  # a cache may keep keys and values wider (KVCache.dtype)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights or not self.fused:
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        else:
            out, weights = fused_attention(q, k, v, mask, dropout_p, is_causal), None
        # concatenate the heads, and give each hypothesis its own row again: (rows, q_len, d_model)
        out = out.transpose(1, 2).reshape(rows, q_len, d_model).to(dtype)  # back from a wider cache
        if weights is not None and weights.size(0) != rows:  # (sources, heads, group·q_len, k_len)
            k_len = weights.size(-1)
            weights = weights.view(weights.size(0), self.n_heads, -1, q_len, k_len).transpose(1, 2)
            weights = weights.reshape(rows, self.n_heads, q_len, k_len)
        return self.w_o(out), weights
