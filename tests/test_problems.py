# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Tests for jaxasync.problems (builders in `_src/problems.py`, data in `_src/datasets.py`)."""

import doctest
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxasync
from jaxasync import problems
from jaxasync._src import datasets as datasets_lib
from jaxasync._src import problems as problems_lib


def _rows(shards):
    """Row ids carried in column 0 of ``x`` (see `_indexed`), concatenated over shards."""
    return np.concatenate([np.asarray(s["x"])[:, 0] for s in shards]).astype(np.int64)


def _indexed(num_rows, num_classes, seed=0):
    """Features whose first column is the row id, so splits can be checked row by row."""
    y = np.random.default_rng(seed).permutation(np.arange(num_rows) % num_classes).astype(np.int32)
    x = np.stack([np.arange(num_rows), np.zeros(num_rows)], axis=1).astype(np.float32)
    return x, y


# ----------------------------------------------------------------------------------------
# Least squares.


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_least_squares_optimum_is_the_minimiser(l2):
    p = problems.least_squares(6, 10, 30, heterogeneity=2.0, noise=0.5, l2=l2, seed=3)
    x_star = p.optimum
    assert float(p.grad_norm(x_star)) < 1e-4 * max(1.0, float(p.grad_norm(p.init_params)))
    f_star = float(p.loss(x_star))
    assert p.f_star == pytest.approx(f_star)
    v = np.random.default_rng(0).standard_normal((20, 10)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for eps in (1e-2, 1e-1):
        assert np.all(np.asarray(jax.vmap(p.loss)(x_star + eps * v)) >= f_star)
    # It is also the minimiser of the pooled normal equations when shards are equal.
    a = np.concatenate([np.asarray(s["x"], np.float64) for s in p.shards])
    b = np.concatenate([np.asarray(s["y"], np.float64) for s in p.shards])
    ref = np.linalg.solve(a.T @ a / len(b) + l2 * np.eye(10), a.T @ b / len(b))
    np.testing.assert_allclose(x_star, ref, rtol=1e-4, atol=1e-5)


def test_least_squares_optimum_unequal_shards_weighs_nodes_equally():
    rng = np.random.default_rng(1)
    shards = [
        {"x": rng.standard_normal((m, 4)).astype(np.float32), "y": rng.standard_normal(m).astype(np.float32)}
        for m in (5, 40)
    ]
    x_star = problems.least_squares_optimum(shards)
    grad = jax.grad(lambda x: sum(problems.least_squares_loss(x, s) for s in shards))(jnp.asarray(x_star))
    assert float(jnp.linalg.norm(grad)) < 1e-4


def test_least_squares_heterogeneity_zero_gives_equal_node_optima():
    same = problems.least_squares(5, 8, 40, heterogeneity=0.0, noise=0.0, seed=2)
    optima = np.stack([problems.least_squares_optimum([s]) for s in same.shards])
    np.testing.assert_allclose(optima, np.broadcast_to(optima[0], optima.shape), atol=1e-4)
    np.testing.assert_allclose(same.optimum, optima[0], atol=1e-4)
    assert same.f_star == pytest.approx(0.0, abs=1e-8)
    # Same seed, h > 0: identical rows, spread-out node optima.
    spread = problems.least_squares(5, 8, 40, heterogeneity=1.0, noise=0.0, seed=2)
    np.testing.assert_array_equal(same.shards[3]["x"], spread.shards[3]["x"])
    spread_optima = np.stack([problems.least_squares_optimum([s]) for s in spread.shards])
    assert np.std(spread_optima, axis=0).mean() > 0.3


def test_least_squares_shapes_dtypes_and_sampling():
    p = problems.least_squares(4, 7, 12, batch_size=3)
    assert isinstance(p, jaxasync.Problem)
    assert p.num_nodes == 4 and p.sizes.tolist() == [12] * 4 and p.name == "least_squares"
    assert p.init_params.shape == (7,) and p.init_params.dtype == jnp.float32
    assert p.optimum.dtype == jnp.float32
    for s in p.shards:
        assert s["x"].shape == (12, 7) and s["x"].dtype == jnp.float32
        assert s["y"].shape == (12,) and s["y"].dtype == jnp.float32
    batch = jax.jit(p.sample)(jax.random.key(0), jnp.int32(2))
    assert batch["x"].shape == (3, 7)
    assert jax.jit(jax.grad(p.loss_fn))(p.init_params, batch).shape == (7,)


def test_least_squares_deterministic_in_seed():
    a, b, c = (problems.least_squares(3, 5, 9, seed=s) for s in (7, 7, 8))
    for sa, sb in zip(a.shards, b.shards):
        np.testing.assert_array_equal(sa["x"], sb["x"])
        np.testing.assert_array_equal(sa["y"], sb["y"])
    np.testing.assert_array_equal(a.optimum, b.optimum)
    assert not np.array_equal(a.shards[0]["x"], c.shards[0]["x"])


# ----------------------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize(
    "split",
    [
        lambda x, y, n: problems.split_iid(x, y, n, seed=4),
        lambda x, y, n: problems.split_contiguous(x, y, n),
        lambda x, y, n: problems.split_label_sorted(x, y, n),
        lambda x, y, n: problems.split_dirichlet(x, y, n, alpha=0.3, seed=4),
        lambda x, y, n: problems.split_dirichlet(x, y, n, alpha=100.0, seed=4),
    ],
    ids=["iid", "contiguous", "label_sorted", "dirichlet_0.3", "dirichlet_100"],
)
@pytest.mark.parametrize("num_nodes", [1, 3, 7])
def test_splits_partition_the_rows(split, num_nodes):
    x, y = _indexed(211, 5)
    shards = split(x, y, num_nodes)
    assert len(shards) == num_nodes
    rows = _rows(shards)
    np.testing.assert_array_equal(np.sort(rows), np.arange(211))  # every row exactly once
    for s in shards:
        assert len(s["y"]) >= 1
        np.testing.assert_array_equal(s["y"], y[s["x"][:, 0].astype(np.int64)])  # labels follow rows


