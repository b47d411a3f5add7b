# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Decentralized baselines: all-reduce SGD, D-PSGD, AD-PSGD and SGP as node programs.

Every factory returns a :class:`~jaxasync._src.program.NodeProgram` (see that module for the
contract) and takes the local step as an Optax optimizer or a learning rate (exactly one):
``learning_rate=lr`` means ``optax.sgd(lr)``. The optimizer always receives the gradient (or, for
all-reduce, the average gradient) of the node and its update is added to the model. "The optimizer
arguments" in the ``Raises`` sections below: ``ValueError`` unless exactly one of them is given or
for a learning rate that is not positive and finite; ``TypeError`` for a learning rate that is not
a number or an optimizer that is not an ``optax.GradientTransformation``.

Messages carry model-shaped payloads: their templates are functions of the model's parameters
(:func:`~jaxasync._src.program.like_params`), resolved by the executor, so no factory needs the model.

=================  ==================  ===========================================================
algorithm          waits?              what travels
=================  ==================  ===========================================================
``allreduce_sgd``  barrier per round   each node's gradient to every node (complete graph)
``dpsgd``          barrier per round   each node's model to its neighbours
``adpsgd``         never               model to one random neighbour, half the difference back
``sgp``            never               push-sum shares ``(p x, p w)`` to out-neighbours
=================  ==================  ===========================================================

The synchronous ones (``allreduce_sgd``, ``dpsgd``) make a node not ``ready`` until it holds the
round-``k`` messages of all its in-neighbours; simulated time per round is then the slowest node's
compute time plus the message delay, with no extra code. They assume reliable channels and no
crashes: a lost message or a crashed node stalls its neighbours (and then everybody) forever, as a
real barrier would.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import mixing as mixing_lib
from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = [
    "ADPSGDState",
    "AllReduceSGDState",
    "DPSGDState",
    "SGPState",
    "adpsgd",
    "allreduce_sgd",
    "dpsgd",
    "sgp",
    "sgp_total_weight",
]


# ----------------------------------------------------------------------------------------
# All-reduce SGD.


class AllReduceSGDState(NamedTuple):
    """State of one all-reduce SGD node.

    Attributes:
      node: int32 node id.
      count: int32 round ``k`` (rounds completed).
      x: the model (identical on every node after every round).
      waiting: bool, True between sending the round's gradient and holding all ``n`` of them.
      grads: leaves ``[n, 2, ...]``: round gradients by sender id and round parity.
      grad_round: int32 ``[n, 2]``: the round each stored gradient belongs to (-1: none).
      opt_state: the optimizer's state.
    """

    node: jax.Array
    count: jax.Array
    x: PyTree
    waiting: jax.Array
    grads: PyTree
    grad_round: jax.Array
    opt_state: PyTree


