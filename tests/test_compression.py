# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Tests for jaxasync._src.compression: top-k, rand-k, sparse form, error feedback."""

import functools

import hypothesis
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from jaxasync._src import compression

D = 64
KS = (1, 5, 64)  # With D = 64 "auto" is lax.top_k; radix selection is checked against it below.
SETTINGS = hypothesis.settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)

# Compilation dominates the run time: every helper is jitted once per static (k, algorithm) and
# hypothesis only changes values, never shapes.


@functools.partial(jax.jit, static_argnums=(2, 3))
def _select(x, key, k, algorithm="auto"):
    """(top_k(x, k), rand_k(x, k, key)) in one compilation."""
    return (compression.top_k(x, k, algorithm=algorithm), compression.rand_k(x, k, key, algorithm=algorithm))


@functools.partial(jax.jit, static_argnums=(2,))
def _select_both_ways(x, key, k):
    return (_select(x, key, k, "top_k"), _select(x, key, k, "radix"))


def _top_k(x, k, algorithm="auto"):
    return _select(x, jax.random.PRNGKey(0), k, algorithm)[0]


def _rand_k(x, k, key, algorithm="auto"):
    return _select(x, key, k, algorithm)[1]


def _vectors(d=D, allow_zero=True):
    elems = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_subnormal=False)
    if not allow_zero:
        elems = elems.filter(lambda v: v != 0.0)
    return st.lists(elems, min_size=d, max_size=d).map(lambda v: np.asarray(v, np.float32))


# ------------------------------------------------------------------------------------------------
# k_from_density


@pytest.mark.parametrize(
    "d,density,k",
    [
        (10, 0.7, 7),
        (10, 0.1, 1),
        (1000, 0.01, 10),
        (5, 1e-9, 1),
        (3, 1.0, 3),
        (7, 0.5, 4),
        (2**20, 0.001, 1049),
        (1, 0.3, 1),
    ],
)
def test_k_from_density(d, density, k):
    assert compression.k_from_density(d, density) == k


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_k_from_density_rejects_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match="density"):
        compression.k_from_density(10, density)


@pytest.mark.parametrize("density", ["0.1", None, True])
def test_k_from_density_rejects_non_numbers(density):
    with pytest.raises(TypeError, match="density"):
        compression.k_from_density(10, density)


# ------------------------------------------------------------------------------------------------
# top_k


@SETTINGS
@hypothesis.given(x=_vectors(), k=st.sampled_from(KS))
def test_top_k_keeps_the_k_largest_magnitudes(x, k):
    dense, sparse = _top_k(jnp.asarray(x), k)
    idx = np.asarray(sparse.indices)
    assert idx.dtype == np.int32 and idx.shape == (k,)
    assert np.all(np.diff(idx) > 0), "indices must be distinct and ascending"
    np.testing.assert_array_equal(np.asarray(sparse.values), x[idx])
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(compression.to_dense(sparse, D)))
    unselected = np.setdiff1d(np.arange(D), idx)
    if unselected.size:
        assert np.abs(x[idx]).min() >= np.abs(x[unselected]).max()
    # Ties go to the lower index: same set as a stable sort on -|x|.
    ref = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    np.testing.assert_array_equal(idx, ref)


@SETTINGS
@hypothesis.given(x=_vectors(allow_zero=False), k=st.sampled_from(KS))
def test_top_k_has_exactly_k_nonzeros(x, k):
    dense, _ = _top_k(jnp.asarray(x), k)
    assert int(np.count_nonzero(np.asarray(dense))) == k


@SETTINGS
@hypothesis.given(
    x=st.lists(st.integers(-2, 2), min_size=D, max_size=D),
    k=st.sampled_from([5, 63]),
    seed=st.integers(0, 2**31 - 1),
)
def test_selection_algorithms_agree_bitwise_with_ties(x, k, seed):
    x = jnp.asarray(np.asarray(x, np.float32))
    key = jax.random.PRNGKey(seed)
    a, b = _select_both_ways(x, key, k)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_top_k_algorithms_agree_on_a_large_vector():
    x = jax.random.normal(jax.random.PRNGKey(0), (2**16,))
    k = 2**16 // 10
    a = jax.jit(lambda v: compression.top_k(v, k, algorithm="top_k")[1])(x)
    b = jax.jit(lambda v: compression.top_k(v, k)[1])(x)  # "auto" picks radix here
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_top_k_keeps_shape_and_dtype(dtype):
    x = jnp.asarray([[0.5, -3.0, 1.0], [2.0, 0.25, -0.125]], dtype)
    dense, sparse = jax.jit(lambda v: compression.top_k(v, 2))(x)
    assert dense.shape == x.shape and dense.dtype == dtype and sparse.values.dtype == dtype
    np.testing.assert_array_equal(np.asarray(sparse.indices), [1, 3])
    np.testing.assert_array_equal(np.asarray(dense, np.float32), [[0.0, -3.0, 0.0], [2.0, 0.0, 0.0]])


