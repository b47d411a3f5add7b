"""Traces: metrics of one run (or of several seeds) against time and event count.

The simulator and the real runtimes return the same :class:`Trace`: a dict of metric arrays sampled
at record points (leading axis: seeds, when several were run at once; then records) plus metadata.
Time is simulated time for the simulator and wall-clock seconds for the runtimes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


class Trace:
    """Metrics recorded during a run.

    Attributes:
      metrics: ``{name: array}``; every array has shape ``[records]`` or ``[seeds, records]``.
      meta: JSON-serialisable description of the run (algorithm, problem, asynchrony, seed, ...).
    """

    def __init__(self, metrics: Mapping[str, Any], meta: Mapping[str, Any] | None = None):
        self.metrics = {k: np.asarray(v) for k, v in metrics.items()}
        self.meta = dict(meta or {})

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"no metric {name!r}; the trace has {sorted(self.metrics)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.metrics

    @property
    def num_seeds(self) -> int:
        return int(self.metrics["time"].shape[0]) if self.metrics["time"].ndim == 2 else 1

    def final(self, name: str) -> np.ndarray | float:
        """The last recorded value of ``name`` (one per seed if several seeds ran)."""
        v = self[name][..., -1]
        return float(v) if np.ndim(v) == 0 else v

    def time_to(self, name: str, threshold: float) -> np.ndarray | float:
        """The first recorded time at which ``name <= threshold`` (inf if never)."""
        values, times = self[name], self["time"]
        hit = values <= threshold
        first = np.where(hit.any(-1), np.argmax(hit, -1), -1)
        t = np.where(
            first >= 0,
            np.take_along_axis(times, np.maximum(first, 0)[..., None], -1)[..., 0],
            np.inf,
        )
        return float(t) if np.ndim(t) == 0 else t

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``.json`` (metrics as lists) or ``.npz`` (arrays plus the metadata as JSON)."""
        path = os.fspath(path)
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump(
                    {
                        "meta": self.meta,
                        "metrics": {k: v.tolist() for k, v in self.metrics.items()},
                    },
                    f,
                )
        elif path.endswith(".npz"):
            np.savez(path, __meta__=json.dumps(self.meta), **self.metrics)
        else:
            raise ValueError(f"unknown trace format for {path!r}: use .json or .npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Reads a trace written by :meth:`save`."""
        path = os.fspath(path)
        if path.endswith(".json"):
            with open(path) as f:
                d = json.load(f)
            return cls({k: np.asarray(v) for k, v in d["metrics"].items()}, d["meta"])
        if path.endswith(".npz"):
            with np.load(path) as d:
                meta = json.loads(str(d["__meta__"]))
                return cls({k: d[k] for k in d.files if k != "__meta__"}, meta)
        raise ValueError(f"unknown trace format for {path!r}: use .json or .npz")

    def plot(
        self,
        path: str | os.PathLike,
        y: str = "loss",
        x: str = "time",
        ax=None,
        label: str | None = None,
        logy: bool = True,
    ):
        """Plots ``y`` against ``x`` (mean and min-max band over seeds) to a PNG file."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = np.atleast_2d(self[x]), np.atleast_2d(self[y])
        label = label or self.meta.get("algorithm", "")
        (line,) = ax.plot(xs.mean(0), ys.mean(0), label=label)
        if ys.shape[0] > 1:
            ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy:
            ax.set_yscale("log")
        if own:
            ax.legend()
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax

    def __repr__(self) -> str:
        shape = self.metrics["time"].shape if "time" in self.metrics else ()
        return f"Trace({self.meta.get('algorithm', '?')}, records={shape}, metrics={sorted(self.metrics)})"
