# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Decentralized asynchronous SGD by update broadcasting (DASGD).

Every node keeps a full model, computes gradients on its own data without any barrier, applies its own
update at once and broadcasts it; every remote update is applied exactly once on arrival. Updates
commute, so once the in-flight messages land every node holds the same model
``x_bar = x_0 + sum_k u_k`` (exactly with plain SGD, up to floating-point reassociation).

References:
  Tosi and Theobald, "Convergence analysis of decentralized ASGD", arXiv:2309.03754 (2023).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = ["DasgdState", "dasgd"]

# Out-of-order messages per origin a relaying node can de-duplicate (bits of a uint32 window).
_WINDOW = 32


class DasgdState(NamedTuple):
    """State of one DASGD node.

    Attributes:
      node: int32 node id.
      params: the node's model ``x_i``.
      opt_state: the optimizer state of the node's own gradients.
      generated: int32, gradients this node computed.
      applied: int32, updates applied here (own and remote).
      applied_sum: int32 (wrapping), sum over this node's steps of ``applied`` at the step; gives the
        exact average gradient-set staleness (see :func:`dasgd`).
      seen: int32 ``[n]``, per origin, the length of the contiguous prefix of its updates applied here
        (flooding over a non-complete graph only).
      window: uint32 ``[n]``, per origin, which of the next 32 sequence numbers already arrived.
      given_up: int32, updates of other nodes this node gave up waiting for (flooding only: an
        update more than 32 ahead of an origin's prefix slides the window past the missing ones).
    """

    node: jax.Array
    params: PyTree
    opt_state: PyTree
    generated: jax.Array
    applied: jax.Array
    applied_sum: jax.Array
    seen: jax.Array
    window: jax.Array
    given_up: jax.Array


def _trailing_ones(m: jax.Array) -> jax.Array:
    """Number of trailing one bits of a uint32."""
    return jax.lax.population_count(m & ~(m + jnp.uint32(1))).astype(jnp.int32)


def _shift_left_one(k: jax.Array) -> jax.Array:
    """``1 << k`` as uint32, 0 for ``k >= 32``."""
    return jnp.where(k >= 32, jnp.uint32(0), jnp.uint32(1) << jnp.minimum(k, 31).astype(jnp.uint32))


def _shift_right(m: jax.Array, k: jax.Array) -> jax.Array:
    # A shift by the full width is not defined the same everywhere: spell out the zero.
    return jnp.where(k >= 32, jnp.uint32(0), m >> jnp.minimum(k, 31).astype(jnp.uint32))


