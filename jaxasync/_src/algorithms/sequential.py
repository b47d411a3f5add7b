# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Sequential SGD: the no-communication baseline.

References:
  Robbins and Monro, "A stochastic approximation method", Ann. Math. Statist. 1951.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxasync._src import program as program_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = ["SgdState", "sgd"]


class SgdState(NamedTuple):
    """State of one node of :func:`sgd`.

    Attributes:
      node: int32 node id.
      params: the node's model.
      opt_state: its optimizer state.
      count: int32, local steps taken.
    """

    node: jax.Array
    params: PyTree
    opt_state: PyTree
    count: jax.Array


def sgd(
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> program_lib.NodeProgram:
    r"""Sequential SGD: each node runs its own optimizer on its own data, with no communication.

    .. math::
        x \leftarrow x + \mathrm{opt}(\nabla F(x; \xi)) \quad (= x - \eta \nabla F(x; \xi)
        \text{ with } \texttt{learning\_rate}).

    ``evaluate`` is node 0's model, so a one-node problem (or node 0 of a larger one) is a plain
    sequential run on node 0's data; the other nodes are independent replicas, useful as extra
    seeds. Run it on a one-shard problem holding the full data set for the classic baseline.

    Args:
      learning_rate: constant step ``eta`` (``optax.sgd``); or
      optimizer: any Optax transformation.

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram` for any number of nodes.

    Raises:
      ValueError: not exactly one of ``learning_rate`` / ``optimizer``, or a learning rate that is
        not positive and finite.
      TypeError: a learning rate that is not a number, or an optimizer that is not an Optax one.

    Example:
      >>> prog = sgd(learning_rate=0.1)
      >>> state = prog.init(0, jnp.ones(2), None)
      >>> state, _ = prog.step(state, lambda x, b: x, None, None)  # gradient of |x|^2 / 2
      >>> prog.params(state).tolist()
      [0.8999999761581421, 0.8999999761581421]
      >>> trace = jaxasync.simulate(prog, one_shard_problem, steps=1000)      # doctest: +SKIP

    References:
      Robbins and Monro, "A stochastic approximation method", Ann. Math. Statist. 1951.
    """
    name = "sgd"
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)

    def init(node, params, key):
        del key  # deterministic
        return SgdState(jnp.asarray(node, jnp.int32), params, opt.init(params), jnp.zeros((), jnp.int32))

    def step(state, grad_fn, batch, key):
        del key  # the batch is the only randomness
        params, opt_state = base.descend(
            opt, base.gradient(grad_fn, state.params, batch), state.opt_state, state.params
        )
        return SgdState(state.node, params, opt_state, state.count + 1), program_lib.Emit()

    def evaluate(states, views):
        del views  # no shared objects
        return jax.tree.map(lambda x: x[0], states.params)

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.params,
        evaluate=evaluate,
    )