def test_split_iid_and_contiguous_sizes():
    x, y = _indexed(10, 2)
    assert [len(s["y"]) for s in problems.split_iid(x, y, 3)] == [4, 3, 3]
    contiguous = problems.split_contiguous(x, y, 3)
    assert [_rows([s]).tolist() for s in contiguous] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    dropped = problems.split_contiguous(x, y, 3, drop_remainder=True)
    assert [_rows([s]).tolist() for s in dropped] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    a, b = problems.split_iid(x, y, 3, seed=1), problems.split_iid(x, y, 3, seed=1)
    assert all(np.array_equal(sa["x"], sb["x"]) for sa, sb in zip(a, b))


@pytest.mark.parametrize("num_nodes,max_labels", [(5, 2), (10, 1), (20, 1), (3, 5)])
def test_split_label_sorted_gives_each_node_few_labels(num_nodes, max_labels):
    x, y = _indexed(1000, 10)
    shards = problems.split_label_sorted(x, y, num_nodes)
    counts = [len(np.unique(s["y"])) for s in shards]
    assert max(counts) <= max_labels


def _label_skew(shards, num_classes):
    """Mean over nodes of the largest class fraction (1 = a single class, 1/C = uniform)."""
    return np.mean([np.bincount(s["y"], minlength=num_classes).max() / len(s["y"]) for s in shards])


def test_split_dirichlet_skew_follows_alpha():
    x, y = _indexed(5000, 10)
    skewed = problems.split_dirichlet(x, y, 10, alpha=0.05, seed=0)
    uniform = problems.split_dirichlet(x, y, 10, alpha=1000.0, seed=0)
    assert _label_skew(skewed, 10) > 0.6
    assert _label_skew(uniform, 10) < 0.15
    sizes = [len(s["y"]) for s in uniform]
    assert max(sizes) - min(sizes) < 100  # near-equal shards for large alpha
    big = problems.split_dirichlet(x, y, 10, alpha=0.05, seed=0, min_size=200)
    assert min(len(s["y"]) for s in big) >= 200


