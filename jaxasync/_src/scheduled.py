"""The schedule-first simulator: oblivious programs run as a dataflow of node events, many nodes at once.

When a program's timing cannot depend on its iterates, the whole event schedule can be drawn before any
handler runs, and events of different nodes can then be applied side by side. A program is *oblivious*
when every node is always ready (no idle workers, no servers), no receive handler sends, and no node
touches a shared object: R-FAST, DASGD and SGP are; AsGrad (the server picks who works next),
Hogwild (one shared buffer) and the cluster algorithm are not and run on the event-by-event executor
of :mod:`simulator` (as does plain SGD, which sends nothing and gains nothing from a schedule).

Phase 1 (:func:`draw_schedule`) draws every node's job completion times up front (``K`` potential jobs
per node), every potential message's delay and loss, and sorts the resulting events by time
(deliveries before jobs on ties, as in the event executor). The rank of an event in that order is its
identity: its minibatch and handler keys are ``fold_in(k, rank)``, so the result does not depend on the
order in which independent events are applied.

Phase 2 (:func:`run`) gives each node its own events in rank order and repeats *one dataflow round*:
a stage per channel, then a job stage; in each stage every node whose next event is of that kind and
ready applies it, all nodes at once under ``vmap``. A job is always ready; a delivery is ready once its
sender has completed the job that sent it (its payload waits in a small per-edge ring). Channels
declared ``newest_only`` are *collapsed* (:func:`collapsed_channels`): their deliveries get no stage;
a job first takes in, per in-slot, the newest message delivered before it (known from the schedule),
and waits only for that message's sender. How many events a round applies is bounded by causality:
on a 16-node directed ring with delays half a job long, R-FAST (both channels collapsed) applies
about 21 per round, against 12 with a stage per delivery. Each node applies its events in the same
order as a one-event-at-a-time simulation (skipping, on collapsed channels, messages its handler
would discard) and each handler sees the same inputs, so the final states equal those of the
sequential order exactly (``parallel=False`` applies the globally earliest event alone, one per
round, collapsing nothing: the reference the tests compare against). Rounds stop at barriers (every
``window`` jobs and at every record), where all nodes have processed exactly the events up to the
barrier's rank: metrics are taken on that consistent cut.

A message is *sent* only if the job's outbox mask says so: the schedule holds every potential message
and a delivery whose message was not sent is skipped. Losses, crashes (a node stops at its crash time;
deliveries to it after that are dropped) and the counters follow the event executor's definitions, so
``sent == lost + delivered + dropped + in_flight`` at every record.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import program as program_lib
from jaxasync._src import simulator

PyTree = Any
_NO_RANK = np.iinfo(np.int32).max  # padding of the per-node event tables
RANK, KIND, SRC, SLOT, JOB = range(5)  # the columns of Schedule.events


def why_not_oblivious(program: program_lib.NodeProgram, static) -> str | None:
    """The reason ``program`` cannot run on the schedule-first executor, or None if it can."""
    if program.ready is not program_lib.always_ready:
        return "its nodes are not always ready (their work depends on their state)"
    if program.shared:
        return "it uses shared objects"
    if not static.channel_names:
        return "it sends no messages"
    state = jax.eval_shape(lambda: program.init(jnp.int32(0), static.problem.init_params, jax.random.key(0)))
    for ci, cname in enumerate(static.channel_names):
        msg = program_lib.Message(jnp.int32(0), jnp.int32(0), static.payloads[ci])
        emit = jax.eval_shape(lambda s, m, c=cname: program.receive[c](s, m)[1], state, msg)
        if emit is not None and (emit.outbox or emit.ops):
            return f"its receive handler for {cname!r} sends messages or operations"
    return None


class Schedule(NamedTuple):
    """Every node's events, drawn up front (one simulation; leading seed axis when batched).

    The per-node tables hold a node's events in rank order, padded with rank ``_NO_RANK``. An event's
    integer fields sit side by side (one gather per round reads them all): ``events[..., RANK]`` is
    its position in the global time order, ``KIND`` 0 for a job and ``1 + c`` for a delivery on
    channel ``c``, ``SRC`` and ``SLOT`` a delivery's sender and the sender's out-slot, ``JOB`` the
    job's index at its node (for a delivery: the sending job's).
    """

    events: jax.Array  # int32 [n, L, 5]
    time: jax.Array  # float32 [n, L]
    lost: tuple  # per channel: bool [n, K, m], the network's loss draw of every potential message
    cuts: jax.Array  # int32 [B]: rank of the last event before each barrier
    cut_time: jax.Array  # float32 [B]: its time
    ring_needed: jax.Array  # int32: the ring depth that holds every payload until it is delivered
    short: jax.Array  # bool: some live node ran out of its K potential jobs before the last barrier
    # Collapsed channels (see `collapsed_channels`), one entry each: the sending job of the newest
    # message each in-slot has received before a node's job k (``[n, K, m_in]``) and by each barrier
    # (``[B, n, m_in]``), -1 if none; and the deliveries (row 0) and drops (row 1) by each barrier.
    newest: tuple = ()
    newest_by_cut: tuple = ()
    received_by_cut: tuple = ()  # per collapsed channel: int32 [B, 2]


def collapsed_channels(static, collapse: bool = True) -> tuple:
    """The channels whose deliveries a node takes in with its next job instead of one by one.

    A channel declared ``newest_only`` (its handler keeps the newest message per in-slot) can be
    *collapsed*: before each job a node receives, per in-slot, only the newest message delivered
    since its previous job, the one a sequential run would have kept. Its deliveries then leave the
    per-node tables, so a round is one stage (receive the newest messages, run the job) and a node
    waits only for the senders of the messages it keeps.
    """
    if not collapse:
        return ()
    return tuple(ci for ci, c in enumerate(static.channel_names) if static.program.channels[c].newest_only)


def _in_edges(static, ci: int) -> tuple:
    """Channel ``ci``'s in-slots: sender and sender's out-slot per ``[node, in-slot]`` (-1: padding)."""
    out, dst = np.asarray(static.out_tables[ci]), np.asarray(static.dst_slots[ci])
    m_in = int(dst[out >= 0].max()) + 1 if np.any(out >= 0) else 0
    src = np.full((static.n, m_in), -1, np.int32)
    slot = np.full((static.n, m_in), -1, np.int32)
    for j, s in zip(*np.nonzero(out >= 0)):
        src[out[j, s], dst[j, s]], slot[out[j, s], dst[j, s]] = j, s
    return src, slot


def _table_width(static, K: int, collapsed: tuple = ()) -> int:
    """``L``: the most events one node can have (its jobs plus its in-edges' messages)."""
    in_degree = np.zeros(static.n, np.int64)
    for ci, table in enumerate(static.out_tables):
        if ci not in collapsed:
            np.add.at(in_degree, table[table >= 0], 1)
    return int(K * (1 + in_degree.max()))


def draw_schedule(
    static, params: dict, seed, K: int, barrier_steps: np.ndarray, collapse: bool = True
) -> Schedule:
    """Phase 1: draws and sorts every potential event of ``K`` jobs per node.

    ``barrier_steps`` (increasing) are job counts (summed over nodes) at which phase 2 stops all
    nodes; a barrier's cut is the rank of the job that reaches its count (the last event if the
    schedule has fewer jobs: all nodes crashed). ``collapse``: collapse the ``newest_only``
    channels (:func:`collapsed_channels`).
    """
    n, nc = static.n, len(static.channel_names)
    k_run = simulator.root_keys(seed, static.key_impl)[1]
    k_jobs, k_msgs = jax.random.split(jax.random.fold_in(k_run, 1), 2)
    # Every draw's key folds in what it is about (job, node, out-slot), never K: more potential
    # jobs extend a schedule without changing it.
    nodes = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, K))
    jobs = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, :], (n, K))
    durations = _draws(
        static.compute_kind, _keys(k_jobs, jobs * n + nodes), params["compute_scales"][:, None]
    )
    job_time = jnp.cumsum(durations * params["stragglers"][:, None], axis=1)  # [n, K]
    job_ok = job_time < params["crash_times"][:, None]

    # Every potential event as flat columns: jobs first, then each channel's deliveries.
    cols = dict(
        time=[jnp.where(job_ok, job_time, jnp.inf).ravel()],
        origin=[jnp.where(job_ok, job_time, jnp.inf).ravel()],
        node=[nodes.ravel()],
        kind=[jnp.zeros((n * K,), jnp.int32)],
        src=[nodes.ravel()],
        slot=[jnp.zeros((n * K,), jnp.int32)],
        job=[jobs.ravel()],
    )
    lost_draws = []
    for ci in range(nc):
        table = jnp.asarray(static.out_tables[ci])  # [n, m]
        m = table.shape[1]
        k_delay, k_loss = jax.random.split(jax.random.fold_in(k_msgs, ci))
        message = (jobs * n + nodes)[:, :, None] * m + jnp.arange(m, dtype=jnp.int32)
        edge_scales = params["delay_scales"][jnp.arange(n)[:, None], jnp.maximum(table, 0)]  # [src, dst]
        delay = _draws(static.delay_kind, _keys(k_delay, message), edge_scales[:, None, :])
        lost = jax.vmap(lambda k: jax.random.bernoulli(k, params["loss"]))(_keys(k_loss, message).ravel())
        lost = lost.reshape(message.shape)
        lost_draws.append(lost)
        ok = job_ok[:, :, None] & (table[:, None, :] >= 0) & ~lost
        shape = (n, K, m)
        cols["time"].append(jnp.where(ok, job_time[:, :, None] + delay, jnp.inf).ravel())
        cols["origin"].append(jnp.broadcast_to(job_time[:, :, None], shape).ravel())
        cols["node"].append(jnp.broadcast_to(table[:, None, :], shape).ravel())
        cols["kind"].append(jnp.full((n * K * m,), 1 + ci, jnp.int32))
        cols["src"].append(jnp.broadcast_to(nodes[:, :, None], shape).ravel())
        cols["slot"].append(jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), shape).ravel())
        cols["job"].append(jnp.broadcast_to(jobs[:, :, None], shape).ravel())
    cols = {k: jnp.concatenate(v) for k, v in cols.items()}
    total = cols["time"].shape[0]

    # The global order is the event executor's: by time, deliveries before jobs on ties, except that a
    # message never precedes the job that sent it (zero delay). A stable sort by time, then the time,
    # node and index of the job an event comes from, gives exactly that: the columns list jobs before
    # deliveries (channel by channel).
    iota = jnp.arange(total, dtype=jnp.int32)
    keys = (cols["time"], cols["origin"], cols["src"], cols["job"])
    order = jax.lax.sort((*keys, iota), num_keys=4, is_stable=True)[4]
    ev = {k: v[order] for k, v in cols.items()}
    valid = jnp.isfinite(ev["time"])
    count = jnp.sum(valid).astype(jnp.int32)
    rank = jnp.arange(total, dtype=jnp.int32)

    # Barriers: the rank of the job that reaches each count (the last event if there is none).
    jobs_before = jnp.cumsum((ev["kind"] == 0) & valid).astype(jnp.int32)
    targets = jnp.asarray(barrier_steps, jnp.int32)
    cuts = jnp.minimum(jnp.searchsorted(jobs_before, targets, side="left").astype(jnp.int32), count - 1)
    cut_time = ev["time"][jnp.maximum(cuts, 0)]
    last = ev["time"][jnp.maximum(count - 1, 0)]
    final_time = jnp.where(targets[-1] <= jobs_before[-1], cut_time[-1], last)
    short = jnp.any(job_ok[:, -1] & (job_time[:, -1] <= final_time))

    # Per-node tables: stable grouping by node keeps each node's events in rank order. Deliveries
    # on collapsed channels stay in the global order (ranks are event identities) but not in tables.
    collapsed = collapsed_channels(static, collapse)
    tabled = valid
    for ci in collapsed:
        tabled &= ev["kind"] != 1 + ci
    owner = jnp.where(tabled, ev["node"], n)
    by_node = _group_by_node(owner, n)  # rank order within a node
    owner_g = owner[by_node]
    start = jnp.searchsorted(owner_g, jnp.arange(n + 1, dtype=jnp.int32), side="left").astype(jnp.int32)
    L = _table_width(static, K, collapsed)
    pos = jnp.arange(total, dtype=jnp.int32) - start[jnp.minimum(owner_g, n)]
    row = jnp.where(owner_g < n, owner_g, n)  # invalid events fall off the table (mode="drop")

    def table(values, fill):
        out = jnp.broadcast_to(fill, (n, L, *values.shape[1:])).astype(values.dtype)
        return out.at[row, pos].set(values[by_node], mode="drop")

    # The ring depth: a payload must survive until its delivery's barrier, while its sender goes on.
    job_rank = jnp.where(job_ok, _job_ranks(ev, valid, rank, n, K), _NO_RANK)
    jobs_by_cut = jax.vmap(lambda r: jnp.searchsorted(r, cuts, side="right"))(job_rank)  # [n, B]
    barrier = jnp.minimum(jnp.searchsorted(cuts, rank, side="left"), cuts.shape[0] - 1)
    sender_jobs_by_cut = jobs_by_cut[jnp.minimum(ev["src"], n - 1), barrier]
    is_delivery = tabled & (ev["kind"] > 0)
    ring_needed = jnp.max(jnp.where(is_delivery, sender_jobs_by_cut - ev["job"], 1)).astype(jnp.int32)

    # Collapsed channels: the newest message each in-slot holds before every job and at every cut.
    # ``arrival[j, s, k]``: rank at which job k's message on j's out-slot s reaches a live receiver;
    # its suffix minimum over k is nondecreasing, so the newest job whose message arrived before
    # rank r is a binary search: (number of k with suffix_min[k] < r) - 1.
    alive = ev["time"] < params["crash_times"][jnp.minimum(ev["node"], n - 1)]
    job_barrier = jnp.minimum(jnp.searchsorted(cuts, job_rank, side="left"), cuts.shape[0] - 1)
    newest, newest_by_cut, received_by_cut = [], [], []
    for ci in collapsed:
        m = static.out_tables[ci].shape[1]
        mine = valid & (ev["kind"] == 1 + ci)
        arrived = mine & alive
        arrival = jnp.full((n, m, K), _NO_RANK, jnp.int32)
        arrival = arrival.at[jnp.where(arrived, ev["src"], n), ev["slot"], ev["job"]].set(rank, mode="drop")
        suffix = jax.lax.cummin(arrival, axis=2, reverse=True)
        src, slot = (jnp.asarray(a) for a in _in_edges(static, ci))
        per_slot = suffix[jnp.maximum(src, 0), jnp.maximum(slot, 0)]  # [n, m_in, K]
        search = jax.vmap(jax.vmap(jnp.searchsorted, (0, None, None)), (0, 0, None))  # per node, slot

        def newest_before(ranks, side):  # ranks [n, R] -> [n, m_in, R]
            return jnp.where((src < 0)[:, :, None], -1, search(per_slot, ranks, side) - 1).astype(jnp.int32)

        before_job = newest_before(job_rank, "left")  # strictly before the job
        by_cut = newest_before(jnp.broadcast_to(cuts, (n, cuts.shape[0])), "right")  # up to the cut
        # A payload must survive until the barrier after the last job (or cut) that reads it.
        safe_src = jnp.maximum(src, 0)[:, :, None]
        ahead = jnp.concatenate(
            [
                jobs_by_cut[safe_src, job_barrier[:, None, :]] - before_job,
                jobs_by_cut[safe_src, jnp.arange(cuts.shape[0])] - by_cut,
            ],
            axis=2,
        )
        used = jnp.concatenate([(before_job >= 0) & (job_rank < _NO_RANK)[:, None, :], by_cut >= 0], axis=2)
        ring_needed = jnp.maximum(ring_needed, jnp.max(jnp.where(used, ahead, 1)))
        newest.append(jnp.swapaxes(before_job, 1, 2))
        newest_by_cut.append(jnp.transpose(by_cut, (2, 0, 1)))
        counts = jnp.cumsum(jnp.stack([arrived, mine & ~alive], axis=1), axis=0)  # rank order
        received_by_cut.append(counts[jnp.maximum(cuts, 0)].astype(jnp.int32))

    fields = jnp.stack([rank, ev["kind"], ev["src"], ev["slot"], ev["job"]], axis=1)
    return Schedule(
        events=table(fields, jnp.asarray([_NO_RANK, 0, 0, 0, 0], jnp.int32)),
        time=table(ev["time"], jnp.inf),
        lost=tuple(lost_draws),
        cuts=cuts,
        cut_time=cut_time,
        ring_needed=ring_needed.astype(jnp.int32),
        short=short,
        newest=tuple(newest),
        newest_by_cut=tuple(newest_by_cut),
        received_by_cut=tuple(received_by_cut),
    )


