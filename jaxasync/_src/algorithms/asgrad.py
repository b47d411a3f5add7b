# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Server-based asynchronous SGD with job assignment: pure, random, shuffled (AsGrad).

Layout of the node program (``n = num_workers + 1`` nodes):

* nodes ``0 .. num_workers - 1`` are the **workers**; worker ``i`` reads data shard ``i`` and its id is
  also the worker index the assignment policy uses;
* node ``num_workers`` (the last one) is the **server**, a data-less node (``num_servers = 1``): it
  never computes (``ready`` is always False) and owns the model ``x_t``.

So the problem has one shard per worker, and executors add the server node. Per-node asynchrony
sequences need ``num_workers + 1`` entries: the server's compute time is unused and its message delay
is the job-download delay.

Channels: ``"job"`` (server -> every worker; payload: the snapshot ``x_a`` and its iteration ``a``) and
``"grad"`` (every worker -> server; payload: the gradient and the ``a`` of the job it came from).

References:
  Islamov, Safaryan and Alistarh, "AsGrad: a sharp unified analysis of asynchronous-SGD algorithms",
  AISTATS 2024 (arXiv:2310.20452).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import assignment as assignment_lib
from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src import transforms as transforms_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = [
    "AsGradState",
    "asgrad",
    "delay_adaptive_asgd",
    "ps_asgd",
]


class AsGradState(NamedTuple):
    """State of one node of :func:`asgrad` (server fields are unused on workers and vice versa).

    Attributes:
      node: int32 node id.
      params: the server's model ``x_t`` (workers keep ``x_0``, unused).
      opt_state: the server optimizer's state.
      count: int32 server iteration ``t`` (gradients applied).
      assign: the server's :class:`~jaxasync._src.assignment.AssignmentState`.
      jobs: int32 ``[num_workers]``: jobs the server assigned to each worker (initial jobs excluded).
      delay_sum: int32, sum of the delays ``tau_t`` of the applied gradients.
      delay_max: int32, largest delay applied.
      queue: the worker's FIFO of job snapshots, leaves ``[capacity, ...]``.
      queue_iter: int32 ``[capacity]``, the iteration ``a`` each queued snapshot was assigned at.
      head: int32 index of the oldest queued job.
      size: int32 number of queued jobs.
      overflow: int32 jobs this worker dropped because its queue was full.
    """

    node: jax.Array
    params: PyTree
    opt_state: PyTree
    count: jax.Array
    assign: assignment_lib.AssignmentState
    jobs: jax.Array
    delay_sum: jax.Array
    delay_max: jax.Array
    queue: PyTree
    queue_iter: jax.Array
    head: jax.Array
    size: jax.Array
    overflow: jax.Array


def _job_payload(params: PyTree) -> PyTree:
    """A model-shaped pytree (snapshot or gradient) and an int32 iteration."""
    return program_lib.like_params(params), jax.ShapeDtypeStruct((), jnp.int32)


