# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Data sets for the ready-made problems: generators, the bundled w7a, and node splits.

Contract:

* Everything here is plain NumPy and deterministic: the same arguments (including ``seed``) give the same
  arrays bit for bit, on any machine. Randomness comes from ``np.random.default_rng(seed)`` only.
* A data set is a pair ``(x, y)``: features ``float32[N, d]`` and labels ``[N]``. Binary labels are
  ``float32`` in ``{-1, +1}``; class labels are ``int32`` in ``[0, num_classes)``.
* A split is a list with one shard per node, each a dict ``{"x": x[rows], "y": y[rows]}``; the splitters
  (`split_iid`, `split_contiguous`, `split_label_sorted`, `split_dirichlet`) use every row exactly once
  (unless ``drop_remainder`` is asked for) and never copy more than the rows they hand out.
* Bad arguments raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "binarize",
    "gaussian_mixture",
    "load_libsvm",
    "load_w7a",
    "split_contiguous",
    "split_dirichlet",
    "split_iid",
    "split_label_sorted",
    "synthetic_fedprox",
]

W7A_ROWS = 25057
W7A_FEATURES = 300


# ----------------------------------------------------------------------------------------
# Argument checks shared with `problems.py`.


def check_positive_int(name: str, value) -> int:
    """``value`` as an int, or a ValueError naming ``name`` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` if it is negative or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return v


def _check_xy(x, y, num_nodes: int) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = np.asarray(x), np.asarray(y)
    n = check_positive_int("num_nodes", num_nodes)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y need the same leading example axis and y must be 1-D, got x {x.shape}, y {y.shape}"
        )
    if n > x.shape[0]:
        raise ValueError(f"num_nodes={n} exceeds the number of rows {x.shape[0]}: a shard would be empty")
    return x, y, n


def _shards(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"x": x[rows], "y": y[rows]} for rows in parts]


# ----------------------------------------------------------------------------------------
# Splits.


def split_iid(x, y, num_nodes: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Shuffles the rows and deals them into ``num_nodes`` near-equal shards (homogeneous nodes).

    Shard sizes differ by at most one (``np.array_split`` sizes); every row lands in exactly one shard.

    Args:
      x: features ``[N, ...]``.
      y: labels ``[N]``.
      num_nodes: number of shards, ``1 <= num_nodes <= N``.
      seed: seed of the permutation.

    Returns:
      A list of ``num_nodes`` dicts ``{"x": ..., "y": ...}``.

    Example:
      >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
      >>> [len(s["y"]) for s in split_iid(x, y, 2)]
      [3, 2]
    """
    x, y, n = _check_xy(x, y, num_nodes)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    return _shards(x, y, np.array_split(perm, n))


def split_contiguous(x, y, num_nodes: int, *, drop_remainder: bool = False) -> list[dict[str, np.ndarray]]:
    """Node ``i`` gets a contiguous block of rows, in order (AsGrad's split).

    With ``drop_remainder=False`` the blocks are ``np.array_split`` blocks (sizes differ by at most one,
    every row used). With ``drop_remainder=True`` node ``i`` gets rows ``[i m, (i + 1) m)`` with
    ``m = N // num_nodes`` and the last ``N mod num_nodes`` rows are dropped, which is what the AsGrad
    experiments do and gives equal shards (needed for full local gradients, ``batch_size=None``).

    Data sets stored in a meaningful order (by time, source, or label) give heterogeneous nodes.

    Args:
      x: features ``[N, ...]``.
      y: labels ``[N]``.
      num_nodes: number of shards, ``1 <= num_nodes <= N``.
      drop_remainder: drop the trailing rows so that all shards have ``N // num_nodes`` rows.

    Returns:
      A list of ``num_nodes`` dicts ``{"x": ..., "y": ...}``.

    Example:
      >>> x, y = np.zeros((7, 1)), np.arange(7)
      >>> [s["y"].tolist() for s in split_contiguous(x, y, 2, drop_remainder=True)]
      [[0, 1, 2], [3, 4, 5]]

    References:
      Islamov, Safaryan, Alistarh, "AsGrad: A sharp unified analysis of asynchronous-SGD algorithms",
      AISTATS 2024.
    """
    x, y, n = _check_xy(x, y, num_nodes)
    rows = np.arange(x.shape[0])
    if drop_remainder:
        m = x.shape[0] // n
        return _shards(x, y, [rows[i * m : (i + 1) * m] for i in range(n)])
    return _shards(x, y, np.array_split(rows, n))


