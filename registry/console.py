"""Terminal output for the command line: aligned tables, colour and progress bars, without dependencies.

Colour is used only when stdout is a terminal and ``NO_COLOR`` is unset (https://no-color.org);
progress bars are drawn on stderr only when stderr is a terminal. Piped output is plain text, so
``registry list | grep sdpa`` and redirected reports stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

Cell = str | tuple[str, str]
"""A table cell: its text, or (text, style) where style is a name of :data:`STYLES`."""

STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}
_BAR_WIDTH = 24


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _plain(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell[0]


class Console:
    """Where the command line writes: results to ``out``, progress and errors to ``err``.

    Args:
        color: force colour on or off; ``None`` decides from ``out`` being a terminal and ``NO_COLOR``.
        progress: force progress bars on or off; ``None`` draws them when ``err`` is a terminal.

    Example:
        >>> console = Console()
        >>> console.print(console.table(["name", "status"], [["sdpa", ("ok", "green")]]))
    """

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        color: bool | None = None,
        progress: bool | None = None,
    ):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        no_color = os.environ.get("NO_COLOR", "") != ""
        self.color = color if color is not None else (_is_tty(self.out) and not no_color)
        self.progress_enabled = progress if progress is not None else _is_tty(self.err)

    def style(self, text: str, style: str | None) -> str:
        """``text`` wrapped in the ANSI codes of ``style`` (e.g. ``"green"``, ``"bold"``), if colour is on."""
        if not self.color or not style:
            return text
        codes = ";".join(STYLES[s] for s in style.split("+"))
        return f"\033[{codes}m{text}\033[0m"

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Cell]], *, indent: int = 0, header: bool = True
    ) -> str:
        """Rows aligned in columns under a header (``header=False``: no header line); widths are
        measured on the text, before colour."""
        widths = [len(h) for h in headers]
        for row in rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(_plain(cell)))
        pad = " " * indent
        lines = []
        if header:
            lines.append(pad + self._row([(h, "bold") for h in headers], widths))
        lines += [pad + self._row(row, widths) for row in rows]
        return "\n".join(line.rstrip() for line in lines)

    def _row(self, row: Sequence[Cell], widths: Sequence[int]) -> str:
        """One line: each cell styled, then padded to its column (padding outside the colour codes)."""
        cells = []
        for i, cell in enumerate(row):
            text, style = (cell, None) if isinstance(cell, str) else cell
            padding = "" if i == len(row) - 1 else " " * (widths[i] - len(text))
            cells.append(self.style(text, style) + padding)
        return "  ".join(cells)

    def progress(self, label: str, total: int) -> Progress:
        """A progress bar on stderr (drawn only when stderr is a terminal)."""
        return Progress(self.err if self.progress_enabled else None, label, total)


class Progress:
    """A one-line progress bar: ``label [#####.....] 3/6 1.2s``, erased when it closes.

    Use as a context manager and call :meth:`update` with the number of steps done.
    """

    def __init__(self, stream: TextIO | None, label: str, total: int):
        self.stream, self.label, self.total = stream, label, max(total, 1)
        self.start = time.perf_counter()
        self.done = 0

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def update(self, done: int, label: str | None = None) -> None:
        self.done = min(done, self.total)
        if label is not None:
            self.label = label
        self._draw()

    def _draw(self) -> None:
        if self.stream is None:
            return
        filled = round(_BAR_WIDTH * self.done / self.total)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r\033[K{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s")
        self.stream.flush()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