def _group_by_node(owner: jax.Array, n: int) -> jax.Array:
    """A stable sort of positions by ``owner`` (in ``[0, n]``): each node's events in rank order.

    Packed into one int32 key (``owner * total + position``, unique) when it fits: a sort of keys
    alone is several times faster on XLA:CPU than a sort that carries the positions along.
    """
    total = owner.shape[0]
    if (n + 1) * total < 2**31:
        return jnp.sort(owner * total + jnp.arange(total, dtype=jnp.int32)) % total
    return jax.lax.sort((owner, jnp.arange(total, dtype=jnp.int32)), num_keys=1, is_stable=True)[1]


def _keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """``fold_in(key, i)`` for every entry of ``index``."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, index.ravel()).reshape(index.shape)


def _draws(kind: str, keys: jax.Array, scales: jax.Array) -> jax.Array:
    """One draw of ``kind`` per key, with ``scales`` broadcast to the keys' shape."""
    scale = jnp.broadcast_to(scales, keys.shape)
    flat = jax.vmap(functools.partial(asynchrony_lib.sample, kind))(keys.ravel(), scale.ravel())
    return flat.reshape(keys.shape)


def _job_ranks(ev, valid, rank, n: int, K: int) -> jax.Array:
    """``[n, K]``: the global rank of each node's jobs (increasing in the job index)."""
    is_job = (ev["kind"] == 0) & valid
    node = jnp.where(is_job, ev["node"], n)
    return jnp.full((n, K), _NO_RANK, jnp.int32).at[node, ev["job"]].set(rank, mode="drop")


