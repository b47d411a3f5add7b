# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Asynchronous SGD on one shared parameter buffer: Hogwild! and sparsified SGD (Elastic Consistency).

Both algorithms are node programs (see :mod:`jaxasync._src.program`) over a shared
:class:`~jaxasync._src.program.Buffer` named ``"params"`` that holds the model. A worker keeps the
view ``v`` it read after its previous write (``observe``), computes its next stochastic gradient at
``v`` (``step``) and adds its update to the buffer without any lock. Other workers' updates that land
between the read and the write make ``v`` stale; in real processes the view can also mix old and
new coordinates. The model an observer evaluates is the buffer itself.

Elastic consistency (Nadiradze et al.) measures how far a worker's view is from the *virtual*
sequence ``x_{t+1} = x_t - eta g_t`` a perfectly consistent system would hold. With
``track_consistency=True``, :func:`sparsified_sgd` keeps the virtual sequence in a second shared
buffer ``"virtual"`` (every step adds its intended update there) and each worker measures
``||x_t - v_t|| / eta`` for its own gradients, where ``x_t`` is the virtual model just before its
update is applied. The trace then reports the empirical elastic constant ``elastic_b_max`` and its
mean ``elastic_b_mean``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from jaxasync._src import compression as compression_lib
from jaxasync._src import program as program_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = ["HogwildState", "SparsifiedSGDState", "hogwild", "sparsified_sgd"]

_METHODS = ("topk", "randk")


class HogwildState(NamedTuple):
    """State of one Hogwild! worker.

    Attributes:
      node: int32 node id.
      count: int32 number of updates this worker applied.
      view: the parameters read from the shared buffer (in the parameters' dtypes).
      opt_state: state of the local optimizer.
    """

    node: jax.Array
    count: jax.Array
    view: PyTree
    opt_state: PyTree


class SparsifiedSGDState(NamedTuple):
    """State of one sparsified asynchronous SGD worker.

    Attributes:
      node: int32 node id.
      count: int32 number of updates this worker applied.
      view: the parameters read from the shared buffer (in the parameters' dtypes).
      opt_state: state of the local optimizer.
      residual: float32 ``[d]`` error-feedback accumulator ``e`` (zeros without error feedback).
      virtual_ref: float32 ``[d]`` (``[0]`` without tracking): ``v + w`` where ``w`` is what the last
        step added to the virtual buffer, so that ``x_t - v = virtual_now - virtual_ref``.
      b_max: float32 largest ``||x_t - v_t|| / eta`` measured by this worker.
      b_sum: float32 sum of the measured ``||x_t - v_t|| / eta``.
      b_count: int32 number of measurements.
    """

    node: jax.Array
    count: jax.Array
    view: PyTree
    opt_state: PyTree
    residual: jax.Array
    virtual_ref: jax.Array
    b_max: jax.Array
    b_sum: jax.Array
    b_count: jax.Array


def _buffer_view(views) -> PyTree:
    return views["params"]


def hogwild(
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> program_lib.NodeProgram:
    r"""Hogwild!: lock-free asynchronous SGD on one shared parameter buffer.

    Worker ``p`` repeats, without any lock or barrier:

    .. math::
        v \leftarrow X \ (\text{read}), \qquad g = \nabla F(v; \xi), \qquad
        (u, s_p) = \mathrm{opt.update}(g, s_p, v), \qquad X \leftarrow X + u .

    With ``learning_rate`` the update is ``u = -learning_rate * g``. Updates of other workers that
    land between the read and the write make ``v`` stale (the simulator reports the staleness). One
    worker reproduces the plain Optax trajectory exactly.

    Args:
      learning_rate: step size of plain SGD (``optax.sgd``).
      optimizer: an Optax optimizer for the local update instead (each worker keeps its own state).

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram` with a shared buffer ``"params"``; the evaluated
      model is the buffer.

    Raises:
      ValueError: unless exactly one of ``learning_rate`` and ``optimizer`` is given, or if
        ``learning_rate`` is not positive.
      TypeError: if ``optimizer`` is not an ``optax.GradientTransformation``.

    Example:
      >>> from jaxasync._src.algorithms import shared_memory
      >>> prog = shared_memory.hogwild(learning_rate=0.05)
      >>> prog.name, sorted(prog.shared)
      ('hogwild', ['params'])

    References:
      Recht, Re, Wright and Niu, "Hogwild!: A Lock-Free Approach to Parallelizing Stochastic
      Gradient Descent", NeurIPS 2011.
    """
    name = "hogwild"
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)

    def init(node, params, key):
        del key  # Hogwild is deterministic given the minibatches
        return HogwildState(
            node=jnp.asarray(node, jnp.int32),
            count=jnp.int32(0),
            view=params,
            opt_state=opt.init(params),
        )

    def step(state, grad_fn, batch, key):
        del key  # no randomness beyond the minibatch
        g = base.gradient(grad_fn, state.view, batch)
        updates, opt_state = opt.update(g, state.opt_state, state.view)
        state = state._replace(count=state.count + 1, opt_state=opt_state)
        return state, program_lib.Emit(ops={"params": program_lib.BufferAdd(updates)})

    def observe(state, views):
        # The shared buffer is float32; the worker computes in the model's own dtypes.
        return state._replace(view=base.cast_like(_buffer_view(views), state.view))

    def evaluate(states, views):
        del states  # the model is the shared buffer
        return _buffer_view(views)

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda state: state.view,
        shared={"params": program_lib.Buffer()},
        observe=observe,
        evaluate=evaluate,
        needs_shared_memory=True,
        crash_tolerant=True,
    )