def allreduce_sgd(
    *,
    num_nodes: int,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> program_lib.NodeProgram:
    r"""Synchronous data-parallel SGD with an all-reduce of the gradients every round.

    .. math::
        x^{k+1} = x^k + \mathrm{opt}\Big(\frac1n \sum_{i=1}^n g_i(x^k; \xi_i^k)\Big)

    Round ``k`` of node ``i``: compute ``g_i`` at ``x^k``, send it to every other node (complete
    graph, message ``seq = k``), wait until the round-``k`` gradients of all ``n`` nodes are in,
    average them **in node order** (so every node computes the bit-identical average and all models
    stay identical), and apply the optimizer. A node can be at most one round ahead of another (it
    needs everybody's round-``k`` gradient to leave round ``k``), so two buffers per sender, indexed
    by round parity, suffice. With one node this is exactly ``optimizer`` on the node's gradients.

    Args:
      num_nodes: ``n``.
      learning_rate: SGD step size (``optax.sgd``); or
      optimizer: any Optax transformation applied to the averaged gradient.

    Returns:
      A :class:`NodeProgram` named ``"allreduce_sgd"`` with one channel ``"grads"``.

    Raises:
      ValueError: ``num_nodes`` below 1, or the optimizer arguments.
      TypeError: a non-int ``num_nodes``, or the optimizer arguments.

    Example:
      >>> prog = allreduce_sgd(num_nodes=4, learning_rate=0.1)
      >>> prog.name, sorted(prog.channels)
      ('allreduce_sgd', ['grads'])

    References:
      Goyal et al., "Accurate, large minibatch SGD: training ImageNet in 1 hour", 2017
      (arXiv:1706.02677).
    """
    name = "allreduce_sgd"
    n = base.positive_int(name, "num_nodes", num_nodes)
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    graph = topology_lib.complete(n)
    channel = program_lib.Channel(graph, program_lib.like_params)
    in_table = jnp.asarray(graph.in_table).reshape(n, -1)

    def init(node, params, key):
        del key  # deterministic
        return AllReduceSGDState(
            node=jnp.asarray(node, jnp.int32),
            count=jnp.int32(0),
            x=params,
            waiting=jnp.asarray(False),
            grads=jax.tree.map(lambda p: jnp.zeros((n, 2, *jnp.shape(p)), jnp.result_type(p)), params),
            grad_round=jnp.full((n, 2), -1, jnp.int32),
            opt_state=opt.init(params),
        )

    def store(state, sender, k, grad):
        parity = k % 2
        grads = jax.tree.map(lambda b, g: b.at[sender, parity].set(g.astype(b.dtype)), state.grads, grad)
        return state._replace(grads=grads, grad_round=state.grad_round.at[sender, parity].set(k))

    def advance(state):
        parity = state.count % 2
        # Sum in node order: every node computes the bit-identical average (unrolled, see
        # `mixing.sum_slots`: jnp.sum over the node axis is ~40x slower on CPU at d = 2^20).
        mean = jax.tree.map(lambda b: mixing_lib.sum_slots(b[:, parity]) / n, state.grads)
        x, opt_state = base.descend(opt, mean, state.opt_state, state.x)
        return state._replace(x=x, opt_state=opt_state, count=state.count + 1, waiting=jnp.asarray(False))

    def try_advance(state):
        if n == 1:  # alone, the own gradient completes the round: plain `opt`, no branch
            return advance(state)
        done = state.waiting & jnp.all(state.grad_round[:, state.count % 2] == state.count)
        return jax.lax.cond(done, advance, lambda s: s, state)

    def step(state, grad_fn, batch, key):
        del key  # the minibatch is the only randomness
        g = base.gradient(grad_fn, state.x, batch)
        state = store(state, state.node, state.count, g)
        state = try_advance(state._replace(waiting=jnp.asarray(True)))
        m = graph.max_out_degree
        out = program_lib.BroadcastOutbox(g, jnp.arange(max(m, 1)) < m)
        return state, program_lib.Emit(outbox={"grads": out})

    def receive(state, msg):
        sender = in_table[state.node, msg.slot]
        state = store(state, sender, msg.seq, msg.payload)
        return try_advance(state), program_lib.Emit()

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.x,
        channels={"grads": channel},
        receive={"grads": receive},
        ready=lambda s: ~s.waiting,
        num_nodes=n,
    )


# ----------------------------------------------------------------------------------------
# D-PSGD.


class DPSGDState(NamedTuple):
    """State of one D-PSGD node.

    Attributes:
      node: int32 node id.
      count: int32 round ``k``.
      x: the model ``x_i^k``.
      waiting: bool, True between sending ``x_i^k`` and holding every in-neighbour's ``x_j^k``.
      update: the optimizer's update from ``g_i(x_i^k)``, applied when the round completes.
      v: leaves ``[max_in_degree, 2, ...]``: neighbours' models by in-slot and round parity.
      v_round: int32 ``[max_in_degree, 2]``: round of each stored model (-1: none).
      opt_state: the optimizer's state.
    """

    node: jax.Array
    count: jax.Array
    x: PyTree
    waiting: jax.Array
    update: PyTree
    v: PyTree
    v_round: jax.Array
    opt_state: PyTree


