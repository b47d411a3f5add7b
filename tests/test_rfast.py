"""Tests for jaxasync._src.algorithms.rfast (R-FAST and its non-robust ablation)."""

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
from jaxasync._src.algorithms import rfast as rfast_lib

D = 3
N = 4


def _lsq_grad(x, batch):
    return batch["a"].T @ (batch["a"] @ x - batch["b"]) / batch["a"].shape[0]


# ---------------------------------------------------------------------------------------
# A tiny Python event loop: the handlers driven one event at a time, in an order, with losses,
# chosen by the test.


class _Driver:
    """Runs a program's jitted handlers on ``n`` nodes with explicit deliveries and losses."""

    def __init__(self, prog, d=D, seed=0, dtype=jnp.float32):
        self.prog = prog
        self.graphs = {c: ch.graph for c, ch in prog.channels.items()}
        self.n = next(iter(self.graphs.values())).n
        self.init = jax.jit(prog.init)
        self.step = jax.jit(functools.partial(prog.step, grad_fn=_lsq_grad))
        self.receive = {c: jax.jit(h) for c, h in prog.receive.items()}
        rng = np.random.default_rng(seed)
        # Heterogeneous local data: each node its own planted solution.
        self.data = []
        for _ in range(self.n):
            a = rng.normal(size=(6, d)).astype(np.float32)
            self.data.append({"a": a, "b": (a @ rng.normal(size=d) * 2).astype(np.float32)})
        x0 = jnp.asarray(rng.normal(size=d), dtype)
        self.states = [self.init(jnp.int32(i), x0, jax.random.key(i)) for i in range(self.n)]
        self.seq = {c: np.zeros(self.n, np.int64) for c in self.graphs}
        self.in_flight = []  # (channel, dst, slot, seq, payload)
        self.lost = {c: jnp.zeros(d) for c in self.graphs}  # summed payloads of lost messages

    def do_step(self, node, lost_bits=0):
        self.states[node], emit = self.step(self.states[node], batch=self.data[node], key=jax.random.key(0))
        bit = 0
        for c, ob in emit.outbox.items():
            ob = program_lib.expand_outbox(ob)
            g = self.graphs[c]
            mask = np.asarray(ob.mask)
            if not mask.any():
                continue
            for k in np.flatnonzero(mask):
                payload = jax.tree.map(lambda p: p[k], ob.payload)
                if (lost_bits >> bit) & 1:
                    self.lost[c] = self.lost[c] + payload
                else:
                    dst, slot = int(g.out_table[node, k]), int(g.out_recv_slot[node, k])
                    self.in_flight.append((c, dst, slot, int(self.seq[c][node]), payload))
                bit += 1
            self.seq[c][node] += 1

    def deliver(self, index):
        c, dst, slot, seq, payload = self.in_flight.pop(index % len(self.in_flight))
        msg = program_lib.Message(jnp.int32(slot), jnp.int32(seq), payload)
        self.states[dst], _ = self.receive[c](self.states[dst], msg)

    def drain(self):
        while self.in_flight:
            self.deliver(len(self.in_flight) - 1)  # newest first: maximal reordering

    def gap(self):
        """``f(x) - f*`` of the global objective at the average model."""
        x = np.mean([np.asarray(self.prog.params(s), np.float64) for s in self.states], 0)
        a = np.concatenate([b["a"] for b in self.data]).astype(np.float64)
        b = np.concatenate([b["b"] for b in self.data]).astype(np.float64)
        x_star = np.linalg.lstsq(a, b, rcond=None)[0]
        return 0.5 * np.mean((a @ x - b) ** 2) - 0.5 * np.mean((a @ x_star - b) ** 2)

    def stacked(self):
        return _stack(self.states)

    def sums_in_flight(self):
        total = jnp.zeros(D)
        for c, *_, payload in self.in_flight:
            if c == "sums":
                total = total + payload
        return total


@jax.jit
def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


_TOPOLOGIES = {
    "ring": (topology.directed_ring(N), topology.directed_ring(N)),
    "tree": (topology.out_tree(N), topology.in_tree(N)),  # pull down from 0, push up to 0
}