def sparsified_sgd(
    *,
    density: float,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    method: str = "topk",
    error_feedback: bool = True,
    scale: bool = False,
    track_consistency: bool = False,
) -> program_lib.NodeProgram:
    r"""Sparsified asynchronous shared-memory SGD, with or without error feedback.

    Worker ``p`` repeats, without any lock (``C`` = top-k or rand-k keeping ``k = ceil(density d)``
    of the ``d`` coordinates of the ravelled model):

    .. math::
        v \leftarrow X, \quad g = \nabla F(v; \xi), \quad (u, s_p) = \mathrm{opt.update}(g, s_p, v),

    .. math::
        \text{with EF:}\ a = e_p + u,\ \Delta = C(a),\ e_p \leftarrow a - \Delta; \qquad
        \text{without EF:}\ \Delta = C(u); \qquad X \leftarrow X + \Delta

    (``u = -eta g`` for plain SGD). ``Delta`` is applied as a
    :class:`~jaxasync._src.program.BufferAddSparse` of its ``k`` entries, so a shared-memory runtime
    touches only ``k`` coordinates. With error feedback ``sum_t Delta_t + e_p = sum_t u_t`` for each
    worker (nothing is lost, only delayed); at ``density=1`` the algorithm is Hogwild!.

    Elastic consistency (``track_consistency=True``): a second buffer ``"virtual"`` receives every
    step's intended update ``w`` (the dense ``u`` with error feedback; ``Delta`` without, whose
    virtual sequence is ``x_{t+1} = x_t + C(u_t)``). Each worker measures, for each of its
    gradients, ``||x_t - v_t||_2 / eta`` with ``x_t`` the virtual model just before its update and
    ``v_t`` the view the gradient was computed at; ``eta`` is ``learning_rate`` (1 with an
    ``optimizer``). The program's metrics report their max ``elastic_b_max`` and mean
    ``elastic_b_mean``. This doubles the buffer traffic and, in the simulator, counts two buffer
    updates per step in the staleness statistics; leave it off for timing runs.

    Args:
      density: fraction of coordinates applied per step, in ``(0, 1]``.
      learning_rate: step size of plain SGD (``optax.sgd``).
      optimizer: an Optax optimizer for the local update instead.
      method: ``"topk"`` (largest magnitudes) or ``"randk"`` (uniformly random coordinates).
      error_feedback: keep the unapplied remainder in ``e_p`` and add it to the next update.
      scale: rand-k only: multiply the kept entries by ``d / k`` (unbiased; not with error feedback).
      track_consistency: measure the elastic-consistency constant (see above).

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram` with shared buffers ``"params"`` (and
      ``"virtual"`` when tracking); the evaluated model is ``"params"``.

    Raises:
      ValueError: for a density outside ``(0, 1]``, an unknown method, ``scale`` with top-k or with
        error feedback, or unless exactly one of ``learning_rate``
        and ``optimizer`` is given.
      TypeError: for a non-float density or a non-Optax optimizer.

    Example:
      >>> from jaxasync._src.algorithms import shared_memory
      >>> prog = shared_memory.sparsified_sgd(density=0.1, learning_rate=0.05,
      ...                                     track_consistency=True)
      >>> sorted(prog.shared)
      ['params', 'virtual']

    References:
      Nadiradze, Markov, Chatterjee, Kungurtsev and Alistarh, "Elastic Consistency: A Practical
      Consistency Model for Distributed Stochastic Gradient Descent", AAAI 2021 (arXiv:2001.05918);
      Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
    """
    name = "sparsified_sgd"
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    compression_lib.k_from_density(1, density)  # validates density (TypeError / ValueError)
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}.")
    if scale and method != "randk":
        raise ValueError(f"{name}: scale=True only applies to method='randk'.")
    if scale and error_feedback:
        raise ValueError(
            f"{name}: scaled rand-k is not a contraction; do not combine scale=True with error_feedback=True."
        )
    eta = float(learning_rate) if learning_rate is not None else 1.0

    def compress(a, key):
        k = compression_lib.k_from_density(a.size, density)
        if method == "topk":
            return compression_lib.top_k(a, k)
        return compression_lib.rand_k(a, k, key, scale)

    def init(node, params, key):
        del key  # workers start from the shared initial model
        d = base.flat32(params).size
        return SparsifiedSGDState(
            node=jnp.asarray(node, jnp.int32),
            count=jnp.int32(0),
            view=params,
            opt_state=opt.init(params),
            residual=jnp.zeros((d,), jnp.float32),
            virtual_ref=jnp.zeros((d if track_consistency else 0,), jnp.float32),
            b_max=jnp.float32(0),
            b_sum=jnp.float32(0),
            b_count=jnp.int32(0),
        )

    def step(state, grad_fn, batch, key):
        g = base.gradient(grad_fn, state.view, batch)
        updates, opt_state = opt.update(g, state.opt_state, state.view)
        u = base.flat32(updates)
        if error_feedback:
            sent, residual, sparse = compression_lib.ef_compress(
                state.residual, u, lambda a: compress(a, key), has_aux=True
            )
        else:
            (sent, sparse), residual = compress(u, key), state.residual
        ops = {"params": program_lib.BufferAddSparse(sparse.indices, sparse.values)}
        virtual_ref = state.virtual_ref
        if track_consistency:
            intended = u if error_feedback else sent
            unravel = jax.flatten_util.ravel_pytree(state.view)[1]
            ops["virtual"] = program_lib.BufferAdd(unravel(intended))
            virtual_ref = base.flat32(state.view) + intended
        state = state._replace(
            count=state.count + 1,
            opt_state=opt_state,
            residual=residual,
            virtual_ref=virtual_ref,
        )
        return state, program_lib.Emit(ops=ops)

    def observe(state, views):
        view = base.cast_like(_buffer_view(views), state.view)
        if not track_consistency:
            return state._replace(view=view)
        # x_t - v_t = (virtual now - own update) - v_t = virtual now - virtual_ref; nothing to
        # measure before the first step (the call right after init).
        b = jnp.linalg.norm(base.flat32(views["virtual"]) - state.virtual_ref) / eta
        measured = state.count > state.b_count
        return state._replace(
            view=view,
            b_max=jnp.where(measured, jnp.maximum(state.b_max, b), state.b_max),
            b_sum=jnp.where(measured, state.b_sum + b, state.b_sum),
            b_count=jnp.where(measured, state.b_count + 1, state.b_count),
        )

    def evaluate(states, views):
        del states  # the model is the shared buffer
        return _buffer_view(views)

    def metrics(states):
        return {
            "elastic_b_max": jnp.max(states.b_max),
            "elastic_b_mean": jnp.sum(states.b_sum) / jnp.maximum(jnp.sum(states.b_count), 1),
        }

    shared = {"params": program_lib.Buffer()}
    if track_consistency:
        shared["virtual"] = program_lib.Buffer()
    return program_lib.NodeProgram(
        name=name if error_feedback else f"{name}_no_ef",
        init=init,
        step=step,
        params=lambda state: state.view,
        shared=shared,
        observe=observe,
        evaluate=evaluate,
        metrics=metrics if track_consistency else None,
        needs_shared_memory=True,
        crash_tolerant=True,
    )
