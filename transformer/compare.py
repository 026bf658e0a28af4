"""The comparison card: the Transformer against the recurrent systems it replaced, trained the same way.

Every model goes through the same `train()` — same data, joint tokenizer, token-budget batches, warm-up
schedule, label smoothing, checkpoint averaging, beam search and sacreBLEU — with its parameter count
matched to the Transformer's, for several seeds. The card then reports, per model, mean ± std over seeds:
parameters, training speed, wall time to the best validation, decoding speed, teacher-forced validation
perplexity and test BLEU/chrF, beside the published figures of a well-known tutorial implementation.

    transformer compare --minutes 10 --out runs/compare --card reports/comparison.md

A finished run (its results.json exists) is reused and a stopped one resumed, so an interrupted card
continues where it stopped; but only when it was trained with the settings the card will state: a run of
other settings or data (threads included: the card's speeds are its runs') is refused before anything trains,
as `train --resume` refuses a changed run.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from transformer import rundir
from transformer.checkpoint import list_checkpoints
from transformer.config import RNNConfig, TrainConfig, TransformerConfig, config_to_dict
from transformer.data.batching import collate
from transformer.data.corpus import corpus_paths, iter_split, read_split
from transformer.data.dataset import encode_corpus
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError
from transformer.evaluate import score
from transformer.loss import label_smoothed_loss
from transformer.model import build_model
from transformer.runtime import cpu_name
from transformer.train import model_config_for, teacher_forced_loss, train
from transformer.translate import Translator

MODELS = ("transformer", "rnn", "birnn", "rnn-attention")

# The corpus shipped with the repository: only runs on it are Multi30k, and only its de→en test2016 runs
# are comparable to the published figures below.
BUNDLED_DATA = Path(__file__).resolve().parent.parent / "data" / "multi30k"

# bentrevett/pytorch-seq2seq, Multi30k de→en test set, greedy decoding, lowercased (spaCy-tokenised) BLEU.
PUBLISHED = {
    "rnn": ("GRU encoder–decoder (notebook 2)", 20.6),
    "birnn": None,
    "rnn-attention": ("BiGRU + attention (notebook 3)", 28.3),
    "transformer": ("Transformer (notebook 6)", 36.5),
}

# The RNNs share embeddings as the Transformer does, so matched parameters go to the recurrences.
SHARING = {"share_embeddings": True, "tie_output": True}

LABELS = {
    "transformer": "Transformer",
    "rnn": "RNN encoder–decoder",
    "birnn": "bidirectional RNN",
    "rnn-attention": "RNN + attention",
}


@dataclass(frozen=True)
class CompareSettings:
    """What the card trains: which models, seeds and per-run time budget, on top of a base recipe."""

    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (1, 2, 3)
    base: TrainConfig = field(default_factory=TrainConfig)
    transformer_overrides: tuple[tuple[str, Any], ...] = ()
    emb_dim: int = 0  # the RNNs' embedding size (0: the Transformer's d_model); hidden sizes match params
    jobs: int = 1  # runs trained and measured at once, each on cpu_count // jobs threads


def count_parameters(config: TransformerConfig | RNNConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return sum(p.numel() for p in build_model(config).parameters())


def matched_hidden_size(kind: str, target: int, vocab_size: int, emb_dim: int) -> tuple[int, int]:
    """The hidden size (a multiple of 8) whose `kind` RNN has the parameter count closest to `target`.

    Parameter counts grow monotonically with the hidden size, so a bisection over multiples of 8 finds it.
    """

    def params(hidden: int) -> int:
        vocab = {"src_vocab_size": vocab_size, "tgt_vocab_size": vocab_size}
        return count_parameters(RNNConfig(kind=kind, emb_dim=emb_dim, hidden_size=hidden, **vocab, **SHARING))

    lo, hi = 1, 512  # in units of 8: hidden sizes 8 … 4096
    while lo < hi:
        mid = (lo + hi) // 2
        if params(8 * mid) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [8 * h for h in (lo - 1, lo) if h >= 1]
    best = min(candidates, key=lambda hidden: abs(params(hidden) - target))
    return best, params(best)


def model_overrides(settings: CompareSettings, kind: str) -> dict[str, Any]:
    """The model settings of one family, sized so that all families have about the same parameter count."""
    transformer = dict(settings.transformer_overrides)
    if kind == "transformer":
        return transformer
    vocab = settings.base.vocab_size
    reference = TransformerConfig.preset(
        settings.base.preset, src_vocab_size=vocab, tgt_vocab_size=vocab, **transformer
    )
    emb_dim = settings.emb_dim or reference.d_model
    hidden, _ = matched_hidden_size(kind, count_parameters(reference), vocab, emb_dim)
    return {"emb_dim": emb_dim, "hidden_size": hidden, **SHARING}


# What a reused run may have been trained with otherwise: only its log. Threads and compilation change no
# weight but the training speed, which the card reports as measured on its stated threads.
MAY_DIFFER = frozenset({"log_every"})


def _run_dir(out: Path, kind: str, seed: int) -> Path:
    return out / f"{kind}-seed{seed}"


def _cell_config(settings: CompareSettings, kind: str, seed: int) -> TrainConfig:
    return replace(settings.base, model=kind, seed=seed)


def _reused_or_resumed(run_dir: Path) -> bool:
    """Whether `run_one` would reuse or resume the run rather than train it from the start: any checkpoint
    counts, as for `train` (a kill between saving `step-N` and `last` leaves no `last`)."""
    return (run_dir / "results.json").is_file() or bool(list_checkpoints(run_dir))


def _data_digests(tc: TrainConfig) -> dict[str, str]:
    """The digests `train` records for the data it reads (`rundir.run_record`), read a block at a time."""
    digests = {}
    for split, name in (("train", tc.train_split), ("valid", tc.valid_split)):
        digest = rundir.DataDigest()
        for block in iter_split(tc.data_dir, name, tc.src_lang, tc.tgt_lang):
            digest.update(block)
        digests[split] = digest.hexdigest()
    return digests


def check_reusable(settings: CompareSettings, out: Path) -> None:
    """Refuse the card when a run it would reuse or resume was trained with other settings or data than
    this card's (the card would state settings its runs did not use), naming the first difference.

    Unlike `train --resume`, a budget may not differ either: a finished run is not trained further. The
    tokenizer is the run's own, trained from the data and the settings compared here."""
    digests: dict[str, str] | None = None  # read once, and only when some run is kept
    for kind in settings.models:
        for seed in settings.seeds:
            run_dir = _run_dir(out, kind, seed)
            if not _reused_or_resumed(run_dir):
                continue
            saved = rundir.read_run_record(run_dir)
            tc = _cell_config(settings, kind, seed)
            digests = digests or _data_digests(tc)
            model = model_config_for(tc, model_overrides(settings, kind), _vocab_size(run_dir))
            current = rundir.run_record(
                config_to_dict(model), config_to_dict(tc), saved.get("tokenizer_sha256", ""), digests
            )
            why = rundir.run_difference(saved, json.loads(json.dumps(current)), MAY_DIFFER)
            if why:
                raise TransformerError(
                    f"cannot reuse {run_dir} for this card: {why}; choose another --out, or delete that run "
                    f"to train it anew"
                )


