"""Local data files as raw rows: txt, jsonl, csv and tsv, any of them gzipped.

Real files come as they were published, not as a loader would like them: GLUE's TSVs start
with a UTF-8 byte-order mark, AG News' CSV has no header row, Penn Treebank's text has one
sentence per line and no blank line anywhere. Each of these reads here without hand edits;
``loaders.py`` picks the file and turns the rows into normalized records.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.tasks.base import FILE_FORMATS, TABLE_FORMATS

# Extensions that map to a format without ``source.format``; anything else (e.g. WikiText's
# ``.tokens``) needs the format spelled out.
EXT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_LAST_SPACE = re.compile(r"\s(?=\S*$)")
_NONSPACE = re.compile(r"\S")


def format_of(name: str, given: str | None) -> str:
    if given is not None:
        if given not in FILE_FORMATS:
            raise MoeguardError(f"file format '{given}' is not supported",
                                hint=f"set source.format to one of {', '.join(FILE_FORMATS)}")
        return given
    stem = name[:-3] if name.endswith(".gz") else name
    fmt = EXT_FORMATS.get(Path(stem).suffix.lower())
    if fmt is None:
        raise MoeguardError(f"cannot tell the format of data file '{name}' from its extension",
                            hint=f"set source.format to one of {', '.join(FILE_FORMATS)}")
    return fmt


class _OwningGzip(gzip.GzipFile):
    """A GzipFile that closes the file it reads: given a ``fileobj``, GzipFile leaves it open (a
    ResourceWarning at every read of a .gz task file, a descriptor held until collection)."""

    def __init__(self, raw: Any):
        super().__init__(fileobj=raw)
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_bytes(file: Any) -> io.BufferedIOBase:
    """The file's bytes, a .gz file's decompressed."""
    raw = file.open("rb")
    return _OwningGzip(raw) if str(file.name).endswith(".gz") else raw


def open_text(file: Any) -> io.TextIOBase:
    raw = open_bytes(file)
    # utf-8-sig drops a leading byte-order mark (GLUE's MRPC TSV starts with one, which would
    # otherwise glue itself to the first column name: '\ufeffQuality') and reads plain UTF-8
    # unchanged. newline="" lets the csv module see embedded newlines inside quoted cells.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_file(file: Any, fmt: str | None, chunk_chars: int,
              columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one data file; ``columns`` names the cells of a csv/tsv without a header row."""
    return list(iter_file(file, fmt, chunk_chars, columns))


def iter_file(file: Any, fmt: str | None, chunk_chars: int,
              columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """:func:`read_file` row by row: a reader that needs the first records (the edge's check, a
    ``--limit``) reads no further into a large jsonl/csv/tsv file (a txt file is chunked whole).
    The format is checked at once; read errors are raised where the row is read, as one line."""
    fmt = format_of(str(file.name), fmt)
    if columns is not None and fmt not in TABLE_FORMATS:
        raise MoeguardError(f"source.columns is set, but data file '{file}' is read as {fmt}",
                            hint=f"columns only apply to header-less {'/'.join(TABLE_FORMATS)} files: drop them, "
                                 "or set source.format if the file is a table with another extension")
    return _rows(file, fmt, chunk_chars, columns)


def _rows(file: Any, fmt: str, chunk_chars: int, columns: Sequence[str] | None) -> Iterator[dict[str, Any]]:
    # a cell may be a whole article (the csv module's default limit is 128 KiB)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open_text(file) as handle:
            if fmt == "txt":
                yield from ({"text": t} for t in chunk_text(handle.read(), chunk_chars))
                return
            if fmt == "jsonl":
                yield from _jsonl(handle, file)
                return
            delimiter = "\t" if fmt == "tsv" else ","
            # SST-2's TSV has unbalanced double quotes: QUOTE_NONE keeps them as text.
            quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
            if columns is not None:
                yield from _headerless(csv.reader(handle, delimiter=delimiter, quoting=quoting), columns, file)
                return
            # a short row's missing cells get _SHORT, refused: DictReader's None read as an empty text or summary
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting, restval=_SHORT)
            if not reader.fieldnames:
                return
            yield from (_check_width(row, file, reader.line_num) for row in reader)
    except UnicodeDecodeError as exc:
        # exc.start counts from the chunk being decoded: past the first 8 KiB it named another byte
        where = _first_bad_byte(file)
        at = f" at byte {where[0]}, line {where[1]}" if where is not None else ""
        raise MoeguardError(f"data file '{file}' is not UTF-8 text ({exc.reason}{at})",
                            hint="re-encode it as UTF-8") from None
    except (OSError, EOFError, zlib.error) as exc:  # e.g. a truncated, corrupt or mislabelled .gz
        raise MoeguardError(f"could not read data file '{file}': {first_line(exc)}",
                            hint="check the file is complete and matches its extension") from None
    except csv.Error as exc:
        raise MoeguardError(f"data file '{file}' is not a valid {fmt} table ({first_line(exc)})",
                            hint="check its quoting and delimiter (source.format), or convert it to jsonl") from None


def _first_bad_byte(file: Any) -> tuple[int, int] | None:
    """The offset and line (from 1) of the file's first byte that is not UTF-8 (of the decompressed
    bytes, for a .gz file), read again a megabyte at a time; None if it cannot be read again."""
    import codecs

    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    try:
        with open_bytes(file) as f:
            while chunk := f.read(1 << 20):
                pending = len(decoder.getstate()[0])   # the previous chunk's unfinished character
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:   # e.start counts from the pending bytes, then the chunk's
                    return offset - pending + e.start, line + chunk[:max(0, e.start - pending)].count(b"\n")
                offset, line = offset + len(chunk), line + chunk.count(b"\n")
            pending = len(decoder.getstate()[0])
            try:   # a file that ends inside a character (cut short, or Latin-1's last é)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                return offset - pending + e.start, line
    except (OSError, EOFError, zlib.error):
        return None
    return None


