"""`transformer doctor`: check that a trained checkpoint keeps the promises the model makes.

Each check runs the real weights on real validation sentences and compares two computations that must
agree; it reports the measured difference beside the tolerance it is held to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from transformer.config import TransformerConfig
from transformer.data.batching import collate
from transformer.data.corpus import read_split
from transformer.data.tokenizer import PAD_ID, round_trip_mismatches
from transformer.errors import TransformerError
from transformer.model import build_model
from transformer.translate import Translator

SAMPLE = 16  # validation sentences the model checks run on


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass", "FAIL" or "skip"
    measured: str
    tolerance: str


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _verdict(name: str, value: float, limit: float, unit: str = "max |Δ logit|") -> Check:
    ok = value <= limit and value == value  # NaN fails
    return Check(name, "pass" if ok else "FAIL", f"{unit} {value:.2e}", f"≤ {limit:.0e}")


@torch.no_grad()
def run_checks(checkpoint: Path, name: str = "best") -> list[Check]:
    translator = Translator.from_checkpoint(checkpoint, name)
    model, tokenizer, tc = translator.model.eval(), translator.tokenizer, translator.train_config
    try:
        pairs = read_split(tc.data_dir, tc.valid_split, tc.src_lang, tc.tgt_lang)
    except TransformerError as error:
        raise TransformerError(f"doctor needs the run's validation data: {error}") from None
    limit = translator.max_source_len  # a target has the same room, for BOS
    sample = []  # the first SAMPLE pairs that the model can take whole
    for source, target in pairs:
        s, t = tokenizer.encode(source), tokenizer.encode(target)
        if 0 < len(s) <= limit and 0 < len(t) <= limit:
            sample.append((s, t))
        if len(sample) == SAMPLE:
            break
    if not sample:
        raise TransformerError(
            f"doctor needs validation pairs the model can take: none of the {len(pairs)} in "
            f"{tc.valid_split!r} has both sides within its {limit} tokens"
        )
    batch = collate(sample)
    src, tgt = batch.src, batch.tgt_in
    logits = model(src, tgt)
    checks = []

    # Padding: each sentence alone gives the logits it gets inside the padded batch.
    alone = max(
        _max_diff(model(src[i : i + 1, : len(s) + 1], tgt[i : i + 1, : len(t) + 1]), logits[i, : len(t) + 1])
        for i, (s, t) in enumerate(sample)
    )
    checks.append(_verdict("padding does not change outputs", alone, 1e-4))

    # Causality: changing target token j leaves every earlier position unchanged.
    changed = tgt.clone()
    j = tgt.size(1) // 2
    changed[:, j] = (changed[:, j] + 1) % model.config.tgt_vocab_size
    checks.append(
        _verdict(
            "decoder cannot see future tokens", _max_diff(model(src, changed)[:, :j], logits[:, :j]), 1e-5
        )
    )

    # Incremental decoding through the cache equals decoding the whole prefix.
    memory, src_mask = model.encode(src)
    cache = model.new_cache(tgt.size(1))
    steps = torch.cat(
        [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))], 1
    )
    checks.append(_verdict("cached == full decoding", _max_diff(steps, logits), 1e-4))

    checks.append(_verdict("eval mode is deterministic", _max_diff(model(src, tgt), logits), 0.0))

    if isinstance(model.config, TransformerConfig):
        other = "explicit" if model.config.attention == "fused" else "fused"
        twin = build_model(dataclasses.replace(model.config, attention=other)).eval()
        twin.load_state_dict(model.state_dict())
        checks.append(_verdict("fused == explicit attention", _max_diff(twin(src, tgt), logits), 1e-4))
    else:
        checks.append(Check("fused == explicit attention", "skip", "not a Transformer", "-"))

    # bf16 autocast, as training runs it: the same choices at (nearly) every position.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(src, tgt).float()
    real = batch.tgt_out != PAD_ID
    agree = float((low.argmax(-1) == logits.argmax(-1))[real].float().mean())
    checks.append(
        Check(
            "bf16 agrees with fp32",
            "pass" if agree >= 0.95 else "FAIL",
            f"top-1 agreement {agree:.3f}",
            "≥ 0.95",
        )
    )

    # bf16 weights, as `translate --precision bf16` casts and packs them for decoding: a path of its own.
    cast = Translator.from_checkpoint(checkpoint, name, precision="bf16").model.eval()
    agree = float((cast(src, tgt).float().argmax(-1) == logits.argmax(-1))[real].float().mean())
    checks.append(
        Check(
            "bf16 weights agree with fp32",
            "pass" if agree >= 0.95 else "FAIL",
            f"top-1 agreement {agree:.3f}",
            "≥ 0.95",
        )
    )

    empty = torch.full_like(src, PAD_ID)
    finite = bool(torch.isfinite(model(empty, tgt)).all())
    checks.append(
        Check("no NaN on fully padded input", "pass" if finite else "FAIL", f"finite: {finite}", "finite")
    )

    texts = [text for pair in pairs for text in pair]
    bad = len(round_trip_mismatches(tokenizer, texts))
    checks.append(
        Check(
            "tokenizer round-trips the validation set",
            "pass" if bad == 0 else "FAIL",
            f"{bad} of {len(texts)} lines differ",
            "0",
        )
    )
    return checks


def format_table(checks: list[Check]) -> str:
    rows = [
        ("check", "result", "measured", "tolerance"),
        *((c.name, c.status, c.measured, c.tolerance) for c in checks),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
