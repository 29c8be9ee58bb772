"""Reading the package's line-based text files (CoNLL, JSONL): UTF-8, an optional byte-order mark,
and a clear error naming the file and the line for bytes that are not UTF-8 or JSON nested beyond
Python's recursion limit (instead of a bare ``UnicodeDecodeError`` / ``RecursionError``)."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Tuple

__all__ = ["parse_json_line", "utf8_lines"]

# Bytes that are not UTF-8 come back from the "surrogateescape" error handler as lone surrogates.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def utf8_lines(path: str) -> Iterator[Tuple[int, str]]:
    """``(1-based line number, line)`` of a UTF-8 text file (a leading BOM is skipped).

    Raises:
        ValueError: a line holds bytes that are not UTF-8 (the message names the file and line).
    """
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, line in enumerate(handle, start=1):
            bad = _ESCAPED_BYTE.search(line)
            if bad is not None:
                raise ValueError(
                    f"{path}:{line_number}: byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1} is not "
                    "UTF-8; save the file as UTF-8"
                )
            yield line_number, line


def parse_json_line(line: str, where: str) -> Any:
    """``json.loads`` of one JSONL line; ``ValueError`` starting with ``where`` when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
