"""Training on parallel text: data -> tokenizer -> batches -> Adam with warm-up -> validated checkpoints.

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
from transformer.data.batching import Batch, collate, token_batches
from transformer.data.corpus import filter_pairs, read_split
from transformer.data.tokenizer import PAD_ID, Tokenizer, round_trip_mismatches
from transformer.errors import TransformerError
from transformer.evaluate import Scores, score
from transformer.loss import label_smoothed_loss, projected_loss
from transformer.model import Transformer, build_model
from transformer.optim import build_optimizer
from transformer.precision import MixedPrecision, maybe_compile
from transformer.runtime import configure_torch
from transformer.search import SearchConfig
from transformer.translate import translate_ids

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run is stopped


@dataclasses.dataclass
class Corpus:
    """Tokenised pairs of one split, with the raw target text kept for BLEU."""

    src: list[list[int]]
    tgt: list[list[int]]
    tgt_text: list[str]

    def __len__(self) -> int:
        return len(self.src)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed, so a killed run keeps its history."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if not distributed.is_main():  # rank 0 logs for all processes
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def encode_corpus(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_len: int | None
) -> tuple[Corpus, dict[str, int]]:
    """Tokenise pairs, dropping empty ones and (with `max_len`) over-long ones; returns the counts too."""
    src = tokenizer.encode_batch([s for s, _ in pairs])
    tgt = tokenizer.encode_batch([t for _, t in pairs])
    keep, dropped = filter_pairs(list(zip(src, tgt, strict=True)), max_len or 10**9)
    corpus = Corpus([src[i] for i in keep], [tgt[i] for i in keep], [pairs[i][1] for i in keep])
    return corpus, {"pairs": len(pairs), "kept": len(keep), **dropped}


def build_tokenizer(
    pairs: list[tuple[str, str]], tc: TrainConfig, run_dir: Path, log: MetricsLog
) -> Tokenizer:
    """Train the joint subword model on the training pairs (both sides) and check it round-trips."""
    texts = [text for pair in pairs for text in pair if text]
    tokenizer = Tokenizer.train(texts, run_dir / "tokenizer.model", vocab_size=tc.vocab_size)
    mismatches = round_trip_mismatches(tokenizer, texts)
    log.write(
        event="tokenizer",
        vocab_size=tokenizer.vocab_size,
        lines=len(texts),
        round_trip_mismatches=len(mismatches),
    )
    if mismatches:
        tqdm.write(
            f"warning: {len(mismatches)} of {len(texts)} training lines do not survive decode(encode(text))"
        )
    return tokenizer


def batch_loss(
    forward: Callable[..., torch.Tensor], model: nn.Module, batch: Batch, smoothing: float
) -> torch.Tensor:
    """The summed label-smoothed loss of one training batch, through `forward` (the model, or its DDP or
    compiled wrapper). The Transformer projects only the positions that predict a token (see
    transformer.loss.projected_loss)."""
    if isinstance(model, Transformer):
        hidden = forward(batch.src, batch.tgt_in, project=False)  # (batch, tgt_len, d_model)
        return projected_loss(hidden, model.out_proj, batch.tgt_out, smoothing)
    return label_smoothed_loss(forward(batch.src, batch.tgt_in), batch.tgt_out, smoothing)


@torch.no_grad()
def validate(
    model: nn.Module, tokenizer: Tokenizer, corpus: Corpus, tc: TrainConfig, beam: int
) -> tuple[float, Scores]:
    """Per-token cross-entropy with teacher forcing (for perplexity), and BLEU of decoded output."""
    model.eval()
    loss = teacher_forced_loss(model, corpus, tc.max_tokens)
    _, scores = translate_and_score(
        model, tokenizer, corpus, SearchConfig(beam=beam, length_penalty=tc.length_penalty)
    )
    model.train()
    return loss, scores


def teacher_forced_loss(model: nn.Module, corpus: Corpus, max_tokens: int) -> float:
    """Mean cross-entropy per target token given the reference prefix (no smoothing): log-perplexity.
    Under torchrun each process scores its share of the batches and the sums are pooled."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    batches = token_batches(
        [len(s) for s in corpus.src], [len(t) for t in corpus.tgt], max_tokens, shuffle=False
    )
    for batch_ids in distributed.shard(batches):
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
    """The model's config: the family's defaults (a preset for the Transformer), the vocabulary, overrides."""
    values = {"src_vocab_size": vocab_size, "tgt_vocab_size": vocab_size, "pad_id": PAD_ID, **overrides}
    if tc.model == "transformer":
        return TransformerConfig.preset(tc.preset, **values)
    return RNNConfig(**{"kind": tc.model, **values})


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