def split_label_sorted(x, y, num_nodes: int) -> list[dict[str, np.ndarray]]:
    """Sorts the rows by label (stable) and splits them contiguously: each node sees few labels.

    With ``C`` balanced classes and ``n`` nodes, a node sees about ``max(1, C / n)`` labels, at most
    one more (the pathological non-i.i.d. split of federated learning).

    Args:
      x: features ``[N, ...]``.
      y: labels ``[N]`` (any sortable dtype, e.g. int classes or ±1).
      num_nodes: number of shards, ``1 <= num_nodes <= N``.

    Returns:
      A list of ``num_nodes`` dicts ``{"x": ..., "y": ...}``.

    Example:
      >>> x, y = np.zeros((6, 1)), np.array([1, 0, 1, 0, 1, 0])
      >>> [s["y"].tolist() for s in split_label_sorted(x, y, 2)]
      [[0, 0, 0], [1, 1, 1]]

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-efficient learning of deep
      networks from decentralized data", AISTATS 2017.
    """
    x, y, n = _check_xy(x, y, num_nodes)
    order = np.argsort(y, kind="stable")
    return _shards(x, y, np.array_split(order, n))


def split_dirichlet(
    x, y, num_nodes: int, alpha: float, *, seed: int = 0, min_size: int = 1, max_tries: int = 100
) -> list[dict[str, np.ndarray]]:
    r"""Label-skewed split: each class is divided among the nodes with Dirichlet(``alpha``) proportions.

    For every class ``c`` independently, ``p_c ~ Dir(alpha 1_n)`` and the rows of class ``c`` (in a
    random order) are cut into ``n`` consecutive pieces of sizes ``~ p_c N_c``; node ``i`` takes piece
    ``i`` of every class. Small ``alpha`` (e.g. 0.1) gives nodes dominated by one or two classes and
    unequal sizes; large ``alpha`` (e.g. 100) approaches the i.i.d. split. Draws are repeated (same
    stream, at most ``max_tries`` times) until every node has at least ``min_size`` rows.

    Shards usually differ in size, so problems built on them need a ``batch_size``.

    Args:
      x: features ``[N, ...]``.
      y: labels ``[N]``.
      num_nodes: number of shards, ``1 <= num_nodes <= N``.
      alpha: Dirichlet concentration, ``> 0``.
      seed: seed of the proportions and of the within-class orders.
      min_size: minimum number of rows per node, ``1 <= min_size <= N / num_nodes``.
      max_tries: how many draws to try before giving up with a ValueError.

    Returns:
      A list of ``num_nodes`` dicts ``{"x": ..., "y": ...}``; rows of a shard are grouped by class.

    Example:
      >>> x, y = np.zeros((100, 1)), np.arange(100) % 4
      >>> shards = split_dirichlet(x, y, 5, alpha=0.5)
      >>> sum(len(s["y"]) for s in shards)
      100

    References:
      Hsu, Qi, Brown, "Measuring the effects of non-identical data distribution for federated visual
      classification", arXiv:1909.06335, 2019.
    """
    x, y, n = _check_xy(x, y, num_nodes)
    alpha = check_nonnegative("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    min_size = check_positive_int("min_size", min_size)
    if min_size * n > x.shape[0]:
        raise ValueError(f"min_size={min_size} is impossible: {x.shape[0]} rows for {n} nodes")
    max_tries = check_positive_int("max_tries", max_tries)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n, alpha))
            # Cut points from cumulative proportions; rounding keeps the pieces a partition of `rows`.
            cuts = np.round(np.cumsum(p)[:-1] * rows.size).astype(np.int64)
            for i, piece in enumerate(np.split(rows, cuts)):
                parts[i].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(m.size for m in merged) >= min_size:
            return _shards(x, y, merged)
    raise ValueError(
        f"split_dirichlet: no draw in max_tries={max_tries} gave every node min_size={min_size} rows; "
        f"raise alpha or max_tries, or lower min_size"
    )


# ----------------------------------------------------------------------------------------
# Generators.


def binarize(y, positive) -> np.ndarray:
    """Maps class labels to ``float32`` ±1: ``+1`` for the classes in ``positive``, ``-1`` otherwise.

    Args:
      y: labels ``[N]``.
      positive: one class or a collection of classes.

    Returns:
      ``float32[N]`` in ``{-1, +1}``.

    Example:
      >>> binarize(np.array([0, 1, 2, 3]), positive=[1, 3]).tolist()
      [-1.0, 1.0, -1.0, 1.0]
    """
    return np.where(np.isin(np.asarray(y), np.asarray(positive)), 1.0, -1.0).astype(np.float32)


