"""Tests for jaxasync._src.algorithms.gossip: all-reduce SGD, D-PSGD, AD-PSGD and SGP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import problems, simulator, topology
from jaxasync._src import program as program_lib
from jaxasync._src.algorithms import gossip

D = 3


def _lsq_grad(x, batch):
    return batch["a"].T @ (batch["a"] @ x - batch["b"]) / batch["a"].shape[0]


def _factories(n):
    """name -> (**kw) -> program, on a graph each algorithm accepts."""
    return {
        "allreduce_sgd": lambda **kw: gossip.allreduce_sgd(num_nodes=n, **kw),
        "dpsgd": lambda **kw: gossip.dpsgd(topology.ring(n), **kw),
        "adpsgd": lambda **kw: gossip.adpsgd(topology.ring(n), **kw),
        "sgp": lambda **kw: gossip.sgp(topology.exponential(n), **kw),
    }


NAMES = sorted(_factories(1))


# ---------------------------------------------------------------------------------------
# A small Python event loop: handlers driven one event at a time, in an order chosen by the test.


@jax.jit
def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class _Driver:
    """Runs a program's jitted handlers on ``n`` nodes with explicit deliveries and losses."""

    def __init__(self, prog, seed=0, dtype=jnp.float32, spread=False):
        self.prog = prog
        self.graphs = {c: ch.graph for c, ch in prog.channels.items()}
        self.n = prog.num_nodes
        self.step_fn = jax.jit(functools.partial(prog.step, grad_fn=_lsq_grad))
        self.receive_fn = {c: jax.jit(h) for c, h in prog.receive.items()}
        self.ready_fn = jax.jit(prog.ready)
        rng = np.random.default_rng(seed)
        x_star = rng.normal(size=D)
        self.data = []
        for _ in range(self.n):
            a = rng.normal(size=(6, D)).astype(np.float32)
            self.data.append({"a": a, "b": (a @ x_star).astype(np.float32)})  # homogeneous
        # One start for everybody (as in the simulator), or one per node (``spread``).
        x0 = rng.normal(size=(self.n if spread else 1, D))
        init = jax.jit(prog.init)
        self.states = [
            init(jnp.int32(i), jnp.asarray(x0[i if spread else 0], dtype), jax.random.key(i))
            for i in range(self.n)
        ]
        self.seq = {c: np.zeros(self.n, np.int64) for c in self.graphs}
        self.in_flight = []  # (channel, dst, slot, seq, payload)
        self.lost = []  # payloads lost by the network
        self.steps = 0

    def ready(self, node):
        return bool(self.ready_fn(self.states[node]))

    def _send(self, node, emit, lost_bits=0):
        bit = 0
        for c, ob in emit.outbox.items():
            ob = program_lib.expand_outbox(ob)
            g, mask = self.graphs[c], np.asarray(ob.mask)
            if not mask.any():
                continue
            for k in np.flatnonzero(mask):
                payload = jax.tree.map(lambda p: p[k], ob.payload)
                if (lost_bits >> bit) & 1:
                    self.lost.append((c, payload))
                else:
                    dst, slot = int(g.out_table[node, k]), int(g.out_recv_slot[node, k])
                    self.in_flight.append((c, dst, slot, int(self.seq[c][node]), payload))
                bit += 1
            self.seq[c][node] += 1

    def step(self, node, lost_bits=0, key=0):
        batch = self.data[node]
        self.states[node], emit = self.step_fn(self.states[node], batch=batch, key=jax.random.key(key))
        self.steps += 1
        self._send(node, emit, lost_bits)

    def deliver(self, index=-1):
        c, dst, slot, seq, payload = self.in_flight.pop(index % len(self.in_flight))
        msg = program_lib.Message(jnp.int32(slot), jnp.int32(seq), payload)
        self.states[dst], emit = self.receive_fn[c](self.states[dst], msg)
        self._send(dst, emit)

    def drain(self):
        while self.in_flight:
            self.deliver()

    def round(self):
        """Every ready node steps once, then the network delivers everything (newest first)."""
        for i in range(self.n):
            if self.ready(i):
                self.step(i, key=self.steps)
        self.drain()

    def params(self):
        return [np.asarray(self.prog.params(s), np.float64) for s in self.states]

    def gap(self):
        """``f(x) - f*`` of the global objective at the average model."""
        x = np.mean(self.params(), 0)
        a = np.concatenate([b["a"] for b in self.data]).astype(np.float64)
        b = np.concatenate([b["b"] for b in self.data]).astype(np.float64)
        x_star = np.linalg.lstsq(a, b, rcond=None)[0]
        return 0.5 * np.mean((a @ x - b) ** 2) - 0.5 * np.mean((a @ x_star - b) ** 2)