def asgrad(
    *,
    num_workers: int,
    policy: str = "pure",
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    staleness: optax.GradientTransformationExtraArgs | None = None,
    queue_capacity: int | None = None,
) -> program_lib.NodeProgram:
    r"""Server-based asynchronous SGD with pure / random / shuffled job assignment (AsGrad).

    Each worker ``j`` keeps a FIFO of jobs ``(x_a, a)``. When it finishes the head job it sends
    ``g = grad f_j(x_a; xi)`` (its *own* data) and ``a`` to the server, which at iteration ``t`` does

    .. math::
        \tau_t = t - a, \qquad x_{t+1} = x_t + s(\tau_t)\,\mathrm{opt}(g)
        \quad (= x_t - \gamma g \text{ with } \texttt{learning\_rate}, s \equiv 1),

    then picks the worker ``k_t`` of the next job by ``policy`` and sends it ``(x_{t+1}, t + 1)``:

    * ``pure``: ``k_t = j`` (every worker always holds exactly one job; Downpour-style PS-ASGD);
    * ``random``: ``k_t ~ Uniform{0..n-1}`` (queues grow and shrink);
    * ``shuffled``: a fresh permutation per block of ``n`` jobs, so each worker gets one job per block;
    * ``shuffle_once``: one permutation reused for every block.

    At start every worker holds one job at ``x_0``. Exactly ``num_workers`` jobs exist at any time
    (queued, running, or in flight as a gradient or a job message: each applied gradient creates
    one), so a queue never holds more than ``num_workers`` jobs: that is the default capacity (1 for
    ``pure``). A smaller ``queue_capacity`` saves memory; a job arriving at a full queue is dropped
    and counted in ``queue_overflow`` (the system then has one job fewer).

    Nodes ``0 .. num_workers - 1`` are workers (shard ``i`` of a problem with ``num_workers`` shards),
    node ``num_workers`` is the data-less server. ``evaluate`` is the server's model. Metrics:
    ``staleness_mean`` / ``staleness_max`` (the delays ``tau_t`` the server applied), ``jobs_min`` /
    ``jobs_max`` (jobs assigned per worker), ``queue_overflow``, ``server_iterations``.

    Args:
      num_workers: number of workers ``n >= 1``.
      policy: ``"pure"``, ``"random"``, ``"shuffled"`` or ``"shuffle_once"``.
      learning_rate: constant step ``gamma`` (plain SGD on the server); or
      optimizer: any Optax transformation for the server's update (called with ``delay=tau`` if it
        takes extra args).
      staleness: an optional delay-aware transformation chained *after* the optimizer (receives
        ``delay=tau``), e.g. :func:`jaxasync._src.transforms.scale_by_staleness`.
      queue_capacity: jobs a worker's queue holds (default ``num_workers``, 1 for ``pure``).

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram` with ``num_nodes = num_workers + 1``.

    Raises:
      ValueError: an unknown ``policy``, ``num_workers`` or ``queue_capacity`` below 1, not exactly
        one of ``learning_rate`` / ``optimizer``, or a learning rate that is not positive and finite.
      TypeError: a non-int ``num_workers`` or ``queue_capacity``, a learning rate that is not a
        number, or an optimizer that is not an Optax one.

    Example:
      >>> import jaxasync as ja
      >>> prog = asgrad(num_workers=4, policy="shuffled", learning_rate=0.05)
      >>> prog.num_nodes, prog.num_servers
      (5, 1)
      >>> speeds = ja.fixed([1.0, 2.0, 3.0, 4.0, 1.0])  # 4 workers, then the server (unused)
      >>> problem = ja.Problem(loss, x0, four_shards, batch_size=8)  # doctest: +SKIP
      >>> trace = ja.simulate(prog, problem, ja.Asynchrony(compute_time=speeds), steps=2000)  # doctest: +SKIP

    References:
      Islamov, Safaryan and Alistarh, "AsGrad: a sharp unified analysis of asynchronous-SGD
      algorithms", AISTATS 2024 (arXiv:2310.20452).
    """
    name = "asgrad"
    num_workers = base.positive_int(name, "num_workers", num_workers)
    policy_fn = assignment_lib.assignment_policy(policy)  # ValueError on an unknown name
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    if staleness is not None:
        # After the optimizer: it scales the step (a factor before Adam-like rules would cancel).
        opt = optax.chain(opt, staleness)
    opt = optax.with_extra_args_support(opt)
    if queue_capacity is None:
        queue_capacity = 1 if policy == "pure" else num_workers
    cap = base.positive_int(name, "queue_capacity", queue_capacity)
    n, server = num_workers + 1, num_workers

    jobs_adj = np.zeros((n, n), bool)
    jobs_adj[server, :server] = True
    job_ch = program_lib.Channel(topology_lib.Graph(jobs_adj, name="jobs"), _job_payload)
    grad_ch = program_lib.Channel(topology_lib.Graph(jobs_adj.T.copy(), name="grads"), _job_payload)

    def init(node, params, key):
        node = jnp.asarray(node, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        return AsGradState(
            node=node,
            params=params,
            opt_state=opt.init(params),
            count=zero,
            assign=policy_fn.init(key, num_workers),
            jobs=jnp.zeros((num_workers,), jnp.int32),
            delay_sum=zero,
            delay_max=zero,
            # The server cannot send at init: the first job (x_0, 0) starts in each worker's queue.
            queue=base.stack(params, cap),
            queue_iter=jnp.zeros((cap,), jnp.int32),
            head=zero,
            size=(node < server).astype(jnp.int32),
            overflow=zero,
        )

    def step(state, grad_fn, batch, key):
        del key  # the batch is the only randomness of a worker's job
        snapshot = jax.tree.map(lambda q: q[state.head], state.queue)
        g = base.gradient(grad_fn, snapshot, batch)
        out = program_lib.BroadcastOutbox((g, state.queue_iter[state.head]), jnp.ones((1,), bool))
        state = state._replace(head=(state.head + 1) % cap, size=state.size - 1)
        return state, program_lib.Emit(outbox={"grad": out})

    def receive_grad(state, msg):
        # Only the server receives gradients; msg.slot is the sender's worker id (sorted in-table).
        g, assigned_at = msg.payload
        delay = state.count - assigned_at
        params, opt_state = base.descend(opt, g, state.opt_state, state.params, delay=delay)
        worker, assign = policy_fn.assign(state.assign, msg.slot)
        count = state.count + 1
        out = program_lib.BroadcastOutbox((params, count), jnp.arange(num_workers) == worker)
        state = state._replace(
            params=params,
            opt_state=opt_state,
            count=count,
            assign=assign,
            jobs=state.jobs.at[worker].add(1),
            delay_sum=state.delay_sum + delay,
            delay_max=jnp.maximum(state.delay_max, delay),
        )
        return state, program_lib.Emit(outbox={"job": out})

    def receive_job(state, msg):
        snapshot, assigned_at = msg.payload
        fits = state.size < cap
        tail = (state.head + state.size) % cap
        queue = jax.tree.map(
            lambda q, x: q.at[tail].set(jnp.where(fits, x.astype(q.dtype), q[tail])),
            state.queue,
            snapshot,
        )
        state = state._replace(
            queue=queue,
            queue_iter=state.queue_iter.at[tail].set(jnp.where(fits, assigned_at, state.queue_iter[tail])),
            size=state.size + fits.astype(jnp.int32),
            overflow=state.overflow + (~fits).astype(jnp.int32),
        )
        return state, program_lib.Emit()

    def ready(state):
        return (state.node < server) & (state.size > 0)

    def evaluate(states, views):
        del views  # no shared objects: the model is the server's
        return jax.tree.map(lambda x: x[server], states.params)

    def metrics(states):
        count = states.count[server]
        jobs = states.jobs[server]
        return {
            "staleness_mean": states.delay_sum[server].astype(jnp.float32) / jnp.maximum(count, 1),
            "staleness_max": states.delay_max[server],
            "jobs_min": jnp.min(jobs),
            "jobs_max": jnp.max(jobs),
            "queue_overflow": jnp.sum(states.overflow),
            "server_iterations": count,
        }

    return program_lib.NodeProgram(
        name=f"{name}_{policy}",
        init=init,
        step=step,
        params=lambda s: s.params,
        channels={"job": job_ch, "grad": grad_ch},
        receive={"job": receive_job, "grad": receive_grad},
        ready=ready,
        evaluate=evaluate,
        metrics=metrics,
        num_nodes=n,
        num_servers=1,
    )


def ps_asgd(
    *,
    num_workers: int,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    staleness: optax.GradientTransformationExtraArgs | None = None,
) -> program_lib.NodeProgram:
    r"""Parameter-server asynchronous SGD (Downpour): :func:`asgrad` with ``policy="pure"``.

    The server applies each worker's stale gradient as it arrives, ``x <- x - gamma g_i(x_{t - tau})``,
    and the worker pulls the new model. See :func:`asgrad` for the node layout and arguments.

    References:
      Dean et al., "Large scale distributed deep networks", NeurIPS 2012.
    """
    return asgrad(
        num_workers=num_workers,
        policy="pure",
        learning_rate=learning_rate,
        optimizer=optimizer,
        staleness=staleness,
    )


def delay_adaptive_asgd(
    *,
    num_workers: int,
    learning_rate: float,
    smoothness: float | None = None,
) -> program_lib.NodeProgram:
    r"""Pure asynchronous SGD with the delay-adaptive step of Mishchenko et al. (2022).

    .. math::
        x_{t+1} = x_t - \gamma_t g_t, \qquad \gamma_t = \gamma \text{ if } \tau_t \le 2n \text{ else }
        \min(\gamma, 1/(4 L \tau_t)) \ (\gamma \min(1, 2n/\tau_t) \text{ if } L \text{ is unknown}).

    The rule (quoted from memory in ALGORITHMS.md section 6) is
    :func:`jaxasync._src.transforms.scale_by_staleness` chained after ``optax.sgd``.

    Args:
      num_workers: ``n``.
      learning_rate: the base step ``gamma``.
      smoothness: ``L`` if known.

    Returns:
      A node program (layout as in :func:`asgrad`).

    Raises:
      ValueError / TypeError: as :func:`asgrad` for ``num_workers`` and ``learning_rate`` (the rule
        is a step size of plain SGD, so there is no ``optimizer`` argument).

    References:
      Mishchenko, Bach, Even and Woodworth, "Asynchronous SGD beats minibatch SGD under arbitrary
      delays", NeurIPS 2022 (arXiv:2206.07638).
    """
    name = "delay_adaptive_asgd"
    num_workers = base.positive_int(name, "num_workers", num_workers)
    learning_rate = base.check_learning_rate(name, learning_rate)
    staleness = transforms_lib.scale_by_staleness(
        "delay_adaptive",
        num_workers=num_workers,
        smoothness=smoothness,
        learning_rate=None if smoothness is None else learning_rate,
    )
    prog = asgrad(
        num_workers=num_workers,
        policy="pure",
        learning_rate=learning_rate,
        staleness=staleness,
    )
    return dataclasses.replace(prog, name=name)
