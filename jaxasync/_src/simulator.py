"""A deterministic discrete-event simulator of asynchrony, compiled with XLA.

The simulator runs every node of a :class:`~jaxasync._src.program.NodeProgram` inside one jitted
function. Its carry holds the stacked node states, each node's next job completion time, a fixed-size pool
of in-flight messages per channel and the shared objects. Each iteration pops the earliest event (a
message delivery or a job completion; deliveries first on ties), runs the node's handler on its slice of
the stacked state and schedules what the handler sent: every message gets a delay (at its edge's
scale) and a loss draw and takes a free pool slot. Every random draw comes from
``fold_in(seed, event_index)``, so one seed gives one trace, bit for bit, and ``vmap`` over seeds (or
anything else in the arguments) runs many simulations at once.

:func:`simulate` compiles one program under one spec; :func:`sweep` compiles a program once and runs it
under many specs (and step sizes) whose arrays are arguments of the compiled function.

Crashes: a node stops at its crash time; its pending job never completes, messages to it are dropped
(counted), messages it sent before are still delivered, and what it wrote to shared objects stays.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import program as program_lib
from jaxasync._src import threefry
from jaxasync._src.xla import jit

PyTree = Any


class Counters(NamedTuple):
    """Event counts, per channel where it applies (channels in sorted name order)."""

    events: jax.Array  # int32: events processed
    steps: jax.Array  # int32 [n]: local jobs completed per node
    sent: jax.Array  # int32 [C]: messages handed to the network
    lost: jax.Array  # int32 [C]: messages lost by the network (Bernoulli loss)
    delivered: jax.Array  # int32 [C]: messages a live node received
    dropped: jax.Array  # int32 [C]: messages whose receiver had crashed
    overflow: jax.Array  # int32 [C]: messages dropped because the in-flight pool was full
    bytes_sent: jax.Array  # float32 [C]
    bytes_lost: jax.Array  # float32 [C]: bytes of the messages lost
    staleness_sum: jax.Array  # float32: shared-buffer updates applied between a node's read and write
    staleness_max: jax.Array  # int32
    updates: jax.Array  # int32: shared-buffer updates applied


class _Pool(NamedTuple):
    free: jax.Array  # int32 [M]: a stack of free slot indices (jnp.nonzero would cost O(M) per event)
    nfree: jax.Array  # int32: its height
    time: jax.Array  # float32 [M]; inf marks a free slot
    src: jax.Array  # int32 [M]
    dst: jax.Array  # int32 [M]
    slot: jax.Array  # int32 [M]: sender's slot in the receiver's in_table row
    seq: jax.Array  # int32 [M]
    payload: PyTree  # leaves [M, ...]


class _Carry(NamedTuple):
    now: jax.Array
    states: PyTree
    step_time: jax.Array
    seq: jax.Array  # int32 [C, n]
    pools: tuple
    shared: dict
    version: jax.Array  # int32: shared-buffer updates so far
    read_version: jax.Array  # int32 [n]: version when the node last read the shared buffer
    counters: Counters
    heads: tuple  # per pool: the payload of its earliest message, read after the previous event
    log: Any  # EventLog of fixed length, or None when not logging


class EventLog(NamedTuple):
    """The events a simulation processed, in order (what a replay executes).

    Attributes:
      event: int32, the event index (its random keys are ``event_keys(seed, event)``).
      kind: int32, 0 for a job completion, ``1 + c`` for a delivery on the ``c``-th channel (channels in
        sorted name order), -1 for an unused row.
      node: int32, the node that handled the event (the receiver for a delivery).
      src: int32, the sender of a delivered message (-1 for a job).
      seq: int32, the sequence number of a delivered message (-1 for a job).
      live: bool, False if the node had crashed (the event was dropped).
    """

    event: jax.Array
    kind: jax.Array
    node: jax.Array
    src: jax.Array
    seq: jax.Array
    live: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """Host-side constants of one simulation (hashable by identity, captured by the jitted code)."""

    program: program_lib.NodeProgram
    problem: Any
    n: int
    channel_names: tuple
    out_tables: tuple  # per channel: int32 [n, m]
    dst_slots: tuple  # per channel: int32 [n, m], the sender's slot at the receiver
    payload_bytes: tuple
    payloads: tuple  # per channel: the resolved payload template
    pool_size: int
    compute_kind: str
    delay_kind: str
    unravels: dict  # per Buffer name: flat -> pytree
    templates: dict  # per Buffer name: the initial pytree
    key_impl: Any  # None (JAX's threefry) or threefry.KEY_IMPL: the same bits either way


def _argmin(x: jax.Array) -> jax.Array:
    """Index of the first minimum. (XLA:CPU's argmin, a variadic reduction, is ~10x slower.)"""
    ids = jnp.arange(x.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.min(x), ids, x.shape[0]))


def _tree_get(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _tree_set(tree, i, value):
    return jax.tree.map(lambda x, v: x.at[i].set(v), tree, value)


def _init_shared(static: _Static) -> dict:
    shared = {}
    for name, spec in static.program.shared.items():
        if isinstance(spec, program_lib.Buffer):
            flat, _ = jax.flatten_util.ravel_pytree(static.templates[name])
            shared[name] = flat.astype(jnp.float32)
        else:
            tags = jnp.full((static.n, spec.slots), -1, jnp.int32)
            values = jax.tree.map(
                lambda t: jnp.zeros((static.n, spec.slots, *jnp.shape(t)), jnp.result_type(t)),
                static.templates[name],
            )
            shared[name] = program_lib.RegistersView(tags, values)
    return shared


def _views(static: _Static, shared: dict, node) -> dict:
    views = {}
    for name, spec in static.program.shared.items():
        if isinstance(spec, program_lib.Buffer):
            views[name] = static.unravels[name](shared[name])
        else:
            reg = shared[name]
            if spec.visible is not None:  # another cluster's registers read as never written
                seen = jnp.asarray(spec.visible)[node]
                reg = program_lib.RegistersView(
                    jnp.where(seen[:, None], reg.tags, -1),
                    jax.tree.map(
                        lambda v: jnp.where(seen.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v)),
                        reg.values,
                    ),
                )
            views[name] = reg
    return views


class _Op(NamedTuple):
    """A shared-object operation in a fixed form every handler returns (``active`` False: none)."""

    op: Any
    active: jax.Array


