"""What the experiments share: their result type, figures, timing, and short in-process training runs.

Every experiment is `run(preset, out_dir, context) -> Result`. `preset` is "tiny" (the tests: seconds) or
"report" (`transformer report`: all of them in about an hour on 2 Zen 3 cores; the committed report's
sections took 57 minutes). The `Context` carries the trained checkpoint, if any, and caches what several
experiments use: the small Multi30k task and the models trained on it, so that one baseline serves the
positional, multi-head, masking and scaling items.
"""

from __future__ import annotations

import functools
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer import train
from transformer.config import TransformerConfig
from transformer.data.batching import collate
from transformer.data.corpus import read_split
from transformer.data.dataset import Corpus, encode_corpus
from transformer.data.tokenizer import PAD_ID, Tokenizer
from transformer.loss import label_smoothed_loss
from transformer.onednn import use_onednn_linears
from transformer.optim import build_optimizer
from transformer.runtime import quiet_stderr
from transformer.train import translate_and_score

PRESETS = ("tiny", "report")
BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data" / "multi30k"
LANGUAGES = ("de", "en")  # the pair every experiment reads: `transformer report` refuses another
FIGURE_DPI = 90


def escape_cell(text: str) -> str:
    """A Markdown table cell: a literal | would end the cell."""
    return text.replace("|", "\\|")


@dataclass
class Table:
    """A table of measured numbers, rendered as Markdown."""

    header: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def markdown(self) -> str:
        def cell(value: Any) -> str:
            if isinstance(value, float):
                return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
            return str(value)

        lines = ["| " + " | ".join(map(escape_cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(escape_cell(cell(v)) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Result:
    """What one experiment measured: headline findings (with their numbers), tables, figures, raw numbers."""

    key: str
    title: str
    claim: str  # what the notes (and the paper) say
    findings: list[str] = field(default_factory=list)  # one sentence each, with the measured number
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # file names inside the output directory
    notes: list[str] = field(default_factory=list)  # how it was measured, at what size, caveats
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    """Shared state of one report: the checkpoint to study and caches of data and trained models."""

    checkpoint: Path | None = None
    data_dir: Path = BUNDLED_DATA
    cache: dict[str, Any] = field(default_factory=dict)
    # one line per model trained, so that a section's minutes of training show they are moving
    progress: Callable[[str], None] = lambda _line: None

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value) of a few runs' results."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def spread(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± sd' of several seeds' results, so a difference can be read against the seed-to-seed noise."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def in_standard_errors(gap: float, standard_error: float) -> str:
    """A difference in standard errors of the difference (`difference`), the measure of whether the seeds
    alone could explain it."""
    if standard_error == 0:
        return "one seed: no error estimate"
    return f"{abs(gap) / standard_error:.1f} standard errors"


def loss_cells(losses: dict[str, list[float]]) -> list[str]:
    """A trained variant's cells in a table: final training and test loss as mean ± sd over its seeds,
    then each seed's test loss."""
    test = losses["test_loss"]
    return [spread(losses["train_loss"], 3), spread(test, 3), ", ".join(f"{x:.3f}" for x in test)]


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error √(sd_a²/n_a + sd_b²/n_b) (Welch): a difference of one or
    two standard errors is what different seeds alone produce."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    return mean_a - mean_b, math.sqrt(sd_a**2 / len(a) + sd_b**2 / len(b))


def pick(preset: str, sizes: dict[str, Any]) -> Any:
    """The settings of a preset, refusing unknown preset names."""
    if preset not in sizes:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sizes)}")
    return sizes[preset]


# ---------------------------------------------------------------------------------------------------------
# Figures


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: Path, name: str) -> str:
    """Write a figure as a small PNG and close it; returns the file name for the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=FIGURE_DPI)
    pyplot().close(fig)
    return name


# ---------------------------------------------------------------------------------------------------------
# Measuring


def time_call(fn: Callable[[], Any], min_seconds: float = 0.05, max_repeats: int = 20) -> float:
    """Median wall time of `fn` in seconds, after one warm-up call, over enough calls to fill min_seconds."""
    fn()
    times: list[float] = []
    while len(times) < max_repeats and (sum(times) < min_seconds or len(times) < 3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes held by tensors allocated while `fn` runs (CPU), from the profiler's allocation events:
    the running sum of allocations minus frees, at its highest."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------------------
# A small translation task and short training runs on it


@dataclass
class Task:
    """Multi30k de→en, or a slice of it, with its own small joint subword vocabulary."""

    tokenizer: Tokenizer
    train: Corpus
    test: Corpus
    description: str


def translation_task(context: Context, n_train: int, n_test: int, vocab_size: int) -> Task:
    """Tokenise the first n_train training pairs and n_test test2016 pairs (cached in the context)."""

    def make() -> Task:
        train_pairs = read_split(context.data_dir, "train", *LANGUAGES)[:n_train]
        test_pairs = read_split(context.data_dir, "test2016", *LANGUAGES)[:n_test]
        with tempfile.TemporaryDirectory() as tmp:
            texts = [text for pair in train_pairs for text in pair if text]
            tokenizer = Tokenizer.train(texts, Path(tmp) / "sp.model", vocab_size=vocab_size)
        train, _ = encode_corpus(train_pairs, tokenizer, 64)
        test, _ = encode_corpus(test_pairs, tokenizer, None)
        description = (
            f"Multi30k de→en: first {len(train)} training pairs, first {len(test)} test2016 pairs, "
            f"joint SentencePiece vocabulary of {tokenizer.vocab_size}"
        )
        return Task(tokenizer, train, test, description)

    return context.memo(f"task:{n_train}:{n_test}:{vocab_size}", make)


@dataclass(frozen=True)
class Recipe:
    """A short training run: `steps` Adam steps of `max_tokens` tokens with the warm-up schedule."""

    steps: int
    max_tokens: int = 2000
    warmup: int = 200
    lr_factor: float = 1.0
    seed: int = 1
    eval_every: int = 25  # steps between points of the recorded loss curve


@dataclass
class TrainedModel:
    model: nn.Module
    curve: list[tuple[int, float]]  # (step, mean training loss over the last eval_every steps)
    seconds: float
    diverged: bool


def seeded(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_model(
    model: nn.Module,
    corpus: Corpus,
    recipe: Recipe,
    d_model: int,
    *,
    lr_schedule: Callable[[int], float] | None = None,
) -> TrainedModel:
    """Train on a corpus for `recipe.steps` steps (cross-entropy, no label smoothing) and return the model
    with its training-loss curve. `lr_schedule(step)` replaces the warm-up schedule when given. A run whose
    loss becomes non-finite stops there and is marked diverged."""
    seeded(recipe.seed)
    use_onednn_linears(model)  # fp32 products in oneDNN where `transformer train` puts them (AMD CPUs)
    optimizer, scheduler = build_optimizer(model, d_model, recipe.warmup, recipe.lr_factor)
    if lr_schedule is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda taken: lr_schedule(taken + 1))
    model.train()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    step, epoch, diverged = 0, 0, False
    started = time.perf_counter()
    while step < recipe.steps and not diverged:
        batches = corpus.batches(recipe.max_tokens, shuffle=True, seed=recipe.seed, epoch=epoch)
        for ids in batches:
            batch = collate([(corpus.src[i], corpus.tgt[i]) for i in ids])
            loss = (
                label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, 0.0) / batch.n_tgt_tokens
            )
            if not torch.isfinite(loss):
                diverged = True
                curve.append((step + 1, math.nan))
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            window.append(loss.detach().item())
            if step % recipe.eval_every == 0 or step == recipe.steps:
                curve.append((step, sum(window) / len(window)))
                window = []
            if step >= recipe.steps:
                break
        epoch += 1
    model.eval()
    return TrainedModel(model, curve, time.perf_counter() - started, diverged)


@torch.no_grad()
def teacher_forced_loss(model: nn.Module, corpus: Corpus, max_tokens: int = 4000) -> float:
    """Per-token cross-entropy on a corpus, with the reference prefix fed to the decoder (the trainer's
    validation loss, in eval mode)."""
    model.eval()
    return train.teacher_forced_loss(model, corpus, max_tokens)


def greedy_translations(model: nn.Module, task: Task) -> tuple[list[str], float]:
    """Greedy translations of the task's test sentences and their corpus BLEU."""
    from transformer.search import SearchConfig

    hypotheses, scores = translate_and_score(model, task.tokenizer, task.test, SearchConfig(beam=1))
    return hypotheses, scores.bleu