@functools.cache
def _driver_program(topo, robust):
    pull, push = _TOPOLOGIES[topo]
    return rfast_lib.rfast(pull, push, learning_rate=0.05, robust=robust)


@functools.partial(jax.jit, static_argnames="robust")
def _jitted_error(states, robust=True, in_flight=None):
    return rfast_lib.rfast_conservation_error(states, robust=robust, in_flight=in_flight)


def _error(states, **kw):
    return float(_jitted_error(states, **kw))


_actions = st.lists(
    st.tuples(st.booleans(), st.integers(0, N - 1), st.integers(0, 10**6), st.integers(0, 255)),
    min_size=5,
    max_size=30,
)


@settings(max_examples=8, deadline=None)
@given(topo=st.sampled_from(sorted(_TOPOLOGIES)), actions=_actions)
def test_conservation_holds_under_loss_and_reordering_but_not_without_running_sums(topo, actions):
    robust = _Driver(_driver_program(topo, True))
    naive = _Driver(_driver_program(topo, False))
    for is_step, node, pick, bits in actions:
        for drv in (robust, naive):
            # ~35 % of packets are lost (bits drawn per out-slot), the rest delivered in any order.
            lost_bits = bits & (bits >> 4) if bits % 3 else 0
            if is_step or not drv.in_flight:
                drv.do_step(node, lost_bits)
            else:
                drv.deliver(pick)
        # The running-sum invariant holds after every event, whatever was lost.
        assert _error(robust.stacked()) < 1e-4
        # The ablation's books balance only if the lost mass is counted back in.
        lost = naive.lost["sums"]
        assert _error(naive.stacked(), robust=False, in_flight=naive.sums_in_flight() + lost) < 1e-4

    # Quiet network, then one lossless round: every node pushes once more and it all arrives.
    for drv in (robust, naive):
        drv.drain()
        for i in range(N):
            drv.do_step(i)
        drv.drain()
    # Robust: all mass ever sent has reached its receiver (received-side books balance).
    assert _error(robust.stacked(), robust=False) < 1e-4
    # Non-robust: exactly the lost mass is missing for good.
    missing = _error(naive.stacked(), robust=False)
    np.testing.assert_allclose(missing, float(jnp.max(jnp.abs(naive.lost["sums"]))), atol=1e-4)


def test_nonrobust_loses_mass_with_a_lost_packet_and_robust_does_not():
    for robust in (True, False):
        drv = _Driver(_driver_program("ring", robust))
        drv.do_step(0, lost_bits=0b11)  # both of node 0's messages lost
        drv.do_step(0)
        drv.drain()
        err = _error(drv.stacked(), robust=False)
        if robust:
            assert err < 1e-5
        else:
            assert err > 1e-2  # the first increment is gone


def test_receive_keeps_only_the_newest_pull_value():
    drv = _Driver(_driver_program("ring", True))
    drv.do_step(3)
    drv.do_step(3)
    drv.deliver(-1)  # seq 1 on "sums", delivered first
    newest_pull = [m for m in drv.in_flight if m[0] == "pull"][-1]
    stale_pull = [m for m in drv.in_flight if m[0] == "pull"][0]
    for m in (newest_pull, stale_pull):
        drv.in_flight.remove(m)
        drv.in_flight.append(m)
        drv.deliver(-1)
    s = drv.states[0]
    assert int(s.v_seq[0]) == 1
    np.testing.assert_array_equal(s.v_hat[0], newest_pull[4])


# ---------------------------------------------------------------------------------------
# Simulated convergence: heterogeneous least squares, 8 nodes, 30 % packet loss.


@pytest.fixture(scope="module")
def lossy_runs():
    # Full local gradients: without sampling noise the robust run converges to the exact optimum.
    problem = problems.least_squares(8, 4, 20, heterogeneity=2.0, seed=0)
    asynchrony = asynchrony_lib.Asynchrony(loss=0.3, delay=asynchrony_lib.exponential(0.5))
    ring = topology.directed_ring(8)
    traces = {}
    for robust in (True, False):
        # lr 0.05: gamma = 0.1 (the directed ring's nodes keep half of their tracker)
        prog = rfast_lib.rfast(ring, ring, learning_rate=0.05, robust=robust)
        traces[robust] = simulator.simulate(prog, problem, asynchrony, steps=1600, seed=0, record_every=160)
    # Parameter-server-like pair: pull down the out-tree from 0, push up the in-tree to 0.
    tree = rfast_lib.rfast(topology.out_tree(8), topology.in_tree(8), learning_rate=0.1)
    traces["tree"] = simulator.simulate(tree, problem, asynchrony, steps=1600, seed=0, record_every=160)
    return traces


