"""Tests for jaxasync._src.topology."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxasync import topology as public_topology
from jaxasync._src import topology

BUILDERS = {
    "ring5": lambda: topology.ring(5),
    "ring2": lambda: topology.ring(2),
    "directed_ring6": lambda: topology.directed_ring(6),
    "torus3x4": lambda: topology.torus(3, 4),
    "torus2x2": lambda: topology.torus(2, 2),
    "exponential8": lambda: topology.exponential(8),
    "exponential5": lambda: topology.exponential(5),
    "complete4": lambda: topology.complete(4),
    "star6": lambda: topology.star(6, center=2),
    "in_tree7": lambda: topology.in_tree(7),
    "out_tree10_ternary": lambda: topology.out_tree(10, root=3, branching=3),
    "geometric": lambda: topology.random_geometric(12, 0.4, seed=1),
    "single": lambda: topology.ring(1),
}
UNDIRECTED = ["ring5", "ring2", "torus3x4", "torus2x2", "complete4", "star6", "geometric"]


def _brute_force_roots(a):
    """Nodes reaching every node, by transitive closure."""
    n = a.shape[0]
    reach = a | np.eye(n, dtype=bool)
    for _ in range(n):
        reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    return np.flatnonzero(reach.all(axis=1))


random_adjacency = st.integers(1, 9).flatmap(
    lambda n: st.lists(st.booleans(), min_size=n * n, max_size=n * n).map(
        lambda bits: np.array(bits, dtype=bool).reshape(n, n)
    )
)


# ---------------------------------------------------------------------------------------
# Graph structure.


def test_builders_match_their_definitions():
    ring = topology.ring(5)
    assert ring.in_neighbors(0).tolist() == [1, 4]
    assert ring.is_symmetric and ring.num_edges == 10
    assert topology.directed_ring(4).out_neighbors(3).tolist() == [0]
    assert (topology.torus(3, 4).in_degree == 4).all()
    assert topology.exponential(8).out_neighbors(0).tolist() == [1, 2, 4]
    assert topology.exponential(8).out_neighbors(6).tolist() == [0, 2, 7]
    assert topology.complete(4).num_edges == 12
    star = topology.star(6, center=2)
    assert star.out_neighbors(2).tolist() == [0, 1, 3, 4, 5]
    assert star.out_neighbors(4).tolist() == [2]
    tree = topology.in_tree(7)
    assert tree.out_neighbors(5).tolist() == [2] and tree.out_neighbors(0).tolist() == []
    assert tree.in_neighbors(0).tolist() == [1, 2]
    assert tree.num_edges == 6
    assert np.array_equal(topology.out_tree(7).adjacency, tree.adjacency.T)
    shifted = topology.in_tree(5, root=3)
    assert shifted.out_degree[3] == 0 and shifted.num_edges == 4


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_padded_tables_are_consistent(name):
    g = BUILDERS[name]()
    a = g.adjacency
    assert g.in_table.dtype == np.int32 and g.out_table.dtype == np.int32
    assert g.in_table.shape == (g.n, g.max_in_degree)
    assert g.out_table.shape == (g.n, g.max_out_degree)
    assert np.array_equal(g.in_degree, a.sum(0)) and np.array_equal(g.out_degree, a.sum(1))
    assert np.array_equal(g.in_mask, g.in_table >= 0)
    assert np.array_equal(g.out_mask, g.out_table >= 0)
    for i in range(g.n):
        assert np.array_equal(g.in_neighbors(i), np.flatnonzero(a[:, i]))
        assert np.array_equal(g.out_neighbors(i), np.flatnonzero(a[i]))
        assert (g.in_table[i, g.in_degree[i] :] == -1).all()
        assert (g.out_table[i, g.out_degree[i] :] == -1).all()
        for k in range(g.out_degree[i]):
            dst, slot = g.out_table[i, k], g.out_recv_slot[i, k]
            assert g.in_table[dst, slot] == i and g.in_send_slot[dst, slot] == k
            assert g.in_slot_of(i, dst) == slot
    assert (g.out_recv_slot[~g.out_mask] == -1).all()
    assert (g.in_send_slot[~g.in_mask] == -1).all()
    assert {tuple(e) for e in g.edges.tolist()} == {tuple(e) for e in np.argwhere(a).tolist()}


@pytest.mark.parametrize("name", UNDIRECTED)
def test_undirected_builders_are_symmetric(name):
    assert BUILDERS[name]().is_symmetric


def test_graph_is_immutable_hashable_and_a_static_jit_argument():
    g = topology.ring(4)
    with pytest.raises(ValueError):
        g.adjacency[0, 2] = True
    with pytest.raises(ValueError):
        g.in_table[0, 0] = 3
    with pytest.raises(AttributeError):
        g.n = 3
    assert g == topology.ring(4) and hash(g) == hash(topology.ring(4))
    assert g != topology.directed_ring(4)

    f = jax.jit(lambda x, graph: x * jnp.asarray(graph.in_degree).sum(), static_argnums=1)
    assert float(f(1.0, g)) == 8.0


def test_graph_errors():
    with pytest.raises(ValueError, match="square"):
        topology.Graph(np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="self loops"):
        topology.Graph(np.eye(3, dtype=bool))
    with pytest.raises(TypeError, match="bool"):
        topology.Graph(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not an edge"):
        topology.directed_ring(4).in_slot_of(1, 0)
    with pytest.raises(ValueError, match="out of range"):
        topology.ring(4).in_neighbors(4)
    with pytest.raises(ValueError, match=">= 1"):
        topology.ring(0)
    with pytest.raises(TypeError):
        topology.ring(2.5)
    with pytest.raises(ValueError, match="root"):
        topology.in_tree(4, root=4)
    with pytest.raises(ValueError, match="center"):
        topology.star(4, center=-1)


def test_from_adjacency_drops_the_diagonal():
    w = topology.pull_weights(topology.directed_ring(4))
    g = topology.from_adjacency(w.T)  # W[receiver, sender] -> edges sender -> receiver
    assert g == topology.directed_ring(4)


class _FakeNetworkx:
    """Duck-typed stand-in for a networkx graph (networkx is optional)."""

    def __init__(self, nodes, edges, directed):
        self.nodes, self._edges, self._directed, self.name = nodes, edges, directed, "fake"

    def edges(self):
        return self._edges

    def is_directed(self):
        return self._directed


def test_from_networkx_duck_typed():
    g = topology.from_networkx(_FakeNetworkx(["a", "b", "c"], [("a", "b"), ("b", "c")], False))
    assert g == topology.from_adjacency([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    d = topology.from_networkx(_FakeNetworkx(["a", "b"], [("b", "a"), ("a", "a")], True))
    assert d.adjacency.tolist() == [[False, False], [True, False]]


def test_from_networkx_real():
    nx = pytest.importorskip("networkx")
    assert topology.from_networkx(nx.cycle_graph(5)) == topology.ring(5)


def test_public_module_reexports_everything():
    for name in topology.__all__:
        assert getattr(public_topology, name) is getattr(topology, name)
    assert sorted(public_topology.__all__) == sorted(topology.__all__)


# ---------------------------------------------------------------------------------------
# Weights and validators.


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_uniform_weights_are_stochastic_on_the_graph(name):
    g = BUILDERS[name]()
    r, c = topology.pull_weights(g), topology.push_weights(g)
    topology.check_row_stochastic(r, g)
    topology.check_column_stochastic(c, g)
    # R[i, j] = 1 / (indeg(i) + 1) on in-neighbours and i itself.
    for i in range(g.n):
        expected = np.zeros(g.n)
        expected[np.r_[g.in_neighbors(i), i]] = 1.0 / (g.in_degree[i] + 1)
        np.testing.assert_allclose(r[i], expected)
        expected = np.zeros(g.n)
        expected[np.r_[g.out_neighbors(i), i]] = 1.0 / (g.out_degree[i] + 1)
        np.testing.assert_allclose(c[:, i], expected)


@pytest.mark.parametrize("name", UNDIRECTED)
def test_metropolis_weights_are_symmetric_doubly_stochastic(name):
    g = BUILDERS[name]()
    w = topology.metropolis_weights(g)
    topology.check_doubly_stochastic(w, g)
    np.testing.assert_allclose(w, w.T)
    assert (w >= 0).all()


def test_metropolis_rejects_directed_graphs():
    with pytest.raises(ValueError, match="undirected"):
        topology.metropolis_weights(topology.directed_ring(4))


def test_validators_name_the_problem():
    g = topology.ring(4)
    w = topology.metropolis_weights(g)
    bad = w.copy()
    bad[2, 2] -= 0.25
    with pytest.raises(ValueError, match=r"1 rows do not sum to 1: 2: sum 0\.75 \(off by -0\.25\)"):
        topology.check_row_stochastic(bad)
    with pytest.raises(ValueError, match=r"columns do not sum to 1: 2: sum 0\.75"):
        topology.check_column_stochastic(bad)
    with pytest.raises(ValueError, match="rows do not sum"):
        topology.check_doubly_stochastic(bad)
    neg = w.copy()
    neg[0, 1], neg[0, 0] = -0.1, neg[0, 0] + neg[0, 1] + 0.1
    with pytest.raises(ValueError, match=r"negative entries: \{\(0, 1\): -0\.1\}"):
        topology.check_row_stochastic(neg)
    with pytest.raises(ValueError, match="square"):
        topology.check_row_stochastic(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="n=4 nodes"):
        topology.check_row_stochastic(np.eye(3), g)
    with pytest.raises(ValueError, match="NaN"):
        topology.check_row_stochastic(np.full((2, 2), np.nan))
    off = np.full((4, 4), 0.25)  # complete-graph weights on a ring
    with pytest.raises(ValueError, match=r"non-edges .* \(sender, receiver\) in \[\(2, 0\)"):
        topology.check_doubly_stochastic(off, g)
    # Column-stochastic is not row-stochastic in general.
    c = topology.push_weights(topology.in_tree(5))
    topology.check_column_stochastic(c)
    with pytest.raises(ValueError, match="rows do not sum"):
        topology.check_row_stochastic(c)


@pytest.mark.parametrize("name", ["exponential5", "in_tree7", "star6", "single"])
def test_weight_tables_reproduce_the_matrix(name):
    g = BUILDERS[name]()
    x = np.random.default_rng(0).normal(size=(g.n, 3))
    r = topology.pull_weights(g)
    self_w, nbr_w = topology.in_weight_table(g, r)
    gathered = x[np.maximum(g.in_table, 0)]  # [n, max_in, 3]
    pulled = self_w[:, None] * x + np.einsum("ik,ikd->id", nbr_w, gathered)
    np.testing.assert_allclose(pulled, r @ x)
    c = topology.push_weights(g)
    self_w, nbr_w = topology.out_weight_table(g, c)
    pushed = self_w[:, None] * x
    for i in range(g.n):
        for k in range(g.out_degree[i]):
            pushed[g.out_table[i, k]] += nbr_w[i, k] * x[i]
    np.testing.assert_allclose(pushed, c @ x)
    assert (nbr_w[~g.out_mask] == 0).all()


def test_weight_tables_reject_weight_on_non_edges():
    with pytest.raises(ValueError, match="non-edges"):
        topology.in_weight_table(topology.ring(4), np.full((4, 4), 0.25))
    with pytest.raises(ValueError, match="non-edges"):
        topology.out_weight_table(topology.in_tree(4), topology.push_weights(topology.out_tree(4)))


# ---------------------------------------------------------------------------------------
# Spanning trees and the common-root condition.


@settings(max_examples=60, deadline=None)
@given(random_adjacency)
def test_roots_match_brute_force(a):
    np.fill_diagonal(a, False)
    g = topology.Graph(a)
    assert topology.roots_of_spanning_trees(g).tolist() == _brute_force_roots(a).tolist()


def test_roots_of_examples():
    assert topology.roots_of_spanning_trees(topology.out_tree(6, root=2)).tolist() == [2]
    assert topology.roots_of_spanning_trees(topology.in_tree(6)).tolist() == []
    assert topology.roots_of_spanning_trees(topology.ring(4)).tolist() == [0, 1, 2, 3]
    two_parts = np.zeros((4, 4), bool)
    two_parts[0, 1] = two_parts[2, 3] = True
    assert topology.roots_of_spanning_trees(two_parts).tolist() == []


@pytest.mark.parametrize(
    "pull, push, roots",
    [
        (topology.directed_ring(6), topology.directed_ring(6), list(range(6))),
        (topology.out_tree(7), topology.in_tree(7), [0]),
        (topology.exponential(8), topology.ring(8), list(range(8))),
        (topology.out_tree(7), topology.directed_ring(7), [0]),
        (topology.star(5), topology.in_tree(5), [0]),
    ],
)
def test_common_root_examples(pull, push, roots):
    assert topology.check_common_root(pull, push).tolist() == roots


def test_common_root_failures():
    with pytest.raises(ValueError, match="no node reaches every node in the pull graph"):
        topology.check_common_root(topology.in_tree(5), topology.in_tree(5))
    with pytest.raises(ValueError, match="no node is reached by every node in the push graph"):
        topology.check_common_root(topology.out_tree(5), topology.out_tree(5))
    with pytest.raises(ValueError, match=r"pull graph's roots \{0\} and the push graph's roots \{1\} do not"):
        topology.check_common_root(topology.out_tree(5, root=0), topology.in_tree(5, root=1))
    with pytest.raises(ValueError, match="4 nodes but the push graph has 5"):
        topology.check_common_root(topology.ring(4), topology.ring(5))


# ---------------------------------------------------------------------------------------
# Spectra and Perron vectors.


@pytest.mark.parametrize("n", [3, 6, 9])
def test_spectral_gap_of_the_metropolis_ring(n):
    w = topology.metropolis_weights(topology.ring(n))  # 1/3 on each edge and the diagonal
    slem = max(abs(1 / 3 + 2 / 3 * np.cos(2 * np.pi * k / n)) for k in range(1, n))
    assert topology.spectral_gap(w) == pytest.approx(1 - slem)


def test_spectral_gap_extremes():
    assert topology.spectral_gap(np.full((5, 5), 0.2)) == pytest.approx(1.0)
    disconnected = np.kron(np.eye(2), np.full((2, 2), 0.5))
    assert topology.spectral_gap(disconnected) == pytest.approx(0.0)
    assert topology.spectral_gap(np.ones((1, 1))) == 1.0


def test_perron_vectors_and_effective_step():
    n = 6
    r = c = topology.metropolis_weights(topology.ring(n))
    u, v = topology.perron_vectors(r, c)
    np.testing.assert_allclose(u, np.full(n, 1 / n))
    np.testing.assert_allclose(v, np.full(n, 1 / n))
    assert topology.effective_step_factor(r, c) == pytest.approx(1.0)
    assert topology.effective_step_factor(r, c, kept_share=True) == pytest.approx(1 / 3)  # c_ii = 1/3

    r, c = topology.pull_weights(topology.out_tree(n)), topology.push_weights(topology.in_tree(n))
    u, v = topology.perron_vectors(r, c)
    np.testing.assert_allclose(u, np.eye(n)[0], atol=1e-12)
    np.testing.assert_allclose(v, np.eye(n)[0], atol=1e-12)
    assert topology.effective_step_factor(r, c) == pytest.approx(n)
    assert topology.effective_step_factor(r, c, kept_share=True) == pytest.approx(n)  # the root keeps all

    r = topology.pull_weights(topology.exponential(n))
    c = topology.push_weights(topology.directed_ring(n))
    u, v = topology.perron_vectors(r, c)
    np.testing.assert_allclose(u @ r, u, atol=1e-12)
    np.testing.assert_allclose(c @ v, v, atol=1e-12)
    assert u.sum() == pytest.approx(1) and v.sum() == pytest.approx(1)
    assert (u >= 0).all() and (v >= 0).all()


def test_perron_needs_a_spanning_tree():
    two = np.kron(np.eye(2), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="multiplicity 2"):
        topology.perron_vectors(two, two)
    with pytest.raises(ValueError, match="rows do not sum"):
        topology.perron_vectors(topology.push_weights(topology.in_tree(4)), np.eye(4))
