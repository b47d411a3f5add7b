# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Fault-tolerant asynchronous SGD in the cluster-based model (Attiya & Schiller).

Processes are split into clusters. Inside a cluster they share single-writer registers (reads and
writes only, wait-free); between clusters they exchange messages; any process may crash. Two
variants (ALGORITHMS.md 1.4-1.6, reconstructed from the abstracts):

* ``"average"`` (Algorithm A, strongly convex, wait-free, any number of crashes): each iteration a
  process takes an SGD step ``y = x - eta_t g``, publishes ``(t, y)`` in its register and sends it to
  every process of the other clusters (receivers *relay* it into their own registers so their whole
  cluster sees it), then averages, without waiting, every iteration-``t`` value it can see.
* ``"agreement"`` (Algorithm B, smooth non-convex): after the SGD step the processes run ``R``
  rounds of multidimensional approximate agreement (MAA) on their ``y``; a round waits for the
  boxes of a quorum of clusters and moves to the midpoint of their union, so the live processes'
  iterates stay within ``diameter / 2^R`` of each other. It blocks when the live clusters do not
  hold a weight majority (necessary, by the paper's lower bound). Boxes go straight to every
  process of the other clusters (no relay through shared memory: a waiting process cannot read
  memory under the node-program contract, and a broadcast is never cut short by a crash in the
  simulator). Two rules, this library's own, keep slow processes live: a process that holds a
  quorum of other clusters' boxes for a later round *jumps* to that round's midpoint, and a process
  whose needed box was overwritten by a later round *catches up* by adopting the round and value
  of its most advanced cluster-mate (read from the ``MAA`` registers).

Registers and messages hold one model each; their templates are functions of the model's
parameters (:func:`~jaxasync._src.program.like_params`), resolved by the executor.

Shared objects and channels (names as in the programs):

* ``Registers("vals")``: ``VAL_p[s]``, ``slots`` tagged registers per process, slot ``t % slots``,
  visible to cluster-mates only.
* ``Registers("relay")``: ``RELAY_p[q][s]`` as ``n * slots`` registers per process, register
  ``q * slots + s`` holding origin ``q``'s value for an iteration ``= s (mod slots)``; the register's
  own tag is the iteration. (Registers of own-cluster origins stay unused.)
* ``Registers("maa")`` (agreement): ``MAA_p`` ring of round values, slot ``rho % slots`` for the
  global round index ``rho = t R + r``.
* channel ``"vals"`` (average) / ``"boxes"`` (agreement): complete bipartite graph between clusters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import agreement as agreement_lib
from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = ["ClusterAgreementState", "ClusterSGDState", "cluster_sgd"]

_VARIANTS = ("average", "agreement")
_QUORUMS = ("processes", "clusters")

# Phases of a process in the agreement variant.
_NEW_ITERATION = 0  # next event: the first SGD step (only before the first iteration)
_SEND = 1  # the own-cluster box of round rho is known: next event sends it
_WAIT = 2  # box sent: waiting for a quorum of round-rho boxes (not ready until then)


class ClusterSGDState(NamedTuple):
    """State of one process of Algorithm A (``variant="average"``).

    Attributes:
      node: int32 process id.
      t: int32 iteration counter (iterations completed).
      x: the current parameters (between a step and its ``observe``: still those of iteration ``t``).
      opt_state: state of the local optimizer (its count is ``t``).
      pending: bool, a value for iteration ``t`` was published (in ``VAL``) and awaits collection.
      relay_tags: int32 ``[n, slots]``: iteration held in this process's relay register of each
        origin and slot (-1 if empty), so a late message never overwrites a newer one.
      collected: int32 number of values averaged at the last iteration (``|Y|``).
      collected_sum: int32 total of ``collected`` over the iterations.
    """

    node: jax.Array
    t: jax.Array
    x: PyTree
    opt_state: PyTree
    pending: jax.Array
    relay_tags: jax.Array
    collected: jax.Array
    collected_sum: jax.Array


class ClusterAgreementState(NamedTuple):
    """State of one process of Algorithm B (``variant="agreement"``).

    Vectors are float32 ``[d]`` views of the ravelled model.

    Attributes:
      node: int32 process id.
      t: int32 iteration counter.
      x: the current parameters (the last MAA output).
      opt_state: state of the local optimizer.
      phase: int32, one of ``_NEW_ITERATION``, ``_SEND``, ``_WAIT``.
      rho: int32 global MAA round index ``t * R + r`` the process is in.
      wrote: bool, the last step wrote the round-``rho`` value (``observe`` then collects the box).
      catching: bool, the last step was a catch-up attempt (``observe`` then looks for a
        cluster-mate in a later round).
      tried: bool, a catch-up attempt found nobody ahead; no new attempt before a new box arrives.
      v: float32 ``[d]`` MAA value of round ``rho``.
      lo, hi: float32 ``[d]`` own-cluster box of round ``rho``.
      box_tag: int32 ``[m, slots]``: round of the box held from each cluster per ring slot (-1: none).
      box_lo, box_hi: float32 ``[m, slots, d]``: those boxes (the first received per round).
      jumps: int32 times the process skipped ahead to a later round it held a quorum for.
      catchups: int32 times the process adopted the round of a cluster-mate far ahead.
      in_tag, out_tag: int32 ``[slots]``: iterations of the recorded MAA inputs / outputs.
      in_val, out_val: float32 ``[slots, d]``: MAA inputs ``y_t`` and outputs ``x_{t+1}`` of the
        last iterations (ring by iteration), for the agreement metrics.
    """

    node: jax.Array
    t: jax.Array
    x: PyTree
    opt_state: PyTree
    phase: jax.Array
    rho: jax.Array
    wrote: jax.Array
    catching: jax.Array
    tried: jax.Array
    v: jax.Array
    lo: jax.Array
    hi: jax.Array
    box_tag: jax.Array
    box_lo: jax.Array
    box_hi: jax.Array
    jumps: jax.Array
    catchups: jax.Array
    in_tag: jax.Array
    in_val: jax.Array
    out_tag: jax.Array
    out_val: jax.Array


def _cluster_assignment(clusters) -> np.ndarray:
    """``clusters`` (a list of sizes or an array node -> cluster) as int32 ``[n]`` cluster ids."""
    if isinstance(clusters, list | tuple):
        sizes = list(clusters)
        if not sizes:
            raise ValueError("cluster_sgd: clusters must name at least one cluster.")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1:
                raise ValueError(
                    f"cluster_sgd: a list of clusters holds positive int sizes, got {clusters!r} "
                    "(pass a numpy array for a node -> cluster assignment)."
                )
        return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    if isinstance(clusters, np.ndarray | jax.Array):
        of = np.asarray(clusters)
        if of.ndim != 1 or of.size == 0 or not np.issubdtype(of.dtype, np.integer):
            raise ValueError(
                f"cluster_sgd: a cluster assignment is a non-empty 1-D int array, got dtype "
                f"{of.dtype} and shape {of.shape}."
            )
        m = int(of.max()) + 1
        if of.min() < 0 or np.any(np.bincount(of, minlength=m) == 0):
            raise ValueError(
                f"cluster_sgd: cluster ids must be 0 .. m - 1 with every cluster non-empty, "
                f"got {of.tolist()}."
            )
        return of.astype(np.int32)
    raise TypeError(
        "cluster_sgd: clusters must be a list of cluster sizes or an int array node -> cluster, "
        f"got {type(clusters).__name__}."
    )


def cluster_sgd(
    clusters: Sequence[int] | np.ndarray,
    *,
    variant: str = "average",
    learning_rate: float | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    slots: int = 4,
    quorum: str = "processes",
    agreement_rounds: int | None = None,
    epsilon: float | None = None,
) -> program_lib.NodeProgram:
    r"""Attiya & Schiller's asynchronous SGD in the cluster-based model.

    **Algorithm A** (``variant="average"``), at process ``p``, iteration ``t``, slot ``s = t mod K``:

    .. math::
        y_p^t = x_p^t - \eta_t \nabla \ell(x_p^t; \xi), \qquad
        \mathrm{VAL}_p[s] \leftarrow (t, y_p^t), \qquad
        \text{send } \langle t, y_p^t \rangle \text{ to every process of every other cluster},

    .. math::
        x_p^{t+1} = \frac{1}{|Y|} \sum_{q \in Y} y_q^t,

    where ``Y`` holds, deduplicated by origin ``q``, every iteration-``t`` value ``p`` sees now: the
    ``VAL`` registers of its cluster-mates and the ``RELAY`` registers in which they stored the
    messages of other clusters (``recv``: ``RELAY_p[q][t' mod K] <- (t', y)`` unless it holds a newer
    iteration). Nothing waits, so any number of crashes is tolerated; the gradient noise is divided
    by ``k_t = min_p |Y_p^t|``, up to ``n``-fold acceleration of sequential SGD when everybody sees
    everybody. Asynchronously, the first process to finish an iteration sees only its own value, so
    the gain is smaller (about ``k``-fold for the ``cluster_k_mean`` metric, the mean ``|Y|``). Use
    ``schedule=schedules.inverse_time(2, mu, t0)`` for the strongly convex ``eta_t = beta/(mu(t+t0))``.

    **Algorithm B** (``variant="agreement"``): after the same SGD step, ``R = agreement_rounds``
    rounds of multidimensional approximate agreement on ``v = y_p^t``; round ``rho = tR + r``:

    .. math::
        \mathrm{MAA}_p \leftarrow (\rho, v);\quad B_p = \mathrm{box}\{v_q^\rho : q \text{ cluster-mate,
        already written}\};\quad \text{send } B_p \text{ to the other clusters};

    .. math::
        \text{wait until } \textstyle\sum_{c \in K_p} w(c) > W/2;\qquad
        v \leftarrow \tfrac12 \big(\min_{b \in K_p} lo_b + \max_{b \in K_p} hi_b\big),

    and ``x_p^{t+1} = v`` after the last round. The live processes' outputs lie within
    ``2^{-R}`` times the diameter of the inputs (l-infinity) and inside their bounding box. A
    process ``p`` waits (``ready`` is false) until it holds round-``rho`` boxes from a quorum
    ``K_p`` of clusters (its own included): ``w(c) = n_c, W = n`` for ``quorum="processes"``,
    ``w(c) = 1, W = m`` for ``"clusters"``. A process that fell so far behind that it holds a
    quorum of other clusters' boxes for a *later* round jumps to that round's midpoint; one whose
    round-``rho`` box of some cluster was overwritten by a later round adopts the round and value
    of its most advanced cluster-mate (both keep the guarantees above; see the module docstring).
    Each round costs the process two events (send the box; take the midpoint and write the next
    value), each with a compute-time draw in the simulator.

    Args:
      clusters: cluster sizes as a list (``[5, 4, 3]``: processes 0-4, 5-8, 9-11), or an int
        numpy array mapping each process to its cluster ``0 .. m - 1``.
      variant: ``"average"`` (Algorithm A) or ``"agreement"`` (Algorithm B).
      learning_rate: constant step size (plain SGD).
      schedule: a step-size schedule ``t -> eta_t`` (plain SGD), e.g. ``schedules.inverse_time``.
      optimizer: an Optax optimizer for the local step instead (its state stays local).
      slots: register ring length ``K`` (tolerated iteration lag; also the ring of relayed boxes
        and of recorded MAA inputs / outputs).
      quorum: ``"processes"`` (journal condition) or ``"clusters"`` (arXiv v1), agreement only.
      agreement_rounds: MAA rounds ``R`` per iteration (agreement only; default 4).
      epsilon: agreement target: the ``agreement_ok`` metric reports whether the outputs' diameter
        is at most ``epsilon`` (agreement only; choose ``R >= log2(D / epsilon)`` for an input
        diameter ``D``).

    Returns:
      A :class:`~jaxasync._src.program.NodeProgram` for ``n = len(cluster ids)`` processes,
      crash-tolerant, with metrics ``cluster_k_mean`` (values averaged per iteration, average) or
      ``agreement_diameter``, ``agreement_input_diameter``, ``maa_jumps`` (and ``agreement_ok``).

    Raises:
      ValueError / TypeError: for malformed clusters, step-size arguments (exactly one of
        ``learning_rate``, ``schedule``, ``optimizer``), variant, quorum, slots or rounds.

    Example:
      >>> from jaxasync._src.algorithms import cluster
      >>> prog = cluster.cluster_sgd([2, 1], learning_rate=0.1)
      >>> prog.num_nodes, sorted(prog.shared), sorted(prog.channels)
      (3, ['relay', 'vals'], ['vals'])

    References:
      Attiya and Schiller, "Asynchronous Fully-Decentralized SGD in the Cluster-Based Model",
      arXiv:2202.10862; Theoretical Computer Science 1031 (2025) 115073.
    """
    name = "cluster_sgd"
    of = _cluster_assignment(clusters)
    n, m = int(of.size), int(of.max()) + 1
    sizes = np.bincount(of, minlength=m).astype(np.int32)
    opt = base.local_optimizer(
        name, learning_rate=learning_rate, optimizer=optimizer, schedule=schedule, takes_schedule=True
    )
    if variant not in _VARIANTS:
        raise ValueError(f"{name}: variant must be one of {_VARIANTS}, got {variant!r}.")
    if quorum not in _QUORUMS:
        raise ValueError(f"{name}: quorum must be one of {_QUORUMS}, got {quorum!r}.")
    slots = base.positive_int(name, "slots", slots)
    if variant == "average" and (agreement_rounds is not None or epsilon is not None):
        raise ValueError(f"{name}: agreement_rounds and epsilon only apply to variant='agreement'.")
    same = of[:, None] == of[None, :]
    remote = topology_lib.from_adjacency(~same, name="cluster-bipartite")
    kwargs = dict(
        of=of,
        n=n,
        m=m,
        sizes=sizes,
        opt=opt,
        slots=slots,
        same=same,
        remote=remote,
    )
    if variant == "average":
        return _algorithm_a(**kwargs)
    rounds = 4 if agreement_rounds is None else base.positive_int(name, "agreement_rounds", agreement_rounds)
    if epsilon is not None and not (isinstance(epsilon, int | float) and epsilon > 0):
        raise ValueError(f"{name}: epsilon must be a positive float, got {epsilon!r}.")
    return _algorithm_b(rounds=rounds, quorum=quorum, epsilon=epsilon, **kwargs)


def _flat_size(params: PyTree) -> int:
    return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))