# ----------------------------------------------------------------------------------------
# Generators and w7a.


def test_gaussian_mixture_shapes_balance_and_determinism():
    x, y = problems.gaussian_mixture(1003, 40, 10, separation=3.0, seed=5)
    assert x.shape == (1003, 40) and x.dtype == np.float32 and y.dtype == np.int32
    assert np.bincount(y).tolist() == [101, 101, 101] + [100] * 7
    x2, y2 = problems.gaussian_mixture(1003, 40, 10, separation=3.0, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 3.0, atol=0.6)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_synthetic_fedprox_shapes_labels_and_heterogeneity(num_classes):
    shards = problems.synthetic_fedprox(6, 50, 30, alpha=1.0, beta=1.0, num_classes=num_classes, seed=1)
    assert len(shards) == 6
    for s in shards:
        assert s["x"].shape == (50, 30) and s["x"].dtype == np.float32
        if num_classes == 2:
            assert s["y"].dtype == np.float32 and set(np.unique(s["y"])) <= {-1.0, 1.0}
        else:
            assert s["y"].dtype == np.int32 and s["y"].min() >= 0 and s["y"].max() < 10
    again = problems.synthetic_fedprox(6, 50, 30, alpha=1.0, beta=1.0, num_classes=num_classes, seed=1)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(shards, again))

    def mean_spread(beta):
        s = problems.synthetic_fedprox(20, 200, 10, alpha=0.0, beta=beta, seed=2)
        return np.std([np.mean(t["x"]) for t in s])

    assert mean_spread(5.0) > 2 * mean_spread(0.0)  # beta moves the node feature means apart


def test_load_w7a():
    x, y = problems.load_w7a()
    assert x.shape == (25057, 300) and x.dtype == np.float32 and y.dtype == np.float32
    assert set(np.unique(y)) == {-1.0, 1.0} and int((y > 0).sum()) == 739
    assert set(np.unique(x)) == {0.0, 1.0} and int(x.sum()) == 291438
    assert x[0].nonzero()[0].tolist() == [58, 67, 114]  # "-1 59:1 68:1 115:1", 1-based
    assert not x[1].any()  # a row with no features
    x2, y2 = problems.load_w7a(rows=24600)
    np.testing.assert_array_equal(x2, x[:24600])
    np.testing.assert_array_equal(y2, y[:24600])
    x2[:] = 5.0  # callers get copies: the cache is untouched
    assert problems.load_w7a(rows=3)[0].max() == 1.0


def test_w7a_is_declared_package_data():
    # An editable install reads the source tree, where the file always exists; what puts it in the
    # wheel and the sdist is pyproject.toml: package discovery takes `jaxasync` and a package-data
    # glob (relative to the package, as setuptools globs it) matches the file the loader opens.
    import fnmatch
    import importlib.resources
    import pathlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    root = pathlib.Path(__file__).resolve().parents[1]
    setuptools_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatchcase("jaxasync", p) for p in setuptools_config["packages"]["find"]["include"])
    package = root / "jaxasync"
    data = package / "data" / "w7a.txt.gz"
    included = {f for p in setuptools_config["package-data"]["jaxasync"] for f in package.glob(p)}
    excluded = {
        f
        for p in setuptools_config.get("exclude-package-data", {}).get("jaxasync", [])
        for f in package.glob(p)
    }
    assert data in included - excluded
    loaded = importlib.resources.files("jaxasync") / "data" / "w7a.txt.gz"  # as `_w7a` opens it
    assert loaded.read_bytes() == data.read_bytes()


