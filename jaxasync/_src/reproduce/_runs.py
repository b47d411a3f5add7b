"""Runs one program under several asynchrony scenarios and seeds with a single XLA compilation.

``simulate`` compiles once per call because the asynchrony spec is baked into the jitted function.
Reproductions compare the same program under several crash schedules, so this helper jits the
simulator's ``run`` with the spec as an argument (specs of the same distribution kinds differ only
in arrays) and loops over scenarios and seeds in Python (a ``vmap`` over the event loop is slower
than a loop on CPU: the batched ``while_loop`` runs every branch of every event).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import simulator


def run_scenarios(
    program,
    problem,
    scenarios: Sequence,
    seeds: Sequence[int] | Sequence[Sequence[int]],
    *,
    steps: int,
    record_every: int,
    on_run=None,
):
    """Simulates ``program`` on ``problem`` under every scenario and seed, compiling once.

    Args:
      program: a node program.
      problem: a problem (one node per shard).
      scenarios: :class:`~jaxasync._src.asynchrony.Asynchrony` specs with the same distribution
        kinds (they may differ in scales, crash times, stragglers and loss).
      seeds: the seeds of every scenario, or one list of seeds per scenario.
      steps: local steps (summed over nodes) per simulation.
      record_every: local steps between two records.
      on_run: optional callable, called after every simulation (progress reporting).

    Returns:
      A list with, per scenario, the records stacked over its seeds (``{name: [seed, record, ...]}``,
      numpy) and the final node states stacked likewise.
    """
    n = simulator.num_nodes(program, problem)
    program.check_nodes(n)
    static = simulator.make_static(program, problem, scenarios[0], None)
    fn = jax.jit(
        functools.partial(
            simulator.run,
            static,
            num_records=-(-steps // record_every),
            record_every=record_every,
            max_events_per_record=1000 * record_every,
        )
    )
    if seeds and isinstance(seeds[0], int | np.integer):
        seeds = [list(seeds)] * len(scenarios)
    out = []
    for spec, spec_seeds in zip(scenarios, seeds):
        params = simulator.make_params(spec, n)
        runs = []
        for seed in spec_seeds:
            carry, records = jax.device_get(fn(params, jnp.int32(seed)))
            runs.append((records, carry.states))
            if on_run is not None:
                on_run()
        records = jax.tree.map(lambda *xs: np.stack(xs), *[r for r, _ in runs])
        states = jax.tree.map(lambda *xs: np.stack(xs), *[s for _, s in runs])
        out.append((records, states))
    return out


def tail_mean(x: np.ndarray, frac: float = 1 / 3) -> np.ndarray:
    """Mean over the last ``frac`` of the record axis (the last axis)."""
    k = max(1, int(round(x.shape[-1] * frac)))
    return np.mean(x[..., -k:], axis=-1)
