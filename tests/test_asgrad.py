"""AsGrad: server-based asynchronous SGD with pure / random / shuffled job assignment."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxasync as ja
from jaxasync._src import program as program_lib
from jaxasync._src import simulator as simulator_lib
from jaxasync._src import transforms as transforms_lib
from jaxasync._src.algorithms import asgrad as asgrad_lib

D, W = 6, 4
POLICIES = ("pure", "random", "shuffled", "shuffle_once")


def _problem(num_workers=W, batch_size=None, spread=3.0, seed=0):
    """Least squares where every worker has its own planted solution (heterogeneous data)."""
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(num_workers):
        a = rng.normal(size=(24, D)).astype(np.float32)
        b = (a @ (spread * rng.normal(size=D))).astype(np.float32)
        shards.append({"a": a, "b": b})
    loss = lambda x, d: 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)
    return ja.Problem(loss, jnp.zeros(D), shards, batch_size=batch_size)


def _states(prog, params, seed=0):
    keys = jax.random.split(jax.random.key(seed), prog.num_nodes)
    return [prog.init(jnp.int32(i), params, keys[i]) for i in range(prog.num_nodes)]


def _msg(slot, payload):
    return program_lib.Message(jnp.int32(slot), jnp.int32(0), payload)


def _grad_msg(worker, assigned_at, dim=D, dtype=jnp.float32):
    return _msg(worker, (jnp.ones((dim,), dtype), jnp.int32(assigned_at)))


def _leaf_specs(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------------
# Handlers: jit, stable structure, no recompilation.


# Every node program of the module: asgrad under each policy and the two baselines built on it.
PROGRAMS = {
    **{p: functools.partial(asgrad_lib.asgrad, policy=p, learning_rate=0.1) for p in POLICIES},
    "ps_asgd": functools.partial(asgrad_lib.ps_asgd, learning_rate=0.1),
    "delay_adaptive_asgd": functools.partial(asgrad_lib.delay_adaptive_asgd, learning_rate=0.1),
}


def _counted_jit(fn, traces, name):
    """``jax.jit(fn)`` that appends ``name`` to ``traces`` each time it is traced (not called)."""

    def traced(*args):
        traces.append(name)
        return fn(*args)

    return jax.jit(traced)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_handlers_jit_and_keep_state_structure(name, dtype):
    params = {"w": jnp.zeros((D, 2), dtype), "b": jnp.zeros((2,), dtype)}  # any pytree
    ones = jax.tree.map(jnp.ones_like, params)
    prog = PROGRAMS[name](num_workers=W)
    states = _states(prog, params)
    worker, server = states[0], states[W]
    spec_w, spec_s = _leaf_specs(worker), _leaf_specs(server)
    grad_fn = jax.grad(lambda x, b: sum(jnp.sum((v - b) ** 2) for v in jax.tree.leaves(x)))
    traces = []
    step = _counted_jit(lambda s, b: prog.step(s, grad_fn, b, jax.random.key(0)), traces, "step")
    job = _counted_jit(prog.receive["job"], traces, "job")
    grad = _counted_jit(prog.receive["grad"], traces, "grad")

    # Worker: run the initial job, receive two more (x_3 and x_8), run one of them.
    s1, emit = step(worker, jnp.ones((), dtype))
    assert isinstance(emit.outbox["grad"], program_lib.BroadcastOutbox)  # one copy, not one per slot
    g, a = emit.outbox["grad"].payload
    assert _leaf_specs(g) == _leaf_specs(params) and int(a) == 0
    assert not bool(prog.ready(s1))
    s2, _ = job(s1, _msg(0, (ones, jnp.int32(3))))
    s2, _ = job(s2, _msg(0, (ones, jnp.int32(8))))
    assert bool(prog.ready(s2))
    s3, _ = step(s2, jnp.zeros((), dtype))
    for s in (s1, s2, s3):
        assert _leaf_specs(s) == spec_w

    # Server: two gradients, the second one stale by 20 (> 2n: the delay-adaptive factor is < 1).
    srv, emit = grad(server, _msg(1, (ones, jnp.int32(0))))
    assert _leaf_specs(emit.outbox["job"].payload[0]) == _leaf_specs(params)
    srv, emit = grad(srv._replace(count=jnp.int32(20)), _msg(2, (ones, jnp.int32(0))))
    assert _leaf_specs(srv) == spec_s and int(srv.count) == 21 and int(srv.delay_max) == 20
    assert not bool(prog.ready(srv)) and bool(prog.ready(worker))
    assert jax.tree.leaves(prog.params(srv))[0].dtype == dtype
    # Two calls of each, one trace each: nothing recompiles on the second step.
    assert sorted(traces) == ["grad", "job", "step"]


def test_worker_queue_is_fifo_and_counts_overflow():
    params = jnp.zeros((D,))
    prog = asgrad_lib.asgrad(num_workers=W, policy="random", learning_rate=0.1, queue_capacity=3)
    w = _states(prog, params)[1]
    for a in (5, 7, 9):  # the third does not fit: the initial job still occupies a slot
        w, _ = prog.receive["job"](w, _msg(0, (jnp.full((D,), float(a)), jnp.int32(a))))
    assert int(w.size) == 3 and int(w.overflow) == 1
    grad_fn = lambda x, b: x  # returns the snapshot: shows which job ran
    order = []
    while bool(prog.ready(w)):
        w, emit = prog.step(w, grad_fn, None, jax.random.key(0))
        g, a = program_lib.expand_outbox(emit.outbox["grad"]).payload
        order.append((int(a[0]), float(g[0, 0])))
    assert order == [(0, 0.0), (5, 5.0), (7, 7.0)]


# ---------------------------------------------------------------------------------------------
# The server: delays, optimizer, assignment.


def _drive_server(policy, finishers, seed=0, num_workers=W):
    params = jnp.zeros((D,))
    prog = asgrad_lib.asgrad(num_workers=num_workers, policy=policy, learning_rate=0.1)
    server = _states(prog, params, seed)[num_workers]
    receive = jax.jit(prog.receive["grad"])
    recipients = []
    for t, j in enumerate(finishers):
        server, emit = receive(server, _grad_msg(j, max(t - 2, 0)))
        ob = program_lib.expand_outbox(emit.outbox["job"])
        assert int(jnp.sum(ob.mask)) == 1  # exactly one new job per applied gradient
        k = int(jnp.argmax(ob.mask))
        assert int(ob.payload[1][k]) == t + 1  # the job carries x_{t+1} and t + 1
        np.testing.assert_allclose(ob.payload[0][k], server.params)
        recipients.append(k)
    return server, np.asarray(recipients)


def test_server_applies_sgd_and_records_delays():
    server, _ = _drive_server("pure", [0, 1, 2, 3, 0])
    # Gradient of ones, step 0.1, five times.
    np.testing.assert_allclose(server.params, -0.5 * np.ones(D), rtol=1e-6)
    assert int(server.count) == 5
    assert int(server.delay_max) == 2 and int(server.delay_sum) == 0 + 1 + 2 + 2 + 2  # a_t = max(t - 2, 0)
    np.testing.assert_array_equal(server.jobs, [2, 1, 1, 1])


def test_pure_gives_the_job_back_to_the_finisher():
    finishers = np.random.default_rng(0).integers(0, W, size=20)
    _, recipients = _drive_server("pure", finishers)
    np.testing.assert_array_equal(recipients, finishers)


@pytest.mark.parametrize("policy", ["shuffled", "shuffle_once"])
def test_shuffled_gives_one_job_per_worker_per_block(policy):
    finishers = np.zeros(5 * W, int)  # who finished must not matter
    server, recipients = _drive_server(policy, finishers)
    blocks = recipients.reshape(-1, W)
    for block in blocks:
        assert sorted(block.tolist()) == list(range(W))
    np.testing.assert_array_equal(server.jobs, 5 * np.ones(W))
    distinct = {tuple(b) for b in blocks.tolist()}
    assert (len(distinct) == 1) == (policy == "shuffle_once")


def test_random_assignment_is_deterministic_in_the_seed():
    finishers = np.zeros(30, int)
    _, a = _drive_server("random", finishers, seed=1)
    _, b = _drive_server("random", finishers, seed=1)
    _, c = _drive_server("random", finishers, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) > 1


def test_staleness_transform_gets_the_delay():
    """A delay-aware transformation chained after the optimizer sees ``delay = t - a``."""
    params = jnp.zeros((D,))
    prog = asgrad_lib.asgrad(
        num_workers=W,
        learning_rate=1.0,
        staleness=transforms_lib.scale_by_staleness("inverse"),  # factor 1 / (1 + tau)
    )
    server = _states(prog, params)[W]
    server, _ = prog.receive["grad"](server, _grad_msg(0, 0))  # delay 0: full step
    server, _ = prog.receive["grad"](server, _grad_msg(1, 0))  # delay 1: half step
    np.testing.assert_allclose(server.params, -1.5 * np.ones(D), rtol=1e-6)


def test_delay_adaptive_step_shrinks_for_large_delays():

    def server_after(delay, **kw):
        prog = asgrad_lib.delay_adaptive_asgd(num_workers=W, learning_rate=0.1, **kw)
        server = _states(prog, jnp.zeros((D,)))[W]._replace(count=jnp.int32(delay))
        server, _ = prog.receive["grad"](server, _grad_msg(0, 0))
        assert prog.name == "delay_adaptive_asgd"
        return float(-server.params[0])  # the step taken on a gradient of ones

    # gamma up to tau = 2n, then gamma * 2n / tau (no L), or min(gamma, 1 / (4 L tau)) with L.
    for delay, step in [(0, 0.1), (2 * W, 0.1), (4 * W, 0.05), (20 * W, 0.01)]:
        np.testing.assert_allclose(server_after(delay), step, rtol=1e-6)
    np.testing.assert_allclose(server_after(100, smoothness=1.0), 1 / 400, rtol=1e-6)
    np.testing.assert_allclose(server_after(2 * W, smoothness=1.0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(server_after(4 * W, smoothness=1.0), 1 / (16 * W), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Simulations.


def test_one_worker_equals_plain_sgd():
    """One worker, fixed compute time: the server's trajectory is the plain optax one, bit for bit."""
    problem = _problem(num_workers=1)
    lr, steps = 0.05, 30
    prog = asgrad_lib.asgrad(num_workers=1, learning_rate=lr)
    replay = simulator_lib.record(prog, problem, ja.Asynchrony(compute_time=ja.fixed(1.0)), steps=steps)
    # Job, gradient delivery, job delivery, ...: the run stops right after job 30, whose gradient
    # has not reached the server yet, so the server holds x_29.
    assert replay.events.kind.tolist() == [0] + [1, 2, 0] * (steps - 1)
    opt = optax.sgd(lr)

    @jax.jit
    def sgd_step(x, s):  # the plain optax loop, compiled as one step like the server's
        u, s = opt.update(problem.grad_fn(x, problem.shards[0]), s, x)
        return optax.apply_updates(x, u), s

    x, s = problem.init_params, opt.init(problem.init_params)
    for _ in range(steps - 1):
        x, s = sgd_step(x, s)
    np.testing.assert_array_equal(replay.node_params[1], x)  # node 1 is the server