def gaussian_mixture(
    num_samples: int, dim: int, num_classes: int, separation: float = 3.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""A balanced mixture of isotropic unit Gaussians, one per class.

    .. math::
        \mu_c = s \, u_c / \|u_c\|, \quad u_c \sim N(0, I_d); \qquad
        x \mid (y = c) \sim N(\mu_c, I_d),

    with ``s`` = ``separation`` (the norm of every class mean; larger is easier). Labels are balanced
    (``num_samples // num_classes`` per class, the remainder to the first classes) and shuffled.

    Args:
      num_samples: number of rows ``N``.
      dim: feature dimension ``d``.
      num_classes: number of classes ``C >= 2``.
      separation: norm of the class means, ``>= 0``.
      seed: random seed.

    Returns:
      ``(x, y)``: ``float32[N, d]`` features and ``int32[N]`` labels in ``[0, C)``.

    Example:
      >>> x, y = gaussian_mixture(100, 40, 10)
      >>> x.shape, x.dtype, sorted(set(y.tolist())) == list(range(10))
      ((100, 40), dtype('float32'), True)
    """
    num_samples = check_positive_int("num_samples", num_samples)
    dim = check_positive_int("dim", dim)
    num_classes = check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    separation = check_nonnegative("separation", separation)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((num_classes, dim))
    means = separation * u / np.linalg.norm(u, axis=1, keepdims=True)
    y = rng.permutation(np.arange(num_samples) % num_classes)
    x = means[y] + rng.standard_normal((num_samples, dim))
    return x.astype(np.float32), y.astype(np.int32)


def synthetic_fedprox(
    num_nodes: int,
    samples_per_node: int,
    dim: int = 60,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_classes: int = 2,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    r"""FedProx's ``synthetic(alpha, beta)``: every node has its own model and its own feature mean.

    For node ``i`` (``N(m, s)`` has standard deviation ``s``, as in the reference generator):

    .. math::
        u_i \sim N(0, \alpha), \quad W_i \in \mathbb{R}^{C \times d}, b_i \in \mathbb{R}^C
        \text{ with entries } \sim N(u_i, 1); \\
        B_i \sim N(0, \beta), \quad v_i \in \mathbb{R}^d \text{ with entries } \sim N(B_i, 1), \quad
        x \sim N(v_i, \Sigma), \ \Sigma = \mathrm{diag}(j^{-1.2})_{j=1..d}; \\
        y = \arg\max_c \, \mathrm{softmax}(W_i x + b_i)_c .

    ``alpha`` controls how much the node models differ, ``beta`` how much the node feature
    distributions differ; ``synthetic(0, 0)`` still differs across nodes (the ``N(u_i, 1)`` and
    ``N(B_i, 1)`` draws), as in the paper. With ``num_classes=2`` labels are mapped to ±1
    (class 1 -> +1), the binary version AsGrad uses.

    Args:
      num_nodes: number of nodes ``n``.
      samples_per_node: rows per node ``m`` (equal across nodes; the paper draws power-law sizes).
      dim: feature dimension ``d`` (60 in FedProx, 30 in the AsGrad reproduction).
      alpha: standard deviation of the per-node model means, ``>= 0``.
      beta: standard deviation of the per-node feature means, ``>= 0``.
      num_classes: ``C >= 2`` (10 in FedProx).
      seed: random seed.

    Returns:
      A list of ``n`` dicts ``{"x": float32[m, d], "y": ...}`` with ``y`` ``float32`` ±1 if ``C == 2``,
      else ``int32`` classes in ``[0, C)``.

    Example:
      >>> shards = synthetic_fedprox(10, 100, 30, alpha=1.0, beta=1.0)
      >>> len(shards), shards[0]["x"].shape, set(shards[0]["y"].tolist()) <= {-1.0, 1.0}
      (10, (100, 30), True)

    References:
      Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated optimization in heterogeneous networks"
      (FedProx), MLSys 2020, Section 5.1.
    """
    n = check_positive_int("num_nodes", num_nodes)
    m = check_positive_int("samples_per_node", samples_per_node)
    dim = check_positive_int("dim", dim)
    alpha = check_nonnegative("alpha", alpha)
    beta = check_nonnegative("beta", beta)
    num_classes = check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    sd = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of diag(j^-1.2)
    shards = []
    for _ in range(n):
        u = rng.normal(0.0, alpha)
        w = rng.normal(u, 1.0, (num_classes, dim))
        b = rng.normal(u, 1.0, num_classes)
        v = rng.normal(rng.normal(0.0, beta), 1.0, dim)
        x = v + sd * rng.standard_normal((m, dim))
        labels = np.argmax(x @ w.T + b, axis=1)  # argmax of softmax = argmax of logits
        if num_classes == 2:
            y = np.where(labels == 1, 1.0, -1.0).astype(np.float32)
        else:
            y = labels.astype(np.int32)
        shards.append({"x": x.astype(np.float32), "y": y})
    return shards


# ----------------------------------------------------------------------------------------
# LIBSVM files and the bundled w7a.


def _parse_libsvm(text: str, num_features: int | None, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    labels: list[float] = []
    row_ids: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for line in text.splitlines():
        if rows is not None and len(labels) >= rows:
            break
        parts = line.split()
        if not parts:
            continue
        r = len(labels)
        try:
            labels.append(float(parts[0]))
            for tok in parts[1:]:
                k, _, v = tok.partition(":")
                cols.append(int(k))
                vals.append(float(v))
                row_ids.append(r)
        except ValueError:
            raise ValueError(f"LIBSVM row {r}: cannot parse {line[:80]!r}") from None
    col = np.asarray(cols, np.int64) - 1  # LIBSVM indices are 1-based
    if col.size and col.min() < 0:
        raise ValueError("LIBSVM feature indices must be >= 1")
    d = int(col.max()) + 1 if col.size else 0
    if num_features is not None:
        if d > num_features:
            raise ValueError(f"feature index {d} exceeds num_features={num_features}")
        d = num_features
    x = np.zeros((len(labels), d), np.float32)
    x[np.asarray(row_ids, np.int64), col] = np.asarray(vals, np.float32)
    return x, np.asarray(labels, np.float32)


def load_libsvm(
    path: str | os.PathLike, num_features: int | None = None, *, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a LIBSVM / SVMlight text file (optionally gzipped) into dense arrays.

    Each line is ``label index:value ...`` with 1-based, increasing indices; blank lines are skipped.

    Args:
      path: a ``.txt`` file, or a ``.gz`` file (detected by the suffix).
      num_features: width of ``x``; None uses the largest index present.
      rows: read only the first ``rows`` rows; None reads all.

    Returns:
      ``(x, y)``: ``float32[N, num_features]`` dense features and ``float32[N]`` labels as written.
    """
    if rows is not None:
        rows = check_positive_int("rows", rows)
    if num_features is not None:
        num_features = check_positive_int("num_features", num_features)
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="ascii") as f:
        return _parse_libsvm(f.read(), num_features, rows)


@functools.lru_cache(maxsize=1)
def _w7a() -> tuple[np.ndarray, np.ndarray]:
    # importlib.resources finds the file in an installed wheel as well as in a source checkout.
    resource = importlib.resources.files("jaxasync") / "data" / "w7a.txt.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as f:
        x, y = _parse_libsvm(f.read(), W7A_FEATURES, None)
    if x.shape != (W7A_ROWS, W7A_FEATURES) or not np.all(np.abs(y) == 1):
        raise RuntimeError(f"bundled w7a is corrupt: shape {x.shape}, labels {np.unique(y)}")
    # The cache is shared by every caller: make accidental in-place edits fail loudly.
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_w7a(rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The LIBSVM ``w7a`` data set shipped with jaxasync: 25 057 rows, 300 binary features, ±1 labels.

    The file is parsed once per process and cached; each call returns fresh copies.

    Args:
      rows: return only the first ``rows`` rows (AsGrad uses 24 600); None returns all 25 057.

    Returns:
      ``(x, y)``: ``float32[rows, 300]`` features in ``{0, 1}`` and ``float32[rows]`` labels in
      ``{-1, +1}`` (about 3 % positive).

    Example:
      >>> x, y = load_w7a(rows=24600)
      >>> x.shape, y.dtype
      ((24600, 300), dtype('float32'))

    References:
      Platt, "Fast training of support vector machines using sequential minimal optimization", 1998;
      Chang and Lin, LIBSVM data sets, https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/.
    """
    if rows is not None:
        rows = check_positive_int("rows", rows)
        if rows > W7A_ROWS:
            raise ValueError(f"rows must be at most {W7A_ROWS} for w7a, got {rows}")
    x, y = _w7a()
    return np.array(x[:rows]), np.array(y[:rows])
