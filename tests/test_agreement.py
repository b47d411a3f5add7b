"""Tests for jaxasync._src.agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxasync._src import agreement

SIZES = [5, 4, 3]  # the cluster sizes of ALGORITHMS.md 1.10
CLUSTER_OF = np.repeat(np.arange(len(SIZES)), SIZES)
N = len(CLUSTER_OF)


def test_box_midpoint_average():
    values = jnp.array([[0.0, 5.0], [2.0, 1.0], [9.0, 9.0]])
    mask = jnp.array([True, True, False])
    lo, hi = jax.jit(agreement.box)(values, mask)
    assert lo.tolist() == [0.0, 1.0] and hi.tolist() == [2.0, 5.0]
    lo, hi = agreement.box(values, jnp.zeros(3, bool))
    assert lo.tolist() == [np.inf] * 2 and hi.tolist() == [-np.inf] * 2
    los, his = jnp.array([[0.0, 0.0], [4.0, -2.0]]), jnp.array([[1.0, 1.0], [6.0, 0.0]])
    assert jax.jit(agreement.box_midpoint)(los, his).tolist() == [3.0, -0.5]
    assert agreement.box_midpoint(los, his, jnp.array([True, False])).tolist() == [0.5, 0.5]
    np.testing.assert_allclose(jax.jit(agreement.average)(values, mask), [1.0, 3.0])
    with pytest.raises(ValueError, match="mask has shape"):
        agreement.box(values, jnp.ones(2, bool))


def test_rows_given_as_a_sequence_equal_the_stacked_array():
    values = jax.random.normal(jax.random.key(0), (4, 3, 2))
    mask = jnp.array([True, False, True, True])
    rows = [values[k] for k in range(4)]
    for fn in (agreement.box, agreement.average):
        np.testing.assert_array_equal(jax.jit(fn)(rows, mask), fn(values, mask))
    np.testing.assert_array_equal(agreement.box_midpoint(rows, rows), agreement.box_midpoint(values, values))
    np.testing.assert_allclose(agreement.average(rows), jnp.mean(values, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="mask has shape"):
        agreement.average(rows, jnp.ones(3, bool))


def test_diameter_inside_box_rounds():
    values = jnp.array([[0.0, 5.0], [2.0, 1.0], [9.0, 9.0]])
    assert float(jax.jit(agreement.diameter_linf)(values)) == 9.0
    assert float(agreement.diameter_linf(values, jnp.array([True, True, False]))) == 4.0
    assert float(agreement.diameter_linf(values, jnp.array([False, True, False]))) == 0.0
    assert float(agreement.diameter_linf(values, jnp.zeros(3, bool))) == 0.0
    lo, hi = jnp.array([0.0, 1.0]), jnp.array([2.0, 5.0])
    assert bool(jax.jit(agreement.inside_box)(values[:2], lo, hi))
    assert not bool(agreement.inside_box(values, lo, hi))
    assert bool(agreement.inside_box(values, lo, hi, mask=jnp.array([True, True, False])))
    assert bool(agreement.inside_box(values[:2] + 1e-3, lo, hi, atol=1e-2))
    assert agreement.rounds_needed(8.0, 1.0).tolist() == 3
    assert agreement.rounds_needed(9.0, 1.0).tolist() == 4
    assert agreement.rounds_needed(0.5, 1.0).tolist() == 0


@pytest.mark.parametrize(
    "held, processes, clusters",
    [
        ([True, False, False], False, False),  # 5 of 12 processes, 1 of 3 clusters
        ([True, False, True], True, True),  # 8 of 12, 2 of 3
        ([False, True, True], True, True),  # 7 of 12
        ([True, True, True], True, True),
        ([False, False, False], False, False),
    ],
)
def test_has_quorum(held, processes, clusters):
    sizes = jnp.array(SIZES)
    quorum = jax.jit(agreement.has_quorum, static_argnames="rule")
    assert bool(quorum(jnp.array(held), sizes, rule="processes")) == processes
    assert bool(quorum(jnp.array(held), sizes, rule="clusters")) == clusters


def test_quorum_rules_differ_and_majority_is_strict():
    sizes = jnp.array([1, 1, 10])
    held = jnp.array([True, True, False])
    assert bool(agreement.has_quorum(held, sizes, "clusters"))  # 2 of 3 clusters
    assert not bool(agreement.has_quorum(held, sizes, "processes"))  # 2 of 12 processes
    half = jnp.array([True, False])
    assert not bool(agreement.has_quorum(half, jnp.array([3, 3]), "processes"))  # 3 is not > 3
    with pytest.raises(ValueError, match="unknown quorum rule"):
        agreement.has_quorum(held, sizes, "majority")
    with pytest.raises(ValueError, match="shape"):
        agreement.has_quorum(held, jnp.array([1, 2]))


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["processes", "clusters"]),
    st.sampled_from(["none", "cluster2", "one_process_left_in_two_clusters"]),
)
def test_maa_rounds_halve_the_diameter_and_stay_in_the_box(seed, rule, crash):
    rng = np.random.default_rng(seed)
    alive = np.ones(N, bool)
    if crash == "cluster2":
        alive[CLUSTER_OF == 2] = False
    elif crash == "one_process_left_in_two_clusters":
        alive[1:5] = False
        alive[6:9] = False
    values = rng.uniform(-50, 50, size=(N, 3)).astype(np.float32)
    lo, hi = agreement.box(values, alive)
    diameter = float(agreement.diameter_linf(values, alive))
    for _ in range(6):
        values, decided = agreement.simulate_maa_round(values, CLUSTER_OF, alive, rng, rule)
        assert decided.tolist() == alive.tolist()  # a quorum is alive: nobody waits
        new_diameter = float(agreement.diameter_linf(values, alive))
        assert new_diameter <= diameter / 2 * (1 + 1e-6) + 1e-6
        assert bool(agreement.inside_box(values, lo, hi, mask=alive))
        diameter = new_diameter
    assert diameter <= 100 / 2**6


@pytest.mark.parametrize("rule", ["processes", "clusters"])
def test_maa_waits_without_a_quorum(rule):
    rng = np.random.default_rng(0)
    alive = CLUSTER_OF == 1  # only the 4-process cluster: 4 of 12 processes, 1 of 3 clusters
    values = rng.normal(size=(N, 2)).astype(np.float32)
    out, decided = agreement.simulate_maa_round(values, CLUSTER_OF, alive, rng, rule)
    assert not decided.any()
    np.testing.assert_array_equal(out, values)


def test_maa_quorum_rule_decides_liveness():
    # Two singleton clusters alive out of sizes [1, 1, 10]: a majority of clusters, a
    # minority of processes.
    cluster_of = np.array([0, 1] + [2] * 10)
    alive = cluster_of < 2
    values = np.random.default_rng(1).normal(size=(12, 2)).astype(np.float32)
    rng = np.random.default_rng(2)
    _, decided = agreement.simulate_maa_round(values, cluster_of, alive, rng, "clusters")
    assert decided.tolist() == alive.tolist()
    _, decided = agreement.simulate_maa_round(values, cluster_of, alive, rng, "processes")
    assert not decided.any()
