# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Communication graphs, mixing weights and the checks decentralized algorithms need.

Contract:

* A `Graph` is an immutable, host-side description of who may send to whom. It
    holds numpy arrays only (read-only), so an algorithm can capture it as a
    compile-time constant or pass it as a static (hashable) argument to `jax.jit`.
* Edges are directed: ``graph.adjacency[i, j]`` is True iff there is an edge
    ``i -> j`` ("``i`` may send to ``j``"). There are never self loops: every node
    always has its own value, so self weights live on the diagonal of weight
    matrices, not in the graph.
* Fixed-shape JAX code addresses neighbours through *padded tables*: the
    in-neighbours of node ``i`` sit in slots ``0 .. in_degree[i] - 1`` of
    ``graph.in_table[i]`` (sorted by node id) and the remaining slots hold ``-1``.
    A message on edge ``src -> dst`` is stored by the receiver in slot
    ``graph.in_slot_of(src, dst)``; the sender finds that slot in
    ``graph.out_recv_slot``.
* Weight matrices follow one convention throughout: ``W[receiver, sender]``, so
    one synchronous mixing step is ``X <- W @ X`` with ``X`` stacked over nodes.
    A pull (row-stochastic) matrix and a push (column-stochastic) matrix only
    differ in which sums are one. ``W[a, b] != 0`` for ``a != b`` requires the
    edge ``b -> a``.

Graph construction is numpy and runs once, outside of any traced code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

__all__ = [
    "Graph",
    "check_column_stochastic",
    "check_common_root",
    "check_doubly_stochastic",
    "check_row_stochastic",
    "complete",
    "directed_ring",
    "effective_step_factor",
    "exponential",
    "from_adjacency",
    "from_networkx",
    "in_tree",
    "in_weight_table",
    "metropolis_weights",
    "out_tree",
    "out_weight_table",
    "perron_vectors",
    "pull_weights",
    "push_weights",
    "random_geometric",
    "ring",
    "roots_of_spanning_trees",
    "spectral_gap",
    "star",
    "torus",
]

# How many failing rows / columns / entries an error message lists.
_MAX_REPORTED = 5


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)  # own copy, so nobody else can mutate it through an alias
    a.setflags(write=False)
    return a