def dpsgd(
    graph: topology_lib.Graph,
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    weights=None,
) -> program_lib.NodeProgram:
    r"""Decentralized parallel SGD (synchronous gossip with a gradient step).

    .. math::
        x_i^{k+1} = \sum_j W_{ij} x_j^k + \mathrm{opt}\big(g_i(x_i^k; \xi_i^k)\big)

    Round ``k`` of node ``i``: compute the gradient at ``x_i^k``, send ``x_i^k`` to the
    out-neighbours (message ``seq = k``), wait (``ready`` is False) until every in-neighbour's
    ``x_j^k`` is in, then mix and step. The graph must be undirected: then a neighbour is at most
    one round ahead (it needs this node's round-``k`` model to leave round ``k``), so two buffers
    per in-slot, indexed by round parity, suffice. (On a directed graph a node could run several
    rounds ahead of a receiver and overwrite a model the receiver still needs.)

    Args:
      graph: an undirected communication graph.
      learning_rate: SGD step size ``eta``; or
      optimizer: any Optax transformation of the local gradient.
      weights: ``[n, n]`` row-stochastic ``W[receiver, sender]`` supported on the graph (doubly
        stochastic keeps the network average); default `metropolis_weights`.

    Returns:
      A :class:`NodeProgram` named ``"dpsgd"`` with one channel ``"x"``.

    Raises:
      TypeError: ``graph`` is not a Graph, or the optimizer arguments.
      ValueError: a directed graph, bad weights, or the optimizer arguments.

    Example:
      >>> from jaxasync import topology
      >>> prog = dpsgd(topology.ring(4), learning_rate=0.1)

    References:
      Lian, Zhang, Zhang, Hsieh, Zhang and Liu, "Can decentralized algorithms outperform
      centralized algorithms? A case study for decentralized parallel stochastic gradient
      descent", NeurIPS 2017 (arXiv:1705.09056).
    """
    name = "dpsgd"
    graph = base.check_graph(name, graph)
    if not graph.is_symmetric:
        raise ValueError(f"{name}: needs an undirected graph (the round barrier assumes it)")
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    w = topology_lib.metropolis_weights(graph) if weights is None else np.asarray(weights, np.float64)
    topology_lib.check_row_stochastic(w, graph)
    self_w, nbr_w = (jnp.asarray(a, jnp.float32) for a in topology_lib.in_weight_table(graph, w))
    n, m_in = graph.n, graph.max_in_degree
    in_mask = jnp.asarray(graph.in_mask).reshape(n, -1)
    channel = program_lib.Channel(graph, program_lib.like_params)

    def init(node, params, key):
        del key  # deterministic
        return DPSGDState(
            node=jnp.asarray(node, jnp.int32),
            count=jnp.int32(0),
            x=params,
            waiting=jnp.asarray(False),
            update=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.zeros((m_in, 2, *jnp.shape(p)), jnp.result_type(p)), params),
            v_round=jnp.full((m_in, 2), -1, jnp.int32),
            opt_state=opt.init(params),
        )

    def advance(state):
        i = state.node
        current = jax.tree.map(lambda v: v[:, state.count % 2], state.v)
        mixed = mixing_lib.pull_mix_node(self_w[i], nbr_w[i], state.x, current)
        x = jax.tree.map(jnp.add, mixed, state.update)
        return state._replace(x=x, count=state.count + 1, waiting=jnp.asarray(False))

    def try_advance(state):
        i, k = state.node, state.count
        have = jnp.all(jnp.where(in_mask[i], state.v_round[:, k % 2] == k, True))
        return jax.lax.cond(state.waiting & have, advance, lambda s: s, state)

    def step(state, grad_fn, batch, key):
        del key  # the minibatch is the only randomness
        g = base.gradient(grad_fn, state.x, batch)
        update, opt_state = base.update(opt, g, state.opt_state, state.x)
        out = program_lib.broadcast_outbox(channel, state.node, state.x)
        state = state._replace(update=update, opt_state=opt_state, waiting=jnp.asarray(True))
        return try_advance(state), program_lib.Emit(outbox={"x": out})

    def receive(state, msg):
        parity = msg.seq % 2
        k = jnp.clip(msg.slot, 0, max(m_in - 1, 0))
        v = jax.tree.map(lambda b, p: b.at[k, parity].set(p.astype(b.dtype)), state.v, msg.payload)
        state = state._replace(v=v, v_round=state.v_round.at[k, parity].set(msg.seq))
        return try_advance(state), program_lib.Emit()

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.x,
        channels={"x": channel},
        receive={"x": receive},
        ready=lambda s: ~s.waiting,
        num_nodes=n,
    )


