# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Helpers shared by the algorithm modules (private: algorithms import this module, not its names).

Factory-time checks raise with the algorithm's name first (``"dpsgd: ..."``), so an error names the
factory the user called:

* :func:`local_optimizer`: exactly one of ``learning_rate`` / ``optimizer`` (/ ``schedule``), as an
  Optax transformation (``learning_rate=lr`` means ``optax.sgd(lr)``);
* :func:`positive_int`, :func:`check_graph`.

Traced helpers (inside handlers) keep every array in the dtypes of the model's parameters, so handler
outputs have the same structure, shapes and dtypes on every call:

* :func:`gradient` (the user's ``grad_fn``, checked against the parameters), :func:`cast_like`,
  :func:`update`, :func:`descend` for local optimizer steps;
* :func:`flat32` for float32 views of the ravelled model (shared buffers, agreement vectors);
* :func:`stack`, :func:`outbox` for per-out-slot payloads.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib

PyTree = Any


# ----------------------------------------------------------------------------------------
# Factory-time checks.


def local_optimizer(
    name: str,
    *,
    learning_rate: float | None,
    optimizer: optax.GradientTransformation | None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    takes_schedule: bool = False,
) -> optax.GradientTransformation:
    """The local step of algorithm ``name`` from exactly one of its step-size arguments.

    Args:
      name: the factory's name, first in every error message.
      learning_rate: a positive finite number: ``optax.sgd(learning_rate)``.
      optimizer: any Optax transformation, returned as it is.
      schedule: a step-size schedule ``count -> step``: ``optax.sgd(schedule)`` (only for factories
        with a ``schedule`` argument).
      takes_schedule: whether the factory has a ``schedule`` argument (named in the error message).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: not exactly one argument given, or a learning rate that is not positive and finite.
      TypeError: a learning rate that is not a real number, an optimizer that is not an Optax
        transformation, or a schedule that is not callable.
    """
    given = {"learning_rate": learning_rate, "optimizer": optimizer}
    if takes_schedule:
        given["schedule"] = schedule
    passed = [k for k, v in given.items() if v is not None]
    if len(passed) != 1:
        options = sorted(given)
        choices = ", ".join(options[:-1]) + f" and {options[-1]}"
        got = "neither" if not passed else " and ".join(passed)
        raise ValueError(f"{name}: pass exactly one of {choices} (got {got}).")
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{name}: optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
            )
        return optimizer
    if schedule is not None:
        if not callable(schedule):
            raise TypeError(
                f"{name}: schedule must be callable as schedule(count) -> step size, "
                f"got {type(schedule).__name__}."
            )
        return optax.sgd(schedule)
    check_learning_rate(name, learning_rate)
    return optax.sgd(learning_rate)


def check_learning_rate(name: str, learning_rate: Any) -> float:
    """Returns ``learning_rate`` as a float; raises unless it is a positive finite real number."""
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise TypeError(f"{name}: learning_rate must be a float, got {type(learning_rate).__name__}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"{name}: learning_rate must be positive and finite, got {learning_rate}.")
    return float(learning_rate)


def positive_int(name: str, what: str, value: Any) -> int:
    """Returns ``value`` as an int; TypeError unless an int (not a bool), ValueError unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: {what} must be a positive int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name}: {what} must be a positive int, got {value!r}.")
    return int(value)


def check_graph(name: str, graph: Any, what: str = "graph") -> topology_lib.Graph:
    """Returns ``graph``; TypeError naming argument ``what`` unless it is a ``topology.Graph``."""
    if not isinstance(graph, topology_lib.Graph):
        raise TypeError(f"{name}: {what} must be a jaxasync.topology.Graph, got {type(graph).__name__}.")
    return graph


# ----------------------------------------------------------------------------------------
# Traced helpers.


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` with every leaf converted to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda t, p: jnp.asarray(t, jnp.result_type(p)), tree, like)


def gradient(grad_fn: Callable[[PyTree, PyTree], PyTree], params: PyTree, batch: PyTree) -> PyTree:
    """``grad_fn(params, batch)``, checked to match ``params`` and cast to their dtypes.

    Raises:
      TypeError: the gradient's tree structure or leaf shapes differ from the parameters'.
    """
    g = grad_fn(params, batch)
    program_lib.check_tree_match(params, g, "grad_fn(params, batch)")
    return cast_like(g, params)


def update(
    opt: optax.GradientTransformation, grad: PyTree, opt_state: PyTree, params: PyTree, **extra_args
) -> tuple[PyTree, PyTree]:
    """``opt.update`` of ``grad`` at ``params``; gradient and updates in the params' dtypes."""
    updates, opt_state = opt.update(cast_like(grad, params), opt_state, params, **extra_args)
    return cast_like(updates, params), opt_state


def descend(
    opt: optax.GradientTransformation, direction: PyTree, opt_state: PyTree, params: PyTree, **extra_args
) -> tuple[PyTree, PyTree]:
    """``params + opt.update(direction)`` in the params' dtypes, and the new optimizer state.

    ``extra_args`` (such as ``delay=tau``) go to ``opt.update`` (a
    ``GradientTransformationExtraArgs``).
    """
    updates, opt_state = opt.update(cast_like(direction, params), opt_state, params, **extra_args)
    return cast_like(optax.apply_updates(params, updates), params), opt_state


def flat32(tree: PyTree) -> jax.Array:
    """The ravelled pytree as one float32 vector."""
    return jax.flatten_util.ravel_pytree(tree)[0].astype(jnp.float32)


def stack(tree: PyTree, k: int) -> PyTree:
    """``k`` copies of every leaf along a new leading axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *jnp.shape(x))), tree)


def outbox(payload: PyTree, mask: jax.Array) -> program_lib.Outbox:
    """An outbox from per-out-slot payloads; a node-free graph (no out-slots) gets one dead slot."""
    if mask.shape[0] == 0:
        payload = jax.tree.map(lambda p: jnp.zeros((1, *p.shape[1:]), p.dtype), payload)
        mask = jnp.zeros((1,), bool)
    return program_lib.Outbox(payload, mask)


def masked_broadcast(payload: PyTree, mask: jax.Array) -> program_lib.BroadcastOutbox:
    """One ``payload`` on the out-slots where ``mask`` is True (written once, not once per slot);
    a node-free graph (no out-slots) gets one dead slot."""
    if mask.shape[0] == 0:
        mask = jnp.zeros((1,), bool)
    return program_lib.BroadcastOutbox(payload, mask)