def _op_templates(static: _Static, state_spec) -> dict:
    """The structure of each shared object's operation, taken from the handlers that produce it."""
    program, found = static.program, {}
    batch = jax.eval_shape(lambda k: static.problem.sample(k, 0), jax.random.key(0))
    emits = [
        jax.eval_shape(
            lambda s, b, k: program.step(s, static.problem.grad_fn, b, k)[1],
            state_spec,
            batch,
            jax.random.key(0),
        )
    ]
    for ci, cname in enumerate(static.channel_names):
        msg = program_lib.Message(jnp.int32(0), jnp.int32(0), static.payloads[ci])
        emits.append(jax.eval_shape(lambda s, m, c=cname: program.receive[c](s, m)[1], state_spec, msg))
    for emit in emits:
        for name, op in (emit.ops if emit is not None else {}).items():
            if name not in program.shared:
                raise ValueError(f"{program.name}: operation on undeclared shared object {name!r}")
            if name in found and jax.tree.structure(found[name]) != jax.tree.structure(op):
                raise TypeError(f"{program.name}: handlers return different operations on {name!r}")
            found.setdefault(name, op)
    return found


def _normalize(static: _Static, emit, op_templates: dict):
    """Every channel's outbox and every shared object's operation, filling gaps with no-ops.

    Outboxes come out in the per-slot form (one payload per message, as the pools and the schedule
    executor's rings store them): a :class:`~jaxasync._src.program.BroadcastOutbox` is checked
    against its channel and expanded here, and only here.
    """
    emit = program_lib.Emit() if emit is None else emit
    undeclared = set(emit.outbox) - set(static.channel_names)
    if undeclared:
        raise ValueError(f"{static.program.name}: outbox on undeclared channel(s) {sorted(undeclared)}")
    outbox = {}
    for ci, cname in enumerate(static.channel_names):
        ob = emit.outbox.get(cname)
        m = static.out_tables[ci].shape[1]
        if ob is None:
            ob = program_lib.Outbox(
                jax.tree.map(
                    lambda t: jnp.zeros((m, *jnp.shape(t)), jnp.result_type(t)), static.payloads[ci]
                ),
                jnp.zeros((m,), bool),
            )
        else:
            what = f"{static.program.name}: outbox on channel {cname!r}"
            program_lib.check_outbox(ob, static.payloads[ci], m, what)
            ob = program_lib.expand_outbox(ob)
        outbox[cname] = ob
    ops = {}
    for name, spec in op_templates.items():
        op = emit.ops.get(name)
        if op is None:
            ops[name] = _Op(jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), spec), jnp.asarray(False))
        else:
            ops[name] = _Op(op, jnp.asarray(True))
    return outbox, ops


def _apply_ops(static: _Static, carry: _Carry, ops: Mapping[str, _Op], node, enabled, count_staleness):
    """Applies the active operations (if ``enabled``); one event's buffer updates count as one."""
    shared = dict(carry.shared)
    touched = jnp.asarray(False)
    for name, slot in ops.items():
        op, on = slot.op, slot.active & enabled
        if isinstance(op, program_lib.BufferAdd):
            delta, _ = jax.flatten_util.ravel_pytree(op.delta)
            shared[name] = shared[name] + jnp.where(on, delta.astype(jnp.float32), 0.0)
            touched |= on
        elif isinstance(op, program_lib.BufferAddSparse):
            values = jnp.where(on, op.values.astype(jnp.float32), 0.0)
            shared[name] = shared[name].at[op.indices].add(values)
            touched |= on
        elif isinstance(op, program_lib.RegisterWrite):
            reg, mask = shared[name], op.mask & on
            tags = reg.tags.at[node, op.slot].set(jnp.where(mask, op.tag, reg.tags[node, op.slot]))
            values = jax.tree.map(
                lambda v, x: v.at[node, op.slot].set(jnp.where(mask, x, v[node, op.slot])),
                reg.values,
                op.value,
            )
            shared[name] = program_lib.RegistersView(tags, values)
        else:
            raise TypeError(
                f"{static.program.name}: unsupported operation {type(op).__name__} on shared object {name!r}"
            )
    c = carry.counters
    stale = carry.version - carry.read_version[node]  # updates by others since this node's read
    counted = touched & count_staleness
    c = c._replace(
        staleness_sum=c.staleness_sum + jnp.where(counted, stale, 0).astype(jnp.float32),
        staleness_max=jnp.where(counted, jnp.maximum(c.staleness_max, stale), c.staleness_max),
        updates=c.updates + counted.astype(jnp.int32),
    )
    return carry._replace(shared=shared, version=carry.version + touched.astype(jnp.int32), counters=c)


def _send(
    static: _Static,
    carry: _Carry,
    outbox: Mapping[str, program_lib.Outbox],
    node,
    key,
    delay_scales,
    loss,
):
    pools, seq, c = list(carry.pools), carry.seq, carry.counters
    for ci, cname in enumerate(static.channel_names):
        ob = outbox.get(cname)
        if ob is None or static.out_tables[ci].shape[1] == 0:
            continue
        pool = pools[ci]
        dst = jnp.asarray(static.out_tables[ci])[node]
        want = ob.mask & (dst >= 0)
        m = dst.shape[0]
        k_delay, k_loss = jax.random.split(jax.random.fold_in(key, ci))
        scales = delay_scales[node, jnp.maximum(dst, 0)]  # per edge: [src, dst]
        delays = jax.vmap(functools.partial(asynchrony_lib.sample, static.delay_kind))(
            jax.random.split(k_delay, m), scales
        )
        lost = want & jax.random.bernoulli(k_loss, loss, (m,))
        go = want & ~lost
        rank = jnp.cumsum(go) - 1
        fits = go & (rank < pool.nfree)
        target = jnp.where(
            fits, pool.free[jnp.clip(pool.nfree - 1 - rank, 0, static.pool_size - 1)], static.pool_size
        )
        overflow = jnp.sum(go & ~fits)
        slot = jnp.asarray(static.dst_slots[ci])[node]
        s = seq[ci, node]
        pools[ci] = _Pool(
            free=pool.free,
            nfree=pool.nfree - jnp.sum(fits).astype(jnp.int32),
            time=pool.time.at[target].set(carry.now + delays, mode="drop"),
            src=pool.src.at[target].set(node, mode="drop"),
            dst=pool.dst.at[target].set(dst, mode="drop"),
            slot=pool.slot.at[target].set(slot, mode="drop"),
            seq=pool.seq.at[target].set(s, mode="drop"),
            payload=jax.tree.map(
                lambda p, x: p.at[target].set(x.astype(p.dtype), mode="drop"),
                pool.payload,
                ob.payload,
            ),
        )
        seq = seq.at[ci, node].add(jnp.any(want).astype(jnp.int32))
        nsent, nlost = jnp.sum(want).astype(jnp.int32), jnp.sum(lost).astype(jnp.int32)
        c = c._replace(
            sent=c.sent.at[ci].add(nsent),
            lost=c.lost.at[ci].add(nlost),
            overflow=c.overflow.at[ci].add(overflow.astype(jnp.int32)),
            bytes_sent=c.bytes_sent.at[ci].add(nsent * static.payload_bytes[ci]),
            bytes_lost=c.bytes_lost.at[ci].add(nlost * static.payload_bytes[ci]),
        )
    return carry._replace(pools=tuple(pools), seq=seq, counters=c)