class _Ring(NamedTuple):
    """One channel's payloads in flight: ``depth`` entries per (sender, out-slot), indexed job % depth."""

    tags: jax.Array  # int32 [n, m, depth, 2]: the job that wrote the entry (-1: none) and the
    #                  message's sequence number (-1 if the job did not send on the edge)
    payload: PyTree  # leaves [n, m, depth, ...]


class _Carry(NamedTuple):
    now: jax.Array
    states: PyTree
    next: jax.Array  # int32 [n]: each node's next event in its table
    jobs_done: jax.Array  # int32 [n]
    seq: jax.Array  # int32 [C, n]
    rings: tuple
    tally: jax.Array  # int32 [4, C]: messages sent, lost, delivered, dropped (SENT, LOST, ...)
    shared: dict  # always empty (oblivious programs have no shared objects); read by the metrics
    held: tuple  # per collapsed channel: int32 [n, m_in], the sending job of the newest message taken in
    unsent: jax.Array  # int32: newest messages of collapsed channels that their job did not send
    rounds: jax.Array  # int32: rounds applied (the schedule's causal depth, plus barrier waits)


SENT, LOST, DELIVERED, DROPPED = range(4)  # the rows of _Carry.tally


def _init_carry(static, params, seed, depth: int, collapsed: tuple) -> _Carry:
    program, n, nc = static.program, static.n, len(static.channel_names)
    node_keys, _ = simulator.init_keys(seed, n, static.key_impl)
    nodes = jnp.arange(n, dtype=jnp.int32)
    states = jax.vmap(lambda i, k: program.init(i, static.problem.init_params, k))(nodes, node_keys)
    rings = []
    for ci in range(nc):
        m = static.out_tables[ci].shape[1]
        rings.append(
            _Ring(
                tags=jnp.full((n, m, depth, 2), -1, jnp.int32),
                payload=jax.tree.map(
                    lambda t: jnp.zeros((n, m, depth, *jnp.shape(t)), jnp.result_type(t)),
                    static.payloads[ci],
                ),
            )
        )
    del params  # the first jobs' times are in the schedule
    return _Carry(
        now=jnp.float32(0),
        states=states,
        next=jnp.zeros((n,), jnp.int32),
        jobs_done=jnp.zeros((n,), jnp.int32),
        seq=jnp.zeros((nc, n), jnp.int32),
        rings=tuple(rings),
        tally=jnp.zeros((4, nc), jnp.int32),
        shared={},
        held=tuple(jnp.full(_in_edges(static, ci)[0].shape, -1, jnp.int32) for ci in collapsed),
        unsent=jnp.int32(0),
        rounds=jnp.int32(0),
    )


