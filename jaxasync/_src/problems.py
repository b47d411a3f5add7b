# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Ready-made problems: least squares, logistic regression (AsGrad's setting), softmax regression, MLPs.

Contract:

* Every builder returns a :class:`jaxasync.Problem` whose ``loss_fn(params, batch)`` is a pure
  ``jax.numpy`` function (jit-, grad- and vmap-able) of the parameters and a batch
  ``{"x": features, "y": labels}`` drawn from one node's shard; ``f = (1/n) sum_i f_i`` where ``f_i`` is
  the loss on node ``i``'s whole shard (a mean over its rows, so every node weighs the same).
* Data, parameters and losses are ``float32``; class labels are ``int32``; binary labels are ``float32``
  ±1. Generated problems are deterministic functions of their ``seed``.
* Where ``x*`` has a closed form (least squares, ridge) it is passed as ``optimum=`` so executors can
  report the optimality gap ``f(x) - f(x*)``.
* Data generators and node splits live in `jaxasync._src.datasets` and are re-exported with the
  builders from `jaxasync.problems`.
* Bad arguments raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import datasets
from jaxasync._src import problem as problem_lib

__all__ = [
    "accuracy",
    "asgrad_logistic",
    "cross_entropy_loss",
    "least_squares",
    "least_squares_loss",
    "least_squares_optimum",
    "logistic_loss",
    "logistic_regression",
    "mlp_apply",
    "mlp_classifier",
    "mlp_init",
    "nonconvex_regularizer",
    "softmax_regression",
]

PyTree = Any
Shards = Sequence[dict[str, Any]]

_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


# ----------------------------------------------------------------------------------------
# Validation helpers.


def _check_shards(data: Shards, what: str) -> list[dict[str, np.ndarray]]:
    """Shards as float32 ``x [m, d]`` and 1-D ``y``, with the same ``d`` everywhere."""
    if isinstance(data, dict) or not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError(f"{what}: data must be a non-empty list of per-node dicts {{'x', 'y'}}")
    out = []
    for i, s in enumerate(data):
        if not isinstance(s, dict) or set(s) != {"x", "y"}:
            raise ValueError(f"{what}: shard {i} must be a dict with keys 'x' and 'y'")
        x, y = np.asarray(s["x"]), np.asarray(s["y"])
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: shard {i} needs x [m, d] and y [m], got x {x.shape} and y {y.shape}")
        if x.shape[1] != np.shape(data[0]["x"])[1]:
            raise ValueError(
                f"{what}: shard {i} has {x.shape[1]} features, shard 0 has {np.shape(data[0]['x'])[1]}"
            )
        out.append({"x": x.astype(np.float32), "y": y})
    return out


def _check_pm1(shards: list[dict[str, np.ndarray]], what: str) -> None:
    for i, s in enumerate(shards):
        if not np.all(np.abs(s["y"]) == 1):
            raise ValueError(f"{what}: labels must be -1 or +1, shard {i} has {np.unique(s['y'])[:5]}")
        s["y"] = s["y"].astype(np.float32)


def _check_classes(shards: list[dict[str, np.ndarray]], num_classes: int, what: str) -> None:
    for i, s in enumerate(shards):
        y = s["y"]
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"{what}: labels must be integers in [0, num_classes={num_classes}), shard {i} has "
                f"dtype {y.dtype} and range [{y.min()}, {y.max()}]"
            )
        s["y"] = y.astype(np.int32)


def _check_batch_size(batch_size) -> int | None:
    return None if batch_size is None else datasets.check_positive_int("batch_size", batch_size)


# ----------------------------------------------------------------------------------------
# Least squares.


def least_squares_loss(params: jax.Array, batch: PyTree, l2: float = 0.0) -> jax.Array:
    r"""Half mean squared residual plus an optional ridge term.

    .. math::
        \ell(x; A, b) = \frac{1}{2m} \|A x - b\|^2 + \frac{\lambda_2}{2} \|x\|^2 .

    Args:
      params: ``x``, ``float32[d]``.
      batch: ``{"x": A [m, d], "y": b [m]}``.
      l2: ridge coefficient ``lambda_2 >= 0``.

    Returns:
      A scalar.
    """
    r = batch["x"] @ params - batch["y"]
    return 0.5 * jnp.mean(jnp.square(r)) + 0.5 * l2 * jnp.sum(jnp.square(params))


