"""The recurrent baselines: what bidirectionality and attention guarantee, and one decoding interface."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transformer.config import RNNConfig, TrainConfig
from transformer.model import RNNSeq2Seq
from transformer.model.rnn import SourceAttention
from transformer.precision import MixedPrecision, has_native_bf16
from transformer.search import SearchConfig, beam_search, greedy_search
from transformer.train import train
from transformer.translate import Translator

PAD, BOS, EOS = 0, 2, 3
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
KINDS = [("rnn", "gru"), ("birnn", "gru"), ("rnn-attention", "gru"), ("rnn-attention", "lstm")]


def make(kind: str, cell: str = "gru", **changes) -> RNNSeq2Seq:
    torch.manual_seed(0)
    sizes = {"src_vocab_size": 40, "tgt_vocab_size": 40, "emb_dim": 16, "hidden_size": 24, "n_layers": 2}
    return RNNSeq2Seq(RNNConfig(kind=kind, cell=cell, dropout=0.0, **{**sizes, **changes})).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (4, 7), generator=g)
    src[1, 4:] = PAD
    src[3, 2:] = PAD
    return src, torch.randint(4, 40, (4, 5), generator=g)


def test_reversed_sequence_swaps_the_bidirectional_halves() -> None:
    # One layer, its backward direction tied to the forward one: then reversal swaps the halves exactly.
    # (A second layer reads [forward ; backward] through weights that are not symmetric in the two halves.)
    model = make("birnn", n_layers=1)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith("_reverse"):
                p.copy_(getattr(model.encoder, name.removesuffix("_reverse")))
    src, _ = batch()
    (states, _), mask = model.encode(src)
    hidden = model.config.hidden_size
    for row in range(src.size(0)):
        n = int(mask[row].sum())
        reversed_src = src[row : row + 1, :n].flip(1)
        (rev_states, _), _ = model.encode(reversed_src)
        for t in range(n):
            forward, backward = states[row, t, :hidden], states[row, t, hidden:]
            assert torch.allclose(rev_states[0, n - 1 - t, :hidden], backward, atol=1e-6)
            assert torch.allclose(rev_states[0, n - 1 - t, hidden:], forward, atol=1e-6)


@pytest.mark.parametrize("scoring", ["additive", "dot"])
def test_attention_sums_to_one_and_ignores_padding(scoring: str) -> None:
    model = make("rnn-attention", attention=scoring)
    src, tgt = batch()
    memory, mask = model.encode(src)
    record: list = []
    model.decode(tgt, memory, mask, record=record)
    weights = record[0]["cross"][:, 0]  # (batch, tgt_len, src_len)
    assert torch.allclose(weights.sum(-1), torch.ones(4, 5))
    assert torch.all(weights[1, :, 4:] == 0) and torch.all(weights[3, :, 2:] == 0)


@pytest.mark.parametrize("scoring", ["additive", "dot"])
def test_a_source_with_no_real_token_gets_zero_attention_and_finite_gradients(scoring: str) -> None:
    """Rows with a real key get exactly the masked softmax they got before; a row with none (0/0 = NaN)
    gets zero weights and a zero context, and no NaN reaches the gradients."""
    torch.manual_seed(0)
    attention = SourceAttention(6, 10, scoring)
    query = torch.randn(3, 6, requires_grad=True)
    states = torch.randn(3, 5, 10, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    keys = attention.project_keys(states)
    context, weights = attention(query, keys, states, mask)
    if scoring == "additive":
        scores = attention.v(torch.tanh(attention.w_query(query)[:, None] + keys)).squeeze(-1)
    else:
        scores = torch.einsum("bsq,bq->bs", keys, query)
    for row, n in ((0, 5), (1, 2)):
        expected = torch.softmax(scores[row, :n], -1)  # over the real keys only
        torch.testing.assert_close(weights[row, :n], expected, rtol=0, atol=1e-7)
        assert torch.all(weights[row, n:] == 0)
        torch.testing.assert_close(context[row], expected @ states[row, :n], rtol=0, atol=1e-6)
    masked = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)  # the formula before the fix
    assert torch.equal(weights[:2], masked[:2]) and masked[2].isnan().all()
    assert torch.all(weights[2] == 0) and torch.all(context[2] == 0)
    context.sum().backward()
    grads = [query.grad, states.grad, *(p.grad for p in attention.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("kind", "cell", "scoring"),
    [(kind, cell, "additive") for kind in ("rnn", "birnn", "rnn-attention") for cell in ("gru", "lstm")]
    + [("rnn-attention", "gru", "dot"), ("rnn-attention", "lstm", "dot")],
)
def test_a_fully_padded_source_is_finite_and_changes_no_other_row(kind: str, cell: str, scoring: str) -> None:
    """What `transformer doctor` checks (a batch of nothing but padding), inside a batch of real rows:
    finite logits and gradients, and the other rows' logits as without it."""
    model = make(kind, cell, attention=scoring)
    src, tgt = batch()
    empty = src.clone()
    empty[2] = PAD
    logits = model(empty, tgt)
    torch.testing.assert_close(logits[[0, 1, 3]], model(src[[0, 1, 3]], tgt[[0, 1, 3]]), rtol=0, atol=1e-6)
    assert torch.isfinite(logits).all() and torch.isfinite(model(torch.full_like(src, PAD), tgt)).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["rnn", "birnn", "rnn-attention"])