# shuffle_once runs in bfloat16: one compiled simulation fewer, and the bfloat16 check of the file.
DTYPES = {"pure": jnp.float32, "random": jnp.float32, "shuffled": jnp.float32, "shuffle_once": jnp.bfloat16}


@pytest.fixture(scope="module")
def policy_traces():
    """Heterogeneous data and speeds 1..4 (fixed compute times), full local gradients."""
    base = _problem()
    asynchrony = ja.Asynchrony(compute_time=ja.fixed([1.0, 2.0, 3.0, 4.0, 1.0]))
    traces = {}
    for policy in POLICIES:
        x0 = jnp.zeros(D, DTYPES[policy])
        problem = ja.Problem(base.loss_fn, x0, base.shards)
        prog = asgrad_lib.asgrad(num_workers=W, policy=policy, learning_rate=0.02)
        traces[policy] = ja.simulate(prog, problem, asynchrony, steps=2000, record_every=100)
    return traces


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_converge(policy_traces, policy):
    trace = policy_traces[policy]
    # With equal job shares (not pure) the server converges near x* (bfloat16 stalls near 0.2 when
    # the steps fall below its resolution); pure's fast-worker bias leaves a floor (~0.6).
    bound = 0.5 if policy == "pure" else 0.15
    assert trace.final("grad_norm") < bound * trace["grad_norm"][0]
    assert trace.final("loss") < 0.5 * trace["loss"][0]
    assert np.all(np.isfinite(trace["loss"]))
    assert trace.final("queue_overflow") == 0
    assert trace.final("server_iterations") >= 1990
    assert 1 <= trace.final("staleness_mean") <= trace.final("staleness_max")
    if policy == "pure":
        # Jobs follow the speeds 1..4: the fastest worker gets ~4x the slowest's.
        assert trace.final("jobs_max") > 3 * trace.final("jobs_min")
    else:
        # Shuffling balances jobs exactly (one per block); random within a few standard deviations.
        spread = 100 if policy == "random" else 1
        assert trace.final("jobs_max") - trace.final("jobs_min") <= spread


