"""Decoding speed: our search with the KV cache, without it, and MarianMTModel.generate, in one process.

    python benchmarks/decode.py                    # small and base, batch 64 × 20-token sources
    python benchmarks/decode.py --configs small --repeats 5
    python benchmarks/decode.py --device cuda      # on a GPU: fp32 and bf16, every call timed to its end;
                                                   # ours also without cuDNN's attention, as training runs

Every search runs the decoder exactly `--new-tokens` steps per sentence (random weights would otherwise
stop at random places): ours by a length limit of that many steps, Marian by min/max_new_tokens. Greedy
and beam 4 (length penalty 0.6 for both). The limit makes ours emit EOS at its last step, a token it need
not score, so `_rows_to_score` projects 32 rows instead of all of them at that step: ours does fewer
matmul FLOPs than Marian, 0.7 % (greedy) and 1.7 % (beam 4) fewer on the small model, 0.2 % and 0.6 % on
base (projections and FFN counted). Random weights could also pick EOS early in ours (an 8000-way argmax,
about once per 8000 row-steps), while Marian's min_new_tokens forbids it.

Ours runs with packed linear weights as `transformer translate` loads a
model (transformer/packing.py: MKL's layout in fp32, oneDNN's in bf16 and, on AMD CPUs, in fp32), and once
more without them (`unpacked`: torch's nn.Linear, the kernels Marian runs). Where the CPU multiplies bf16
natively (or with --bf16), also both with their weights cast to bf16. Prints JSON (sentences/s, tokens/s,
ratios) and updates benchmarks/RESULTS.md.

Fixed-length random batches isolate the search's per-step cost but are not real text: bf16 attention on
the explicit path decoded these 1.08-1.18x faster and real translations not at all (`fused_attention`'s
docstring), so a change to decoding is also checked with benchmarks/translation.py.

`--profile` then runs our cached search and Marian's under torch's profiler and splits their time into
matrix products, attention kernels, other operators and what runs outside operators (Python, module
calls). Both run the same products and the same attention kernel, so Marian's median time over the time
of our products and attention is the most our search could gain on it by trimming everything else
(`bound`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, peers
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.precision import has_native_bf16
from transformer.search import SearchConfig, generate, search_name
from transformer.translate import ready_for_decoding


def our_search(
    model: torch.nn.Module, src: torch.Tensor, beam: int, new_tokens: int, cached: bool
) -> Callable:
    # The search stops at (non-padding source tokens + extra_len) steps: here exactly `new_tokens`.
    extra = new_tokens - int((src != PAD_ID).sum(1).max())
    config = SearchConfig(beam=beam, extra_len=extra, use_cache=cached)
    max_len = model.config.max_len

    def run() -> list[list[int]]:
        return generate(
            model, src, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, config=config, max_len=max_len
        )

    return run


def marian_search(model: torch.nn.Module, src: torch.Tensor, beam: int, new_tokens: int) -> Callable:
    @torch.inference_mode()
    def run() -> torch.Tensor:
        return model.generate(
            input_ids=src,
            attention_mask=src != PAD_ID,
            num_beams=beam,
            do_sample=False,
            length_penalty=0.6,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
        )

    return run


def searches(
    config_name: str,
    batch: int,
    src_len: int,
    new_tokens: int,
    beams: list[int],
    uncached_beam: bool,
    bf16: bool,
    device: torch.device,
) -> dict[str, Callable]:
    """Each search to time, by label, as a call that returns once `device` has finished its work."""
    c = peers.config_for(config_name)
    src, _ = peers.random_batch(batch, src_len - 1, 1)  # src_len tokens including EOS
    src = src.to(device)
    unpacked = ready_for_decoding(peers.ours(c).eval(), device, pack=False)
    marian = peers.marian(c)
    marian = marian.to(device) if marian is not None else None
    ours = ready_for_decoding(copy.deepcopy(unpacked), device)  # as `transformer translate` loads a model
    # bf16 as `transformer translate --precision bf16` decodes: the weights cast, not autocast; Marian the
    # same way (model.to(torch.bfloat16)), as its users would
    ours_bf16 = unpacked_bf16 = None
    if bf16:
        ours_bf16 = ready_for_decoding(copy.deepcopy(unpacked), device, torch.bfloat16)
        unpacked_bf16 = ready_for_decoding(copy.deepcopy(unpacked), device, torch.bfloat16, pack=False)
    marian_bf16 = copy.deepcopy(marian).to(torch.bfloat16) if bf16 and marian is not None else None
    runs = {}
    for beam in beams:
        kind = search_name(beam)
        runs[f"ours {kind}, cached"] = our_search(ours, src, beam, new_tokens, cached=True)
        if beam == 1 or uncached_beam:
            runs[f"ours {kind}, uncached"] = our_search(ours, src, beam, new_tokens, cached=False)
        runs[f"ours {kind}, cached, unpacked"] = our_search(unpacked, src, beam, new_tokens, cached=True)
        if device.type == "cuda":  # as in `transformer train`, whose validation decodes without cuDNN
            runs[f"ours {kind}, cached, no cuDNN attention"] = peers.with_attention_kernels(
                our_search(ours, src, beam, new_tokens, cached=True), peers.OURS_SDPA
            )
        if marian is not None:
            runs[f"Marian {kind}"] = marian_search(marian.eval(), src, beam, new_tokens)
        if ours_bf16 is not None:
            runs[f"ours {kind}, cached, bf16"] = our_search(ours_bf16, src, beam, new_tokens, cached=True)
            runs[f"ours {kind}, cached, bf16, unpacked"] = our_search(
                unpacked_bf16, src, beam, new_tokens, cached=True
            )
        if marian_bf16 is not None:
            runs[f"Marian {kind}, bf16"] = marian_search(marian_bf16.eval(), src, beam, new_tokens)
    return {label: common.synchronised(run, device) for label, run in runs.items()}


def main() -> None:
    common.run_as_the_cli_does()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "base"], choices=["small", "base"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src-len", type=int, default=20, help="source tokens, EOS included")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--uncached-beam", action="store_true", help="also time beam search without cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="measure bf16 decoding even without bf16 CPU")
    parser.add_argument("--profile", action="store_true", help="also split each search's time by operator")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile and device.type != "cpu":
        parser.error("--profile splits CPU time (torch's CPU profiler); run it with --device cpu")
    bf16 = args.bf16 or has_native_bf16(device.type)

    result = {"machine": common.machine_info()}
    body = []
    for name in args.configs:
        runs = searches(
            name, args.batch, args.src_len, args.new_tokens, args.beams, args.uncached_beam, bf16, device
        )
        times = common.time_interleaved(runs, args.repeats)
        tokens = args.batch * args.new_tokens
        rows = {label: common.decoding_row(ts, args.batch, tokens) for label, ts in times.items()}
        ratios, ranges = _ratios(times, args.beams)
        result[name] = {"rows": rows, "ratios": ratios, "ratio_ranges": ranges}
        body.append(
            f"**{name}** (batch {args.batch} × {args.src_len}-token sources, {args.new_tokens} tokens "
            f"generated):\n\n{common.decoding_markdown(rows, ratios, ranges)}"
        )
        if args.profile:
            result[name]["profile"] = profile = _profile(runs, times, args.beams)
            body.append(_profile_markdown(name, profile))
    if not bf16:
        body.append(common.bf16_not_measured("bf16 decoding"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    common.report(f"Decoding: {', '.join(args.configs)}", result, "\n\n".join(body), gpu)


def _profile(
    runs: dict[str, Callable], times: dict[str, list[float]], beams: list[int]
) -> dict[str, dict[str, float]]:
    """Seconds by kind of work in a profiled call of our cached search and of Marian's, fp32 and bf16,
    and for ours the `bound`: the peer's median time over the time of our products and attention."""
    out = {}
    for beam in beams:
        kind = search_name(beam)
        for suffix in ("", ", bf16"):
            ours, marian = f"ours {kind}, cached{suffix}", f"Marian {kind}{suffix}"
            if ours not in runs or marian not in runs:
                continue
            for label in (ours, marian):
                out[label] = {k: round(v, 4) for k, v in common.time_by_kind(runs[label]).items()}
            kernels = out[ours]["products"] + out[ours]["attention"]
            out[ours]["bound"] = round(common.median(times[marian]) / kernels, 2)
    return out