def test_an_lstm_trains_under_bf16_autocast(kind: str) -> None:
    """torch sends an fp32 LSTM to oneDNN and autocast casts that call to bf16, which oneDNN cannot run
    on a CPU without native bf16: there the LSTM runs in fp32 inside the bf16 model. Unpadded (oneDNN)
    and padded (packed) sources, against the fp32 model: the packed ones go to torch's own kernel, which
    autocast does not cast, and stay fp32 on every CPU."""
    model = make(kind, "lstm")
    src, tgt = batch()
    mixed = MixedPrecision("bf16")
    for source, packed in ((src, True), (src.clamp(min=4), False)):
        reference = model(source, tgt)
        with mixed.autocast():
            (states, _), _ = model.encode(source)
            logits = model(source, tgt)
        in_bf16 = has_native_bf16() and not packed
        assert states.dtype == (torch.bfloat16 if in_bf16 else torch.float32)
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05)
        model.zero_grad()
        mixed.backward(logits.float().square().mean())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize(("kind", "cell"), KINDS)
def test_padding_never_changes_outputs(kind: str, cell: str) -> None:
    model = make(kind, cell)
    src, tgt = batch()
    logits = model(src, tgt)
    for row, n in ((1, 4), (3, 2)):
        alone = model(src[row : row + 1, :n], tgt[row : row + 1])
        assert torch.allclose(alone, logits[row : row + 1], atol=1e-5)
        garbage = src.clone()
        garbage[row, n:] = 7  # real tokens where the padding was: only the padded copy is affected
        assert not torch.allclose(model(garbage, tgt)[row], logits[row])


@pytest.mark.parametrize(("kind", "cell"), KINDS)
def test_beam_one_is_greedy_and_cache_changes_nothing(kind: str, cell: str) -> None:
    model = make(kind, cell)
    src, _ = batch()
    greedy = greedy_search(model, src, config=SearchConfig(beam=1), max_len=64, **IDS)
    assert greedy == beam_search(model, src, config=SearchConfig(beam=1), max_len=64, **IDS)
    assert greedy == greedy_search(
        model, src, config=SearchConfig(beam=1, use_cache=False), max_len=64, **IDS
    )
    beam = beam_search(model, src, config=SearchConfig(beam=3), max_len=64, **IDS)
    assert beam == beam_search(model, src, config=SearchConfig(beam=3, use_cache=False), max_len=64, **IDS)


@pytest.mark.parametrize(("kind", "cell"), KINDS)
def test_dropping_finished_sentences_changes_nothing(kind: str, cell: str) -> None:
    """The recurrent models' memory is repeated for every hypothesis (`beam_memory`), the Transformer's is
    not: a search that drops finished sentences has to select either right. Length limits of 5 to 10
    steps make the sentences finish at different steps."""
    model = make(kind, cell)
    src, _ = batch()
    for beam in (1, 3):
        config = SearchConfig(beam=beam, extra_len=3)
        search = beam_search if beam > 1 else greedy_search
        dropping = search(model, src, config=config, max_len=64, **IDS)
        keeping = search(model, src, config=replace(config, drop_finished=False), max_len=64, **IDS)
        assert dropping == keeping
        assert len({len(h) for h in dropping}) > 1


def test_attention_keys_are_projected_once_per_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """W·h_j depends on the source only: the cache keeps it from the first step on, through the beam's
    reorderings and the dropping of finished sentences (which these length limits cause)."""
    model = make("rnn-attention")
    projected = []
    project = model.attention.project_keys
    monkeypatch.setattr(
        model.attention, "project_keys", lambda keys: projected.append(len(keys)) or project(keys)
    )
    src, _ = batch()
    for beam, search in ((1, greedy_search), (3, beam_search)):
        projected.clear()
        search(model, src, config=SearchConfig(beam=beam, extra_len=2), max_len=64, **IDS)
        # one projection, of each source's memory rows: beam search's first step decodes one row per
        # source, and the cache then repeats the keys for the beam's hypotheses
        assert projected == [src.size(0)]


