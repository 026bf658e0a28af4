"""Smoke tests of the benchmark scripts' parts, at tiny sizes (the figures themselves live in RESULTS.md)."""

from __future__ import annotations

import dataclasses
import sys
import time

import pytest
import torch
from conftest import dev_dependency
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import (
    attention,
    common,
    corpus_size,
    decode,
    gpu,
    peers,
    scaling,
    serve_load,
    train_step,
    translation,
)
from transformer.config import TransformerConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.search import SearchConfig, search_name
from transformer.translate import Translator


def test_time_interleaved_runs_variants_in_turn() -> None:
    calls: list[str] = []
    times = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, 1)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order alternates round by round
    assert [len(t) for t in times.values()] == [2, 2] and all(t >= 0 for t in times["a"])


def test_paired_speedup_takes_the_median_of_per_round_ratios() -> None:
    # Round 3 was slow for both (machine load): the per-round ratios are 2, 2 and 1.25.
    assert common.paired_speedup([1.0, 2.0, 8.0], [2.0, 4.0, 10.0]) == 2.0
    assert common.paired_speedup([3.0], [1.0]) == pytest.approx(1 / 3, abs=1e-3)


def test_peak_rss_growth_sees_a_large_allocation() -> None:
    grown = common.peak_rss_growth_mb(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MB, touched
    assert grown["growth_mb"] > 40


def test_time_by_kind_tells_products_from_everything_else() -> None:
    a = torch.randn(512, 512)
    products = common.time_by_kind(lambda: [a @ a for _ in range(20)])
    assert products["products"] > 0.5 * products["seconds"]  # 20 products of 0.27 GFLOP: nearly all of it
    assert products["attention"] == 0.0
    parts = products["products"] + products["attention"] + products["other"] + products["outside ops"]
    assert parts == pytest.approx(products["seconds"], rel=0.05)
    python = common.time_by_kind(lambda: time.sleep(0.05), calls=1)  # no operator at all
    assert python["outside ops"] >= 0.045 and python["products"] == python["other"] == 0.0
    q = torch.randn(1, 2, 8, 4)
    attention = common.time_by_kind(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert attention["attention"] > 0 and attention["products"] == 0.0


def test_decode_searches_run_on_the_device_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode.py's searches, built for a device (here the CPU), return what their search returns once the
    device is done; --profile, a CPU profiler's split, is refused for a GPU in one argparse line."""
    waited = []
    monkeypatch.setattr(common, "synchronize", lambda device: waited.append(device.type))
    runs = decode.searches("small", 2, 5, 3, [1], False, False, torch.device("cpu"))
    assert "ours greedy, cached" in runs and "ours greedy, uncached" in runs
    assert runs["ours greedy, cached"]() is None and waited == ["cpu"]  # timed to the device's end
    monkeypatch.setattr(sys, "argv", ["benchmarks/decode.py", "--device", "cuda", "--profile"])
    monkeypatch.setattr(common, "run_as_the_cli_does", lambda: None)
    with pytest.raises(SystemExit) as exited:
        decode.main()
    assert exited.value.code == 2


def test_decode_profile_bounds_ours_by_our_products() -> None:
    """`--profile`: profiled calls of ours and of the peer; the bound is the peer's median over the time of
    our products and attention (stand-ins here: a product and an attention for ours, a sleep for the peer)."""
    a, q = torch.randn(256, 256), torch.randn(4, 4, 64, 64)
    runs = {
        "ours greedy, cached": lambda: (a @ a, torch.nn.functional.scaled_dot_product_attention(q, q, q)),
        "Marian greedy": lambda: time.sleep(0.01),
    }
    times = {"ours greedy, cached": [0.001], "Marian greedy": [0.5, 0.6, 1.0]}  # median 0.6
    profile = decode._profile(runs, times, beams=[1, 4])  # no beam-4 searches: skipped
    assert set(profile) == {"ours greedy, cached", "Marian greedy"}
    ours = profile["ours greedy, cached"]
    assert ours["products"] > 0 and ours["attention"] > 0
    assert ours["bound"] == pytest.approx(0.6 / (ours["products"] + ours["attention"]), rel=0.02)
    assert "bound" not in profile["Marian greedy"]
    table = decode._profile_markdown("small", profile)
    assert "| search | seconds | products | attention | other | outside ops | bound |" in table


def test_decoding_markdown_tables_rows_and_bolds_only_speedups() -> None:
    rows = {"greedy, ours": common.decoding_row([0.5, 0.25], sentences=10, tokens=40)}
    ratios = {"greedy, ours vs peer": 1.25, "greedy: translations equal": "9 of 10"}
    text = common.decoding_markdown(rows, ratios)
    table, lines = text.split("\n\n")
    assert table.splitlines()[0] == "| search | seconds | all_s | sentences_per_s | tokens_per_s |"
    assert table.splitlines()[2].startswith("| greedy, ours | 0.375 |")
    assert lines.splitlines() == [
        "- greedy, ours vs peer: **1.25×**",
        "- greedy: translations equal: 9 of 10",
    ]
    assert [search_name(b) for b in (1, 4)] == ["greedy", "beam 4"]


def test_time_translations_warms_up_once_and_counts_each_eos() -> None:
    calls = []
    runs = {
        "a": lambda: calls.append("a") or time.sleep(0.002) or [[5, 6], [7]],
        "b": lambda: calls.append("b") or time.sleep(0.002) or [[], [8, 9, 10]],
    }
    outputs, times, rows = common.time_translations(runs, repeats=2)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # the warm-up, then rounds in turn, reversed every other
    assert outputs == {"a": [[5, 6], [7]], "b": [[], [8, 9, 10]]}
    assert [len(ts) for ts in times.values()] == [2, 2]
    a, b = (common.median(times[label]) for label in ("a", "b"))
    assert rows["a"]["tokens_per_s"] == round((3 + 2) / a)  # two sentences: 3 tokens and 2 EOS
    assert rows["b"]["tokens_per_s"] == round((3 + 2) / b) and rows["b"]["sentences_per_s"] == round(2 / b, 1)


def test_speedups_print_with_the_range_of_their_rounds() -> None:
    fast, slow = [1.0, 2.0, 8.0], [2.0, 4.0, 10.0]  # per-round ratios 2, 2, 1.25
    assert common.speedup_range(fast, slow) == (1.25, 2.0)
    assert common.with_range(2.0, (1.25, 2.0)) == "2.0 (1.25–2.0)"
    rows = {"a": common.decoding_row(fast, 2, 4), "b": common.decoding_row(slow, 2, 4)}
    text = common.decoding_markdown(rows, {"a vs b": 2.0, "equal": "2 of 2"}, {"a vs b": (1.25, 2.0)})
    assert "- a vs b: **2.0×** (rounds 1.25–2.0×)" in text and "- equal: 2 of 2" in text


def test_peak_memory_growth_is_the_functions_not_an_earlier_peak() -> None:
    """A peak reached before the measured call (here a 200 MB buffer, freed) is not counted in its growth."""
    buffer = torch.ones(50 * 2**20)  # 200 MB, touched
    del buffer
    growth = common.peak_rss_growth_mb(lambda: torch.ones(2**20))["growth_mb"]  # 4 MB
    assert growth < 100


def test_update_results_replaces_only_its_section(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    machine = common.machine_info()
    common.update_results("A", "cmd a", "first", machine)
    common.update_results("B", "cmd b", common.markdown_table([{"x": 1, "y": 2}]), machine)
    common.update_results("A", "cmd a", "second", machine)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "second" in text and "first" not in text and "| x | y |\n|---|---|\n| 1 | 2 |" in text
    assert text.index("## A") < text.index("## B") and text.count("## A") == 1


def test_each_kind_of_machine_keeps_its_own_section(tmp_path, monkeypatch, capsys) -> None:
    """`report` titles a section with the processor (or the GPU it is given): a run on one machine replaces
    that machine's figures only."""
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(sys, "argv", ["benchmarks/decode.py", "--variants", "ours, fused QKV"])
    machine = common.machine_info()
    for cpu, figure in (("CPU one", "1"), ("CPU two", "2"), ("CPU one", "3")):
        common.report("Decoding: small", {"machine": {**machine, "cpu": cpu}}, figure)
    common.report("Decoding: small", {"machine": machine}, "4", device="Some GPU")
    capsys.readouterr()
    text = (tmp_path / "RESULTS.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [f"## Decoding: small — {name}" for name in ("CPU one", "CPU two", "Some GPU")]
    assert "\n3\n" in text and "\n1\n" not in text
    assert "`python benchmarks/decode.py --variants 'ours, fused QKV'`" in text  # quoted as a shell takes it


def test_step_flops_matches_torch_flop_counter() -> None:
    """Our matmul count against torch's own, for one forward pass of the small model (explicit attention:
    the counter does not see inside torch's fused CPU attention kernel)."""
    c = dataclasses.replace(peers.config_for("small"), attention="explicit")
    model = peers.ours(c).eval()
    src, tgt = peers.random_batch(2, 6, 5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(src, tgt[:, :-1])
    expected = peers.step_flops(c, 2, src.size(1), tgt.size(1) - 1, backward=False)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def test_training_variants_take_a_step() -> None:
    batches = [peers.random_batch(2, 5, 4)]
    rows, _ = train_step.measure("small", ["ours", "nn.Transformer"], batches, repeats=1, memory=False)
    assert set(rows) == {"ours", "nn.Transformer"} and all(r["s_per_step"] > 0 for r in rows.values())
    src, tgt = batches[0]
    tgt[1, 3:] = PAD_ID  # the second target two tokens shorter (tgt holds BOS, 4 tokens)
    assert train_step.target_tokens([(src, tgt)] * 2) == 2 * (4 + 2)


def test_our_training_step_and_the_peers_compute_the_same_gradients_on_a_padded_batch() -> None:
    """Ours (projected loss, fused Adam) and the same weights through the peers' path (full logits,
    for-loop Adam): the gradients the step leaves behind agree, padding ignored by both."""
    c = TransformerConfig(
        src_vocab_size=40, tgt_vocab_size=40, d_model=16, n_heads=2, d_ff=32,
        n_encoder_layers=1, n_decoder_layers=1, dropout=0.0, max_len=32,
    )  # fmt: skip
    src, tgt = peers.random_batch(3, 6, 5)
    src, tgt = src.clamp(max=39), tgt.clamp(max=39)
    tgt[0, 4:] = PAD_ID  # a shorter target
    models = [peers.ours(c), peers.ours(c)]
    models[1].load_state_dict(models[0].state_dict())
    peers.training_step(models[0], [(src, tgt)], fused_adam=True, projected=True)()
    peers.training_step(models[1], [(src, tgt)])()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_torch_peer_is_our_model_in_nn_transformer() -> None:
    """The nn.Transformer peer, our weights copied in: the same logits in eval mode, so the benchmark
    compares implementations of one model (its extra final LayerNorms would change them)."""
    from test_model import copy_block, randomise

    c = TransformerConfig.preset(
        "small",
        src_vocab_size=50,
        tgt_vocab_size=50,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_encoder_layers=2,
        n_decoder_layers=2,
        max_len=32,
    )  # fmt: skip  (the benchmarks' sharing: one embedding for source, target and output)
    torch.manual_seed(0)
    ours, peer = peers.ours(c).eval(), peers.TorchPeer(c).eval()
    randomise(ours)  # LayerNorms not at 1 and 0, so that an extra final one would show
    for ours_stack, peer_stack in ((ours.encoder, peer.core.encoder), (ours.decoder, peer.core.decoder)):
        for block, ref_block in zip(ours_stack.layers, peer_stack.layers, strict=True):
            copy_block(block, ref_block)
    with torch.no_grad():
        peer.embed.weight.copy_(ours.src_embed.weight)
    src, tgt = peers.random_batch(3, 6, 5)
    src, tgt = src.clamp(max=49), tgt.clamp(max=49)
    src[0, 4:] = PAD_ID
    with torch.no_grad():
        torch.testing.assert_close(peer(src, tgt), ours(src, tgt), rtol=1e-4, atol=1e-5)
    assert peer.dropout.p == c.dropout > 0  # and dropout on the embeddings in training, as ours
    # In training too: dropout on the sublayers' outputs, but not on attention weights or the
    # feed-forward's hidden units, which ours leaves at 0 (and which would send the peer's attention to
    # torch's slower math path)
    for layer in [*peer.core.encoder.layers, *peer.core.decoder.layers]:
        attentions = [layer.self_attn, getattr(layer, "multihead_attn", layer.self_attn)]
        assert [a.dropout for a in attentions] == [c.attention_dropout] * 2 and c.attention_dropout == 0.0
        assert layer.dropout.p == c.activation_dropout == 0.0 and layer.dropout1.p == c.dropout


def test_marian_matches_our_configuration() -> None:
    dev_dependency("transformers")
    c = TransformerConfig.preset("small", src_vocab_size=300, tgt_vocab_size=300, max_len=64)
    marian = peers.marian(c)
    trainable = sum(p.numel() for p in marian.parameters() if p.requires_grad)
    assert trainable == peers.ours(c).num_parameters()  # same layers and sizes, the same tying
    src, _ = peers.random_batch(3, 4, 1)
    out = decode.marian_search(marian.eval(), src.clamp(max=299), beam=2, new_tokens=6)()
    assert out.shape == (3, 1 + 6)  # decoder start + exactly the forced number of tokens


def test_our_search_generates_the_requested_steps() -> None:
    model = peers.ours(peers.config_for("small")).eval()
    src, _ = peers.random_batch(3, 5, 1)
    cached = decode.our_search(model, src, beam=1, new_tokens=4, cached=True)()
    assert cached == decode.our_search(model, src, beam=1, new_tokens=4, cached=False)()
    assert all(len(ids) <= 3 for ids in cached)  # 4 steps, the last one a forced EOS


def test_translation_benchmark_translates_a_split_three_ways(run_dir, monkeypatch) -> None:
    """Real sentences through a trained (tiny) run: our search dropping and keeping finished sentences, and
    MarianMTModel running the same weights."""
    monkeypatch.chdir(run_dir.parent)  # the run's data_dir is absolute; nothing relative may matter
    measured = translation.measure(
        str(run_dir), None, "fp32", [1, 2], repeats=1, limit=12, marian_budgets=[100]
    )
    assert measured["split"] == "test2016" and measured["sentences"] == 12
    ways = ("dropping finished", "keeping finished", "MarianMTModel", "MarianMTModel, 100-token batches")
    assert set(measured["rows"]) == {f"{kind}, {way}" for kind in ("greedy", "beam 2") for way in ways}
    assert "greedy, keeping finished vs MarianMTModel" in measured["ratios"]  # the same search as Marian's
    assert set(measured["ratio_ranges"]) <= set(measured["ratios"])
    assert measured["ratios"]["greedy: translations equal, keeping finished"] == "12 of 12"
    assert measured["ratios"]["beam 2: translations equal, keeping finished"] == "12 of 12"
    assert all(row["sentences_per_s"] > 0 for row in measured["rows"].values())


def test_translation_benchmark_draws_as_ours_and_as_marians_generate(run_dir, monkeypatch) -> None:
    """--sampling: each of the three settings drawn by our search and by generate(do_sample=True), and
    set against greedy search and against Marian's."""
    monkeypatch.chdir(run_dir.parent)
    measured = translation.measure(str(run_dir), None, "fp32", [1], 1, limit=8, sampling=True)
    for name in translation.SAMPLINGS:
        assert {name, f"{name}, MarianMTModel"} <= set(measured["rows"])
        assert {f"{name} vs greedy, dropping finished", f"{name} vs {name}, MarianMTModel"} <= set(
            measured["ratios"]
        )


def test_ctranslate2_benchmark_runs_the_exported_checkpoint_on_our_batches(run_dir, monkeypatch) -> None:
    """The checkpoint exported and converted: CTranslate2 translates the split as our greedy search does
    (same weights, same batches), and every search gets a row."""
    dev_dependency("ctranslate2")
    from benchmarks import ctranslate2_export

    threads = torch.get_num_threads()
    monkeypatch.chdir(run_dir.parent)
    try:
        measured = ctranslate2_export.measure(str(run_dir), None, [1, 2], ["float32"], 1, threads, limit=8)
    finally:
        torch.set_num_threads(threads)  # CTranslate2 sets OpenMP's count, which torch shares
    assert measured["split"] == "test2016" and measured["sentences"] == 8
    kinds = ("ours", "CTranslate2 float32")
    assert set(measured["rows"]) == {f"{beam}, {kind}" for beam in ("greedy", "beam 2") for kind in kinds}
    assert measured["ratios"]["greedy: translations equal, CTranslate2 float32"] == "8 of 8"
    assert all(row["sentences_per_s"] > 0 for row in measured["rows"].values())


def test_the_marian_twin_decodes_greedily_as_we_do(run_dir) -> None:
    """Same weights, same greedy choices. This barely trained model runs into the length limits, which are
    per sentence in ours and per batch in generate: compared up to ours' length (EOS included)."""
    translator = Translator.from_checkpoint(run_dir)
    sentences = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Kinder am Strand."]
    sources = [translator.tokenizer.encode(s) for s in sentences]
    runs = translation.searches(translator, sources, [1], translation.marian_twin(translator.model))
    ours, theirs = runs["greedy, dropping finished"](), runs["greedy, MarianMTModel"]()
    limits = [len(ids) + 1 + SearchConfig().extra_len for ids in sources]  # EOS counts in a source
    for mine, other, limit in zip(ours, theirs, limits, strict=True):
        assert other[: len(mine)] == mine
        assert len(mine) == len(other) or len(mine) == limit - 1  # ours stopped at its own limit


def test_scaling_runs_every_model_at_a_length_and_reports_memory() -> None:
    train = scaling.runs_for("train", 8, batch=1, new_tokens=2)
    assert set(train) == {"ours", "nn.Transformer", "MarianMTModel"}
    for step in train.values():
        step()
    decode = scaling.runs_for("decode", 8, batch=1, new_tokens=3)
    ours, marian = decode["ours"](), decode["MarianMTModel"]()
    assert [len(ids) for ids in ours] == [2]  # three steps: two tokens and the EOS the limit forces
    assert marian.shape == (1, 1 + 3)  # BOS and three steps' tokens
    assert scaling.memory_point("decode", 8, "ours", batch=1, new_tokens=2)["growth_mb"] >= 0


@pytest.mark.parametrize(
    "shape",
    [
        attention.Shape(keys=7, queries=7, rows=11, heads=2, d_k=16),
        attention.Shape(keys=40, queries=40, rows=2, heads=2, d_k=16),
        attention.Shape(keys=9, queries=1, rows=6, heads=2, d_k=16, inference=True),
    ],
)
def test_attention_benchmark_variants_compute_the_same_attention(shape: attention.Shape) -> None:
    outputs = {name: attention.attention_call(name, shape)().float() for name in attention.VARIANTS}
    reference = outputs.pop("fp32 explicit")
    assert reference.shape == (shape.rows, shape.heads, shape.queries, shape.d_k)
    for name, out in outputs.items():
        tolerance = 1e-5 if name.startswith("fp32") else 3e-2  # bf16 inputs and outputs
        torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance, msg=name)


def test_wmt14_extrapolation_gives_the_papers_hours_at_its_rate() -> None:
    # the paper: 100k steps of ~25k target tokens in 12 hours on 8 P100s, 0.4 s a step: 62,500 tokens/s
    assert gpu.extrapolate(25_000 / 0.4) == {"one_gpu_hours": 11.1, "eight_gpus_hours_perfect_scaling": 1.39}


def test_gpu_benchmark_runs_dry_on_the_cpu() -> None:
    """The GPU script's whole path except the CUDA calls: a tiny bf16 step on the CPU, the peers' too."""
    measured = gpu.measure(
        "small",
        torch.device("cpu"),
        (4, 5, 6),
        repeats=1,
        variants=["ours", *gpu.PEERS],
        peak_n=64,
        vocab=peers.VOCAB,
        warmup=0,
    )
    rows = measured["variants"]
    assert list(rows) == ["ours", "nn.Transformer", "MarianMTModel"]
    for peer in ("nn.Transformer", "MarianMTModel"):  # how much longer the peer's step took than ours
        ratio = rows[peer]["s_per_step"] / rows["ours"]["s_per_step"]  # one round: the round's own ratio,
        assert rows[peer]["ours_speedup"] == pytest.approx(ratio, rel=0.05)  # from times rounded to 0.1 ms
    assert "ours_speedup" not in rows["ours"]
    row = rows["ours"]
    assert measured["batch"] == {"sentences": 4, "source_tokens": 6, "target_tokens": 6}
    # The row's figures are rounded (tokens/s to units, GFLOP/s to tenths, the fraction to thousandths),
    # which on a CPU without bf16 instructions, where even this tiny step is slow, is more than 1 %: each
    # comparison allows its rounding as well.
    tokens_per_s = 4 * 6 / row["s_per_step"]
    assert row["tgt_tokens_per_s"] == pytest.approx(tokens_per_s, rel=0.01, abs=0.5)
    peak, gflops = measured["bf16_matmul_peak_gflops"], row["gflops"]
    rounding = 0.0005 + 0.05 / peak * (1 + gflops / peak)  # the fraction's, and gflops' and peak's ±0.05
    assert row["fraction_of_bf16_peak"] == pytest.approx(gflops / peak, rel=0.01, abs=rounding)
    hours = gpu.extrapolate(tokens_per_s)["one_gpu_hours"]
    assert row["wmt14_base"]["one_gpu_hours"] == pytest.approx(hours, rel=0.01)
    assert row["peak_memory_mb"] is None  # measured on CUDA only


def test_kernel_seconds_sorts_a_traces_kernels_by_kind_and_counts_overlaps_once() -> None:
    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}  # microseconds, as in the trace

    events = [
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 0, 100),
        kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 100, 20),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 110, 50),  # overlaps 10
        kernel("void at::native::vectorized_elementwise_kernel<4, AddFunctor>", 300, 30),
        kernel("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", 400, 40),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host side: not a kernel
    ]
    spent = gpu.kernel_seconds(events)
    assert spent["products"] == pytest.approx(150e-6) and spent["attention"] == pytest.approx(20e-6)
    assert spent["other"] == pytest.approx(30e-6) and spent["optimiser"] == pytest.approx(40e-6)
    assert spent["busy"] == pytest.approx(230e-6)  # 0-160, 300-330, 400-440
    assert spent["kernels"] == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_benchmark_says_in_one_line_that_there_is_no_gpu(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["benchmarks/gpu.py"])
    with pytest.raises(SystemExit) as exited:
        gpu.main()
    assert "no CUDA device" in str(exited.value)


