"""The schedule-first executor: same results as one event at a time, exact message accounting."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxasync as ja
from jaxasync._src import scheduled, simulator

N = 6


def _problem(batch_size=4):
    return ja.problems.least_squares(N, 5, 16, batch_size=batch_size, seed=1)


def _rfast(graph=None):
    g = graph or ja.topology.directed_ring(N)
    return ja.algorithms.rfast(g, g, learning_rate=0.05)


def _records(program, problem, asyn, steps, record_every, seeds=0, parallel=True, window=None):
    static = simulator.make_static(program, problem, asyn, None, unrolled_keys=True)
    params = simulator.make_params(asyn, simulator.num_nodes(program, problem))
    return scheduled.records(
        static,
        params,
        seeds,
        steps=steps,
        record_every=record_every,
        asynchrony=asyn,
        window=window,
        parallel=parallel,
    )


FAULTS = ja.Asynchrony(delay=ja.exponential(0.7), loss=0.2, crashes={2: 15.0}, stragglers={4: 3.0})


@pytest.mark.parametrize("graphs", ["directed_ring", "trees"])
def test_parallel_rounds_equal_the_sequential_order(graphs):
    """Nodes applying their events side by side (R-FAST's channels collapsed: one in-slot per node
    on the directed ring, up to N - 1 at the trees' root) end exactly where one event at a time
    ends."""
    problem = _problem()
    if graphs == "trees":
        program = ja.algorithms.rfast(ja.topology.out_tree(N), ja.topology.in_tree(N), learning_rate=0.05)
    else:
        program = _rfast()
    par = _records(program, problem, FAULTS, 300, 30, window=7)  # barriers every 7 jobs
    seq = _records(program, problem, FAULTS, 300, 30, parallel=False, window=7)
    for k in par:
        np.testing.assert_array_equal(par[k], seq[k], err_msg=k)
    assert par["events"][-1] > 300 and np.all(np.diff(par["loss"][:4]) < 0)


def test_message_accounting_and_crash():
    tr = ja.simulate(_rfast(), _problem(), FAULTS, steps=400, record_every=20, executor="schedule")
    assert tr.meta["simulator"] == "schedule"
    sent, lost, delivered, dropped, flight = (
        tr[k] for k in ("sent", "lost", "delivered", "dropped", "in_flight")
    )
    np.testing.assert_array_equal(sent, lost + delivered + dropped + flight)
    assert np.all(flight >= 0) and tr["overflow"][-1] == 0
    np.testing.assert_array_equal(tr["bytes_lost"], lost * 5 * 4)  # both channels carry 5 float32
    assert tr["steps"][-1] == 400 and tr["events"][-1] == 400 + delivered[-1] + dropped[-1]
    # 20% of the messages sent are lost (binomial: within 4 standard deviations)
    p = lost[-1] / sent[-1]
    assert abs(p - 0.2) < 4 * np.sqrt(0.2 * 0.8 / sent[-1])
    # node 2 stops at t = 15: no job after it, and messages to it are dropped
    crashed_at = np.searchsorted(tr["time"], 15.0)
    assert tr["node_steps"][-1, 2] == tr["node_steps"][crashed_at, 2] and dropped[-1] > 0
    assert tr["alive"][-1] == N - 1
    # the straggler (3x slower) does fewer jobs than any other live node
    live = [i for i in range(N) if i != 2]
    assert tr["node_steps"][-1, 4] == min(tr["node_steps"][-1, live])


def test_deterministic_timing_matches_the_event_executor():
    """With fixed times and full batches nothing is random: both executors end in the same place."""
    problem = _problem(batch_size=None)
    asyn = ja.Asynchrony(compute_time=ja.fixed([1.0, 1.0, 1.5, 2.0, 1.0, 3.0]), delay=ja.fixed(0.0))
    for program in (_rfast(), _rfast(ja.topology.ring(N))):
        a = ja.simulate(program, problem, asyn, steps=120, record_every=12, executor="events")
        b = ja.simulate(program, problem, asyn, steps=120, record_every=12, executor="schedule")
        for k in ("events", "steps", "node_steps", "sent", "delivered", "time"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    # fixed delays, per node and per edge; and jobs that take no time (a node's jobs and messages
    # all at one instant)
    program = _rfast()  # one compile of each executor for these specs
    for compute, delay in (
        ([1.0, 2.0, 1.0, 1.5, 1.0, 1.0], 0.5),
        ([1.0, 2.0, 1.0, 1.5, 1.0, 1.0], _edge_delays()),
        ([0.0, 1.0, 0.0, 2.0, 1.0, 0.5], 0.0),
    ):
        asyn = ja.Asynchrony(compute_time=ja.fixed(compute), delay=ja.fixed(delay))
        a = ja.simulate(program, problem, asyn, steps=90, record_every=9, executor="events")
        b = ja.simulate(program, problem, asyn, steps=90, record_every=9, executor="schedule")
        for k in ("events", "node_steps", "delivered"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        assert not np.any(a["lost"]) and not np.any(b["lost"])  # loss=0: nothing is lost


def _edge_delays():
    """Fixed per-edge delays, not symmetric, some longer than a job (exact in float32)."""
    src, dst = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    return (1 + N * src + dst) / 64 + (src + 2 * dst) % 3


def test_per_edge_delays_and_losses_in_the_schedule():
    """Every delivery the schedule holds comes at its sending job's time plus its edge's delay, and
    exactly the messages whose loss draw is False are delivered."""
    compute = np.array([1.0, 1.0, 1.5, 2.0, 1.0, 3.0], np.float32)
    asyn = ja.Asynchrony(compute_time=ja.fixed(compute), delay=ja.fixed(_edge_delays()), loss=0.3)
    program, K = _rfast(), 12
    static = simulator.make_static(program, _problem(), asyn, None, unrolled_keys=True)
    params = simulator.make_params(asyn, N)
    sched = scheduled.draw_schedule(static, params, jnp.int32(3), K, np.array([40], np.int32), collapse=False)
    events, time = np.asarray(sched.events), np.asarray(sched.time)
    node = np.broadcast_to(np.arange(N)[:, None], time.shape)
    rank, kind, src, job = (
        events[..., c] for c in (scheduled.RANK, scheduled.KIND, scheduled.SRC, scheduled.JOB)
    )
    deliveries = (rank < scheduled._NO_RANK) & (kind > 0)
    sent_at = (job + 1) * compute[src]  # fixed compute times: exact in float32
    expected = sent_at + _edge_delays().astype(np.float32)[src, node]
    np.testing.assert_array_equal(time[deliveries], expected[deliveries])
    for ci, table in enumerate(static.out_tables):
        edge = (table >= 0)[:, None, :]
        kept = np.sum(~np.asarray(sched.lost[ci]) & edge)  # of every potential message (no crash)
        assert np.sum(deliveries & (kind == 1 + ci)) == kept and 0 < kept < K * np.sum(edge)


def test_seeds_batch_and_schedule_length_do_not_change_a_trace():
    problem = _problem()
    run = functools.partial(
        ja.simulate, _rfast(), problem, FAULTS, steps=200, record_every=20, executor="schedule"
    )
    one, again, two = run(seed=5), run(seed=5), run(seeds=[4, 5])
    for k in ("events", "sent", "lost", "node_steps"):
        np.testing.assert_array_equal(one[k], two[k][1], err_msg=k)
        np.testing.assert_array_equal(one[k], again[k], err_msg=k)
    np.testing.assert_allclose(one["loss"], two["loss"][1], rtol=1e-5)
    # more potential jobs per node extend the schedule without changing it
    static = simulator.make_static(_rfast(), problem, FAULTS, None, unrolled_keys=True)
    params = simulator.make_params(FAULTS, N)
    draw = functools.partial(scheduled.draw_schedule, static, params, jnp.int32(5))
    barriers = np.array([50, 100], np.int32)
    short, long = draw(60, barriers), draw(120, barriers)
    assert not bool(short.short)
    np.testing.assert_array_equal(short.cuts, long.cuts)
    np.testing.assert_array_equal(short.cut_time, long.cut_time)


def test_executor_choice_and_errors():
    problem = _problem()
    asgrad = ja.algorithms.asgrad(num_workers=N, learning_rate=0.05)
    with pytest.raises(ValueError, match="not always ready"):
        ja.simulate(asgrad, problem, steps=30, executor="schedule")
    with pytest.raises(ValueError, match="shared objects"):
        ja.simulate(ja.algorithms.hogwild(learning_rate=0.1), problem, steps=30, executor="schedule")
    with pytest.raises(ValueError, match="executor must be"):
        ja.simulate(_rfast(), problem, steps=30, executor="fast")
    assert ja.simulate(_rfast(), problem, steps=30).meta["simulator"] == "events"


def _sometimes_silent(every):
    """R-FAST whose pull channel sends only every ``every``-th step (still declared newest_only)."""
    program = _rfast()
    step = program.step

    def quiet_step(state, grad_fn, batch, key):
        new, emit = step(state, grad_fn, batch, key)
        pull = emit.outbox["pull"]
        speak = state.count % every == 0
        outbox = dict(emit.outbox, pull=pull._replace(mask=pull.mask & speak))
        return new, emit._replace(outbox=outbox)

    return dataclasses.replace(program, step=quiet_step)


def test_collapsing_needs_every_step_to_send():
    """A newest_only channel that skips sends cannot be collapsed: a clear error, not a wrong trace."""
    problem, asyn = _problem(), ja.Asynchrony(delay=ja.exponential(0.7))
    with pytest.raises(ValueError, match="send on every out-edge of its newest_only channels"):
        ja.simulate(_sometimes_silent(3), problem, asyn, steps=200, executor="schedule")
    with pytest.raises(ValueError, match="send on every out-edge"):
        ja.sweep(lambda h: _sometimes_silent(3), problem, [(0.1, asyn)], steps=200, executor="schedule")
    # one event at a time there is nothing to collapse: the sequential order runs it
    assert ja.simulate(_sometimes_silent(3), problem, asyn, steps=200).meta["simulator"] == "events"
    np.testing.assert_array_equal(
        *(_records(_sometimes_silent(1), problem, asyn, 200, 50, parallel=p)["loss"] for p in (True, False))
    )


def test_sweep_runs_scheduled_programs_and_matches_simulate():
    problem = _problem()
    runs = [(0.05, FAULTS), (0.02, ja.Asynchrony(delay=ja.exponential(0.2)))]

    def make(h):
        g = ja.topology.directed_ring(N)
        return ja.algorithms.rfast(g, g, optimizer=optax.sgd(h))

    traces = ja.sweep(make, problem, runs, steps=120, seeds=[1, 2], record_every=12, executor="schedule")
    for (h, spec), tr in zip(runs, traces):
        assert tr.meta["simulator"] == "schedule"
        one = ja.simulate(make(h), problem, spec, steps=120, record_every=12, seed=2, executor="schedule")
        for k in ("events", "sent", "lost", "delivered", "node_steps"):
            np.testing.assert_array_equal(tr[k][1], one[k], err_msg=k)
        np.testing.assert_allclose(tr["loss"][1], one["loss"], rtol=1e-5)
    assert jax.tree.leaves(traces[0].metrics)  # records came back


@pytest.mark.parametrize("name", ["dasgd", "sgp", "rfast_nonrobust"])
def test_other_oblivious_programs_converge(name):
    from jaxasync._src.algorithms import registry

    program = registry.build(name, N, learning_rate=0.02)
    asyn = ja.Asynchrony(delay=ja.exponential(0.3))
    tr = ja.simulate(program, _problem(None), asyn, steps=600, record_every=60, executor="schedule")
    assert np.mean(tr["gap"][-5:]) < 0.2 * tr["gap"][0], tr["gap"]  # DASGD's model wobbles: a mean
    np.testing.assert_array_equal(tr["sent"], tr["lost"] + tr["delivered"] + tr["dropped"] + tr["in_flight"])


def test_rounds_are_the_events_in_order_and_fewer_side_by_side():
    """The reference order applies one event per round; side by side, a round applies many, but a
    node's jobs stay in sequence."""
    program, problem, steps = _rfast(), _problem(), 200
    static = simulator.make_static(program, problem, FAULTS, None, unrolled_keys=True)
    params = simulator.make_params(FAULTS, N)
    K, barriers, per_record = scheduled.plan(FAULTS, N, steps, steps, 7)
    finals = {}
    for parallel in (False, True):
        sched, _ = scheduled.draw(
            static, params, jnp.int32(0), K=K, barrier_steps=barriers, total_steps=steps, collapse=parallel
        )
        run = scheduled._compiled_run(static, scheduled.ring_depth(sched), 1, per_record, parallel, False)
        finals[parallel] = run(params, jnp.int32(0), sched)
        # Exactly the drawn losses of the jobs that ran (every R-FAST step sends on every out-edge).
        ran = np.arange(sched.lost[0].shape[1]) < np.asarray(finals[parallel][1]["node_steps"][-1])[:, None]
        drawn = sum(
            np.sum(np.asarray(lost) & ran[:, :, None] & (table >= 0)[:, None, :])
            for lost, table in zip(sched.lost, static.out_tables)
        )
        assert finals[parallel][1]["lost"][-1] == drawn > 0
    (carry, out), (carry_p, _) = finals[False], finals[True]
    assert int(carry.rounds) == int(out["events"][-1])
    assert int(np.max(carry_p.jobs_done)) <= int(carry_p.rounds) < int(out["events"][-1]) // 4
