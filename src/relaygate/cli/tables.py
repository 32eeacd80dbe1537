"""List tables that fit the terminal: `queue list`, `queue summary`, `trace`, `connector list`,
`send-connector list`, `permission list`.

Wide (120 columns or more): every column, long values folded. Narrow (a terminal or piped output
at the usual 80 columns, where folding made each row of eight columns eight lines tall): one line
per row, as Exchange's ``Format-Table`` prints, with

* ``WHOLE`` columns at their full width (an Identity or a name is what the other commands take),
* ``CUT`` columns sharing what is left, cut with an ellipsis,
* ``WIDE`` columns, and columns empty in every row, left out,
* no vertical rules,

and a line after the table saying so: ``--json`` (or ``show``) prints everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table

from relaygate.cli.common import console

__all__ = [
    "CUT",
    "WHOLE",
    "WIDE",
    "WIDE_TABLE",
    "is_narrow",
    "list_table",
    "print_narrow_hint",
    "when",
]

#: Below this many columns, tables are laid out narrow.
WIDE_TABLE = 120

WHOLE, CUT, WIDE = "whole", "cut", "wide"

#: Wide layout: columns never folded, and the widest a column may grow before folding.
_NO_WRAP = frozenset(
    {"Identity", "Status", "MessageCount", "NextRetryTime", "Enabled", "Date-time"}
)
_MAX_WIDTH = {"LastError": 50, "Subject": 40}


def is_narrow() -> bool:
    return console.width < WIDE_TABLE


def list_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table of ``columns`` (name, WHOLE | CUT | WIDE) laid out for the console's width;
    each row holds one cell per column (rich renderables or text)."""
    if not is_narrow():
        table = Table(header_style="bold")
        for name, _kind in columns:
            table.add_column(
                name,
                overflow="ellipsis" if name in _MAX_WIDTH and name != "LastError" else "fold",
                no_wrap=name in _NO_WRAP,
                max_width=_MAX_WIDTH.get(name),
            )
        for row in rows:
            table.add_row(*row)
        return table
    keep = [
        i
        for i, (_name, kind) in enumerate(columns)
        if kind != WIDE and any(str(row[i]) for row in rows)
    ]
    table = Table(
        header_style="bold", expand=True, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    for i in keep:
        name, kind = columns[i]
        if kind == CUT:
            ratio = 2 if name in ("LastError", "Status") else 1
            table.add_column(name, overflow="ellipsis", no_wrap=True, ratio=ratio, min_width=4)
        else:
            width = max(len(name), *(_longest_line(row[i]) for row in rows))
            table.add_column(name, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def print_narrow_hint() -> None:
    """After a table: say that it was cut, when it was."""
    if is_narrow():
        console.print(
            "(narrow terminal: long values cut, some columns left out; see --json)",
            markup=False,
            style="dim",
        )


def when(text: str) -> str:
    """A local ``YYYY-MM-DD HH:MM:SS`` for a table cell: whole, or in a narrow console
    ``HH:MM:SS`` when it is today and ``MM-DD HH:MM`` otherwise."""
    if text and is_narrow() and len(text) == 19:
        day, _, clock = text.partition(" ")
        today = datetime.now().astimezone().strftime("%Y-%m-%d")
        return clock if day == today else text[5:16]
    return text


def _longest_line(cell: Any) -> int:
    return max((len(line) for line in str(cell).split("\n")), default=0)
