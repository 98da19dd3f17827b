"""Progress for the long steps (distilling exit heads, calibrating, tuning), by one rule everywhere:
a bar where someone watches, one line where nobody does.

`progress=None` (the default) draws a bar on stderr when stderr is a terminal; otherwise (a log, CI, a
notebook) nothing per step and one summary line at the end ("adaptc: distilled 5 exit heads in 12.3 s").
`progress=True` always draws the bar; `progress=False` prints nothing at all.
"""
from __future__ import annotations

import sys
import time
from typing import Any


def shows_bar(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


class Steps:
    """One long step of `total` units: `advance()` as they are done, `describe()` to rename the step,
    and `done` (set before the block ends) is the summary line's text.

    >>> with Steps("distilling exit heads", 300, progress) as steps:
    ...     for _ in range(300):
    ...         steps.advance(note=f"loss {loss:.4f}")
    ...     steps.done = "distilled 5 exit heads"
    """

    def __init__(self, desc: str, total: int, progress: bool | None = None) -> None:
        self.desc, self.total, self.done = desc, total, ""
        self._summarize = progress is None  # False means silence; a bar needs no summary
        self._bar: Any = None
        self._task: Any = None
        if shows_bar(progress):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            # Asked for (True) off a terminal: draw anyway, the user wants to see it move.
            console = Console(stderr=True, force_terminal=True if progress else None)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                                 console=console, transient=True)

    def __enter__(self) -> "Steps":
        self._start = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, note="")
        return self

    def advance(self, n: float = 1, note: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"note": note} if note is not None else {}))

    def describe(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=desc)

    def __exit__(self, exc_type, *_: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._summarize = False
        if self._summarize and exc_type is None:
            print(f"adaptc: {self.done or self.desc} in {time.perf_counter() - self._start:.1f} s", file=sys.stderr,
                  flush=True)
