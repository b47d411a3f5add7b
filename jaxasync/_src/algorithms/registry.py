"""Algorithms by name, with defaults, for the command line and the benchmarks.

``build(name, num_nodes, learning_rate=..., topology=..., **options)`` returns the node program of
algorithm ``name`` for ``num_nodes`` data nodes. Library users call the factories of
:mod:`jaxasync.algorithms` directly; this table only fills in what a command line cannot say (graphs,
cluster sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import asgrad as asgrad_lib
from jaxasync._src.algorithms import cluster as cluster_lib
from jaxasync._src.algorithms import dasgd as dasgd_lib
from jaxasync._src.algorithms import gossip as gossip_lib
from jaxasync._src.algorithms import rfast as rfast_lib
from jaxasync._src.algorithms import sequential as sequential_lib
from jaxasync._src.algorithms import shared_memory as shared_memory_lib

TOPOLOGIES: dict[str, Callable[[int], topology_lib.Graph]] = {
    "ring": topology_lib.ring,
    "directed_ring": topology_lib.directed_ring,
    "exponential": topology_lib.exponential,
    "complete": topology_lib.complete,
    "star": topology_lib.star,
    "torus": lambda n: topology_lib.torus(*_near_square(n)),
}


def _near_square(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def graph(name: str, n: int) -> topology_lib.Graph:
    """The graph called ``name`` on ``n`` nodes (``ring``, ``directed_ring``, ``exponential``, ...)."""
    try:
        return TOPOLOGIES[name](n)
    except KeyError:
        raise ValueError(f"unknown topology {name!r}; choose from {sorted(TOPOLOGIES)}") from None


def _rfast(n, lr, topology, robust, **options):
    if topology == "tree":  # parameter-server-like: children pull from and push to their parent
        pull, push = topology_lib.out_tree(n), topology_lib.in_tree(n)
    else:
        pull = push = graph(topology, n)
    return rfast_lib.rfast(pull, push, learning_rate=lr, robust=robust, **options)


def _clusters(n: int) -> list[int]:
    """About three clusters of nearly equal size (the cluster model's default layout)."""
    m = min(3, n)
    return [n // m + (i < n % m) for i in range(m)]


BUILDERS: dict[str, Callable[..., object]] = {
    "sgd": lambda n, lr, topology, **o: sequential_lib.sgd(learning_rate=lr, **o),
    "allreduce_sgd": lambda n, lr, topology, **o: gossip_lib.allreduce_sgd(
        num_nodes=n, learning_rate=lr, **o
    ),
    "dpsgd": lambda n, lr, topology, **o: gossip_lib.dpsgd(graph(topology, n), learning_rate=lr, **o),
    "adpsgd": lambda n, lr, topology, **o: gossip_lib.adpsgd(graph(topology, n), learning_rate=lr, **o),
    "sgp": lambda n, lr, topology, **o: gossip_lib.sgp(
        graph("exponential" if topology == "ring" else topology, n), learning_rate=lr, **o
    ),
    "rfast": lambda n, lr, topology, **o: _rfast(n, lr, topology, True, **o),
    "rfast_nonrobust": lambda n, lr, topology, **o: _rfast(n, lr, topology, False, **o),
    "dasgd": lambda n, lr, topology, **o: dasgd_lib.dasgd(num_nodes=n, learning_rate=lr, **o),
    "asgrad": lambda n, lr, topology, **o: asgrad_lib.asgrad(num_workers=n, learning_rate=lr, **o),
    "ps_asgd": lambda n, lr, topology, **o: asgrad_lib.ps_asgd(num_workers=n, learning_rate=lr, **o),
    "delay_adaptive_asgd": lambda n, lr, topology, **o: asgrad_lib.delay_adaptive_asgd(
        num_workers=n, learning_rate=lr, **o
    ),
    "hogwild": lambda n, lr, topology, **o: shared_memory_lib.hogwild(learning_rate=lr, **o),
    "sparsified_sgd": lambda n, lr, topology, **o: shared_memory_lib.sparsified_sgd(
        learning_rate=lr, **{"density": 0.1, **o}
    ),
    "cluster_sgd": lambda n, lr, topology, **o: cluster_lib.cluster_sgd(
        o.pop("clusters", _clusters(n)), learning_rate=lr, **o
    ),
}


def build(name: str, num_nodes: int, *, learning_rate: float, topology: str = "ring", **options):
    """The node program of algorithm ``name`` for ``num_nodes`` data nodes.

    Args:
      name: one of :data:`BUILDERS` (``rfast``, ``asgrad``, ``hogwild``, ...).
      num_nodes: data nodes (workers); server-based algorithms add their server.
      learning_rate: the step size.
      topology: graph of the decentralized algorithms (``ring``, ``directed_ring``, ``exponential``,
        ``complete``, ``star``, ``torus``; ``tree`` for R-FAST's out-tree / in-tree pair).
      **options: passed on to the factory (``policy="shuffled"``, ``density=0.01``, ...).
    """
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(BUILDERS)}") from None
    return builder(num_nodes, learning_rate, topology, **options)