def test_rnn_attention_trains_and_translates_through_the_pipeline(data_dir: Path, tmp_path: Path) -> None:
    recipe = TrainConfig(
        model="rnn-attention",
        data_dir=str(data_dir),
        vocab_size=400,
        max_tokens=600,
        warmup=10,
        lr_factor=2.0,
        max_steps=20,
        eval_every=10,
        time_budget_minutes=0.0,
        average_last=2,
        beam=2,
        log_every=5,
        seed=3,
    )
    # Shared embeddings and a tied output layer, as the parameter-matched comparison card trains them.
    train(recipe, {"emb_dim": 32, "hidden_size": 32, "share_embeddings": True, "tie_output": True}, tmp_path)
    losses = [
        r["loss"]
        for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "train"
    ]
    assert losses[-1] < losses[0]
    translator = Translator.from_checkpoint(tmp_path)
    assert isinstance(translator.model, RNNSeq2Seq)
    out = translator.translate(["Ein Mann.", ""], beam=2)
    assert len(out) == 2 and out[1] == "" and out[0] == translator.translate(["Ein Mann."], beam=2)[0]


def test_shared_and_tied_embeddings_are_one_tensor() -> None:
    tied = make("rnn-attention", share_embeddings=True, tie_output=True)
    untied = make("rnn-attention")
    assert tied.tgt_embed.weight is tied.src_embed.weight
    # One 40 x 16 embedding instead of two, and a readout to emb_dim instead of to the vocabulary.
    readout = 24 + 48 + 16
    saved = 40 * 16 + (readout * 40 + 40) - (readout * 16 + 16 + 40)
    assert untied.num_parameters() - tied.num_parameters() == saved
    src, tgt = batch()
    tied(src, tgt).sum().backward()
    grad = tied.src_embed.weight.grad
    assert grad is not None and grad[tgt.unique()].abs().sum() > 0
    unused = sorted(set(range(40)) - set(src.unique().tolist()) - set(tgt.unique().tolist()) - {PAD})
    assert grad[unused].abs().sum() > 0  # words in neither sentence still get gradient: through the logits


def _gru_step(x: torch.Tensor, h: torch.Tensor, gru: torch.nn.GRU, suffix: str = "") -> torch.Tensor:
    """One step of torch's GRU equations, written out (gates r, z, n in torch's order)."""
    gi = x @ getattr(gru, f"weight_ih_l0{suffix}").T + getattr(gru, f"bias_ih_l0{suffix}")
    gh = h @ getattr(gru, f"weight_hh_l0{suffix}").T + getattr(gru, f"bias_hh_l0{suffix}")
    (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _reference_logits(model: RNNSeq2Seq, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The model's documented wiring, one sentence and one step at a time from the GRU equations: the
    encoder over the real tokens only (forward, and backward from the last real token), the decoder started
    from tanh(bridge([forward final ; backward final])) or the final state, fed [previous word ; context] with
    the context the summary (`rnn`, `birnn`) or attention over the real states, and the readout
    out_proj([decoder state ; context ; previous word])."""
    c, hidden_size = model.config, model.config.hidden_size
    rows = []
    for s_ids, t_ids in zip(src, tgt, strict=True):
        x = model.src_embed.weight[s_ids[s_ids != PAD]]  # (n, emb)
        h, forward = torch.zeros(hidden_size, dtype=x.dtype), []
        for x_t in x:
            h = _gru_step(x_t, h, model.encoder)
            forward.append(h)
        states, summary = torch.stack(forward), forward[-1]
        if c.kind != "rnn":
            h, backward = torch.zeros(hidden_size, dtype=x.dtype), []
            for x_t in x.flip(0):
                h = _gru_step(x_t, h, model.encoder, "_reverse")
                backward.append(h)
            states = torch.cat([states, torch.stack(backward[::-1])], -1)  # (n, 2·hidden)
            summary = torch.cat([forward[-1], backward[-1]])
        h = torch.tanh(model.bridge(summary)) if model.bridge is not None else summary
        features = []
        for y in model.tgt_embed.weight[t_ids]:
            context = summary
            if c.kind == "rnn-attention":
                a = model.attention
                if c.attention == "additive":
                    scores = torch.tanh(h @ a.w_query.weight.T + states @ a.w_key.weight.T + a.w_key.bias)
                    scores = scores @ a.v.weight[0]
                else:
                    scores = (states @ a.w_key.weight.T) @ h
                context = torch.softmax(scores, 0) @ states
            h = _gru_step(torch.cat([y, context]), h, model.decoder)
            features.append(torch.cat([h, context, y]))
        rows.append(model.out_proj(torch.stack(features)))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("kind", "attention"),
    [("rnn", "additive"), ("birnn", "additive"), ("rnn-attention", "additive"), ("rnn-attention", "dot")],
)
def test_each_family_computes_its_equations(kind: str, attention: str) -> None:
    """Against an independent reference: the GRU equations and the families' wiring written out, in
    float64, on a batch with padded sources (packed by the model, cut by the reference)."""
    model = make(kind, n_layers=1, attention=attention).double()
    src, tgt = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), _reference_logits(model, src, tgt), rtol=0, atol=1e-10)
