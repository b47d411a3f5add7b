"""Tests for jaxasync._src.mixing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxasync._src import mixing, topology

FAST = settings(max_examples=15, deadline=None)


@st.composite
def undirected_graphs(draw, max_n=8):
    n = draw(st.integers(2, max_n))
    bits = draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))
    a = np.array(bits, dtype=bool).reshape(n, n)
    a = np.triu(a, 1)
    return topology.Graph(a | a.T)


@st.composite
def directed_graphs(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    bits = draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))
    return topology.from_adjacency(np.array(bits).reshape(n, n))


def _random_doubly_stochastic(rng, n, terms=3):
    """A convex combination of permutation matrices (Birkhoff): doubly stochastic, not symmetric."""
    lam = rng.dirichlet(np.ones(terms))
    return sum(c * np.eye(n)[rng.permutation(n)] for c in lam)


# ---------------------------------------------------------------------------------------
# Gossip.


@FAST
@given(undirected_graphs(), st.integers(0, 2**31 - 1))
def test_gossip_with_doubly_stochastic_weights_keeps_the_average(graph, seed):
    rng = np.random.default_rng(seed)
    x = {"a": rng.normal(size=(graph.n, 3)), "b": rng.normal(size=(graph.n,))}
    x = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x)
    for w in (topology.metropolis_weights(graph), _random_doubly_stochastic(rng, graph.n)):
        mixed = x
        for _ in range(5):
            mixed = mixing.pull_mix(w, mixed)
        for key in x:
            np.testing.assert_allclose(mixed[key].mean(0), x[key].mean(0), atol=1e-5)


def test_gossip_reaches_consensus_on_a_connected_graph():
    g = topology.torus(3, 3)
    w = jnp.asarray(topology.metropolis_weights(g), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(g.n, 4)), jnp.float32)
    mix = jax.jit(mixing.pull_mix)
    y = x
    for _ in range(100):
        y = mix(w, y)
    np.testing.assert_allclose(y, jnp.broadcast_to(x.mean(0), x.shape), atol=1e-5)


def test_pull_mix_matches_matmul_and_keeps_dtype():
    w = topology.pull_weights(topology.exponential(5))
    x = np.random.default_rng(1).normal(size=(5, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(mixing.pull_mix(w, x), np.einsum("ij,jab->iab", w, x), rtol=1e-5)
    assert mixing.pull_mix(w, jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="leading axis of size 5"):
        mixing.pull_mix(w, np.ones((4, 2)))
    with pytest.raises(ValueError, match="square"):
        mixing.pull_mix(np.ones((2, 3)), np.ones((3,)))


@pytest.mark.parametrize(
    "graph", [topology.exponential(6), topology.out_tree(7), topology.star(5), topology.ring(1)]
)
def test_node_pull_mix_matches_the_stacked_step(graph):
    r = topology.pull_weights(graph)
    self_w, nbr_w = topology.in_weight_table(graph, r)
    x = {"w": np.random.default_rng(2).normal(size=(graph.n, 3)).astype(np.float32)}
    gathered = jax.tree.map(lambda v: v[np.maximum(graph.in_table, 0)], x)  # [n, max_in, 3]
    node_step = jax.jit(jax.vmap(mixing.pull_mix_node))
    got = node_step(self_w, nbr_w, x, gathered, graph.in_mask)
    np.testing.assert_allclose(got["w"], mixing.pull_mix(r, x)["w"], rtol=1e-5, atol=1e-6)


def test_node_pull_mix_gives_masked_weight_to_self():
    own = jnp.array([1.0, 1.0])
    nbrs = jnp.array([[3.0, 3.0], [5.0, 5.0]])
    out = mixing.pull_mix_node(0.5, jnp.array([0.25, 0.25]), own, nbrs, jnp.array([True, False]))
    np.testing.assert_allclose(out, [0.75 * 1 + 0.25 * 3] * 2)


def test_pairwise_average():
    a, b = mixing.pairwise_average({"x": jnp.array([0.0, 2.0])}, {"x": jnp.array([2.0, 4.0])})
    np.testing.assert_allclose(a["x"], [1.0, 3.0])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))


# ---------------------------------------------------------------------------------------
# Push-sum.


@FAST
@given(directed_graphs(), st.integers(0, 2**31 - 1))
def test_push_sum_conserves_mass_on_any_digraph(graph, seed):
    p = topology.push_weights(graph)
    x = np.random.default_rng(seed).normal(size=(graph.n, 2)).astype(np.float32)
    state = mixing.push_sum_init(x, jnp.ones(graph.n))
    value0, weight0 = mixing.push_sum_mass(state)
    for _ in range(6):
        state = mixing.push_sum_mix(p, state)
    value, weight = mixing.push_sum_mass(state)
    np.testing.assert_allclose(value, value0, atol=1e-4)
    np.testing.assert_allclose(weight, weight0, rtol=1e-5)


def test_push_sum_estimates_the_average_on_a_directed_graph():
    a = topology.directed_ring(6).adjacency.copy()
    a[0, 2:5] = True  # node 0 pushes more widely: the weights are not doubly stochastic
    g = topology.from_adjacency(a)
    x = np.random.default_rng(3).normal(size=(g.n, 3)).astype(np.float32)
    state = mixing.push_sum_init({"x": x}, jnp.ones(g.n))
    step = jax.jit(functools.partial(mixing.push_sum_mix, topology.push_weights(g)))
    for _ in range(60):
        state = step(state)
    est = mixing.push_sum_estimate(state)["x"]
    np.testing.assert_allclose(est, np.broadcast_to(x.mean(0), x.shape), atol=1e-5)
    assert np.ptp(np.asarray(state.weight)) > 0.01  # weights differ: de-biasing was needed


def test_node_push_sum_split_and_receive_match_the_stacked_step():
    g = topology.in_tree(6)
    c = topology.push_weights(g)
    self_w, out_w = topology.out_weight_table(g, c)
    x = np.random.default_rng(4).normal(size=(g.n, 2)).astype(np.float32)
    stacked = mixing.push_sum_mix(c, mixing.push_sum_init(x, jnp.ones(g.n)))

    split = jax.jit(mixing.push_sum_split)
    receive = jax.jit(mixing.push_sum_receive)
    kept, sent = [], []
    for i in range(g.n):
        k, s = split(mixing.push_sum_init(x[i]), self_w[i], out_w[i])
        kept.append(k)
        sent.append(s)
    for i in range(g.n):
        for k in range(g.max_out_degree):
            msg = jax.tree.map(lambda v, k=k: v[k], sent[i])
            dst = g.out_table[i, k]
            # Padding slots are "sent" to nobody; deliver them to node 0 with accept=False.
            kept[max(dst, 0)] = receive(kept[max(dst, 0)], msg, dst >= 0)
    np.testing.assert_allclose(np.stack([k.value for k in kept]), stacked.value, atol=1e-6)
    np.testing.assert_allclose(np.stack([k.weight for k in kept]), stacked.weight, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Weights that are not stochastic: an error, not a wrong answer.


def test_stacked_mixing_rejects_concrete_weights_that_are_not_stochastic():
    tree = topology.out_tree(7)  # root 0 feeds everyone: pull rows sum to 1, push columns do
    r, c = topology.pull_weights(tree), topology.push_weights(tree)
    assert np.abs(r.sum(0) - 1).max() > 0.1 and np.abs(c.sum(1) - 1).max() > 0.1
    x = jnp.ones((7, 2))
    mix_c = mixing.push_sum_mix(c, mixing.push_sum_init(x, jnp.ones(7)))  # fine: columns sum to 1
    np.testing.assert_allclose(mixing.push_sum_mass(mix_c)[1], 7.0, rtol=1e-6)
    np.testing.assert_allclose(mixing.pull_mix(r, x), x, rtol=1e-6)
    for bad in (c, jnp.asarray(c)):  # numpy or a concrete jax array
        with pytest.raises(ValueError, match=r"pull_mix: .*row-stochastic.*rows do not sum to 1"):
            mixing.pull_mix(bad, x)
    with pytest.raises(ValueError, match=r"push_sum_mix: .*column-stochastic.*columns do not sum"):
        mixing.push_sum_mix(r, mixing.push_sum_init(x, jnp.ones(7)))
    with pytest.raises(ValueError, match="negative"):
        mixing.pull_mix(np.array([[1.5, -0.5], [0.0, 1.0]]), x[:2])
    with pytest.raises(ValueError, match="NaN"):
        mixing.pull_mix(np.array([[np.nan, 1.0], [0.0, 1.0]]), x[:2])
    # A W closed over by a jitted function is concrete: rejected once, when it is traced.
    with pytest.raises(ValueError, match="row-stochastic"):
        jax.jit(functools.partial(mixing.pull_mix, c))(x)
    # Weights rounded to bfloat16 miss 1 by up to its resolution and are still accepted.
    w16 = jnp.asarray(topology.metropolis_weights(topology.torus(3, 3)), jnp.bfloat16)
    assert np.abs(np.asarray(w16, np.float64).sum(1) - 1).max() > 1e-6
    assert mixing.pull_mix(w16, jnp.ones((9, 2), jnp.bfloat16)).dtype == jnp.bfloat16
    # Traced weights (jit arguments, vmapped node tables) cannot be inspected: used as given.
    np.testing.assert_allclose(jax.jit(mixing.pull_mix)(c, x), c @ x, rtol=1e-6)


def test_node_mixing_rejects_concrete_shares_that_do_not_sum_to_one():
    own, nbrs = jnp.ones(2), jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"pull_mix_node: .*row.*sum to 1.*sum 0\.75"):
        mixing.pull_mix_node(0.5, np.array([0.25, 0.0]), own, nbrs)
    with pytest.raises(ValueError, match="nonnegative"):
        mixing.pull_mix_node(jnp.float32(1.5), jnp.array([-0.5, 0.0]), own, nbrs)  # sums to 1
    state = mixing.push_sum_init(own)
    with pytest.raises(ValueError, match=r"push_sum_split: .*column.*sum to 1"):
        mixing.push_sum_split(state, 0.5, np.array([0.25, 0.5]))  # would create mass
    with pytest.raises(ValueError, match="nonnegative"):
        mixing.push_sum_split(state, 0.5, np.array([0.75, -0.25]))
    kept, sent = mixing.push_sum_split(state, 0.5, np.array([0.25, 0.25]))
    np.testing.assert_allclose(kept.weight + sent.weight.sum(), 1.0)
    # Under vmap the node tables are traced: no check, as in a node program's jitted step.
    out = jax.vmap(mixing.pull_mix_node)(jnp.array([0.5, 0.9]), jnp.full((2, 2), 0.25), own, nbrs)
    np.testing.assert_allclose(out, [1.0, 1.4])


# ---------------------------------------------------------------------------------------
# Keep-newest slots.


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 12)), max_size=30))
def test_keep_newest_keeps_the_highest_sequence_number_per_slot(messages):
    num_slots = 3  # slot 3 and -1 are out of range: ignored
    buf = {"v": jnp.zeros((num_slots, 2))}
    last = jnp.full((num_slots,), -1, jnp.int32)
    update = jax.jit(mixing.keep_newest)
    newest = {}
    for slot, seq in messages:
        buf, last = update(buf, last, slot, seq, {"v": jnp.full((2,), float(seq))})
        if 0 <= slot < num_slots:
            newest[slot] = max(newest.get(slot, -1), seq)
    for k in range(num_slots):
        assert int(last[k]) == newest.get(k, -1)
        assert float(buf["v"][k, 0]) == float(max(newest.get(k, 0), 0))


def test_keep_newest_vmaps_over_nodes():
    buf, last = jnp.zeros((4, 2)), jnp.full((4, 2), -1, jnp.int32)
    buf, last = jax.vmap(mixing.keep_newest)(
        buf, last, jnp.array([0, 1, 0, -1]), jnp.array([3, 3, 3, 3]), jnp.arange(4.0)
    )
    np.testing.assert_array_equal(last, [[3, -1], [-1, 3], [3, -1], [-1, -1]])
    np.testing.assert_array_equal(buf, [[0, 0], [0, 1], [2, 0], [0, 0]])


# ---------------------------------------------------------------------------------------
# Running-sum channel: conservation under loss, delay and reordering.


@functools.partial(jax.jit, static_argnames="robust")
def _local_update(state, inbox, z, g, g_new, self_w, out_w, robust):
    """R-FAST steps (c)-(d) for the tracker z, with running sums or naive increments."""
    if robust:
        delta, rho_tilde = mixing.running_sum_absorb(state.rho_hat, state.rho_tilde)
        state = state._replace(rho_tilde=rho_tilde)
    else:
        delta, inbox = inbox.sum(0), jnp.zeros_like(inbox)
    z_half = z + delta + g_new - g
    state = state._replace(rho_out=mixing.running_sum_send(state.rho_out, z_half, out_w))
    increments = out_w[:, None] * z_half[None]
    return state, inbox, self_w * z_half, state.rho_out if robust else increments


def _simulate(graph, seed, robust, loss=0.3, events=250, d=3):
    rng = np.random.default_rng(seed)
    self_w, out_w = topology.out_weight_table(graph, topology.push_weights(graph))
    g = rng.normal(size=(graph.n, d)).astype(np.float32)
    z = g.copy()
    init = mixing.running_sum_init(jnp.zeros(d), graph.max_in_degree, graph.max_out_degree)
    states = [init] * graph.n
    inbox = [jnp.zeros((graph.max_in_degree, d))] * graph.n
    seq = np.zeros(graph.n, int)
    in_flight, lost = [], np.zeros(d)
    receive = jax.jit(mixing.running_sum_receive)

    def send_all(i, payloads, drop):
        for k in range(graph.out_degree[i]):
            msg = (graph.out_table[i, k], graph.out_recv_slot[i, k], seq[i], payloads[k])
            if drop and rng.random() < loss:
                lost[:] += np.asarray(payloads[k])
            else:
                in_flight.append(msg)
        seq[i] += 1

    def deliver(index):
        dst, slot, s, payload = in_flight.pop(index)
        st_ = states[dst]
        if robust:
            rho_hat, last = receive(st_.rho_hat, st_.last_seq, slot, s, payload)
            states[dst] = st_._replace(rho_hat=rho_hat, last_seq=last)
        else:
            inbox[dst] = inbox[dst].at[slot].add(payload)

    def check_invariant():
        rho_out = jnp.stack([s.rho_out for s in states])
        rho_tilde = jnp.stack([s.rho_tilde for s in states])
        unabsorbed = mixing.running_sum_unabsorbed(rho_out, rho_tilde)
        np.testing.assert_allclose(z.sum(0) + unabsorbed, g.sum(0), atol=2e-4)

    for _ in range(events):
        if in_flight and rng.random() < 0.5:
            deliver(int(rng.integers(len(in_flight))))  # any message: reordering
        else:
            i = int(rng.integers(graph.n))
            g_new = rng.normal(size=d).astype(np.float32)
            states[i], inbox[i], z_i, payloads = _local_update(
                states[i], inbox[i], z[i], g[i], g_new, self_w[i], out_w[i], robust
            )
            z[i], g[i] = np.asarray(z_i), g_new
            send_all(i, payloads, drop=True)
        if robust:
            check_invariant()

    # Flush: deliver what is in flight; the robust channel re-sends its running sums once
    # (a lossless round), then everybody absorbs.
    if robust:
        for i in range(graph.n):
            send_all(i, states[i].rho_out, drop=False)
    while in_flight:
        deliver(len(in_flight) - 1)
    for i in range(graph.n):
        if robust:
            delta, rho_tilde = mixing.running_sum_absorb(states[i].rho_hat, states[i].rho_tilde)
            states[i] = states[i]._replace(rho_tilde=rho_tilde)
        else:
            delta = inbox[i].sum(0)
        z[i] += np.asarray(delta)
    if robust:
        check_invariant()
    return z.sum(0), g.sum(0), lost


@pytest.mark.parametrize("graph", [topology.directed_ring(5), topology.exponential(6), topology.in_tree(6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_running_sums_conserve_mass_despite_loss_and_reordering(graph, seed):
    z_sum, g_sum, lost = _simulate(graph, seed, robust=True)
    assert np.abs(lost).sum() > 0  # packets really were lost
    np.testing.assert_allclose(z_sum, g_sum, atol=2e-4)  # ... and no mass was


@pytest.mark.parametrize("seed", [0, 1])
def test_naive_increments_lose_the_mass_of_lost_packets(seed):
    z_sum, g_sum, lost = _simulate(topology.exponential(6), seed, robust=False)
    assert np.abs(g_sum - z_sum).max() > 1e-2
    np.testing.assert_allclose(g_sum - z_sum, lost, atol=2e-4)


def test_running_sum_pieces():
    state = mixing.running_sum_init({"a": jnp.zeros(2)}, max_in_degree=2, max_out_degree=3)
    assert state.rho_out["a"].shape == (3, 2) and state.rho_hat["a"].shape == (2, 2)
    assert state.last_seq.tolist() == [-1, -1]
    rho_out = mixing.running_sum_send(state.rho_out, {"a": jnp.ones(2)}, jnp.array([0.5, 0.25, 0]))
    rho_out = mixing.running_sum_send(rho_out, {"a": jnp.ones(2)}, jnp.array([0.5, 0.25, 0]))
    np.testing.assert_allclose(rho_out["a"][:, 0], [1.0, 0.5, 0.0])
    rho_hat, last = mixing.running_sum_receive(
        state.rho_hat, state.last_seq, 1, 7, {"a": jnp.array([2.0, 2.0])}
    )
    delta, tilde = mixing.running_sum_absorb(rho_hat, state.rho_tilde, jnp.array([True, False]))
    np.testing.assert_allclose(delta["a"], [0.0, 0.0])  # slot 1 masked: left for later
    delta, tilde = jax.jit(mixing.running_sum_absorb)(rho_hat, tilde)
    np.testing.assert_allclose(delta["a"], [2.0, 2.0])
    delta, tilde = mixing.running_sum_absorb(rho_hat, tilde)
    np.testing.assert_allclose(delta["a"], [0.0, 0.0])  # nothing new: nothing absorbed twice
    with pytest.raises(ValueError, match="leading axis of size 2"):
        mixing.running_sum_send(state.rho_out, {"a": jnp.ones(2)}, jnp.ones(2))
