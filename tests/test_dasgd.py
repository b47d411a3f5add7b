"""DASGD (decentralized asynchronous SGD by update broadcast) and the sequential SGD baseline."""

import heapq

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxasync as ja
from jaxasync._src import program as program_lib
from jaxasync._src.algorithms import dasgd as dasgd_lib
from jaxasync._src.algorithms import sequential as sequential_lib

D, N = 5, 4


def _problem(n=N, batch_size=8, dtype=jnp.float32, seed=0):
    """Homogeneous least squares (one planted solution, small noise), as in the DASGD setting."""
    rng = np.random.default_rng(seed)
    x_star = rng.normal(size=D)
    shards = []
    for _ in range(n):
        a = rng.normal(size=(32, D)).astype(np.float32)
        shards.append({"a": a, "b": (a @ x_star + 0.1 * rng.normal(size=32)).astype(np.float32)})
    loss = lambda x, d: 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)
    return ja.Problem(loss, jnp.zeros(D, dtype), shards, batch_size=batch_size)


def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _leaf_specs(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


class _Network:
    """Drives a program's handlers by hand: random node order, random per-message delays."""

    def __init__(self, prog, problem, max_delay, seed=0):
        self.prog, self.problem, self.n = prog, problem, problem.num_nodes
        self.graph = prog.channels["grad"].graph
        keys = jax.random.split(jax.random.key(seed), self.n)
        self.states = [prog.init(jnp.int32(i), problem.init_params, keys[i]) for i in range(self.n)]
        self.step = jax.jit(lambda s, b: prog.step(s, problem.grad_fn, b, jax.random.key(0)))
        self.receive = jax.jit(prog.receive["grad"])
        self.rng = np.random.default_rng(seed)
        self.max_delay, self.now, self.order = max_delay, 0.0, 0
        self.pending, self.seq = [], np.zeros(self.n, int)
        self.generated = self.stale_sum = 0
        self.updates = []  # every update, in generation order

    def _send(self, node, outbox):
        outbox = program_lib.expand_outbox(outbox)
        mask = np.asarray(outbox.mask)
        for k in np.flatnonzero(mask):
            dst = int(self.graph.out_table[node, k])
            msg = program_lib.Message(
                jnp.int32(self.graph.out_recv_slot[node, k]),
                jnp.int32(self.seq[node]),
                jax.tree.map(lambda x, k=k: x[k], outbox.payload),
            )
            delay = self.rng.uniform(0, self.max_delay)
            heapq.heappush(self.pending, (self.now + delay, self.order, dst, msg))
            self.order += 1
        self.seq[node] += bool(mask.any())

    def deliver(self, until=np.inf):
        while self.pending and self.pending[0][0] <= until:
            _, _, dst, msg = heapq.heappop(self.pending)
            self.states[dst], emit = self.receive(self.states[dst], msg)
            if "grad" in emit.outbox:
                self._send(dst, emit.outbox["grad"])

    def tick(self, node, batch):
        self.now += 1.0
        self.deliver(self.now)
        state = self.states[node]
        self.stale_sum += self.generated - int(state.applied)  # s_k = k - |A_k|
        self.states[node], emit = self.step(state, batch)
        u = emit.outbox["grad"].payload[0]  # a BroadcastOutbox: the update once
        self.updates.append(np.asarray(u, np.float32))
        self.generated += 1
        self._send(node, emit.outbox["grad"])

    def models(self):
        return np.stack([np.asarray(s.params, np.float32) for s in self.states])


def _run(prog, problem, steps, max_delay, seed=0):
    net = _Network(prog, problem, max_delay, seed)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        node = int(rng.integers(net.n))
        net.tick(node, problem.sample(jax.random.key(net.generated), node))
    return net


# ---------------------------------------------------------------------------------------------
# Handlers.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("graph", [None, ja.topology.ring(N)])
def test_handlers_jit_and_keep_state_structure(dtype, graph):
    params = jnp.zeros((D,), dtype)
    prog = dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, graph=graph)
    state = prog.init(jnp.int32(1), params, jax.random.key(0))
    grad_fn = jax.grad(lambda x, b: jnp.sum((x - b) ** 2))
    traces = []

    def step(s, b):
        traces.append(1)  # counts traces, not calls
        return prog.step(s, grad_fn, b, jax.random.key(0))

    step = jax.jit(step)
    s1, emit = step(state, jnp.ones((D,), dtype))
    s2, _ = step(s1, jnp.ones((D,), dtype))
    assert len(traces) == 1
    assert _leaf_specs(s1) == _leaf_specs(state) == _leaf_specs(s2)
    u, origin, seq = program_lib.expand_outbox(emit.outbox["grad"]).payload
    assert u.dtype == dtype and int(origin[0]) == 1 and int(seq[0]) == 0
    msg = program_lib.Message(jnp.int32(0), jnp.int32(0), (u[0], jnp.int32(0), jnp.int32(0)))
    s3, _ = jax.jit(prog.receive["grad"])(s2, msg)
    assert _leaf_specs(s3) == _leaf_specs(state)
    assert int(s3.applied) == 3


