"""Text in and out of `transformer translate`: whatever bytes come in, one output line per input line.

Input is split on "\\n" only (with a CRLF's "\\r" removed), the same rule the corpus reader uses, so that
form feeds, U+2028 and the like stay inside their sentence instead of splitting it in two. Bytes that are
not UTF-8 are replaced with U+FFFD and reported, or refused under `strict`. A translation can itself
contain a line break (byte-fallback pieces can spell any byte), which would shift every later line: output
lines are flattened.
"""

from __future__ import annotations

import codecs
import io
import sys
from typing import BinaryIO

from transformer.errors import TransformerError

_BOM = "\ufeff"


CHUNK_BYTES = 1 << 24  # read and decoded at a time by `decode_stream`


def decode_lines(
    raw: bytes, *, strict: bool = False, source: str = "input", first_line: int = 1
) -> list[str]:
    """The lines of UTF-8 `raw` text, without line endings (a final newline does not start a new line).
    Errors number the lines from `first_line` (`raw` may be one line of many)."""
    return decode_stream(io.BytesIO(raw), strict=strict, source=source, first_line=first_line)


def decode_stream(
    stream: BinaryIO,
    *,
    strict: bool = False,
    source: str = "input",
    first_line: int = 1,
    chunk: int = CHUNK_BYTES,
) -> list[str]:
    """`decode_lines` of a seekable binary stream's bytes, read and decoded `chunk` bytes at a time: a
    corpus file is never in memory as bytes and as text besides its lines (a 655-MB file of 4.5M lines
    peaked at 2.96 GB read whole, where its lines take 1.02 GB). Text that is not UTF-8 is read twice."""
    start = stream.tell()
    try:
        return _read_lines(stream, "strict", first_line, chunk)
    except _NotUtf8 as bad:
        if strict:
            raise TransformerError(
                f"{source} line {bad.line} is not valid UTF-8 ({bad.reason} at byte {bad.byte}); "
                f"--strict refuses it: convert the file to UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        print(
            f"warning: {source} is not valid UTF-8 (first at line {bad.line}); undecodable bytes were "
            f"replaced with U+FFFD",
            file=sys.stderr,
        )
    stream.seek(start)
    return _read_lines(stream, "replace", first_line, chunk)


class _NotUtf8(Exception):
    """The first undecodable byte: its line, the decoder's reason and its offset in the stream."""

    def __init__(self, line: int, reason: str, byte: int) -> None:
        self.line, self.reason, self.byte = line, reason, byte


def _read_lines(stream: BinaryIO, errors: str, first_line: int, chunk: int) -> list[str]:
    """The stream's lines, decoded with `errors` ("strict": `_NotUtf8` at the first bad byte). A chunk
    may end inside a character (the decoder holds its start), between CR and LF, or inside a line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    lines: list[str] = []
    begun, fed, at_start = "", 0, True  # the line read but not ended; bytes given to the decoder
    while True:
        block = stream.read(chunk)
        held = len(decoder.getstate()[0])  # the start of a character cut by the last block's end
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as error:  # error.object: the held bytes and this block
            line = first_line + len(lines) + error.object.count(b"\n", 0, error.start)
            raise _NotUtf8(line, error.reason, fed - held + error.start) from None
        fed += len(block)
        if at_start and text:
            text, at_start = text.removeprefix(_BOM), False
        parts = (begun + text).split("\n")
        begun = parts.pop()
        lines.extend(part.removesuffix("\r") for part in parts)
        if not block:
            break
    if begun:
        lines.append(begun.removesuffix("\r"))
    return lines


def single_line(text: str) -> str:
    """`text` with any line break made a space, so that it prints as exactly one line."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