def test_corpus_batches_are_the_trainers_padded_multi30k_batches() -> None:
    """Real Multi30k pairs through a freshly trained tokenizer and the trainer's token-budget batching."""
    batches = peers.corpus_batches(3, max_tokens=600)
    assert len(batches) == 3
    for src, tgt in batches:
        assert src.size(0) == tgt.size(0) and src.size(0) * max(src.size(1), tgt.size(1) - 1) <= 600
        assert (tgt[:, 0] == BOS_ID).all() and int(tgt.max()) < peers.VOCAB
        lengths = (tgt != PAD_ID).sum(1)  # BOS … EOS of each row, then padding
        assert (tgt[torch.arange(tgt.size(0)), lengths - 1] == EOS_ID).all()
    assert any((src == PAD_ID).any() for src, _ in batches)  # real lengths differ within a batch
    assert train_step.target_tokens(batches) == sum(int((t != PAD_ID).sum()) - t.size(0) for _, t in batches)


def test_benchmarks_rerun_themselves_under_the_clis_allocator_setting(monkeypatch) -> None:
    """A script re-executes itself (its own path and arguments) with GLIBC_TUNABLES, as `transformer`
    does, unless the setting is already there or opted out."""
    import sys

    from transformer import runtime

    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.39"))
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["benchmarks/decode.py", "--configs", "small"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("TRANSFORMER_KEEP_ALLOCATOR", raising=False)
    common.run_as_the_cli_does()
    ((argv, env),) = calls
    assert argv[1:] == ["benchmarks/decode.py", "--configs", "small"]
    assert env["GLIBC_TUNABLES"] == runtime.ALLOCATOR_TUNABLES and env["TRANSFORMER_KEEP_ALLOCATOR"] == "1"
    monkeypatch.setenv("TRANSFORMER_KEEP_ALLOCATOR", "1")
    common.run_as_the_cli_does()
    assert len(calls) == 1


def test_the_fp32_peak_is_the_faster_of_mkl_and_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """On AMD CPUs MKL runs AVX2 code at half oneDNN's fp32 rate: a peak from `mm` alone would put our
    oneDNN products above 1.0 of it. oneDNN is timed for fp32 only (bf16's `mm` is oneDNN already)."""
    calls: list[torch.dtype] = []

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.dtype)
        return a @ b.T

    monkeypatch.setattr(common, "onednn_available", lambda: True)
    monkeypatch.setattr(common, "onednn_linear", product)
    peak = common.matmul_peak_gflops(torch.float32, n=64, repeats=3)
    assert peak > 0 and calls == [torch.float32] * 4  # warm-up and three rounds
    calls.clear()
    assert common.matmul_peak_gflops(torch.bfloat16, n=64, repeats=3) > 0 and calls == []
    # The faster kernel sets the peak: one that sleeps 50 ms a call cannot.
    monkeypatch.setattr(common, "onednn_linear", lambda a, b: time.sleep(0.05) or a @ b.T)
    assert common.matmul_peak_gflops(torch.float32, n=64, repeats=3) > 2 * 64**3 / 0.05 / 1e9


