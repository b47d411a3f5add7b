"""The local multi-process runtime: real workers on shared memory.

Every multi-process test is bounded twice: by the run's own ``time_limit`` / ``steps`` and by an
alarm that fails the test if anything hangs. After each test no shared-memory segment created by this
process and no child process may be left. Process start-up (jax import and compilation, ~5 s per
run on two cores) dominates, so each run checks several things. The table of every algorithm's
convergence is opt-in with ``-m slow``. No test asserts on timings.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import sys
from typing import NamedTuple

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src import simulator
from jaxasync._src.runtime import local
from jaxasync._src.runtime import transport as transport_lib

sys.path.insert(0, os.path.dirname(__file__))
import test_simulator  # noqa: E402  (the test-local gossip program and problem)

# Workers get programs by value: they need not import the test modules.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(test_simulator)

_gossip, _problem = test_simulator._gossip, test_simulator._problem
DEADLINE = 240  # seconds for any one test (start-up is slow on a loaded 2-core machine)


def _ours() -> set:
    prefix = f"jaxasync-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


@pytest.fixture(autouse=True)
def clean_and_bounded():
    """Fails a test that hangs; checks that no segment and no child process is left behind."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"test did not finish within {DEADLINE}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE)
    before = _ours()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert _ours() - before == set(), "shared-memory segments left behind"
    assert multiprocessing.active_children() == [], "worker processes left behind"


def _algorithm(module: str, name: str):
    mod = pytest.importorskip(f"jaxasync._src.algorithms.{module}")
    if not hasattr(mod, name):
        pytest.skip(f"{module}.{name} is not available yet")
    return getattr(mod, name)


