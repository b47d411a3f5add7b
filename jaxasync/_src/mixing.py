# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Gossip, push-sum, pairwise averaging and the robust running-sum channel.

Contract:

* Every function is pure ``jax.numpy``, jit- and vmap-able, and works on pytrees.
* *Stacked* functions (`pull_mix`, `push_sum_mix`, `push_sum_mass`,
  `running_sum_unabsorbed`) take values whose leaves carry a leading node axis
  ``[n, ...]`` and a weight matrix ``W[receiver, sender]`` as built by
  `jaxasync.topology` (so one synchronous step is ``X <- W @ X``).
* *Node* functions (`pull_mix_node`, `keep_newest`, `running_sum_*`) are what a
  node program runs on its own state. Per-neighbour data lives in padded slot
  arrays with a leading axis of size ``max_in_degree`` (in-slots, ordered as
  ``graph.in_table[i]``) or ``max_out_degree`` (out-slots, ``graph.out_table[i]``).
  Padding slots carry zero weight and are never written by a valid message.
* Messages carry per-edge sequence numbers; receivers keep only the newest
  (`keep_newest`), so late, reordered or duplicated messages are harmless and a
  lost one is superseded by the next.
* Weights are cast to each leaf's dtype, so outputs keep the dtype of the values.
* Weights are validated when they are concrete (numpy, Python numbers or non-traced jax arrays):
  `pull_mix` needs a row-stochastic ``W``, `push_sum_mix` a column-stochastic ``P``, and the node
  functions `pull_mix_node` / `push_sum_split` nonnegative shares summing to one; otherwise they
  raise ``ValueError`` instead of returning a wrong answer. Traced weights cannot be inspected and
  are used as given: node programs validate their matrices once, when they are built, and index
  them with a traced node id, so their jitted steps pay nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import topology as topology_lib

__all__ = [
    "PushSumState",
    "RunningSumState",
    "keep_newest",
    "pairwise_average",
    "pull_mix",
    "pull_mix_node",
    "push_sum_estimate",
    "push_sum_init",
    "push_sum_mass",
    "push_sum_mix",
    "push_sum_receive",
    "push_sum_split",
    "running_sum_absorb",
    "running_sum_init",
    "running_sum_receive",
    "running_sum_send",
    "running_sum_unabsorbed",
]

PyTree = Any


def _check_leading(tree: PyTree, size: int, what: str) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != size:
            raise ValueError(
                f"{what}: every leaf needs a leading axis of size {size}, got a leaf of shape "
                f"{jnp.shape(leaf)}."
            )


def _concrete(*weights) -> bool:
    """Whether all ``weights`` have values here (not tracers inside jit, vmap or grad)."""
    return not any(isinstance(w, jax.core.Tracer) for w in weights)


def _atol(*weights) -> float:
    """Tolerance on sums of one: weights stored in a narrow float (bfloat16) miss 1 by ~its eps."""
    dtypes = [jnp.result_type(w) for w in weights]
    return max([1e-6] + [float(jnp.finfo(d).eps) for d in dtypes if jnp.issubdtype(d, jnp.floating)])


def _check_matrix(w, columns: bool, what: str) -> None:
    """Raises ValueError unless a concrete ``w`` is row- (or column-) stochastic."""
    if not _concrete(w):
        return
    kind = "column" if columns else "row"
    check = topology_lib.check_column_stochastic if columns else topology_lib.check_row_stochastic
    try:
        check(np.asarray(w, np.float64), atol=_atol(w))
    except ValueError as e:
        raise ValueError(
            f"{what}: the weights must be {kind}-stochastic (W[receiver, sender]), but {e}"
        ) from None


def _check_shares(self_weight, other_weights, what: str, kind: str) -> None:
    """Raises ValueError unless concrete ``self_weight`` and ``other_weights`` are nonnegative and
    sum to one, as one ``kind`` ("row" / "column") of a stochastic matrix must."""
    if not _concrete(self_weight, other_weights):
        return
    own = np.asarray(self_weight, np.float64)
    others = np.asarray(other_weights, np.float64)
    total, atol = float(own + others.sum()), _atol(self_weight, other_weights)
    if not (np.isfinite(total) and own >= -atol and np.all(others >= -atol) and abs(total - 1.0) <= atol):
        raise ValueError(
            f"{what}: the self weight and the slot weights are one {kind} of a {kind}-stochastic "
            f"matrix, so they must be nonnegative and sum to 1; got self weight {float(own):.6g} "
            f"and slot weights {others.tolist()} (sum {total:.6g})."
        )