def least_squares_optimum(data: Shards, l2: float = 0.0) -> np.ndarray:
    r"""The minimiser of ``f = (1/n) sum_i f_i`` for least-squares shards, from the normal equations.

    .. math::
        \Big(\frac1n \sum_i \frac{A_i^\top A_i}{m_i} + \lambda_2 I\Big) x^\star
        = \frac1n \sum_i \frac{A_i^\top b_i}{m_i},

    solved in float64 (least-squares solve, so a singular system gives the minimum-norm minimiser).
    Pass a single shard to get that node's own minimiser.

    Args:
      data: per-node dicts ``{"x": A_i [m_i, d], "y": b_i [m_i]}``.
      l2: ridge coefficient ``>= 0``.

    Returns:
      ``x*`` as ``float32[d]``.

    Example:
      >>> a = np.eye(3, dtype=np.float32)
      >>> least_squares_optimum([{"x": a, "y": np.array([1.0, 2.0, 3.0])}]).tolist()
      [1.0, 2.0, 3.0]
    """
    shards = _check_shards(data, "least_squares_optimum")
    l2 = datasets.check_nonnegative("l2", l2)
    d = shards[0]["x"].shape[1]
    h = l2 * np.eye(d)
    g = np.zeros(d)
    for s in shards:
        a, b = s["x"].astype(np.float64), s["y"].astype(np.float64)
        h += a.T @ a / (a.shape[0] * len(shards))
        g += a.T @ b / (a.shape[0] * len(shards))
    return np.linalg.lstsq(h, g, rcond=None)[0].astype(np.float32)