def test_serve_load_takes_turns_on_both_servers(run_dir) -> None:
    """Both servers (batched, one request per call) answer every request in every round; the summary has
    each one's percentiles and the batched server's speed-up with its range."""
    dev_dependency("httpx")
    translator = Translator.from_checkpoint(run_dir)
    reports = serve_load.measure(translator, ["ein Hund", "zwei Katzen"], 4, 2, beam=1, repeats=2)
    assert {name: len(rounds) for name, rounds in reports.items()} == dict.fromkeys(serve_load.SERVERS, 2)
    assert all(r.requests == 4 and r.errors == 0 for rounds in reports.values() for r in rounds)
    summary = serve_load.summarise(reports)
    assert summary["batched_speedup"] > 0 and len(summary["batched_speedup_range"]) == 2
    assert all(row["p50_ms"] <= row["p99_ms"] for row in summary["rows"].values())


def test_a_variant_that_fails_leaves_a_line_and_the_others_their_figures(monkeypatch) -> None:
    def broken(config):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setitem(gpu.VARIANTS, "broken", peers.Variant(broken))
    measured = gpu.measure(
        "small", torch.device("cpu"), (2, 3, 3), 1, ["broken", "ours"], peak_n=64, vocab=peers.VOCAB, warmup=0
    )
    rows = measured["variants"]
    assert list(rows) == ["broken", "ours"]  # in the order asked for
    assert rows["broken"] == {"error": "RuntimeError: no kernel for this GPU"}
    assert rows["ours"]["s_per_step"] > 0 and "ours_speedup" not in rows["broken"]
    lines = gpu.render("small", measured).splitlines()
    header, broken_line, ours_line = (
        next(line for line in lines if line.startswith(f"| {first} |"))
        for first in ("model", "broken", "ours")
    )
    assert header.count("|") == broken_line.count("|") == ours_line.count("|") == 10  # every column
    assert "| RuntimeError: no kernel for this GPU |" in broken_line