def _padded_table(lists: list[np.ndarray], width: int) -> np.ndarray:
    table = np.full((len(lists), width), -1, dtype=np.int32)
    for i, nbrs in enumerate(lists):
        table[i, : len(nbrs)] = nbrs
    return table


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A directed communication graph on nodes ``0 .. n - 1`` without self loops.

    Attributes:
      adjacency: read-only bool ``[n, n]``; ``adjacency[i, j]`` means an edge
        ``i -> j`` (``i`` sends to ``j``).
      name: a label for reports and plots.
      n: number of nodes.
      in_degree, out_degree: int32 ``[n]``.
      max_in_degree, max_out_degree: python ints (at least 0).
      in_table: int32 ``[n, max_in_degree]``; row ``i`` lists the in-neighbours of
        ``i`` in increasing order, padded with ``-1``. Slot ``k`` of node ``i`` is
        the edge ``in_table[i, k] -> i``.
      in_mask: bool ``[n, max_in_degree]``, ``in_table >= 0``.
      out_table: int32 ``[n, max_out_degree]``; out-neighbours, ``-1`` padded.
      out_mask: bool ``[n, max_out_degree]``, ``out_table >= 0``.
      out_recv_slot: int32 ``[n, max_out_degree]``; ``out_recv_slot[i, k]`` is the
        in-slot, at receiver ``out_table[i, k]``, of the edge on out-slot ``k`` of
        ``i`` (``-1`` on padding). A sender addresses a message with
        ``(out_table[i, k], out_recv_slot[i, k])``.
      in_send_slot: int32 ``[n, max_in_degree]``; ``in_send_slot[i, k]`` is the
        out-slot, at sender ``in_table[i, k]``, of the edge on in-slot ``k`` of
        ``i`` (``-1`` on padding).
      edges: int32 ``[num_edges, 2]`` of ``(src, dst)`` in row-major order.

    Graphs are immutable, hashable and compare by adjacency, so they can be static
    arguments of `jax.jit`.

    Example:
      >>> g = directed_ring(4)
      >>> g.in_table.tolist(), g.in_slot_of(3, 0)
      ([[3], [0], [1], [2]], 0)
    """

    adjacency: np.ndarray
    name: str = ""

    def __post_init__(self):
        a = np.asarray(self.adjacency)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"adjacency must be a square [n, n] matrix, got shape {a.shape}.")
        if a.shape[0] == 0:
            raise ValueError("a graph needs at least one node.")
        if a.dtype != np.bool_:
            raise TypeError(f"adjacency must have dtype bool, got {a.dtype}; use from_adjacency().")
        loops = np.flatnonzero(np.diag(a))
        if loops.size:
            raise ValueError(
                f"adjacency has self loops at nodes {loops[:_MAX_REPORTED].tolist()}; self weights "
                "are implicit, drop the diagonal (from_adjacency() does)."
            )
        n = a.shape[0]
        in_lists = [np.flatnonzero(a[:, i]) for i in range(n)]
        out_lists = [np.flatnonzero(a[i, :]) for i in range(n)]
        in_degree = a.sum(axis=0).astype(np.int32)
        out_degree = a.sum(axis=1).astype(np.int32)
        max_in, max_out = int(in_degree.max()), int(out_degree.max())
        in_table = _padded_table(in_lists, max_in)
        out_table = _padded_table(out_lists, max_out)

        # slot_at[src, dst] = in-slot of edge src -> dst at dst; same for out-slots.
        in_slot = np.full((n, n), -1, dtype=np.int32)
        out_slot = np.full((n, n), -1, dtype=np.int32)
        for i in range(n):
            in_slot[in_lists[i], i] = np.arange(len(in_lists[i]))
            out_slot[i, out_lists[i]] = np.arange(len(out_lists[i]))
        out_recv_slot = np.where(
            out_table >= 0, in_slot[np.arange(n)[:, None], np.maximum(out_table, 0)], -1
        ).astype(np.int32)
        in_send_slot = np.where(
            in_table >= 0, out_slot[np.maximum(in_table, 0), np.arange(n)[:, None]], -1
        ).astype(np.int32)

        fields = dict(
            adjacency=a,
            n=n,
            in_degree=in_degree,
            out_degree=out_degree,
            max_in_degree=max_in,
            max_out_degree=max_out,
            in_table=in_table,
            in_mask=in_table >= 0,
            out_table=out_table,
            out_mask=out_table >= 0,
            out_recv_slot=out_recv_slot,
            in_send_slot=in_send_slot,
            edges=np.argwhere(a).astype(np.int32).reshape(-1, 2),
            _in_slot=in_slot,
        )
        for key, value in fields.items():
            if isinstance(value, np.ndarray):
                value = _readonly(value)
            # The dataclass is frozen; this is the documented way to fill derived fields.
            object.__setattr__(self, key, value)

    # Derived fields (filled in __post_init__); declared for readers and type checkers.
    n: int = dataclasses.field(init=False)
    in_degree: np.ndarray = dataclasses.field(init=False, repr=False)
    out_degree: np.ndarray = dataclasses.field(init=False, repr=False)
    max_in_degree: int = dataclasses.field(init=False, repr=False)
    max_out_degree: int = dataclasses.field(init=False, repr=False)
    in_table: np.ndarray = dataclasses.field(init=False, repr=False)
    in_mask: np.ndarray = dataclasses.field(init=False, repr=False)
    out_table: np.ndarray = dataclasses.field(init=False, repr=False)
    out_mask: np.ndarray = dataclasses.field(init=False, repr=False)
    out_recv_slot: np.ndarray = dataclasses.field(init=False, repr=False)
    in_send_slot: np.ndarray = dataclasses.field(init=False, repr=False)
    edges: np.ndarray = dataclasses.field(init=False, repr=False)
    _in_slot: np.ndarray = dataclasses.field(init=False, repr=False)

    @property
    def num_edges(self) -> int:
        return int(self.edges.shape[0])

    @property
    def is_symmetric(self) -> bool:
        """True when every edge ``i -> j`` has its reverse ``j -> i`` (an undirected graph)."""
        return bool(np.array_equal(self.adjacency, self.adjacency.T))

    def in_neighbors(self, i: int) -> np.ndarray:
        """The nodes ``j`` with an edge ``j -> i``, increasing."""
        return self.in_table[self._node(i), : self.in_degree[i]]

    def out_neighbors(self, i: int) -> np.ndarray:
        """The nodes ``j`` with an edge ``i -> j``, increasing."""
        return self.out_table[self._node(i), : self.out_degree[i]]

    def in_slot_of(self, src: int, dst: int) -> int:
        """The slot of edge ``src -> dst`` in ``dst``'s padded in-tables.

        Raises:
          ValueError: if there is no such edge.
        """
        slot = int(self._in_slot[self._node(src), self._node(dst)])
        if slot < 0:
            raise ValueError(f"{src} -> {dst} is not an edge of {self.name or 'the graph'}.")
        return slot

    def reverse(self) -> Graph:
        """The graph with every edge reversed."""
        return Graph(self.adjacency.T, name=f"reverse({self.name})" if self.name else "")

    def _node(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise ValueError(f"node {i} is out of range for a graph with n={self.n} nodes.")
        return i

    def __eq__(self, other):
        if not isinstance(other, Graph):
            return NotImplemented
        return np.array_equal(self.adjacency, other.adjacency)

    def __hash__(self):
        return hash((self.n, np.packbits(self.adjacency).tobytes()))


# ----------------------------------------------------------------------------------------
# Builders.


def _check_n(n, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"the number of nodes must be an int, got {type(n).__name__}.")
    if n < minimum:
        raise ValueError(f"the number of nodes must be >= {minimum}, got {n}.")
    return int(n)


def _from_edges(n: int, src: Iterable[int], dst: Iterable[int], name: str) -> Graph:
    a = np.zeros((n, n), dtype=bool)
    a[np.asarray(src, dtype=int), np.asarray(dst, dtype=int)] = True
    np.fill_diagonal(a, False)  # wrap-around on tiny graphs can produce i -> i
    return Graph(a, name=name)


def from_adjacency(a, name: str = "") -> Graph:
    """A graph from any square array: nonzero off-diagonal ``a[i, j]`` is an edge ``i -> j``.

    The diagonal is ignored (nodes always keep their own value), so a mixing matrix
    ``W[receiver, sender]`` can be turned into its graph with ``from_adjacency(W.T)``.

    Args:
      a: array-like ``[n, n]`` (bool or numeric).
      name: optional label.

    Returns:
      A `Graph`.
    """
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square [n, n] matrix, got shape {a.shape}.")
    a = a != 0
    np.fill_diagonal(a, False)
    return Graph(a, name=name)


def from_networkx(g, name: str = "") -> Graph:
    """A graph from a networkx graph; node ``k`` is the ``k``-th node of ``g.nodes``.

    Undirected graphs get both directions of each edge; self loops are dropped.
    networkx is optional: this function only uses the graph's ``nodes``, ``edges``
    and ``is_directed``, so it never imports networkx itself.

    Args:
      g: a ``networkx.Graph`` or ``networkx.DiGraph``.
      name: optional label (defaults to ``g.name``).

    Returns:
      A `Graph`.
    """
    index = {node: k for k, node in enumerate(g.nodes)}
    n = len(index)
    if n == 0:
        raise ValueError("the networkx graph has no nodes.")
    a = np.zeros((n, n), dtype=bool)
    for u, v in g.edges():
        a[index[u], index[v]] = True
        if not g.is_directed():
            a[index[v], index[u]] = True
    np.fill_diagonal(a, False)
    return Graph(a, name=name or str(getattr(g, "name", "")))


def ring(n: int) -> Graph:
    """Undirected ring: edges ``i <-> i + 1 mod n``.

    Example:
      >>> ring(4).in_neighbors(0).tolist()
      [1, 3]
    """
    n = _check_n(n)
    i = np.arange(n)
    return _from_edges(n, np.r_[i, (i + 1) % n], np.r_[(i + 1) % n, i], f"ring({n})")


def directed_ring(n: int) -> Graph:
    """Directed ring: edges ``i -> i + 1 mod n``."""
    n = _check_n(n)
    i = np.arange(n)
    return _from_edges(n, i, (i + 1) % n, f"directed_ring({n})")


def torus(rows: int, cols: int) -> Graph:
    """Undirected 2-D torus (grid with wrap-around); node ``r * cols + c`` at ``(r, c)``.

    Each node is linked to its up/down/left/right neighbours; on sides of length 1
    or 2 duplicate links merge.
    """
    rows, cols = _check_n(rows), _check_n(cols)
    r, c = np.divmod(np.arange(rows * cols), cols)
    right = r * cols + (c + 1) % cols
    down = ((r + 1) % rows) * cols + c
    node = np.arange(rows * cols)
    src = np.r_[node, right, node, down]
    dst = np.r_[right, node, down, node]
    return _from_edges(rows * cols, src, dst, f"torus({rows}x{cols})")


def exponential(n: int) -> Graph:
    """Directed exponential graph: edges ``i -> i + 2^k mod n`` for ``2^k < n``.

    Every node has ``ceil(log2 n)`` out-neighbours (fewer if they coincide) and the
    diameter is ``O(log n)``; the usual graph of SGP (Assran et al., 2019).
    """
    n = _check_n(n)
    hops = [1 << k for k in range(n.bit_length()) if (1 << k) < n]
    i = np.arange(n)
    src = np.tile(i, len(hops))
    dst = np.concatenate([(i + h) % n for h in hops] or [np.zeros(0, int)])
    return _from_edges(n, src, dst, f"exponential({n})")


def complete(n: int) -> Graph:
    """Complete graph: every ``i -> j`` with ``i != j``."""
    n = _check_n(n)
    return Graph(~np.eye(n, dtype=bool), name=f"complete({n})")


def star(n: int, center: int = 0) -> Graph:
    """Undirected star: ``center <-> j`` for every other node ``j``."""
    n = _check_n(n)
    if not 0 <= center < n:
        raise ValueError(f"center={center} is not a node of a graph with n={n} nodes.")
    others = np.delete(np.arange(n), center)
    hub = np.full_like(others, center)
    return _from_edges(n, np.r_[hub, others], np.r_[others, hub], f"star({n}, center={center})")


def _tree_parent_edges(n: int, root: int, branching: int) -> tuple[np.ndarray, np.ndarray]:
    """(child, parent) pairs of a complete ``branching``-ary tree in heap order from ``root``."""
    n = _check_n(n)
    if not 0 <= root < n:
        raise ValueError(f"root={root} is not a node of a graph with n={n} nodes.")
    if branching < 1:
        raise ValueError(f"branching must be >= 1, got {branching}.")
    pos = np.arange(1, n)  # heap positions of the non-root nodes
    # Position p is node (p + root) mod n, so the root sits at heap position 0.
    return (pos + root) % n, ((pos - 1) // branching + root) % n


def in_tree(n: int, root: int = 0, branching: int = 2) -> Graph:
    """A ``branching``-ary tree with edges child -> parent (everybody reaches ``root``).

    Nodes are placed in heap order starting at ``root``: heap position ``p`` is node
    ``(p + root) mod n`` and its parent is position ``(p - 1) // branching``. As a
    push graph it funnels mass to the root (parameter-server-like).
    """
    child, parent = _tree_parent_edges(n, root, branching)
    return _from_edges(n, child, parent, f"in_tree({n}, root={root}, branching={branching})")


def out_tree(n: int, root: int = 0, branching: int = 2) -> Graph:
    """The `in_tree` with edges reversed: parent -> child (``root`` reaches everybody)."""
    child, parent = _tree_parent_edges(n, root, branching)
    return _from_edges(n, parent, child, f"out_tree({n}, root={root}, branching={branching})")


def random_geometric(n: int, radius: float, seed: int = 0) -> Graph:
    """Undirected random geometric graph in the unit square.

    ``n`` points are drawn uniformly with ``numpy.random.default_rng(seed)``; two
    nodes are linked when their Euclidean distance is at most ``radius``. The graph
    may be disconnected for a small radius (check with `roots_of_spanning_trees`).
    """
    n = _check_n(n)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    pts = np.random.default_rng(seed).uniform(size=(n, 2))
    dist = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=-1)
    a = dist <= radius
    np.fill_diagonal(a, False)
    return Graph(a, name=f"random_geometric({n}, {radius}, seed={seed})")


# ----------------------------------------------------------------------------------------
# Weights.


def pull_weights(graph: Graph) -> np.ndarray:
    r"""Row-stochastic uniform pull weights.

    .. math::
      R_{ij} = \frac{1}{|N^{in}(i)| + 1} \quad \text{for } j \in N^{in}(i) \cup \{i\},

    so ``x_i <- sum_j R[i, j] x_j`` averages ``i``'s value with those it pulls over
    the edges ``j -> i`` (``X <- R @ X`` stacked over nodes). Rows sum to one.

    Args:
      graph: the pull graph (edge ``j -> i``: ``i`` receives ``j``'s value).

    Returns:
      float64 ``[n, n]`` matrix ``R[receiver, sender]``.

    Example:
      >>> pull_weights(directed_ring(3))[0].tolist()
      [0.5, 0.0, 0.5]
    """
    support = graph.adjacency.T | np.eye(graph.n, dtype=bool)
    return support / support.sum(axis=1, keepdims=True)


def push_weights(graph: Graph) -> np.ndarray:
    r"""Column-stochastic uniform push weights.

    .. math::
      C_{ji} = \frac{1}{|N^{out}(i)| + 1} \quad \text{for } j \in N^{out}(i) \cup \{i\},

    i.e. node ``i`` keeps the share ``C[i, i]`` of its mass and sends the same
    share to each out-neighbour (``X <- C @ X`` stacked over nodes). Columns sum
    to one, so the total mass ``sum_i x_i`` is conserved.

    Args:
      graph: the push graph (edge ``i -> j``: ``i`` sends mass to ``j``).

    Returns:
      float64 ``[n, n]`` matrix ``C[receiver, sender]``.
    """
    support = graph.adjacency.T | np.eye(graph.n, dtype=bool)
    return support / support.sum(axis=0, keepdims=True)


def metropolis_weights(graph: Graph) -> np.ndarray:
    r"""Symmetric, doubly stochastic Metropolis–Hastings weights of an undirected graph.

    .. math::
      W_{ij} = \frac{1}{1 + \max(d_i, d_j)} \text{ for edges}, \qquad
      W_{ii} = 1 - \sum_{j \ne i} W_{ij}.

    Args:
      graph: an undirected (symmetric) graph.

    Returns:
      float64 ``[n, n]`` symmetric matrix with rows and columns summing to one.

    Raises:
      ValueError: if the graph is directed.

    References:
      Xiao, Boyd and Lall, "A scheme for robust distributed sensor fusion based on
      average consensus", IPSN 2005.
    """
    if not graph.is_symmetric:
        raise ValueError(
            "metropolis_weights needs an undirected graph (every edge i -> j with its "
            f"reverse); {graph.name or 'this graph'} is directed."
        )
    deg = graph.out_degree.astype(np.float64)
    w = np.where(graph.adjacency, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def in_weight_table(graph: Graph, w) -> tuple[np.ndarray, np.ndarray]:
    """Self weights and padded in-slot weights of a ``W[receiver, sender]`` matrix.

    For node programs that pull: ``x_i <- self_w[i] x_i + sum_k nbr_w[i, k] v[i, k]``
    with ``v[i, k]`` the value received on in-slot ``k``.

    Args:
      graph: the graph whose in-tables define the slots.
      w: ``[n, n]`` weights, e.g. `pull_weights` (``w[i, j]`` weight ``i`` gives ``j``).

    Returns:
      ``(self_w, nbr_w)``: float64 ``[n]`` and ``[n, max_in_degree]`` (0 on padding).

    Raises:
      ValueError: if ``w`` has the wrong shape or weight on a non-edge.
    """
    w = _check_square(w, graph.n)
    _check_support(w, graph)
    rows = np.arange(graph.n)[:, None]
    nbr = np.where(graph.in_mask, w[rows, np.maximum(graph.in_table, 0)], 0.0)
    return np.diag(w).copy(), nbr


def out_weight_table(graph: Graph, w) -> tuple[np.ndarray, np.ndarray]:
    """Self weights and padded out-slot weights of a ``W[receiver, sender]`` matrix.

    For node programs that push: node ``i`` keeps ``self_w[i] * z`` and sends
    ``nbr_w[i, k] * z`` on out-slot ``k``.

    Args:
      graph: the graph whose out-tables define the slots.
      w: ``[n, n]`` weights, e.g. `push_weights` (``w[j, i]`` share ``i`` sends ``j``).

    Returns:
      ``(self_w, nbr_w)``: float64 ``[n]`` and ``[n, max_out_degree]`` (0 on padding).

    Raises:
      ValueError: if ``w`` has the wrong shape or weight on a non-edge.
    """
    w = _check_square(w, graph.n)
    _check_support(w, graph)
    cols = np.arange(graph.n)[:, None]
    nbr = np.where(graph.out_mask, w[np.maximum(graph.out_table, 0), cols], 0.0)
    return np.diag(w).copy(), nbr


# ----------------------------------------------------------------------------------------
# Validators.


def _check_square(w, n: int | None = None) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"weights must be a square [n, n] matrix, got shape {w.shape}.")
    if n is not None and w.shape[0] != n:
        raise ValueError(f"weights have shape {w.shape} but the graph has n={n} nodes.")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinite entries.")
    return w


def _check_support(w: np.ndarray, graph: Graph) -> None:
    # W[a, b] != 0 (a != b) needs the edge b -> a.
    bad = (w != 0) & ~graph.adjacency.T & ~np.eye(graph.n, dtype=bool)
    if bad.any():
        pairs = [(int(b), int(a)) for a, b in np.argwhere(bad)[:_MAX_REPORTED]]
        raise ValueError(
            f"weights put mass on {int(bad.sum())} non-edges of {graph.name or 'the graph'}; "
            f"W[receiver, sender] != 0 without an edge sender -> receiver for (sender, receiver) "
            f"in {pairs}."
        )


def _check_common(w, graph, atol) -> np.ndarray:
    w = _check_square(w, None if graph is None else graph.n)
    neg = np.argwhere(w < -atol)
    if neg.size:
        entries = {(int(i), int(j)): float(w[i, j]) for i, j in neg[:_MAX_REPORTED]}
        raise ValueError(f"weights have {len(neg)} negative entries: {entries}.")
    if graph is not None:
        _check_support(w, graph)
    return w


def _check_sums(sums: np.ndarray, what: str, atol: float) -> None:
    bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if bad.size:
        detail = ", ".join(
            f"{int(k)}: sum {sums[k]:.6g} (off by {sums[k] - 1:+.3g})" for k in bad[:_MAX_REPORTED]
        )
        more = f" and {bad.size - _MAX_REPORTED} more" if bad.size > _MAX_REPORTED else ""
        raise ValueError(f"{bad.size} {what} do not sum to 1: {detail}{more}.")


def check_row_stochastic(w, graph: Graph | None = None, atol: float = 1e-6) -> None:
    """Checks that ``w`` is a nonnegative matrix whose rows sum to one.

    Args:
      w: ``[n, n]`` weights ``W[receiver, sender]``.
      graph: if given, also checks there is no weight on a non-edge.
      atol: tolerance on the sums and on negative entries.

    Raises:
      ValueError: naming the failing rows and by how much they miss, the negative
        entries, a wrong shape, or the non-edges carrying weight.
    """
    w = _check_common(w, graph, atol)
    _check_sums(w.sum(axis=1), "rows", atol)


def check_column_stochastic(w, graph: Graph | None = None, atol: float = 1e-6) -> None:
    """Checks that ``w`` is a nonnegative matrix whose columns sum to one.

    Args and errors as `check_row_stochastic`, with columns instead of rows.
    """
    w = _check_common(w, graph, atol)
    _check_sums(w.sum(axis=0), "columns", atol)


def check_doubly_stochastic(w, graph: Graph | None = None, atol: float = 1e-6) -> None:
    """Checks that ``w`` is nonnegative with rows and columns summing to one.

    Args and errors as `check_row_stochastic`.
    """
    w = _check_common(w, graph, atol)
    _check_sums(w.sum(axis=1), "rows", atol)
    _check_sums(w.sum(axis=0), "columns", atol)


# ----------------------------------------------------------------------------------------
# Connectivity.


def _as_graph(g) -> Graph:
    return g if isinstance(g, Graph) else from_adjacency(g)


def _reach(adjacency: np.ndarray, start: int) -> np.ndarray:
    """Bool mask of the nodes reachable from ``start`` (including it)."""
    seen = np.zeros(adjacency.shape[0], dtype=bool)
    seen[start] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = adjacency[frontier].any(axis=0) & ~seen
        seen |= frontier
    return seen


def roots_of_spanning_trees(graph) -> np.ndarray:
    """The nodes from which every node can be reached along the edges.

    Such a node is the root of a directed spanning tree (an out-arborescence). The
    roots, if any, form one strongly connected component; a strongly connected
    graph has every node as a root.

    Args:
      graph: a `Graph` (or an adjacency matrix).

    Returns:
      int array of roots in increasing order (empty if there is none).

    Example:
      >>> roots_of_spanning_trees(out_tree(5)).tolist()
      [0]
    """
    g = _as_graph(graph)
    a = g.adjacency
    # A root lies in a source component of the condensation (nothing enters it).
    # Walk upstream from node 0 until no node reaches us without being reached back.
    candidate = 0
    while True:
        down, up = _reach(a, candidate), _reach(a.T, candidate)
        upstream = up & ~down  # in components strictly before the candidate's
        if not upstream.any():
            break
        candidate = int(np.flatnonzero(upstream)[0])
    if not down.all():
        return np.zeros(0, dtype=np.int64)
    # The candidate reaches everybody, so the roots are exactly the nodes reaching it.
    return np.flatnonzero(up)


def check_common_root(pull, push) -> np.ndarray:
    """Checks the Push-Pull / R-FAST condition and returns the common roots.

    The pull graph ``G_R`` (edge ``j -> i``: ``i`` pulls ``j``'s value) must contain
    a spanning tree, the push graph ``G_C`` (edge ``i -> j``: ``i`` pushes mass to
    ``j``) must contain a spanning tree of its reverse, and some node must be a root
    of both: it reaches every node in ``G_R`` and every node reaches it in ``G_C``.

    Args:
      pull: the pull graph ``G_R`` (a `Graph` or adjacency matrix).
      push: the push graph ``G_C``, on the same nodes.

    Returns:
      int array of common roots, increasing, nonempty.

    Raises:
      ValueError: "no node reaches every node in the pull graph", "no node is
        reached by every node in the push graph", or "the pull graph's roots {..}
        and the push graph's roots {..} do not intersect"; also on different sizes.

    Example:
      >>> check_common_root(out_tree(7), in_tree(7)).tolist()
      [0]

    References:
      Pu, Shi, Xu and Nedić, "Push-Pull gradient methods for distributed
      optimization in networks", IEEE TAC 2021 (arXiv:1810.06653).
    """
    pull, push = _as_graph(pull), _as_graph(push)
    if pull.n != push.n:
        raise ValueError(f"the pull graph has {pull.n} nodes but the push graph has {push.n}.")
    pull_roots = roots_of_spanning_trees(pull)
    if pull_roots.size == 0:
        raise ValueError(
            f"no node reaches every node in the pull graph {pull.name!r}: it has no spanning tree."
        )
    push_roots = roots_of_spanning_trees(push.reverse())
    if push_roots.size == 0:
        raise ValueError(
            f"no node is reached by every node in the push graph {push.name!r}: its reverse has "
            "no spanning tree."
        )
    common = np.intersect1d(pull_roots, push_roots)
    if common.size == 0:
        raise ValueError(
            f"the pull graph's roots {set(pull_roots.tolist())} and the push graph's roots "
            f"{set(push_roots.tolist())} do not intersect."
        )
    return common


# ----------------------------------------------------------------------------------------
# Spectra.


def spectral_gap(w) -> float:
    r"""One minus the second largest eigenvalue modulus of a stochastic matrix.

    .. math::
      \gamma(W) = 1 - |\lambda_2(W)|, \qquad
      |\lambda_1| = 1 \ge |\lambda_2| \ge \dots

    For a symmetric doubly stochastic ``W`` the moduli are the singular values, so
    ``1 - gamma`` is the factor by which one gossip step shrinks the distance to the
    average, ``||W x - mean(x)|| <= (1 - gamma) ||x - mean(x)||``. For a
    non-symmetric ``W`` it is the asymptotic per-step rate of ``W^k`` to its limit.
    A gap of 0 means no convergence (e.g. a disconnected or periodic graph).

    Args:
      w: ``[n, n]`` row- or column-stochastic matrix.

    Returns:
      The gap, a float in ``[0, 1]``.
    """
    w = _check_square(w)
    if w.shape[0] == 1:
        return 1.0
    moduli = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return float(np.clip(1.0 - moduli[1], 0.0, 1.0))


def _perron(m: np.ndarray, what: str) -> np.ndarray:
    """The eigenvector of ``m`` for eigenvalue 1, normalised to sum 1."""
    vals, vecs = np.linalg.eig(m)
    ones = np.flatnonzero(np.abs(vals - 1.0) < 1e-8)
    if ones.size != 1:
        raise ValueError(
            f"the {what} has eigenvalue 1 with multiplicity {ones.size}; a unique Perron vector "
            "needs a graph with a spanning tree."
        )
    v = np.real(vecs[:, ones[0]])
    v = v / v.sum()
    return np.where(np.abs(v) < 1e-12, 0.0, v)  # clean round-off on non-root nodes


def perron_vectors(r, c) -> tuple[np.ndarray, np.ndarray]:
    r"""Left Perron vector of a row-stochastic ``R`` and right Perron vector of a
    column-stochastic ``C``.

    .. math::
      u^\top R = u^\top, \quad C v = v, \quad \textstyle\sum_i u_i = \sum_i v_i = 1.

    ``u`` weighs how much each node's value counts in the pull-consensus limit,
    ``v`` where push mass settles.

    Args:
      r: ``[n, n]`` row-stochastic pull weights.
      c: ``[n, n]`` column-stochastic push weights.

    Returns:
      ``(u, v)``, float64 ``[n]`` each, nonnegative, summing to one.

    Raises:
      ValueError: if a matrix is not stochastic or its Perron vector is not unique.
    """
    check_row_stochastic(r)
    check_column_stochastic(c)
    return (
        _perron(np.asarray(r, np.float64).T, "row-stochastic matrix"),
        _perron(np.asarray(c, np.float64), "column-stochastic matrix"),
    )


def effective_step_factor(r, c, *, kept_share: bool = False) -> float:
    r"""The factor ``n u^T v`` by which gradient tracking scales the step size.

    With Push-Pull the trackers sum to the *sum* of the local gradients and settle as
    ``z ~ v sum_i g_i``, so the ``u``-weighted average moves by ``gamma * n (u^T v) * mean_i g_i``:
    the effective step is ``gamma * factor``. It is 1 for doubly stochastic weights and ``n`` for a
    tree rooted at one node (``u = v = e_root``). Divide a target step by this factor to get
    ``gamma``.

    R-FAST descends along the share ``c_ii z_i`` a node keeps after its push step
    (``kept_share=True``): the average then moves by ``gamma * n sum_i u_i c_ii v_i`` times the mean
    gradient (a third of Push-Pull's factor on a ring with self-weight 1/3; the same on a tree,
    whose root keeps everything).

    Args:
      r: ``[n, n]`` row-stochastic pull weights.
      c: ``[n, n]`` column-stochastic push weights.
      kept_share: the descent uses the kept share ``c_ii z_i`` instead of ``z_i``.

    Returns:
      ``n * u @ v`` (``n * sum_i u_i c_ii v_i`` with ``kept_share``) as a float.

    Example:
      >>> effective_step_factor(pull_weights(out_tree(4)), push_weights(in_tree(4)))
      4.0

    References:
      Pu, Shi, Xu and Nedić, "Push-Pull gradient methods for distributed
      optimization in networks", IEEE TAC 2021 (arXiv:1810.06653).
    """
    u, v = perron_vectors(r, c)
    if kept_share:
        v = np.diag(np.asarray(c, np.float64)) * v
    return float(u.shape[0] * (u @ v))