def _algorithm_a(*, of, n, m, sizes, opt, slots, same, remote):
    del of, sizes  # the visibility matrix and the graph carry the cluster structure
    K = slots
    has_remote = m > 1
    # Registers and messages hold one model each: templates resolved from the model's parameters.
    template = program_lib.like_params
    channel = program_lib.Channel(
        remote,
        lambda p: {"t": jax.ShapeDtypeStruct((), jnp.int32), "y": program_lib.like_params(p)},
    )
    in_table = np.asarray(remote.in_table, np.int32).reshape(n, -1)

    def init(node, params, key):
        del key  # deterministic given the minibatches
        return ClusterSGDState(
            node=jnp.asarray(node, jnp.int32),
            t=jnp.int32(0),
            x=params,
            opt_state=opt.init(params),
            pending=jnp.asarray(False),
            relay_tags=jnp.full((n, K), -1, jnp.int32),
            collected=jnp.int32(0),
            collected_sum=jnp.int32(0),
        )

    def step(state, grad_fn, batch, key):
        del key  # no randomness beyond the minibatch
        y, opt_state = base.descend(opt, base.gradient(grad_fn, state.x, batch), state.opt_state, state.x)
        write = program_lib.RegisterWrite(slot=state.t % K, tag=state.t, value=y, mask=jnp.asarray(True))
        outbox = {}
        if has_remote:
            outbox["vals"] = program_lib.broadcast_outbox(channel, state.node, {"t": state.t, "y": y})
        # y lives in the register only (a copy in the state would cost a pass over the model): the
        # executor applies the write before observe, which averages it with the other values of t.
        state = state._replace(opt_state=opt_state, pending=jnp.asarray(True))
        return state, program_lib.Emit(outbox=outbox, ops={"vals": write})

    def observe(state, views):
        t, s = state.t, state.t % K
        vals = views["vals"]
        # [origin]: cluster-mates that published y^t, this process included (its step's write).
        own = vals.tags[:, s] == t
        have = own
        if has_remote:
            relay = views["relay"]
            rel = relay.tags.reshape(n, n, K)[:, :, s] == t  # [owner, origin]
            first = jnp.argmax(rel, axis=0)  # some cluster-mate that relayed origin's y^t
            have = have | jnp.any(rel, axis=0)

        def values_t(v_own, v_rel=None):
            """Each origin's y^t as seen here (anything where not ``have``), read at scalar indices
            and averaged in place: gathering the rows into one array first costs ~5x the average."""
            rows = []
            for q in range(n):
                row = v_own[q, s]
                if v_rel is not None:
                    row = jnp.where(own[q], row, v_rel[first[q], q * K + s])
                rows.append(row.astype(jnp.float32))
            return rows

        relays = (relay.values,) if has_remote else ()
        avg = jax.tree.map(
            lambda x, *v: agreement_lib.average(values_t(*v), have).astype(x.dtype),
            state.x,
            vals.values,
            *relays,
        )
        count = jnp.sum(have).astype(jnp.int32)
        done = state._replace(
            t=t + 1,
            x=avg,
            pending=jnp.asarray(False),
            collected=count,
            collected_sum=state.collected_sum + count,
        )
        # Right after init nothing was published: nothing to collect.
        return jax.tree.map(lambda a, b: jnp.where(state.pending, a, b), done, state)

    def receive(state, msg):
        origin = jnp.asarray(in_table)[state.node, msg.slot]
        t, s = msg.payload["t"], msg.payload["t"] % K
        newer = t > state.relay_tags[origin, s]
        write = program_lib.RegisterWrite(slot=origin * K + s, tag=t, value=msg.payload["y"], mask=newer)
        tags = state.relay_tags.at[origin, s].max(t)
        return state._replace(relay_tags=tags), program_lib.Emit(ops={"relay": write})

    def metrics(states):
        return {
            "cluster_k_mean": jnp.sum(states.collected_sum).astype(jnp.float32)
            / jnp.maximum(jnp.sum(states.t), 1).astype(jnp.float32)
        }

    shared = {"vals": program_lib.Registers(template, slots=K, visible=same)}
    channels, receivers = {}, {}
    if has_remote:
        shared["relay"] = program_lib.Registers(template, slots=n * K, visible=same)
        channels["vals"], receivers["vals"] = channel, receive
    return program_lib.NodeProgram(
        name="cluster_sgd",
        init=init,
        step=step,
        params=lambda state: state.x,
        channels=channels,
        receive=receivers,
        shared=shared,
        observe=observe,
        metrics=metrics,
        num_nodes=n,
        crash_tolerant=True,
    )