def _round(static, params, k_events, sched: Schedule, carry: _Carry, end, parallel: bool) -> _Carry:
    """One dataflow round: a stage per (uncollapsed) channel, then a job stage.

    In each stage every node whose next event (before ``end``) is of the stage's kind and ready
    applies it, so a node can apply a delivery per channel and a job in one round, always in its own
    event order. Every stage runs one handler on all nodes at once (no batched ``switch``, which
    would run every handler for every node).
    """
    chosen = None
    if not parallel:  # the reference order: one event per round, the globally earliest ready one
        e = _next(sched, carry)
        ready = (carry.next < end) & ((e.kind == 0) | (carry.jobs_done[e.src] > e.job))
        chosen = jnp.min(jnp.where(ready, e.rank, _NO_RANK))
    collapsed = collapsed_channels(static, parallel)
    for ci in range(len(static.channel_names)):
        if ci not in collapsed:
            carry = _delivery_stage(static, params, sched, carry, end, ci, chosen)
    carry = _job_stage(static, params, k_events, sched, carry, end, chosen, collapsed)
    return carry._replace(rounds=carry.rounds + 1)


def _take_newest(static, carry: _Carry, collapsed: tuple, newest: tuple, apply):
    """Every node (``apply [n]``) receives, per in-slot of each collapsed channel, the message of
    sending job ``newest[c] [n, m_in]`` if it is newer than the one it holds (in-slot by in-slot:
    their handlers keep the newest message per slot, so the order does not matter)."""
    program = static.program
    states, held, unsent = carry.states, list(carry.held), carry.unsent
    for k, ci in enumerate(collapsed):
        src, out_slot = _in_edges(static, ci)
        ring, want = carry.rings[ci], newest[k]
        entry = want % ring.tags.shape[2]
        tags = ring.tags[jnp.asarray(src), jnp.asarray(out_slot), entry]  # [n, m_in, 2]
        new = apply[:, None] & (want > held[k])
        sent = new & (tags[..., 0] == want) & (tags[..., 1] >= 0)
        unsent += jnp.sum(new & ~sent).astype(jnp.int32)
        receive = program.receive[static.channel_names[ci]]
        for q in range(src.shape[1]):
            msg = program_lib.Message(
                jnp.full((static.n,), q, jnp.int32),
                tags[:, q, 1],
                jax.tree.map(
                    lambda p: p[jnp.asarray(src[:, q]), jnp.asarray(out_slot[:, q]), entry[:, q]],
                    ring.payload,
                ),
            )
            states = jax.vmap(lambda st, m, a: _keep_unless(a, receive(st, m)[0], st))(
                states, msg, sent[:, q]
            )
        held[k] = jnp.where(new, want, held[k])
    return carry._replace(states=states, held=tuple(held), unsent=unsent)


