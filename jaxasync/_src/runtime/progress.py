"""A tiny dependency-free progress bar for the terminal (one line, redrawn in place).

Example:
  >>> bar = ProgressBar(100, "run", enabled=False)
  >>> bar.update(50, loss=0.1)
  >>> bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """Draws ``desc [#####-----] 50% 500/1000 3.2s key=value`` on one line of ``stream``.

    Args:
      total: the value at 100%, or None for a counter without a bar.
      desc: a short label.
      stream: where to draw (default ``sys.stderr``).
      enabled: draw or not; None draws only when ``stream`` is a terminal.
      width: characters of the bar.
      min_interval: seconds between two redraws (updates in between only store the values).
      unit: name of the counted unit.
    """

    def __init__(
        self,
        total: float | None,
        desc: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 24,
        min_interval: float = 0.1,
        unit: str = "",
    ):
        self.total, self.desc, self.width, self.unit = total, desc, width, unit
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.min_interval = min_interval
        self.start = time.monotonic()
        self._last_draw = -float("inf")
        self._value, self._postfix = 0.0, {}
        self._width_drawn = 0

    def update(self, value: float, force: bool = False, **postfix: Any) -> None:
        """Sets the current value (and the ``key=value`` fields) and redraws if it is time."""
        self._value, self._postfix = value, postfix
        now = time.monotonic()
        if self.enabled and (force or now - self._last_draw >= self.min_interval):
            self._last_draw = now
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(max(self._value / self.total, 0.0), 1.0)
            fill = int(round(frac * self.width))
            parts.append(f"[{'#' * fill}{'-' * (self.width - fill)}] {100 * frac:3.0f}%")
            parts.append(f"{_num(self._value)}/{_num(self.total)}{self.unit}")
        else:
            parts.append(f"{_num(self._value)}{self.unit}")
        parts.append(f"{now - self.start:.1f}s")
        parts += [f"{k}={_num(v)}" for k, v in self._postfix.items()]
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        line = self.render(now)
        pad = max(self._width_drawn - len(line), 0)
        self._width_drawn = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state and ends the line."""
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _num(v: Any) -> str:
    if isinstance(v, float):
        if v != v or v in (float("inf"), -float("inf")):
            return str(v)
        if v == int(v) and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.3g}"
    return str(v)
