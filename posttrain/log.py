"""One console for human-readable messages (stderr), so stdout stays clean for data."""

from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # written to a file or pipe (a log, CI): rich's 80 columns cut the tables' headers to "accu…"
    console.width = 160


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str, *, style: str | None = None) -> None:
    if is_main_process():
        console.print(f"[posttrain] {msg}", style=style, markup=False) if style is None else console.print(
            f"[posttrain] {msg}", style=style
        )


def warn(msg: str) -> None:
    if is_main_process():
        console.print(f"[posttrain] warning: {msg}", style="yellow", markup=False)


def die(msg: str, code: int = 2) -> None:
    console.print(f"posttrain: error: {msg}", style="bold red", markup=False)
    sys.exit(code)
