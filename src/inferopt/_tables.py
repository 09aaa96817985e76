"""Tables as commands print them: a console table (rich) and a Markdown table."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                fold: Sequence[str] = ()) -> None:
    """``rows`` under ``columns`` on stdout; the ``fold`` columns wrap, the others do not. A
    pipe or a log file gets the whole table (160 columns), not one folded to 80."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=bool(fold) and col not in fold)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, ``|`` in a cell escaped and a line break as ``<br>``, ending with a
    newline."""
    lines = [list(columns), ["---"] * len(columns), *rows]
    return "".join("| " + " | ".join(c.replace("|", "\\|").replace("\n", "<br>")
                                     for c in cells) + " |\n" for cells in lines)
