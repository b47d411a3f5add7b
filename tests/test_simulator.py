"""The simulator: determinism, exact event counts, crashes, loss, and bad specifications."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src import program as program_lib


class _GossipState(NamedTuple):
    x: jax.Array
    node: jax.Array


def _gossip(graph, lr=0.1):
    """A tiny test program: SGD step, then average with the newest value heard from each neighbour."""
    channel = ja.Channel(graph, jnp.zeros(3))

    def init(node, params, key):
        del key  # deterministic
        return _GossipState(params, node)

    def step(state, grad_fn, batch, key):
        del key
        x = state.x - lr * grad_fn(state.x, batch)
        ob = program_lib.broadcast_outbox(channel, state.node, x)
        return state._replace(x=x), ja.Emit(outbox={"x": ob})

    def receive(state, msg):
        return state._replace(x=0.5 * (state.x + msg.payload)), ja.Emit()

    return ja.NodeProgram(
        "gossip", init, step, lambda s: s.x, channels={"x": channel}, receive={"x": receive}
    )


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(n):
        a = rng.normal(size=(16, 3)).astype(np.float32)
        shards.append({"a": a, "b": (a @ np.ones(3)).astype(np.float32)})
    loss = lambda x, d: 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)
    return ja.Problem(loss, jnp.zeros(3), shards, batch_size=4)


N = 4
RING = ja.topology.ring(N)


def test_same_seed_same_trace_bitwise():
    asyn = ja.Asynchrony(delay=ja.exponential(0.5), loss=0.2)
    a = ja.simulate(_gossip(RING), _problem(N), asyn, steps=200, seed=3)
    b = ja.simulate(_gossip(RING), _problem(N), asyn, steps=200, seed=3)
    c = ja.simulate(_gossip(RING), _problem(N), asyn, steps=200, seed=4)
    for k in a.metrics:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["loss"], c["loss"])


@pytest.mark.parametrize("executor", ["events", "schedule"])
def test_a_second_call_reuses_the_compiled_simulation(executor):
    """Same program and problem objects, another seed and loss rate: no new compile, and the same
    trace as a cold cache gives."""
    from jaxasync._src import scheduled, simulator

    program, problem = _gossip(ja.topology.directed_ring(N)), _problem(N)
    runs = simulator._compiled_run if executor == "events" else scheduled._compiled_run
    kw = dict(steps=120, record_every=40, executor=executor)
    ja.simulate(program, problem, ja.Asynchrony(loss=0.1), seed=1, **kw)
    before = runs.cache_info()
    warm = ja.simulate(program, problem, ja.Asynchrony(loss=0.3), seed=2, **kw)
    after = runs.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    runs.cache_clear()
    simulator._STATICS.clear()
    cold = ja.simulate(program, problem, ja.Asynchrony(loss=0.3), seed=2, **kw)
    for k in cold.metrics:
        np.testing.assert_array_equal(warm[k], cold[k], err_msg=k)


def test_converges_and_counts_messages_exactly():
    asyn = ja.Asynchrony(delay=ja.exponential(0.5), loss=0.3)
    tr = ja.simulate(_gossip(RING), _problem(N), asyn, steps=1000, seed=0)
    assert tr["loss"][-1] < 1e-3 * tr["loss"][0]
    # Every message is accounted for, at every record.
    np.testing.assert_array_equal(
        tr["sent"], tr["lost"] + tr["delivered"] + tr["dropped"] + tr["overflow"] + tr["in_flight"]
    )
    # Each step broadcasts to both ring neighbours.
    assert tr["sent"][-1] == 2 * tr["steps"][-1]
    assert 0.25 < tr["lost"][-1] / tr["sent"][-1] < 0.35  # Bernoulli(0.3) over ~2000 draws
    assert tr["overflow"][-1] == 0
    assert tr["bytes_sent"][-1] == tr["sent"][-1] * 3 * 4
    np.testing.assert_array_equal(tr["bytes_lost"], tr["lost"] * 3 * 4)  # one channel: 3 float32


def test_fixed_compute_times_and_stragglers_give_exact_step_counts():
    asyn = ja.Asynchrony(compute_time=ja.fixed(1.0), stragglers={0: 4.0})
    tr = ja.simulate(_gossip(RING), _problem(N), asyn, steps=130, record_every=10, seed=0)
    # By time T, node 0 (4x slower) has completed floor(T / 4) jobs, the others floor(T).
    t = tr["time"][-1]
    np.testing.assert_array_equal(tr["node_steps"][-1], [t // 4, t, t, t])


def test_crash_schedule_is_applied():
    asyn = ja.Asynchrony(compute_time=ja.fixed(1.0), crashes={2: 10.5})
    # 190 steps end exactly at t = 60: 4 * 10 before the crash, then 3 * 50.
    tr = ja.simulate(_gossip(RING), _problem(N), asyn, steps=190, record_every=10, seed=0)
    assert tr["time"][-1] == 60
    steps = tr["node_steps"]
    assert steps[-1, 2] == 10  # jobs done at t = 1..10, none after the crash at 10.5
    np.testing.assert_array_equal(steps[-1, [0, 1, 3]], [tr["time"][-1]] * 3)
    after = tr["time"] > 10.5
    np.testing.assert_array_equal(tr["alive"][after], N - 1)
    np.testing.assert_array_equal(tr["alive"][tr["time"] < 10.5], N)
    # Both neighbours of node 2 keep sending to it after the crash, one message each per step; the
    # record is taken right after node 3's last step, whose two messages are still in flight.
    assert tr["in_flight"][-1] == 2
    assert tr["dropped"][-1] == 2 * (tr["time"][-1] - 10) - 1


def test_seeds_under_vmap():
    asyn = ja.Asynchrony(delay=ja.exponential(0.5))
    tr = ja.simulate(_gossip(RING), _problem(N), asyn, steps=100, seeds=[0, 1, 2])
    assert tr["loss"].shape == (3, 101) and tr.num_seeds == 3
    # The seeds reach each record after different numbers of events; one that is done waits (processes
    # nothing) while the others catch up, so every seed's counts are its own run's.
    assert len({int(e) for e in tr["events"][:, 50]}) > 1
    for i, seed in enumerate([0, 1, 2]):
        one = ja.simulate(_gossip(RING), _problem(N), asyn, steps=100, seed=seed)
        np.testing.assert_allclose(tr["loss"][i], one["loss"], rtol=1e-5)
        for k in ("events", "steps", "node_steps", "sent", "delivered", "in_flight"):
            np.testing.assert_array_equal(tr[k][i], one[k], err_msg=k)


def test_trace_save_load_roundtrip(tmp_path):
    tr = ja.simulate(_gossip(RING), _problem(N), steps=50, seed=0)
    for name in ("t.json", "t.npz"):
        tr.save(tmp_path / name)
        back = ja.Trace.load(tmp_path / name)
        assert back.meta == tr.meta
        for k in tr.metrics:
            np.testing.assert_array_equal(back[k], tr[k])
    tr.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ja.Asynchrony(compute_time=ja.fixed(-1.0)), "non-negative"),
        (lambda: ja.Asynchrony(delay=ja.exponential([1.0, -2.0])), "non-negative"),
        (lambda: ja.Asynchrony(loss=1.0), "loss"),
        (lambda: ja.Asynchrony(loss=-0.1), "loss"),
        (lambda: ja.Asynchrony(crashes={-1: 3.0}), "crashes"),
        (lambda: ja.Asynchrony(stragglers={0: 0.0}), "stragglers"),
        (lambda: ja.Distribution("gamma", 1.0), "unknown distribution"),
    ],
)
def test_bad_asynchrony_specs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_node_ids_and_wrong_lengths():
    with pytest.raises(ValueError, match="unknown node id"):
        ja.simulate(_gossip(RING), _problem(N), ja.Asynchrony(crashes={7: 1.0}), steps=10)
    with pytest.raises(ValueError, match="3 scales given for 4 nodes"):
        ja.simulate(_gossip(RING), _problem(N), ja.Asynchrony(compute_time=ja.fixed([1, 2, 3])), steps=10)
    with pytest.raises(ValueError, match=r"per-edge scales of shape \(3, 3\) given for 4 nodes"):
        ja.simulate(_gossip(RING), _problem(N), ja.Asynchrony(delay=ja.fixed(np.ones((3, 3)))), steps=10)
    with pytest.raises(ValueError, match="built for 4 nodes but 3"):
        ja.simulate(_gossip(RING), _problem(3), steps=10)


def test_mismatched_shards():
    loss = lambda x, d: jnp.mean(d["a"] @ x)
    with pytest.raises(ValueError, match="shard 1 has structure"):
        ja.Problem(loss, jnp.zeros(2), [{"a": np.ones((3, 2))}, {"b": np.ones((3, 2))}])
    with pytest.raises(ValueError, match="example shape"):
        ja.Problem(loss, jnp.zeros(2), [{"a": np.ones((3, 2))}, {"a": np.ones((3, 5))}])
    with pytest.raises(ValueError, match="equal shard sizes"):
        ja.Problem(loss, jnp.zeros(2), [{"a": np.ones((3, 2))}, {"a": np.ones((4, 2))}])


def test_sweep_matches_simulate_and_compiles_once():
    problem = _problem(N)
    traced = []

    def make(h):
        traced.append(isinstance(h, jax.core.Tracer))
        return _gossip(RING, lr=h)

    specs = [
        ja.Asynchrony(delay=ja.exponential(0.5), loss=0.2),
        ja.Asynchrony(delay=ja.exponential(0.3), stragglers={1: 3.0}),
        ja.Asynchrony(delay=ja.exponential(0.5), crashes={2: 20.0}),
    ]
    runs = [(0.1, specs[0]), (0.05, specs[1]), (0.2, specs[2])]
    calls = []
    traces = ja.sweep(
        make, problem, runs, steps=120, seeds=[3, 4], record_every=10, on_run=lambda: calls.append(1)
    )
    assert traced == [False, True]  # one concrete call for the checks, one trace for every run
    assert len(traces) == 3 and len(calls) == 6
    for (h, spec), tr in zip(runs, traces):
        assert tr["loss"].shape == (2, 13) and tr.num_seeds == 2
        assert tr.meta["step_size"] == h and tr.meta["seed"] == [3, 4]
        one = ja.simulate(_gossip(RING, lr=h), problem, spec, steps=120, record_every=10, seed=4)
        for k in ("events", "steps", "sent", "lost", "delivered", "dropped", "node_steps"):
            np.testing.assert_array_equal(tr[k][1], one[k], err_msg=k)
        np.testing.assert_allclose(tr["time"][1], one["time"], rtol=1e-6)
        np.testing.assert_allclose(tr["loss"][1], one["loss"], rtol=1e-5)

    # A NodeProgram (no step size): one run per spec; per-run seed lists; the final states.
    out = ja.sweep(_gossip(RING), problem, specs[:2], steps=60, seeds=[[0], [1, 2]], return_states=True)
    (tr0, states0), (tr1, states1) = out
    assert tr0["loss"].shape == (1, 61) and tr1["loss"].shape == (2, 61)
    assert states0.x.shape == (1, N, 3) and states1.x.shape == (2, N, 3)
    assert states1.node.tolist() == [list(range(N))] * 2
    one = ja.simulate(_gossip(RING), problem, specs[1], steps=60, seed=2)
    for k in one.metrics:  # the same events; floats up to rounding (vmapped vs one seed)
        if np.issubdtype(one[k].dtype, np.integer):
            np.testing.assert_array_equal(tr1[k][1], one[k], err_msg=k)
        else:
            np.testing.assert_allclose(tr1[k][1], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sweep_checks_its_arguments():
    problem = _problem(N)
    with pytest.raises(ValueError, match="distribution kinds"):
        ja.sweep(
            _gossip(RING),
            problem,
            [ja.Asynchrony(delay=ja.exponential(0.5)), ja.Asynchrony(delay=ja.fixed(0.5))],
            steps=10,
        )
    with pytest.raises(ValueError, match="built for 4 nodes but 3"):
        ja.sweep(_gossip(RING), _problem(3), [None], steps=10)
    with pytest.raises(TypeError, match="pairs"):
        ja.sweep(lambda h: _gossip(RING, lr=h), problem, [ja.Asynchrony()], steps=10)
    with pytest.raises(TypeError, match="Asynchrony specs"):
        ja.sweep(_gossip(RING), problem, [(0.1, ja.Asynchrony())], steps=10)
    with pytest.raises(ValueError, match="2 seed lists given for 1 runs"):
        ja.sweep(_gossip(RING), problem, [None], steps=10, seeds=[[0], [1]])
    # A pool of one message per channel overflows: a warning by default, an error on request.
    with pytest.warns(UserWarning, match="in-flight pool"):
        ja.sweep(_gossip(RING), problem, [None], steps=20, pool_size=1, executor="events")
    with pytest.raises(RuntimeError, match="in-flight pool"):
        ja.sweep(_gossip(RING), problem, [None], steps=20, pool_size=1, overflow="raise", executor="events")


def _edge_delays(n):
    """Fixed per-edge delays, not symmetric: fractional parts k/32 distinct per edge (so no two
    deliveries and no delivery and job tie), and some over a job's length."""
    src, dst = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return (1 + n * src + dst) / 32 + (src + 2 * dst) % 3