def sum_slots(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``sum_k x[k]`` (or ``sum_k weights[k] * x[k]``) over the leading slot or node axis, in index order.

    Unrolled on purpose: XLA:CPU runs ``jnp.sum(x, axis=0)`` over a short leading axis as a slow
    strided reduction (~25x a fused elementwise add at d = 2^20) and a weighted sum as a ``dot``
    that no elementwise consumer fuses with; slot counts are small.
    """
    if weights is not None:
        weights = weights.astype(x.dtype)
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    total = None
    for k in range(x.shape[0]):
        term = x[k] if weights is None else weights[k] * x[k]
        total = term if total is None else total + term
    return total


def _weighted_sum(w: jax.Array, values: PyTree) -> PyTree:
    """``sum_k w[..., k] * values[k]`` per leaf: contracts ``w``'s last axis with the node/slot axis."""
    return jax.tree.map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), values)


# ----------------------------------------------------------------------------------------
# Gossip (pull) mixing.


def pull_mix(w, x: PyTree) -> PyTree:
    r"""One synchronous gossip step ``X <- W X`` on values stacked over nodes.

    .. math::
        x_i^+ = \sum_j W_{ij} x_j .

    With a doubly stochastic ``W`` (e.g. `metropolis_weights`) the average over
    nodes is unchanged; with a row-stochastic one each node averages what it pulls.

    Args:
      w: ``[n, n]`` row-stochastic weights ``W[receiver, sender]``.
      x: pytree with leaves ``[n, ...]``.

    Returns:
      Pytree like ``x``.

    Raises:
      ValueError: ``w`` is not square, does not match the node axis of ``x``, or (when concrete)
        is not row-stochastic.

    Example:
      >>> w = jnp.array([[0.5, 0.5], [0.5, 0.5]])
      >>> pull_mix(w, jnp.array([0.0, 2.0])).tolist()
      [1.0, 1.0]
    """
    return _mix(w, x, columns=False, what="pull_mix")


def _mix(w, x: PyTree, columns: bool, what: str) -> PyTree:
    """``X <- W X`` after checking shapes and (concrete) row- or column-stochasticity."""
    shape = jnp.shape(w)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{what}: W must be a square [n, n] matrix, got shape {shape}.")
    _check_leading(x, shape[1], what)
    _check_matrix(w, columns, what)  # before jnp.asarray, which stages a numpy W under jit
    return _weighted_sum(jnp.asarray(w), x)  # contracts W's sender axis with the node axis


def pull_mix_node(self_weight, neighbor_weights, own: PyTree, neighbor_values: PyTree, mask=None):
    r"""One node's gossip step from its padded in-slots.

    .. math::
        x_i^+ = w_{ii} x_i + \sum_k m_k w_{ik} \hat v_{ik} + \Big(\sum_k (1 - m_k) w_{ik}\Big) x_i

    The weight of a masked-out slot (a neighbour not heard from yet, or one that
    crashed) stays with the node, so the result is still a convex combination.

    Args:
      self_weight: scalar ``w_ii``.
      neighbor_weights: ``[max_in_degree]``, 0 on padding (see
        `jaxasync.topology.in_weight_table`).
      own: the node's value, a pytree.
      neighbor_values: pytree like ``own`` with a leading ``[max_in_degree]`` axis.
      mask: optional bool ``[max_in_degree]``: slots to use.

    Returns:
      Pytree like ``own``.

    Raises:
      ValueError: (concrete weights) ``self_weight`` and ``neighbor_weights`` are not a row of a
        row-stochastic matrix: negative, or not summing to 1.

    Example:
      >>> pull_mix_node(0.5, jnp.array([0.5, 0.0]), jnp.array(0.0), jnp.array([2.0, 9.0]))
      Array(1., dtype=float32)
    """
    _check_shares(self_weight, neighbor_weights, "pull_mix_node", "row")
    neighbor_weights = jnp.asarray(neighbor_weights)
    _check_leading(neighbor_values, neighbor_weights.shape[0], "pull_mix_node")
    used = neighbor_weights if mask is None else jnp.where(mask, neighbor_weights, 0)
    keep = self_weight + jnp.sum(neighbor_weights - used)
    return jax.tree.map(
        lambda o, v: jnp.asarray(keep, o.dtype) * o + sum_slots(v, used), own, neighbor_values
    )