def least_squares(
    num_nodes: int,
    dim: int,
    samples_per_node: int,
    *,
    heterogeneity: float = 1.0,
    noise: float = 0.1,
    mean_shift: float = 1.0,
    l2: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> problem_lib.Problem:
    r"""Heterogeneous least squares with planted per-node solutions and the exact global optimum.

    Node ``i`` holds ``A_i [m, d]`` and ``b_i [m]``:

    .. math::
        (A_i)_{r} \sim N(s, I_d), \quad s \sim N(0, \tfrac{\sigma_s^2}{d} I_d)\ \text{(shared by all
        nodes)}; \qquad
        x_i^\star = \bar x + h\, \delta_i, \quad \bar x, \delta_i \sim N(0, I_d); \qquad
        b_i = A_i x_i^\star + \epsilon_i, \ \epsilon_i \sim N(0, \sigma^2 I_m),

        f_i(x) = \frac{1}{2m} \|A_i x - b_i\|^2 + \frac{\lambda_2}{2}\|x\|^2, \qquad
        f = \frac1n \sum_i f_i,

    with ``h`` = ``heterogeneity``, ``sigma`` = ``noise``, ``sigma_s`` = ``mean_shift``. The shared shift
    gives the features a common non-zero mean, so the Hessian is ``~ I + s s^T`` (condition number about
    ``1 + sigma_s^2``). ``h = 0`` plants the same solution everywhere (identically distributed nodes: the
    homogeneous control); growing ``h`` spreads the node optima and the gradient dissimilarity
    ``zeta^2`` grows roughly like ``h^2``. The data ``A_i`` and draws ``delta_i`` do not depend on
    ``h``, so a sweep over ``h`` changes only the targets. ``x*`` of ``f`` (`least_squares_optimum`) is
    passed as ``optimum=``; the initial point is ``0``.

    Args:
      num_nodes: number of nodes ``n``.
      dim: dimension ``d``.
      samples_per_node: rows per node ``m``.
      heterogeneity: spread ``h >= 0`` of the planted node solutions around a common one.
      noise: standard deviation ``sigma >= 0`` of the label noise.
      mean_shift: scale ``sigma_s >= 0`` of the shared row mean (``E||s||^2 = sigma_s^2``).
      l2: ridge coefficient ``>= 0`` (``> 0`` makes ``f`` strongly convex even when ``n m < d``).
      batch_size: rows per stochastic gradient; None uses the whole shard.
      seed: random seed.

    Returns:
      A :class:`jaxasync.Problem` named ``"least_squares"`` with ``optimum`` set.

    Example:
      >>> p = least_squares(8, 20, 50, heterogeneity=1.0, batch_size=8)
      >>> p.num_nodes, p.init_params.shape, bool(p.grad_norm(p.optimum) < 1e-3)
      (8, (20,), True)

    References:
      Zhu, Tian, Huang, Xu, He, "R-FAST: Robust fully-asynchronous stochastic gradient tracking over
      general topology", IEEE Transactions on Signal and Information Processing over Networks, 2024.
    """
    n = datasets.check_positive_int("num_nodes", num_nodes)
    d = datasets.check_positive_int("dim", dim)
    m = datasets.check_positive_int("samples_per_node", samples_per_node)
    h = datasets.check_nonnegative("heterogeneity", heterogeneity)
    sigma = datasets.check_nonnegative("noise", noise)
    shift_scale = datasets.check_nonnegative("mean_shift", mean_shift)
    l2 = datasets.check_nonnegative("l2", l2)
    batch_size = _check_batch_size(batch_size)
    rng = np.random.default_rng(seed)
    shift = rng.normal(0.0, shift_scale / np.sqrt(d), d)
    x_bar = rng.standard_normal(d)
    shards = []
    for _ in range(n):
        a = rng.standard_normal((m, d)) + shift
        x_i = x_bar + h * rng.standard_normal(d)
        b = a @ x_i + sigma * rng.standard_normal(m)
        shards.append({"x": a.astype(np.float32), "y": b.astype(np.float32)})
    return problem_lib.Problem(
        functools.partial(least_squares_loss, l2=l2),
        jnp.zeros(d, jnp.float32),
        shards,
        batch_size=batch_size,
        optimum=least_squares_optimum(shards, l2),
        name="least_squares",
    )


# ----------------------------------------------------------------------------------------
# Binary logistic regression (AsGrad).


def nonconvex_regularizer(params: jax.Array) -> jax.Array:
    r"""AsGrad's non-convex regulariser ``sum_k x_k^2 / (1 + x_k^2)`` (without the factor lambda).

    Its gradient is ``2 x / (1 + x^2)^2`` coordinate-wise; it is bounded by ``d`` and its Hessian
    ``(2 - 6 x^2) / (1 + x^2)^3`` changes sign at ``|x| = 1/sqrt(3)``, so a logistic loss plus this
    term is smooth but not convex.

    Args:
      params: ``x``, any shape.

    Returns:
      A scalar.
    """
    sq = jnp.square(params)
    return jnp.sum(sq / (1.0 + sq))


def logistic_loss(params: jax.Array, batch: PyTree, l2: float = 0.0, nonconvex: float = 0.0) -> jax.Array:
    r"""Binary logistic loss with labels ±1 plus ridge and non-convex regularisers.

    .. math::
        \ell(x) = \frac1m \sum_j \log\big(1 + e^{-y_j a_j^\top x}\big)
        + \frac{\lambda_2}{2}\|x\|^2 + \lambda \sum_k \frac{x_k^2}{1 + x_k^2}.

    Computed as ``softplus(-y a^T x)``, which does not overflow for large margins.

    Args:
      params: ``x``, ``float32[d]``.
      batch: ``{"x": a [m, d], "y": y [m] in {-1, +1}}``.
      l2: ridge coefficient ``lambda_2 >= 0``.
      nonconvex: coefficient ``lambda >= 0`` of `nonconvex_regularizer`.

    Returns:
      A scalar.
    """
    margins = batch["y"] * (batch["x"] @ params)
    loss = jnp.mean(jax.nn.softplus(-margins))
    return loss + 0.5 * l2 * jnp.sum(jnp.square(params)) + nonconvex * nonconvex_regularizer(params)


def logistic_regression(
    data_shards: Shards,
    *,
    l2: float = 0.0,
    nonconvex: float = 0.0,
    batch_size: int | None = None,
    init: float | jax.Array = 0.0,
    name: str = "logistic_regression",
) -> problem_lib.Problem:
    r"""Binary logistic regression on given shards, optionally with AsGrad's non-convex regulariser.

    .. math::
        f_i(x) = \frac{1}{m_i} \sum_j \log\big(1 + e^{-y_j a_j^\top x}\big)
        + \frac{\lambda_2}{2}\|x\|^2 + \lambda \sum_k \frac{x_k^2}{1 + x_k^2}
        \qquad (y_j \in \{-1, +1\}),

    the loss of `logistic_loss`. With ``l2 > 0`` and ``nonconvex = 0`` it is strongly convex; AsGrad
    uses ``l2 = 0``, ``nonconvex = 0.1``. No closed-form optimum, so ``optimum`` is None.

    Args:
      data_shards: per-node dicts ``{"x": float [m_i, d], "y": ±1 [m_i]}`` (e.g. from a split
        function or `synthetic_fedprox`).
      l2: ridge coefficient ``>= 0``.
      nonconvex: non-convex regulariser coefficient ``lambda >= 0``.
      batch_size: rows per stochastic gradient; None uses the whole shard (needs equal shards).
      init: initial ``x``: a scalar filling ``[d]`` (AsGrad starts at all ones) or a ``[d]`` array.
      name: the problem's name.

    Returns:
      A :class:`jaxasync.Problem`.

    Example:
      >>> x, y = gaussian_mixture(400, 5, 2, seed=1)
      >>> p = logistic_regression(split_iid(x, binarize(y, 1), 4), nonconvex=0.1, batch_size=16)
      >>> p.num_nodes, round(float(p.loss(p.init_params)), 5)
      (4, 0.69315)

    References:
      Islamov, Safaryan, Alistarh, "AsGrad: A sharp unified analysis of asynchronous-SGD algorithms",
      AISTATS 2024.
    """
    shards = _check_shards(data_shards, "logistic_regression")
    _check_pm1(shards, "logistic_regression")
    l2 = datasets.check_nonnegative("l2", l2)
    nonconvex = datasets.check_nonnegative("nonconvex", nonconvex)
    batch_size = _check_batch_size(batch_size)
    d = shards[0]["x"].shape[1]
    x0 = np.asarray(init, np.float32)
    if x0.ndim == 0:
        x0 = np.full(d, x0, np.float32)
    if x0.shape != (d,):
        raise ValueError(f"init must be a scalar or have shape ({d},), got shape {x0.shape}")
    return problem_lib.Problem(
        functools.partial(logistic_loss, l2=l2, nonconvex=nonconvex),
        x0,
        shards,
        batch_size=batch_size,
        name=name,
    )


def asgrad_logistic(
    num_workers: int = 10,
    *,
    dataset: str = "w7a",
    rows: int = 24600,
    alpha: float = 1.0,
    beta: float = 1.0,
    samples_per_worker: int = 100,
    dim: int = 30,
    split: str = "contiguous",
    nonconvex: float = 0.1,
    batch_size: int | None = None,
    seed: int = 0,
) -> problem_lib.Problem:
    r"""The AsGrad experiment: logistic regression with a non-convex regulariser, heterogeneous workers.

    .. math::
        f_i(x) = \frac1m \sum_{j \in \text{worker } i} \log\big(1 + e^{-y_j a_j^\top x}\big)
        + \lambda \sum_k \frac{x_k^2}{1 + x_k^2}, \qquad \lambda = 0.1,\ x_0 = \mathbf 1 .

    * ``dataset="w7a"``: the bundled LIBSVM w7a, first ``rows`` rows (24 600), ``d = 300``; worker ``i``
      gets rows ``[i m, (i + 1) m)`` with ``m = rows // num_workers`` (the remainder is dropped), so
      10 workers hold 2 460 rows each. The file's row order makes the workers heterogeneous.
    * ``dataset="synthetic"``: FedProx ``synthetic(alpha, beta)`` with 2 classes mapped to ±1,
      ``samples_per_worker`` rows and ``dim`` features per worker (§5.6's reproduction:
      ``synthetic(1, 1)``, 100 rows, ``d = 30``, 10 workers); worker ``i`` holds its own generated data.

    ``split`` re-deals the same rows: ``"contiguous"`` (the protocol above), ``"iid"`` (shuffled with
    ``seed``: the homogeneous control) or ``"label_sorted"`` (sorted by label, then contiguous). Every
    worker holds the same number of rows, so full local gradients (``batch_size=None``, AsGrad's default)
    work.

    Args:
      num_workers: number of workers ``n``.
      dataset: ``"w7a"`` or ``"synthetic"``.
      rows: w7a rows used (``num_workers <= rows <= 25057``); ignored for synthetic data.
      alpha: synthetic model heterogeneity ``>= 0``; ignored for w7a.
      beta: synthetic feature heterogeneity ``>= 0``; ignored for w7a.
      samples_per_worker: synthetic rows per worker; ignored for w7a.
      dim: synthetic feature dimension; ignored for w7a.
      split: ``"contiguous"``, ``"iid"`` or ``"label_sorted"``.
      nonconvex: regulariser coefficient ``lambda >= 0``.
      batch_size: rows per stochastic gradient; None uses the worker's whole shard.
      seed: seed of the synthetic data and of the ``"iid"`` shuffle.

    Returns:
      A :class:`jaxasync.Problem` named ``"asgrad_w7a"`` or ``"asgrad_synthetic"``, starting at all ones.

    Example:
      >>> p = asgrad_logistic(10)
      >>> p.num_nodes, p.sizes.tolist()[:2], p.init_params.shape
      (10, [2460, 2460], (300,))

    References:
      Islamov, Safaryan, Alistarh, "AsGrad: A sharp unified analysis of asynchronous-SGD algorithms",
      AISTATS 2024, Section 6.
    """
    n = datasets.check_positive_int("num_workers", num_workers)
    if split not in ("contiguous", "iid", "label_sorted"):
        raise ValueError(f"split must be 'contiguous', 'iid' or 'label_sorted', got {split!r}")
    if dataset == "w7a":
        rows = datasets.check_positive_int("rows", rows)
        if not n <= rows <= datasets.W7A_ROWS:
            raise ValueError(f"rows must be in [num_workers, {datasets.W7A_ROWS}], got {rows}")
        x, y = datasets.load_w7a(rows)
        m = rows // n
        x, y = x[: m * n], y[: m * n]  # equal shards, as AsGrad's contiguous split
    elif dataset == "synthetic":
        per_worker = datasets.synthetic_fedprox(
            n, samples_per_worker, dim, alpha=alpha, beta=beta, num_classes=2, seed=seed
        )
        x = np.concatenate([s["x"] for s in per_worker])
        y = np.concatenate([s["y"] for s in per_worker])
    else:
        raise ValueError(f"dataset must be 'w7a' or 'synthetic', got {dataset!r}")
    if split == "contiguous":
        shards = datasets.split_contiguous(x, y, n)
    elif split == "iid":
        shards = datasets.split_iid(x, y, n, seed=seed)
    else:
        shards = datasets.split_label_sorted(x, y, n)
    return logistic_regression(
        shards, nonconvex=nonconvex, batch_size=batch_size, init=1.0, name=f"asgrad_{dataset}"
    )


# ----------------------------------------------------------------------------------------
# Multi-class classifiers: softmax regression and MLPs share one parameter layout.


def mlp_init(sizes: Sequence[int], *, activation: str = "relu", seed: int = 0) -> dict[str, jax.Array]:
    r"""Seeded initial parameters of an MLP with layer widths ``sizes = (d_in, h_1, ..., C)``.

    Layer ``l`` maps ``h_l -> h_{l+1}`` with weights ``w{l}`` ``[h_l, h_{l+1}]`` and bias ``b{l}``
    ``[h_{l+1}]``. Hidden weights are ``N(0, g / h_l)`` with ``g = 2`` for ReLU (He) and ``1`` for tanh
    (LeCun); the output layer uses ``g = 1``; biases start at zero.

    Args:
      sizes: at least two positive widths; ``(d, C)`` is softmax regression.
      activation: ``"relu"`` or ``"tanh"``.
      seed: NumPy seed.

    Returns:
      A dict ``{"w0", "b0", "w1", "b1", ...}`` of ``float32`` arrays.

    Example:
      >>> {k: v.shape for k, v in mlp_init((4, 8, 3)).items()}
      {'w0': (4, 8), 'b0': (8,), 'w1': (8, 3), 'b1': (3,)}
    """
    if isinstance(sizes, (int, np.integer)) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {sizes!r}")
    sizes = [datasets.check_positive_int("sizes", s) for s in sizes]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    rng = np.random.default_rng(seed)
    params = {}
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        gain = 2.0 if activation == "relu" and layer < len(sizes) - 2 else 1.0
        w = rng.normal(0.0, np.sqrt(gain / fan_in), (fan_in, fan_out))
        params[f"w{layer}"] = jnp.asarray(w, jnp.float32)
        params[f"b{layer}"] = jnp.zeros(fan_out, jnp.float32)
    return params


def mlp_apply(params: dict[str, jax.Array], x: jax.Array, activation: str = "relu") -> jax.Array:
    """Logits of the MLP (or softmax regression, with one layer) in `mlp_init`'s layout.

    Args:
      params: ``{"w0", "b0", ..., "w{L-1}", "b{L-1}"}``.
      x: inputs ``[..., d]``.
      activation: ``"relu"`` or ``"tanh"``, applied between layers (not after the last).

    Returns:
      Logits ``[..., C]``.
    """
    act = _ACTIVATIONS[activation]
    num_layers = len(params) // 2
    for layer in range(num_layers):
        x = x @ params[f"w{layer}"] + params[f"b{layer}"]
        if layer < num_layers - 1:
            x = act(x)
    return x


def cross_entropy_loss(
    params: dict[str, jax.Array], batch: PyTree, l2: float = 0.0, activation: str = "relu"
) -> jax.Array:
    r"""Mean softmax cross-entropy of `mlp_apply`'s logits plus ``l2/2`` times the squared weights.

    .. math::
        \ell(\theta) = -\frac1m \sum_j \log \mathrm{softmax}(z_\theta(a_j))_{y_j}
        + \frac{\lambda_2}{2} \sum_l \|W_l\|_F^2 \quad \text{(biases not penalised)}.

    Args:
      params: `mlp_init` layout.
      batch: ``{"x": [m, d], "y": int [m]}``.
      l2: weight decay coefficient ``>= 0``.
      activation: ``"relu"`` or ``"tanh"``.

    Returns:
      A scalar.
    """
    logits = mlp_apply(params, batch["x"], activation)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
    decay = sum(jnp.sum(jnp.square(v)) for k, v in params.items() if k.startswith("w"))
    return nll + 0.5 * l2 * decay


def accuracy(params: PyTree, batch: PyTree, activation: str = "relu") -> jax.Array:
    """Fraction of correctly classified rows of ``batch``.

    Works for the binary linear models of `logistic_regression` (``params`` an array, labels ±1,
    prediction ``sign(a^T x)`` with ties to +1) and for the classifiers of `softmax_regression` and
    `mlp_classifier` (``params`` a dict, prediction ``argmax`` of the logits).

    Args:
      params: a ``[d]`` array or an `mlp_init` dict.
      batch: ``{"x": ..., "y": ...}``, e.g. a shard ``problem.shards[i]``.
      activation: the classifier's activation (ignored for linear models).

    Returns:
      A ``float32`` scalar in ``[0, 1]``.

    Example:
      >>> batch = {"x": jnp.array([[1.0], [-2.0]]), "y": jnp.array([1.0, 1.0])}
      >>> float(accuracy(jnp.array([1.0]), batch))
      0.5
    """
    if isinstance(params, dict):
        pred = jnp.argmax(mlp_apply(params, batch["x"], activation), axis=-1)
    else:
        pred = jnp.where(batch["x"] @ params >= 0, 1.0, -1.0)
    return jnp.mean((pred == batch["y"]).astype(jnp.float32))


def _classifier(data, sizes, activation, l2, batch_size, seed, zero_init, name) -> problem_lib.Problem:
    shards = _check_shards(data, name)
    _check_classes(shards, sizes[-1], name)
    l2 = datasets.check_nonnegative("l2", l2)
    batch_size = _check_batch_size(batch_size)
    params = mlp_init([shards[0]["x"].shape[1], *sizes], activation=activation, seed=seed)
    if zero_init:
        params = jax.tree.map(jnp.zeros_like, params)
    return problem_lib.Problem(
        functools.partial(cross_entropy_loss, l2=l2, activation=activation),
        params,
        shards,
        batch_size=batch_size,
        name=name,
    )


def softmax_regression(
    data: Shards, num_classes: int = 10, *, l2: float = 0.0, batch_size: int | None = None
) -> problem_lib.Problem:
    r"""Multinomial logistic (softmax) regression, a convex ``C``-class problem starting at zero.

    .. math::
        f_i(W, b) = -\frac{1}{m_i} \sum_j \log \mathrm{softmax}(W^\top a_j + b)_{y_j}
        + \frac{\lambda_2}{2}\|W\|_F^2 .

    Parameters use `mlp_init`'s layout with one layer, ``{"w0": [d, C], "b0": [C]}``, so `mlp_apply` and
    `accuracy` apply.

    Args:
      data: per-node dicts ``{"x": float [m_i, d], "y": int [m_i] in [0, C)}``.
      num_classes: ``C``.
      l2: weight decay ``>= 0`` (``> 0`` makes it strongly convex in ``W``).
      batch_size: rows per stochastic gradient; None uses the whole shard.

    Returns:
      A :class:`jaxasync.Problem` named ``"softmax_regression"``.

    Example:
      >>> x, y = gaussian_mixture(600, 40, 10, seed=0)
      >>> p = softmax_regression(split_iid(x, y, 4), 10, batch_size=32)
      >>> round(float(p.loss(p.init_params)), 4) == round(float(np.log(10)), 4)
      True
    """
    num_classes = datasets.check_positive_int("num_classes", num_classes)
    # Convex, so start at zero like the usual solvers (a random start would only add a seed).
    return _classifier(data, (num_classes,), "relu", l2, batch_size, 0, True, "softmax_regression")


def mlp_classifier(
    data: Shards,
    hidden: Sequence[int] = (64, 32),
    num_classes: int = 10,
    *,
    activation: str = "relu",
    l2: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> problem_lib.Problem:
    r"""A small fully connected classifier with softmax cross-entropy (non-convex).

    .. math::
        z(a) = W_L^\top \phi(\cdots \phi(W_0^\top a + b_0) \cdots) + b_L, \qquad
        f_i = -\frac{1}{m_i} \sum_j \log \mathrm{softmax}(z(a_j))_{y_j}
        + \frac{\lambda_2}{2}\sum_l \|W_l\|_F^2 .

    Initial parameters come from `mlp_init` with ``seed``; evaluate with `mlp_apply` / `accuracy`
    (pass the same ``activation``).

    Args:
      data: per-node dicts ``{"x": float [m_i, d], "y": int [m_i] in [0, C)}``.
      hidden: hidden widths, e.g. ``(64, 32)`` (the 64-32-10 MLP of the Elastic Consistency
        reproduction); ``()`` is softmax regression with a random start.
      num_classes: ``C``.
      activation: ``"relu"`` or ``"tanh"`` (smooth).
      l2: weight decay ``>= 0``.
      batch_size: rows per stochastic gradient; None uses the whole shard.
      seed: seed of the initial weights.

    Returns:
      A :class:`jaxasync.Problem` named ``"mlp"``.

    Example:
      >>> x, y = gaussian_mixture(600, 40, 10, seed=0)
      >>> p = mlp_classifier(split_iid(x, y, 4), (64, 32), 10, batch_size=32)
      >>> sorted(p.init_params)
      ['b0', 'b1', 'b2', 'w0', 'w1', 'w2']

    References:
      Nadiradze, Markov, Chatterjee, Kungurtsev, Alistarh, "Elastic consistency: A practical
      consistency model for distributed stochastic gradient descent", AAAI 2021.
    """
    if isinstance(hidden, (int, np.integer)):
        raise ValueError(f"hidden must be a sequence of widths, got {hidden!r}")
    hidden = tuple(datasets.check_positive_int("hidden", h) for h in hidden)
    num_classes = datasets.check_positive_int("num_classes", num_classes)
    return _classifier(data, (*hidden, num_classes), activation, l2, batch_size, seed, False, "mlp")