def _event(static: _Static, params: dict, carry: _Carry, keys, op_templates, enabled=True) -> _Carry:
    """Processes the earliest pending event (or nothing if none is pending or not ``enabled``).

    Only the handler call sits in the ``switch``, on one node's state and one message: the stacked
    states, the message pools and the shared objects stay outside it, so XLA updates them in place
    instead of copying them through the conditional (which cost time linear in the pool size).
    """
    program, problem = static.program, static.problem
    nc = len(static.channel_names)
    crash = params["crash_times"]
    heads = jnp.stack([jnp.min(p.time) for p in carry.pools] + [jnp.min(carry.step_time)])
    which = _argmin(heads)
    now = heads[which]
    idle = jnp.isinf(now) | ~jnp.asarray(enabled, bool)
    if carry.log is not None:
        carry = _log_event(static, carry, which, now, crash)
    carry = carry._replace(now=jnp.where(idle, carry.now, now))
    k_batch, k_handler, k_time, k_send = keys

    slots = [_argmin(p.time) for p in carry.pools]
    node = jnp.stack([p.dst[m] for p, m in zip(carry.pools, slots)] + [_argmin(carry.step_time)])[which]
    is_step = which == nc
    alive = ~idle & (carry.now < crash[node])
    msgs = tuple(
        program_lib.Message(p.slot[m], p.seq[m], h) for p, m, h in zip(carry.pools, slots, carry.heads)
    )
    state = _tree_get(carry.states, node)

    def step_branch(state, msgs):
        del msgs  # a job completion reads no message
        # Server nodes (after the data nodes) never step; the clip keeps a traced id in range.
        batch = problem.sample(k_batch, jnp.minimum(node, problem.num_nodes - 1))
        state, emit = program.step(state, problem.grad_fn, batch, k_handler)
        return state, _normalize(static, emit, op_templates)

    def receive_branch(ci, state, msgs):
        state, emit = program.receive[static.channel_names[ci]](state, msgs[ci])
        return state, _normalize(static, emit, op_templates)

    def idle_branch(state, msgs):
        del msgs  # nothing happens
        return state, _normalize(static, None, op_templates)

    branches = [functools.partial(receive_branch, ci) for ci in range(nc)] + [step_branch, idle_branch]
    new_state, (outbox, ops) = jax.lax.switch(jnp.where(idle, nc + 1, which), branches, state, msgs)
    new_state = jax.tree.map(lambda a, b: jnp.where(alive, a, b), new_state, state)

    # Free the delivered message's slot, whether or not its receiver was alive.
    pools = list(carry.pools)
    for ci, (p, m) in enumerate(zip(pools, slots)):
        taken = ~idle & (which == ci)
        pools[ci] = p._replace(
            time=p.time.at[m].set(jnp.where(taken, jnp.inf, p.time[m])),
            free=p.free.at[jnp.where(taken, p.nfree, static.pool_size)].set(m, mode="drop"),
            nfree=p.nfree + taken.astype(jnp.int32),
        )
    carry = carry._replace(pools=tuple(pools))

    carry = _apply_ops(static, carry, ops, node, alive, count_staleness=is_step)
    observed = jax.lax.cond(
        is_step & alive,
        lambda s: program.observe(s, _views(static, carry.shared, node)),
        lambda s: s,
        new_state,
    )
    carry = carry._replace(
        read_version=carry.read_version.at[node].set(
            jnp.where(is_step & alive, carry.version, carry.read_version[node])
        )
    )
    outbox = {c: ob._replace(mask=ob.mask & alive) for c, ob in outbox.items()}
    carry = _send(static, carry, outbox, node, k_send, params["delay_scales"], params["loss"])

    # The node's next job: restart after a step, start an idle node that became ready after a receive.
    draw = asynchrony_lib.sample(static.compute_kind, k_time, params["compute_scales"][node])
    due = carry.now + draw * params["stragglers"][node]
    ready = program.ready(observed)
    current = carry.step_time[node]
    after_step = jnp.where(alive & ready, due, jnp.inf)
    after_receive = jnp.where(alive & jnp.isinf(current) & ready, due, current)
    next_time = jnp.where(idle, current, jnp.where(is_step, after_step, after_receive))

    c = carry.counters
    delivered = ~idle & ~is_step
    one_hot = (jnp.arange(nc) == which) & delivered
    c = c._replace(
        events=c.events + (~idle).astype(jnp.int32),
        steps=c.steps.at[node].add((is_step & alive).astype(jnp.int32)),
        delivered=c.delivered + (one_hot & alive).astype(jnp.int32),
        dropped=c.dropped + (one_hot & ~alive).astype(jnp.int32),
    )
    return carry._replace(
        heads=_heads(carry.pools),
        states=_tree_set(carry.states, node, observed),
        step_time=carry.step_time.at[node].set(next_time),
        counters=c,
    )


def _heads(pools) -> tuple:
    """Each pool's earliest payload. Read after the event's writes to the pool, not before them:
    under ``vmap`` a pool read (a gather) before its in-place write (a scatter) in the same
    iteration makes XLA copy the whole pool on every event."""
    return tuple(_tree_get(p.payload, _argmin(p.time)) for p in pools)