def test_ours_without_cudnn_attention_is_one_more_decoding_ratio() -> None:
    """On a GPU decode.py also times ours with the attention kernels training uses (no cuDNN): the
    kernels are limited inside the call only, and the ratio is reported beside the others."""
    seen = []
    call = peers.with_attention_kernels(
        lambda: seen.append(torch.backends.cuda.cudnn_sdp_enabled()), peers.OURS_SDPA
    )
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)  # as torch starts
    try:
        call()
        assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    times = {"ours greedy, cached": [1.0, 1.2], "ours greedy, cached, no cuDNN attention": [2.0, 2.4]}
    ratios, _ = decode._ratios(times, [1])
    assert ratios == {"ours greedy cached vs cached, no cuDNN attention": 2.0}


def test_a_variant_of_several_steps_per_wait_reports_seconds_per_step(monkeypatch) -> None:
    """`ours, 4 steps per wait` takes four steps a call, and its row is per step like the others'."""
    taken = {}

    def fake_training_step(model, batches, **_):
        key = len(taken)
        taken[key] = 0

        def step() -> None:
            taken[key] += 1
            time.sleep(0.004)

        return step

    monkeypatch.setattr(peers, "training_step", fake_training_step)
    names = ["ours", "ours, 4 steps per wait"]
    measured = gpu.measure("small", torch.device("cpu"), (2, 3, 3), 3, names, peak_n=64, vocab=64, warmup=1)
    assert taken == {0: 1 + 3, 1: 4 * (1 + 3)}  # warm-up, then three timed rounds
    for name in names:
        assert measured["variants"][name]["s_per_step"] == pytest.approx(0.004, rel=0.5)


