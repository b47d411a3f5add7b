"""A tiny terminal progress bar (no dependency): ``for x in progress(items, "label"): ...``.

It redraws one line on stderr when stderr is a terminal and prints nothing otherwise, so tests and CI
logs stay clean. ``Progress`` can also be driven by hand (``update(done, total, note)``) for work whose
size is known only while it runs, such as a real multi-process training.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """A one-line progress bar: ``label [#####.....] done/total elapsed note``."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        enabled: bool | None = None,
        width: int = 28,
        stream=None,
    ):
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: float, total: float | None = None, note: str = "", force: bool = False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:  # at most 10 redraws a second
            return
        self._last = now
        total = total if total is not None else self.total
        frac = min(max(done / total, 0.0), 1.0) if total else 0.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        count = f"{done:g}/{total:g}" if total else f"{done:g}"
        line = f"\r{self.label} [{bar}] {count} {now - self.start:6.1f}s {note}"
        self.stream.write(line[:200].ljust(80))
        self.stream.flush()

    def close(self, note: str = ""):
        if self.enabled:
            self.update(self.total or 0, note=note, force=True)
            self.stream.write("\n")
            self.stream.flush()


def progress(items: Iterable[T], label: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """Yields ``items`` while drawing a bar (total from ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    bar = Progress(label, total, **kwargs)
    done = 0
    for item in items:
        bar.update(done, note="")
        yield item
        done += 1
    bar.close()
