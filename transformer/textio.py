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
from collections.abc import Iterator
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
    """`decode_lines` of a binary stream's bytes, read and decoded `chunk` bytes at a time: a file is never
    in memory as bytes and as text besides its lines (a 655-MB file of 4.5M lines peaked at 2.96 GB read
    whole, where its lines take 1.02 GB)."""
    lines: list[str] = []
    for block in iter_line_blocks(stream, strict=strict, source=source, first_line=first_line, chunk=chunk):
        lines.extend(block)
    return lines


def iter_line_blocks(
    stream: BinaryIO,
    *,
    strict: bool = False,
    source: str = "input",
    first_line: int = 1,
    chunk: int = CHUNK_BYTES,
) -> Iterator[list[str]]:
    """The lines of `decode_stream`, a chunk's worth at a time: a corpus larger than memory can be digested
    and tokenised as it is read.

    A chunk may end inside a character (the decoder holds its start), between CR and LF, or inside a line
    (held until its end comes). At the first byte that is not UTF-8, `strict` raises; otherwise a warning
    names its line and the rest is decoded with U+FFFD for each bad byte, by a decoder that takes over the
    strict one's state, so the stream is read once."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    begun, fed, at_start, line = "", 0, True, first_line  # the line read but not ended; bytes decoded
    while True:
        block = stream.read(chunk)
        held = decoder.getstate()  # the start of a character cut by the last block's end
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as error:  # error.object: the held bytes and this block
            bad, byte = line + error.object.count(b"\n", 0, error.start), fed - len(held[0]) + error.start
            where = f"line {bad} is not valid UTF-8 ({error.reason} at byte {byte})"
            if strict:
                raise TransformerError(
                    f"{source} {where}; --strict refuses it: convert the file to UTF-8 (e.g. iconv -t UTF-8)"
                ) from None
            print(
                f"warning: {source} is not valid UTF-8 (first at line {bad}); undecodable bytes were "
                f"replaced with U+FFFD",
                file=sys.stderr,
            )
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            decoder.setstate(held)  # a failed decode leaves the state as it was
            text = decoder.decode(block, final=not block)
        fed += len(block)
        if at_start and text:
            text, at_start = text.removeprefix(_BOM), False
        parts = (begun + text).split("\n")
        begun = parts.pop()
        if parts:
            line += len(parts)
            yield [part.removesuffix("\r") for part in parts]
        if not block:
            break
    if begun:
        yield [begun.removesuffix("\r")]


def single_line(text: str) -> str:
    """`text` with any line break made a space, so that it prints as exactly one line."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
