"""Small helpers the reproductions use to read curves out of traces (numpy only)."""

from __future__ import annotations

import numpy as np

from jaxasync._src import trace as trace_lib


def on_grid(trace: trace_lib.Trace, grid: np.ndarray, name: str = "loss") -> np.ndarray:
    """The seed-mean of ``name`` against simulated time, sampled on ``grid`` (NaN past a run's end).

    Each seed's curve is held constant between records (the value of the last record at or before the
    grid time), so no run is credited with a value before it was reached.
    """
    times, values = np.atleast_2d(trace["time"]), np.atleast_2d(trace[name])
    out = np.full((times.shape[0], len(grid)), np.nan)
    for s in range(times.shape[0]):
        idx = np.searchsorted(times[s], grid, side="right") - 1
        ok = (idx >= 0) & (grid <= times[s, -1])
        out[s, ok] = values[s, idx[ok]]
    return np.mean(out, axis=0)


def first_time(grid: np.ndarray, curve: np.ndarray, target: float) -> float:
    """First grid time where ``curve <= target`` (inf if never)."""
    hit = np.flatnonzero(curve <= target)
    return float(grid[hit[0]]) if hit.size else float("inf")


def first_steps(trace: trace_lib.Trace, name: str, threshold: float) -> np.ndarray:
    """Per seed, the ``steps`` count at the first record where ``name <= threshold`` (inf if never)."""
    values, steps = np.atleast_2d(trace[name]), np.atleast_2d(trace["steps"]).astype(float)
    hit = values <= threshold
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(-1), np.take_along_axis(steps, first[:, None], -1)[:, 0], np.inf)


def tail_mean(x: np.ndarray, frac: float = 1 / 3) -> np.ndarray:
    """Mean over the last ``frac`` of the record axis (the last axis)."""
    k = max(1, int(round(x.shape[-1] * frac)))
    return np.mean(x[..., -k:], axis=-1)