def _headerless(reader: Any, columns: Sequence[str], file: Any) -> Iterator[dict[str, Any]]:
    for cells in reader:
        if not cells:  # a blank line, skipped as DictReader skips it
            continue
        if len(cells) != len(columns):
            # Too few cells is as wrong as too many here: with named columns a short row would
            # silently shift every later cell into the wrong field.
            raise MoeguardError(
                f"line {reader.line_num} of '{file}' has {len(cells)} cell(s), but source.columns names "
                f"{len(columns)} ({', '.join(columns)})",
                hint="list one name per column in source.columns, or check the delimiter and quoting of that line",
            )
        yield dict(zip(columns, cells))


def _jsonl(handle: Iterable[str], file: Any) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoeguardError(f"line {number} of '{file}' is not valid JSON ({exc.msg})",
                                hint="write one JSON object per line (JSON Lines)") from None
        except (ValueError, RecursionError) as exc:   # an integer past Python's digit limit; [[[[... too deep
            said = "nested too deeply to read" if isinstance(exc, RecursionError) else str(exc)
            raise MoeguardError(f"line {number} of '{file}' is not usable JSON ({said})",
                                hint="write one JSON object per line (JSON Lines)") from None
        if not isinstance(row, dict):
            raise MoeguardError(f"line {number} of '{file}' is a JSON {type(row).__name__}, not an object",
                                hint="write one JSON object per line, with one key per column")
        yield row


_SHORT = object()   # DictReader's value for the cells a short row lacks


def _check_width(row: dict[str, Any], file: Any, line: int) -> dict[str, Any]:
    if None in row:  # DictReader files surplus cells under the key None
        raise MoeguardError(f"line {line} of '{file}' has more cells than the header",
                            hint="check the delimiter and quoting, add the missing header names, or, if the "
                                 "file has no header row, name its columns in source.columns")
    missing = [k for k, v in row.items() if v is _SHORT]
    if missing:   # a lost cell is as wrong as a surplus one (the header-less path refuses both)
        raise MoeguardError(f"line {line} of '{file}' has {len(row) - len(missing)} cell(s), fewer than the header's "
                            f"{len(row)} (no {', '.join(map(repr, missing))})",
                            hint="check the delimiter and quoting of that line, or fill the missing cells")
    return row


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Pack blank-line-separated paragraphs into chunks of about ``chunk_chars`` characters.

    Paragraph boundaries keep records readable; packing keeps short paragraphs (headings,
    verse) from each starting a fresh context, which would inflate perplexity. A paragraph
    longer than a chunk (all of a one-sentence-per-line corpus such as Penn Treebank, which
    has no blank line; a WikiText section) is cut at line ends into chunks of at most
    ``chunk_chars`` characters. A line is cut inside, at whitespace, only when it is longer
    than a chunk, or when it does not fit in a chunk that is still less than half full (a
    heading then keeps the text under it instead of becoming a record of its own).
    """
    chunks: list[str] = []
    buf, size = "", 0  # the open chunk; the characters of its paragraphs, separators not counted

    def flush() -> None:
        nonlocal buf, size
        if buf.strip():
            chunks.append(buf.strip())
        buf, size = "", 0

    for para in _PARAGRAPH.split(text.replace("\r\n", "\n")):
        para = para.strip()
        if not para:
            continue
        if len(para) <= chunk_chars:
            buf = f"{buf}\n\n{para}" if buf else para
            size += len(para)
            if size >= chunk_chars:
                flush()
            continue
        sep = "\n\n" if buf else ""
        for line in para.split("\n"):
            line = line.rstrip()
            # the line's unread part is line[at:], read by position: cutting a copy of the rest off at each
            # chunk (and stripping it to test it) was quadratic, hours for a one-line corpus of 1 GB
            at = 0
            while (text := _NONSPACE.search(line, at)) is not None:
                if not buf:
                    at, sep = text.start(), ""
                room = chunk_chars - len(buf) - len(sep)
                if len(line) - at <= room:
                    buf, sep, at = buf + sep + line[at:], "\n", len(line)
                    continue
                if buf and (len(buf) >= chunk_chars / 2 or room <= 1):
                    flush()  # full enough: the line opens the next chunk
                    continue
                head, after = _cut_at_space(line, at, room)
                if not head and buf:
                    flush()  # no whitespace within the room: the line opens the next chunk
                    continue
                if not head:  # a single word longer than a chunk
                    head, after = line[at:at + room], at + room
                buf += sep + head
                flush()
                at = after
        size = len(buf)
        if size >= chunk_chars:
            flush()
    flush()
    return chunks


def _cut_at_space(line: str, at: int, room: int) -> tuple[str, int]:
    """``line[at:]`` cut at its last whitespace that leaves at most ``room`` characters before it: the
    part before it and where the rest's text starts; ``("", at)`` when there is none."""
    window = line[at:at + room + 1]
    space = _LAST_SPACE.search(window)
    head = window[:space.start()].rstrip() if space else ""
    if not head:
        return "", at
    rest = _NONSPACE.search(line, at + space.start())
    return head, rest.start() if rest is not None else len(line)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
