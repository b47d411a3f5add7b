# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Multidimensional approximate agreement (MAA) in the cluster-based model.

One MAA round at process ``p`` (crash faults; Attiya & Schiller):

1. write its value, collect the values its cluster-mates have already written
   and take their coordinate-wise bounding `box`;
2. send the box to every other cluster (relayed there through shared memory);
3. wait until the clusters it holds boxes from form a quorum (`has_quorum`: more
   than half of the total weight, counting processes or clusters);
4. move to the midpoint of the union of the held boxes (`box_midpoint`).

Because every member of a cluster writes before it collects, each box a cluster
sends contains the value of its first writer; two quorums share a cluster, so
two processes' box unions share a point and their midpoints differ by at most
half the range, coordinate by coordinate: the l-infinity diameter
(`diameter_linf`) at least halves per round, and outputs stay inside the
inputs' bounding box (`inside_box`). Without a quorum of live clusters a
process waits forever, which the lower bound shows is unavoidable.

The functions on arrays are pure ``jax.numpy`` (jit-able). Values are
``[m, ...]`` arrays of ``m`` candidate points with a bool ``[m]`` mask; all
operations are coordinate-wise over the trailing axes. `simulate_maa_round` is a
host-side reference model of one round used to test these properties.

References:
  Attiya and Schiller, "Asynchronous fully-decentralized SGD in the
  cluster-based model", arXiv:2202.10862; Theoretical Computer Science 1031
  (2025).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "average",
    "box",
    "box_midpoint",
    "diameter_linf",
    "has_quorum",
    "inside_box",
    "rounds_needed",
    "simulate_maa_round",
]

_RULES = ("processes", "clusters")


def _row_mask(mask, values: jax.Array) -> jax.Array:
    """The ``[m]`` mask broadcast against ``[m, ...]`` values (all rows if None)."""
    if mask is None:
        mask = jnp.ones(values.shape[:1], dtype=bool)
    mask = jnp.asarray(mask, dtype=bool)
    if mask.shape != values.shape[:1]:
        raise ValueError(f"mask has shape {mask.shape}, values have {values.shape[:1]} rows.")
    return mask.reshape(mask.shape + (1,) * (values.ndim - 1))


def _masked_rows(values, mask, fill) -> list:
    """The rows of ``values`` (an ``[m, ...]`` array or a sequence of ``m`` arrays), ``fill`` where
    the bool ``[m]`` mask is false (all rows if None)."""
    rows = list(values)
    held = jnp.ones(len(rows), bool) if mask is None else jnp.asarray(mask, dtype=bool)
    if held.shape != (len(rows),):
        raise ValueError(f"mask has shape {held.shape}, values have {len(rows)} rows.")
    return [jnp.where(h, r, fill) for h, r in zip(held, rows)]


def _fold_rows(op, rows) -> jax.Array:
    """``op`` folded over the rows (of an array, or a sequence of arrays) in index order, unrolled:
    XLA:CPU reduces a short leading axis of long rows as a strided loop ~50x slower than the
    elementwise chain it is unrolled into (as in `mixing.sum_slots`)."""
    rows = list(rows)
    out = rows[0]
    for row in rows[1:]:
        out = op(out, row)
    return out