def test_converges_under_packet_loss_where_the_nonrobust_variant_drifts(lossy_runs):
    robust, naive = lossy_runs[True], lossy_runs[False]
    assert robust["lost"][-1] > 0.2 * robust["sent"][-1]  # the network did lose ~30 %
    gap0 = robust["gap"][0]
    # Tracking removes the heterogeneity and running sums the loss: the gap falls by more than two
    # orders of magnitude (about 4e-4 from 3.7 here). The ablation's trackers lose mass with every
    # lost packet, so they no longer sum to the gradient and the models stall far off (about 2).
    assert robust["gap"][-1] < 0.01 * gap0
    assert naive["gap"][-1] > 0.2 * gap0
    assert naive["gap"][-1] > 100 * robust["gap"][-1]
    # float32 round-off on running sums that grow with time: small against gradients of O(1).
    assert np.all(robust["conservation_error"] < 1e-2)
    assert naive["conservation_error"][-1] > 1.0


def test_converges_under_packet_loss_on_trees_with_a_common_root(lossy_runs):
    # All tracker mass flows to the root; the effective-step scaling (gamma = lr / n) keeps it stable.
    tree = lossy_runs["tree"]
    assert tree["lost"][-1] > 0.2 * tree["sent"][-1]
    assert tree["gap"][-1] < 0.01 * tree["gap"][0]


# ---------------------------------------------------------------------------------------
# One node: R-FAST is SGD (with the first descent one step late).


def test_single_node_is_optax_one_step_late():
    lonely = topology.Graph(np.zeros((1, 1), bool))
    batches = [
        {"a": jnp.asarray(np.random.default_rng(k).normal(size=(5, D)), jnp.float32), "b": jnp.ones(5)}
        for k in range(6)
    ]
    x0 = jnp.asarray([1.0, -2.0, 0.5])
    for opt in (optax.sgd(0.1), optax.adam(0.05)):
        prog = rfast_lib.rfast(lonely, lonely, optimizer=opt)
        state = prog.init(jnp.int32(0), x0, jax.random.key(0))
        step = jax.jit(functools.partial(prog.step, grad_fn=_lsq_grad))
        ref, ref_state = x0, opt.init(x0)
        for b in batches:
            state, _ = step(state, batch=b, key=jax.random.key(0))
            np.testing.assert_allclose(prog.params(state), ref, rtol=1e-5, atol=1e-6)
            updates, ref_state = opt.update(_lsq_grad(ref, b), ref_state, ref)
            ref = optax.apply_updates(ref, updates)


# ---------------------------------------------------------------------------------------
# Contract: jit, stable structure, no retracing, dtypes, pytrees.


def _pytree_params(dtype):
    return {"w": jnp.ones((D, 2), dtype), "b": jnp.zeros((2,), dtype)}


