"""Asynchrony specs: each distribution's draws, per-node and per-edge scales, and bad specs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src import asynchrony, simulator

DRAWS = 10_000
KINDS = ("fixed", "exponential", "abs_normal", "poisson", "uniform")


def _draws(kind, scale, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    sample = jax.jit(jax.vmap(functools.partial(asynchrony.sample, kind), (0, None)))
    out = np.asarray(sample(keys, jnp.float32(scale)))
    assert out.dtype == np.float32 and out.shape == (DRAWS,)
    return out.astype(np.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_empirical_mean_matches_the_distribution_mean(kind, scale):
    x = _draws(kind, scale, seed=int(10 * scale))
    mean = ja.Distribution(kind, scale).mean(1)[0]
    se = x.std() / np.sqrt(DRAWS)
    assert abs(x.mean() - mean) <= 4 * se + 1e-6, (x.mean(), mean, se)
    if kind != "fixed":
        assert se > 0  # not vacuous: the draws vary


def test_supports():
    s = 2.5
    np.testing.assert_array_equal(_draws("fixed", s), s)
    e = _draws("exponential", s)
    assert np.all(e >= 0)
    u = _draws("uniform", s)
    assert np.all(u >= 1) and np.all(u <= s + 1)
    assert np.all(_draws("abs_normal", s) >= 1)
    p = _draws("poisson", s)
    assert np.all(p >= 0) and np.array_equal(p, np.round(p)) and len(np.unique(p)) > 3
    # A zero scale is a point mass for every kind (abs_normal and uniform at 1).
    for kind, at in (("fixed", 0), ("exponential", 0), ("abs_normal", 1), ("poisson", 0), ("uniform", 1)):
        np.testing.assert_array_equal(_draws(kind, 0.0)[:100], at, err_msg=kind)


def test_per_node_and_per_edge_scales():
    n = 3
    d = ja.exponential([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(d.scales(n), [1, 2, 3])
    # A per-node delay scale is the sender's: rows of the per-edge matrix.
    np.testing.assert_array_equal(d.edge_scales(n), [[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    np.testing.assert_array_equal(ja.fixed(0.5).edge_scales(n), np.full((n, n), 0.5))
    m = np.arange(9.0).reshape(3, 3)
    e = ja.uniform(m)
    assert e.per_edge and not d.per_edge
    np.testing.assert_array_equal(e.edge_scales(n), m)
    np.testing.assert_allclose(e.mean(n), m / 2 + 1)
    assert e.edge_scales(n).dtype == np.float32
    with pytest.raises(ValueError, match="per-edge scales"):
        e.scales(n)
    # A nested sequence is a fixed delay per edge; the simulator's params index it [src, dst].
    spec = ja.Asynchrony(delay=m.tolist(), stragglers={2: 4.0}, crashes={0: 5.0})
    assert spec.delay.kind == "fixed" and spec.delay.per_edge
    params = simulator.make_params(spec, n)
    np.testing.assert_array_equal(params["delay_scales"], m)
    np.testing.assert_array_equal(params["stragglers"], [1, 1, 4])
    np.testing.assert_array_equal(params["crash_times"], [5, np.inf, np.inf])
    # Delay scales are always [n, n] arrays: scalar, per-node and per-edge specs share a compile.
    for delay in (0.5, [0.1, 0.2, 0.3], m):
        assert simulator.make_params(ja.Asynchrony(delay=delay), n)["delay_scales"].shape == (n, n)


def test_per_node_compute_scales_reach_their_nodes():
    """Exponential job times of mean [0.5, 1, 2, 4]: each node's share of the jobs is its rate's."""
    means = np.array([0.5, 1.0, 2.0, 4.0])
    shards = [{"x": np.zeros((4, 1), np.float32)}] * 4
    problem = ja.Problem(lambda p, b: jnp.mean((b["x"] - p) ** 2), jnp.zeros(1), shards, batch_size=2)
    spec = ja.Asynchrony(compute_time=ja.exponential(means))
    np.testing.assert_allclose(spec.compute_time.mean(4), means)
    steps = 3000
    tr = ja.simulate(ja.algorithms.sgd(learning_rate=0.1), problem, spec, steps=steps, record_every=steps)
    got = tr["node_steps"][-1]
    share = (1 / means) / np.sum(1 / means)
    # Each count is within 5 standard deviations (binomial over the jobs) of its expectation.
    assert np.all(np.abs(got - steps * share) < 5 * np.sqrt(steps * share * (1 - share))), got


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ja.fixed(-1.0), "non-negative"),
        (lambda: ja.exponential([1.0, np.nan]), "finite"),
        (lambda: ja.uniform(np.inf), "finite"),
        (lambda: ja.fixed([[0.0, -1.0], [0.0, 0.0]]), "non-negative"),
        (lambda: ja.fixed(np.ones((2, 3))), r"shape \(2, 3\)"),
        (lambda: ja.fixed(np.ones((2, 2, 2))), r"shape \(2, 2, 2\)"),
        (lambda: ja.fixed([[1.0, 2.0], [3.0]]), "square matrix of numbers"),
        (lambda: ja.Asynchrony(delay="slow"), "square matrix of numbers"),
        (lambda: ja.Distribution("gamma", 1.0), "unknown distribution"),
        (lambda: ja.Asynchrony(compute_time=ja.fixed(np.ones((2, 2)))), "compute_time: scales are per node"),
        (lambda: ja.Asynchrony(loss=1.0), "loss"),
        (lambda: ja.Asynchrony(loss=-0.1), "loss"),
        (lambda: ja.Asynchrony(crashes={-1: 3.0}), "crashes: node ids"),
        (lambda: ja.Asynchrony(crashes={1.0: 3.0}), "crashes: node ids"),
        (lambda: ja.Asynchrony(crashes={True: 1.0}), "crashes: node ids"),
        (lambda: ja.Asynchrony(stragglers={False: 2.0}), "stragglers: node ids"),
        (lambda: ja.Asynchrony(stragglers={np.bool_(True): 2.0}), "stragglers: node ids"),
        (lambda: ja.Asynchrony(crashes={0: -1.0}), "invalid value"),
        (lambda: ja.Asynchrony(stragglers={0: 0.0}), "must be positive"),
    ],
)
def test_bad_specs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_check_nodes():
    ja.Asynchrony(delay=ja.fixed(np.zeros((4, 4))), crashes={3: 1.0}).check_nodes(4)
    ja.Asynchrony(crashes={np.int64(3): 1.0}).check_nodes(4)  # numpy integers are node ids
    for spec, match in (
        (ja.Asynchrony(delay=ja.fixed(np.zeros((3, 3)))), r"per-edge scales of shape \(3, 3\) given for 4"),
        (ja.Asynchrony(delay=ja.fixed([1.0, 2.0])), "2 scales given for 4 nodes"),
        (ja.Asynchrony(compute_time=ja.exponential([1.0] * 5)), "5 scales given for 4 nodes"),
        (ja.Asynchrony(stragglers={4: 2.0}), r"stragglers: unknown node id\(s\) \[4\]"),
        (ja.Asynchrony(crashes={9: 2.0}), r"crashes: unknown node id\(s\) \[9\]"),
    ):
        with pytest.raises(ValueError, match=match):
            spec.check_nodes(4)
    with pytest.raises(TypeError, match="expected a Distribution or a number"):
        ja.Asynchrony(delay=None)
