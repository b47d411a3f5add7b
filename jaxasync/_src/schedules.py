# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Step-size schedules: constant, 1/t decay and delay-adaptive.

`constant` and `inverse_time` return Optax-style schedules ``count -> step``.
`delay_adaptive` returns ``(count, delay) -> step``: the step for an update whose
gradient is ``delay`` server iterations stale. All are jit-able and return
float32 scalars (arrays when ``count`` / ``delay`` are arrays).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["constant", "delay_adaptive", "inverse_time"]

Schedule = Callable[[jax.Array], jax.Array]


def constant(learning_rate: float) -> Schedule:
    """The schedule ``count -> learning_rate``.

    Example:
      >>> float(constant(0.1)(7))
      0.10000000149011612
    """

    def schedule(count):
        return jnp.full(jnp.shape(count), learning_rate, jnp.float32)

    return schedule


def inverse_time(beta: float, mu: float, t0: float) -> Schedule:
    r"""The strongly convex ``1/t`` schedule.

    .. math::
        \eta_t = \frac{\beta}{\mu (t + t_0)} .

    With ``beta >= 1`` (e.g. 2) and ``t0 >= 2 beta L / mu`` the first step is at
    most ``1/(2L)``, and SGD reaches the optimal ``O(sigma^2 / (mu^2 t))`` rate.

    Args:
      beta: numerator, > 0.
      mu: strong-convexity constant, > 0.
      t0: offset, > 0.

    Returns:
      ``count -> beta / (mu * (count + t0))``.

    Example:
      >>> float(inverse_time(2.0, 0.5, 4.0)(0))
      1.0
    """
    for name, value in (("beta", beta), ("mu", mu), ("t0", t0)):
        if not value > 0:
            raise ValueError(f"inverse_time needs {name} > 0, got {value}.")

    def schedule(count):
        return (beta / (mu * (jnp.asarray(count, jnp.float32) + t0))).astype(jnp.float32)

    return schedule


def delay_adaptive(
    learning_rate: float | Schedule,
    n: int,
    smoothness: float | None = None,
    threshold: float | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    r"""Delay-adaptive step of asynchronous SGD: full step unless the gradient is very stale.

    With ``gamma = learning_rate(count)`` and ``tau = delay``:

    .. math::
        \gamma_t = \begin{cases}
          \gamma & \tau \le \tau_C \ (= 2n \text{ by default}) \\
          \min\big(\gamma, \tfrac{1}{4 L \tau}\big) & \tau > \tau_C,\ L \text{ known} \\
          \gamma \, \tau_C / \tau & \tau > \tau_C,\ L \text{ unknown.}
        \end{cases}

    The first two cases are the rule of Mishchenko et al. (2022) *as recalled from
    memory, not checked against the paper* (see ALGORITHMS.md §6 and §9.6). The
    third is this library's choice when ``L`` is unknown: it is continuous at
    ``tau_C``, decays like ``1/tau`` as the ``L`` rule does, and equals the ``L``
    rule when ``gamma = 1 / (4 L tau_C)`` (``1/(8nL)`` for the default threshold).

    Args:
      learning_rate: the base step ``gamma``, a float or a schedule ``count -> gamma``.
      n: number of workers (concurrent jobs).
      smoothness: the smoothness constant ``L`` if known.
      threshold: the delay ``tau_C`` up to which the full step is used (default ``2n``).

    Returns:
      ``(count, delay) -> step`` (float32).

    Example:
      >>> step = delay_adaptive(0.1, n=4)
      >>> float(step(0, 8)), float(step(0, 16))
      (0.10000000149011612, 0.05000000074505806)

    References:
      Mishchenko, Bach, Even and Woodworth, "Asynchronous SGD beats minibatch SGD
      under arbitrary delays", NeurIPS 2022 (arXiv:2206.07638).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"delay_adaptive needs a positive int n (workers), got {n!r}.")
    if smoothness is not None and not smoothness > 0:
        raise ValueError(f"delay_adaptive needs smoothness L > 0, got {smoothness}.")
    tau_c = 2.0 * n if threshold is None else float(threshold)
    if not tau_c > 0:
        raise ValueError(f"delay_adaptive needs threshold > 0, got {threshold}.")
    base = learning_rate if callable(learning_rate) else constant(learning_rate)

    def schedule(count, delay):
        gamma = jnp.asarray(base(count), jnp.float32)
        tau = jnp.maximum(jnp.asarray(delay, jnp.float32), 1.0)  # no division by 0 below
        if smoothness is None:
            stale = gamma * (tau_c / tau)
        else:
            stale = jnp.minimum(gamma, 1.0 / (4.0 * smoothness * tau))
        return jnp.where(jnp.asarray(delay) <= tau_c, gamma, stale).astype(jnp.float32)

    return schedule
