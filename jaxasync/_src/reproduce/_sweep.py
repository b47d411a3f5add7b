"""Step-size and asynchrony sweeps with one XLA compile per program, and curves on a time grid.

`simulate` bakes the program and the asynchrony spec into its compiled function, so every step size,
loss rate or straggler setting would cost another compile (several seconds each on a 2-core machine).
`sweep` jits the simulator's ``run`` once with the step size and the spec as *arguments*: the program is
built inside the jitted function from a traced step size (``optimizer=optax.sgd(h)``), and specs of
the same distribution kinds differ only in arrays. It then loops over the runs in Python: on CPU a
``vmap`` over the event loop is slower than a loop, because a batched ``while_loop`` executes every
branch of every event (measured on R-FAST: 4 s compile + 0.43 s per run looped, against 16 s compile +
0.15 s per run vmapped, so a loop wins below about 40 runs, and compiles much faster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import simulator as simulator_lib
from jaxasync._src import trace as trace_lib


def sweep(
    make_program: Callable[[Any], Any],
    problem,
    runs: Sequence[tuple[float, Any]],
    *,
    seeds: Sequence[int],
    steps: int,
    record_every: int,
    pool_size: int | None = None,
    on_run: Callable[[], None] | None = None,
) -> list[trace_lib.Trace]:
    """Simulates ``make_program(h)`` under ``spec`` for every ``(h, spec)`` in ``runs``, compiling once.

    ``make_program`` is called inside the jitted function with ``h`` a traced float32 scalar, so it
    may use ``h`` only in traced arithmetic, e.g. ``optimizer=optax.sgd(h)`` (a ``learning_rate=``
    argument refuses a tracer). It is also called once with the first ``h`` outside, for the node
    count. The same seed gives the same trace as `simulate` with ``optax.sgd(h)``.

    Args:
      make_program: ``h -> NodeProgram``; its structure (graphs, channels, state) must not depend on ``h``.
      problem: a problem (one node per shard, plus the program's servers).
      runs: ``(h, Asynchrony)`` pairs; the specs must share their distribution kinds.
      seeds: seeds of every run; every trace gets a leading seed axis.
      steps: local steps (summed over nodes) per run.
      record_every: local steps between two metric records.
      pool_size: in-flight messages per channel (default as in `simulate`).
      on_run: called after every simulation (progress reporting).

    Returns:
      One `Trace` per run, metrics shaped ``[seeds, records]``.

    Raises:
      ValueError: specs with different distribution kinds (they compile differently).
    """
    kinds = {(spec.compute_time.kind, spec.delay.kind) for _, spec in runs}
    if len(kinds) != 1:
        raise ValueError(f"sweep: the specs must share distribution kinds, got {sorted(kinds)}")
    first = runs[0][1]
    program = make_program(runs[0][0])
    n = simulator_lib.num_nodes(program, problem)
    program.check_nodes(n)

    @jax.jit
    def one(h, params, seed):
        static = simulator_lib.make_static(make_program(h), problem, first, pool_size)
        return simulator_lib.run(
            static,
            params,
            seed,
            num_records=-(-steps // record_every),
            record_every=record_every,
            max_events_per_record=1000 * record_every,
        )[1]

    traces = []
    for h, spec in runs:
        params = simulator_lib.make_params(spec, n)
        records = []
        for seed in seeds:
            records.append(jax.device_get(one(jnp.float32(h), params, jnp.int32(seed))))
            if on_run is not None:
                on_run()
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *records)
        if np.any(stacked["overflow"]):
            raise RuntimeError(f"sweep: {program.name} overflowed the in-flight pool; raise pool_size")
        meta = dict(
            algorithm=program.name,
            problem=problem.name,
            nodes=n,
            steps=steps,
            seed=list(seeds),
            step_size=float(h),
        )
        traces.append(trace_lib.Trace(stacked, meta))
    return traces


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