@pytest.mark.parametrize("k", [0, D + 1])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        compression.top_k(jnp.ones(D), k)


def test_unknown_algorithm_raises():
    with pytest.raises(ValueError, match="algorithm"):
        compression.top_k(jnp.ones(D), 3, algorithm="heap")


# ------------------------------------------------------------------------------------------------
# rand_k


@SETTINGS
@hypothesis.given(x=_vectors(allow_zero=False), k=st.sampled_from(KS), seed=st.integers(0, 2**31 - 1))
def test_rand_k_picks_k_distinct_indices_deterministically(x, k, seed):
    key = jax.random.PRNGKey(seed)
    dense, sparse = _rand_k(jnp.asarray(x), k, key)
    idx = np.asarray(sparse.indices)
    assert idx.shape == (k,) and np.all(np.diff(idx) > 0)
    assert int(np.count_nonzero(np.asarray(dense))) == k
    np.testing.assert_array_equal(np.asarray(sparse.values), x[idx])
    again = _rand_k(jnp.asarray(x) * 2, k, key)  # the subset depends on the key only
    np.testing.assert_array_equal(np.asarray(again[1].indices), idx)


def test_rand_k_depends_on_the_key():
    x = jnp.arange(1.0, D + 1.0)
    picks = {tuple(np.asarray(_rand_k(x, 5, jax.random.PRNGKey(s))[1].indices)) for s in range(10)}
    assert len(picks) == 10


def test_rand_k_is_uniform():
    # Each coordinate is picked with probability k / d; 4000 draws, loose 6-sigma band.
    k, n = 5, 4000
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    idx = jax.vmap(lambda key: _rand_k(jnp.ones(D), k, key)[1].indices)(keys)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=D)
    p = k / D
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 6 * sigma), counts


def test_rand_k_scale():
    x = jnp.arange(1.0, D + 1.0)
    dense, sparse = jax.jit(lambda v, key: compression.rand_k(v, 16, key, scale=True))(
        x, jax.random.PRNGKey(3)
    )
    np.testing.assert_allclose(np.asarray(sparse.values), np.asarray(x)[sparse.indices] * D / 16)
    np.testing.assert_array_equal(np.asarray(dense)[sparse.indices], np.asarray(sparse.values))


# ------------------------------------------------------------------------------------------------
# sparse form


def test_to_dense_and_add_sparse_sum_repeated_indices():
    sp = compression.SparseUpdate(jnp.asarray([0, 2, 2], jnp.int32), jnp.asarray([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(compression.to_dense(sp, 4)), [1.0, 0.0, 5.0, 0.0])
    np.testing.assert_array_equal(np.asarray(compression.add_sparse(jnp.ones(4), sp)), [2.0, 1.0, 6.0, 1.0])


def _tree():
    return {
        "w": jnp.asarray([[1.0, -4.0, 0.5], [2.0, -0.25, 3.5]], jnp.float32),
        "b": jnp.asarray([3.0, -0.125], jnp.float32),
        "s": jnp.asarray(0.75, jnp.float32),
    }


def test_compress_tree_global_matches_top_k_on_the_ravelled_tree():
    tree = _tree()
    flat, _ = jax.flatten_util.ravel_pytree(tree)
    dense, sparse = jax.jit(lambda t: compression.compress_tree(t, 0.3))(tree)
    k = compression.k_from_density(flat.size, 0.3)
    ref_dense, ref_sparse = jax.jit(lambda v: compression.top_k(v, k))(flat)
    np.testing.assert_array_equal(np.asarray(sparse.indices), np.asarray(ref_sparse.indices))
    np.testing.assert_array_equal(np.asarray(jax.flatten_util.ravel_pytree(dense)[0]), np.asarray(ref_dense))
    back = compression.sparse_to_tree(sparse, tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dense), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compress_tree_per_leaf_keeps_k_per_leaf():
    tree = _tree()
    dense, sparse = jax.jit(lambda t: compression.compress_tree(t, 0.3, per_leaf=True))(tree)
    for leaf, out, sp in zip(
        jax.tree.leaves(tree),
        jax.tree.leaves(dense),
        jax.tree.leaves(sparse, is_leaf=lambda s: isinstance(s, compression.SparseUpdate)),
        strict=True,
    ):
        k = compression.k_from_density(leaf.size, 0.3)
        assert sp.indices.shape == (k,)
        assert int(np.count_nonzero(np.asarray(out))) == k
        np.testing.assert_array_equal(np.asarray(out), np.asarray(compression.top_k(leaf, k)[0]))
    # The per-leaf form made global addresses the ravelled tree.
    flat_sparse = compression.flatten_sparse(sparse, tree)
    flat_dense, _ = jax.flatten_util.ravel_pytree(dense)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(compression.to_dense, static_argnums=1)(flat_sparse, flat_dense.size)),
        np.asarray(flat_dense),
    )
    assert np.all(np.diff(np.asarray(flat_sparse.indices)) > 0)
    back = compression.sparse_to_tree(sparse, tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dense), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compress_tree_randk_per_leaf_and_bad_arguments():
    tree = _tree()
    dense, _ = jax.jit(
        lambda t: compression.compress_tree(t, 0.5, method="randk", key=jax.random.PRNGKey(0), per_leaf=True)
    )(tree)
    assert jax.tree.structure(dense) == jax.tree.structure(tree)
    with pytest.raises(ValueError, match="method"):
        compression.compress_tree(tree, 0.5, method="signsgd")
    with pytest.raises(ValueError, match="key"):
        compression.compress_tree(tree, 0.5, method="randk")
    with pytest.raises(ValueError, match="density"):
        compression.compress_tree(tree, 0.0)


