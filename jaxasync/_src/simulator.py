"""A deterministic discrete-event simulator of asynchrony, compiled with XLA.

The simulator runs every node of a :class:`~jaxasync._src.program.NodeProgram` inside one jitted
function. Its carry holds the stacked node states, each node's next job completion time, a fixed-size pool
of in-flight messages per channel and the shared objects. Each iteration pops the earliest event (a
message delivery or a job completion; deliveries first on ties), runs the node's handler on its slice of
the stacked state and schedules what the handler sent: every message gets a delay and a loss draw and
takes a free pool slot. Every random draw comes from ``fold_in(seed, event_index)``, so one seed gives
one trace, bit for bit, and ``vmap`` over seeds (or anything else in the arguments) runs many
simulations at once.

Crashes: a node stops at its crash time; its pending job never completes, messages to it are dropped
(counted), messages it sent before are still delivered, and what it wrote to shared objects stays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import program as program_lib

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
    staleness_sum: jax.Array  # float32: shared-buffer updates applied between a node's read and write
    staleness_max: jax.Array  # int32
    updates: jax.Array  # int32: shared-buffer updates applied


class _Pool(NamedTuple):
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
            if spec.visible is not None:
                seen = jnp.asarray(spec.visible)[node][:, None]
                reg = reg._replace(tags=jnp.where(seen, reg.tags, -1))
            views[name] = reg
    return views


def _apply_ops(static: _Static, carry: _Carry, ops: Mapping[str, Any], node, count_staleness):
    """Applies a handler's operations; one event's buffer updates count as one update."""
    shared = dict(carry.shared)
    touched_buffer = False
    for name in static.program.shared:
        op = ops.get(name)
        if op is None:
            continue
        if isinstance(op, program_lib.BufferAdd):
            delta, _ = jax.flatten_util.ravel_pytree(op.delta)
            shared[name] = shared[name] + delta.astype(jnp.float32)
            touched_buffer = True
        elif isinstance(op, program_lib.BufferAddSparse):
            shared[name] = shared[name].at[op.indices].add(op.values.astype(jnp.float32))
            touched_buffer = True
        elif isinstance(op, program_lib.RegisterWrite):
            reg = shared[name]
            tags = reg.tags.at[node, op.slot].set(jnp.where(op.mask, op.tag, reg.tags[node, op.slot]))
            values = jax.tree.map(
                lambda v, x: v.at[node, op.slot].set(jnp.where(op.mask, x, v[node, op.slot])),
                reg.values,
                op.value,
            )
            shared[name] = program_lib.RegistersView(tags, values)
        else:
            raise TypeError(
                f"{static.program.name}: unsupported operation {type(op).__name__} on shared object {name!r}"
            )
    carry = carry._replace(shared=shared)
    if not touched_buffer:
        return carry
    c = carry.counters
    if count_staleness:  # updates applied by others since this node read the buffer
        stale = carry.version - carry.read_version[node]
        c = c._replace(
            staleness_sum=c.staleness_sum + stale.astype(jnp.float32),
            staleness_max=jnp.maximum(c.staleness_max, stale),
            updates=c.updates + 1,
        )
    return carry._replace(version=carry.version + 1, counters=c)


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
        delays = jax.vmap(lambda k: asynchrony_lib.sample(static.delay_kind, k, delay_scales[node]))(
            jax.random.split(k_delay, m)
        )
        lost = want & jax.random.bernoulli(k_loss, loss, (m,))
        go = want & ~lost
        free = jnp.nonzero(jnp.isinf(pool.time), size=m, fill_value=static.pool_size)[0]
        rank = jnp.cumsum(go) - 1
        target = jnp.where(go, free[jnp.clip(rank, 0, m - 1)], static.pool_size)
        overflow = jnp.sum(go & (target >= static.pool_size))
        slot = jnp.asarray(static.dst_slots[ci])[node]
        s = seq[ci, node]
        pools[ci] = _Pool(
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
        nsent = jnp.sum(want).astype(jnp.int32)
        c = c._replace(
            sent=c.sent.at[ci].add(nsent),
            lost=c.lost.at[ci].add(jnp.sum(lost).astype(jnp.int32)),
            overflow=c.overflow.at[ci].add(overflow.astype(jnp.int32)),
            bytes_sent=c.bytes_sent.at[ci].add(nsent * static.payload_bytes[ci]),
        )
    return carry._replace(pools=tuple(pools), seq=seq, counters=c)


def _schedule(static: _Static, carry: _Carry, node, state, key, compute_scales, stragglers, restart: bool):
    """Sets the node's next completion time: now + a draw if it is ready, inf if not.

    With ``restart=False`` (after a receive) a node that is already busy keeps its current job.
    """
    draw = asynchrony_lib.sample(static.compute_kind, key, compute_scales[node]) * stragglers[node]
    ready = static.program.ready(state)
    current = carry.step_time[node]
    if restart:
        new = jnp.where(ready, carry.now + draw, jnp.inf)
    else:
        new = jnp.where(jnp.isinf(current) & ready, carry.now + draw, current)
    return carry._replace(step_time=carry.step_time.at[node].set(new))


def _full_emit(emit):
    if emit is None:
        return program_lib.Emit()
    return emit


def _event(static: _Static, params: dict, carry: _Carry, key) -> _Carry:
    """Processes the earliest pending event (or nothing if none is pending)."""
    program, grad_fn = static.program, static.problem.grad_fn
    crash = params["crash_times"]
    heads = [jnp.min(p.time) for p in carry.pools] + [jnp.min(carry.step_time)]
    which = jnp.argmin(jnp.stack(heads))
    now = jnp.stack(heads)[which]
    if carry.log is not None:
        carry = _log_event(static, carry, which, now, crash)
    carry = carry._replace(now=jnp.where(jnp.isinf(now), carry.now, now))
    k_batch, k_handler, k_time, k_send = key
    sched = functools.partial(
        _schedule, static, compute_scales=params["compute_scales"], stragglers=params["stragglers"]
    )
    send = functools.partial(_send, static, delay_scales=params["delay_scales"], loss=params["loss"])

    def step_branch(carry):
        i = jnp.argmin(carry.step_time)

        def alive(carry):
            state = _tree_get(carry.states, i)
            # Server nodes (after the data nodes) never step; the clip keeps a traced id in range.
            batch = static.problem.sample(k_batch, jnp.minimum(i, static.problem.num_nodes - 1))
            state, emit = program.step(state, grad_fn, batch, k_handler)
            emit = _full_emit(emit)
            carry = _apply_ops(static, carry, emit.ops, i, count_staleness=True)
            state = program.observe(state, _views(static, carry.shared, i))
            carry = carry._replace(read_version=carry.read_version.at[i].set(carry.version))
            carry = send(carry, emit.outbox, i, k_send)
            carry = carry._replace(
                states=_tree_set(carry.states, i, state),
                counters=carry.counters._replace(steps=carry.counters.steps.at[i].add(1)),
            )
            return sched(carry, i, state, k_time, restart=True)

        def dead(carry):
            return carry._replace(step_time=carry.step_time.at[i].set(jnp.inf))

        return jax.lax.cond(carry.now < crash[i], alive, dead, carry)

    def deliver_branch(ci, carry):
        cname = static.channel_names[ci]
        pool = carry.pools[ci]
        m = jnp.argmin(pool.time)
        dst = pool.dst[m]
        msg = program_lib.Message(pool.slot[m], pool.seq[m], _tree_get(pool.payload, m))
        pools = list(carry.pools)
        pools[ci] = pool._replace(time=pool.time.at[m].set(jnp.inf))
        carry = carry._replace(pools=tuple(pools))

        def alive(carry):
            state = _tree_get(carry.states, dst)
            state, emit = program.receive[cname](state, msg)
            emit = _full_emit(emit)
            carry = _apply_ops(static, carry, emit.ops, dst, count_staleness=False)
            carry = send(carry, emit.outbox, dst, k_send)
            c = carry.counters
            carry = carry._replace(
                states=_tree_set(carry.states, dst, state),
                counters=c._replace(delivered=c.delivered.at[ci].add(1)),
            )
            return sched(carry, dst, state, k_time, restart=False)

        def dead(carry):
            c = carry.counters
            return carry._replace(counters=c._replace(dropped=c.dropped.at[ci].add(1)))

        return jax.lax.cond(carry.now < crash[dst], alive, dead, carry)

    branches = [functools.partial(deliver_branch, ci) for ci in range(len(static.channel_names))]
    branches += [step_branch, lambda carry: carry]
    index = jnp.where(jnp.isinf(now), len(branches) - 1, which)
    carry = jax.lax.switch(index, branches, carry)
    c = carry.counters
    return carry._replace(counters=c._replace(events=c.events + 1))


def _log_event(static: _Static, carry: _Carry, which, now, crash) -> _Carry:
    """Appends the event about to be processed to the carry's log."""
    nc = len(static.channel_names)
    nodes, srcs, seqs = [], [], []
    for pool in carry.pools:
        m = jnp.argmin(pool.time)
        nodes.append(pool.dst[m])
        srcs.append(pool.src[m])
        seqs.append(pool.seq[m])
    nodes.append(jnp.argmin(carry.step_time).astype(jnp.int32))
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