def test_per_edge_delays_and_losses_give_the_event_order():
    """Fixed job times and per-edge delays fix every event's time. The recorded event log is exactly
    the jobs and the deliveries of the messages not lost (the executor's Bernoulli draws, recomputed
    from the events' keys) in time order, and the trace counts those losses."""
    from jaxasync._src import simulator

    delays, loss, seed, steps = _edge_delays(N), 0.25, 7, 40  # 10 jobs per node, at t = 1, ..., 10
    program, problem = _gossip(RING), _problem(N)
    asyn = ja.Asynchrony(compute_time=ja.fixed(1.0), delay=ja.fixed(delays), loss=loss)
    log = simulator.record(program, problem, asyn, steps=steps, seed=seed).events
    jobs = np.flatnonzero(log.kind == 0)
    assert len(jobs) == steps and log.live.all()

    # The loss draws of every job's two messages, as _send draws them (channel 0).
    def losses(event):
        k_send = simulator.event_keys(seed, event)[3]
        k_loss = jax.random.split(jax.random.fold_in(k_send, 0))[1]
        return jax.random.bernoulli(k_loss, jnp.float32(loss), (2,))

    lost = np.asarray(jax.vmap(losses)(jnp.asarray(log.event[jobs])))
    out = np.asarray(RING.out_table)
    # (time, deliveries before jobs, lowest node first; then the log's kind, node, src, seq)
    expected = [(k, 1, i, 0, i, -1, -1) for i in range(N) for k in range(1, steps // N + 1)]
    for j, node in enumerate(log.node[jobs]):
        k = 1 + np.sum(log.node[jobs[:j]] == node)  # the node's k-th job, at t = k, sends seq k - 1
        for s, dst in enumerate(out[node]):
            if not lost[j, s]:
                expected.append((k + delays[node, dst], 0, 0, 1, dst, node, k - 1))
    expected = sorted(x for x in expected if x[0] <= steps // N)
    got = np.stack([log.kind, log.node, log.src, log.seq], 1)
    np.testing.assert_array_equal(got, np.array([x[3:] for x in expected]))

    tr = ja.simulate(program, problem, asyn, steps=steps, record_every=steps, seed=seed)
    assert tr["events"][-1] == len(log.event) and tr["lost"][-1] == lost.sum() > 0
    np.testing.assert_array_equal(tr["bytes_lost"], tr["lost"] * 3 * 4)
    # The same compiled simulation without loss (the loss rate is an argument) loses nothing.
    tr = ja.simulate(program, problem, dataclasses.replace(asyn, loss=0.0), steps=steps, seed=seed)
    assert not np.any(tr["lost"]) and not np.any(tr["bytes_lost"])
    assert tr["delivered"][-1] + tr["in_flight"][-1] == tr["sent"][-1] == 2 * steps