def pairwise_average(xi: PyTree, xj: PyTree) -> tuple[PyTree, PyTree]:
    """Atomic pairwise averaging of AD-PSGD: both nodes end at ``(x_i + x_j) / 2``.

    Args:
      xi, xj: pytrees of the same structure.

    Returns:
      ``(avg, avg)``.

    References:
      Lian, Zhang, Zhang and Liu, "Asynchronous decentralized parallel stochastic
      gradient descent", ICML 2018 (arXiv:1710.06952).
    """
    avg = jax.tree.map(lambda a, b: (a + b) / 2, xi, xj)
    return avg, avg


# ----------------------------------------------------------------------------------------
# Push-sum.


class PushSumState(NamedTuple):
    """Push-sum mass: a value pytree and its scalar weight (per node, or stacked).

    The de-biased estimate is ``value / weight`` (`push_sum_estimate`).
    """

    value: PyTree
    weight: jax.Array


def push_sum_init(value: PyTree, weight=1.0) -> PushSumState:
    """Starts push-sum from ``value`` with ``weight`` (1 per node).

    For a stacked state pass ``weight=jnp.ones(n)``.
    """
    return PushSumState(value=value, weight=jnp.asarray(weight, jnp.float32))


def push_sum_mix(p, state: PushSumState) -> PushSumState:
    r"""One synchronous push-sum step with a column-stochastic ``P``.

    .. math::
        x_i^+ = \sum_j P_{ij} x_j, \qquad w_i^+ = \sum_j P_{ij} w_j .

    Columns of ``P`` sum to one, so ``sum_i x_i`` and ``sum_i w_i`` are conserved
    and ``x_i / w_i`` converges to the average of the initial values even on a
    directed graph.

    Args:
      p: ``[n, n]`` column-stochastic weights ``P[receiver, sender]``
        (e.g. `jaxasync.topology.push_weights`).
      state: stacked `PushSumState` (leaves ``[n, ...]``, weight ``[n]``).

    Returns:
      The mixed `PushSumState`.

    Raises:
      ValueError: ``p`` is not square, does not match the node axis, or (when concrete) is not
        column-stochastic.

    References:
      Kempe, Dobra and Gehrke, "Gossip-based computation of aggregate
      information", FOCS 2003. Assran, Loizou, Ballas and Rabbat, "Stochastic
      gradient push for distributed deep learning", ICML 2019.
    """
    return PushSumState(*_mix(p, tuple(state), columns=True, what="push_sum_mix"))


def push_sum_split(state: PushSumState, self_weight, out_weights) -> tuple[PushSumState, PushSumState]:
    """Splits one node's mass into the part it keeps and one message per out-slot.

    Args:
      state: the node's `PushSumState`.
      self_weight: scalar share kept, ``P[i, i]``.
      out_weights: ``[max_out_degree]`` shares sent, 0 on padding (see
        `jaxasync.topology.out_weight_table`).

    Returns:
      ``(kept, messages)``; ``messages`` has a leading ``[max_out_degree]`` axis.
      ``kept`` plus the sum of ``messages`` equals ``state``.

    Raises:
      ValueError: (concrete weights) the shares are not a column of a column-stochastic matrix:
        negative, or not summing to 1 (mass would be created or lost).
    """
    _check_shares(self_weight, out_weights, "push_sum_split", "column")
    out_weights = jnp.asarray(out_weights)
    kept = jax.tree.map(lambda v: jnp.asarray(self_weight, v.dtype) * v, state)
    sent = jax.tree.map(lambda v: out_weights.astype(v.dtype).reshape((-1,) + (1,) * v.ndim) * v[None], state)
    return kept, sent