class _Next(NamedTuple):
    """Each node's next event (fields ``[n]``; see :class:`Schedule`)."""

    rank: jax.Array
    kind: jax.Array
    src: jax.Array
    slot: jax.Array
    job: jax.Array
    time: jax.Array


def _next(sched: Schedule, carry: _Carry) -> _Next:
    nodes = jnp.arange(carry.next.shape[0])
    at = jnp.minimum(carry.next, sched.time.shape[1] - 1)
    fields = sched.events[nodes, at]
    return _Next(*(fields[:, col] for col in (RANK, KIND, SRC, SLOT, JOB)), sched.time[nodes, at])


def _delivery_stage(static, params, sched: Schedule, carry: _Carry, end, ci: int, chosen) -> _Carry:
    """Nodes whose next event is a delivery on channel ``ci`` of a sent message receive it."""
    program = static.program
    rank, kind, src, slot, job, time = _next(sched, carry)
    ready = (carry.next < end) & (kind == 1 + ci) & (carry.jobs_done[src] > job)
    if chosen is not None:
        ready &= rank == chosen
    ring = carry.rings[ci]
    w = job % ring.tags.shape[2]
    entry_job, entry_seq = ring.tags[src, slot, w].T
    sent = ready & (entry_job == job) & (entry_seq >= 0)  # a delivery of a message never sent is skipped
    alive = time < params["crash_times"]
    msg = program_lib.Message(
        jnp.asarray(static.dst_slots[ci])[src, slot],
        entry_seq,
        jax.tree.map(lambda p: p[src, slot, w], ring.payload),
    )
    receive = program.receive[static.channel_names[ci]]

    def node_receive(state, msg, apply):
        return _keep_unless(apply, receive(state, msg)[0], state)

    states = jax.vmap(node_receive)(carry.states, msg, sent & alive)
    got = jnp.stack([jnp.sum(sent & alive), jnp.sum(sent & ~alive)]).astype(jnp.int32)
    return carry._replace(
        states=states,
        next=carry.next + ready.astype(jnp.int32),
        tally=carry.tally.at[DELIVERED:, ci].add(got),
    )