# ---------------------------------------------------------------------------------------
# Equality with plain Optax.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
def test_one_node_is_plain_optax_bit_for_bit(name, opt):
    # Op by op (no jit), so both sides run the same float operations; under jit XLA may fuse the
    # two programs differently (the all-reduce's mean then differs in the last bit).
    x0 = jnp.asarray([1.0, -2.0, 0.5])
    prog = _factories(1)[name](optimizer=opt)
    state, x, opt_state = prog.init(jnp.int32(0), x0, jax.random.key(0)), x0, opt.init(x0)
    for k in range(5):
        a = np.random.default_rng(k).normal(size=(5, D))
        batch = {"a": jnp.asarray(a, jnp.float32), "b": jnp.ones(5)}
        state, _ = prog.step(state, _lsq_grad, batch, jax.random.key(k))
        updates, opt_state = opt.update(_lsq_grad(x, batch), opt_state, x)
        x = optax.apply_updates(x, updates)
        assert bool(prog.ready(state))  # nothing to wait for alone
        np.testing.assert_array_equal(prog.params(state), x)


@settings(max_examples=8, deadline=None)
@given(order=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 99)), max_size=60))
def test_allreduce_keeps_identical_models_in_any_delivery_order(order):
    drv = _Driver(_allreduce_program())
    for is_step, node, pick in order:
        if is_step and drv.ready(node):
            drv.step(node, key=pick)
        elif drv.in_flight:
            drv.deliver(pick)
    drv.drain()
    counts = [int(s.count) for s in drv.states]
    # A round ends everywhere once its messages are in: equal rounds, bit-identical models.
    for s in drv.states:
        if int(s.count) == max(counts):
            np.testing.assert_array_equal(s.x, drv.states[int(np.argmax(counts))].x)
    assert max(counts) - min(counts) <= 1


@functools.cache
def _allreduce_program():
    return gossip.allreduce_sgd(num_nodes=4, learning_rate=0.1)


def test_allreduce_is_minibatch_sgd_on_the_average_gradient():
    drv = _Driver(_allreduce_program())
    x = np.asarray(drv.states[0].x)
    for _ in range(3):
        drv.round()
        x = x - 0.1 * np.mean([_lsq_grad(x, b) for b in drv.data], 0)
        for p in drv.params():
            np.testing.assert_allclose(p, x, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Synchrony and invariants.


def test_dpsgd_waits_for_its_neighbours_and_mixes_with_the_weights():
    prog = gossip.dpsgd(topology.ring(4), learning_rate=0.1)
    drv = _Driver(prog, spread=True)
    x_before = drv.params()
    drv.step(0)
    assert not drv.ready(0)  # sent x_0^0, holds nobody's round-0 model yet
    drv.step(1)
    drv.step(3)
    drv.drain()
    assert not drv.ready(1) and drv.ready(0)  # 0 has 1 and 3; 1 still misses 2
    w = topology.metropolis_weights(topology.ring(4))
    expected = sum(w[0, j] * x_before[j] for j in range(4)) - 0.1 * np.asarray(
        _lsq_grad(x_before[0], drv.data[0])
    )
    np.testing.assert_allclose(drv.params()[0], expected, rtol=1e-5)
    assert int(drv.states[0].count) == 1


@settings(max_examples=8, deadline=None)
@given(
    actions=st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 99), st.integers(0, 15)), max_size=50
    ),
    one_peer=st.booleans(),
)
def test_sgp_conserves_push_sum_weight(actions, one_peer):
    drv = _Driver(_sgp_program(one_peer))
    for is_step, node, pick, bits in actions:
        if is_step or not drv.in_flight:
            drv.step(node, lost_bits=bits & (bits >> 2))  # some packets lost
        else:
            drv.deliver(pick)
        held = float(gossip.sgp_total_weight(_stack(drv.states)))
        flying = sum(float(p.weight) for *_, p in drv.in_flight)
        lost = sum(float(p.weight) for _, p in drv.lost)
        np.testing.assert_allclose(held + flying + lost, drv.n, rtol=1e-5)
        assert all(float(s.w) > 0 for s in drv.states)
    drv.drain()
    if not drv.lost:
        np.testing.assert_allclose(float(gossip.sgp_total_weight(_stack(drv.states))), drv.n, rtol=1e-5)