def push_sum_receive(state: PushSumState, message: PushSumState, accept=True) -> PushSumState:
    """Adds one received push-sum message (value and weight) to a node's mass.

    Args:
      state: the receiver's `PushSumState`.
      message: a `PushSumState` of the same structure.
      accept: bool scalar; when False the state is returned unchanged (fixed shapes).

    Returns:
      The new `PushSumState`.
    """
    return jax.tree.map(lambda s, m: s + jnp.where(accept, m, jnp.zeros_like(m)), state, message)


def push_sum_estimate(state: PushSumState) -> PyTree:
    """The de-biased estimate ``value / weight`` (weight broadcast over each leaf)."""
    w = state.weight

    def debias(v):
        return v / jnp.reshape(w, jnp.shape(w) + (1,) * (v.ndim - w.ndim)).astype(v.dtype)

    return jax.tree.map(debias, state.value)


def push_sum_mass(state: PushSumState) -> tuple[PyTree, jax.Array]:
    """Total mass ``(sum_i x_i, sum_i w_i)`` of a stacked state; push-sum conserves it."""
    return jax.tree.map(lambda v: jnp.sum(v, axis=0), state.value), jnp.sum(state.weight, axis=0)


# ----------------------------------------------------------------------------------------
# Keep-newest slots and the running-sum channel.


def keep_newest(buffer: PyTree, last_seq, slot, seq, payload: PyTree) -> tuple[PyTree, jax.Array]:
    """Stores ``payload`` in ``buffer[slot]`` iff ``seq`` is newer than ``last_seq[slot]``.

    The receive rule of every lossy channel: older, duplicated or reordered
    messages are ignored. Fixed shapes (``jnp.where``), so it is jit-able with a
    traced ``slot`` and ``seq``. A ``slot`` outside ``[0, num_slots)`` (e.g. a
    padding ``-1``) is ignored rather than wrapped around.

    Args:
      buffer: pytree with leaves ``[num_slots, ...]``.
      last_seq: int32 ``[num_slots]``; start at -1 when sequence numbers start at 0.
      slot: int scalar, the in-slot of the message's edge.
      seq: int scalar, the sender's sequence number on that edge.
      payload: pytree like one slot of ``buffer``.

    Returns:
      ``(buffer, last_seq)``, updated.

    Example:
      >>> buf, last = jnp.zeros((2, 3)), jnp.full((2,), -1, jnp.int32)
      >>> buf, last = keep_newest(buf, last, 1, 5, jnp.ones(3))
      >>> buf, last = keep_newest(buf, last, 1, 4, 2 * jnp.ones(3))  # older: dropped
      >>> buf[1].tolist(), last.tolist()
      ([1.0, 1.0, 1.0], [-1, 5])
    """
    last_seq = jnp.asarray(last_seq)
    num_slots = last_seq.shape[0]
    _check_leading(buffer, num_slots, "keep_newest")
    valid = (slot >= 0) & (slot < num_slots)
    k = jnp.clip(slot, 0, num_slots - 1)
    newer = valid & (seq > last_seq[k])

    def store(b, p):
        b = jnp.asarray(b)
        return b.at[k].set(jnp.where(newer, jnp.asarray(p, b.dtype), b[k]))

    buffer = jax.tree.map(store, buffer, payload)
    return buffer, last_seq.at[k].set(jnp.where(newer, seq, last_seq[k]).astype(last_seq.dtype))


class RunningSumState(NamedTuple):
    r"""One node's end of the robust running-sum channel.

    Attributes:
      rho_out: leaves ``[max_out_degree, ...]``: cumulative mass ``\rho`` ever sent
        on each out-slot.
      rho_hat: leaves ``[max_in_degree, ...]``: newest cumulative mass ``\hat\rho``
        received on each in-slot.
      rho_tilde: leaves ``[max_in_degree, ...]``: the part ``\tilde\rho`` of
        ``rho_hat`` already absorbed.
      last_seq: int32 ``[max_in_degree]``: sequence number of ``rho_hat`` (-1: none).
    """

    rho_out: PyTree
    rho_hat: PyTree
    rho_tilde: PyTree
    last_seq: jax.Array