# ----------------------------------------------------------------------------------------
# AD-PSGD.


class ADPSGDState(NamedTuple):
    """State of one AD-PSGD node.

    Attributes:
      node: int32 node id.
      count: int32 local steps taken.
      x: the model.
      opt_state: the optimizer's state.
    """

    node: jax.Array
    count: jax.Array
    x: PyTree
    opt_state: PyTree


def adpsgd(
    graph: topology_lib.Graph,
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> program_lib.NodeProgram:
    r"""Asynchronous decentralized parallel SGD: pairwise gossip averaging plus local steps.

    .. math::
        x_i, x_j \leftarrow \tfrac12 (x_i + x_j), \qquad x_i \leftarrow x_i + \mathrm{opt}(g_i)

    A step of node ``i``: compute ``g_i`` at its current ``x_i``, pick a uniformly random
    neighbour ``j`` and send it ``x_i`` on channel ``"avg"``, then apply the gradient step at once
    (it never waits). ``j`` on receipt replies ``delta = (x_j - x_i^{sent}) / 2`` on ``"reply"``
    and sets ``x_j <- x_j - delta = (x_j + x_i^{sent}) / 2``; ``i`` adds ``delta`` when the reply
    arrives.

    Approximation of the atomic average: the paper averages ``x_i`` and ``x_j`` atomically. Here
    ``j`` averages with the value ``i`` had when it sent, and ``i`` receives half the difference
    later, so ``i`` ends at ``(x_i^{sent} + x_j)/2`` plus every local step it took since sending
    (this step's included): the atomic average followed by the steps, as in the paper, and
    ``x_i + x_j`` changes only by the gradient steps. (Replying ``x_j`` and setting
    ``x_i <- (x_i + x_j)/2`` on receipt would halve those steps.) The average uses ``j``'s value at
    receipt, up to one message delay later than the paper's. A lost ``"avg"`` message skips one
    averaging; a lost reply leaves ``j``'s half of the exchange only.

    Args:
      graph: an undirected communication graph (the reply travels back along the edge).
      learning_rate: SGD step size ``eta``; or
      optimizer: any Optax transformation of the local gradient.

    Returns:
      A :class:`NodeProgram` named ``"adpsgd"`` with channels ``"avg"`` and ``"reply"``.

    Raises:
      TypeError: ``graph`` is not a Graph, or the optimizer arguments.
      ValueError: a directed graph, or the optimizer arguments.

    Example:
      >>> from jaxasync import topology
      >>> prog = adpsgd(topology.ring(4), learning_rate=0.1)

    References:
      Lian, Zhang, Zhang and Liu, "Asynchronous decentralized parallel stochastic gradient
      descent", ICML 2018 (arXiv:1710.06952).
    """
    name = "adpsgd"
    graph = base.check_graph(name, graph)
    if not graph.is_symmetric:
        raise ValueError(f"{name}: needs an undirected graph (replies go back along each edge)")
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    n, m_out = graph.n, graph.max_out_degree
    out_degree = jnp.asarray(graph.out_degree, jnp.int32)
    # reply_slot[j, k]: out-slot of j towards its in-neighbour on in-slot k (the same edge reversed).
    reply_slot = np.full((n, max(graph.max_in_degree, 1)), -1, np.int32)
    for j in range(n):
        for k, i in enumerate(graph.in_neighbors(j)):
            reply_slot[j, k] = int(np.flatnonzero(graph.out_table[j] == i)[0])
    reply_slot = jnp.asarray(reply_slot)
    channels = {
        "avg": program_lib.Channel(graph, program_lib.like_params),
        "reply": program_lib.Channel(graph, program_lib.like_params),
    }

    def init(node, params, key):
        del key  # deterministic
        return ADPSGDState(jnp.asarray(node, jnp.int32), jnp.int32(0), params, opt.init(params))

    def one_hot(slot, send):
        return (jnp.arange(max(m_out, 1)) == slot) & send

    def step(state, grad_fn, batch, key):
        g = base.gradient(grad_fn, state.x, batch)
        deg = out_degree[state.node]
        slot = jax.random.randint(key, (), 0, jnp.maximum(deg, 1))
        out = base.masked_broadcast(state.x, one_hot(slot, deg > 0)[:m_out])
        x, opt_state = base.descend(opt, g, state.opt_state, state.x)
        state = state._replace(x=x, opt_state=opt_state, count=state.count + 1)
        return state, program_lib.Emit(outbox={"avg": out})

    def receive_avg(state, msg):
        delta = jax.tree.map(lambda xj, xi: (xj - xi.astype(xj.dtype)) / 2, state.x, msg.payload)
        x = jax.tree.map(jnp.subtract, state.x, delta)
        slot = reply_slot[state.node, jnp.clip(msg.slot, 0, reply_slot.shape[1] - 1)]
        out = base.masked_broadcast(delta, one_hot(slot, slot >= 0)[:m_out])
        return state._replace(x=x), program_lib.Emit(outbox={"reply": out})

    def receive_reply(state, msg):
        x = jax.tree.map(lambda a, d: a + d.astype(a.dtype), state.x, msg.payload)
        return state._replace(x=x), program_lib.Emit()

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.x,
        channels=channels,
        receive={"avg": receive_avg, "reply": receive_reply},
        num_nodes=n,
    )


