"""Training on parallel text: data -> tokenizer -> batches -> Adam with warm-up -> validated checkpoints.

`train` sets a run up (data, tokenizer, model, optimizer; restored from a checkpoint on `--resume`), with
`transformer.prepare` reading the training text and making the tokenizer and the training ids;
`TrainingLoop` runs its epochs, and `finish` averages the last checkpoints and scores the test split.

The run directory is the whole state of a run: config.json, tokenizer.model, metrics.jsonl, the
`last`, `best` and `step-N` checkpoints and, at the end, results.json. `--resume` continues from `last`
(or from the newest complete checkpoint when a kill tore `last`; see `transformer.rundir`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from transformer import checkpoint, distributed, rundir
from transformer.config import (
    ModelConfig,
    RNNConfig,
    TrainConfig,
    TransformerConfig,
    config_to_dict,
    model_width,
)
from transformer.data.batching import BATCH_ORDER, Batch, collate
from transformer.data.corpus import read_split
from transformer.data.dataset import Corpus, encode_corpus
from transformer.data.tokenizer import PAD_ID, Tokenizer
from transformer.errors import TransformerError
from transformer.evaluate import Scores, score
from transformer.loss import compiles, label_smoothed_loss, projected_loss
from transformer.model import build_model
from transformer.onednn import use_onednn_linears, weight_gradients_in_mkl
from transformer.optim import build_optimizer
from transformer.precision import MixedPrecision, emulation_warning, maybe_compile
from transformer.prepare import (
    Parent,
    keep_text_digest,
    read_pairs,
    shows_bars,
    train_tokenizer,
    training_ids,
    training_text,
)
from transformer.rundir import MetricsLog
from transformer.runtime import configure_torch, release_free_memory
from transformer.search import SearchConfig
from transformer.translate import load_weights_into, translate_ids

MAX_BAD_STEPS = 5  # consecutive steps with a non-finite loss or gradient before a run is stopped


def batch_loss(
    forward: Callable[..., torch.Tensor], model: nn.Module, batch: Batch, smoothing: float
) -> torch.Tensor:
    """The summed label-smoothed loss of one training batch, through `forward` (the model, or its DDP or
    compiled wrapper), projecting only the positions that predict a token (`loss.projected_loss`)."""
    features = forward(batch.src, batch.tgt_in, project=False)  # (batch, tgt_len, features)
    return projected_loss(features, model.out_proj, batch.tgt_out, smoothing)


@torch.no_grad()
def validate(model: nn.Module, tokenizer: Tokenizer, corpus: Corpus, tc: TrainConfig) -> tuple[float, Scores]:
    """Per-token cross-entropy with teacher forcing (for perplexity), and BLEU of output decoded with
    `tc.valid_beam`."""
    model.eval()
    loss = teacher_forced_loss(model, corpus, tc.max_tokens)
    _, scores = translate_and_score(
        model, tokenizer, corpus, SearchConfig(beam=tc.valid_beam, length_penalty=tc.length_penalty)
    )
    model.train()
    return loss, scores


def teacher_forced_loss(model: nn.Module, corpus: Corpus, max_tokens: int) -> float:
    """Mean cross-entropy per target token given the reference prefix (no smoothing): log-perplexity.
    Under torchrun each process scores its share of the batches and the sums are pooled."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch_ids in distributed.shard(corpus.batches(max_tokens, shuffle=False)):
        batch = collate([(corpus.src[i], corpus.tgt[i]) for i in batch_ids]).to(device)
        logits = model(batch.src, batch.tgt_in)
        total += float(label_smoothed_loss(logits, batch.tgt_out, 0.0))
        tokens += batch.n_tgt_tokens
    total, tokens = distributed.all_sum([total, tokens])
    return total / max(tokens, 1)


def translate_and_score(
    model: nn.Module, tokenizer: Tokenizer, corpus: Corpus, search: SearchConfig
) -> tuple[list[str], Scores]:
    """Decode a corpus's sources and score the detokenised output against its raw references."""
    device = next(model.parameters()).device
    ids = distributed.map_sharded(lambda part: translate_ids(model, part, search, device=device), corpus.src)
    hypotheses = tokenizer.decode_batch(ids)
    return hypotheses, score(hypotheses, corpus.tgt_text)