@functools.cache
def _sgp_program(one_peer):
    return gossip.sgp(topology.directed_ring(6), learning_rate=0.05, one_peer=one_peer)


def test_sgp_one_peer_is_round_robin_with_half_shares():
    prog = gossip.sgp(topology.exponential(8), learning_rate=0.1)
    drv = _Driver(prog)
    peers = []
    for k in range(4):
        drv.step(0, key=k)
        _, dst, _, _, payload = drv.in_flight[-1]
        peers.append(dst)
        np.testing.assert_allclose(float(payload.weight), float(drv.states[0].w))  # kept == sent
    assert peers == [1, 2, 4, 1]  # out-neighbours i + 2^k, in turn


@pytest.mark.parametrize("scale", [True, False])
def test_sgp_step_moves_the_debiased_model_by_the_update(scale):
    ring = topology.directed_ring(3)
    prog = gossip.sgp(ring, learning_rate=0.1, scale_by_weight=scale)
    z0 = jnp.asarray([1.0, 2.0, -1.0])
    state = prog.init(jnp.int32(0), z0, jax.random.key(0))
    state = state._replace(x=0.25 * z0, w=jnp.float32(0.25))  # a node holding little weight
    batch = {"a": jnp.eye(D), "b": jnp.zeros(D)}
    state, _ = prog.step(state, _lsq_grad, batch, jax.random.key(0))
    step = -0.1 * _lsq_grad(z0, batch)  # splitting (x, w) leaves z = x / w alone
    np.testing.assert_allclose(prog.params(state), z0 + (step if scale else step / 0.25), rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(actions=st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 99)), max_size=50))
def test_adpsgd_pairwise_averaging_moves_no_mass(actions):
    drv = _Driver(_adpsgd_program(), spread=True)
    start = np.sum(drv.params(), 0)
    applied = np.zeros(D)
    for is_step, node, pick in actions:
        if is_step or not drv.in_flight:
            before = drv.params()[node]
            drv.step(node, key=pick)
            applied += drv.params()[node] - before  # the gradient step
        else:
            drv.deliver(pick)
        replies = sum((np.asarray(p) for c, *_, p in drv.in_flight if c == "reply"), np.zeros(D))
        # Averaging only moves mass between nodes (replies carry it): the sum moves by the steps.
        np.testing.assert_allclose(np.sum(drv.params(), 0) + replies, start + applied, atol=1e-4)


@functools.cache
def _adpsgd_program():
    return gossip.adpsgd(topology.ring(6), learning_rate=0.05)


def test_adpsgd_exchange_is_the_pairwise_average_plus_the_step():
    drv = _Driver(_adpsgd_program(), spread=True)
    x = drv.params()
    drv.step(2, key=0)
    ((_, j, *_),) = drv.in_flight
    step = drv.params()[2] - x[2]
    drv.drain()  # the average request, then the reply
    avg = (x[2] + x[j]) / 2
    np.testing.assert_allclose(drv.params()[j], avg, rtol=1e-5)
    np.testing.assert_allclose(drv.params()[2], avg + step, rtol=1e-5)
    assert j in (1, 3)


# ---------------------------------------------------------------------------------------
# Convergence in the simulator: homogeneous least squares, 6 nodes, exponential delays.


@pytest.fixture(scope="module")
def simulated():
    problem = problems.least_squares(6, 4, 20, heterogeneity=0.0, batch_size=8, seed=0)
    asynchrony = asynchrony_lib.Asynchrony(delay=asynchrony_lib.exponential(0.5))
    out = {}
    for name, make in _factories(6).items():
        prog = make(learning_rate=0.05)
        out[name] = simulator.simulate(prog, problem, asynchrony, steps=900, seed=0, record_every=90)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_homogeneous_least_squares(simulated, name):
    trace = simulated[name]
    assert trace["steps"][-1] == 900  # nobody deadlocked
    # From ~0.5 the gap falls to the SGD noise floor (batch 8, eta 0.05), about 1e-4 here.
    assert trace["gap"][-1] < 0.01 * trace["gap"][0]
    if name == "sgp":
        assert np.all(trace["push_sum_weight"] <= 6 + 1e-4)


