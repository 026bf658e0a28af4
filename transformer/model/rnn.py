"""The recurrent systems the Transformer replaced, behind the same encode/decode interface.

- `rnn`: an RNN encoder–decoder (Cho et al. 2014; Sutskever et al. 2014). The whole source is squeezed into
  the encoder's final state, which starts the decoder and is fed to it again at every step.
- `birnn`: the same with a bidirectional encoder: each position is [forward h_t ; backward h_t], and the
  decoder starts from a projection of both final states.
- `rnn-attention`: a bidirectional encoder and a decoder that, at every step, attends over all encoder
  states (Bahdanau et al. 2015, additive scores; Luong et al. 2015 dot-product scores as an option).

Source padding never reaches the encoder's recurrence: padded batches are packed, so the final state is
that of the last real token (the decoder's target padding sits at the end, after every real position).
Like the Transformer, a model maps (src, tgt_in) to logits and decodes incrementally through a cache
(here the decoder's hidden state), reordered by index for beam search.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from transformer.config import RNNConfig
from transformer.model.attention import AttentionRecord, masked_softmax

Hidden = Tensor | tuple[Tensor, Tensor]  # (layers, batch, hidden); an LSTM's is the pair (h, c)


@dataclass
class RNNState:
    """The decoder's recurrent state between decoding steps: (layers, batch, hidden), plus the cell state
    for an LSTM; and the attention's projected keys, which depend on the source only."""

    hidden: Hidden | None = None
    keys: Tensor | None = None  # (batch, src_len, hidden): the scores' W·h_j, projected at the first step

    def reorder(self, index: Tensor, sources: Tensor | None = None) -> None:
        """Keep batch rows `index`. The keys are laid out like the memory they are projected from (by
        `beam_memory`: each source's states repeated for its hypotheses), which a beam's reordering leaves
        alone, since it only moves hypotheses within their source; when the search drops finished
        sentences (`sources` given), `index` holds the rows of those that remain, keys included."""
        if isinstance(self.hidden, tuple):
            self.hidden = tuple(h.index_select(1, index) for h in self.hidden)
        elif self.hidden is not None:
            self.hidden = self.hidden.index_select(1, index)
        if sources is not None and self.keys is not None:
            self.keys = self.keys.index_select(0, index)


@cache
def _onednn_lacks_bf16() -> bool:
    """Whether torch would send an LSTM to oneDNN, which cannot run it in bf16 on this CPU (`_recur`)."""
    return torch.backends.mkldnn.is_available() and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


