"""The `transformer` command: train, translate, evaluate, doctor, compare, average, serve, export, report.

Every user error surfaces as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from transformer.config import (
    SET_BY_TRAINER,
    RNNConfig,
    TrainConfig,
    TransformerConfig,
    config_from_dict,
    config_to_dict,
    model_config_class,
)
from transformer.errors import TransformerError

DEFAULT_OUT = "runs/multi30k-{src_lang}-{tgt_lang}"


def load_train_settings(
    config_file: str | None, overrides: dict[str, str], base: dict[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, Any]]:
    """A recipe (YAML: train keys at the top, model keys under `model:`) plus `key=value` overrides.

    An override names a train key, a model key, or `model.KEY`, and its value is read by that key's type.
    A recipe names the model family as the command line does (`model: rnn`) or, where `model:` holds the
    model's settings, as `kind:` among them (RNNConfig's name for it). Returns the TrainConfig and the model
    overrides (applied once the vocabulary size is known). `base`, the config.json of a run to resume,
    gives the settings the run started with, which the recipe and the overrides then change: `--resume`
    alone continues the run as it was, `--resume time_budget_minutes=60` gives it more time, and the
    trainer refuses changes a resume may not make.
    """
    train_values: dict[str, Any] = {}
    model_values: dict[str, Any] = {}
    if base is not None:
        from transformer.rundir import reachable_data_dir  # imports torch: not before the re-exec

        train_values.update(base["train"], data_dir=reachable_data_dir(base))
        model_values.update({k: v for k, v in base["model"].items() if k not in SET_BY_TRAINER | {"kind"}})
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise TransformerError(f"no config file at {path}")
        try:
            recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise TransformerError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(recipe, dict) or not isinstance(recipe.get("model") or {}, (dict, str)):
            raise TransformerError(
                f"{path} must hold a mapping of settings (and `model:` a family or one of its own)"
            )
        model = recipe.pop("model", None) or {}
        train_values.update(recipe)
        if isinstance(model, str):  # `model: rnn`, as `model=rnn` on the command line
            model = {"kind": model}
        if "kind" in model:  # RNNConfig's name for the family, beside the settings: the train key `model`
            train_values["model"] = model.pop("kind")
        model_values.update(model)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_keys = {f.name for cls in (TransformerConfig, RNNConfig) for f in dataclasses.fields(cls)}
    for key, value in overrides.items():  # strings, typed by config_from_dict: "no" stays a language
        if key in ("kind", "model.kind"):  # the family, by RNNConfig's name for it
            train_values["model"] = value
        elif key.startswith("model."):
            model_values[key.removeprefix("model.")] = value
        elif key in train_keys:
            train_values[key] = value
        elif key in model_keys:
            model_values[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(train_keys | model_keys), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TransformerError(
                f"unknown setting {key!r}: not a train or model key ({hint}`transformer train --help` "
                "lists them)"
            )
    fixed = sorted(SET_BY_TRAINER & set(model_values))
    if fixed:
        raise TransformerError(
            f"{', '.join(fixed)}: set by the trainer from the tokenizer, not a setting (vocab_size sizes "
            "the vocabulary)"
        )
    tc = config_from_dict(TrainConfig, train_values, source=config_file or "overrides")
    TransformerConfig.preset(tc.preset)  # an unknown preset is an error now, not after the tokenizer
    family = model_config_class(tc.model)
    unknown = sorted(map(str, set(model_values) - {f.name for f in dataclasses.fields(family)}))
    if unknown:
        raise TransformerError(f"model={tc.model} has no setting(s) {', '.join(unknown)}")
    # Types and constraints are checked here, against the preset the values change (d_model=252 suits the
    # small preset's 4 heads, not the 8 of TransformerConfig's defaults).
    start = config_to_dict(TransformerConfig.preset(tc.preset)) if family is TransformerConfig else {}
    checked = config_from_dict(family, {**start, **model_values}, source="model settings")
    return tc, {key: getattr(checked, key) for key in model_values}


def cmd_train(args: argparse.Namespace) -> int:
    from transformer.rundir import read_run_record
    from transformer.runtime import outlive_stdout_reader
    from transformer.train import parse_overrides, train

    overrides = parse_overrides(args.overrides)
    tc, model_overrides = load_train_settings(args.config, overrides)
    out = Path(args.out or DEFAULT_OUT.format(src_lang=tc.src_lang, tgt_lang=tc.tgt_lang))
    if args.resume and (out / "config.json").is_file():  # go on with the run's own settings
        tc, model_overrides = load_train_settings(args.config, overrides, read_run_record(out))
    gone = f"stdout's reader has gone: training goes on; its log goes on in {out / 'metrics.jsonl'}"
    with outlive_stdout_reader(gone):
        results = train(tc, model_overrides, out, resume=args.resume)
        print(f"wrote {out} (best weights: {out / 'best.safetensors'})")
        if args.json:
            print(json.dumps(results, indent=2))
    return 0


def _read_input(path: str | None, strict: bool) -> list[str]:
    """Lines of a file or of stdin, decoded a chunk at a time; see `transformer.textio` for odd bytes and
    line breaks."""
    from transformer.textio import decode_stream

    if not path:
        return decode_stream(sys.stdin.buffer, strict=strict, source="stdin")
    if not Path(path).is_file():
        raise TransformerError(f"no input file at {path}")
    with Path(path).open("rb") as file:
        return decode_stream(file, strict=strict, source=path)


def cmd_translate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from transformer.translate import BLOCK_SENTENCES, Translator

    warn_if_emulated(args.precision)
    sampling = sampling_of(args)
    translator = Translator.from_checkpoints(args.checkpoint, args.name, precision=args.precision)
    if args.input is None and sys.stdin.isatty():
        return _translate_as_typed(translator, args, sampling)
    lines = _read_input(args.input, args.strict)
    quiet = len(lines) <= BLOCK_SENTENCES or not sys.stderr.isatty()
    with tqdm(total=len(lines), desc="translating", unit=" lines", leave=False, disable=quiet) as bar:
        for done, out in _output_blocks(translator, lines, args, sampling):
            sys.stdout.write("".join(line + "\n" for line in out))
            # Now, so that a full disk is an error here, not a cut file and exit status 0.
            sys.stdout.flush()
            bar.update(done)
    return 0


def _output_blocks(
    translator: Any,
    lines: list[str],
    args: argparse.Namespace,
    sampling: Any,
    first: int = 0,
    stream: Any = None,
) -> Iterator[tuple[int, list[str]]]:
    """What `translate` prints for `lines`, a block of input lines at a time (`Translator.translate_blocks`):
    (input lines done, output lines), one translation each (searched, or drawn with `sampling`, from
    `stream` where given) or `--nbest` lines each, numbered by input line from `first`."""
    from transformer.textio import single_line
    from transformer.translate import BLOCK_SENTENCES

    search = (args.beam, args.length_penalty)
    how = {"strict": args.strict, "block": BLOCK_SENTENCES, "first": first + 1}
    if args.nbest == 1:
        for block in translator.translate_blocks(lines, *search, **how, sampling=sampling, stream=stream):
            yield len(block), [single_line(line) for line in block]
        return
    for block in translator.n_best_blocks(lines, args.nbest, *search, **how):
        rows = [(i, text, score) for i, best in enumerate(block, first) for text, score in best]
        yield len(block), [f"{i}\t{score:.4f}\t{single_line(text)}" for i, text, score in rows]
        first += len(block)


def _translate_as_typed(translator: Any, args: argparse.Namespace, sampling: Any) -> int:
    """stdin is a terminal: translate each line when Enter is pressed, as JoeyNMT's interactive mode
    does, instead of waiting for the end of input. A bad line gets its error line and the session goes on."""
    from transformer.search import sampling_stream
    from transformer.textio import decode_lines

    print("translating each line as it is typed; Ctrl-D ends", file=sys.stderr)
    stream = sampling_stream(sampling)  # one for the session: a line typed twice is drawn anew
    for number, raw in enumerate(iter(sys.stdin.buffer.readline, b"")):
        try:
            lines = decode_lines(raw, strict=args.strict, source="stdin", first_line=number + 1)
            blocks = _output_blocks(translator, lines, args, sampling, number, stream)
            out = [line for _, block in blocks for line in block]
        except TransformerError as error:
            print(_error_line(error), file=sys.stderr)
            continue
        print("\n".join(out), flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from transformer.data.corpus import read_parallel, read_split
    from transformer.evaluate import score
    from transformer.search import search_name
    from transformer.translate import Translator

    if (args.source or args.reference) and not (args.source and args.reference):  # before loading a model
        raise TransformerError("--source and --reference go together")
    if args.source and args.split:
        raise TransformerError("--split and --source/--reference each name what is scored: give one")
    warn_if_emulated(args.precision)
    translator = Translator.from_checkpoints(args.checkpoint, args.name, precision=args.precision)
    tc = translator.train_config
    if args.source:
        pairs = read_parallel(args.source, args.reference)
        scored = args.source
    else:
        scored = args.split or tc.test_split
        pairs = read_split(tc.data_dir, scored, tc.src_lang, tc.tgt_lang)
    sources, references = [s for s, _ in pairs], [r for _, r in pairs]
    hypotheses = translator.translate(sources, args.beam, args.length_penalty)
    scores = score(hypotheses, references)
    if args.json:
        print(json.dumps(scores.to_dict(), indent=2))
    else:  # what was scored, as training's own report names it
        search = search_name(tc.beam if args.beam is None else args.beam)
        print(f"{' + '.join(args.checkpoint)} ({args.name}), {scored}, {search}:\n{scores}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from transformer.checkpoint import distinct_checkpoints
    from transformer.rundir import average_into

    paths = distinct_checkpoints(args.checkpoints)
    if len(paths) == 1:
        print(f"warning: one checkpoint given, {paths[0]}: the result is a copy of it", file=sys.stderr)
    out = average_into(paths, Path(args.out))
    print(f"averaged {len(paths)} checkpoint{'s' if len(paths) > 1 else ''} into {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from transformer.doctor import format_table, run_checks

    checks = run_checks(Path(args.checkpoint), args.name)
    print(format_table(checks))
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        raise TransformerError(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from transformer.compare import MODELS, CompareSettings, compare
    from transformer.train import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.minutes is not None and not 0 <= args.minutes < float("inf"):  # NaN fails too
        raise TransformerError(f"--minutes must be 0 (no time limit) or more, got {args.minutes}")
    base, transformer_overrides = load_train_settings(args.config, overrides)
    if args.minutes is None:  # the recipe's or the command line's time_budget_minutes, else the card's 10
        recipe = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) if args.config else None
        if "time_budget_minutes" not in {**(recipe or {}), **overrides}:
            base = dataclasses.replace(base, time_budget_minutes=10.0)
    elif "time_budget_minutes" in overrides and base.time_budget_minutes != args.minutes:
        raise TransformerError(
            f"time_budget_minutes={base.time_budget_minutes:g} and --minutes {args.minutes:g} disagree: "
            "give one of them"
        )
    else:  # as any command-line setting, --minutes beats the recipe's
        base = dataclasses.replace(base, time_budget_minutes=args.minutes)
    if args.jobs < 1:
        raise TransformerError(f"--jobs must be at least 1, not {args.jobs}")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise TransformerError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    for option, values in (("--models", args.models), ("--seeds", args.seeds)):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:  # a second run of one family and seed would train into the first's directory
            raise TransformerError(f"{option} names {', '.join(map(str, repeated))} more than once")
    settings = CompareSettings(
        models=tuple(args.models),
        seeds=tuple(args.seeds),
        base=base,
        transformer_overrides=tuple(transformer_overrides.items()),
        jobs=args.jobs,
    )
    command = " ".join(["transformer compare", *sys.argv[2:]]) if sys.argv[1:2] == ["compare"] else ""
    compare(settings, Path(args.out), Path(args.card), command or "transformer compare")
    print(f"wrote {args.card} (runs in {args.out})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from transformer.serve import serve

    warn_if_emulated(args.precision)
    serve(args.checkpoint, args.name, args.host, args.port, args.precision)
    return 0


def add_checkpoints_argument(p: argparse.ArgumentParser) -> None:
    """--checkpoint RUN [RUN …] and --name, as translate, evaluate and serve take them."""
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="RUN",
        help="a run directory or a .safetensors file in one; several are decoded as an ensemble "
        "(their next-token probabilities averaged), which needs one tokenizer for all",
    )
    p.add_argument("--name", default="best", help="which checkpoint of the run directory (default: best)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """fairseq's names for sampling instead of searching: --sampling, --sampling-topk, --sampling-topp,
    --temperature, and --seed."""
    p.add_argument(
        "--sampling",
        action="store_true",
        help="draw each token from the model's distribution instead of searching for the most probable "
        "translation (back-translation's way of making varied sources); one translation per line",
    )
    p.add_argument(
        "--sampling-topk",
        type=int,
        default=0,
        metavar="K",
        help="draw from the K most probable tokens (default: all)",
    )
    p.add_argument(
        "--sampling-topp",
        type=float,
        default=1.0,
        metavar="P",
        help="draw from the fewest most probable tokens whose probabilities reach P (nucleus sampling; "
        "default 1: all)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="divide the logits by T before drawing (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="the draws' seed (default 0): one input, one output")


def sampling_of(args: argparse.Namespace) -> Any:
    """The `Sampling` the options ask for, or None; a sampling option without --sampling is an error."""
    from transformer.search import Sampling

    sampling = Sampling(args.temperature, args.sampling_topk, args.sampling_topp, args.seed)
    if args.sampling:
        if args.nbest != 1:
            raise TransformerError("--sampling draws one translation per line: it takes no --nbest")
        return sampling
    if sampling != Sampling():
        raise TransformerError("--sampling-topk, --sampling-topp, --temperature and --seed need --sampling")
    return None


def cmd_export(args: argparse.Namespace) -> int:
    from transformer.export import export_marian

    if args.format != "marian":
        raise TransformerError(f"unknown export format {args.format!r}; the one format is 'marian'")
    out = export_marian(args.checkpoint, args.out, args.name)
    print(f"wrote a Hugging Face MarianMT model to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from transformer.report import main_log, run_report

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    run_report(Path(args.out), checkpoint, preset=args.preset, only=args.only, log=main_log)
    return 0


def warn_if_emulated(precision: str) -> None:
    """Say so on stderr when --precision bf16 will run slower than fp32 on this CPU."""
    from transformer.precision import emulation_warning

    note = emulation_warning(precision)
    if note:
        print(note, file=sys.stderr)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16", "auto"),
        help="the weights' dtype for decoding (default fp32; bf16 decodes faster on CPUs with AMX or "
        "AVX-512 BF16 and on GPUs; auto: bf16 where native; fp16: CUDA only)",
    )


def _settings_help() -> str:
    """Every KEY=VALUE setting `train` takes, with its default: the list an unknown key points to."""

    def listing(config: Any, skip: frozenset[str] = frozenset()) -> str:
        items = [f"{key}={value}" for key, value in config_to_dict(config).items() if key not in skip]
        return textwrap.fill(" ".join(items), width=100, initial_indent="  ", subsequent_indent="  ")

    return "\n".join(
        [
            "training settings (KEY=VALUE, or in a YAML recipe), with their defaults:",
            listing(TrainConfig()),
            "Transformer settings (over the preset; here preset=small's):",
            listing(TransformerConfig.preset("small"), SET_BY_TRAINER),
            "RNN settings (model=rnn, birnn or rnn-attention):",
            listing(RNNConfig(), SET_BY_TRAINER | {"kind"}),
            "A key in two lists (max_len) sets the training one; model.KEY sets the model's.",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (default: the bundled Multi30k de→en recipe)",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings, e.g. src_lang=en d_model=512; a key given again overrides its earlier value",
    )
    p.add_argument("--config", help="a YAML recipe (see experiments/)")
    p.add_argument("--out", help=f"run directory (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the final results as JSON")
    p.set_defaults(func=cmd_train)

    for name, func, help_text in (
        ("translate", cmd_translate, "translate lines from --input or stdin, one output line per input line"),
        (
            "evaluate",
            cmd_evaluate,
            "BLEU, lowercased BLEU and chrF of a checkpoint on a split or given files",
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        add_checkpoints_argument(p)
        p.add_argument(
            "--beam", type=int, default=None, help="beam size (default: the run's, 4); 1 is greedy"
        )
        p.add_argument(
            "--length-penalty",
            type=float,
            default=None,
            metavar="ALPHA",
            help="α of beam search's length penalty ((5 + length) / 6)^α (default: the run's, 0.6)",
        )
        add_precision_argument(p)
        p.set_defaults(func=func)
        if name == "translate":
            p.add_argument(
                "--input",
                help="a text file (default: stdin; at a terminal, each line is translated as it is typed)",
            )
            p.add_argument(
                "--nbest",
                type=int,
                default=1,
                metavar="N",
                help="print the N best translations of each line, one per output line as "
                "'LINE<TAB>SCORE<TAB>TRANSLATION' (LINE counted from 0, as in fairseq's and Moses' n-best "
                "lists; SCORE the log-probability over the length penalty); the beam is raised to N unless "
                "--beam is given, which must then be at least N",
            )
            p.add_argument(
                "--strict",
                action="store_true",
                help="refuse input that is not UTF-8 or longer than the model's maximum, instead of "
                "repairing or truncating it with a warning",
            )
            add_sampling_arguments(p)
        else:
            p.add_argument("--split", help="a split of the run's data directory (default: its test split)")
            p.add_argument("--source", help="source file (with --reference)")
            p.add_argument("--reference", help="reference file (with --source)")
            p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = sub.add_parser(
        "doctor", help="check a trained checkpoint: masks, cache, determinism, bf16, tokenizer"
    )
    p.add_argument("--checkpoint", required=True, help="a run directory or a .safetensors file in one")
    p.add_argument("--name", default="best", help="which checkpoint of the run directory (default: best)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "compare", help="train the Transformer and the RNN baselines alike and write a comparison card"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings for every run (as for train); model settings are the Transformer's: the RNNs keep "
        "their own (RNNConfig's dropout), sized to its parameter count",
    )
    p.add_argument("--config", help="a YAML recipe for every run (default: the bundled Multi30k one)")
    p.add_argument(
        "--models",
        nargs="+",
        default=["transformer", "rnn", "birnn", "rnn-attention"],
        help="the model families to train (default: transformer rnn birnn rnn-attention)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="one run per seed and family (default: 1 2 3)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="training time budget of each run; 0: none (max_steps or max_epochs ends it). Beats the "
        "recipe's time_budget_minutes; a time_budget_minutes=N that differs is refused. Default: "
        "time_budget_minutes where the recipe or a KEY=VALUE sets it, else 10",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each on an equal share of the cores (default 1)"
    )
    p.add_argument("--out", default="runs/compare", help="where the runs go (finished ones are reused)")
    p.add_argument("--card", default="reports/comparison.md", help="the Markdown card to write")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("average", help="average the weights of several checkpoints")
    p.add_argument("--checkpoints", nargs="+", required=True, help="run directories or .safetensors files")
    p.add_argument("--out", required=True, help="a .safetensors file, or a directory to make a run directory")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser(
        "serve", help="serve a checkpoint (or an ensemble): a JSON API and a page to see its attention"
    )
    add_checkpoints_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    add_precision_argument(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face MarianMT model directory")
    p.add_argument("--checkpoint", required=True, help="a run directory or a .safetensors file in one")
    p.add_argument("--name", default="best", help="which checkpoint of the run directory (default: best)")
    p.add_argument("--format", default="marian", help="the target format (one so far: marian)")
    p.add_argument("--out", required=True, help="a new directory for the exported model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="measure the paper's claims and write reports/seed-claims.md (+ HTML)")
    p.add_argument("--checkpoint", help="trained run to study (default: runs/multi30k-de-en if present)")
    p.add_argument("--out", default="reports", help="output directory (default: reports)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="KEY",
        help="re-measure only these sections (e.g. cost masking), keeping the report's others",
    )
    p.add_argument(
        "--preset", default="report", choices=("report", "tiny"), help="tiny: a seconds-long smoke run"
    )
    p.set_defaults(func=cmd_report)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with KEY=VALUE settings allowed on both sides of the options (`train max_steps=5 --out x
    lr_factor=1`): a positional list ends at the first option, so argparse alone would call the later
    settings unrecognised arguments."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own error for the arguments that are truly unknown
    return args


def _error_line(error: TransformerError) -> str:
    """ "label: message" on one line, even when a library's message had several."""
    return f"{error.label}: {str(error).replace(chr(10), ' ')}"


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command, not called from Python: the allocator setting can still be made
        from transformer.runtime import reexec_with_allocator_tunables

        reexec_with_allocator_tunables()
    args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except TransformerError as error:
        print(_error_line(error), file=sys.stderr)
        return error.exit_status
    except OSError as error:  # the machine, not the input: a full disk, a lost permission, a closed pipe
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