def test_zero_delay_complete_graph_models_identical_and_equal_plain_sgd():
    """No delay: every node holds x_0 + the same updates in the same order: plain SGD."""
    problem = _problem(batch_size=None)  # full local gradients: deterministic
    lr = 0.05
    net = _Network(dasgd_lib.dasgd(num_nodes=N, learning_rate=lr), problem, max_delay=0.0)
    opt = optax.sgd(lr)
    x, s = problem.init_params, opt.init(problem.init_params)
    update = jax.jit(lambda x, s, b: opt.update(problem.grad_fn(x, b), s, x))
    rng = np.random.default_rng(0)
    for _ in range(40):
        node = int(rng.integers(N))
        net.tick(node, problem.shards[node])
        net.deliver()
        models = net.models()
        # The sender may fuse x - lr g into one multiply-add, the receivers add the rounded update:
        # equal up to an ulp per step.
        np.testing.assert_allclose(models, np.broadcast_to(models[0], models.shape), rtol=1e-6, atol=1e-7)
        u, s = update(x, s, problem.shards[node])
        x = optax.apply_updates(x, u)
        np.testing.assert_allclose(models[0], x, rtol=1e-6, atol=1e-7)
    assert net.stale_sum == 0


@pytest.mark.parametrize("graph", [None, ja.topology.ring(N)])
def test_with_delays_models_agree_once_messages_land(graph):
    problem = _problem()
    prog = dasgd_lib.dasgd(num_nodes=N, learning_rate=0.05, graph=graph)
    net = _run(prog, problem, steps=60, max_delay=6.0)
    spread = np.ptp(net.models(), axis=0).max()
    net.deliver()
    models = net.models()
    assert spread > 1e-3  # while messages were in flight the models differed
    # Updates commute: everybody ends at x_0 + sum of all updates (up to float reassociation).
    total = np.asarray(problem.init_params) + np.sum(net.updates, axis=0)
    np.testing.assert_allclose(models, np.broadcast_to(total, models.shape), rtol=1e-5, atol=1e-6)
    stacked = _stack(net.states)
    np.testing.assert_array_equal(stacked.applied, 60)  # each update applied exactly once
    assert int(jnp.sum(stacked.given_up)) == 0
    # The gradient-set staleness from local counters equals the bookkeeping of a global observer.
    metrics = prog.metrics(stacked)
    assert net.stale_sum > 0
    np.testing.assert_allclose(metrics["staleness_mean"], net.stale_sum / 60, rtol=1e-6)
    assert int(metrics["missing_max"]) == 0


def test_flooding_window_gives_up_on_a_missing_update():
    """An update that never arrives stalls an origin's prefix; 32 later ones slide past it."""
    params = jnp.zeros((D,))
    prog = dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, graph=ja.topology.ring(N))
    state = prog.init(jnp.int32(0), params, jax.random.key(0))
    receive = jax.jit(prog.receive["grad"])
    one = jnp.ones((D,))
    for seq in range(1, 34):  # seq 0 of origin 1 is lost
        state, emit = receive(
            state, program_lib.Message(jnp.int32(0), jnp.int32(seq), (one, jnp.int32(1), jnp.int32(seq)))
        )
        assert bool(emit.outbox["grad"].mask.any())  # relayed: it was new
    assert int(state.applied) == 33 and int(state.given_up) == 1 and int(state.seen[1]) == 34
    # A duplicate and our own update flooded back are neither applied nor relayed.
    for origin, seq in [(1, 5), (0, 0)]:
        state, emit = receive(
            state, program_lib.Message(jnp.int32(0), jnp.int32(0), (one, jnp.int32(origin), jnp.int32(seq)))
        )
        assert not bool(emit.outbox["grad"].mask.any())
    assert int(state.applied) == 33
    np.testing.assert_allclose(state.params, 33 * one)