class SourceAttention(nn.Module):
    """Attention of the decoder state s over the encoder states h_j: score(s, h_j) = vᵀ·tanh(W·s + U·h_j)
    (Bahdanau, `additive`), or s·(W·h_j) (Luong's "general", `dot`)."""

    def __init__(self, query_size: int, key_size: int, kind: str = "additive") -> None:
        super().__init__()
        self.kind = kind
        if kind == "additive":
            self.w_query = nn.Linear(query_size, query_size, bias=False)
            self.w_key = nn.Linear(key_size, query_size)
            self.v = nn.Linear(query_size, 1, bias=False)
        else:
            self.w_key = nn.Linear(key_size, query_size, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """Computed once per source: (batch, src_len, key_size) -> (batch, src_len, query_size)."""
        return self.w_key(keys)

    def forward(
        self, query: Tensor, projected_keys: Tensor, values: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """query (batch, query_size), mask (batch, src_len) True on real tokens -> context, weights.

        A fully padded source gets zero weights and a zero context (`masked_softmax`), not NaN, which
        one such row would otherwise spread to every parameter's gradient."""
        if self.kind == "additive":
            scores = self.v(torch.tanh(self.w_query(query)[:, None, :] + projected_keys)).squeeze(-1)
        else:
            scores = (projected_keys @ query[:, :, None]).squeeze(-1)  # (batch, src_len)
        weights = masked_softmax(scores, mask)  # (batch, src_len)
        return (weights[:, None, :] @ values).squeeze(1), weights  # (batch, key_size), (batch, src_len)


class _TiedOutput(nn.Module):
    """Logits as the inner product with the target embeddings, plus a per-word bias."""

    def __init__(self, embedding: nn.Embedding, vocab_size: int) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list, so the shared weight is registered once, by the embedding
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.embedding[0].weight, self.bias)


class RNNSeq2Seq(nn.Module):
    """`rnn`, `birnn` or `rnn-attention`, selected by `RNNConfig.kind`."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        c = self.config = config
        rnn = nn.GRU if c.cell == "gru" else nn.LSTM
        directions = self.directions = 1 if c.kind == "rnn" else 2  # of the encoder
        self.src_embed = nn.Embedding(c.src_vocab_size, c.emb_dim, padding_idx=c.pad_id)
        self.tgt_embed = (
            self.src_embed
            if c.share_embeddings
            else nn.Embedding(c.tgt_vocab_size, c.emb_dim, padding_idx=c.pad_id)
        )
        self.dropout = nn.Dropout(c.dropout)
        layer_dropout = c.dropout if c.n_layers > 1 else 0.0
        self.encoder = rnn(
            c.emb_dim,
            c.hidden_size,
            c.n_layers,
            batch_first=True,
            bidirectional=directions == 2,
            dropout=layer_dropout,
        )
        context_size = directions * c.hidden_size
        # The decoder starts from the encoder's summary; a bidirectional one is projected down to hidden_size.
        self.bridge = nn.Linear(context_size, c.hidden_size) if directions == 2 else None
        self.attention = (
            SourceAttention(c.hidden_size, context_size, c.attention) if c.kind == "rnn-attention" else None
        )
        self.decoder = rnn(
            c.emb_dim + context_size, c.hidden_size, c.n_layers, batch_first=True, dropout=layer_dropout
        )
        readout = c.hidden_size + context_size + c.emb_dim  # [decoder state ; context ; previous word]
        if c.tie_output:  # readout -> emb_dim, then the (transposed) target embedding gives the logits
            self.out_proj: nn.Module = nn.Sequential(
                nn.Linear(readout, c.emb_dim), _TiedOutput(self.tgt_embed, c.tgt_vocab_size)
            )
        else:
            self.out_proj = nn.Linear(readout, c.tgt_vocab_size)

    def encode(
        self, src: Tensor, record: AttentionRecord | None = None
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """src (batch, src_len) -> memory and the padding mask (batch, src_len). The memory is the pair
        (states (batch, src_len, dirs·hidden), summary (batch, dirs·hidden)). `record` is the interface's:
        the encoder has no attention to record."""
        mask = src != self.config.pad_id
        lengths = mask.sum(1).clamp(min=1).cpu()
        embedded = self.dropout(self.src_embed(src))  # (batch, src_len, emb)
        if bool((lengths == src.size(1)).all()):
            # No padding: skip packing, whose backward on CPU grows faster than linearly with the length
            # (4.2 s against 0.31 s for a GRU over 32 sequences of 1,025 tokens).
            states, final = self._recur(self.encoder, embedded)
        else:
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            states, final = self._recur(self.encoder, packed)
            states, _ = pad_packed_sequence(states, batch_first=True, total_length=src.size(1))
        final_h = final[0] if isinstance(final, tuple) else final  # (layers·dirs, batch, hidden)
        top = final_h.view(self.config.n_layers, self.directions, src.size(0), -1)[-1]  # (dirs, batch, hid)
        summary = torch.cat(list(top), dim=-1)  # (batch, dirs·hidden): [forward ; backward]
        return (states, summary), mask

    def _recur(
        self, rnn: nn.RNNBase, inputs: Tensor | PackedSequence, hidden: Hidden | None = None
    ) -> tuple[Tensor | PackedSequence, Hidden]:
        """`rnn(inputs, hidden)`; but an LSTM under CPU bf16 autocast, where oneDNN has no bf16, runs
        in fp32 with autocast off (the linears around it stay bf16).

        torch hands an fp32 LSTM on unpacked input to oneDNN, and autocast then casts that call
        (`mkldnn_rnn_layer`, on its CPU bf16 list) to bf16, which oneDNN cannot run on an AVX2 CPU: "could
        not create a primitive descriptor for the LSTM forward propagation primitive". bf16 weights are
        not affected (torch checks their dtype before choosing oneDNN, and falls back to its own kernel),
        nor packed input or GRUs (never sent to oneDNN). fp32 is what `auto` picks on such a CPU anyway,
        and it keeps the cell state, summed over every step, out of bf16; where oneDNN runs bf16, its bf16
        LSTM runs as before."""
        if not (
            self.config.cell == "lstm"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and _onednn_lacks_bf16()
        ):
            return rnn(inputs, hidden)
        if isinstance(hidden, tuple):
            hidden = (hidden[0].float(), hidden[1].float())  # the bridge's output is bf16 under autocast
        with torch.autocast("cpu", enabled=False):
            return rnn(inputs.float(), hidden)

    def beam_memory(
        self, memory: tuple[Tensor, Tensor], src_mask: Tensor, k: int
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """The memory for beam search's k hypotheses per source, on consecutive rows: each row repeated k
        times, since every hypothesis carries its own recurrent state and attends on its own."""
        states, summary = memory
        repeated = (states.repeat_interleave(k, 0), summary.repeat_interleave(k, 0))
        return repeated, src_mask.repeat_interleave(k, 0)

    def _initial_state(self, summary: Tensor) -> Hidden:
        h0 = torch.tanh(self.bridge(summary)) if self.bridge is not None else summary  # (batch, hidden)
        h0 = h0[None].expand(self.config.n_layers, -1, -1).contiguous()  # every layer starts from the summary
        return (h0, torch.zeros_like(h0)) if self.config.cell == "lstm" else h0

    def decode(
        self,
        tgt: Tensor,
        memory: tuple[Tensor, Tensor],
        src_mask: Tensor,
        cache: RNNState | None = None,
        record: AttentionRecord | None = None,
        *,
        project: bool = True,
    ) -> Tensor:
        """tgt (batch, tgt_len) -> logits (batch, tgt_len, vocab); with a cache, continue from its state.
        With `project=False`, the features `out_proj` maps to the logits."""
        states, summary = memory
        hidden = (
            cache.hidden if cache is not None and cache.hidden is not None else self._initial_state(summary)
        )
        embedded = self.dropout(self.tgt_embed(tgt))  # (batch, tgt_len, emb)
        if self.attention is None:
            # The context is the same at every step, so the recurrence runs over the whole sequence at once.
            context = summary[:, None, :].expand(-1, tgt.size(1), -1)
            outputs, hidden = self._recur(self.decoder, torch.cat([embedded, context], -1), hidden)
        else:
            keys = cache.keys if cache is not None else None
            if keys is None:  # the first step, or no cache
                keys = self.attention.project_keys(states)
                if cache is not None:
                    cache.keys = keys
            outputs_list, contexts, weights_list = [], [], []
            for t in range(tgt.size(1)):
                query = (hidden[0] if isinstance(hidden, tuple) else hidden)[-1]  # top layer, previous step
                ctx, weights = self.attention(query, keys, states, src_mask)
                step = torch.cat([embedded[:, t : t + 1], ctx[:, None]], -1)
                out, hidden = self._recur(self.decoder, step, hidden)
                outputs_list.append(out)
                contexts.append(ctx)
                weights_list.append(weights)
            outputs, context = torch.cat(outputs_list, 1), torch.stack(contexts, 1)
            if record is not None:
                # one "head": (batch, 1, tgt_len, src_len), the shape the Transformer's records have
                record.append({"cross": torch.stack(weights_list, 1)[:, None]})
        if cache is not None:
            cache.hidden = hidden
        features = self.dropout(torch.cat([outputs, context, embedded], -1))
        return self.out_proj(features) if project else features

    def forward(self, src: Tensor, tgt: Tensor, *, project: bool = True) -> Tensor:
        """Logits (batch, tgt_len, tgt_vocab); with `project=False` the features `out_proj` maps to them,
        as the Transformer's `forward` gives them (transformer.loss.projected_loss)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt, memory, src_mask, project=project)

    def new_cache(self, max_len: int | None = None) -> RNNState:
        """The decoding state; `max_len` is the search interface's, which a recurrent state, not growing
        with the length, does not need."""
        return RNNState()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
