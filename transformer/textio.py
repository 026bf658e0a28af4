"""Text in and out of `transformer translate`: whatever bytes come in, one output line per input line.

Input is split on "\\n" only (with a CRLF's "\\r" removed), the same rule the corpus reader uses, so that
form feeds, U+2028 and the like stay inside their sentence instead of splitting it in two. Bytes that are
not UTF-8 are replaced with U+FFFD and reported, or refused under `strict`. A translation can itself
contain a line break (byte-fallback pieces can spell any byte), which would shift every later line: output
lines are flattened.
"""

from __future__ import annotations

import sys

from transformer.errors import TransformerError

_BOM = "\ufeff"


def decode_lines(
    raw: bytes, *, strict: bool = False, source: str = "input", first_line: int = 1
) -> list[str]:
    """The lines of UTF-8 `raw` text, without line endings (a final newline does not start a new line).
    Errors number the lines from `first_line` (`raw` may be one line of many)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + first_line
        if strict:
            raise TransformerError(
                f"{source} line {line} is not valid UTF-8 ({error.reason} at byte {error.start}); "
                f"--strict refuses it: convert the file to UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        print(
            f"warning: {source} is not valid UTF-8 (first at line {line}); undecodable bytes were replaced "
            f"with U+FFFD",
            file=sys.stderr,
        )
        text = raw.decode("utf-8", errors="replace")
    lines = text.removeprefix(_BOM).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def single_line(text: str) -> str:
    """`text` with any line break made a space, so that it prints as exactly one line."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