def root_keys(seed) -> tuple[jax.Array, jax.Array]:
    """``(k_init, k_run)`` of a simulation with this seed (an int or a PRNG key)."""
    key = seed
    if not jax.dtypes.issubdtype(jnp.result_type(seed), jax.dtypes.prng_key):
        key = jax.random.key(seed)
    k_init, k_run = jax.random.split(key)
    return k_init, k_run


def init_keys(seed, n: int) -> tuple[jax.Array, jax.Array]:
    """``(node_keys [n], k_time)``: the key each node's ``init`` gets, and the first-job-times key."""
    k_init, _ = root_keys(seed)
    k_nodes, k_time = jax.random.split(k_init)
    return jax.random.split(k_nodes, n), k_time


def event_keys(seed, event) -> tuple[jax.Array, ...]:
    """``(k_batch, k_handler, k_time, k_send)`` of event number ``event``.

    ``k_batch`` draws the minibatch and ``k_handler`` is the key a handler gets; any executor that
    replays a simulation derives them the same way.
    """
    _, k_run = root_keys(seed)
    return tuple(jax.random.split(jax.random.fold_in(k_run, event), 4))


def _init_carry(static: _Static, params: dict, seed, log_size: int) -> _Carry:
    program, n = static.program, static.n
    nodes = jnp.arange(n, dtype=jnp.int32)
    node_keys, k_time = init_keys(seed, n)
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
        pools.append(_Pool(jnp.full((static.pool_size,), jnp.inf, jnp.float32), z, z, z, z, payload))
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