def _algorithm_b(*, of, n, m, sizes, opt, slots, same, remote, rounds, quorum, epsilon):
    K, R = slots, rounds
    has_remote = m > 1

    def vector(p):  # MAA values and boxes: the ravelled model in float32
        return jax.ShapeDtypeStruct((_flat_size(p),), jnp.float32)

    channel = program_lib.Channel(
        remote,
        lambda p: {"rho": jax.ShapeDtypeStruct((), jnp.int32), "lo": vector(p), "hi": vector(p)},
    )
    in_table = np.asarray(remote.in_table, np.int32).reshape(n, -1)
    cluster_of, weights = jnp.asarray(of), jnp.asarray(sizes)

    def to_tree(flat, like):
        unravel = jax.flatten_util.ravel_pytree(like)[1]
        return jax.tree.map(lambda a, ref: a.astype(ref.dtype), unravel(flat), like)

    def quorum_of(held):
        return agreement_lib.has_quorum(held, weights, quorum)

    def decision(state):
        """Whether a quorum holds round ``rho``; the latest later round a quorum of other clusters
        holds (or -1); whether a catch-up attempt is due (a box of round ``rho`` was overwritten
        by a later round of its cluster, so it can never arrive)."""
        own = cluster_of[state.node]
        mine = state.box_tag[:, state.rho % K]
        held = (mine == state.rho).at[own].set(True)
        latest = jnp.max(state.box_tag, axis=0)  # [K]: newest round per ring slot
        held_later = (state.box_tag == latest[None, :]) & (latest[None, :] >= 0)
        ok = jax.vmap(quorum_of, in_axes=1)(held_later) & (latest > state.rho)
        stale = jnp.any(mine > state.rho) & ~state.tried
        return quorum_of(held), jnp.max(jnp.where(ok, latest, -1)), stale

    def init(node, params, key):
        del key  # deterministic given the minibatches
        d = _flat_size(params)
        vec = jnp.zeros((d,), jnp.float32)
        box = jnp.zeros((m, K, d), jnp.float32)
        ring = jnp.full((K,), -1, jnp.int32)
        return ClusterAgreementState(
            node=jnp.asarray(node, jnp.int32),
            t=jnp.int32(0),
            x=params,
            opt_state=opt.init(params),
            phase=jnp.int32(_NEW_ITERATION),
            rho=jnp.int32(0),
            wrote=jnp.asarray(False),
            catching=jnp.asarray(False),
            tried=jnp.asarray(False),
            v=vec,
            lo=vec,
            hi=vec,
            box_tag=jnp.full((m, K), -1, jnp.int32),
            box_lo=box,
            box_hi=box,
            jumps=jnp.int32(0),
            catchups=jnp.int32(0),
            in_tag=ring,
            in_val=jnp.zeros((K, d), jnp.float32),
            out_tag=ring,
            out_val=jnp.zeros((K, d), jnp.float32),
        )

    def step(state, grad_fn, batch, key):
        del key  # no randomness beyond the minibatch
        own = cluster_of[state.node]
        have_quorum, later, stale = decision(state)
        waiting = state.phase == _WAIT
        finish = waiting & (have_quorum | (later > state.rho))
        catch = waiting & ~finish & stale
        jump = finish & ~have_quorum
        done = jnp.where(jump, later, state.rho)  # the round whose midpoint is taken
        w = done % K
        held = (state.box_tag[:, w] == done).at[own].set(~jump)  # own box unless jumping
        # Boxes read where they lie, one per cluster (the own cluster's from the state).
        los = [jnp.where(c == own, state.lo, state.box_lo[c, w]) for c in range(m)]
        his = [jnp.where(c == own, state.hi, state.box_hi[c, w]) for c in range(m)]
        mid = agreement_lib.box_midpoint(los, his, held)
        iteration_done = finish & (done % R == R - 1)
        new_iteration = (state.phase == _NEW_ITERATION) | iteration_done
        x = jax.tree.map(lambda a, b: jnp.where(iteration_done, a, b), to_tree(mid, state.x), state.x)
        t_done = done // R
        t_next = jnp.where(state.phase == _NEW_ITERATION, state.t, t_done + 1)

        def sgd(x):
            y, opt_state = base.descend(opt, base.gradient(grad_fn, x, batch), state.opt_state, x)
            return base.flat32(y), opt_state

        def skip(x):
            del x  # mid-agreement: no gradient this event
            return jnp.zeros_like(state.v), state.opt_state

        y, opt_state = jax.lax.cond(new_iteration, sgd, skip, x)
        write = new_iteration | finish
        rho = jnp.where(new_iteration, t_next * R, done + 1)
        v = jnp.where(new_iteration, y, mid)
        send = state.phase == _SEND
        emit = program_lib.Emit(
            outbox=(
                {
                    "boxes": program_lib.broadcast_outbox(
                        channel, state.node, {"rho": state.rho, "lo": state.lo, "hi": state.hi}, send
                    )
                }
                if has_remote
                else {}
            ),
            ops={"maa": program_lib.RegisterWrite(slot=rho % K, tag=rho, value=v, mask=write)},
        )
        s_out, s_in = t_done % K, t_next % K
        state = state._replace(
            t=jnp.where(write, rho // R, state.t),
            x=x,
            opt_state=opt_state,
            phase=jnp.where(write, _SEND, jnp.where(send, _WAIT, state.phase)).astype(jnp.int32),
            rho=jnp.where(write, rho, state.rho),
            wrote=write,
            catching=catch,
            tried=state.tried | catch,
            v=jnp.where(write, v, state.v),
            jumps=state.jumps + jump.astype(jnp.int32),
            out_tag=state.out_tag.at[s_out].set(jnp.where(iteration_done, t_done, state.out_tag[s_out])),
            out_val=state.out_val.at[s_out].set(jnp.where(iteration_done, mid, state.out_val[s_out])),
            in_tag=state.in_tag.at[s_in].set(jnp.where(new_iteration, t_next, state.in_tag[s_in])),
            in_val=state.in_val.at[s_in].set(jnp.where(new_iteration, y, state.in_val[s_in])),
        )
        return state, emit

    def observe(state, views):
        reg = views["maa"]
        # After a write: the own-cluster box of round rho, over every cluster-mate that already
        # wrote its value (this process wrote first, so the cluster's first writer is inside).
        s = state.rho % K
        seen = (reg.tags[:, s] == state.rho).at[state.node].set(True)
        values = [jnp.where(q == state.node, state.v, reg.values[q, s]) for q in range(n)]
        lo, hi = agreement_lib.box(values, seen)
        boxed = state._replace(lo=lo, hi=hi, wrote=jnp.asarray(False))
        # After a catch-up attempt: adopt the round and value of the most advanced cluster-mate
        # (a legitimate input of that round) and its cluster's box, as if this process had
        # written the same value.
        flat_tags = reg.tags.reshape(-1)
        best = jnp.argmax(flat_tags)
        rho = flat_tags[best]
        s = rho % K
        seen = reg.tags[:, s] == rho
        lo, hi = agreement_lib.box([reg.values[q, s] for q in range(n)], seen)
        ahead = rho > state.rho
        adopted = state._replace(
            t=rho // R,
            phase=jnp.int32(_SEND),
            rho=rho,
            v=reg.values.reshape(-1, state.v.shape[0])[best],
            lo=lo,
            hi=hi,
            tried=jnp.asarray(False),
            catchups=state.catchups + 1,
        )
        caught = jax.tree.map(lambda a, b: jnp.where(ahead, a, b), adopted, state)
        caught = caught._replace(catching=jnp.asarray(False))
        return jax.tree.map(
            lambda a, b, c: jnp.where(state.wrote, a, jnp.where(state.catching, b, c)),
            boxed,
            caught,
            state,
        )

    def receive(state, msg):
        c = cluster_of[jnp.asarray(in_table)[state.node, msg.slot]]
        rho, w = msg.payload["rho"], msg.payload["rho"] % K
        newer = rho > state.box_tag[c, w]  # keep the first box received per (cluster, round)
        return state._replace(
            tried=state.tried & ~newer,
            box_tag=state.box_tag.at[c, w].max(rho),
            box_lo=state.box_lo.at[c, w].set(jnp.where(newer, msg.payload["lo"], state.box_lo[c, w])),
            box_hi=state.box_hi.at[c, w].set(jnp.where(newer, msg.payload["hi"], state.box_hi[c, w])),
        ), program_lib.Emit()

    def ready(state):
        have_quorum, later, stale = decision(state)
        return (state.phase != _WAIT) | have_quorum | (later > state.rho) | stale

    def diameter(tags, values):
        """Largest l-inf spread of the processes' values of one iteration, over the last ``slots``
        iterations anybody recorded (older records belong to crashed or far-behind processes)."""
        tags, values = tags.reshape(-1), values.reshape(-1, values.shape[-1])
        recent = jnp.max(tags) - K

        def spread(tag):
            holders = (tags == tag) & (tag >= 0) & (tag > recent)
            ok = jnp.sum(holders) >= 2
            return jnp.where(ok, agreement_lib.diameter_linf(values, holders), 0.0)

        return jnp.max(jax.vmap(spread)(tags))

    def metrics(states):
        out = {
            "agreement_diameter": diameter(states.out_tag, states.out_val),
            "agreement_input_diameter": diameter(states.in_tag, states.in_val),
            "maa_jumps": jnp.sum(states.jumps),
            "maa_catchups": jnp.sum(states.catchups),
        }
        if epsilon is not None:
            out["agreement_ok"] = out["agreement_diameter"] <= epsilon
        return out

    channels, receivers = {}, {}
    if has_remote:
        channels["boxes"], receivers["boxes"] = channel, receive
    return program_lib.NodeProgram(
        name="cluster_sgd_agreement",
        init=init,
        step=step,
        params=lambda state: state.x,
        channels=channels,
        receive=receivers,
        shared={"maa": program_lib.Registers(vector, slots=K, visible=same)},
        observe=observe,
        ready=ready,
        metrics=metrics,
        num_nodes=n,
        crash_tolerant=True,
    )
