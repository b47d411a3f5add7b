"""What every paper reproduction returns: a results table, checks against the targets, plot and JSON.

A reproduction is a function ``reproduce(quick=False, out="results", seeds=None) -> Report``. It runs
the cheap reproduction of the paper (ALGORITHMS.md of the project) in the simulator, prints nothing
itself, and returns a :class:`Report`; the CLI prints the table and the verdicts and writes the files.
``quick=True`` runs a smaller version that finishes in seconds (the smoke test in the test suite); its
numbers are not the acceptance numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class Check:
    """One acceptance target and whether the run met it."""

    claim: str
    passed: bool
    detail: str = ""


@dataclasses.dataclass
class Report:
    """The outcome of one reproduction.

    Attributes:
      name: the paper's key (``rfast``, ``asgrad``, ...).
      title: one line saying what was reproduced.
      columns: column names of ``rows``.
      rows: the results table, one list per row.
      checks: the acceptance targets and verdicts.
      notes: free text: settings, what differs from the paper, honest caveats.
      curves: ``{label: (x, y)}`` plotted in the PNG (``x_label``, ``y_label``, log-scale ``y``).
      files: paths written by :meth:`save`.
    """

    name: str
    title: str
    columns: Sequence[str]
    rows: list
    checks: list
    notes: list = dataclasses.field(default_factory=list)
    curves: dict = dataclasses.field(default_factory=dict)
    x_label: str = "simulated time"
    y_label: str = "loss"
    files: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(bool(c.passed) for c in self.checks)

    def table(self) -> str:
        """The results table and the verdicts as plain text."""
        cells = [[str(c) for c in self.columns]] + [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title, ""]
        for k, row in enumerate(cells):
            lines.append("  ".join(v.rjust(w) if k else v.ljust(w) for v, w in zip(row, widths)))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        for c in self.checks:
            lines.append(
                f"[{'PASS' if c.passed else 'FAIL'}] {c.claim}" + (f" ({c.detail})" if c.detail else "")
            )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def save(self, out: str | os.PathLike) -> list:
        """Writes ``<out>/<name>.json`` (every number) and ``<out>/<name>.png`` (the curves)."""
        os.makedirs(out, exist_ok=True)
        json_path = os.path.join(out, f"{self.name}.json")
        with open(json_path, "w") as f:
            json.dump(
                dict(
                    name=self.name,
                    title=self.title,
                    columns=list(self.columns),
                    rows=[[_plain(v) for v in row] for row in self.rows],
                    checks=[dict(claim=c.claim, passed=bool(c.passed), detail=c.detail) for c in self.checks],
                    notes=self.notes,
                    passed=bool(self.passed),
                    curves={
                        k: [_plain(np.asarray(x)), _plain(np.asarray(y))] for k, (x, y) in self.curves.items()
                    },
                ),
                f,
                indent=1,
            )
        self.files = [json_path]
        if self.curves:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label, (x, y) in self.curves.items():
                ax.plot(np.asarray(x), np.asarray(y), label=label)
            ax.set_yscale("log")
            ax.set_xlabel(self.x_label)
            ax.set_ylabel(self.y_label)
            ax.set_title(self.title, fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            png_path = os.path.join(out, f"{self.name}.png")
            fig.savefig(png_path, dpi=110)
            plt.close(fig)
            self.files.append(png_path)
        return self.files


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.ndim else _plain(v.item())
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v