def _metrics(static: _Static, carry: _Carry, params: dict) -> dict:
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
        in_flight=sum(jnp.sum(jnp.isfinite(p.time)) for p in carry.pools) + jnp.int32(0),
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
):
    """Runs the simulation and returns (final carry, metrics stacked over ``num_records + 1`` points).

    A record is taken every ``record_every`` completed local steps (summed over nodes), and at the
    start. A chunk stops early if no event is pending or after ``max_events_per_record`` events.
    """
    carry = _init_carry(static, params, seed, log_size)

    def chunk(carry, r):
        target = r * record_every  # r = 0 records the initial state
        start = carry.counters.events

        def cond(carry):
            pending = jnp.isfinite(jnp.min(carry.step_time))
            for p in carry.pools:
                pending |= jnp.isfinite(jnp.min(p.time))
            return (
                (jnp.sum(carry.counters.steps) < target)
                & pending
                & (carry.counters.events - start < max_events_per_record)
            )

        def body(carry):
            return _event(static, params, carry, event_keys(seed, carry.counters.events))

        carry = jax.lax.while_loop(cond, body, carry)
        return carry, _metrics(static, carry, params)

    return jax.lax.scan(chunk, carry, jnp.arange(num_records + 1))


def num_nodes(program: program_lib.NodeProgram, problem) -> int:
    """Nodes an executor runs: one per data shard, plus the program's data-less servers."""
    return problem.num_nodes + program.num_servers