def run_one(settings: CompareSettings, kind: str, seed: int, out: Path) -> Path:
    """Train (or resume, or reuse) one model and seed; returns its run directory. `compare` has checked
    first that a run reused or resumed was trained with these settings (`check_reusable`)."""
    run_dir = _run_dir(out, kind, seed)
    if (run_dir / "results.json").is_file():
        return run_dir
    tc = _cell_config(settings, kind, seed)
    train(tc, model_overrides(settings, kind), run_dir, resume=bool(list_checkpoints(run_dir)))
    return run_dir


def _vocab_size(run_dir: Path) -> int:
    """The vocabulary the run trained, from its tokenizer model: `vocab_size` in the recipe is only an
    upper bound (SentencePiece trains fewer pieces on a small corpus)."""
    return Tokenizer.load(run_dir / "tokenizer.model").vocab_size


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _config_hash(run_dir: Path) -> str:
    """A hash of everything that defines the run except the seed: equal across a model's seeds."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved["train"] = {k: v for k, v in saved["train"].items() if k != "seed"}
    return hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:12]


def flops_per_target_token(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Training FLOPs (forward + backward, counted by torch's FlopCounterMode) per target token, on real
    pairs one at a time: a batch of mixed lengths would count every padded position too (2.2× on 64
    unsorted validation pairs), which training's length-bucketed batches hardly have."""
    model.train()
    flops = tokens = 0
    for pair in pairs:
        batch = collate([pair])
        counter = FlopCounterMode(display=False)
        with counter:
            label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, 0.1).backward()
        flops += counter.get_total_flops()
        tokens += batch.n_tgt_tokens
    model.zero_grad(set_to_none=True)
    model.eval()
    return flops / tokens