def test_pure_is_biased_under_heterogeneous_speeds_and_data(policy_traces):
    """Pure ASGD over-weights fast workers' data (a floor); shuffled visits every worker equally."""
    pure = policy_traces["pure"]["grad_norm"][-5:].mean()
    shuffled = policy_traces["shuffled"]["grad_norm"][-5:].mean()
    assert pure > 3 * shuffled


BASELINES = {"ps_asgd": asgrad_lib.ps_asgd, "delay_adaptive_asgd": asgrad_lib.delay_adaptive_asgd}
BASELINE_RUNS = [(name, dtype) for name in BASELINES for dtype in ("float32", "bfloat16")]


@pytest.fixture(scope="module")
def baseline_traces():
    """Homogeneous data, one worker 8x slower than the others: its gradients arrive ~20 steps stale."""
    shard = _problem().shards[0]
    asynchrony = ja.Asynchrony(compute_time=ja.fixed([1.0, 1.0, 2.0, 8.0, 1.0]))
    traces = {}
    for name, dtype in BASELINE_RUNS:
        problem = ja.Problem(_problem().loss_fn, jnp.zeros(D, dtype), [shard] * W)
        prog = BASELINES[name](num_workers=W, learning_rate=0.1)
        traces[name, dtype] = ja.simulate(prog, problem, asynchrony, steps=500, record_every=50)
    return traces