def running_sum_init(template: PyTree, max_in_degree: int, max_out_degree: int) -> RunningSumState:
    """All-zero running sums shaped like ``template`` per slot, ``last_seq = -1``."""

    def zeros(k):
        return jax.tree.map(lambda t: jnp.zeros((k,) + jnp.shape(t), jnp.result_type(t)), template)

    return RunningSumState(
        rho_out=zeros(max_out_degree),
        rho_hat=zeros(max_in_degree),
        rho_tilde=zeros(max_in_degree),
        last_seq=jnp.full((max_in_degree,), -1, jnp.int32),
    )


def running_sum_send(rho_out: PyTree, value: PyTree, out_weights) -> PyTree:
    r"""Adds this step's pushed shares to the cumulative sums of the out-slots.

    .. math::
        \rho_{ji} \leftarrow \rho_{ji} + c_{ji} z_i \quad \text{for each out-slot } j.

    The message on out-slot ``k`` is then the *whole* ``rho_out[k]`` (not the
    increment), so the next message that gets through also delivers the mass of
    any lost one.

    Args:
      rho_out: leaves ``[max_out_degree, ...]``.
      value: the mass being pushed, ``z_i`` (leaves ``[...]``).
      out_weights: ``[max_out_degree]`` shares ``c_ji``, 0 on padding.

    Returns:
      The new ``rho_out``.
    """
    out_weights = jnp.asarray(out_weights)
    _check_leading(rho_out, out_weights.shape[0], "running_sum_send")
    return jax.tree.map(
        lambda r, v: r + out_weights.astype(r.dtype).reshape((-1,) + (1,) * v.ndim) * v[None],
        rho_out,
        value,
    )


def running_sum_receive(rho_hat: PyTree, last_seq, slot, seq, payload: PyTree):
    """Keeps the newest cumulative sum received on in-slot ``slot`` (see `keep_newest`).

    Returns:
      ``(rho_hat, last_seq)``.
    """
    return keep_newest(rho_hat, last_seq, slot, seq, payload)


def running_sum_absorb(rho_hat: PyTree, rho_tilde: PyTree, mask=None) -> tuple[PyTree, PyTree]:
    r"""Absorbs the mass received since the last absorption.

    .. math::
        \Delta = \sum_k (\hat\rho_k - \tilde\rho_k), \qquad \tilde\rho_k \leftarrow \hat\rho_k .

    Args:
      rho_hat: leaves ``[max_in_degree, ...]``.
      rho_tilde: like ``rho_hat``.
      mask: optional bool ``[max_in_degree]``; unmasked slots are left for later.

    Returns:
      ``(delta, rho_tilde)``: ``delta`` has the shape of one slot; add it to the
      tracker.

    References:
      Tian, Sun and Scutari, "Achieving linear convergence in distributed
      asynchronous multi-agent optimization", IEEE TAC 2020 (arXiv:1803.10359).
    """
    if mask is None:
        new_tilde = rho_hat
    else:
        mask = jnp.asarray(mask)

        def select(h, t):
            return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (h.ndim - 1)), h, t)

        new_tilde = jax.tree.map(select, rho_hat, rho_tilde)
    delta = jax.tree.map(lambda h, t: sum_slots(h - t), new_tilde, rho_tilde)
    return delta, new_tilde


def running_sum_unabsorbed(rho_out: PyTree, rho_tilde: PyTree) -> PyTree:
    r"""Mass sent but not yet absorbed, over all nodes: in flight or waiting in ``rho_hat``.

    .. math::
        \sum_{(i \to j)} \big(\rho_{ji} - \tilde\rho_{ji}^{\text{at } j}\big)
        = \sum_{i,k} \rho^{out}_{ik} - \sum_{j,k} \tilde\rho_{jk}

    since every edge has exactly one out-slot and one in-slot (padding stays 0).
    R-FAST's invariant is ``sum_i z_i + unabsorbed == sum_i g_i`` whatever was
    lost, delayed or reordered.

    Args:
      rho_out: stacked leaves ``[n, max_out_degree, ...]``.
      rho_tilde: stacked leaves ``[n, max_in_degree, ...]``.

    Returns:
      Pytree of one payload's shape.
    """
    return jax.tree.map(lambda r, t: jnp.sum(r, axis=(0, 1)) - jnp.sum(t, axis=(0, 1)), rho_out, rho_tilde)