def _build(fn, *args, **kwargs):
    """Calls an algorithm factory, dropping keyword arguments its (evolving) signature lacks."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------- programs for the tests


class _CountState(NamedTuple):
    x: jax.Array
    node: jax.Array
    count: jax.Array


def _boom(node, count):
    if int(node) == 1 and int(count) == 5:
        raise ValueError("boom: node 1 failed on purpose at its step 5")


def _faulty(lr=0.05):
    """Local SGD whose node 1 raises (through a host callback) at its 6th step."""

    def init(node, params, key):
        del key
        return _CountState(params, jnp.asarray(node, jnp.int32), jnp.int32(0))

    def step(state, grad_fn, batch, key):
        del key
        jax.debug.callback(_boom, state.node, state.count)
        x = state.x - lr * grad_fn(state.x, batch)
        return state._replace(x=x, count=state.count + 1), ja.Emit()

    return ja.NodeProgram("faulty", init, step, lambda s: s.x)


def _adder(size=1 << 16):
    """Every step adds exactly 1.0 to every element of a shared buffer of ``size`` floats.

    All sums stay exact in float32 (below 2**24), so a racy buffer's net change falls short of the
    applied total by exactly the number of lost element updates.
    """

    def init(node, params, key):
        del key
        return _CountState(params, jnp.asarray(node, jnp.int32), jnp.int32(0))

    def step(state, grad_fn, batch, key):
        del grad_fn, batch, key
        ones = jnp.ones_like(state.x)
        return state._replace(count=state.count + 1), ja.Emit(ops={"params": ja.BufferAdd(ones)})

    program = ja.NodeProgram("adder", init, step, lambda s: s.x, shared={"params": ja.Buffer()})
    data = [{"a": np.zeros((2, 1), np.float32)} for _ in range(2)]
    problem = ja.Problem(lambda x, d: jnp.sum(x) * 0.0, jnp.zeros(size), data, batch_size=1)
    return program, problem


class _NoSharedMemory(transport_lib.ShmTransport):
    """Stands for a transport between hosts (MPI): messages only."""

    provides_shared_memory = False


# ------------------------------------------------------------------------- no processes


def test_codec_roundtrip_is_exact_for_every_dtype():
    tree = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf": jnp.asarray([1.5, -2.25], jnp.bfloat16),
        "i": np.int32(-7),
        "u": np.array([1, 255], np.uint8),
        "k": jax.random.split(jax.random.key(3), 2),
    }
    codec = transport_lib.Codec(tree)
    buf = codec.encode(codec.host_leaves(tree))
    assert buf.dtype == np.uint8 and buf.shape == (codec.size,)
    back = codec.decode(buf)
    for k in ("f", "bf", "i", "u"):
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))
        assert np.asarray(back[k]).dtype == np.asarray(tree[k]).dtype
    np.testing.assert_array_equal(jax.random.key_data(back["k"]), jax.random.key_data(tree["k"]))
    # A stack of messages decodes with a leading axis.
    two = np.stack([buf, buf])
    assert codec.decode(two, (2,))["f"].shape == (2, 2, 3)


def test_each_worker_is_sent_only_its_shard_and_draws_the_same_batches():
    rng = np.random.default_rng(0)
    shards = [{"a": rng.normal(size=(m, 3)).astype(np.float32)} for m in (5, 9, 7)]
    problem = ja.Problem(lambda x, d: jnp.mean(d["a"] @ x), jnp.zeros(3), shards, batch_size=4)
    key = jax.random.key(1)
    for node in range(4):  # node 3: a data-less server gets the last shard, like a clipped node id
        mine = local._shard_problem(problem, node)
        i = min(node, 2)
        assert mine.num_nodes == 1 and mine.sizes.tolist() == [problem.sizes[i]]
        for k in range(5):
            kk = jax.random.fold_in(key, k)
            np.testing.assert_array_equal(mine.sample(kk, 0)["a"], problem.sample(kk, i)["a"])


def test_shm_transport_delivers_in_order_and_reports_full():
    ring = ja.topology.ring(3)
    t = transport_lib.ShmTransport.create([ring], [8], capacity=2)
    try:
        names = set(t.names)
        assert len(names) == 6  # one mailbox per directed edge
        a, b = t.endpoint(0), t.endpoint(1)
        msgs = [np.full(8, i, np.uint8) for i in range(3)]
        assert a.send(0, 1, 0, msgs[0]) and a.send(0, 1, 1, msgs[1])
        assert not a.send(0, 1, 2, msgs[2])  # full: the caller decides to retry or drop
        got = list(b.poll())
        assert [(m.channel, m.src, m.seq) for m in got] == [(0, 0, 0), (0, 0, 1)]
        slot = int(np.asarray(ring.out_recv_slot).reshape(3, -1)[0][list(ring.out_table[0]).index(1)])
        assert {m.slot for m in got} == {slot}
        np.testing.assert_array_equal(got[1].payload, msgs[1])
        assert list(b.poll()) == []
        a.close()
        b.close()
    finally:
        t.close()


@pytest.mark.parametrize(
    "make, match",
    [
        # More workers than the nodes of the program's topology.
        (lambda: (_gossip(ja.topology.ring(3)), _problem(4), dict(workers=4)), "only 3 nodes"),
        # A problem with fewer shards than workers.
        (lambda: (_gossip(ja.topology.ring(4)), _problem(2), dict(workers=4)), "2 data shard"),
        # An algorithm that needs shared memory on a transport without it.
        (
            lambda: (
                _algorithm("shared_memory", "hogwild")(learning_rate=0.1),
                _problem(2),
                dict(workers=2, transport=_NoSharedMemory),
            ),
            "needs shared memory",
        ),
        (lambda: (_gossip(ja.topology.ring(2)), _problem(2), dict(workers=2, steps=None)), "steps"),
        (
            lambda: (_gossip(ja.topology.ring(2)), _problem(2), dict(workers=2, buffer_mode="lazy")),
            "buffer_mode",
        ),
        (
            lambda: (_gossip(ja.topology.ring(2)), _problem(2), dict(workers=2, transport="carrier")),
            "unknown transport",
        ),
        (
            lambda: (
                _gossip(ja.topology.ring(2)),
                _problem(2),
                dict(workers=2, asynchrony=ja.Asynchrony(crashes={5: 1.0})),
            ),
            "unknown node",
        ),
    ],
)
def test_bad_input_fails_before_anything_is_spawned(make, match):
    program, problem, kwargs = make()
    kwargs = {"steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        local.run(program, problem, **kwargs)
    assert multiprocessing.active_children() == []


def test_messages_received_in_the_step_call_are_exact():
    """An always-ready program whose receive handlers only update the state handles the waiting
    messages in the step's compiled call: the same state, bit for bit, as handling them first
    (in order, one batch per channel) and then stepping; a flood of more than one batch too."""
    from jaxasync._src.runtime import worker as worker_lib

    program, problem = _gossip(ja.topology.ring(3)), _problem(3)
    layout = local._Layout(program, problem, 3, 0)
    shared = local._create_shared(layout, transport_lib.ShmTransport, None)
    try:
        w = worker_lib.Worker(
            program=program, problem=problem, node=1, n=3, seed=0, shared=shared, buffer_mode="atomic"
        )
        assert w.fused_fn is not None
        assert w.yields  # it interacts with other workers: it yields its core after each step
        rng = np.random.default_rng(0)

        def inbox(count):
            return [
                transport_lib.Incoming(0, src, slot, k, rng.normal(size=3).astype(np.float32).view(np.uint8))
                for k in range(count)
                for src, slot in ((0, 0), (2, 1))
            ]

        for count in (1, 3, worker_lib.BATCH + 2):
            msgs = inbox(count)
            start = jax.tree.map(np.array, w.state)
            w.pending.extend(msgs)
            w.receive_pending()
            w.do_step(7)
            expected = jax.tree.map(np.array, w.state)
            w.state = jax.tree.map(jnp.asarray, start)
            w.pending.extend(msgs)
            w.do_step(7)
            assert not w.pending
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, w.state), expected)
        assert w.stats["delivered"] == 2 * 2 * (1 + 3 + worker_lib.BATCH + 2)
        w.endpoint.close()
    finally:
        shared.close()


def test_newest_only_channels_skip_superseded_messages_exactly():
    """R-FAST keeps the newest value per edge on both channels: a worker that skips every waiting
    message a newer one from the same sender supersedes ends in the state, bit for bit, of one that
    handles them all, and counts them all as delivered."""
    from jaxasync._src.runtime import worker as worker_lib

    ring = ja.topology.ring(3)
    problem = _problem(3)
    program = ja.algorithms.rfast(ring, ring, learning_rate=0.05)
    assert [c.newest_only for c in program.channels.values()] == [True, True]
    assert not ja.algorithms.rfast(ring, ring, learning_rate=0.05, robust=False).channels["sums"].newest_only
    layout = local._Layout(program, problem, 3, 0)
    shared = local._create_shared(layout, transport_lib.ShmTransport, None)
    try:
        w = worker_lib.Worker(
            program=program, problem=problem, node=1, n=3, seed=0, shared=shared, buffer_mode="atomic"
        )
        rng = np.random.default_rng(0)
        count = worker_lib.BATCH + 3  # a flood: more than one batch per edge
        msgs = [
            transport_lib.Incoming(ch, src, slot, k, rng.normal(size=3).astype(np.float32).view(np.uint8))
            for k in range(count)
            for ch in (0, 1)
            for src, slot in ((0, 0), (2, 1))
        ]
        start = jax.tree.map(np.array, w.state)
        states = []
        for newest_only in ([False, False], [True, True]):
            w.state, w.newest_only = jax.tree.map(jnp.asarray, start), newest_only
            w.pending.extend(msgs)
            w.do_step(3)
            states.append(jax.tree.map(np.array, w.state))
        jax.tree.map(np.testing.assert_array_equal, *states)
        assert w.stats["delivered"] == 2 * len(msgs)
        w.endpoint.close()
    finally:
        shared.close()


def test_a_batch_of_messages_is_the_handlers_one_at_a_time():
    """The batched receive (a loop of ``count`` handler calls in one compiled call) ends in the
    state, bit for bit, of the one-message handler called on each message in order, for every
    count from none to a full batch."""
    from jaxasync._src.runtime import worker as worker_lib

    ring = ja.topology.ring(3)
    program = ja.algorithms.rfast(ring, ring, learning_rate=0.05)
    problem = _problem(3)
    layout = local._Layout(program, problem, 3, 0)
    shared = local._create_shared(layout, transport_lib.ShmTransport, None)
    try:
        w = worker_lib.Worker(
            program=program, problem=problem, node=1, n=3, seed=0, shared=shared, buffer_mode="atomic"
        )
        w.do_step(0)
        rng = np.random.default_rng(0)
        start = jax.tree.map(np.array, w.state)
        for ci in (0, 1):
            for count in range(worker_lib.BATCH + 1):
                payloads = rng.normal(size=(count, 3)).astype(np.float32).view(np.uint8)
                seqs = rng.integers(0, 4, size=count)  # reordered and repeated
                edges = ((0, 0), (2, 1)) * 4
                msgs = [
                    transport_lib.Incoming(ci, *edges[j], int(seqs[j]), payloads[j]) for j in range(count)
                ]
                w.state = jax.tree.map(jnp.asarray, start)
                for m in msgs:
                    w.do_receive(m)
                one_by_one = jax.tree.map(np.array, w.state)
                w.state = jax.tree.map(jnp.asarray, start)
                w.do_receive_many(ci, msgs)
                jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, w.state), one_by_one)
        assert w.stats["delivered"] == 2 * 2 * sum(range(worker_lib.BATCH + 1))
        w.endpoint.close()
    finally:
        shared.close()


def test_a_stragglers_rounds_are_due_at_its_pace():
    """A straggler's round is due its CPU time plus (f - 1) times its step's after it began; the
    next begins when it was due (time lost oversleeping or waiting for a core counts toward it),
    not later, and an overrun is not carried over."""
    from jaxasync._src.runtime import worker as worker_lib

    wall, cpu = [10.0], [1.0]
    pace = worker_lib.Pace(4.0, clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    pace.round()  # begins at wall 10, cpu 1
    wall[0], cpu[0] = 10.5, 1.3  # 0.1 s receiving, 0.2 s stepping, 0.2 s waiting for a core
    assert pace.due(step_cpu=0.2, cpu_now=1.3) == pytest.approx(10.0 + 0.3 + 3 * 0.2)
    wall[0] = 11.0  # woke 0.1 s late
    pace.kept()
    pace.round()  # begins when the last one was due: 10.9
    wall[0], cpu[0] = 11.2, 1.5
    assert pace.due(step_cpu=0.2, cpu_now=1.5) == pytest.approx(10.9 + 0.2 + 0.6)
    wall[0], cpu[0] = 13.0, 1.5  # asked only at 13.0, past its due time: the overrun is not carried
    pace.due(step_cpu=0.0, cpu_now=1.5)
    pace.kept()
    pace.round()
    assert pace.due(step_cpu=0.1, cpu_now=1.6) == pytest.approx(13.0 + 0.1 + 0.3)
    pace.kept()
    wall[0] = 20.0
    pace.round()
    pace.round()  # the previous round did not step: the clock begins anew
    assert pace.due(step_cpu=0.0, cpu_now=cpu[0]) == pytest.approx(20.0)


# ------------------------------------------------------------------------- real runs


def test_gossip_converges_counts_messages_and_injects_loss():
    asyn = ja.Asynchrony(loss=0.2, stragglers={0: 3.0})
    tr = local.run(_gossip(ja.topology.ring(3)), _problem(3), workers=3, asynchrony=asyn, steps=600)
    # Steps are claimed on a shared counter: exactly `steps` ran.
    assert tr["steps"][-1] == 600 and tr["node_steps"][-1].sum() == 600
    assert tr["node_steps"].shape == (len(tr["time"]), 3)
    # Each step broadcasts to both ring neighbours; every message is accounted for.
    assert tr["sent"][-1] == 2 * 600
    np.testing.assert_array_equal(tr["sent"], tr["lost"] + tr["delivered"] + tr["dropped"] + tr["in_flight"])
    assert 0.12 < tr["lost"][-1] / tr["sent"][-1] < 0.28  # Bernoulli(0.2) over 1200 draws
    assert tr["bytes_sent"][-1] == tr["sent"][-1] * 3 * 4
    assert tr["bytes_lost"][-1] == tr["lost"][-1] * 3 * 4
    assert np.all(np.diff(tr["time"]) >= 0) and np.all(np.diff(tr["steps"]) >= 0)
    assert tr["loss"][-1] < 1e-2 * tr["loss"][0]
    assert tr.meta["executor"] == "local" and tr.meta["crashed"] == {} and not tr.meta["interrupted"]
    assert np.all(tr["alive"] == 3)


def test_pipelined_steps_are_exact_and_end_in_the_plain_loops_parameters():
    """A program without messages or shared objects is dispatched ahead (pipelined); the counts are
    of completed steps, and the donated states end where a plain loop with the same keys ends."""
    sgd = _algorithm("sequential", "sgd")
    problem, lr, steps, seed = _problem(1), 0.05, 1001, 3  # 1001: not a multiple of the sync window
    tr = local.run(sgd(learning_rate=lr), problem, workers=1, steps=steps, seed=seed, record_every=60.0)
    assert tr["steps"][-1] == steps and tr["node_steps"][-1].tolist() == [steps]
    assert tr["time"][-1] == np.float32(tr.meta["wall_time"])
    x = problem.init_params
    batch_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)  # node 0's
    for k in range(steps):  # the runtime's minibatch keys: fold_in(batch_key, step)
        x = x - lr * problem.grad_fn(x, problem.sample(jax.random.fold_in(batch_key, k), 0))
    np.testing.assert_allclose(tr["loss"][-1], problem.loss(x), rtol=1e-5)


def test_hogwild_survives_a_sigkilled_worker():
    hogwild = _algorithm("shared_memory", "hogwild")
    asyn = ja.Asynchrony(crashes={2: 0.3})
    tr = local.run(
        hogwild(learning_rate=0.05),
        _problem(3),
        workers=3,
        asynchrony=asyn,
        steps=30000,  # seconds of work, so the kill lands mid-run even on a loaded machine
        record_every=0.1,
    )
    assert set(tr.meta["crashed"]) == {"2"}
    t_crash = tr.meta["crashed"]["2"]
    assert t_crash >= 0.3  # never before its scheduled time
    assert tr["alive"][0] == 3 and tr["alive"][-1] == 2
    # The dead worker's counters froze; the survivors did the rest of the run's exact step budget
    # (less at most the one step the dead worker had claimed) and the model converged.
    after = tr["time"] >= t_crash
    assert np.all(tr["node_steps"][after, 2] == tr["node_steps"][-1, 2])
    assert 30000 - 1 <= tr["steps"][-1] <= 30000
    assert tr["loss"][-1] < 1e-2 * tr["loss"][0]
    # Updates to the shared buffer were timestamped.
    assert np.all(tr["staleness_max"] >= 0) and np.isfinite(tr["staleness_mean"][-1])


@pytest.mark.parametrize("mode", ["atomic", "racy"])
def test_lost_updates_are_the_buffers_shortfall_exactly(mode):
    """Two workers add +1 to every element of a 64k buffer each step. The tallies are exact: every
    applied element update is counted; with compare-and-swap none is lost; with plain stores the
    buffer falls short by a whole number of updates (the lost ones), never the other way."""
    size, steps = 1 << 16, 400
    program, problem = _adder(size)
    tr = local.run(program, problem, workers=2, steps=steps, buffer_mode=mode, lost_updates=True)
    assert tr["steps"][-1] == steps
    lost = tr.meta["lost_updates"]["params"]
    assert lost["adds"] == steps and lost["element_updates"] == steps * size
    assert lost["applied_mass"] == steps * size  # float64 sum of exact ones
    assert lost["lost_element_updates"] == lost["lost_mass"]  # unit deltas: mass = count
    assert lost["lost_mass"] == int(lost["lost_mass"]) and lost["max_abs_error"] <= steps
    if mode == "atomic":
        assert lost["lost_mass"] == 0.0 and lost["lost_fraction"] == 0.0
    else:
        assert 0.0 <= lost["lost_fraction"] < 1.0


def test_lost_updates_are_measured_only_where_updates_can_be_lost():
    """Off by default in atomic mode (nothing to measure), on in racy mode; a single racy writer
    loses nothing; programs without buffers report None."""
    program, problem = _adder(1 << 10)
    problem1 = ja.Problem(problem.loss_fn, problem.init_params, problem.shards[:1], batch_size=1)
    tr = local.run(program, problem1, workers=1, steps=50)
    assert tr.meta["lost_updates"] is None
    tr = local.run(program, problem1, workers=1, steps=50, buffer_mode="racy")
    assert tr.meta["lost_updates"]["params"]["lost_mass"] == 0.0
    assert tr.meta["lost_updates"]["params"]["element_updates"] == 50 * (1 << 10)


def test_a_crash_stops_an_algorithm_that_is_not_crash_tolerant():
    asyn = ja.Asynchrony(crashes={1: 0.2})
    with pytest.raises(local.WorkerError, match=r"worker 1 .*SIGKILL.*not crash-tolerant"):
        local.run(_gossip(ja.topology.ring(3)), _problem(3), workers=3, asynchrony=asyn, time_limit=30)


def test_a_worker_exception_stops_the_run_with_its_traceback():
    with pytest.raises(local.WorkerError, match="worker 1 failed") as err:
        local.run(_faulty(), _problem(2), workers=2, time_limit=60)
    assert "boom: node 1 failed on purpose" in str(err.value)
    assert "Traceback" in str(err.value)


def test_sigint_returns_the_partial_trace():
    def interrupt(record):
        if record["time"] > 0.3:
            # Ctrl-C in a terminal reaches the workers too: they ignore it, the parent stops them.
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    tr = local.run(
        _gossip(ja.topology.ring(2)),
        _problem(2),
        workers=2,
        time_limit=60,
        record_every=0.1,
        callback=interrupt,
    )
    assert tr.meta["interrupted"]
    assert tr["time"][-1] < 30 and len(tr["time"]) >= 2
    assert tr["steps"][-1] > 0 and tr["loss"][-1] < tr["loss"][0]


# ------------------------------------------------------------------------- replay


def _replay_case(name):
    topo = ja.topology
    if name == "gossip":
        return _gossip(topo.ring(3)), _problem(3), ja.Asynchrony(delay=ja.exponential(0.5), loss=0.2)
    if name == "rfast":
        rfast = _algorithm("rfast", "rfast")
        ring = topo.directed_ring(3) if hasattr(topo, "directed_ring") else topo.ring(3)
        prog = _build(rfast, ring, ring, params=jnp.zeros(3), learning_rate=0.05)
        return prog, _problem(3), ja.Asynchrony(delay=ja.exponential(0.5), loss=0.2)
    if name == "asgrad":
        asgrad = _algorithm("asgrad", "asgrad")
        prog = _build(asgrad, params=jnp.zeros(3), num_workers=2, policy="shuffled", learning_rate=0.1)
        return prog, _problem(2), ja.Asynchrony(delay=ja.exponential(0.5))
    if name == "sparsified_sgd":
        sparsified = _algorithm("shared_memory", "sparsified_sgd")
        return sparsified(density=0.34, learning_rate=0.1), _problem(2), ja.Asynchrony()
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["gossip", "rfast", "asgrad", "sparsified_sgd"])
def test_replay_ends_in_the_simulators_parameters(name):
    program, problem, asyn = _replay_case(name)
    rec = simulator.record(program, problem, asyn, steps=40, seed=3)
    kinds = set(np.unique(rec.events.kind).tolist())
    assert 0 in kinds  # steps ...
    if program.channels:
        assert kinds - {0}  # ... and deliveries were replayed
    out = local.replay(program, problem, rec, timeout=120)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out.node_params, rec.node_params
    )
    for k, v in rec.shared.items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out.shared[k], v)


# ------------------------------------------------------------------------- every algorithm


def _convergence_case(name):
    topo = ja.topology
    p0 = jnp.zeros(3)
    if name == "hogwild":
        return _algorithm("shared_memory", "hogwild")(learning_rate=0.05), 2
    if name == "hogwild_racy":
        return _algorithm("shared_memory", "hogwild")(learning_rate=0.05), 2
    if name == "sparsified_sgd":
        return _algorithm("shared_memory", "sparsified_sgd")(density=0.34, learning_rate=0.05), 2
    if name == "sgd":
        return _algorithm("sequential", "sgd")(learning_rate=0.05), 2
    if name == "asgrad":
        fn = _algorithm("asgrad", "asgrad")
        return _build(fn, params=p0, num_workers=2, policy="shuffled", learning_rate=0.05), 2
    if name == "dasgd":
        return _build(_algorithm("dasgd", "dasgd"), num_nodes=3, params=p0, learning_rate=0.05), 3
    if name == "allreduce_sgd":
        return _build(_algorithm("gossip", "allreduce_sgd"), num_nodes=3, params=p0, learning_rate=0.1), 3
    if name in ("dpsgd", "adpsgd"):
        return _build(_algorithm("gossip", name), topo.ring(3), params=p0, learning_rate=0.05), 3
    if name == "sgp":
        # Real interleavings are far more uneven than the simulator's Exp(1) jobs: a node that hears
        # much and steps little gathers push-sum weight, which scales its steps; keep eta small.
        return _build(_algorithm("gossip", name), topo.ring(3), params=p0, learning_rate=0.02), 3
    if name == "rfast":
        ring = topo.ring(3)
        return _build(_algorithm("rfast", "rfast"), ring, ring, params=p0, learning_rate=0.1), 3
    if name == "cluster_sgd":
        fn = _algorithm("cluster", "cluster_sgd")
        return _build(fn, [2, 2], params=p0, learning_rate=0.05), 4
    raise AssertionError(name)


ALGORITHMS = [
    "hogwild",
    "hogwild_racy",
    "sparsified_sgd",
    "sgd",
    "asgrad",
    "dasgd",
    "allreduce_sgd",
    "dpsgd",
    "adpsgd",
    "sgp",
    "rfast",
    "cluster_sgd",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_converges_on_real_workers(name, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the full table is opt-in: pytest -m slow")
    program, nodes = _convergence_case(name)
    workers = nodes + getattr(program, "num_servers", 0)
    mode = "racy" if name.endswith("racy") else "atomic"
    steps = (1000 if name == "rfast" else 300) * nodes  # R-FAST tracks gradients: slower start
    tr = local.run(program, _problem(nodes), workers=workers, steps=steps, buffer_mode=mode)
    assert tr["steps"][-1] == steps
    assert tr["loss"][-1] < 0.1 * tr["loss"][0], (name, tr["loss"])