def test_barrier_rounds_cost_the_slowest_node(simulated):
    # Same number of gradient steps; the synchronous runs pay for waiting at every round.
    assert simulated["allreduce_sgd"]["time"][-1] > 1.5 * simulated["adpsgd"]["time"][-1]
    assert simulated["dpsgd"]["time"][-1] > 1.5 * simulated["sgp"]["time"][-1]


# ---------------------------------------------------------------------------------------
# Contract: jit, stable structure, no retracing, dtypes, pytrees.


def _pytree_params(dtype):
    return {"w": jnp.ones((D, 2), dtype), "b": jnp.zeros((2,), dtype)}


def _pytree_grad(params, batch):
    return jax.grad(lambda p: jnp.mean((batch @ p["w"] + p["b"]) ** 2))(params)


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_handlers_jit_with_stable_structure_and_no_retracing(name, dtype):
    params = _pytree_params(dtype)
    prog = _factories(4)[name](optimizer=optax.adam(1e-2))
    traces = []

    def step(state, batch):
        traces.append(1)  # runs once per trace, not per call
        return prog.step(state, _pytree_grad, batch, jax.random.key(0))

    step = jax.jit(step)
    state0 = jax.jit(prog.init)(jnp.int32(1), params, jax.random.key(0))
    batch = jnp.ones((5, D), dtype)
    state1, emit = step(state0, batch)
    # Receiving lets the synchronous ones finish their round.
    for c in prog.channels:
        payload = (
            jax.tree.map(lambda p: p[0], program_lib.expand_outbox(emit.outbox[c]).payload)
            if c in emit.outbox
            else jax.tree.map(
                lambda t: jnp.zeros(t.shape, t.dtype), program_lib.resolve(prog.channels[c].payload, params)
            )
        )
        for slot in range(prog.channels[c].graph.max_in_degree):
            msg = program_lib.Message(jnp.int32(slot), jnp.int32(0), payload)
            state1, _ = jax.jit(prog.receive[c])(state1, msg)
            assert _signature(state1) == _signature(state0)
    state2, _ = step(state1, batch)
    assert len(traces) == 1
    assert _signature(state2) == _signature(state0)
    assert jax.tree.leaves(prog.params(state2))[0].dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_in_float32_and_bfloat16(name, dtype):
    prog = _factories(4)[name](learning_rate=0.1)
    drv = _Driver(prog, dtype=dtype)
    start = drv.gap()
    for _ in range(25):
        drv.round()
    assert drv.states[0].x.dtype == dtype
    assert drv.gap() < 0.1 * start


# ---------------------------------------------------------------------------------------
# Factory-time errors.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(), ValueError),  # neither
        (dict(learning_rate=0.1, optimizer=optax.sgd(0.1)), ValueError),  # both
        (dict(learning_rate=0.0), ValueError),
        (dict(learning_rate="0.1"), TypeError),
        (dict(optimizer=lambda g: g), TypeError),
        (dict(learning_rate=float("inf")), ValueError),
        (dict(learning_rate=True), TypeError),
    ],
)
def test_bad_step_arguments(name, kwargs, error):
    with pytest.raises(error):
        _factories(3)[name](**kwargs)


def test_bad_graphs_and_weights():
    directed = topology.directed_ring(4)
    ok = dict(learning_rate=0.1)
    with pytest.raises(ValueError, match="undirected"):
        gossip.adpsgd(directed, **ok)
    with pytest.raises(ValueError, match="undirected"):
        gossip.dpsgd(directed, **ok)  # Metropolis weights need an undirected graph
    with pytest.raises(ValueError, match="sum to 1"):
        gossip.dpsgd(topology.ring(4), weights=np.eye(4) * 0.5, **ok)
    with pytest.raises(ValueError, match="non-edges"):
        gossip.dpsgd(topology.ring(4), weights=np.full((4, 4), 0.25), **ok)
    for factory in (gossip.dpsgd, gossip.adpsgd, gossip.sgp):
        with pytest.raises(TypeError, match="Graph"):
            factory(np.ones((4, 4), bool), **ok)
    for bad, error in ((0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_nodes"):
            gossip.allreduce_sgd(num_nodes=bad, **ok)