def _budget_raised(saved: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a resumed run was given a larger step, time or epoch budget than it was started with
    (0 meaning no limit)."""

    def limit(value: float) -> float:
        return value or float("inf")

    budgets = ("max_steps", "time_budget_minutes", "max_epochs")
    return any(limit(getattr(tc, key)) > limit(saved.get(key, getattr(tc, key))) for key in budgets)


def train(
    tc: TrainConfig, model_overrides: dict[str, Any], run_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """Train a model into `run_dir` and return the final results (validation and test scores)."""
    started = time.monotonic()
    configure_torch(tc.threads)
    device = distributed.init()  # joins the process group under torchrun; see transformer/distributed.py
    mixed = MixedPrecision(tc.precision, device.type)  # refuses fp16 on CPU before anything is written
    # Read the data first: a bad corpus stops the run before anything is written.
    train_pairs, valid_pairs = (
        read_split(tc.data_dir, tc.train_split, tc.src_lang, tc.tgt_lang),
        read_split(tc.data_dir, tc.valid_split, tc.src_lang, tc.tgt_lang),
    )
    for split, pairs in ((tc.train_split, train_pairs), (tc.valid_split, valid_pairs)):
        if not any(src and tgt for src, tgt in pairs):
            raise TransformerError(
                f"the {split!r} split in {tc.data_dir} is empty (no line pair with text on both sides)"
            )
    if resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise TransformerError(f"cannot resume: {run_dir} holds no checkpoint")
        saved_record = rundir.read_run_record(run_dir)
        resume_from = rundir.resume_point(run_dir)  # read now: a run that cannot resume is left as it was
        # A kill leaves at most a fragment of a metrics line and dead temp files: tidy both.
        rundir.drop_partial_line(run_dir / "metrics.jsonl")
        rundir.remove_stale_temp_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")
    if resume:
        tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    else:
        if (run_dir / "last.safetensors").exists():
            raise TransformerError(
                f"{run_dir} already holds a run: pass --resume to continue it, or choose --out"
            )
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        trained = build_tokenizer(train_pairs, tc, run_dir, log) if distributed.is_main() else None
        model_bytes = distributed.from_main(trained and trained.model_bytes)  # rank 0 trains it for all
        tokenizer = Tokenizer(model_bytes, run_dir / "tokenizer.model")

    model_config = model_config_for(tc, model_overrides, tokenizer.vocab_size)
    run_config = rundir.run_record(
        config_to_dict(model_config),
        config_to_dict(tc),
        tokenizer.sha256(),
        {"train": rundir.data_sha256(train_pairs), "valid": rundir.data_sha256(valid_pairs)},
    )
    if resume:
        rundir.check_resumable(run_dir, saved_record, run_config)
    if distributed.is_main():
        checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(run_config, indent=2) + "\n")

    train_data, train_stats = encode_corpus(train_pairs, tokenizer, tc.max_len)
    valid_data, valid_stats = encode_corpus(valid_pairs, tokenizer, None)
    log.write(event="data", train=train_stats, valid=valid_stats)
    log.write(event="precision", precision=mixed.precision, device=device.type)  # what `auto` chose
    if len(train_data) == 0:
        raise TransformerError(f"no training pairs left in {tc.data_dir}/{tc.train_split} after filtering")
    tqdm.write(
        f"train: {train_stats['kept']} pairs kept of {train_stats['pairs']} "
        f"({train_stats['empty']} empty, {train_stats['too_long']} longer than {tc.max_len} tokens dropped)"
    )

    model = build_model(model_config).to(device)
    distributed.seed_rank(tc.seed)  # the processes' dropout masks differ (a resumed run restores its own)
    optimizer, scheduler = build_optimizer(
        model, model_width(model_config), tc.warmup, tc.lr_factor, tc.weight_decay
    )
    schedule = scheduler.lr_lambdas[0]  # a WarmupSchedule; the cool-down is set on it while training
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_bleu": -1.0,
        "stale_evals": 0,
        "bad_steps": 0,  # non-finite losses in a row
        "skipped_steps": 0,  # non-finite losses in all
        "tokens_seen": 0,  # target tokens trained on (the comparison card's FLOP count uses it)
        "seconds": 0.0,  # wall time of the run so far, across resumptions: the time budget counts this
        # The sums behind the next `train` log record, saved so a resumed run logs what an unbroken one does.
        "window": {"loss": 0.0, "tokens": 0, "pad": 0.0, "batches": 0},
    }
    if resume:
        name, weights, saved, notes = resume_from
        for note in notes:
            tqdm.write(f"warning: skipped checkpoint {note}")
        model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {**state, **saved["progress"]}
        own_rng = distributed.own_state(saved.get("rng_per_rank", [saved["rng"]]))
        _set_rng_state(own_rng or saved["rng"])
        if own_rng is None:  # resumed on a different number of processes: derive the streams anew
            distributed.seed_rank(tc.seed, state["step"])
        started -= state.get("seconds", 0.0)  # the clock continues where the saved run stopped
        log.write(event="resume", step=state["step"], checkpoint=name)
        if _budget_raised(saved_record["train"], tc) and schedule.cooling:
            # The run was given more steps or time than its cool-down was planned for: return to the
            # paper's rate, and cool down anew over the last `cooldown` of the new budget.
            schedule.cancel_cooldown()
            for group in optimizer.param_groups:  # the next step's rate, as LambdaLR sets it
                group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
            log.write(event="cooldown_reset", step=state["step"])
        tqdm.write(f"resuming {run_dir} from {name} at step {state['step']} (epoch {state['epoch'] + 1})")
    tqdm.write(
        f"model: {model.num_parameters() / 1e6:.1f}M parameters, {mixed.precision} on {device.type}; "
        f"writing to {run_dir}"
    )
    train_model = distributed.wrap(model)  # DDP under torchrun: forward and backward go through this
    if distributed.world_size() > 1:
        log.write(event="distributed", world_size=distributed.world_size(), backend=distributed.backend())

    def save(name: str) -> None:
        state["seconds"] = time.monotonic() - started
        rng_per_rank = distributed.all_gather(_rng_state())  # every process's, to resume each exactly
        if not distributed.is_main():
            return
        checkpoint.save_checkpoint(
            run_dir,
            name,
            model,
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_per_rank[0],
                "rng_per_rank": rng_per_rank,
                "progress": dict(state),
            },
        )

    pace = {"since": time.monotonic(), "step": state["step"]}  # this process's time per step, evals included

    def maybe_begin_cooldown(steps_per_epoch: int) -> None:
        """Start the cool-down once the last `tc.cooldown` of the run is reached: of its time budget, or of
        its step budget (`max_steps`, or `max_epochs` of `steps_per_epoch`), whichever ends first. Its last
        step is that step budget, or as many steps as the time left holds at the pace so far (rank 0's
        estimate): fixed once, and saved with the scheduler, so a resumed run decays as an unbroken one."""
        elapsed = time.monotonic() - started
        step_budget = min(s for s in (tc.max_steps, tc.max_epochs * steps_per_epoch) if s)
        by_time = tc.time_budget_minutes and elapsed >= (1 - tc.cooldown) * tc.time_budget_minutes * 60
        by_steps = state["step"] >= (1 - tc.cooldown) * step_budget
        if not distributed.any_rank(bool(by_time or by_steps)):  # agreed, like the stop below
            return
        ends = [step_budget]
        if tc.time_budget_minutes:
            seconds_per_step = (time.monotonic() - pace["since"]) / max(state["step"] - pace["step"], 1)
            ends.append(state["step"] + int((tc.time_budget_minutes * 60 - elapsed) / seconds_per_step))
        end = distributed.from_main(max(min(ends), state["step"] + 1))
        schedule.begin_cooldown(state["step"], end)
        log.write(event="cooldown", step=state["step"], until=end)

    def out_of_time() -> bool:
        over_budget = tc.time_budget_minutes and time.monotonic() - started > tc.time_budget_minutes * 60
        over_steps = tc.max_steps and state["step"] >= tc.max_steps
        # Agreed: one process's clock running out stops them all at the same step.
        return distributed.any_rank(bool(over_budget or over_steps or schedule.done(state["step"])))

    def evaluate_and_save() -> bool:
        """Validate, checkpoint; return True when early stopping says to stop."""
        valid_loss, valid_scores = validate(model, tokenizer, valid_data, tc, tc.valid_beam)
        state["validated_step"] = state["step"]
        improved = valid_scores.bleu > state["best_bleu"]
        if improved:
            state["best_bleu"], state["stale_evals"] = valid_scores.bleu, 0
        else:
            state["stale_evals"] += 1
        log.write(
            event="valid",
            step=state["step"],
            epoch=state["epoch"],
            loss=valid_loss,
            ppl=math.exp(min(valid_loss, 50)),
            bleu=valid_scores.bleu,
            chrf=valid_scores.chrf,
            elapsed=time.monotonic() - started,
        )
        tqdm.write(
            f"step {state['step']}: valid loss {valid_loss:.3f} ppl {math.exp(min(valid_loss, 50)):.2f} "
            f"BLEU {valid_scores.bleu:.2f}{' (best)' if improved else ''}"
        )
        save(f"step-{state['step']:07d}")
        if distributed.is_main():
            checkpoint.prune_checkpoints(run_dir, keep=max(tc.average_last, 1))
        if improved:
            save("best")
        save("last")
        return bool(tc.patience and state["stale_evals"] >= tc.patience)

    forward = maybe_compile(train_model, tc.compile)  # shares model's parameters; `model` is what is saved
    # Ctrl-C or SIGTERM: save `last` after this step, then exit. `bars` clears the progress bar whatever
    # ends the loop, so that an error is printed on a line of its own.
    with _stop_on_signals() as stop_signal, ExitStack() as bars:
        model.train()
        stop = out_of_time()  # a resumed run may have used its budget already
        window = state["window"]
        window_started = time.monotonic()
        while not stop and state["epoch"] < tc.max_epochs:
            batches = token_batches(
                [len(s) for s in train_data.src],
                [len(t) for t in train_data.tgt],
                tc.max_tokens,
                shuffle=True,
                seed=tc.seed,
                epoch=state["epoch"],
            )
            progress = tqdm(
                total=len(batches),
                initial=state["batch"],
                desc=f"epoch {state['epoch'] + 1}",
                leave=False,
                dynamic_ncols=True,
                disable=not distributed.is_main(),
            )
            bars.callback(progress.close)
            # A step takes `accumulate` batches per process; `state["batch"]` counts batches of all processes.
            per_step = tc.accumulate * distributed.world_size()
            steps_per_epoch = math.ceil(distributed.usable(len(batches)) / per_step)
            while state["batch"] < distributed.usable(len(batches)):
                step_end = state["batch"] + per_step
                step_group = batches[state["batch"] : step_end]
                group = distributed.shard(step_group)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                collated = [
                    collate([(train_data.src[i], train_data.tgt[i]) for i in ids]).to(device) for ids in group
                ]
                # The mean over the target tokens of the whole step, EOS included as in `collate`; DDP's
                # average over the processes cancels the factor world_size.
                step_tokens = sum(len(train_data.tgt[i]) + 1 for ids in step_group for i in ids)
                for k, batch in enumerate(collated):
                    with distributed.gradient_sync(train_model, k == len(collated) - 1):
                        with mixed.autocast():
                            loss = batch_loss(forward, model, batch, tc.label_smoothing)
                        mixed.backward(loss / step_tokens * distributed.world_size())
                    loss_sum += float(loss.detach())
                    window["pad"] += batch.padding_fraction
                    window["batches"] += 1
                loss_sum = distributed.all_sum([loss_sum])[0]  # all processes judge the same number
                state["batch"] += len(step_group)
                progress.update(len(step_group))
                problem = _non_finite(loss_sum, model, mixed)
                if problem:
                    # Skipped: no update, so weights and Adam's moments stay as the last good step left them.
                    state["bad_steps"] += 1
                    state["skipped_steps"] += 1
                    log.write(
                        event="skipped_step",
                        step=state["step"],
                        reason=problem,
                        in_a_row=state["bad_steps"],
                        total=state["skipped_steps"],
                    )
                    if state["bad_steps"] >= MAX_BAD_STEPS:
                        progress.close()
                        raise TransformerError(_diverged_message(run_dir, state["step"]))
                    continue
                state["bad_steps"] = 0
                mixed.step(optimizer, model, tc.clip_norm)
                state["step"] += 1
                if tc.cooldown and not schedule.cooling:
                    maybe_begin_cooldown(steps_per_epoch)
                scheduler.step()  # the rate of the next step
                state["tokens_seen"] += step_tokens
                window["loss"] += loss_sum
                window["tokens"] += step_tokens

                if state["step"] % tc.log_every == 0:
                    now = time.monotonic()
                    record = {
                        "event": "train",
                        "step": state["step"],
                        "epoch": state["epoch"],
                        "loss": window["loss"] / max(window["tokens"], 1),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": window["tokens"] / max(now - window_started, 1e-9),
                        "padding": window["pad"] / max(window["batches"], 1),
                        "tokens_seen": state["tokens_seen"],
                        "elapsed": now - started,
                    }
                    log.write(**record)
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                    window = state["window"] = {"loss": 0.0, "tokens": 0, "pad": 0.0, "batches": 0}
                    window_started = now

                if tc.eval_every and state["step"] % tc.eval_every == 0:
                    paused = time.monotonic()
                    stop = evaluate_and_save()
                    window_started += time.monotonic() - paused  # tokens/s counts training time only
                    if stop:
                        break
                if distributed.any_rank(bool(stop_signal)):
                    save("last")
                    progress.close()
                    why = stop_signal[0] if stop_signal else "a signal to another process"
                    raise TrainingInterrupted(
                        f"stopped by {why} at step {state['step']}; saved {run_dir}/last: "
                        f"continue with `transformer train --out {run_dir} --resume`"
                    )
                if out_of_time():
                    stop = True
                    break
            progress.close()
            if state["batch"] >= distributed.usable(len(batches)):
                state["epoch"] += 1
                state["batch"] = 0
                if not tc.eval_every and evaluate_and_save():
                    stop = True
            if out_of_time():
                stop = True
    if state.get("validated_step") != state["step"]:
        evaluate_and_save()  # the final weights are always validated and saved
    return finish(model, tokenizer, tc, run_dir, valid_data, log, started, state["best_bleu"])


def finish(
    model: nn.Module,
    tokenizer: Tokenizer,
    tc: TrainConfig,
    run_dir: Path,
    valid_data: Corpus,
    log: MetricsLog,
    started: float,
    best_bleu: float,
) -> dict[str, Any]:
    """Average the last checkpoints (kept as `best` if it validates better), then score the test split."""
    # Rank 0's disk decides (the others may not share it); its weights are then copied to all processes.
    names = distributed.from_main([n for n in checkpoint.list_checkpoints(run_dir) if n.startswith("step-")])
    recent = (
        [run_dir / f"{name}.safetensors" for name in names[-tc.average_last :]] if tc.average_last > 1 else []
    )
    results: dict[str, Any] = {"valid_best_single": best_bleu}
    average_is_best = False
    if len(recent) > 1:
        if distributed.is_main():
            model.load_state_dict(checkpoint.average_weights(recent))
        distributed.sync_from_main(model)
        _, avg_scores = validate(model, tokenizer, valid_data, tc, tc.valid_beam)
        results["valid_averaged"] = avg_scores.bleu
        log.write(event="average", checkpoints=[p.name for p in recent], bleu=avg_scores.bleu)
        tqdm.write(
            f"average of the last {len(recent)} checkpoints: valid BLEU {avg_scores.bleu:.2f} "
            f"(best single {best_bleu:.2f})"
        )
        average_is_best = avg_scores.bleu > best_bleu
        if average_is_best and distributed.is_main():
            checkpoint.save_checkpoint(
                run_dir, "best", model, {"source": "average", "checkpoints": names[-len(recent) :]}
            )
    if not average_is_best:
        if distributed.is_main():
            model.load_state_dict(checkpoint.load_weights(run_dir / "best.safetensors"))
        distributed.sync_from_main(model)

    if tc.test_split:
        test_data, _ = encode_corpus(
            read_split(tc.data_dir, tc.test_split, tc.src_lang, tc.tgt_lang), tokenizer, None
        )
        model.eval()
        search = SearchConfig(beam=tc.beam, length_penalty=tc.length_penalty)
        hypotheses, test_scores = translate_and_score(model, tokenizer, test_data, search)
        if distributed.is_main():
            (run_dir / f"{tc.test_split}.hyp.{tc.tgt_lang}").write_text("\n".join(hypotheses) + "\n")
        results[tc.test_split] = test_scores.to_dict()
        tqdm.write(f"{tc.test_split} (beam {tc.beam}):\n{test_scores}")
    results["wall_seconds"] = time.monotonic() - started
    log.write(event="results", **results)
    if distributed.is_main():
        checkpoint.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    distributed.barrier()  # the run directory is complete when any process returns
    return results


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments -> dict; values stay strings and are typed against the config fields."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TransformerError(f"expected key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