# A kept measurement of another version is taken again, not put on the card: version 1 counted FLOPs with
# padding and did not record the dropout.
MEASURE_VERSION = 2


def measure(run_dir: Path) -> dict[str, Any]:
    """Everything the card reports about one trained run (its `best` weights: the average when better)."""
    translator = Translator.from_checkpoint(run_dir)
    tc = translator.train_config
    model = translator.model
    records = _metrics(run_dir)
    valid = [r for r in records if r["event"] == "valid"]
    trained = [r for r in records if r["event"] == "train"]
    best_valid = max(valid, key=lambda r: r["bleu"])
    results = json.loads((run_dir / "results.json").read_text())

    test_pairs = read_split(tc.data_dir, tc.test_split, tc.src_lang, tc.tgt_lang)
    sources, references = [s for s, _ in test_pairs], [t for _, t in test_pairs]
    decoding: dict[str, Any] = {}
    for beam in (1, 4):
        start = time.perf_counter()
        hypotheses = translator.translate(sources, beam=beam)
        seconds = time.perf_counter() - start
        scores = score(hypotheses, references)
        decoding[f"beam{beam}"] = {"sentences_per_s": len(sources) / seconds, **scores.to_dict()}

    valid_data, _ = encode_corpus(
        read_split(tc.data_dir, tc.valid_split, tc.src_lang, tc.tgt_lang), translator.tokenizer, None
    )
    with torch.no_grad():
        valid_loss = teacher_forced_loss(model, valid_data, tc.max_tokens)
    sample = list(zip(valid_data.src[:64], valid_data.tgt[:64], strict=True))
    # `last`'s, or a newer `step-N`'s: a run killed before saving `last` at its end resumes to save none
    _, _, state, _ = rundir.resume_point(run_dir)
    progress = state["progress"]
    tokens_seen = progress.get("tokens_seen", 0)
    return {
        "model": tc.model,
        "seed": tc.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": _vocab_size(run_dir),
        # NaN (shown as —) for a run too short to log a training record (fewer steps than log_every)
        "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in trained) if trained else math.nan,
        "minutes_to_best_valid": best_valid["elapsed"] / 60,
        "updates": progress["step"],
        "valid_ppl": math.exp(min(valid_loss, 50)),
        "training_flops": flops_per_target_token(model, sample) * tokens_seen,
        "wall_minutes": results.get("wall_seconds", 0.0) / 60,
        "config_hash": _config_hash(run_dir),
        "dropout": json.loads((run_dir / "config.json").read_text())["model"]["dropout"],
        "measure_version": MEASURE_VERSION,
        **{f"{name}_{key}": value for name, entry in decoding.items() for key, value in entry.items()},
    }


def data_checksums(tc: TrainConfig) -> dict[str, str]:
    """sha256 of each data file the card's runs read."""
    out = {}
    for split in (tc.train_split, tc.valid_split, tc.test_split):
        for path in corpus_paths(tc.data_dir, split, tc.src_lang, tc.tgt_lang):
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def hardware(threads: int = 0) -> str:
    cpu = cpu_name()
    python = platform.python_version()
    threads = threads or torch.get_num_threads()
    cores = os.cpu_count()
    return f"{cpu}, {cores} cores, {_threads(threads)} per run, torch {torch.__version__}, Python {python}"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _budget(tc: TrainConfig) -> str:
    """How long each run trains: until the first of the limits it has (0 is none, but max_epochs)."""

    def count(n: float, unit: str) -> str:
        return f"{n:g} {unit}" if n == 1 else f"{n:g} {unit}s"

    limits = [count(tc.time_budget_minutes, "minute")] if tc.time_budget_minutes else []
    limits += [count(tc.max_steps, "update")] if tc.max_steps else []
    limits.append(count(tc.max_epochs, "epoch"))
    if tc.patience:
        limits.append(f"{count(tc.patience, 'validation')} without a better BLEU")
    if len(limits) == 1:
        return limits[0]
    return f"{', '.join(limits[:-1])} or {limits[-1]}, whichever ends first"


def _mean_std(values: Sequence[float], fmt: str) -> str:
    if any(math.isnan(v) for v in values):  # not measured in some run
        return "—"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


