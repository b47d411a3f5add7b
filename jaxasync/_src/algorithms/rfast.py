# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
r"""R-FAST: robust fully-asynchronous stochastic gradient tracking over two graphs.

Node ``i`` pulls decision variables over a row-stochastic graph ``G_R`` and pushes gradient-tracker
mass over a column-stochastic graph ``G_C``. Tracker mass travels as cumulative *running sums*
(sender side ``rho``, receiver side newest ``rho_hat`` and absorbed ``rho_tilde``), so a lost or late
message is made good by the next one that gets through, and nobody ever waits. The two graphs only
need spanning trees with a common root (ring, star, trees, parameter-server-like, mixed).

The update equations are a reconstruction (ALGORITHMS.md section 2, tagged [R]): Push-Pull with the
robust sum-push of ASY-SONATA. The conservation invariant

.. math::
    \sum_i z_i + \sum_{(i \to j) \in E_C} (\rho_{ji} - \tilde\rho_{ji}^{\text{at } j}) = \sum_i g_i

holds after every event whatever is lost, delayed or reordered; `rfast_conservation_error`
measures it on stacked states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import mixing as mixing_lib
from jaxasync._src import program as program_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import base

PyTree = Any

__all__ = ["RFastState", "rfast", "rfast_conservation_error"]


class RFastState(NamedTuple):
    r"""State of one R-FAST node.

    Attributes:
      node: int32 node id.
      count: int32 local updates taken.
      x: the decision variable (the model), ``x_i``.
      y: the node's own pull value ``x_i - \gamma z_i`` (with an optimizer: ``x_i + opt(z_i)``),
        the value its out-neighbours in ``G_R`` mix and the node's own term in its next mix.
      z: the gradient tracker ``z_i``.
      g: the gradient currently injected into the tracker, ``g_i``.
      v_hat: leaves ``[max_in_degree(G_R), ...]``: newest pull value received per in-slot.
      v_seq: int32 ``[max_in_degree(G_R)]``: its sequence number (-1: none yet).
      sums: the node's end of the running-sum channel on ``G_C`` (`mixing.RunningSumState`):
        ``rho_out`` per out-slot (total mass ever pushed on the edge, in both variants),
        ``rho_hat`` / ``rho_tilde`` / ``last_seq`` per in-slot. In the non-robust ablation
        ``rho_hat`` is the sum of the increments received.
      opt_state: the optimizer's state (its "gradient" is the tracker ``z``).
    """

    node: jax.Array
    count: jax.Array
    x: PyTree
    y: PyTree
    z: PyTree
    g: PyTree
    v_hat: PyTree
    v_seq: jax.Array
    sums: mixing_lib.RunningSumState
    opt_state: PyTree


def rfast_conservation_error(stacked_states: RFastState, *, robust: bool = True, in_flight=None):
    r"""Largest absolute entry of the tracker-mass residual over stacked node states.

    .. math::
        r = \sum_i z_i + \sum_{(i \to j)} (\hat\rho_{ji} - \tilde\rho_{ji}) + u - \sum_i g_i

    where ``u`` is the mass sent that the network can still deliver. For R-FAST (``robust=True``)
    a later running sum delivers whatever an earlier lost one carried, so
    ``u = sum (rho - rho_hat)`` and ``r = sum z + sum rho - sum rho_tilde - sum g``, which is zero
    (to float round-off) after every event. For the non-robust ablation only increments still in
    flight can arrive: pass their sum as ``in_flight`` (states alone cannot tell in-flight from lost
    packets; default 0); then ``r`` is minus the mass lost by the network.

    Args:
      stacked_states: `RFastState` with a leading node axis on every leaf.
      robust: which variant produced the states.
      in_flight: non-robust only: pytree like one tracker, the sum of the increments in flight.

    Returns:
      float32 scalar ``max |r|``.
    """
    s = stacked_states.sums

    def total(tree):
        return jax.tree.map(lambda a: jnp.sum(a.astype(jnp.float32), axis=(0, 1)), tree)

    def nodes(tree):
        return jax.tree.map(lambda a: jnp.sum(a.astype(jnp.float32), axis=0), tree)

    pending = total(s.rho_out) if robust else total(s.rho_hat)
    if not robust and in_flight is not None:
        pending = jax.tree.map(lambda p, f: p + jnp.asarray(f, jnp.float32), pending, in_flight)
    residual = jax.tree.map(
        lambda z, p, t, g: z + p - t - g,
        nodes(stacked_states.z),
        pending,
        total(s.rho_tilde),
        nodes(stacked_states.g),
    )
    return jnp.max(jnp.stack([jnp.max(jnp.abs(r)) for r in jax.tree.leaves(residual)]))


def rfast(
    pull: topology_lib.Graph,
    push: topology_lib.Graph,
    *,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    effective_step: bool = True,
    robust: bool = True,
) -> program_lib.NodeProgram:
    r"""R-FAST as a node program: asynchronous Push-Pull gradient tracking with running sums.

    A local update of node ``i`` (it never waits for messages):

    .. math::
        \begin{aligned}
        x_i^+ &= r_{ii}\, y_i + \textstyle\sum_{j \in N_R^{in}(i)} r_{ij} \hat v_{ij}
            && \text{(a) pull / mix, } y_i = x_i - \gamma z_i \\
        g_i^+ &= \nabla F_i(x_i^+; \xi) && \text{(b) gradient} \\
        z_i^{1/2} &= z_i + \textstyle\sum_{j} (\hat\rho_{ij} - \tilde\rho_{ij}) + g_i^+ - g_i,
            \quad \tilde\rho_{ij} \leftarrow \hat\rho_{ij},\ g_i \leftarrow g_i^+ && \text{(c) sum step} \\
        z_i &\leftarrow c_{ii} z_i^{1/2}, \quad \rho_{ji} \leftarrow \rho_{ji} + c_{ji} z_i^{1/2}
            && \text{(d) push step} \\
        y_i &\leftarrow x_i^+ - \gamma z_i; \text{ send } y_i \text{ on } G_R,\ \rho_{ji} \text{ on } G_C;
            \ x_i \leftarrow x_i^+ && \text{(e), (f)}
        \end{aligned}

    Receivers keep only the newest value per in-slot (by sequence number): ``v_hat`` on channel
    ``"pull"`` and ``rho_hat`` on channel ``"sums"``. Weights: ``R = pull_weights(pull)`` (rows sum
    to 1) and ``C = push_weights(push)`` (columns sum to 1).

    Step size: the trackers sum to the *sum* of the local gradients and a node descends along the
    share ``c_ii z_i^{1/2}`` it keeps, so the network average moves by
    ``gamma * n sum_i u_i c_ii v_i`` times the mean gradient (``u``, ``v`` the Perron vectors of
    ``R`` and ``C``; ``n`` on a tree, 1/3 on a ring with self-weights 1/3). ``learning_rate`` is
    that effective step; with ``effective_step=True`` (default) ``gamma`` is ``learning_rate``
    divided by the factor (`topology.effective_step_factor(r, c, kept_share=True)`), and an
    ``optimizer`` is followed by the same scaling. With an
    optimizer ``x - gamma z`` becomes ``x + opt.update(z)``: the optimizer sees the tracker as its
    gradient (one update per local step).

    Initialisation: the paper's ``z_i^0 = g_i^0 = grad at x^0`` needs a minibatch, which ``init``
    does not have. We start from ``g_i = z_i = 0`` and ``y_i = x^0``; the first sum step then
    injects ``g_i^+ - 0``, so the trackers, and the conservation invariant, are exactly the
    paper's from the first update on; only the first mix lacks the descent term ``-gamma g_i^0``
    (one step of delay in the first descent). ``v_hat`` starts at ``x^0``.

    Non-robust ablation (``robust=False``, name ``"rfast_nonrobust"``): each update sends the
    increment ``c_ji z_i^{1/2}`` instead of the running sum and the receiver adds every increment
    it receives, so a lost packet loses its tracker mass for good and the trackers drift.

    Args:
      pull: ``G_R``; edge ``j -> i`` means ``i`` pulls ``j``'s value.
      push: ``G_C``; edge ``i -> j`` means ``i`` pushes tracker mass to ``j``.
      learning_rate: effective step size (SGD on the tracker); or
      optimizer: an Optax transformation applied to the tracker ``z`` each local update.
      effective_step: divide the step by ``n sum_i u_i c_ii v_i`` so ``learning_rate`` means the
        same on every topology pair (False: ``gamma = learning_rate``, optimizer unscaled).
      robust: running sums (R-FAST) or increments (the non-robust ablation).

    Returns:
      A :class:`NodeProgram` with channels ``"pull"`` (on ``pull``) and ``"sums"`` (on ``push``)
      and a ``conservation_error`` metric.

    Raises:
      TypeError: a graph is not a ``topology.Graph`` or the optimizer is not an Optax one.
      ValueError: the graphs have different sizes or no common root, or not exactly one of
        ``learning_rate`` / ``optimizer``, or a non-positive learning rate.

    Example:
      >>> from jaxasync import topology
      >>> ring = topology.directed_ring(8)
      >>> prog = rfast(ring, ring, learning_rate=0.02)
      >>> trace = simulate(prog, problem, Asynchrony(loss=0.3), steps=8000)  # doctest: +SKIP

    References:
      Zhu, Tian, Huang, Xu and He, "R-FAST: Robust fully-asynchronous stochastic gradient
      tracking over general topology", IEEE TSIPN 2024 (arXiv:2307.11617).
      Pu, Shi, Xu and Nedić, "Push-Pull gradient methods for distributed optimization in
      networks", IEEE TAC 2021 (arXiv:1810.06653).
      Tian, Sun and Scutari, "Achieving linear convergence in distributed asynchronous
      multi-agent optimization", IEEE TAC 2020 (arXiv:1803.10359).
    """
    name = "rfast" if robust else "rfast_nonrobust"
    pull = base.check_graph(name, pull, "pull")
    push = base.check_graph(name, push, "push")
    topology_lib.check_common_root(pull, push)
    r, c = topology_lib.pull_weights(pull), topology_lib.push_weights(push)
    factor = topology_lib.effective_step_factor(r, c, kept_share=True) if effective_step else 1.0
    if learning_rate is not None and optimizer is None:
        learning_rate = base.check_learning_rate(name, learning_rate) / factor
    opt = base.local_optimizer(name, learning_rate=learning_rate, optimizer=optimizer)
    if optimizer is not None and not np.isclose(factor, 1.0):
        opt = optax.chain(opt, optax.scale(1.0 / factor))

    self_r, in_r = (jnp.asarray(a, jnp.float32) for a in topology_lib.in_weight_table(pull, r))
    self_c, out_c = topology_lib.out_weight_table(push, c)
    # Uniform push weights: every pushed share c_ji z^{1/2} is the kept share c_ii z^{1/2}, i.e. the
    # new z. The step adds z itself to rho_out (bitwise the same) so z^{1/2} has a single reader:
    # XLA:CPU would otherwise recompute it, re-reading 7 vectors, for each output that needs it.
    assert np.all((out_c == 0) | (out_c == self_c[:, None])), "push_weights are uniform"
    self_c = jnp.asarray(self_c, jnp.float32)
    n = pull.n
    pull_out_mask = jnp.asarray(pull.out_mask).reshape(n, -1)
    push_out_mask = jnp.asarray(push.out_mask).reshape(n, -1)
    m_in_pull = pull.max_in_degree
    channels = {
        # Both channels keep the newest value per edge (the non-robust ablation adds increments).
        "pull": program_lib.Channel(pull, program_lib.like_params, newest_only=True),
        "sums": program_lib.Channel(push, program_lib.like_params, newest_only=robust),
    }

    def init(node, params, key):
        del key  # deterministic
        zeros = jax.tree.map(jnp.zeros_like, params)
        return RFastState(
            node=jnp.asarray(node, jnp.int32),
            count=jnp.int32(0),
            x=params,
            y=params,
            z=zeros,
            g=zeros,
            v_hat=base.stack(params, m_in_pull),
            v_seq=jnp.full((m_in_pull,), -1, jnp.int32),
            sums=mixing_lib.running_sum_init(params, push.max_in_degree, push.max_out_degree),
            opt_state=opt.init(params),
        )

    def step(state, grad_fn, batch, key):
        del key  # the minibatch is the only randomness
        i, s = state.node, state.sums
        x_new = mixing_lib.pull_mix_node(self_r[i], in_r[i], state.y, state.v_hat)  # (a)
        g_new = base.gradient(grad_fn, x_new, batch)  # (b)
        absorbed, rho_tilde = mixing_lib.running_sum_absorb(s.rho_hat, s.rho_tilde)  # (c)
        # (d): z = c_ii z^{1/2}, written as c_ii z + c_ii (...) so that XLA:CPU computes it once
        # (a scaled sum is recomputed, re-reading 7 vectors, in every loop that reads it).
        c = self_c[i]
        z = jax.tree.map(
            lambda z, a, gn, go: c.astype(z.dtype) * z + c.astype(z.dtype) * (a + gn - go),
            state.z,
            absorbed,
            g_new,
            state.g,
        )
        pushed = mixing_lib.running_sum_send(
            s.rho_out if robust else jax.tree.map(jnp.zeros_like, s.rho_out), z, push_out_mask[i]
        )
        rho_out = pushed if robust else mixing_lib.running_sum_send(s.rho_out, z, push_out_mask[i])
        y, opt_state = base.descend(opt, z, state.opt_state, x_new)  # (e)
        outbox = {
            "pull": base.masked_broadcast(y, pull_out_mask[i]),
            "sums": base.outbox(pushed, push_out_mask[i]),
        }
        state = state._replace(
            count=state.count + 1,
            x=x_new,  # (f)
            y=y,
            z=z,
            g=g_new,
            sums=s._replace(rho_out=rho_out, rho_tilde=rho_tilde),
            opt_state=opt_state,
        )
        return state, program_lib.Emit(outbox=outbox)

    def receive_pull(state, msg):
        v_hat, v_seq = mixing_lib.keep_newest(state.v_hat, state.v_seq, msg.slot, msg.seq, msg.payload)
        return state._replace(v_hat=v_hat, v_seq=v_seq), program_lib.Emit()

    def receive_sums(state, msg):
        s = state.sums
        if robust:
            rho_hat, last_seq = mixing_lib.running_sum_receive(
                s.rho_hat, s.last_seq, msg.slot, msg.seq, msg.payload
            )
        else:
            # Every increment counts once; an older one arriving late is still new mass.
            k = msg.slot
            rho_hat = jax.tree.map(
                lambda h, p: h.at[k].add(p.astype(h.dtype), mode="drop"), s.rho_hat, msg.payload
            )
            last_seq = s.last_seq.at[k].max(msg.seq, mode="drop")
        return state._replace(sums=s._replace(rho_hat=rho_hat, last_seq=last_seq)), program_lib.Emit()

    return program_lib.NodeProgram(
        name=name,
        init=init,
        step=step,
        params=lambda s: s.x,
        channels=channels,
        receive={"pull": receive_pull, "sums": receive_sums},
        metrics=lambda states: {"conservation_error": rfast_conservation_error(states, robust=robust)},
        num_nodes=n,
    )
