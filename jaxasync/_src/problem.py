"""Optimization problems: a user loss, initial parameters and one data shard per node.

The objective is ``f(x) = (1/n) sum_i f_i(x)`` with ``f_i(x) = loss_fn(x, shard_i)``. Executors draw
minibatches of node ``i`` with :meth:`Problem.sample` (a pure function of a key and a possibly traced
node id) and evaluate the model with :meth:`Problem.loss` and :meth:`Problem.grad_norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Problem:
    """A finite-sum problem split across nodes.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, any JAX function; ``batch`` is a pytree of arrays
        whose leaves share a leading example axis (the structure of one shard).
      init_params: the initial parameters (a pytree of arrays).
      data: one pytree of arrays per node; shards may differ in size but not in structure.
      batch_size: examples per stochastic gradient, drawn with replacement from the node's shard;
        None uses the node's whole shard (a full local gradient).
      optimum: optional known minimiser ``x*`` (enables the optimality gap metric).
      name: a short name for tables and traces.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> shards = [{"a": np.ones((4, 2), np.float32), "b": np.ones((4,), np.float32)}] * 2
      >>> loss = lambda x, d: jnp.mean((d["a"] @ x - d["b"]) ** 2)
      >>> p = Problem(loss, jnp.zeros(2), shards, batch_size=2)
      >>> p.num_nodes
      2
    """

    def __init__(
        self,
        loss_fn: Callable[[PyTree, PyTree], jax.Array],
        init_params: PyTree,
        data: Sequence[PyTree],
        batch_size: int | None = None,
        optimum: PyTree | None = None,
        name: str = "problem",
    ):
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(params, batch)")
        if isinstance(data, dict) or not isinstance(data, Sequence) or len(data) == 0:
            raise ValueError("data must be a non-empty list with one pytree of arrays per node")
        structure = jax.tree.structure(data[0])
        sizes = []
        for i, shard in enumerate(data):
            if jax.tree.structure(shard) != structure:
                raise ValueError(
                    f"shard {i} has structure {jax.tree.structure(shard)}, shard 0 has {structure}"
                )
            leaves = [np.asarray(x) for x in jax.tree.leaves(shard)]
            if not leaves:
                raise ValueError(f"shard {i} has no arrays")
            lengths = {x.shape[0] if x.ndim else -1 for x in leaves}
            if len(lengths) != 1 or -1 in lengths:
                raise ValueError(
                    f"shard {i}: every leaf needs the same leading example axis, got "
                    f"lengths {sorted(lengths)}"
                )
            first = jax.tree.leaves(data[0])
            for a, b in zip(first, leaves):
                if np.shape(a)[1:] != b.shape[1:]:
                    raise ValueError(
                        f"shard {i}: example shape {b.shape[1:]} differs from shard 0's {np.shape(a)[1:]}"
                    )
            (length,) = lengths
            if length == 0:
                raise ValueError(f"shard {i} is empty")
            sizes.append(length)
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")

        self.loss_fn = loss_fn
        self.init_params = jax.tree.map(jnp.asarray, init_params)
        self.shards = [jax.tree.map(jnp.asarray, s) for s in data]
        self.sizes = np.asarray(sizes, np.int32)
        self.batch_size = batch_size
        self.optimum = None if optimum is None else jax.tree.map(jnp.asarray, optimum)
        self.name = name
        self.grad_fn = jax.grad(loss_fn)
        # Shards padded to one array per leaf so a traced node id can index them.
        longest = int(self.sizes.max())
        self._stacked = jax.tree.map(
            lambda *xs: jnp.stack(
                [jnp.pad(x, [(0, longest - x.shape[0])] + [(0, 0)] * (x.ndim - 1)) for x in xs]
            ),
            *self.shards,
        )
        self._equal = bool(np.all(self.sizes == longest))
        if batch_size is None and not self._equal:
            # A traced node id must give one batch shape: full local gradients need equal shards.
            raise ValueError(
                f"batch_size=None (full local gradients) needs equal shard sizes, got "
                f"{self.sizes.tolist()}; pass a batch_size"
            )
        self.f_star = None if self.optimum is None else float(self.loss(self.optimum))

    @property
    def num_nodes(self) -> int:
        return len(self.shards)

    def sample(self, key: jax.Array, node: jax.Array) -> PyTree:
        """A minibatch of node ``node`` (traced or not): ``batch_size`` rows drawn with replacement,
        or the whole shard if ``batch_size`` is None."""
        if self.batch_size is None:
            return jax.tree.map(lambda x: x[node], self._stacked)
        size = jnp.asarray(self.sizes)[node]
        idx = jax.random.randint(key, (self.batch_size,), 0, size)
        return jax.tree.map(lambda x: x[node, idx], self._stacked)

    def node_loss(self, params: PyTree, node: int) -> jax.Array:
        """``f_i(params)`` on node ``node``'s whole shard."""
        return self.loss_fn(params, self.shards[node])

    def loss(self, params: PyTree) -> jax.Array:
        """``f(params) = (1/n) sum_i f_i(params)``."""
        if self._equal:  # one vectorized loss instead of n unrolled ones (much faster to compile)
            return jnp.mean(jax.vmap(self.loss_fn, in_axes=(None, 0))(params, self._stacked))
        return sum(self.loss_fn(params, s) for s in self.shards) / self.num_nodes

    def grad_norm(self, params: PyTree) -> jax.Array:
        """``||grad f(params)||``."""
        g = jax.grad(self.loss)(params)
        return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))

    def __repr__(self) -> str:
        return (
            f"Problem({self.name!r}, nodes={self.num_nodes}, sizes={self.sizes.tolist()}, "
            f"batch_size={self.batch_size})"
        )