def model_config_for(tc: TrainConfig, overrides: dict[str, Any], vocab_size: int) -> ModelConfig:
    """The model's config: the family's defaults (a preset for the Transformer), overrides, the vocabulary.

    The tokenizer's sizes and padding id, and `tc.model`'s family, win over any override: a model with
    another vocabulary would index past its embeddings, or mask the wrong positions."""
    values = {**overrides, "src_vocab_size": vocab_size, "tgt_vocab_size": vocab_size, "pad_id": PAD_ID}
    if tc.model == "transformer":
        return TransformerConfig.preset(tc.preset, **values)
    return RNNConfig(**{**values, "kind": tc.model})


def _rng_state() -> dict[str, Any]:
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}  # dropout on the GPU
    return {"torch": torch.get_rng_state(), "python": random.getstate(), **cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _diverged_message(run_dir: Path, step: int) -> str:
    """Why the run stopped, and where it can go on from: nothing is saved after a divergence."""
    advice = "lower lr_factor, raise warmup or set clip_norm"
    if "last" in checkpoint.list_checkpoints(run_dir):
        where = f"the last good checkpoint {run_dir / 'last'} is kept: resume from it and {advice}"
    else:
        where = f"no checkpoint was saved yet: {advice}"
    return (
        f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient (at step {step}); stopped, {where}"
    )


class TrainingInterrupted(TransformerError):
    """SIGINT or SIGTERM stopped the run after saving it."""

    label, exit_status = "interrupted", 130


@contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """Turn SIGINT/SIGTERM into a request noted in the yielded list, so that the loop can finish the current
    step and save before stopping; the previous handlers come back afterwards."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _non_finite(loss_sum: float, model: nn.Module, mixed: MixedPrecision) -> str | None:
    """Why this step must be skipped, or None. Under fp16 loss scaling an overflowing gradient is routine,
    and GradScaler skips that step and lowers its scale itself, so only the loss is judged then."""
    if not math.isfinite(loss_sum):
        return "non-finite loss"
    if mixed.scales_loss:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return None if torch.isfinite(torch.nn.utils.get_total_norm(grads)) else "non-finite gradient"


BUDGETS = ("max_steps", "time_budget_minutes", "max_epochs")


def _budget_raised(saved: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a resumed run was given a larger step, time or epoch budget than the `saved` one (0 meaning
    no limit)."""

    def limit(value: float) -> float:
        return value or float("inf")

    return any(limit(getattr(tc, key)) > limit(saved.get(key, getattr(tc, key))) for key in BUDGETS)


@dataclasses.dataclass
class Window:
    """The sums behind the next `train` log record: saved, so a resumed run logs what an unbroken one does."""

    loss: float = 0.0
    tokens: int = 0
    pad: float = 0.0
    batches: int = 0


@dataclasses.dataclass
class Progress:
    """Where a run stands. Every checkpoint saves it (as the plain dict `progress`), so that a resumed run
    takes the same batches, the same schedule and the same budget as an unbroken one."""

    step: int = 0  # optimizer updates
    epoch: int = 0
    batch: int = 0  # batches of this epoch done, by all processes together
    best_bleu: float = -1.0
    stale_evals: int = 0  # validations since the best one, for early stopping
    bad_steps: int = 0  # steps skipped in a row for a non-finite loss or gradient
    skipped_steps: int = 0  # such steps in all
    tokens_seen: int = 0  # target tokens trained on (the comparison card's FLOP count uses it)
    seconds: float = 0.0  # wall time of the run so far, across resumptions: the time budget counts this
    validated_step: int = -1  # the last step validated and saved
    batch_order: int = BATCH_ORDER  # how this epoch's batches were shuffled (batching.BATCH_ORDER)
    window: Window = dataclasses.field(default_factory=Window)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """Read a checkpoint's `progress`; a key an older run did not save takes its default, but for the
        batch order: such a run shuffled with the first one, which its epoch must go on with."""
        known = {field.name for field in dataclasses.fields(cls)} - {"window"}
        fields = {"batch_order": 1, **{k: v for k, v in saved.items() if k in known}}
        return cls(**fields, window=Window(**saved.get("window", {})))


def train(
    tc: TrainConfig, model_overrides: dict[str, Any], run_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """Train a model into `run_dir` and return the final results (validation and test scores)."""
    started = time.monotonic()
    configure_torch(tc.threads)
    device = distributed.init()  # joins the process group under torchrun; see transformer/distributed.py
    mixed = MixedPrecision(tc.precision, device.type)  # refuses fp16 on CPU before anything is written
    if note := emulation_warning(tc.precision, device.type):
        tqdm.write(note)
    parent = None  # a resumed run goes on from its own checkpoints
    if tc.init_from and not resume:  # rank 0 reads it: the others may not see its disk (as the text's)
        parent = distributed.from_main(distributed.on_main(partial(Parent.read, tc.init_from)))
        tc = parent.adopted_by(tc, model_overrides)
    # Read the data first: a bad corpus stops the run before anything is written. Only rank 0 reads the
    # training text, a block at a time (gigabytes at WMT's size): the others train from the ids it keeps.
    # A resume reads it only if its files changed: else the digest kept in the run directory is its own.
    new_tokenizer = not resume and parent is None
    train_text = distributed.on_main(
        partial(training_text, tc, run_dir, resume=resume, sample=new_tokenizer), long=True
    )
    train_digest = distributed.from_main(train_text.digest if train_text is not None else "")
    valid_pairs = read_pairs(tc, tc.valid_split)
    # The test split is scored only at the end, but a missing or broken one is known before training.
    test_pairs = read_split(tc.data_dir, tc.test_split, tc.src_lang, tc.tgt_lang) if tc.test_split else []
    if resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise TransformerError(f"cannot resume: {run_dir} holds no checkpoint")
        saved_record = rundir.read_run_record(run_dir)
        resume_from = rundir.resume_point(run_dir)  # read now: a run that cannot resume is left as it was
        # A kill leaves at most a fragment of a metrics line and dead temp files: tidy both.
        rundir.drop_partial_line(run_dir / "metrics.jsonl")
        rundir.remove_stale_temp_files(run_dir)
    elif held := checkpoint.list_checkpoints(run_dir):  # any: a new run would mix them in or replace them
        raise TransformerError(
            f"{run_dir} already holds a run (checkpoints {', '.join(held)}): pass --resume to continue it, "
            f"or choose --out"
        )
    rundir.create_run_dir(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl", fresh=not resume)  # not after a failed run's history
    if resume:
        tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    else:
        rundir.remove_stale_temp_files(run_dir)  # a new run killed before its first checkpoint: GBs of ids
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        if parent is not None:  # its tokenizer, which the parent's weights read
            model_bytes = parent.tokenizer_bytes
            distributed.on_main(
                partial(checkpoint.atomic_write_bytes, run_dir / "tokenizer.model", model_bytes)
            )
        else:
            lines = train_text.sample.take_lines() if train_text and train_text.sample else []
            n_pairs = train_text.pairs if train_text else 0
            release_free_memory()  # what the sample's first strings held, for SentencePiece's peak
            trained = distributed.on_main(
                partial(train_tokenizer, lines, n_pairs, tc, run_dir, log), long=True
            )
            del lines
            release_free_memory()  # what SentencePiece freed: 36M pairs tokenised with 1.15 GB, not 2.30 GB
            model_bytes = distributed.from_main(trained and trained.model_bytes)  # rank 0 trains it for all
        tokenizer = Tokenizer(model_bytes, run_dir / "tokenizer.model")

    model_config = (
        parent.model_config if parent else model_config_for(tc, model_overrides, tokenizer.vocab_size)
    )
    longest = model_config.max_len - 1  # tokens a sentence may have beside its BOS or EOS
    if tc.max_len > longest:
        raise TransformerError(
            f"max_len={tc.max_len} lets through training sentences the model cannot take "
            f"(model.max_len={model_config.max_len}, less one position for BOS/EOS): lower max_len or "
            f"raise model.max_len"
        )
    # What the run derives from; the kept training ids are keyed by the same digests.
    data_digests = {"train": train_digest, "valid": rundir.data_sha256(valid_pairs)}
    tokenizer_digest = tokenizer.sha256()
    run_config = rundir.run_record(
        config_to_dict(model_config), config_to_dict(tc), tokenizer_digest, data_digests
    )
    if resume:
        rundir.check_resumable(run_dir, saved_record, run_config)
    record = json.dumps(run_config, indent=2) + "\n"
    distributed.on_main(partial(checkpoint.atomic_write_text, run_dir / "config.json", record))
    distributed.on_main(partial(keep_text_digest, run_dir, train_text))  # the next resume need not read it

    ids_key = {"text": data_digests["train"], "tokenizer": tokenizer_digest, "max_len": str(tc.max_len)}
    train_data, train_stats, ids_read = training_ids(tc, tokenizer, run_dir, ids_key)
    release_free_memory()
    valid_data, valid_stats = encode_corpus(valid_pairs, tokenizer, longest)
    if len(valid_data) == 0:  # now, not at the first validation
        raise TransformerError(
            f"the {tc.valid_split!r} split has no pair left to validate on: {valid_stats['too_long']} of "
            f"{valid_stats['pairs']} have more than the model's {longest} tokens a side (raise "
            f"model.max_len), {valid_stats['empty']} an empty side"
        )
    if valid_stats["too_long"]:
        tqdm.write(
            f"warning: {valid_stats['too_long']} {tc.valid_split} pairs have more than the model's {longest} "
            f"tokens a side: validation leaves them out"
        )
    log.write(event="data", train=train_stats, valid=valid_stats, train_ids_read=ids_read)
    log.write(event="precision", precision=mixed.precision, device=device.type)  # what `auto` chose
    if len(train_data) == 0:
        raise TransformerError(f"no training pairs left in {tc.data_dir}/{tc.train_split} after filtering")
    tqdm.write(
        f"train: {train_stats['kept']} pairs kept of {train_stats['pairs']} "
        f"({train_stats['empty']} empty, {train_stats['too_long']} longer than {tc.max_len} tokens dropped)"
    )

    model = build_model(model_config).to(device)
    # Where MKL is slow (AMD CPUs: transformer/onednn.py) fp32 products go to oneDNN; compile picks its own.
    onednn = device.type == "cpu" and not tc.compile and use_onednn_linears(model) > 0
    distributed.seed_rank(tc.seed)  # the processes' dropout masks differ (a resumed run restores its own)
    optimizer, scheduler = build_optimizer(
        model, model_width(model_config), tc.warmup, tc.lr_factor, tc.weight_decay
    )
    progress = Progress()
    if parent is not None:
        distributed.on_main(partial(load_weights_into, model, parent.weights_file))
        distributed.sync_from_main(model)
        log.write(event="init", checkpoint=str(parent.weights_file.resolve()))
        tqdm.write(f"starting from the weights of {parent.weights_file}, with a new optimizer and schedule")
    if resume:
        progress = _restore(resume_from, model, optimizer, scheduler, tc, saved_record["train"], log)
        started -= progress.seconds  # the clock continues where the saved run stopped
        where = f"{resume_from[0]} at step {progress.step} (epoch {progress.epoch + 1})"
        tqdm.write(f"resuming {run_dir} from {where}")
    kernels = ""
    if onednn:
        fp32_training = mixed.precision == "fp32"  # under autocast the linears are autocast's
        mkl = ", weight gradients in MKL" if fp32_training and weight_gradients_in_mkl() else ""
        kernels = f" (fp32 products in oneDNN{mkl})"
    if compiles(device):  # else the first step's silence looks like a hang
        kernels += " (the loss is compiled for this GPU at the first step: some seconds)"
    tqdm.write(
        f"model: {model.num_parameters() / 1e6:.1f}M parameters, {mixed.precision} on {device.type}"
        f"{kernels}; writing to {run_dir}"
    )
    loop = TrainingLoop(
        tc,
        run_dir,
        model,
        optimizer,
        scheduler,
        mixed,
        log,
        progress,
        started,
        lambda: validate(model, tokenizer, valid_data, tc),
    )
    loop.run(train_data)
    results = finish(model, tokenizer, tc, run_dir, valid_data, test_pairs, log, started, progress.best_bleu)
    del loop  # its DistributedDataParallel wrapper holds the process group
    distributed.shutdown()
    return results


def _restore(
    resume_from: tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    tc: TrainConfig,
    saved_train_config: dict[str, Any],
    log: MetricsLog,
) -> Progress:
    """Load a checkpoint into the new model, optimizer and schedule, restore this process's random streams,
    and return the saved progress."""
    name, weights, saved, notes = resume_from
    for note in notes:
        tqdm.write(f"warning: skipped checkpoint {note}")
    model.load_state_dict(weights)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    progress = Progress.from_dict(saved["progress"])
    own_rng = distributed.own_state(saved.get("rng_per_rank", [saved["rng"]]))
    _set_rng_state(own_rng or saved["rng"])
    if own_rng is None:  # resumed on a different number of processes: derive the streams anew
        distributed.seed_rank(tc.seed, progress.step)
    log.write(event="resume", step=progress.step, checkpoint=name)
    schedule = scheduler.lr_lambdas[0]  # a WarmupSchedule, as saved: with the run's old factor and warm-up
    schedule.factor = tc.lr_factor  # which a resume may change (rundir.MAY_CHANGE)
    schedule.warmup = tc.warmup
    # The budget the checkpoint's cool-down was planned for: config.json may already hold a larger one, of
    # a resume that stopped before it saved.
    if _budget_raised(saved.get("budget", saved_train_config), tc) and schedule.cooling:
        # The run was given more steps or time than its cool-down was planned for: return to the
        # paper's rate, and cool down anew over the last `cooldown` of the new budget.
        schedule.cancel_cooldown()
        log.write(event="cooldown_reset", step=progress.step)
    for group in optimizer.param_groups:  # the next step's rate, as LambdaLR sets it
        group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
    return progress


class TrainingLoop:
    """The epochs of one run: steps, logs, validations, checkpoints and the stops (budget, early stopping,
    signals, divergence). It updates `progress`, which every checkpoint saves.

    Under torchrun every process runs this loop on its shard of each step's batches; every decision to stop
    is agreed (`distributed.any_rank`), so that the processes take the same number of steps."""

    def __init__(
        self,
        tc: TrainConfig,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        mixed: MixedPrecision,
        log: MetricsLog,
        progress: Progress,
        started: float,
        validate: Callable[[], tuple[float, Scores]],
    ) -> None:
        self.tc, self.run_dir, self.log, self.progress, self.started = tc, run_dir, log, progress, started
        self.validate = validate  # validation loss and scores of the model as it is
        self.model, self.optimizer, self.scheduler, self.mixed = model, optimizer, scheduler, mixed
        self.schedule = scheduler.lr_lambdas[0]  # a WarmupSchedule; the cool-down is set on it while training
        self.device = next(model.parameters()).device
        self.train_model = distributed.wrap(model)  # DDP under torchrun: forward and backward go through this
        if distributed.world_size() > 1:
            log.write(event="distributed", world_size=distributed.world_size(), backend=distributed.backend())
        self.pace = (time.monotonic(), progress.step)  # this process's time per step, evals included
        self.window_started = time.monotonic()  # of the tokens/s in the next `train` record
        # Shares the model's parameters; `model` is what is saved.
        self.forward = maybe_compile(self.train_model, tc.compile)

    def run(self, train_data: Corpus) -> None:
        """Train until a budget, early stopping or the epochs end; the final weights are always validated."""
        # Ctrl-C or SIGTERM: save `last` after this step, then exit. `bars` clears the progress bar whatever
        # ends the loop, so that an error is printed on a line of its own.
        with _stop_on_signals() as stop_signal, ExitStack() as bars:
            self.model.train()
            stop = self.out_of_time()  # a resumed run may have used its budget already
            if stop or self.progress.epoch >= self.tc.max_epochs:
                tqdm.write(
                    f"nothing to train: the run's budget is spent at step {self.progress.step} (raise "
                    "time_budget_minutes, max_steps or max_epochs to go on); averaging and scoring again"
                )
            while not stop and self.progress.epoch < self.tc.max_epochs:
                stop = self.epoch(train_data, stop_signal, bars)
                if self.out_of_time():
                    stop = True
        if self.progress.validated_step != self.progress.step:
            self.evaluate_and_save()

    def epoch(self, train_data: Corpus, stop_signal: list[str], bars: ExitStack) -> bool:
        """Go on with the current epoch (a resumed run may start mid-epoch); True when training must stop."""
        p, tc = self.progress, self.tc
        building = time.monotonic()
        batches = train_data.batches(
            tc.max_tokens, shuffle=True, seed=tc.seed, epoch=p.epoch, order=p.batch_order
        )
        self.window_started += time.monotonic() - building  # training time only: 4 s at 36M pairs
        bar = tqdm(
            total=len(batches),
            initial=p.batch,
            desc=f"epoch {p.epoch + 1}",
            leave=False,
            dynamic_ncols=True,
            disable=not shows_bars(),
        )
        bars.callback(bar.close)
        # A step takes `accumulate` batches per process; `p.batch` counts the batches of all processes.
        per_step = tc.accumulate * distributed.world_size()
        steps_per_epoch = math.ceil(distributed.usable(len(batches)) / per_step)
        # Where this epoch's steps end: a whole number of batches per process from where it stands, which a
        # run resumed on another number of processes may leave anywhere, so that no process is given none
        # (it would skip DDP's all-reduce that the others wait in).
        left = len(batches) - p.batch
        end = p.batch + left - left % distributed.world_size()
        stop = False
        while p.batch < end:
            step_batches = batches[p.batch : min(p.batch + per_step, end)]
            updated = self.step(train_data, step_batches)
            bar.update(len(step_batches))
            if not updated:
                continue
            if tc.cooldown and not self.schedule.cooling:
                self.maybe_begin_cooldown(steps_per_epoch)
            taken = self.optimizer.param_groups[0]["lr"]  # the rate of the step just taken, which is logged
            self.scheduler.step()  # the rate of the next step
            if p.step % tc.log_every == 0:
                self.log_window(bar, taken)
            if tc.eval_every and p.step % tc.eval_every == 0:
                paused = time.monotonic()
                stop = self.evaluate_and_save()
                self.window_started += time.monotonic() - paused  # tokens/s counts training time only
                if stop:
                    break
            if distributed.any_rank(bool(stop_signal)):
                self.save("last")
                # Under torchrun the first process to exit makes the launcher terminate the others: none
                # leaves before rank 0 has written `last`.
                distributed.barrier()
                why = stop_signal[0] if stop_signal else "a signal to another process"
                raise TrainingInterrupted(
                    f"stopped by {why} at step {p.step}; saved {self.run_dir}/last: "
                    f"continue with `transformer train --out {self.run_dir} --resume`"
                )
            if self.out_of_time():
                stop = True
                break
        bar.close()
        if p.batch >= end:  # the epoch is done (a stop may come at its last step)
            p.epoch, p.batch = p.epoch + 1, 0
            p.batch_order = BATCH_ORDER  # an older run's next epoch may shuffle as this version does
            if not tc.eval_every and self.evaluate_and_save():
                stop = True
        return stop

    def step(self, train_data: Corpus, step_batches: list[list[int]]) -> bool:
        """One update from the batches of all processes (this process takes its shard); False when a
        non-finite loss or gradient made it skip the update."""
        p, window = self.progress, self.progress.window
        self.optimizer.zero_grad(set_to_none=True)
        collated = [
            collate([(train_data.src[i], train_data.tgt[i]) for i in ids]).to(self.device)
            for ids in distributed.shard(step_batches)
        ]
        # The mean over the target tokens of the whole step, EOS included as in `collate`; DDP's average
        # over the processes cancels the factor world_size.
        tokens = sum(train_data.tgt.length(i) + 1 for ids in step_batches for i in ids)
        loss_sum = padding = 0.0
        for k, batch in enumerate(collated):
            with distributed.gradient_sync(self.train_model, k == len(collated) - 1):
                with self.mixed.autocast():
                    loss = batch_loss(self.forward, self.model, batch, self.tc.label_smoothing)
                self.mixed.backward(loss / tokens * distributed.world_size())
            loss_sum += float(loss.detach())
            padding += batch.padding_fraction
        # All processes judge the same loss; the log's padding is of every process's batches.
        loss_sum, padding, batches = distributed.all_sum([loss_sum, padding, float(len(collated))])
        window.pad += padding
        window.batches += int(batches)
        p.batch += len(step_batches)
        problem = _non_finite(loss_sum, self.model, self.mixed)
        if problem:
            # Skipped: no update, so weights and Adam's moments stay as the last good step left them.
            p.bad_steps += 1
            p.skipped_steps += 1
            self.log.write(
                event="skipped_step",
                step=p.step,
                reason=problem,
                in_a_row=p.bad_steps,
                total=p.skipped_steps,
            )
            if p.bad_steps >= MAX_BAD_STEPS:
                raise TransformerError(_diverged_message(self.run_dir, p.step))
            return False
        p.bad_steps = 0
        self.mixed.step(self.optimizer, self.model, self.tc.clip_norm)
        p.step += 1
        p.tokens_seen += tokens
        window.loss += loss_sum
        window.tokens += tokens
        return True

    def log_window(self, bar: tqdm, lr: float) -> None:
        """Write the `train` record of the steps since the last one, and show it on the progress bar; `lr`
        is the rate of the last of them."""
        p, window, now = self.progress, self.progress.window, time.monotonic()
        record = {
            "event": "train",
            "step": p.step,
            "epoch": p.epoch,
            "loss": window.loss / max(window.tokens, 1),
            "lr": lr,
            "tokens_per_s": window.tokens / max(now - self.window_started, 1e-9),
            "padding": window.pad / max(window.batches, 1),
            "tokens_seen": p.tokens_seen,
            "elapsed": now - self.started,
        }
        self.log.write(**record)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
        )
        if bar.disable and distributed.is_main():  # no bar (output to a file): a plain line instead
            tqdm.write(
                f"step {p.step} (epoch {p.epoch + 1}): loss {record['loss']:.3f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s"
            )
        p.window, self.window_started = Window(), now

    def maybe_begin_cooldown(self, steps_per_epoch: int) -> None:
        """Start the cool-down once the last `tc.cooldown` of the run is reached: of its time budget, or of
        its step budget (`max_steps`, or `max_epochs` of `steps_per_epoch`), whichever ends first. Its last
        step is that step budget, or as many steps as the time left holds at the pace so far (rank 0's
        estimate): fixed once, and saved with the scheduler, so a resumed run decays as an unbroken one."""
        tc, step = self.tc, self.progress.step
        elapsed = time.monotonic() - self.started
        step_budget = min(s for s in (tc.max_steps, tc.max_epochs * steps_per_epoch) if s)
        by_time = tc.time_budget_minutes and elapsed >= (1 - tc.cooldown) * tc.time_budget_minutes * 60
        by_steps = step >= (1 - tc.cooldown) * step_budget
        if not distributed.any_rank(bool(by_time or by_steps)):  # agreed, like the stops
            return
        ends = [step_budget]
        if tc.time_budget_minutes:
            since, first_step = self.pace
            seconds_per_step = (time.monotonic() - since) / max(step - first_step, 1)
            ends.append(step + int((tc.time_budget_minutes * 60 - elapsed) / seconds_per_step))
        end = distributed.from_main(max(min(ends), step + 1))
        self.schedule.begin_cooldown(step, end)
        self.log.write(event="cooldown", step=step, until=end)

    def out_of_time(self) -> bool:
        """Whether a time or step budget is spent, or the cool-down has ended."""
        tc, step = self.tc, self.progress.step
        over_budget = tc.time_budget_minutes and time.monotonic() - self.started > tc.time_budget_minutes * 60
        over_steps = tc.max_steps and step >= tc.max_steps
        # Agreed: one process's clock running out stops them all at the same step.
        return distributed.any_rank(bool(over_budget or over_steps or self.schedule.done(step)))

    def evaluate_and_save(self) -> bool:
        """Validate, checkpoint; return True when early stopping says to stop."""
        p = self.progress
        valid_loss, valid_scores = self.validate()
        p.validated_step = p.step
        improved = valid_scores.bleu > p.best_bleu
        # `best` may hold more than this run's progress knows of: an average (`finish`) or, after a kill,
        # this very step (see the save order below).
        beats_best = valid_scores.bleu > max(p.best_bleu, kept_best_bleu(self.run_dir))
        if improved:
            p.best_bleu, p.stale_evals = valid_scores.bleu, 0
        else:
            p.stale_evals += 1
        ppl = math.exp(min(valid_loss, 50))
        self.log.write(
            event="valid",
            step=p.step,
            epoch=p.epoch,
            loss=valid_loss,
            ppl=ppl,
            bleu=valid_scores.bleu,
            chrf=valid_scores.chrf,
            elapsed=time.monotonic() - self.started,
        )
        tqdm.write(
            f"step {p.step}: valid loss {valid_loss:.3f} ppl {ppl:.2f} "
            f"BLEU {valid_scores.bleu:.2f}{' (best)' if improved else ''}"
        )
        # `best` first: a kill after it leaves `last` (or an older `step-N`) to resume from, which validates
        # this step again and saves `best` anew; after `step-N` it would leave a resume from `step-N`,
        # whose progress counts this score as the best, with `best` never saved.
        if beats_best:
            self.save("best", valid_bleu=valid_scores.bleu)
        self.save(f"step-{p.step:07d}")
        distributed.on_main(
            partial(checkpoint.prune_checkpoints, self.run_dir, keep=max(self.tc.average_last, 1))
        )
        self.save("last")
        return bool(self.tc.patience and p.stale_evals >= self.tc.patience)

    def save(self, name: str, valid_bleu: float | None = None) -> None:
        """Checkpoint the weights with all a resumed run needs: optimizer, schedule, progress, and every
        process's random streams; `best` with the validation BLEU it beat the others with."""
        self.progress.seconds = time.monotonic() - self.started
        rng_per_rank = distributed.all_gather(_rng_state())  # every process's, to resume each exactly
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "progress": self.progress.to_dict(),
            "budget": {key: getattr(self.tc, key) for key in BUDGETS},  # what the cool-down is planned for
        }
        # Rank 0 writes; a write that fails (a full disk) stops every process with its error.
        scored = None if valid_bleu is None else {VALID_BLEU: repr(valid_bleu)}
        distributed.on_main(
            partial(checkpoint.save_checkpoint, self.run_dir, name, self.model, state, scored)
        )


VALID_BLEU = "valid_bleu"  # the header entry of `best` that holds its validation BLEU


def kept_best_bleu(run_dir: Path) -> float:
    """The validation BLEU that `best` was saved with (rank 0's file), which a checkpoint or an average must
    beat to replace it; -1 where none is recorded (a new run, one saved before it was recorded)."""
    path = run_dir / f"best{checkpoint.WEIGHTS_SUFFIX}"
    metadata = distributed.from_main(distributed.on_main(partial(checkpoint.read_metadata, path)))
    return float(metadata.get(VALID_BLEU, -1.0))


def finish(
    model: nn.Module,
    tokenizer: Tokenizer,
    tc: TrainConfig,
    run_dir: Path,
    valid_data: Corpus,
    test_pairs: list[tuple[str, str]],
    log: MetricsLog,
    started: float,
    best_bleu: float,
) -> dict[str, Any]:
    """Average the last checkpoints (kept as `best` if it validates better), then score the test split
    (`test_pairs`, read when the run started)."""
    # Rank 0's disk decides (the others may not share it); its weights are then copied to all processes.
    names = distributed.from_main([n for n in checkpoint.list_checkpoints(run_dir) if n.startswith("step-")])
    recent = (
        [run_dir / f"{name}.safetensors" for name in names[-tc.average_last :]] if tc.average_last > 1 else []
    )
    results: dict[str, Any] = {"valid_best_single": best_bleu}
    average_is_best = False
    if len(recent) > 1:
        distributed.on_main(lambda: model.load_state_dict(checkpoint.average_weights(recent)))
        distributed.sync_from_main(model)
        _, avg_scores = validate(model, tokenizer, valid_data, tc)
        results["valid_averaged"] = avg_scores.bleu
        log.write(event="average", checkpoints=[p.name for p in recent], bleu=avg_scores.bleu)
        tqdm.write(
            f"average of the last {len(recent)} checkpoints: valid BLEU {avg_scores.bleu:.2f} "
            f"(best single {best_bleu:.2f})"
        )
        average_is_best = avg_scores.bleu > max(best_bleu, kept_best_bleu(run_dir))  # an earlier average's
        if average_is_best:
            state = {"source": "average", "checkpoints": names[-len(recent) :]}
            scored = {VALID_BLEU: repr(avg_scores.bleu)}
            distributed.on_main(partial(checkpoint.save_checkpoint, run_dir, "best", model, state, scored))
    if not average_is_best:
        distributed.on_main(
            lambda: model.load_state_dict(checkpoint.load_weights(run_dir / "best.safetensors"))
        )
        distributed.sync_from_main(model)

    if tc.test_split:
        test_data, _ = encode_corpus(test_pairs, tokenizer, None)
        model.eval()
        search = SearchConfig(beam=tc.beam, length_penalty=tc.length_penalty)
        hypotheses, test_scores = translate_and_score(model, tokenizer, test_data, search)
        hypotheses_file = run_dir / f"{tc.test_split}.hyp.{tc.tgt_lang}"
        distributed.on_main(
            partial(checkpoint.atomic_write_text, hypotheses_file, "\n".join(hypotheses) + "\n")
        )
        results[tc.test_split] = test_scores.to_dict()
        tqdm.write(f"{tc.test_split} (beam {tc.beam}):\n{test_scores}")
    results["wall_seconds"] = time.monotonic() - started
    log.write(event="results", **results)
    # The others wait for rank 0's write: the run directory is complete when any process returns.
    distributed.on_main(
        partial(checkpoint.atomic_write_text, run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    )
    return results


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments -> dict; values stay strings and are typed against the config fields.

    A key given again overrides its earlier value, as a repeated option does with argparse, so that a
    script can append settings to a base command. The keys keep the order they were last given in, so
    that of `d_model=…` and `model.d_model=…` (one setting) the later one wins too."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TransformerError(f"expected key=value, got {pair!r}")
        out.pop(key.strip(), None)
        out[key.strip()] = value.strip()
    return out