def _job_stage(
    static, params, k_events, sched: Schedule, carry: _Carry, end, chosen, collapsed: tuple = ()
) -> _Carry:
    """Nodes whose next event is a job run it; its messages wait in the rings for their deliveries.

    On collapsed channels a job first takes in the newest message of each in-slot, so it is ready
    once their senders have sent them.
    """
    program, problem = static.program, static.problem
    nodes = jnp.arange(static.n, dtype=jnp.int32)
    rank, kind, _, _, job, _ = _next(sched, carry)
    ready = (carry.next < end) & (kind == 0)
    if chosen is not None:
        ready &= rank == chosen
    newest = []
    for k, ci in enumerate(collapsed):
        want = sched.newest[k][nodes, jnp.minimum(job, sched.newest[k].shape[1] - 1)]  # [n, m_in]
        src = jnp.asarray(np.maximum(_in_edges(static, ci)[0], 0))
        ready &= jnp.all((want < 0) | (carry.jobs_done[src] > want), axis=1)
        newest.append(want)
    carry = _take_newest(static, carry, collapsed, newest, ready)

    def job_event(state, node, rank, apply):
        k_batch, k_handler = jax.random.split(jax.random.fold_in(k_events, rank))
        new, emit = program.step(state, problem.grad_fn, problem.sample(k_batch, node), k_handler)
        return _keep_unless(apply, new, state), _outboxes(static, emit)

    states, outboxes = jax.vmap(job_event)(carry.states, nodes, rank, ready)
    rings, counts, seq_step = [], [], []
    for ci, (ring, ob) in enumerate(zip(carry.rings, outboxes)):
        mask = ob.mask & (jnp.asarray(static.out_tables[ci]) >= 0) & ready[:, None]
        lost = sched.lost[ci][nodes, jnp.minimum(job, sched.lost[ci].shape[1] - 1)] & mask
        entry = jnp.where(ready, job % ring.tags.shape[2], ring.tags.shape[2])  # else: dropped write
        tags = jnp.stack(
            [jnp.broadcast_to(job[:, None], mask.shape), jnp.where(mask, carry.seq[ci][:, None], -1)], -1
        )
        rings.append(
            _Ring(
                tags=ring.tags.at[nodes, :, entry].set(tags, mode="drop"),
                payload=jax.tree.map(
                    lambda p, x: p.at[nodes, :, entry].set(x.astype(p.dtype), mode="drop"),
                    ring.payload,
                    ob.payload,
                ),
            )
        )
        counts.append(jnp.stack([jnp.sum(mask), jnp.sum(lost)]).astype(jnp.int32))
        seq_step.append(jnp.any(mask, axis=1))
    return carry._replace(
        states=states,
        next=carry.next + ready.astype(jnp.int32),
        jobs_done=carry.jobs_done + ready.astype(jnp.int32),
        seq=carry.seq + jnp.stack(seq_step).astype(jnp.int32),
        rings=tuple(rings),
        tally=carry.tally.at[:DELIVERED].add(jnp.stack(counts, axis=1)),
    )