def box(values, mask=None) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise bounding box ``(lo, hi)`` of the masked rows of ``values``.

    Args:
      values: ``[m, ...]``, or a sequence of ``m`` arrays of one shape (rows read from different
        places are reduced where they lie, with no pass to stack them first).
      mask: optional bool ``[m]``.

    Returns:
      ``(lo, hi)`` of the shape of one row; ``(+inf, -inf)`` for an empty
      mask, the neutral element of a union.

    Example:
      >>> lo, hi = box(jnp.array([[0.0, 5.0], [2.0, 1.0], [9.0, 9.0]]), jnp.array([1, 1, 0]))
      >>> lo.tolist(), hi.tolist()
      ([0.0, 1.0], [2.0, 5.0])
    """
    return (
        _fold_rows(jnp.minimum, _masked_rows(values, mask, jnp.inf)),
        _fold_rows(jnp.maximum, _masked_rows(values, mask, -jnp.inf)),
    )


def box_midpoint(los, his, mask=None) -> jax.Array:
    r"""Midpoint of the bounding box of a union of boxes: the MAA update.

    .. math::
        v \leftarrow \tfrac12 \big(\min_{b} lo_b + \max_{b} hi_b\big)

    over the held boxes ``b``, coordinate-wise.

    Args:
      los, his: ``[k, ...]`` lower and upper corners of ``k`` boxes (or sequences of ``k`` arrays,
        as in `box`).
      mask: optional bool ``[k]``, the boxes held.

    Returns:
      The midpoint, shape of one corner (NaN if no box is held).
    """
    lo, _ = box(los, mask)
    _, hi = box(his, mask)
    return (lo + hi) / 2


def average(values, mask=None) -> jax.Array:
    """The averaging rule: mean of the masked rows (keeps convex-hull validity, contracts slower).

    Args:
      values: ``[m, ...]``, or a sequence of ``m`` arrays of one shape (as in `box`).
      mask: optional bool ``[m]``.

    Returns:
      The mean, shape of one row (NaN for an empty mask).
    """
    rows = _masked_rows(values, mask, 0)
    return _fold_rows(jnp.add, rows) / (len(rows) if mask is None else jnp.sum(jnp.asarray(mask, bool)))


def has_quorum(held_cluster_mask, cluster_sizes, rule: str = "processes") -> jax.Array:
    r"""Whether the held clusters carry a strict weight majority.

    .. math::
        \sum_{c \in K} w(c) > W / 2, \qquad
        w(c) = n_c,\ W = n \ (\texttt{"processes"}) \quad\text{or}\quad
        w(c) = 1,\ W = m \ (\texttt{"clusters"}).

    ``"processes"`` is the journal condition (clusters holding a majority of all
    processes), ``"clusters"`` the arXiv-v1 one (a majority of the clusters).

    Args:
      held_cluster_mask: bool ``[m]``, clusters the process holds a box from.
      cluster_sizes: int ``[m]``, processes per cluster (ignored by ``"clusters"``).
      rule: ``"processes"`` or ``"clusters"``.

    Returns:
      bool scalar.

    Example:
      >>> bool(has_quorum(jnp.array([True, False, False]), jnp.array([5, 4, 3])))
      False
      >>> bool(has_quorum(jnp.array([True, False, True]), jnp.array([5, 4, 3])))
      True
    """
    if rule not in _RULES:
        raise ValueError(f"unknown quorum rule {rule!r}; choose one of {_RULES}.")
    held = jnp.asarray(held_cluster_mask, dtype=bool)
    sizes = jnp.asarray(cluster_sizes)
    if held.shape != sizes.shape:
        raise ValueError(f"held_cluster_mask has shape {held.shape} but cluster_sizes has {sizes.shape}.")
    weight = sizes if rule == "processes" else jnp.ones_like(sizes)
    # 2 * held > total avoids a float comparison with W / 2.
    return 2 * jnp.sum(jnp.where(held, weight, 0)) > jnp.sum(weight)


def diameter_linf(values, mask=None) -> jax.Array:
    """Largest coordinate-wise spread ``max_k (hi_k - lo_k)`` of the masked rows.

    Equals ``max_{p, q} ||v_p - v_q||_inf``; 0 for fewer than two rows.
    """
    lo, hi = box(values, mask)
    return jnp.max(hi - lo, initial=0.0)  # empty mask: -inf spreads, so 0


def inside_box(values, lo, hi, mask=None, atol: float = 0.0) -> jax.Array:
    """Whether every masked row of ``values`` lies in ``[lo - atol, hi + atol]``."""
    values = jnp.asarray(values)
    m = _row_mask(mask, values)
    ok = (values >= lo - atol) & (values <= hi + atol)
    return jnp.all(ok | ~m)


def rounds_needed(diameter, epsilon) -> jax.Array:
    """Rounds ``ceil(log2(diameter / epsilon))`` (at least 0) to shrink a diameter below ``epsilon``.

    Each round at least halves the diameter.
    """
    ratio = jnp.asarray(diameter, jnp.float32) / epsilon
    return jnp.where(ratio > 1, jnp.ceil(jnp.log2(jnp.maximum(ratio, 1.0))), 0).astype(jnp.int32)


def simulate_maa_round(
    values,
    cluster_of,
    alive,
    rng: np.random.Generator,
    rule: str = "processes",
) -> tuple[np.ndarray, np.ndarray]:
    """Reference model of one MAA round under a random asynchronous schedule (host-side).

    The live processes write in a random order and collect right after writing
    (so each sees the cluster-mates that wrote before it). Every live process
    then receives, from each other cluster with a live member, the box of one
    random live member, clusters arriving in a random order, and stops waiting
    as soon as its own cluster plus the arrived ones form a quorum. Crashed
    processes do nothing in the round.

    Args:
      values: ``[n, d]`` inputs of the round.
      cluster_of: int ``[n]``, the cluster (``0 .. m - 1``) of each process.
      alive: bool ``[n]``.
      rng: a ``numpy.random.Generator`` driving the schedule.
      rule: quorum rule of `has_quorum`.

    Returns:
      ``(outputs, decided)``: ``outputs`` ``[n, d]`` (inputs where not decided) and
      bool ``[n]``, False for crashed processes and for those that would wait
      forever for a quorum.
    """
    values = np.asarray(values, dtype=np.float32)  # the dtype the jnp helpers compute in
    cluster_of = np.asarray(cluster_of)
    alive = np.asarray(alive, dtype=bool)
    n = values.shape[0]
    num_clusters = int(cluster_of.max()) + 1
    sizes = np.bincount(cluster_of, minlength=num_clusters)

    order = rng.permutation(np.flatnonzero(alive))
    position = np.full(n, n)
    position[order] = np.arange(order.size)
    # The box p sends: cluster-mates that wrote no later than p.
    boxes = {}
    for p in order:
        seen = (cluster_of == cluster_of[p]) & (position <= position[p])
        boxes[p] = tuple(np.asarray(x) for x in box(values, seen))

    outputs, decided = values.copy(), np.zeros(n, dtype=bool)
    for p in order:
        own = cluster_of[p]
        held = np.zeros(num_clusters, dtype=bool)
        held[own] = True
        los, his = [boxes[p][0]], [boxes[p][1]]
        others = [c for c in rng.permutation(num_clusters) if c != own and (alive & (cluster_of == c)).any()]
        for c in [None, *others]:  # None: check the own cluster alone first
            if c is not None:
                sender = rng.choice(np.flatnonzero(alive & (cluster_of == c)))
                held[c] = True
                los.append(boxes[sender][0])
                his.append(boxes[sender][1])
            if bool(has_quorum(held, sizes, rule)):
                outputs[p] = np.asarray(box_midpoint(np.stack(los), np.stack(his)))
                decided[p] = True
                break
    return outputs, decided