def make_static(program: program_lib.NodeProgram, problem, asynchrony, pool_size: int | None) -> _Static:
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
    if pool_size is None:
        max_out = max([t.shape[1] for t in out_tables] or [1])
        pool_size = max(64, 8 * n * max_out)
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
    )


def make_params(asynchrony: asynchrony_lib.Asynchrony, n: int) -> dict:
    """The asynchrony spec as arrays (so it can be vmapped over, e.g. several loss rates)."""
    asynchrony.check_nodes(n)
    return dict(
        compute_scales=jnp.asarray(asynchrony.compute_time.scales(n)),
        delay_scales=jnp.asarray(asynchrony.delay.scales(n)),
        stragglers=jnp.asarray(asynchrony.straggler_factors(n)),
        crash_times=jnp.asarray(asynchrony.crash_times(n)),
        loss=jnp.float32(asynchrony.loss),
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
):
    """Simulates ``algorithm`` on ``problem`` under ``asynchrony`` and returns a :class:`Trace`.

    Args:
      algorithm: a :class:`NodeProgram` (from :mod:`jaxasync.algorithms`).
      problem: a :class:`jaxasync.Problem`; one node per shard.
      asynchrony: a :class:`jaxasync.Asynchrony` (default: ``Exp(1)`` compute times, no delay).
      steps: local steps (gradient jobs, summed over nodes) to simulate.
      seed: the seed of every random draw (schedule, minibatches, algorithm keys).
      seeds: several seeds run at once with ``vmap``; the trace's arrays get a leading seed axis.
      record_every: local steps between two metric records (default ``steps // 100``).
      pool_size: in-flight messages a channel can hold (default ``max(64, 8 n max_out_degree)``);
        messages beyond it are dropped and counted as ``overflow``.
      max_events: a bound on the events between two records (default ``1000 * record_every``),
        so a program that never stops talking cannot hang the simulation.

    Returns:
      A :class:`Trace` with ``time, events, steps, node_steps`` (per node), ``loss, grad_norm, gap,
      consensus, sent, lost, delivered, dropped, overflow, in_flight, bytes_sent, alive,
      staleness_mean, staleness_max`` and the algorithm's own metrics. Message counts always satisfy
      ``sent == lost + delivered + dropped + overflow + in_flight``. Same seed, same trace, bit for
      bit.
    """
    from jaxasync._src import trace as trace_lib

    asynchrony = asynchrony or asynchrony_lib.Asynchrony()
    n = num_nodes(algorithm, problem)
    algorithm.check_nodes(n)
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    record_every = record_every or max(1, steps // 100)
    num_records = -(-steps // record_every)
    max_events = max_events or 1000 * record_every
    static = make_static(algorithm, problem, asynchrony, pool_size)
    params = make_params(asynchrony, n)
    fn = functools.partial(
        run,
        static,
        params,
        num_records=num_records,
        record_every=record_every,
        max_events_per_record=max_events,
    )
    if seeds is None:
        _, records = jax.jit(fn)(jnp.int32(seed))
    else:
        _, records = jax.jit(jax.vmap(fn))(jnp.asarray(seeds, jnp.int32))
    records = jax.device_get(records)
    if np.any(records["overflow"]):
        import warnings

        warnings.warn(
            f"{algorithm.name}: {int(np.max(records['overflow'][..., -1]))} messages did "
            "not fit in the in-flight pool and were dropped; raise pool_size",
            stacklevel=2,
        )
    meta = dict(
        algorithm=algorithm.name,
        problem=getattr(problem, "name", "problem"),
        nodes=n,
        steps=steps,
        record_every=record_every,
        seed=seed if seeds is None else list(map(int, seeds)),
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
    return trace_lib.Trace(records, meta)


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

    log, count, node_params, shared = jax.device_get(jax.jit(fn)(jnp.int32(seed)))
    count = int(count)
    events = EventLog(*(np.asarray(a)[:count] for a in log))
    return Replay(events, node_params, shared, seed)