def _keep_unless(apply, new, old):
    """One node's ``new`` state if ``apply``, else ``old``. Selected inside the handler's trace, so a
    leaf the handler leaves alone is ``select(apply, x, x)``, which XLA drops, and the others fuse
    with the computation that produces them."""
    return jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)


def _outboxes(static, emit) -> tuple:
    """A job's outbox on every channel, in channel order (an empty one where it sends nothing)."""
    outbox, _ = simulator._normalize(static, emit, {})  # oblivious programs have no operations
    return tuple(outbox[c] for c in static.channel_names)


def run(
    static,
    params: dict,
    seed,
    sched: Schedule,
    depth: int,
    num_records: int,
    barriers_per_record: int,
    parallel: bool = True,
    axis_name: str | None = None,
):
    """Phase 2: applies the schedule; returns (final carry, metrics at ``num_records + 1`` records).

    Record ``r`` is taken at barrier ``r * barriers_per_record - 1`` (record 0: the initial state).
    Under ``vmap(..., axis_name=axis_name)`` rounds go on while any simulation of the batch has work.
    """
    collapsed = collapsed_channels(static, parallel)
    carry = _init_carry(static, params, seed, depth, collapsed)
    k_events = jax.random.fold_in(simulator.root_keys(seed, static.key_impl)[1], 2)

    def barrier(carry, b):
        end = jnp.sum(sched.events[..., RANK] <= sched.cuts[b], axis=1).astype(jnp.int32)

        def work(carry):
            return jnp.any(carry.next < end)

        def cond(carry):
            if axis_name is None:
                return work(carry)
            return jax.lax.psum(work(carry).astype(jnp.int32), axis_name) > 0

        carry = jax.lax.while_loop(
            cond, lambda c: _round(static, params, k_events, sched, c, end, parallel), carry
        )
        # The cut is consistent on collapsed channels too: every node takes in what reached it.
        everyone = jnp.ones((static.n,), bool)
        carry = _take_newest(static, carry, collapsed, [t[b] for t in sched.newest_by_cut], everyone)
        tally = carry.tally
        for k, ci in enumerate(collapsed):
            tally = tally.at[DELIVERED:, ci].set(sched.received_by_cut[k][b])
        return carry._replace(now=jnp.maximum(carry.now, sched.cut_time[b]), tally=tally)

    def record(carry, r):
        first = (r - 1) * barriers_per_record
        carry = jax.lax.fori_loop(
            0, jnp.where(r > 0, barriers_per_record, 0), lambda q, c: barrier(c, first + q), carry
        )
        return carry, _metrics(static, carry, params)

    return jax.lax.scan(record, carry, jnp.arange(num_records + 1))


class _Recorded(NamedTuple):
    """What the event executor's metrics read from a carry."""

    now: jax.Array
    states: PyTree
    shared: dict
    counters: simulator.Counters


def _metrics(static, carry: _Carry, params: dict) -> dict:
    sent, lost, delivered, dropped = carry.tally
    counters = simulator.Counters(
        events=jnp.sum(carry.jobs_done) + jnp.sum(delivered) + jnp.sum(dropped),
        steps=carry.jobs_done,
        sent=sent,
        lost=lost,
        delivered=delivered,
        dropped=dropped,
        overflow=jnp.zeros_like(sent),  # rings are deep enough by construction
        bytes_sent=sent * jnp.asarray(static.payload_bytes, jnp.float32),
        bytes_lost=lost * jnp.asarray(static.payload_bytes, jnp.float32),
        staleness_sum=jnp.float32(0),  # no shared objects
        staleness_max=jnp.int32(0),
        updates=jnp.int32(0),
    )
    recorded = _Recorded(carry.now, carry.states, carry.shared, counters)
    return simulator._metrics(static, recorded, params, jnp.sum(sent - lost - delivered - dropped))


_RING_BUDGET = 256 << 20  # bytes of payload rings the default window aims at


def default_window(static) -> int:
    """Jobs between barriers: ``8 n``, fewer when messages are large.

    Between barriers a sender can run ahead of its receivers, and the rings keep its payloads until
    they are delivered: a few jobs per node of window per ring slot. The window shrinks (to ``n`` at
    least) so that the rings stay near ``_RING_BUDGET``; on small models more than ``8 n`` gains
    nothing (measured: R-FAST, n = 16, d = 100).
    """
    per_slot = sum(
        static.n * table.shape[1] * nbytes for table, nbytes in zip(static.out_tables, static.payload_bytes)
    )
    jobs_per_node = _RING_BUDGET // max(4 * per_slot, 1)
    return static.n * int(min(8, 1 << max(0, int(jobs_per_node).bit_length() - 1)))