# ----------------------------------------------------------------------------------------
# SGP.


class SGPState(NamedTuple):
    """State of one SGP (stochastic gradient push) node.

    Attributes:
      node: int32 node id.
      count: int32 local steps taken (drives the round-robin choice of peer).
      x: push-sum numerator (params-shaped); the model is ``x / w``.
      w: float32 push-sum weight (starts at 1; ``sum_i w_i`` plus in-flight weight stays ``n``).
      opt_state: the optimizer's state.
    """

    node: jax.Array
    count: jax.Array
    x: PyTree
    w: jax.Array
    opt_state: PyTree


def _sgp_params(state: SGPState) -> PyTree:
    return jax.tree.map(lambda v: (v / state.w.astype(v.dtype)).astype(v.dtype), state.x)


def sgp_total_weight(stacked_states: SGPState) -> jax.Array:
    """``sum_i w_i`` over stacked SGP states (equals ``n`` minus the weight in flight or lost)."""
    return jnp.sum(stacked_states.w)


def sgp(
    graph: topology_lib.Graph,
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    one_peer: bool = True,
    scale_by_weight: bool = True,
) -> program_lib.NodeProgram:
    r"""Stochastic gradient push: push-sum gossip on a directed graph plus local steps.

    .. math::
        z_i = x_i / w_i, \quad x_i \leftarrow x_i + w_i\, \mathrm{opt}\big(g_i(z_i)\big), \quad
        (x_i, w_i) \leftarrow p_{ii} (x_i, w_i), \quad
        \text{send } p_{ji} (x_i, w_i) \text{ to each out-neighbour } j

    and a received share ``(x, w)`` is added to the receiver's ``(x_i, w_i)``. The weights ``p`` are
    column-stochastic, so ``sum_i w_i`` plus the weight in flight stays ``n`` and the de-biased
    ``x_i / w_i`` reach consensus on any strongly connected digraph, without acknowledgements.

    Peers: with ``one_peer=True`` (the default, as in the paper) node ``i`` keeps half and sends
    half to one out-neighbour per step, chosen round-robin over its out-neighbours; on
    `topology.exponential` this is SGP's time-varying exponential graph (peer ``i + 2^k`` at step
    ``k``). With ``one_peer=False`` it splits uniformly over all out-neighbours
    (`topology.push_weights`). A lost message loses its share of the weight and of the model mass.

    Step scaling: the paper adds ``opt(g)`` to the numerator ``x_i``, which moves the model
    ``z_i = x_i / w_i`` by ``opt(g) / w_i``. In the paper's synchronous rounds on a regular graph
    every ``w_i`` stays 1; asynchronously a fast node halves its ``w_i`` at every step between two
    receipts, ``w_i`` falls to ~1e-3 and that amplified step diverges (seen with one 5x straggler
    at ``eta = 0.05`` on least squares). With ``scale_by_weight=True`` (default) the update is
    multiplied by ``w_i``, so ``z_i`` moves by exactly ``opt(g)``: the paper's rule whenever
    ``w_i = 1``, stable otherwise (a slow node, which holds more weight, then counts more in the
    network sum, offsetting its fewer steps, as in AsySPA). ``scale_by_weight=False`` is the literal
    rule.

    Args:
      graph: the push graph (edge ``i -> j``: ``i`` sends mass to ``j``).
      learning_rate: SGD step size ``eta``; or
      optimizer: any Optax transformation of the local gradient.
      one_peer: one round-robin peer per step (True) or all out-neighbours (False).
      scale_by_weight: multiply the local update by ``w_i`` (see above).

    Returns:
      A :class:`NodeProgram` named ``"sgp"`` with one channel ``"push"``.

    Raises:
      TypeError: ``graph`` is not a Graph, or the optimizer arguments.
      ValueError: the optimizer arguments.

    Example:
      >>> from jaxasync import topology
      >>> prog = sgp(topology.exponential(8), learning_rate=0.1)

    References:
      Assran, Loizou, Ballas and Rabbat, "Stochastic gradient push for distributed deep
      learning", ICML 2019 (arXiv:1811.10792).
    """
    name = "sgp"
    graph = base.check_graph(name, graph)
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    n, m_out = graph.n, graph.max_out_degree
    self_p, out_p = topology_lib.out_weight_table(graph, topology_lib.push_weights(graph))
    assert np.all((out_p == 0) | (out_p == self_p[:, None])), "push_weights are uniform"
    self_p, out_p = jnp.asarray(self_p, jnp.float32), jnp.asarray(out_p, jnp.float32)
    out_degree = jnp.asarray(graph.out_degree, jnp.int32)

    def payload(params):  # one push-sum share: a model-shaped numerator and a float32 weight
        return mixing_lib.PushSumState(program_lib.like_params(params), jax.ShapeDtypeStruct((), jnp.float32))

    channel = program_lib.Channel(graph, payload)

    def init(node, params, key):
        del key  # deterministic
        return SGPState(jnp.asarray(node, jnp.int32), jnp.int32(0), params, jnp.float32(1), opt.init(params))

    def shares(state):
        """The kept share and the per-out-slot shares of this step."""
        if not one_peer:
            return self_p[state.node], out_p[state.node]
        deg = out_degree[state.node]
        peer = state.count % jnp.maximum(deg, 1)
        out = jnp.where((jnp.arange(m_out) == peer) & (deg > 0), 0.5, 0.0)
        return jnp.where(deg > 0, 0.5, 1.0), out

    def step(state, grad_fn, batch, key):
        del key  # the minibatch is the only randomness
        z = _sgp_params(state)
        g = base.gradient(grad_fn, z, batch)
        updates, opt_state = opt.update(base.cast_like(g, z), state.opt_state, z)
        if scale_by_weight:  # move the de-biased z = x / w by the update, whatever w is
            updates = jax.tree.map(lambda u: u * state.w.astype(u.dtype), updates)
        keep, out = shares(state)
        # keep (x + u), written keep x + keep u so that XLA:CPU computes it once rather than again
        # in the payload's loop (the two round alike: keep is 1/2 or 1/(deg + 1), see `shares`).
        x = jax.tree.map(
            lambda x, u: keep.astype(x.dtype) * x + keep.astype(x.dtype) * u.astype(x.dtype), state.x, updates
        )
        kept = mixing_lib.PushSumState(x, keep * state.w)
        # Every share sent equals the kept one (uniform weights): the payload is `kept` per used slot.
        sent = jax.tree.map(lambda v: jnp.where((out > 0).reshape((-1,) + (1,) * v.ndim), v[None], 0), kept)
        state = SGPState(state.node, state.count + 1, kept.value, kept.weight, opt_state)
        return state, program_lib.Emit(outbox={"push": base.outbox(sent, out > 0)})

    def receive(state, msg):
        mass = mixing_lib.push_sum_receive(mixing_lib.PushSumState(state.x, state.w), msg.payload)
        return state._replace(x=mass.value, w=mass.weight), program_lib.Emit()

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=_sgp_params,
        channels={"push": channel},
        receive={"push": receive},
        metrics=lambda states: {"push_sum_weight": sgp_total_weight(states)},
        num_nodes=n,
    )