def test_asgrad_reproduction_uses_w7a():
    from jaxasync._src.reproduce import asgrad as asgrad_repro

    plan = asgrad_repro.plan(quick=False)
    w7a = [c for c in plan.configs if c[0] == "w7a"]
    assert [(dataset, split, rules) for dataset, split, rules, *_ in w7a] == [
        ("w7a", "contiguous", ("pure", "random", "shuffled"))
    ]
    assert all(c[0] == "synthetic" for c in asgrad_repro.plan(quick=True).configs)  # the smoke test
    p = asgrad_repro._problem(asgrad_repro.NUM_WORKERS, "w7a", "contiguous", plan.w7a_rows)
    assert p.name == "asgrad_w7a" and p.num_nodes == 10
    x, _ = problems.load_w7a(plan.w7a_rows)
    np.testing.assert_array_equal(np.concatenate([np.asarray(s["x"]) for s in p.shards]), x)


def test_load_libsvm(tmp_path):
    text = "+1 1:0.5 3:2\n\n-1 \n-1 2:1\n"
    plain = tmp_path / "d.txt"
    plain.write_text(text)
    packed = tmp_path / "d.txt.gz"
    with gzip.open(packed, "wt") as f:
        f.write(text)
    for path in (plain, packed):
        x, y = problems.load_libsvm(path)
        np.testing.assert_array_equal(x, [[0.5, 0, 2], [0, 0, 0], [0, 1, 0]])
        np.testing.assert_array_equal(y, [1, -1, -1])
    x, y = problems.load_libsvm(plain, num_features=5, rows=2)
    assert x.shape == (2, 5)
    with pytest.raises(ValueError, match="num_features"):
        problems.load_libsvm(plain, num_features=2)


# ----------------------------------------------------------------------------------------
# Logistic regression and AsGrad.


def test_nonconvex_regulariser_gradient_matches_formula():
    lam = 0.1
    x = jnp.linspace(-3.0, 3.0, 41)
    grad = jax.grad(lambda v: lam * problems.nonconvex_regularizer(v))(x)
    np.testing.assert_allclose(grad, 2 * lam * x / (1 + x**2) ** 2, rtol=1e-5, atol=1e-7)