def dasgd(
    *,
    num_nodes: int,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    graph: topology_lib.Graph | None = None,
) -> program_lib.NodeProgram:
    r"""Decentralized asynchronous SGD: every node broadcasts its updates, applies everyone's once.

    Node ``i``, when its job completes and whenever an update arrives:

    .. math::
        \text{step:}\quad g = \nabla F(x_i; \xi_i),\ \ u = \mathrm{opt}(g),\ \ x_i \leftarrow x_i + u,
        \ \ \text{broadcast } u; \qquad
        \text{receive } u_j:\quad x_i \leftarrow x_i + u_j .

    With ``learning_rate`` the update is ``u = -eta g`` (the paper's gradient broadcast). With an Optax
    ``optimizer`` the node runs it on *its own* gradients only and broadcasts the resulting update, so
    every model stays ``x_0 + sum of the updates it has applied`` and the models still agree once all
    messages land (optimizer statistics such as Adam moments are per node). Agreement is up to
    floating-point rounding: the sender may fuse ``x + u`` into a multiply-add, the receivers add the
    rounded ``u``, and arrival orders differ.

    Messages go to every other node (complete graph, default). On another strongly connected
    ``graph`` updates are flooded: each node relays an update the first time it sees it and drops
    duplicates by ``(origin, sequence number)`` with a 32-update sliding window per origin: an update
    more than 32 ahead of the oldest missing one makes the node give up on the missing ones (counted in
    ``dasgd_given_up``; such an update is never applied there). Flooding sends every update once over
    every edge (``|E|`` messages instead of ``n - 1``): give the simulator a large enough
    ``pool_size``. Lost messages are never repaired, so message loss makes the models drift apart
    permanently (the paper assumes reliable delivery).

    Staleness (gradient-set metric): with gradients numbered ``k = 0, 1, ...`` in the order they are
    computed, gradient ``k`` was computed on a model holding the set ``A_k`` of earlier updates and
    ``s_k = k - |A_k|``. Summed over ``K`` gradients, ``sum_k s_k = K (K - 1) / 2 - sum_i
    applied_sum_i``, so ``staleness_mean`` (``S_avg``) is exact from local counters.
    ``S_max`` needs a global clock and is not measured: ``staleness_max`` is NaN; ``missing_max`` is
    ``max_i (K - applied_i)`` at the record point (updates a node has not applied yet).

    Args:
      num_nodes: ``n >= 1``.
      learning_rate: constant step ``eta`` (plain SGD arithmetic); or
      optimizer: an Optax transformation run on each node's own gradients.
      graph: a strongly connected :class:`~jaxasync.topology.Graph` on ``n`` nodes (default complete).

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram`; ``evaluate`` is the average of the live models.

    Raises:
      ValueError: ``num_nodes`` below 1, a graph of another size or not strongly connected, not
        exactly one of ``learning_rate`` / ``optimizer``, or a learning rate that is not positive.
      TypeError: a non-int ``num_nodes``, a ``graph`` that is not a Graph, a learning rate that is
        not a number, or an optimizer that is not an Optax one.

    Example:
      >>> prog = dasgd(num_nodes=4, learning_rate=0.05)
      >>> asynchrony = jaxasync.Asynchrony(delay=jaxasync.exponential(0.5))  # doctest: +SKIP
      >>> trace = jaxasync.simulate(prog, problem, asynchrony, steps=2000)  # doctest: +SKIP

    References:
      Tosi and Theobald, "Convergence analysis of decentralized ASGD", arXiv:2309.03754 (2023).
    """
    name = "dasgd"
    n = base.positive_int(name, "num_nodes", num_nodes)
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    graph = topology_lib.complete(n) if graph is None else base.check_graph(name, graph)
    if graph.n != n:
        raise ValueError(f"{name}: graph has {graph.n} nodes, num_nodes is {n}")
    if n > 1 and len(topology_lib.roots_of_spanning_trees(graph)) != n:
        raise ValueError(f"{name}: graph {graph.name!r} must be strongly connected to flood updates")
    flood = not np.array_equal(graph.adjacency, ~np.eye(n, dtype=bool))

    def payload(params):  # (update, origin, origin's sequence number)
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return program_lib.like_params(params), i32, i32

    channel = program_lib.Channel(graph, payload)

    def init(node, params, key):
        del key  # deterministic
        zero = jnp.zeros((), jnp.int32)
        return DasgdState(
            node=jnp.asarray(node, jnp.int32),
            params=params,
            opt_state=opt.init(params),
            generated=zero,
            applied=zero,
            applied_sum=zero,
            seen=jnp.zeros((n,), jnp.int32),
            window=jnp.zeros((n,), jnp.uint32),
            given_up=zero,
        )

    def add(params, u):
        return jax.tree.map(lambda p, v: (p + v.astype(p.dtype)).astype(p.dtype), params, u)

    def step(state, grad_fn, batch, key):
        del key  # the batch is the only randomness
        u, opt_state = base.update(
            opt, base.gradient(grad_fn, state.params, batch), state.opt_state, state.params
        )
        out = program_lib.broadcast_outbox(channel, state.node, (u, state.node, state.generated))
        state = state._replace(
            params=add(state.params, u),
            opt_state=opt_state,
            generated=state.generated + 1,
            applied=state.applied + 1,
            applied_sum=state.applied_sum + state.applied,
        )
        return state, program_lib.Emit(outbox={"grad": out})

    def receive(state, msg):
        u, origin, seq = msg.payload
        if not flood:
            # Complete graph: every message comes straight from its origin, exactly once.
            state = state._replace(params=add(state.params, u), applied=state.applied + 1)
            return state, program_lib.Emit()
        seen, window = state.seen[origin], state.window[origin]
        # An update more than 32 ahead of the prefix slides the window up: the updates it slides
        # past are given up (a late copy of one of them then counts as a duplicate).
        slide = jnp.maximum(seq - seen - (_WINDOW - 1), 0)
        passed = jnp.where(slide >= 32, window, window & (_shift_left_one(slide) - jnp.uint32(1)))
        given_up = slide - jax.lax.population_count(passed).astype(jnp.int32)
        seen, window = seen + slide, _shift_right(window, slide)
        ahead = seq - seen
        bit = _shift_left_one(jnp.maximum(ahead, 0))
        new = (ahead >= 0) & ((window & bit) == 0) & (origin != state.node)
        window = jnp.where(new, window | bit, window)
        done = _trailing_ones(window)  # the prefix grows over every contiguous arrival
        mine = origin == state.node  # our own update flooded back: nothing to track
        state = state._replace(
            params=jax.tree.map(
                lambda p, v: jnp.where(new, (p + v.astype(p.dtype)).astype(p.dtype), p),
                state.params,
                u,
            ),
            applied=state.applied + new.astype(jnp.int32),
            seen=state.seen.at[origin].set(jnp.where(mine, state.seen[origin], seen + done)),
            window=state.window.at[origin].set(
                jnp.where(mine, state.window[origin], _shift_right(window, done))
            ),
            given_up=state.given_up + jnp.where(mine, 0, given_up),
        )
        return state, program_lib.Emit(
            outbox={"grad": program_lib.broadcast_outbox(channel, state.node, msg.payload, new)}
        )

    def metrics(states):
        k = jnp.sum(states.generated)
        # K (K - 1) / 2 without overflowing before the division; int32 wraps, the difference is exact.
        tri = jnp.where(k % 2 == 0, (k // 2) * (k - 1), k * ((k - 1) // 2))
        total = tri - jnp.sum(states.applied_sum)
        return {
            "staleness_mean": total.astype(jnp.float32) / jnp.maximum(k, 1).astype(jnp.float32),
            "staleness_max": jnp.float32(jnp.nan),
            "missing_max": jnp.max(k - states.applied),
            "dasgd_given_up": jnp.sum(states.given_up),
        }

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.params,
        channels={"grad": channel},
        receive={"grad": receive},
        metrics=metrics,
        num_nodes=n,
    )
