"""`transformer report`: run the experiments of `transformer.experiments` and write one report.

The report is Markdown (`seed-claims.md`) with PNG figures beside it, the same content as HTML
(`seed-claims.html`), and the raw numbers as JSON. Each section names the command that reproduces it.
`--only` re-measures some sections and keeps the others of the report already there, each naming the run
that measured it. The files are written to a scratch directory first and moved into place only when every
experiment has run, so a failed or interrupted report leaves the previous one intact.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer.errors import TransformerError
from transformer.experiments.common import LANGUAGES, escape_cell

DEFAULT_CHECKPOINT = Path("runs/multi30k-de-en")
REPORT_NAME = "seed-claims"


def _check_transformer_run(checkpoint: Path, default: bool = False) -> None:
    """The experiments study attention heads, positions and projections, which only a Transformer has,
    on the sentence pairs they read: refuse another family's run, or another language pair's, now, not
    halfway through the report (or, for the pair, with numbers that look fine)."""
    from transformer.config import TrainConfig
    from transformer.rundir import read_run_record

    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    train = read_run_record(run_dir)["train"]
    # the default is used unasked: say so, and how to get past it
    given = f"{checkpoint} (the default --checkpoint)" if default else str(checkpoint)
    how = " with --checkpoint" if default else " (or none, and the report trains its own)"
    family = train.get("model", "transformer")
    if family != "transformer":
        raise TransformerError(
            f"{given} is a model={family} run: the report studies a Transformer's attention, give "
            f"a Transformer run{how}"
        )
    pair = (train.get("src_lang", TrainConfig.src_lang), train.get("tgt_lang", TrainConfig.tgt_lang))
    if pair != LANGUAGES:
        ours = "→".join(LANGUAGES)
        raise TransformerError(
            f"{given} translates {'→'.join(pair)}, the report's experiments {ours} (they feed it Multi30k's "
            f"{LANGUAGES[0]} sentences and fit IBM Model 1 {ours}): give a {ours} run{how}"
        )


def command_for(keys: Sequence[str] | None, out: Path, checkpoint: Path | None, preset: str) -> str:
    parts = ["transformer report"]
    if keys:
        parts.append("--only " + " ".join(keys))
    if checkpoint is not None:
        parts.append(f"--checkpoint {checkpoint}")
    if preset != "report":
        parts.append(f"--preset {preset}")
    parts.append(f"--out {out}")
    return " ".join(parts)


def machine() -> str:
    import torch

    from transformer.runtime import cpu_name

    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available, torch {torch.__version__} with {torch.get_num_threads()} threads"


@dataclass
class Section:
    """One experiment's part of the report, with the run that measured it, so that `--only` can refresh
    some sections of a report and keep the others, each still saying where its numbers came from."""

    key: str
    title: str
    summary: str  # the headline finding, for the summary table
    body: str  # the Markdown below the section's heading
    run: dict[str, str]  # the header of the run that measured it


def render_section(result: Any, out: Path, checkpoint: Path | None, preset: str) -> str:
    lines = [f"**Claim.** {result.claim}", "", "**Measured.**", ""]
    lines += [f"- {finding}" for finding in result.findings]
    lines += [
        "",
        f"Reproduce: `{command_for([result.key], out, checkpoint, preset)}` ({result.seconds:.0f} s)",
        "",
    ]
    for table in result.tables:
        if table.caption:
            lines += [f"*{table.caption}*", ""]
        lines += [table.markdown(), ""]
    for figure in result.figures:
        lines += [f"![{result.title}: {figure}]({figure})", ""]
    if result.notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in result.notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(sections: list[Section], header: dict[str, str]) -> str:
    """The report: the latest run's header, the sections other runs measured (grouped by run), a summary
    table and every section, numbered in `EXPERIMENTS` order."""
    earlier: dict[str, tuple[dict[str, str], list[int]]] = {}  # each earlier run and its sections' numbers
    for i, section in enumerate(sections, 1):
        if section.run != header:
            earlier.setdefault(json.dumps(section.run, sort_keys=True), (section.run, []))[1].append(i)
    measured = (
        "by the run named in this header, or by the earlier run listed for its section"
        if earlier
        else "in this run"
    )
    lines = [
        "# The seed's claims, measured",
        "",
        f"Generated by `transformer report` from `transformer/experiments/`. Every number below was measured "
        f"{measured}; each section names the command that reproduces it.",
        "",
        f"- Command: `{header['command']}`",
        f"- Date: {header['date']}",
        f"- Machine: {header['machine']}",
        f"- Preset: `{header['preset']}`; total time {header['minutes']} minutes",
        f"- Trained model: {header['translator']}",
    ]
    if earlier:
        lines.append(
            "- Measured by earlier runs (on the machine above, with a trained model of the description "
            "above, unless named):"
        )
    for run, numbers in earlier.values():
        where = "" if run["machine"] == header["machine"] else f", {run['machine']}"
        same_model = run["translator"] in ("not used", header["translator"])
        model = "" if same_model else f"; trained model: {run['translator']}"
        lines.append(
            f"  - section{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}: "
            f"`{run['command']}` on {run['date']}{where}{model}"
        )
    lines += ["", "## Summary", "", "| # | claim | measured |", "|---|---|---|"]
    for i, section in enumerate(sections, 1):
        lines.append(f"| {i} | {section.title} | {escape_cell(section.summary)} |")
    for i, section in enumerate(sections, 1):
        lines += ["", f"## {i}. {section.title}", "", section.body.rstrip()]
    return "\n".join(lines).rstrip() + "\n"


_HEADING = re.compile(r"^## \d+\. (.+)$", re.MULTILINE)
_REPRODUCE = re.compile(r"^Reproduce: `transformer report --only (\w+) ", re.MULTILINE)
_SUMMARY = re.compile(r"^\*\*Measured\.\*\*\n\n- (.*)$", re.MULTILINE)


def read_sections(markdown: str, runs: dict[str, dict[str, str]]) -> list[Section]:
    """The sections of a report written by `render_markdown`, each with its run from `runs` (by key)."""
    headings = list(_HEADING.finditer(markdown))
    sections = []
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        body = markdown[heading.end() : following.start() if following else len(markdown)].strip("\n")
        key, summary = _REPRODUCE.search(body), _SUMMARY.search(body)
        if key is None or summary is None or key[1] not in runs:
            raise ValueError(f"section {heading[1]!r} is not one that `transformer report` wrote")
        sections.append(Section(key[1], heading[1], summary[1], body + "\n", runs[key[1]]))
    return sections


def earlier_report(out: Path, preset: str) -> tuple[list[Section], dict[str, Any]]:
    """The sections and raw numbers of the report already in `out` (none if there is none), to be kept
    where this run does not replace them. A report of another preset is refused: tiny numbers beside
    the report's would read as measurements."""
    markdown_file, numbers_file = out / f"{REPORT_NAME}.md", out / f"{REPORT_NAME}.json"
    if not markdown_file.exists():
        return [], {}
    try:
        stored = json.loads(numbers_file.read_text(encoding="utf-8"))
        # a report written before sections kept their own run was measured whole by its header's run
        runs = {key: stored.get("runs", {}).get(key, stored["header"]) for key in stored["results"]}
        sections = read_sections(markdown_file.read_text(encoding="utf-8"), runs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TransformerError(
            f"cannot keep the other sections of {markdown_file} ({error}); run the whole report, or "
            f"give --only another --out"
        ) from error
    # reports written before the preset was recorded came from `transformer report`'s own preset
    earlier_presets = {run.get("preset", "report") for run in runs.values()}
    if earlier_presets - {preset}:
        raise TransformerError(
            f"{markdown_file} was measured with --preset {' '.join(sorted(earlier_presets))}; give "
            f"--only with --preset {preset} another --out"
        )
    return sections, stored["results"]


def render_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:0.2em 0.5em}img{max-width:100%}"
        "code{background:#f4f4f4;padding:0 0.2em}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{style}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def run_report(
    out: Path,
    checkpoint: Path | None = None,
    *,
    preset: str = "report",
    only: Sequence[str] | None = None,
    log=print,
) -> Path:
    """Run the experiments (all, or the keys in `only`) and write the report into `out`; returns the
    Markdown file's path. With `only`, the report already in `out` keeps its other sections, each naming
    the run that measured it. Without `checkpoint`, runs/multi30k-de-en is used if present, else the
    items that need a trained model train a small one."""
    from transformer.experiments import EXPERIMENTS
    from transformer.experiments.common import PRESETS, Context
    from transformer.runtime import configure_torch

    if preset not in PRESETS:
        raise TransformerError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = [key for key in only or [] if key not in EXPERIMENTS]
    if unknown:
        raise TransformerError(
            f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}"
        )
    if checkpoint is not None and not checkpoint.exists():
        raise TransformerError(f"no checkpoint at {checkpoint}")
    given = checkpoint
    if checkpoint is None and (DEFAULT_CHECKPOINT / "config.json").is_file():
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is not None:
        _check_transformer_run(checkpoint, default=given is None)
    if out.exists() and not out.is_dir():
        raise TransformerError(f"--out {out} exists and is not a directory")
    kept_sections, kept_numbers = earlier_report(out, preset) if only else ([], {})
    configure_torch()
    keys = list(only) if only else list(EXPERIMENTS)
    started = time.monotonic()
    context = Context(
        checkpoint=checkpoint, progress=lambda line: log(f"[{time.monotonic() - started:6.0f} s]     {line}")
    )
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as scratch:
        for key in keys:
            module = importlib.import_module(EXPERIMENTS[key])
            log(f"[{time.monotonic() - started:6.0f} s] {key} ...")
            begun = time.monotonic()
            result = module.run(preset, Path(scratch), context)
            result.seconds = time.monotonic() - begun
            results.append(result)
            log(f"[{time.monotonic() - started:6.0f} s] {key} done in {result.seconds:.0f} s")
            for finding in result.findings:
                log(f"    {finding}")
        translator = context.cache.get(f"translator:{preset}")
        header = {
            "command": command_for(only, out, given, preset),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "preset": preset,
            "minutes": f"{(time.monotonic() - started) / 60:.1f}",
            "translator": translator.description if translator is not None else "not used",
        }
        fresh = {
            r.key: Section(
                r.key,
                r.title,
                r.findings[0] if r.findings else "",
                render_section(r, out, given, preset),
                header,
            )
            for r in results
        }
        numbers = {**kept_numbers, **{r.key: {"seconds": r.seconds, **r.numbers} for r in results}}
        kept = {section.key: section for section in kept_sections}
        sections = [fresh.get(key) or kept[key] for key in EXPERIMENTS if key in fresh or key in kept]
        markdown = render_markdown(sections, header)
        (Path(scratch) / f"{REPORT_NAME}.md").write_text(markdown)
        (Path(scratch) / f"{REPORT_NAME}.html").write_text(
            render_html(markdown, "The seed's claims, measured")
        )
        record = {
            "header": header,
            "runs": {section.key: section.run for section in sections},
            "results": {key: numbers[key] for key in EXPERIMENTS if key in numbers},
        }
        (Path(scratch) / f"{REPORT_NAME}.json").write_text(json.dumps(record, indent=1, default=str))
        for file in sorted(Path(scratch).iterdir()):
            shutil.move(str(file), out / file.name)
    log(f"wrote {out / f'{REPORT_NAME}.md'} in {(time.monotonic() - started) / 60:.1f} minutes")
    return out / f"{REPORT_NAME}.md"


def main_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