def test_the_cuda_graphs_variant_compiles_in_reduce_overhead_mode_and_marks_each_step(monkeypatch) -> None:
    """`ours, torch.compile, CUDA graphs` asks torch.compile for CUDA graphs, and tells them that each
    step, also each of several per call, begins a new iteration. (Compiling itself is left out here: on
    the CPU inductor builds C++ for a minute or more, and CUDA graphs need a GPU.)"""
    modes, marks = [], []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    batch = peers.random_batch(2, 3, 3)
    config = peers.config_for("small")
    graphs = gpu.VARIANTS["ours, torch.compile, CUDA graphs"]
    step = graphs.step(config, [batch], torch.device("cpu"))
    step()
    step()
    assert modes == ["reduce-overhead"] and len(marks) == 2
    step = dataclasses.replace(graphs, steps_per_call=3).step(config, [batch], torch.device("cpu"))
    step()
    assert len(marks) == 5
    gpu.VARIANTS["ours, torch.compile"].step(config, [batch], torch.device("cpu"))()
    assert modes[-1] is None and len(marks) == 5  # plain compile: torch's default mode, no marks


def test_corpus_size_benchmark_watches_a_real_training_run(tmp_path) -> None:
    """The synthetic corpus is Multi30k's pairs joined in twos, and the watched run is `transformer train`
    itself: its memory read while it runs, its first logged step timed."""
    data = tmp_path / "data"
    data.mkdir()
    corpus_size.write_corpus(data, pairs=300, valid_pairs=20)
    de, en = (data / "train.de").read_text().splitlines(), (data / "train.en").read_text().splitlines()
    assert len(de) == len(en) == 300 and len((data / "val.en").read_text().splitlines()) == 20
    assert ". " in de[0] and ". " in en[0]  # two sentences a line
    tiny = ["vocab_size=400", "max_tokens=600", "d_model=32", "n_heads=2", "d_ff=64", "n_encoder_layers=1"]
    measured = corpus_size.watch(
        corpus_size.train_command(data, tmp_path / "run", 10, [*tiny, "n_decoder_layers=1"])
    )
    assert measured["log"][0].startswith("train: ") and "kept of 300 (" in measured["log"][0]
    assert 0 < measured["seconds_to_first_logged_step"] < measured["seconds"]
    assert 0.05 < measured["training_rss_gb"] <= measured["peak_rss_gb"] < 8
    assert (tmp_path / "run" / "last.safetensors").is_file()
    # The benchmark's resume: with `--resume` last, the run reads the ids it kept and goes on.
    command = corpus_size.train_command(data, tmp_path / "run", 20, [*tiny, "n_decoder_layers=1"])
    resumed = corpus_size.watch([*command, "--resume"])
    assert resumed["log"][0] == f"train: token ids read from {tmp_path / 'run' / 'train.ids'}"
    assert any(line.startswith("step 20 ") for line in resumed["log"])