def _log_event(static: _Static, carry: _Carry, which, now, crash) -> _Carry:
    """Appends the event about to be processed to the carry's log."""
    nc = len(static.channel_names)
    nodes, srcs, seqs = [], [], []
    for pool in carry.pools:
        m = _argmin(pool.time)
        nodes.append(pool.dst[m])
        srcs.append(pool.src[m])
        seqs.append(pool.seq[m])
    nodes.append(_argmin(carry.step_time))
    srcs.append(jnp.int32(-1))
    seqs.append(jnp.int32(-1))
    node = jnp.stack(nodes)[which]
    kind = jnp.where(jnp.isinf(now), -1, jnp.where(which == nc, 0, which + 1))
    e = carry.counters.events
    log = carry.log
    log = EventLog(
        event=log.event.at[e].set(e, mode="drop"),
        kind=log.kind.at[e].set(kind, mode="drop"),
        node=log.node.at[e].set(node, mode="drop"),
        src=log.src.at[e].set(jnp.stack(srcs)[which], mode="drop"),
        seq=log.seq.at[e].set(jnp.stack(seqs)[which], mode="drop"),
        live=log.live.at[e].set(now < crash[node], mode="drop"),
    )
    return carry._replace(log=log)


def root_keys(seed, impl=None) -> tuple[jax.Array, jax.Array]:
    """``(k_init, k_run)`` of a simulation with this seed (an int or a PRNG key).

    An int seed makes keys of ``impl``: JAX's default Threefry, or :data:`threefry.KEY_IMPL`, the
    same bits from an unrolled hash (see :func:`make_static`).
    """
    key = seed
    if not jax.dtypes.issubdtype(jnp.result_type(seed), jax.dtypes.prng_key):
        key = jax.random.key(seed, impl=impl)
    k_init, k_run = jax.random.split(key)
    return k_init, k_run


def init_keys(seed, n: int, impl=None) -> tuple[jax.Array, jax.Array]:
    """``(node_keys [n], k_time)``: the key each node's ``init`` gets, and the first-job-times key."""
    k_init, _ = root_keys(seed, impl)
    k_nodes, k_time = jax.random.split(k_init)
    return jax.random.split(k_nodes, n), k_time


def event_keys(seed, event) -> tuple[jax.Array, ...]:
    """``(k_batch, k_handler, k_time, k_send)`` of event number ``event``.

    ``k_batch`` draws the minibatch and ``k_handler`` is the key a handler gets; any executor that
    replays a simulation derives them the same way.
    """
    return _event_keys(root_keys(seed)[1], event)


def _event_keys(k_run, event) -> tuple[jax.Array, ...]:
    return tuple(jax.random.split(jax.random.fold_in(k_run, event), 4))


def _init_carry(static: _Static, params: dict, seed, log_size: int) -> _Carry:
    program, n = static.program, static.n
    nodes = jnp.arange(n, dtype=jnp.int32)
    node_keys, k_time = init_keys(seed, n, static.key_impl)
    params0 = static.problem.init_params
    states = jax.vmap(lambda i, k: program.init(i, params0, k))(nodes, node_keys)
    shared = _init_shared(static)
    states = jax.vmap(lambda s, i: program.observe(s, _views(static, shared, i)))(states, nodes)
    ready = jax.vmap(program.ready)(states)
    draws = jax.vmap(
        lambda k, i: (
            asynchrony_lib.sample(static.compute_kind, k, params["compute_scales"][i])
            * params["stragglers"][i]
        )
    )(jax.random.split(k_time, n), nodes)
    step_time = jnp.where(ready & (params["crash_times"] > 0), draws, jnp.inf)
    pools = []
    for cname in static.channel_names:
        payload_template = static.payloads[static.channel_names.index(cname)]
        payload = jax.tree.map(
            lambda t: jnp.zeros((static.pool_size, *jnp.shape(t)), jnp.result_type(t)), payload_template
        )
        z = jnp.zeros((static.pool_size,), jnp.int32)
        free = jnp.arange(static.pool_size, dtype=jnp.int32)[::-1]
        pools.append(
            _Pool(
                free,
                jnp.int32(static.pool_size),
                jnp.full((static.pool_size,), jnp.inf, jnp.float32),
                z,
                z,
                z,
                z,
                payload,
            )
        )
    nc = len(static.channel_names)
    zc = jnp.zeros((nc,), jnp.int32)
    counters = Counters(
        events=jnp.int32(0),
        steps=jnp.zeros((n,), jnp.int32),
        sent=zc,
        lost=zc,
        delivered=zc,
        dropped=zc,
        overflow=zc,
        bytes_sent=jnp.zeros((nc,), jnp.float32),
        bytes_lost=jnp.zeros((nc,), jnp.float32),
        staleness_sum=jnp.float32(0),
        staleness_max=jnp.int32(0),
        updates=jnp.int32(0),
    )
    return _Carry(
        now=jnp.float32(0),
        states=states,
        step_time=step_time,
        seq=jnp.zeros((nc, n), jnp.int32),
        pools=tuple(pools),
        shared=shared,
        version=jnp.int32(0),
        read_version=jnp.zeros((n,), jnp.int32),
        counters=counters,
        heads=_heads(pools),
        log=None
        if not log_size
        else EventLog(
            *(jnp.full((log_size,), -1, jnp.int32) for _ in range(5)), jnp.zeros((log_size,), bool)
        ),
    )


def model(static: _Static, carry: _Carry, alive) -> PyTree:
    """The model an observer evaluates: the program's own rule, else the average of live nodes."""
    program = static.program
    if program.evaluate is not None:
        views = {
            name: (static.unravels[name](v) if name in static.unravels else v)
            for name, v in carry.shared.items()
        }
        return program.evaluate(carry.states, views)
    node_params = jax.vmap(program.params)(carry.states)
    w = alive.astype(jnp.float32) / jnp.maximum(jnp.sum(alive), 1)
    return jax.tree.map(
        lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), node_params
    )


def _metrics(static: _Static, carry, params: dict, in_flight: jax.Array) -> dict:
    """The metrics of a record (``carry`` needs ``now``, ``states``, ``shared`` and ``counters``)."""
    problem = static.problem
    alive = carry.now < params["crash_times"]
    x = model(static, carry, alive)
    node_params = jax.vmap(static.program.params)(carry.states)
    flat = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(node_params).astype(jnp.float32)
    w = alive.astype(jnp.float32) / jnp.maximum(jnp.sum(alive), 1)
    mean = w @ flat
    consensus = w @ jnp.sum(jnp.square(flat - mean), axis=1)
    loss = problem.loss(x)
    c = carry.counters
    out = dict(
        time=carry.now,
        events=c.events,
        steps=jnp.sum(c.steps),
        node_steps=c.steps,
        in_flight=in_flight,
        loss=loss,
        grad_norm=problem.grad_norm(x),
        consensus=consensus,
        gap=loss - (problem.f_star if problem.f_star is not None else jnp.nan),
        sent=jnp.sum(c.sent),
        lost=jnp.sum(c.lost),
        delivered=jnp.sum(c.delivered),
        dropped=jnp.sum(c.dropped),
        overflow=jnp.sum(c.overflow),
        bytes_sent=jnp.sum(c.bytes_sent),
        bytes_lost=jnp.sum(c.bytes_lost),
        alive=jnp.sum(alive),
        staleness_mean=c.staleness_sum / jnp.maximum(c.updates, 1),
        staleness_max=c.staleness_max,
    )
    if static.program.metrics is not None:
        for k, v in static.program.metrics(carry.states).items():
            out[k] = v
    return out