def _profile_markdown(name: str, profile: dict[str, dict[str, float]]) -> str:
    rows = [
        {"search": label, **{k: (f"{v}×" if k == "bound" else f"{v * 1e3:.0f} ms") for k, v in row.items()}}
        for label, row in profile.items()
    ]
    for row in rows:
        row.setdefault("bound", "")
    return (
        f"**{name}**, where the time goes (the median of three profiled calls each; `bound`: Marian's "
        f"median time above over the time of our products and attention, the ratio ours would reach if "
        f"everything else took no time):\n\n"
        f"{common.markdown_table(rows)}"
    )


def _ratios(
    times: dict[str, list[float]], beams: list[int]
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Speed-ups of our cached search over the other searches of the same kind (paired per round), and
    the lowest and highest per-round speed-up of each."""
    pairs = {}  # label -> (faster search, slower search)
    for beam in beams:
        kind = search_name(beam)
        ours, ours_bf16 = f"ours {kind}, cached", f"ours {kind}, cached, bf16"
        variants = ("uncached", "cached, unpacked", "cached, no cuDNN attention")
        for other in (f"Marian {kind}", *(f"ours {kind}, {variant}" for variant in variants)):
            pairs[f"ours {kind} cached vs {other.removeprefix(f'ours {kind}, ')}"] = (ours, other)
        pairs[f"ours {kind} cached bf16 vs fp32"] = (ours_bf16, ours)
        pairs[f"ours {kind} cached bf16 vs bf16, unpacked"] = (ours_bf16, f"{ours_bf16}, unpacked")
        pairs[f"ours {kind} cached bf16 vs Marian {kind}, bf16"] = (ours_bf16, f"Marian {kind}, bf16")
        # bf16 against the peer's fp32: what changing both the tool and the precision buys
        pairs[f"ours {kind} cached bf16 vs Marian {kind} in fp32"] = (ours_bf16, f"Marian {kind}")
    present = {label: pair for label, pair in pairs.items() if all(run in times for run in pair)}
    ratios = {label: common.paired_speedup(times[a], times[b]) for label, (a, b) in present.items()}
    ranges = {label: common.speedup_range(times[a], times[b]) for label, (a, b) in present.items()}
    return ratios, ranges


if __name__ == "__main__":
    main()