def greedy_bleu(model: nn.Module, task: Task) -> float:
    """Corpus BLEU of greedy translations of the task's test sentences."""
    return greedy_translations(model, task)[1]


def small_transformer(task: Task, size: dict[str, int], **changes: Any) -> TransformerConfig:
    """The experiments' Transformer: the task's vocabulary, `size` (d_model, n_heads, d_ff, layers)."""
    vocab = task.tokenizer.vocab_size
    settings = {
        "src_vocab_size": vocab,
        "tgt_vocab_size": vocab,
        "share_embeddings": True,
        "dropout": 0.1,
        "max_len": 256,
        "pad_id": PAD_ID,
        **size,
        **changes,
    }
    return TransformerConfig(**settings)


# ---------------------------------------------------------------------------------------------------------
# The translator under study: a checkpoint, or a model trained here


@dataclass
class Translator:
    model: nn.Module
    tokenizer: Tokenizer
    description: str


def trained_translator(context: Context, preset: str) -> Translator:
    """The checkpoint's model, or (without one) the baseline trained on the small task."""

    def make() -> Translator:
        if context.checkpoint is not None:
            from transformer.translate import Translator as Loaded

            loaded = Loaded.from_checkpoint(context.checkpoint)
            n = sum(p.numel() for p in loaded.model.parameters()) / 1e6
            return Translator(
                loaded.model.eval(),
                loaded.tokenizer,
                f"the checkpoint {context.checkpoint} ({n:.1f}M parameters)",
            )
        from transformer.experiments.training import baseline

        trained, task = baseline(context, preset)
        return Translator(
            trained.model,
            task.tokenizer,
            f"no checkpoint given: a small model trained here for {trained.curve[-1][0]} steps "
            f"({task.description})",
        )

    return context.memo(f"translator:{preset}", make)


def sentence_batch(translator: Translator, sentences: list[str]) -> torch.Tensor:
    """Source ids (batch, len) with EOS, right-padded."""
    return collate([(translator.tokenizer.encode(s), []) for s in sentences]).src


@functools.cache
def test_sentences(data_dir: Path = BUNDLED_DATA) -> list[tuple[str, str]]:
    return read_split(data_dir, "test2016", *LANGUAGES)