# ------------------------------------------------------------------------------------------------
# error feedback


@functools.partial(jax.jit, static_argnums=(2,))
def _ef_topk(residual, update, k):
    return compression.ef_compress(residual, update, lambda a: compression.top_k(a, k), has_aux=True)


@SETTINGS
@hypothesis.given(e=_vectors(), u=_vectors(), k=st.sampled_from(KS))
def test_ef_compress_invariant_is_exact(e, u, k):
    sent, new_e, sparse = _ef_topk(jnp.asarray(e), jnp.asarray(u), k)
    a = np.asarray(jnp.asarray(e) + jnp.asarray(u))
    np.testing.assert_array_equal(np.asarray(sent) + np.asarray(new_e), a)
    np.testing.assert_array_equal(np.asarray(compression.to_dense(sparse, D)), np.asarray(sent))


@SETTINGS
@hypothesis.given(
    steps=st.lists(st.lists(st.integers(-(2**12), 2**12), min_size=D, max_size=D), min_size=1, max_size=25),
    k=st.sampled_from(KS),
)
def test_ef_conserves_the_sum_of_inputs_exactly_over_many_steps(steps, k):
    # Dyadic inputs (integers / 16): every partial sum is exact in float32, so the conservation law
    # residual_T + sum_t sent_t == sum_t u_t holds bitwise whatever the summation order.
    inputs = np.asarray(steps, np.float32) / 16
    e = jnp.zeros(D)
    total_sent = np.zeros(D, np.float32)
    for u in inputs:
        sent, e, _ = _ef_topk(e, jnp.asarray(u), k)
        total_sent += np.asarray(sent)
    np.testing.assert_array_equal(total_sent + np.asarray(e), inputs.sum(0))


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from(KS))
def test_ef_conserves_the_sum_of_random_inputs(seed, k):
    inputs = np.random.default_rng(seed).normal(size=(50, D)).astype(np.float32)
    e = jnp.zeros(D)
    total_sent = np.zeros(D, np.float64)
    for u in inputs:
        sent, e, _ = _ef_topk(e, jnp.asarray(u), k)
        total_sent += np.asarray(sent, np.float64)
    # Only float32 rounding of the running residual sums remains: a few ulps of the partial sums.
    tol = 50 * np.finfo(np.float32).eps * np.abs(inputs).sum(0)
    np.testing.assert_array_less(
        np.abs(total_sent + np.asarray(e) - inputs.astype(np.float64).sum(0)), tol + 1e-30
    )


def test_ef_compress_keeps_rounding_error_in_a_wider_residual():
    # float32 residual, bfloat16 sent: sent + residual == residual + update exactly, in float32.
    e = jnp.zeros(D, jnp.float32)
    u = jax.random.normal(jax.random.PRNGKey(0), (D,))

    def compressor(a):
        dense, sp = compression.top_k(a, 16)
        return dense.astype(jnp.bfloat16), sp

    sent, new_e, _ = jax.jit(lambda e, u: compression.ef_compress(e, u, compressor, has_aux=True))(e, u)
    assert sent.dtype == jnp.bfloat16 and new_e.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sent.astype(jnp.float32) + new_e), np.asarray(u))
    assert float(jnp.abs(new_e[compression.top_k(u, 16)[1].indices]).max()) > 0  # rounding kept


def test_ef_compress_on_pytrees_without_aux():
    tree = _tree()
    zeros = jax.tree.map(jnp.zeros_like, tree)
    sent, e = jax.jit(
        lambda z, t: compression.ef_compress(z, t, lambda a: compression.compress_tree(a, 0.3)[0])
    )(zeros, tree)
    for s, r, t in zip(jax.tree.leaves(sent), jax.tree.leaves(e), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(s + r), np.asarray(t))