@pytest.mark.parametrize("name, dtype", BASELINE_RUNS)
def test_baselines_converge(baseline_traces, name, dtype):
    trace = baseline_traces[name, dtype]
    assert np.all(np.isfinite(trace["loss"]))
    # Same data everywhere, so no pure-ASGD floor: float32 reaches the optimum, bfloat16 stalls at
    # its resolution (grad_norm ~0.05 of the start).
    grad_tol, loss_tol = (1e-3, 1e-6) if dtype == "float32" else (0.1, 0.02)
    assert trace.final("grad_norm") < grad_tol * trace["grad_norm"][0]
    assert trace.final("loss") < loss_tol * trace["loss"][0]
    assert trace.final("server_iterations") >= 490 and trace.final("queue_overflow") == 0
    # Delays beyond 2n = 8: the delay-adaptive rule shrinks some of the steps it applied.
    assert trace.final("staleness_max") > 2 * W
    assert trace.final("jobs_max") > 3 * trace.final("jobs_min")  # pure: jobs follow the speeds


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input():
    with pytest.raises(ValueError, match="policy"):
        asgrad_lib.asgrad(num_workers=W, policy="fastest", learning_rate=0.1)
    with pytest.raises(ValueError, match="num_workers"):
        asgrad_lib.asgrad(num_workers=0, learning_rate=0.1)
    with pytest.raises(TypeError, match="num_workers"):
        asgrad_lib.asgrad(num_workers=2.0, learning_rate=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        asgrad_lib.asgrad(num_workers=W)
    with pytest.raises(ValueError, match="exactly one"):
        asgrad_lib.asgrad(num_workers=W, learning_rate=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer"):
        asgrad_lib.asgrad(num_workers=W, optimizer=0.1)
    with pytest.raises(ValueError, match="queue_capacity"):
        asgrad_lib.asgrad(num_workers=W, learning_rate=0.1, queue_capacity=0)
    with pytest.raises(ValueError, match="num_workers"):
        asgrad_lib.delay_adaptive_asgd(num_workers=0, learning_rate=0.1)
    # A problem needs one shard per worker (the executor adds the server).
    prog = asgrad_lib.asgrad(num_workers=W, learning_rate=0.1)
    with pytest.raises(ValueError, match="5 nodes"):
        ja.simulate(prog, _problem(num_workers=W + 1), steps=10)
