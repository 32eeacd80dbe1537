"""Reading Exchange exports: bytes → text, which of the three formats (Format-List, Export-Csv,
ConvertTo-Json) a text is, and its objects as records (dicts of property name → raw value).
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any


class ExchangeImportError(ValueError):
    """The text is not an export this module understands."""


def decode_export(data: bytes) -> str:
    """Bytes of an exported file → text. Windows PowerShell 5.1 writes UTF-16 LE (`>`/Out-File),
    ASCII or UTF-8 with BOM (Export-Csv); anything else falls back to cp1252."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    head = data[:400]
    if len(head) >= 4 and head[1::2].count(0) > len(head) // 4 and head[0::2].count(0) == 0:
        return data.decode("utf-16-le", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def detect_format(text: str) -> str:
    """'json', 'csv', 'list' (Format-List) or 'protocol-log'; raises ExchangeImportError otherwise."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise ExchangeImportError("the file is empty")
    if stripped[0] in "[{":
        return "json"
    first = stripped.splitlines()[0]
    if (
        first.startswith("#Software")
        or first.startswith("#Log-type")
        or "#Fields: date-time" in stripped[:2000]
    ):
        return "protocol-log"
    if first.upper().startswith("#TYPE"):
        return "csv"
    if re.match(r'^"?[A-Za-z][\w ]*"?\s*[,;\t]\s*"?[A-Za-z]', first) and not re.match(
        r"^\S+\s+:", first
    ):
        return "csv"
    if re.search(r"^[A-Za-z][\w.-]*\s*:", stripped, re.MULTILINE):
        return "list"
    raise ExchangeImportError(
        "not a Format-List, Export-Csv or ConvertTo-Json export of an Exchange cmdlet"
    )


_FL_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)\s*:(?:\s(.*))?$")


def _join_continuation(previous: str, continuation: str, *, spaced: bool) -> str:
    """A value's next line appended. `spaced`: a blank stood at the break (the line ended in one,
    as word wrap leaves it, or the continuation starts with one, or the line stops short of the
    width, its blank stripped); otherwise the break cut a word at the width (Format-List in cultures
    other than en/fr/de/it/pt/es wraps that way)."""
    if not previous:
        return continuation
    if previous.startswith("{") and not previous.endswith("}"):
        # Inside a wrapped {a, b, c} list: entries hold no blank, so only ", " separates.
        return previous + (" " if previous.endswith(",") else "") + continuation
    return previous + (" " if spaced or previous.endswith(",") else "") + continuation


def _records_from_list(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    width = max((len(line.rstrip()) for line in lines), default=0)
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    last_key: str | None = None
    value_column = 0
    previous_line = ""
    for raw_line in lines:
        line = raw_line.rstrip()
        if not line.strip():
            if current:
                records.append(current)
                current, last_key = {}, None
            continue
        if line[0] in " \t":
            if last_key is not None:
                segment = raw_line[value_column:] if not raw_line[:value_column].strip() else line
                spaced = (
                    previous_line[-1:].isspace()
                    or segment[:1].isspace()
                    or len(previous_line.rstrip()) < width
                )
                current[last_key] = _join_continuation(
                    current[last_key], segment.strip(), spaced=spaced
                )
                previous_line = raw_line
            continue
        match = _FL_KEY.match(line)
        if not match or match.group(1) in ("WARNING", "VERBOSE", "DEBUG", "PS"):
            last_key = None
            continue
        key, value = match.group(1), (match.group(2) or "").strip()
        if key in current:  # next object printed without a blank line in between
            records.append(current)
            current = {}
        current[key] = value
        last_key = key
        value_column = match.start(2) if match.group(2) is not None else len(line) + 1
        previous_line = raw_line
    if current:
        records.append(current)
    return records


def _records_from_csv(text: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.lstrip("\ufeff").splitlines() if not ln.upper().startswith("#TYPE")]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return []
    header = lines[0]
    delimiter = max((",", ";", "\t"), key=header.count)
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    return [{k: v for k, v in row.items() if k is not None} for row in reader]


def _records_from_json(text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise ExchangeImportError(f"not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("value"), list) and "Count" in data:
        data = data[
            "value"
        ]  # Windows PowerShell 5.1 wraps some arrays as {"value": [...], "Count": n}
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ExchangeImportError("JSON export must be an object or an array of objects")
    return [item for item in data if isinstance(item, dict)]


def _records(text: str) -> tuple[str, list[dict[str, Any]]]:
    fmt = detect_format(text)
    if fmt == "protocol-log":
        raise ExchangeImportError(
            "this is a protocol log; pass it with --logs (or let the CLI detect it)"
        )
    reader = {"json": _records_from_json, "csv": _records_from_csv, "list": _records_from_list}[fmt]
    return fmt, reader(text)