def run(
    static: _Static,
    params: dict,
    seed,
    num_records: int,
    record_every: int,
    max_events_per_record: int,
    log_size: int = 0,
    axis_name: str | None = None,
):
    """Runs the simulation and returns (final carry, metrics stacked over ``num_records + 1`` points).

    A record is taken every ``record_every`` completed local steps (summed over nodes), and at the
    start. A chunk stops early if no event is pending or after ``max_events_per_record`` events.

    Under ``vmap(..., axis_name=axis_name)`` (see :func:`over_seeds`) the event loop runs while any
    simulation of the batch has work, and one that has none processes no event. Without the name,
    a batched ``while_loop`` would keep every finished simulation's carry with a ``select``, which
    copies every loop-carried buffer (message pools, node states) on every event.
    """
    carry = _init_carry(static, params, seed, log_size)
    k_run = root_keys(seed, static.key_impl)[1]
    op_templates = _op_templates(
        static, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), carry.states)
    )

    def chunk(carry, r):
        target = r * record_every  # r = 0 records the initial state
        start = carry.counters.events

        def work(carry):
            pending = jnp.isfinite(jnp.min(carry.step_time))
            for p in carry.pools:
                pending |= jnp.isfinite(jnp.min(p.time))
            return (
                (jnp.sum(carry.counters.steps) < target)
                & pending
                & (carry.counters.events - start < max_events_per_record)
            )

        def cond(carry):
            if axis_name is None:
                return work(carry)
            return jax.lax.psum(work(carry).astype(jnp.int32), axis_name) > 0

        def body(carry):
            keys = _event_keys(k_run, carry.counters.events)
            enabled = True if axis_name is None else work(carry)  # one seed: cond just said so
            return _event(static, params, carry, keys, op_templates, enabled=enabled)

        carry = jax.lax.while_loop(cond, body, carry)
        in_flight = sum(jnp.sum(jnp.isfinite(p.time)) for p in carry.pools) + jnp.int32(0)
        return carry, _metrics(static, carry, params, in_flight)

    return jax.lax.scan(chunk, carry, jnp.arange(num_records + 1))


_SEEDS = "seeds"  # the vmap axis of over_seeds


def num_nodes(program: program_lib.NodeProgram, problem) -> int:
    """Nodes an executor runs: one per data shard, plus the program's data-less servers."""
    return problem.num_nodes + program.num_servers


def make_static(
    program: program_lib.NodeProgram, problem, asynchrony, pool_size: int | None, unrolled_keys: bool = False
) -> _Static:
    """The host-side constants of a simulation.

    ``unrolled_keys`` draws every random number through :data:`threefry.KEY_IMPL` instead of JAX's
    default Threefry: the same bits, so the same trace, at a different cost. On CPU JAX hashes with a
    rolled loop, some fifteen times per event. Under ``vmap`` each rolled loop is expensive and the
    unrolled hash makes seeds ~1.5x cheaper; for one seed the rolled loop is cheaper (and compiles
    ~2 s faster; measured with R-FAST at n = 16). So batched seeds (``simulate(seeds=...)``,
    :func:`sweep`) unroll, single runs do not.
    """
    n = num_nodes(program, problem)
    names = tuple(sorted(program.channels))
    out_tables, dst_slots, payload_bytes, payloads = [], [], [], []
    for cname in names:
        g = program.channels[cname].graph
        out_tables.append(np.asarray(g.out_table, np.int32).reshape(n, -1))
        dst_slots.append(np.asarray(g.out_recv_slot, np.int32).reshape(n, -1))
        payloads.append(program_lib.resolve(program.channels[cname].payload, problem.init_params))
        payload_bytes.append(
            sum(
                int(np.prod(jnp.shape(t))) * jnp.dtype(jnp.result_type(t)).itemsize
                for t in jax.tree.leaves(payloads[-1])
            )
        )
    if pool_size is None:  # room for 8 messages per edge of the busiest channel
        edges = max([int(np.sum(t >= 0)) for t in out_tables] or [1])
        pool_size = max(64, 8 * edges)
    unravels, templates = {}, {}
    for name, spec in program.shared.items():
        if isinstance(spec, program_lib.Buffer):
            templates[name] = problem.init_params if spec.template is None else spec.template
            unravels[name] = jax.flatten_util.ravel_pytree(templates[name])[1]
        else:
            templates[name] = program_lib.resolve(spec.template, problem.init_params)
    return _Static(
        program=program,
        problem=problem,
        n=n,
        channel_names=names,
        out_tables=tuple(out_tables),
        dst_slots=tuple(dst_slots),
        payload_bytes=tuple(payload_bytes),
        payloads=tuple(payloads),
        pool_size=pool_size,
        compute_kind=asynchrony.compute_time.kind,
        delay_kind=asynchrony.delay.kind,
        unravels=unravels,
        templates=templates,
        key_impl=threefry.KEY_IMPL if unrolled_keys else None,
    )


def make_params(asynchrony: asynchrony_lib.Asynchrony, n: int) -> dict:
    """The asynchrony spec as arrays (so it can be vmapped over, e.g. several loss rates).

    Delay scales are always per edge (``[n, n]``, ``[src, dst]``), so specs with scalar, per-node
    and per-edge delays share one compiled simulation.
    """
    asynchrony.check_nodes(n)
    return dict(
        compute_scales=jnp.asarray(asynchrony.compute_time.scales(n)),
        delay_scales=jnp.asarray(asynchrony.delay.edge_scales(n)),
        stragglers=jnp.asarray(asynchrony.straggler_factors(n)),
        crash_times=jnp.asarray(asynchrony.crash_times(n)),
        loss=jnp.float32(asynchrony.loss),
    )


def over_seeds(fn):
    """``fn(seed)`` (a partial of :func:`run`) over an array of seeds, vectorized with ``vmap``."""
    return jax.vmap(functools.partial(fn, axis_name=_SEEDS), axis_name=_SEEDS)