def plan(asynchrony, n: int, total_steps: int, record_every: int, window: int):
    """Host-side sizes: ``(K, barrier_steps, barriers_per_record)``.

    ``K`` potential jobs per node cover the expected jobs of the fastest node until ``total_steps``
    jobs are done, with room for chance (:func:`records` doubles it if a draw needs more). Barriers
    fall every ``window`` jobs (:func:`default_window`) and on every record.
    """
    mean = asynchrony.compute_time.mean(n) * asynchrony.straggler_factors(n)
    rates = 1.0 / np.maximum(mean, 1e-12)
    expected = total_steps * rates.max() / rates.sum()
    K = int(min(total_steps, math.ceil(1.05 * expected + 5 * math.sqrt(expected) + 16)))
    per_record = max(1, round(record_every / window))
    num_records = -(-total_steps // record_every)
    barrier_steps = np.array(
        [
            (r - 1) * record_every + -(-q * record_every // per_record)
            for r in range(1, num_records + 1)
            for q in range(1, per_record + 1)
        ],
        np.int32,
    )
    return K, barrier_steps, per_record


def draw(static, params: dict, seeds, *, K: int, barrier_steps: np.ndarray, total_steps: int, collapse=True):
    """Phase 1, compiled (``seeds``: an int, or a 1-D array run under ``vmap``); returns ``(sched, K)``.

    If a draw needs more than ``K`` potential jobs at some node (a slow spell of the others), ``K``
    doubles and the schedule is drawn again.
    """
    batched = np.ndim(seeds) == 1
    while True:
        barriers = tuple(np.asarray(barrier_steps).tolist())
        sched = _draw_fn(static, K, barriers, batched, collapse)(params, seeds)
        if not np.any(jax.device_get(sched.short)) or K >= total_steps:
            return sched, K
        K = min(2 * K, total_steps)


@functools.lru_cache(maxsize=32)
def _draw_fn(static, K: int, barrier_steps: tuple, batched: bool, collapse: bool):
    from jaxasync._src.xla import jit

    def fn(params, seed):
        return draw_schedule(static, params, seed, K, np.asarray(barrier_steps, np.int32), collapse)

    return jit(jax.vmap(fn, (None, 0)) if batched else fn)


def ring_depth(sched: Schedule) -> int:
    """The ring depth phase 2 needs: a power of two (few distinct compiles across a sweep)."""
    return 1 << max(0, int(np.max(jax.device_get(sched.ring_needed))) - 1).bit_length()


def over_seeds(fn):
    """``fn(seed, sched)`` (a partial of :func:`run`) over a leading seed axis, under ``vmap``."""
    return jax.vmap(functools.partial(fn, axis_name=_SEEDS), axis_name=_SEEDS)


def records(
    static, params: dict, seeds, *, steps: int, record_every: int, asynchrony, window=None, parallel=True
):
    """Simulates with the schedule-first executor; returns the metric records (numpy).

    ``seeds`` is an int (one simulation) or a 1-D array (a leading seed axis, run under ``vmap``).
    """
    batched = np.ndim(seeds) == 1
    seeds = jnp.asarray(seeds, jnp.int32)
    num_records = -(-steps // record_every)
    total = num_records * record_every
    K, barrier_steps, per_record = plan(
        asynchrony, static.n, total, record_every, window or default_window(static)
    )
    sched, _ = draw(
        static, params, seeds, K=K, barrier_steps=barrier_steps, total_steps=total, collapse=parallel
    )
    fn = _compiled_run(static, ring_depth(sched), num_records, per_record, parallel, batched)
    carry, out = fn(params, seeds, sched)
    check_sent(static, carry.unsent)
    return jax.device_get(out)


@functools.lru_cache(maxsize=8)
def _compiled_run(static, depth: int, num_records: int, per_record: int, parallel: bool, batched: bool):
    """:func:`run` compiled as ``(params, seed, sched) -> (carry, records)`` (seeds under ``vmap``)."""
    from jaxasync._src.xla import jit

    def one(params, seed, sched, axis_name=None):
        return run(static, params, seed, sched, depth, num_records, per_record, parallel, axis_name)

    if batched:
        return jit(jax.vmap(functools.partial(one, axis_name=_SEEDS), (None, 0, 0), axis_name=_SEEDS))
    return jit(one)


def check_sent(static, unsent) -> None:
    """Raises if a collapsed channel's newest message was one its job did not send (``unsent``:
    the final carry's count, per seed if batched).

    Collapsing assumes a ``newest_only`` channel's step sends on every out-edge (as R-FAST's do):
    otherwise the newest message a node holds may be an older one, which the schedule cannot know.
    """
    if np.any(jax.device_get(unsent) > 0):
        names = [static.channel_names[ci] for ci in collapsed_channels(static)]
        raise ValueError(
            f"{static.program.name}: the schedule-first executor needs every step to send on every "
            f"out-edge of its newest_only channels {names}, and a step did not; use executor='events'"
        )


_SEEDS = "seeds"