# Row key, label ({test}: the test split's name), unit and format.
ROWS = (
    ("parameters", "parameters (M)", 1e-6, ".2f"),
    ("train_tokens_per_s", "training target tokens/s", 1, ".0f"),
    ("updates", "updates", 1, ".0f"),
    ("minutes_to_best_valid", "wall minutes to best validation", 1, ".1f"),
    ("wall_minutes", "wall minutes in all (with evaluation)", 1, ".1f"),
    ("training_flops", "training FLOPs (×10¹²)", 1e-12, ".1f"),
    ("valid_ppl", "validation perplexity (teacher forcing)", 1, ".2f"),
    ("beam1_sentences_per_s", "decoding sentences/s, greedy", 1, ".1f"),
    ("beam4_sentences_per_s", "decoding sentences/s, beam 4", 1, ".1f"),
    ("beam1_bleu_lc", "{test} BLEU lowercased, greedy", 1, ".2f"),
    ("beam1_bleu", "{test} BLEU cased, greedy", 1, ".2f"),
    ("beam4_bleu_lc", "{test} BLEU lowercased, beam 4", 1, ".2f"),
    ("beam4_bleu", "{test} BLEU cased, beam 4", 1, ".2f"),
    ("beam4_chrf", "{test} chrF, beam 4", 1, ".2f"),
)


def millions(rows: list[dict[str, Any]]) -> str:
    return f"{statistics.fmean(r['parameters'] for r in rows) / 1e6:.2f}"


def is_bundled_multi30k(tc: TrainConfig) -> bool:
    """Whether the runs read the bundled Multi30k (not a custom corpus), wherever the command ran from."""
    return Path(tc.data_dir).resolve() == BUNDLED_DATA


def verdicts(by_model: dict[str, list[dict[str, Any]]], against_published: bool = True) -> list[str]:
    """The issue's two bars, judged on mean lowercased greedy BLEU; the published figures only where the
    runs are on the data they were measured on (`against_published`)."""
    mean = {kind: statistics.fmean(r["beam1_bleu_lc"] for r in rows) for kind, rows in by_model.items()}
    lines = []
    for kind, published in PUBLISHED.items():
        if against_published and published and kind in mean and kind != "transformer":
            name, figure = published
            verdict = "beats" if mean[kind] > figure else "does NOT beat"
            lines.append(
                f"- {LABELS[kind]}: {mean[kind]:.2f} {verdict} the published {name} figure {figure}."
            )
    if "transformer" in mean:
        for kind in mean:
            if kind != "transformer":
                gap = mean["transformer"] - mean[kind]
                lines.append(
                    f"- Transformer vs {LABELS[kind]}: {gap:+.2f} BLEU (lowercased, greedy) at "
                    f"{millions(by_model['transformer'])}M vs {millions(by_model[kind])}M parameters."
                )
    return lines