def _settings(program: program_lib.NodeProgram, problem, steps: int, record_every, max_events):
    """Checks a program against the problem; returns the node count and ``run``'s record settings."""
    n = num_nodes(program, problem)
    program.check_nodes(n)
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    record_every = record_every or max(1, steps // 100)
    return n, dict(
        num_records=-(-steps // record_every),
        record_every=record_every,
        max_events_per_record=max_events or 1000 * record_every,
    )


def _check_overflow(records: dict, name: str, overflow: str, stacklevel: int) -> None:
    """Warns (or raises, or does nothing: ``overflow``) if messages did not fit in a pool."""
    if overflow == "ignore" or not np.any(records["overflow"]):
        return
    message = (
        f"{name}: {int(np.max(records['overflow'][..., -1]))} messages did "
        "not fit in the in-flight pool and were dropped; raise pool_size"
    )
    if overflow == "raise":
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def _meta(program, problem, n: int, steps: int, record_every: int, asynchrony, seed) -> dict:
    """A trace's JSON-safe description of one simulation."""
    return dict(
        algorithm=program.name,
        problem=getattr(problem, "name", "problem"),
        nodes=n,
        steps=steps,
        record_every=record_every,
        seed=seed,
        asynchrony=dict(
            compute_time=[
                asynchrony.compute_time.kind,
                np.asarray(asynchrony.compute_time.scale).tolist(),
            ],
            delay=[asynchrony.delay.kind, np.asarray(asynchrony.delay.scale).tolist()],
            loss=float(asynchrony.loss),
            crashes={str(k): float(v) for k, v in (asynchrony.crashes or {}).items()},
            stragglers={str(k): float(v) for k, v in (asynchrony.stragglers or {}).items()},
        ),
        executor="simulator",
    )


def simulate(
    algorithm: program_lib.NodeProgram,
    problem,
    asynchrony=None,
    *,
    steps: int,
    seed: int = 0,
    seeds=None,
    record_every: int | None = None,
    pool_size: int | None = None,
    max_events: int | None = None,
    executor: str = "events",
):
    """Simulates ``algorithm`` on ``problem`` under ``asynchrony`` and returns a :class:`Trace`.

    The compiled simulation is cached for the same ``algorithm`` and ``problem`` objects, the same
    kinds of distributions and the same sizes: calling again with another seed, loss rate, scale or
    crash time reuses it. To compare many step sizes (new programs) or specs in one compiled call,
    use :func:`sweep`.

    Args:
      algorithm: a :class:`NodeProgram` (from :mod:`jaxasync.algorithms`).
      problem: a :class:`jaxasync.Problem`; one node per shard.
      asynchrony: a :class:`jaxasync.Asynchrony` (default: ``Exp(1)`` compute times, no delay).
      steps: local steps (gradient jobs, summed over nodes) to simulate.
      seed: the seed of every random draw (schedule, minibatches, algorithm keys).
      seeds: several seeds in one compiled call, vectorized with ``vmap``; the trace's arrays get a
        leading seed axis (each seed's trace equals its own run up to float rounding).
      record_every: local steps between two metric records (default ``steps // 100``).
      pool_size: in-flight messages a channel can hold (default ``max(64, 8 E)``, ``E`` the edges of
        the channel with most edges);
        messages beyond it are dropped and counted as ``overflow``.
      max_events: a bound on the events between two records (default ``1000 * record_every``),
        so a program that never stops talking cannot hang the simulation.
      executor: ``"events"`` (one event at a time, any program) or ``"schedule"`` (the schedule
        drawn up front and applied to all nodes at once, see :mod:`jaxasync._src.scheduled`; only
        for oblivious programs such as R-FAST, DASGD and SGP; ``pool_size`` and ``max_events`` do
        not apply). For one R-FAST simulation on 16 nodes the schedule is several times faster,
        for 8 seeds about twice as fast (``bench/sim.py``). The two draw their random numbers
        differently: same seed, same trace within an executor, not across.

    Returns:
      A :class:`Trace` with ``time, events, steps, node_steps`` (per node), ``loss, grad_norm, gap,
      consensus, sent, lost, delivered, dropped, overflow, in_flight, bytes_sent, bytes_lost, alive,
      staleness_mean, staleness_max`` and the algorithm's own metrics (``bytes_sent`` counts the
      lost messages too). Message counts always satisfy
      ``sent == lost + delivered + dropped + overflow + in_flight``. Same seed, same trace, bit for
      bit.
    """
    from jaxasync._src import scheduled
    from jaxasync._src import trace as trace_lib

    asynchrony = asynchrony or asynchrony_lib.Asynchrony()
    n, settings = _settings(algorithm, problem, steps, record_every, max_events)
    kind = _executor(executor, algorithm, problem, asynchrony)
    static = _cached_static(
        algorithm, problem, asynchrony, pool_size, unrolled_keys=seeds is not None or kind == "schedule"
    )
    params = make_params(asynchrony, n)
    if kind == "schedule":
        records = scheduled.records(
            static,
            params,
            seed if seeds is None else seeds,
            steps=steps,
            record_every=settings["record_every"],
            asynchrony=asynchrony,
        )
    else:
        fn = _compiled_run(static, tuple(settings.items()), seeds is not None)
        _, records = fn(params, jnp.asarray(seed if seeds is None else seeds, jnp.int32))
        records = jax.device_get(records)
        _check_overflow(records, algorithm.name, "warn", stacklevel=2)
    seed = seed if seeds is None else list(map(int, seeds))
    meta = _meta(algorithm, problem, n, steps, settings["record_every"], asynchrony, seed)
    meta["simulator"] = kind
    return trace_lib.Trace(records, meta)


_STATICS: collections.OrderedDict = collections.OrderedDict()  # the newest few, by object identity


def _cached_static(program, problem, asynchrony, pool_size, unrolled_keys: bool) -> _Static:
    """:func:`make_static`, the same object again for the same program and problem objects (so the
    compiled functions keyed by it are reused). The entry holds both, so their ids stay theirs."""
    key = (
        id(program),
        id(problem),
        asynchrony.compute_time.kind,
        asynchrony.delay.kind,
        pool_size,
        unrolled_keys,
    )
    static = _STATICS.get(key)
    if static is None or static.program is not program or static.problem is not problem:
        static = _STATICS[key] = make_static(program, problem, asynchrony, pool_size, unrolled_keys)
        while len(_STATICS) > 8:
            _STATICS.popitem(last=False)
    _STATICS.move_to_end(key)
    return static


@functools.lru_cache(maxsize=8)
def _compiled_run(static: _Static, settings: tuple, batched: bool):
    """``run`` compiled as ``(params, seed) -> (carry, records)``; seeds under ``vmap`` if batched."""

    def one(params, seed, axis_name=None):
        return run(static, params, seed, **dict(settings), axis_name=axis_name)

    if batched:
        return jit(jax.vmap(functools.partial(one, axis_name=_SEEDS), (None, 0), axis_name=_SEEDS))
    return jit(one)


def _executor(executor: str, program, problem, asynchrony) -> str:
    """Checks the executor a simulation asks for (``"events"`` or ``"schedule"``) and returns it."""
    from jaxasync._src import scheduled

    if executor not in ("events", "schedule"):
        raise ValueError(f"executor must be 'events' or 'schedule', got {executor!r}")
    if executor == "schedule":
        why = scheduled.why_not_oblivious(program, make_static(program, problem, asynchrony, 1))
        if why is not None:
            raise ValueError(f"{program.name} cannot run on the schedule-first executor: {why}")
    return executor


def _seed_lists(seeds, num_runs: int) -> list[list[int]]:
    """``seeds`` (one list for every run, or one list per run) as one list of ints per run."""
    seeds = [np.asarray(s).tolist() for s in seeds]
    if all(isinstance(s, int) for s in seeds):
        lists = [seeds] * num_runs
    elif all(isinstance(s, list) and all(isinstance(x, int) for x in s) for s in seeds):
        if len(seeds) != num_runs:
            raise ValueError(f"sweep: {len(seeds)} seed lists given for {num_runs} runs")
        lists = seeds
    else:
        raise TypeError("sweep: seeds must be a list of ints, or one list of ints per run")
    if any(not s for s in lists):
        raise ValueError("sweep: every run needs at least one seed")
    return lists


def sweep(
    algorithm,
    problem,
    runs: Sequence,
    *,
    steps: int,
    seeds: Sequence[int] | Sequence[Sequence[int]] = (0,),
    record_every: int | None = None,
    pool_size: int | None = None,
    max_events: int | None = None,
    return_states: bool = False,
    overflow: str = "warn",
    on_run: Callable[[], None] | None = None,
    executor: str = "events",
):
    """Simulates one program under many asynchrony specs (and step sizes) with one XLA compile.

    :func:`simulate` bakes the program and the asynchrony spec into its compiled function, so every
    setting costs another compile (seconds each on a small CPU). ``sweep`` compiles the event loop
    once with the spec's arrays (scales, stragglers, crash times, loss rate), the seed and the step
    size as *arguments*, then runs the runs one after the other, each run's seeds at once under
    ``vmap`` (a run's seed lists of one length compile once).

    A run with the same program, spec and seeds gives the same trace as :func:`simulate` with
    ``seeds=`` those seeds.

    Example::

        problem = jaxasync.problems.least_squares(8, 10, 64)
        ring = jaxasync.topology.ring(8)
        make = lambda h: jaxasync.algorithms.dpsgd(ring, optimizer=optax.sgd(h))
        runs = [(h, jaxasync.Asynchrony(delay=jaxasync.exponential(d)))
                for h in (0.01, 0.1) for d in (0.1, 1.0)]
        traces = jaxasync.sweep(make, problem, runs, steps=2000, seeds=[0, 1, 2])
        for (h, spec), trace in zip(runs, traces):
            print(h, spec.delay.scale, trace.final("loss").mean())  # loss shaped [3 seeds, records]

    Args:
      algorithm: a :class:`NodeProgram`, or a function ``h -> NodeProgram`` of the step size. The
        function is called inside the compiled function with ``h`` a traced float32 scalar, so it
        may use ``h`` only in traced arithmetic (``optimizer=optax.sgd(h)`` works; an argument that
        must be a Python float does not), and the program's structure (graphs, channels, state
        shapes) must not depend on ``h``. It is also called once outside, with the first run's
        ``h``, to check the program against the problem.
      problem: a :class:`jaxasync.Problem`; one node per shard.
      runs: for a :class:`NodeProgram`, :class:`jaxasync.Asynchrony` specs (None: the default spec);
        for a function, ``(h, asynchrony)`` pairs. The specs may differ in scales, stragglers,
        crashes and loss rates but must share their compute-time and delay distribution kinds
        (they are compiled in).
      steps: local steps (gradient jobs, summed over nodes) per simulation.
      seeds: the seeds of every run, or one list of seeds per run.
      record_every: local steps between two metric records (default ``steps // 100``).
      pool_size: in-flight messages a channel can hold (default as in :func:`simulate`).
      max_events: a bound on the events between two records (default ``1000 * record_every``).
      return_states: also return every run's final node states.
      overflow: what a run whose messages did not fit in the in-flight pool does: ``"warn"``
        (like :func:`simulate`), ``"raise"`` (RuntimeError) or ``"ignore"``.
      on_run: called with no argument after every simulation (progress reporting).
      executor: ``"events"`` or ``"schedule"``, as for :func:`simulate`.

    Returns:
      One :class:`Trace` per run, in order, whose metrics have a leading seed axis (``[seeds,
      records]``, like ``simulate(seeds=...)``) and whose ``meta`` holds the run's spec, seeds and
      ``step_size`` (for a function). With ``return_states``, ``(trace, states)`` pairs instead,
      ``states`` the final node states with leaves shaped ``[seeds, nodes, ...]`` (numpy).

    Raises:
      ValueError: specs with different distribution kinds, a node count the program or a spec does
        not fit, ``steps <= 0``, or seed lists that do not match the runs.
      TypeError: runs of the wrong form for ``algorithm``.
      RuntimeError: with ``overflow="raise"``, a run overflowed its in-flight pool.
    """
    from jaxasync._src import trace as trace_lib

    if overflow not in ("warn", "raise", "ignore"):
        raise ValueError(f"sweep: overflow must be 'warn', 'raise' or 'ignore', got {overflow!r}")
    runs = list(runs)
    if isinstance(algorithm, program_lib.NodeProgram):
        if any(not (spec is None or isinstance(spec, asynchrony_lib.Asynchrony)) for spec in runs):
            raise TypeError(
                "sweep: runs of a NodeProgram are Asynchrony specs; pass a function h -> NodeProgram "
                "to sweep step sizes with (h, asynchrony) pairs"
            )
        step_sizes = [None] * len(runs)
        specs = list(runs)
    elif callable(algorithm):
        if any(not isinstance(r, tuple | list) or len(r) != 2 for r in runs):
            raise TypeError("sweep: runs of a function h -> NodeProgram are (h, asynchrony) pairs")
        step_sizes = [float(h) for h, _ in runs]
        specs = [spec for _, spec in runs]
    else:
        raise TypeError(f"sweep: expected a NodeProgram or a function h -> NodeProgram, got {algorithm!r}")
    if not runs:
        return []
    specs = [asynchrony_lib.Asynchrony() if spec is None else spec for spec in specs]
    kinds = {(spec.compute_time.kind, spec.delay.kind) for spec in specs}
    if len(kinds) != 1:
        raise ValueError(f"sweep: the specs must share distribution kinds, got {sorted(kinds)}")
    seed_lists = _seed_lists(seeds, len(runs))
    if isinstance(algorithm, program_lib.NodeProgram):
        program = algorithm
    else:
        program = algorithm(jnp.float32(step_sizes[0]))
        if not isinstance(program, program_lib.NodeProgram):
            raise TypeError(f"sweep: the function returned {type(program).__name__}, not a NodeProgram")
    n, settings = _settings(program, problem, steps, record_every, max_events)
    kind = _executor(executor, program, problem, specs[0])
    if algorithm is program:  # built once, outside: only the spec's arrays and the seed are traced
        static = make_static(program, problem, specs[0], pool_size, unrolled_keys=True)

    def build(h) -> _Static:  # seeds under vmap: unrolled keys (see make_static)
        if algorithm is program:
            return static
        return make_static(algorithm(h), problem, specs[0], pool_size, unrolled_keys=True)

    @jit
    def many(h, params, seeds):
        def one(seed, axis_name=None):
            carry, records = run(build(h), params, seed, axis_name=axis_name, **settings)
            return (carry.states if return_states else None), records

        return over_seeds(one)(seeds)

    if kind == "schedule":
        many = _sweep_scheduled(build, program, problem, specs, n, settings, return_states)

    out = []
    for h, spec, run_seeds in zip(step_sizes, specs, seed_lists):
        params = make_params(spec, n)
        h_arg = None if h is None else jnp.float32(h)
        states, records = jax.device_get(many(h_arg, params, jnp.asarray(run_seeds, jnp.int32)))
        for _ in run_seeds if on_run is not None else ():
            on_run()
        _check_overflow(records, program.name, overflow, stacklevel=2)
        meta = _meta(program, problem, n, steps, settings["record_every"], spec, list(run_seeds))
        meta["simulator"] = kind
        if h is not None:
            meta["step_size"] = h
        trace = trace_lib.Trace(records, meta)
        out.append((trace, states) if return_states else trace)
    return out


def _sweep_scheduled(build, program, problem, specs, n: int, settings: dict, return_states: bool):
    """``sweep``'s compiled run for the schedule-first executor: ``(h, params, seeds) -> (states, records)``.

    Every run draws its schedule with the same sizes (the largest any spec needs), so the two phases
    compile once, or again only when a run needs a deeper message ring.
    """
    from jaxasync._src import scheduled

    record_every = settings["record_every"]
    total = settings["num_records"] * record_every
    static = make_static(program, problem, specs[0], None, unrolled_keys=True)
    window = scheduled.default_window(static)
    plans = [scheduled.plan(spec, n, total, record_every, window) for spec in specs]
    K = max(p[0] for p in plans)
    _, barrier_steps, per_record = plans[0]

    @functools.lru_cache(maxsize=8)
    def apply(depth: int):
        @jit
        def fn(h, params, seeds, sched):
            def one(seed, sched, axis_name=None):
                carry, records = scheduled.run(
                    build(h),
                    params,
                    seed,
                    sched,
                    depth,
                    settings["num_records"],
                    per_record,
                    axis_name=axis_name,
                )
                return (carry.states if return_states else None), records, carry.unsent

            return scheduled.over_seeds(one)(seeds, sched)

        return fn

    depth = 16  # rings at least this deep, and never shallower than an earlier run's: few compiles

    def many(h, params, seeds):
        nonlocal K, depth
        sched, K = scheduled.draw(static, params, seeds, K=K, barrier_steps=barrier_steps, total_steps=total)
        depth = max(depth, scheduled.ring_depth(sched))
        states, records, unsent = apply(depth)(h, params, seeds, sched)
        scheduled.check_sent(static, unsent)
        return states, records

    return many


class Replay(NamedTuple):
    """What a replay needs: the processed events in order, and the end state to compare against.

    Attributes:
      events: an :class:`EventLog` of numpy arrays, trimmed to the events processed.
      node_params: every node's ``params(state)`` at the end (leaves with a leading node axis).
      shared: the shared objects at the end (Buffers as pytrees, Registers as RegistersView).
      seed: the seed the keys derive from (see :func:`event_keys`).
    """

    events: EventLog
    node_params: PyTree
    shared: dict
    seed: int


def record(
    algorithm: program_lib.NodeProgram,
    problem,
    asynchrony=None,
    *,
    steps: int,
    seed: int = 0,
    pool_size: int | None = None,
    max_events: int | None = None,
) -> Replay:
    """Simulates like :func:`simulate` and returns the event log and final states for a replay.

    A real executor that processes ``events`` in order, deriving keys with :func:`init_keys` and
    :func:`event_keys`, drives the same handlers on the same inputs and must end in ``node_params``.
    """
    asynchrony = asynchrony or asynchrony_lib.Asynchrony()
    n = num_nodes(algorithm, problem)
    algorithm.check_nodes(n)
    static = make_static(algorithm, problem, asynchrony, pool_size)
    params = make_params(asynchrony, n)
    max_events = max_events or 1000 * steps
    log_size = max_events

    def fn(seed):
        carry, _ = run(
            static,
            params,
            seed,
            num_records=1,
            record_every=steps,
            max_events_per_record=max_events,
            log_size=log_size,
        )
        views = {
            name: (static.unravels[name](v) if name in static.unravels else v)
            for name, v in carry.shared.items()
        }
        return carry.log, carry.counters.events, jax.vmap(algorithm.params)(carry.states), views

    log, count, node_params, shared = jax.device_get(jit(fn)(jnp.int32(seed)))
    count = int(count)
    events = EventLog(*(np.asarray(a)[:count] for a in log))
    return Replay(events, node_params, shared, seed)