def _pytree_grad(params, batch):
    def loss(p):
        return jnp.mean((batch @ p["w"] + p["b"]) ** 2)

    return jax.grad(loss)(params)


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("robust", [True, False])
def test_handlers_jit_with_stable_structure_and_no_retracing(dtype, robust):
    pull, push = topology.exponential(4), topology.ring(4)
    params = _pytree_params(dtype)
    prog = rfast_lib.rfast(pull, push, optimizer=optax.adam(1e-2), robust=robust)
    traces = []

    def step(state, batch):
        traces.append(1)  # runs once per trace, not per call
        return prog.step(state, _pytree_grad, batch, jax.random.key(0))

    step = jax.jit(step)
    state0 = jax.jit(prog.init)(jnp.int32(1), params, jax.random.key(0))
    batch = jnp.ones((5, D), dtype)
    state1, emit = step(state0, batch)
    state2, _ = step(state1, batch)
    assert len(traces) == 1
    assert _signature(state1) == _signature(state0) == _signature(state2)
    assert state1.x["w"].dtype == dtype
    for c in ("pull", "sums"):
        payload = jax.tree.map(lambda p: p[0], program_lib.expand_outbox(emit.outbox[c]).payload)
        msg = program_lib.Message(jnp.int32(0), jnp.int32(0), payload)
        state3, _ = jax.jit(prog.receive[c])(state2, msg)
        assert _signature(state3) == _signature(state0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_decreases_in_float32_and_bfloat16(dtype):
    ring = topology.directed_ring(N)
    prog = rfast_lib.rfast(ring, ring, learning_rate=0.1)
    drv = _Driver(prog, dtype=dtype)
    start = drv.gap()
    for _ in range(60):  # synchronous rounds: everybody steps, every message arrives
        for i in range(N):
            drv.do_step(i)
        drv.drain()
    assert drv.states[0].x.dtype == dtype
    assert drv.gap() < 0.1 * start


# ---------------------------------------------------------------------------------------
# Factory-time errors and the effective step.


def test_no_common_root_is_rejected():
    with pytest.raises(ValueError, match="do not intersect"):
        rfast_lib.rfast(topology.out_tree(4), topology.in_tree(4, root=1), learning_rate=0.1)
    with pytest.raises(ValueError, match="spanning tree"):
        rfast_lib.rfast(topology.in_tree(4), topology.in_tree(4), learning_rate=0.1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(), ValueError),  # neither
        (dict(learning_rate=0.1, optimizer=optax.sgd(0.1)), ValueError),  # both
        (dict(learning_rate=-1.0), ValueError),
        (dict(learning_rate="0.1"), TypeError),
        (dict(optimizer=lambda g: g), TypeError),
    ],
)
def test_bad_step_arguments(kwargs, error):
    ring = topology.directed_ring(3)
    with pytest.raises(error):
        rfast_lib.rfast(ring, ring, **kwargs)


def test_bad_graphs():
    ring = topology.directed_ring(3)
    with pytest.raises(TypeError, match="Graph"):
        rfast_lib.rfast(np.ones((3, 3), bool), ring, learning_rate=0.1)
    with pytest.raises(ValueError, match="nodes"):
        rfast_lib.rfast(topology.directed_ring(4), ring, learning_rate=0.1)


def test_ring_step_is_the_kept_share_corrected_rate():
    # Directed ring: the node keeps c_ii = 1/2 of z^{1/2} and u = v = 1/n, so gamma = lr / (1/2):
    # the descent -gamma c_ii g moves by lr g, as on the tree.
    prog = rfast_lib.rfast(topology.directed_ring(4), topology.directed_ring(4), learning_rate=0.1)
    state = prog.init(jnp.int32(0), jnp.zeros(D), jax.random.key(0))
    state, _ = prog.step(state, _lsq_grad, {"a": jnp.eye(D), "b": jnp.ones(D)}, jax.random.key(0))
    np.testing.assert_allclose(state.y, 0.1 * np.ones(D) / D, rtol=1e-6)


def test_tree_step_is_divided_by_n():
    pull, push = topology.out_tree(4), topology.in_tree(4)
    x0 = jnp.zeros(D)
    batch = {"a": jnp.eye(D), "b": jnp.ones(D)}
    cases = [
        (dict(learning_rate=0.1), 0.1 / 4),
        (dict(optimizer=optax.sgd(0.1)), 0.1 / 4),  # the optimizer is followed by the same scaling
        (dict(learning_rate=0.1, effective_step=False), 0.1),
        (dict(optimizer=optax.sgd(0.1), effective_step=False), 0.1),
    ]
    for kwargs, expected in cases:
        prog = rfast_lib.rfast(pull, push, **kwargs)
        state = prog.init(jnp.int32(0), x0, jax.random.key(0))  # the root: keeps all its mass
        state, _ = prog.step(state, _lsq_grad, batch, jax.random.key(0))
        # y = x - gamma z with z = c_00 g = g (the root pushes nothing) and g = -b / D.
        np.testing.assert_allclose(state.y, x0 + expected * np.ones(D) / D, rtol=1e-6)