# ---------------------------------------------------------------------------------------------
# Simulations.


@pytest.mark.parametrize(
    "graph, dtype",
    [(None, jnp.float32), (ja.topology.ring(N), jnp.float32), (None, jnp.bfloat16)],
    ids=["complete-f32", "ring-f32", "complete-bf16"],
)
def test_converges_in_the_simulator(graph, dtype):
    problem = _problem(dtype=dtype)
    prog = dasgd_lib.dasgd(num_nodes=N, learning_rate=0.05, graph=graph)
    asynchrony = ja.Asynchrony(delay=ja.exponential(1.0))
    trace = ja.simulate(prog, problem, asynchrony, steps=1200, record_every=100, pool_size=512)
    # Noise floor of this problem is ~0.005 (noise variance / 2); the start is ~1.5.
    bound = 0.05 if dtype == jnp.float32 else 0.5 * trace["loss"][0]
    assert trace.final("loss") < bound
    assert trace.final("overflow") == 0 and trace.final("dasgd_given_up") == 0
    if dtype == jnp.float32:
        assert 0 < trace.final("staleness_mean") < 20
        assert trace.final("consensus") < 1e-2


def test_sequential_sgd_converges_in_the_simulator():
    problem = _problem(n=1)
    trace = ja.simulate(sequential_lib.sgd(learning_rate=0.05), problem, steps=600, record_every=100)
    assert trace.final("loss") < 0.05 < trace["loss"][0]


# ---------------------------------------------------------------------------------------------
# Sequential SGD.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sequential_equals_plain_optax(dtype):
    problem = _problem(n=1, batch_size=None, dtype=dtype)
    opt = optax.adam(0.05)
    prog = sequential_lib.sgd(optimizer=opt)
    state = prog.init(jnp.int32(0), problem.init_params, jax.random.key(0))
    traces = []

    def step(s, b):
        traces.append(1)
        return prog.step(s, problem.grad_fn, b, jax.random.key(0))

    step = jax.jit(step)

    @jax.jit
    def ref(x, s, b):  # the plain optax loop, compiled as one step like the node's
        u, s = opt.update(problem.grad_fn(x, b), s, x)
        return jax.tree.map(lambda a, p: a.astype(p.dtype), optax.apply_updates(x, u), x), s

    x, s = problem.init_params, opt.init(problem.init_params)
    for _ in range(20):
        new, _ = step(state, problem.shards[0])
        assert _leaf_specs(new) == _leaf_specs(state)
        state = new
        x, s = ref(x, s, problem.shards[0])
        np.testing.assert_array_equal(state.params, x)
    assert len(traces) == 1 and int(state.count) == 20
    assert float(problem.loss(state.params)) < 0.5 * float(problem.loss(problem.init_params))
    evaluated = prog.evaluate(_stack([state, state._replace(params=state.params + 1)]), {})
    np.testing.assert_array_equal(evaluated, state.params)  # node 0's model


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input():
    with pytest.raises(ValueError, match="num_nodes"):
        dasgd_lib.dasgd(num_nodes=0, learning_rate=0.1)
    with pytest.raises(TypeError, match="num_nodes"):
        dasgd_lib.dasgd(num_nodes="4", learning_rate=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        dasgd_lib.dasgd(num_nodes=N)
    with pytest.raises(ValueError, match="exactly one"):
        dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer"):
        dasgd_lib.dasgd(num_nodes=N, optimizer="adam")
    with pytest.raises(ValueError, match="nodes"):
        dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, graph=ja.topology.ring(N + 1))
    with pytest.raises(ValueError, match="strongly connected"):
        dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, graph=ja.topology.out_tree(N))
    with pytest.raises(TypeError, match="graph"):
        dasgd_lib.dasgd(num_nodes=N, learning_rate=0.1, graph=np.ones((N, N)))
    with pytest.raises(ValueError, match="exactly one"):
        sequential_lib.sgd()
    with pytest.raises(TypeError, match="optimizer"):
        sequential_lib.sgd(optimizer=lambda g: g)
