"""Progress on stderr, so stdout stays a command's report (`keys rotate`, `bulk requeue`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise (at
    most one every `every` seconds, and the last one always)."""

    WIDTH = 30

    def __init__(
        self,
        label: str,
        total: int,
        *,
        words: tuple[str, str] = ("done", "skipped"),
        stream: IO[str] | None = None,
        tty: bool | None = None,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.words = label, total, words
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every, self.clock = every, clock
        self.last_line: float | None = None
        self.last_shown: tuple[int, int] | None = None
        self.drawn = False

    def update(self, done: int, skipped: int = 0, *, final: bool = False) -> None:
        shown = (done, skipped)
        if self.tty:
            if shown == self.last_shown and not final:
                return
            self.stream.write("\r" + self._text(done, skipped, bar=True) + "\x1b[K")
            self.drawn = True
            if final:
                self.stream.write("\n")
                self.drawn = False
        else:
            at = self.clock()
            if shown == self.last_shown and not (final and self.last_line is None):
                return
            if not final and self.last_line is not None and at - self.last_line < self.every:
                return
            self.stream.write(self._text(done, skipped, bar=False) + "\n")
            self.last_line = at
        self.last_shown = shown
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own, below the bar."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def _text(self, done: int, skipped: int, *, bar: bool) -> str:
        processed = done + skipped
        share = 1.0 if self.total <= 0 else min(1.0, processed / self.total)
        counts = f"{processed:,}/{self.total:,} ({share:.0%}): {self.words[0]} {done:,}, "
        counts += f"{self.words[1]} {skipped:,}"
        if not bar:
            return f"{self.label}: {counts}"
        filled = round(share * self.WIDTH)
        return f"{self.label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {counts}"