def write_card(measured: list[dict[str, Any]], settings: CompareSettings, command: str, path: Path) -> str:
    """The Markdown card: one column per model, mean ± std over seeds."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in measured:
        by_model.setdefault(row["model"], []).append(row)
    kinds = [k for k in settings.models if k in by_model]
    sample = measured[0]
    tc = settings.base
    # The facts of these runs, not the recipe's defaults: the corpus they read and the vocabulary they
    # trained (smaller than asked for on a small corpus).
    multi30k = is_bundled_multi30k(tc)
    corpus = "Multi30k" if multi30k else f"`{tc.data_dir}`"
    published_comparable = multi30k and (tc.src_lang, tc.tgt_lang, tc.test_split) == ("de", "en", "test2016")
    sizes = sorted({r["vocab_size"] for r in measured})
    vocab = f"joint {'/'.join(map(str, sizes))} SentencePiece vocabulary"
    if sizes != [tc.vocab_size]:
        vocab += f", {tc.vocab_size} asked for"  # SentencePiece trains fewer pieces on a small corpus
    header = "| | " + " | ".join(LABELS[k] for k in kinds) + " |"
    lines = [
        "# Comparison card: the Transformer and the recurrent systems it replaced",
        "",
        f"{corpus} {tc.src_lang}→{tc.tgt_lang}, same pipeline for every model ({vocab}, "
        f"batches of ≤ {tc.max_tokens} tokens, Adam with warm-up {tc.warmup}, "
        f"label smoothing {tc.label_smoothing}"
        + (f", the rate falling linearly to 0 over the last {tc.cooldown:.0%}" if tc.cooldown else "")
        + f", average of the last {tc.average_last} checkpoints kept where it validates better); "
        f"training per run: {_budget(tc)}; seeds {', '.join(map(str, settings.seeds))}; "
        "mean ± standard deviation over seeds. Model settings are each family's own, at about the same "
        "parameter count (dropout: see the table)."
        + (
            f" {settings.jobs} runs at a time, each training and decoding on {_threads(tc.threads)}."
            if settings.jobs > 1
            else ""
        ),
        "",
        f"Reproduce: `{command}`",
        "",
        header,
        "|---|" + "---:|" * len(kinds),
    ]
    for key, label, unit, fmt in ROWS:
        cells = [_mean_std([r[key] * unit for r in by_model[k]], fmt) for k in kinds]
        lines.append(f"| {label.format(test=tc.test_split)} | " + " | ".join(cells) + " |")
    published = [f"{PUBLISHED[k][1]}" if PUBLISHED.get(k) else "—" for k in kinds]
    hashes = [by_model[k][0]["config_hash"] for k in kinds]
    if published_comparable:
        lines.append(
            "| published (bentrevett/pytorch-seq2seq, lowercased, greedy) | " + " | ".join(published) + " |"
        )
    lines.append("| dropout | " + " | ".join(f"{by_model[k][0]['dropout']:g}" for k in kinds) + " |")
    lines.append("| config hash (seed excluded) | " + " | ".join(hashes) + " |")
    lines += ["", "## Verdicts", "", *verdicts({k: by_model[k] for k in kinds}, published_comparable), ""]
    lines += [
        "## Provenance",
        "",
        f"- Hardware: {hardware(tc.threads)}",
        f"- BLEU signature: `{sample['beam4_bleu_signature']}`; "
        f"lowercased: `{sample['beam4_bleu_lc_signature']}`; chrF: `{sample['beam4_chrf_signature']}`",
        f"- Data (`{tc.data_dir}`; sha256, first 16 hex digits): "
        + ", ".join(f"`{name}` {digest}" for name, digest in data_checksums(tc).items()),
        "- The published figures come from spaCy-tokenised, lowercased BLEU with greedy decoding "
        "(torchtext's `bleu_score`); ours are sacreBLEU on detokenised text, so they are comparable in "
        "spirit, not to the decimal."
        if published_comparable
        else "- No published figures: they were measured on Multi30k de→en test2016, not on this data.",
        "- Training FLOPs: torch's FlopCounterMode on a forward+backward pass of 64 validation pairs, one at "
        "a time (no padding), per target token, times the target tokens trained on.",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (path.with_suffix(".json")).write_text(json.dumps(measured, indent=2) + "\n")
    return text


def train_and_measure(settings: CompareSettings, kind: str, seed: int, out: Path) -> dict[str, Any]:
    """One cell of the card. The measurement is kept beside the run (`measured.json`), so that a card
    interrupted while measuring does not measure finished runs again."""
    if settings.base.threads:
        torch.set_num_threads(settings.base.threads)  # decoding speed is measured on the training's threads
    run_dir = run_one(settings, kind, seed, out)
    kept = run_dir / "measured.json"
    if kept.is_file():
        row = json.loads(kept.read_text())
        if row.get("measure_version") == MEASURE_VERSION:
            return row
    row = measure(run_dir)
    kept.write_text(json.dumps(row, indent=2) + "\n")
    return row


def compare(settings: CompareSettings, out: Path, card: Path, command: str) -> str:
    """Train every model and seed (reusing finished runs), measure them, and write the card.

    With `jobs` > 1 the runs go to that many worker processes, each pinned to an equal share of the
    cores: on a small CPU, two one-thread runs do more work than one two-thread run (small matrix
    products do not split well), and every run still sees the same conditions as the others.
    """
    cells = [(kind, seed) for kind in settings.models for seed in settings.seeds]
    # Stated on the card and recorded in each run (0 would record "torch's default", whatever that was), so
    # that a run reused from a card of other threads is refused rather than its speed stated as this one's.
    if settings.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    else:
        threads = settings.base.threads or torch.get_num_threads()
    settings = replace(settings, base=replace(settings.base, threads=threads))
    check_reusable(settings, out)
    if settings.jobs <= 1:
        measured = [train_and_measure(settings, kind, seed, out) for kind, seed in cells]
        return write_card(measured, settings, command, card)
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(settings.jobs, mp_context=context) as pool:
        futures = [pool.submit(train_and_measure, settings, kind, seed, out) for kind, seed in cells]
        measured = [future.result() for future in futures]
    return write_card(measured, settings, command, card)
