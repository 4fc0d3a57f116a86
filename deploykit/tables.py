"""Terminal tables with rich: boxed headers on a terminal, plain aligned text when piped.

Plain means no colour, no box characters, no trailing spaces and no wrapping at 80 columns,
so ``deploykit targets | grep tflite`` and ``awk`` see whole rows.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 10_000  # never wrap a piped row


def render(header: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None,
           tty: bool | None = None, right: Sequence[int] = ()) -> str:
    """The table as text; ``tty`` defaults to whether stdout is a terminal. ``right``: column
    indexes to right-align (numbers)."""
    if tty is None:
        tty = sys.stdout.isatty()
    table = Table(box=box.SIMPLE_HEAD if tty else None, show_edge=False, pad_edge=False, expand=False,
                  title=title if tty else None, title_justify="left", header_style="bold" if tty else "",
                  padding=(0, 1, 0, 0) if tty else (0, 2, 0, 0))
    for i, name in enumerate(header):
        # one-word columns (names, statuses, numbers) never wrap mid-word; prose columns take the squeeze
        one_word = all(" " not in str(r[i]) for r in rows if i < len(r))
        table.add_column(Text(name), justify="right" if i in right else "left", overflow="fold",
                         no_wrap=not tty or one_word)
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))  # Text: a '[' in a name is never markup
    width = None if tty else PIPE_WIDTH
    buf = io.StringIO()
    console = Console(file=buf, width=width or _terminal_width(), force_terminal=tty, no_color=not tty,
                      highlight=False, color_system="standard" if tty else None)
    console.print(table)
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if title and not tty:
        lines.insert(0, title)
    return "\n".join(lines)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 40)).columns


def escape(text: str) -> str:
    """Terminal control characters (ESC, BEL, CR, ...) as visible escapes: metadata from a model
    file must not be able to move the cursor, retitle the window or hide what follows."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)