def test_logistic_loss_gradient_matches_formula():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((20, 6)), jnp.float32), "y": jnp.sign(jnp.arange(20) - 9.5)}
    x = jnp.asarray(rng.standard_normal(6), jnp.float32)
    l2, lam = 0.3, 0.1
    grad = jax.grad(problems.logistic_loss)(x, batch, l2, lam)
    margins = batch["y"] * (batch["x"] @ x)
    expected = (
        -(batch["x"] * (batch["y"] * jax.nn.sigmoid(-margins))[:, None]).mean(0)
        + l2 * x
        + 2 * lam * x / (1 + x**2) ** 2
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    big = {"x": jnp.ones((1, 1)) * 1e4, "y": jnp.array([-1.0])}
    assert np.isfinite(float(problems.logistic_loss(jnp.ones(1), big)))  # no overflow


def test_asgrad_logistic_w7a_protocol():
    p = problems.asgrad_logistic(10)
    assert p.num_nodes == 10 and p.sizes.tolist() == [2460] * 10 and p.batch_size is None
    assert p.name == "asgrad_w7a"
    np.testing.assert_array_equal(p.init_params, np.ones(300, np.float32))
    x, y = problems.load_w7a(24600)
    for i in (0, 4, 9):  # worker i holds rows [2460 i, 2460 (i + 1))
        np.testing.assert_array_equal(p.shards[i]["x"], x[2460 * i : 2460 * (i + 1)])
        np.testing.assert_array_equal(p.shards[i]["y"], y[2460 * i : 2460 * (i + 1)])
    # f_0(1) = mean softplus(-y a^T 1) + 0.1 * 300 / 2.
    margins = y[:2460] * x[:2460].sum(1)
    expected = np.mean(np.logaddexp(0, -margins)) + 0.1 * 150
    assert float(p.node_loss(p.init_params, 0)) == pytest.approx(expected, rel=1e-5)
    fifty = problems.asgrad_logistic(50, batch_size=8)
    assert fifty.sizes.tolist() == [492] * 50


def test_asgrad_logistic_synthetic_and_splits():
    p = problems.asgrad_logistic(10, dataset="synthetic", alpha=1.0, beta=1.0, seed=3)
    assert p.name == "asgrad_synthetic" and p.sizes.tolist() == [100] * 10
    assert p.init_params.shape == (30,)
    raw = problems.synthetic_fedprox(10, 100, 30, alpha=1.0, beta=1.0, seed=3)
    np.testing.assert_array_equal(p.shards[7]["x"], raw[7]["x"])
    iid = problems.asgrad_logistic(10, dataset="synthetic", split="iid", seed=3)
    assert iid.sizes.tolist() == [100] * 10
    pooled = np.concatenate([np.asarray(s["x"]) for s in iid.shards])
    np.testing.assert_array_equal(
        np.sort(pooled, axis=0), np.sort(np.concatenate([r["x"] for r in raw]), axis=0)
    )
    sorted_ = problems.asgrad_logistic(4, rows=400, split="label_sorted")
    assert np.all(np.diff(np.concatenate([np.asarray(s["y"]) for s in sorted_.shards])) >= 0)


def test_logistic_regression_init_accuracy_and_label_check():
    x, y = problems.gaussian_mixture(200, 3, 2, separation=4.0, seed=0)
    shards = problems.split_iid(x, problems.binarize(y, 1), 2)
    p = problems.logistic_regression(shards, init=np.arange(3.0), batch_size=4)
    np.testing.assert_array_equal(p.init_params, [0.0, 1.0, 2.0])
    step = jax.jit(lambda w: w - 1.0 * jax.grad(p.loss)(w))
    w = jnp.zeros(3)
    for _ in range(30):
        w = step(w)
    assert float(problems.accuracy(w, p.shards[0])) > 0.9
    with pytest.raises(ValueError, match="labels must be -1 or \\+1"):
        problems.logistic_regression(problems.split_iid(x, y, 2))
    with pytest.raises(ValueError, match="init"):
        problems.logistic_regression(shards, init=np.ones(4))


# ----------------------------------------------------------------------------------------
# Softmax regression and MLP.


def test_softmax_regression_starts_at_log_c():
    x, y = problems.gaussian_mixture(300, 8, 5, seed=1)
    p = problems.softmax_regression(problems.split_iid(x, y, 3), 5)
    assert p.init_params["w0"].shape == (8, 5) and p.init_params["b0"].shape == (5,)
    assert float(p.loss(p.init_params)) == pytest.approx(np.log(5), rel=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_loss_decreases_under_full_batch_sgd(activation):
    x, y = problems.gaussian_mixture(400, 20, 10, separation=3.0, seed=0)
    p = problems.mlp_classifier(problems.split_iid(x, y, 4), (64, 32), 10, activation=activation, seed=1)
    params = p.init_params
    assert {k: v.shape for k, v in params.items()} == {
        "w0": (20, 64),
        "b0": (64,),
        "w1": (64, 32),
        "b1": (32,),
        "w2": (32, 10),
        "b2": (10,),
    }
    assert all(v.dtype == jnp.float32 for v in params.values())
    opt = optax.sgd(0.5)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(p.loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    losses = [float(p.loss(params))]
    for _ in range(10):
        params, state = step(params, state)
        losses.append(float(p.loss(params)))
    assert losses[-1] < 0.7 * losses[0]
    acc = np.mean([float(problems.accuracy(params, s, activation)) for s in p.shards])
    assert acc > 0.5
    # Same seed, same start; another seed, another start.
    again = problems.mlp_classifier(problems.split_iid(x, y, 4), (64, 32), 10, activation=activation, seed=1)
    np.testing.assert_array_equal(again.init_params["w1"], p.init_params["w1"])
    other = problems.mlp_classifier(problems.split_iid(x, y, 4), (64, 32), 10, activation=activation, seed=2)
    assert not np.array_equal(other.init_params["w1"], p.init_params["w1"])


def test_classifier_label_check():
    x, y = problems.gaussian_mixture(100, 4, 10, seed=0)
    with pytest.raises(ValueError, match="num_classes=5"):
        problems.softmax_regression(problems.split_iid(x, y, 2), 5)
    with pytest.raises(ValueError, match="integers"):
        problems.mlp_classifier(problems.split_iid(x, y.astype(np.float32), 2))


# ----------------------------------------------------------------------------------------
# Bad arguments.

_X, _Y = _indexed(20, 2)

BAD_CALLS = [
    (lambda: problems.least_squares(0, 3, 4), "num_nodes"),
    (lambda: problems.least_squares(2, -1, 4), "dim"),
    (lambda: problems.least_squares(2, 3, 0), "samples_per_node"),
    (lambda: problems.least_squares(2, 3, 4, heterogeneity=-1.0), "heterogeneity"),
    (lambda: problems.least_squares(2, 3, 4, noise=float("nan")), "noise"),
    (lambda: problems.least_squares(2, 3, 4, batch_size=0), "batch_size"),
    (lambda: problems.least_squares(2.5, 3, 4), "num_nodes"),
    (lambda: problems.split_iid(_X, _Y, 0), "num_nodes"),
    (lambda: problems.split_contiguous(_X, _Y, 21), "num_nodes"),
    (lambda: problems.split_label_sorted(_X, _Y[:5], 2), "same leading"),
    (lambda: problems.split_dirichlet(_X, _Y, 2, alpha=0.0), "alpha"),
    (lambda: problems.split_dirichlet(_X, _Y, 2, alpha=-1.0), "alpha"),
    (lambda: problems.split_dirichlet(_X, _Y, 4, alpha=1.0, min_size=6), "min_size"),
    (lambda: problems.gaussian_mixture(10, 2, 1), "num_classes"),
    (lambda: problems.gaussian_mixture(10, 2, 3, separation=-1), "separation"),
    (lambda: problems.synthetic_fedprox(0, 10), "num_nodes"),
    (lambda: problems.synthetic_fedprox(2, 10, alpha=-0.1), "alpha"),
    (lambda: problems.synthetic_fedprox(2, 10, beta=-0.1), "beta"),
    (lambda: problems.load_w7a(rows=0), "rows"),
    (lambda: problems.load_w7a(rows=30000), "rows"),
    (lambda: problems.asgrad_logistic(0), "num_workers"),
    (lambda: problems.asgrad_logistic(2, dataset="mnist"), "dataset"),
    (lambda: problems.asgrad_logistic(2, split="random"), "split"),
    (lambda: problems.asgrad_logistic(2, dataset="synthetic", alpha=-1), "alpha"),
    (lambda: problems.logistic_regression([]), "data"),
    (lambda: problems.logistic_regression([{"x": _X, "y": _Y * 2 - 1}], nonconvex=-0.1), "nonconvex"),
    (lambda: problems.logistic_regression([{"x": _X, "y": _Y * 2 - 1}], l2=-1.0), "l2"),
    (lambda: problems.mlp_classifier([{"x": _X, "y": _Y}], hidden=(8, 0)), "hidden"),
    (lambda: problems.mlp_classifier([{"x": _X, "y": _Y}], num_classes=0), "num_classes"),
    (lambda: problems.mlp_classifier([{"x": _X, "y": _Y}], activation="gelu"), "activation"),
    (lambda: problems.mlp_init((3,)), "sizes"),
]


@pytest.mark.parametrize("call,name", BAD_CALLS, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------------------
# Public surface and docstring examples.


def test_public_names_match_private_all():
    assert sorted(problems.__all__) == sorted(problems_lib.__all__ + datasets_lib.__all__)
    for name in problems.__all__:
        assert getattr(problems, name).__module__.startswith("jaxasync._src.")


@pytest.mark.parametrize("module", [datasets_lib, problems_lib], ids=["datasets", "problems"])
def test_docstring_examples(module):
    globs = {name: getattr(problems, name) for name in problems.__all__}
    globs.update(np=np, jnp=jnp)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted > 5
