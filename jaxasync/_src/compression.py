# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Sparsifying compressors (top-k, rand-k) and the error-feedback step.

Contract:

* A *compressor* maps an array ``x`` (any shape; positions are those of ``x.ravel()``) to
  ``(dense, sparse)``: ``dense`` has the shape and dtype of ``x`` and is zero outside the ``k``
  selected positions, where it holds ``x`` (or ``x * d / k`` for scaled rand-k); ``sparse`` is a
  :class:`SparseUpdate` holding the same ``k`` entries, so
  ``to_dense(sparse, x.size) == dense.ravel()``.
* ``k`` is a static Python int with ``1 <= k <= x.size``; all output shapes depend on ``k`` and the
  input shape only, so every function here is jit-able and never recompiles for new values.
* The ``indices`` of a :class:`SparseUpdate` are int32, distinct and **sorted ascending**, whatever
  algorithm selected them; this makes the representation canonical (two exact algorithms give
  bitwise-identical outputs) and gives a shared-buffer ``add_sparse`` a forward memory sweep.
* Ties in magnitude are broken towards the lower index.
* Over pytrees (:func:`compress_tree`), selection is either *per leaf* (each leaf keeps
  ``k_from_density(leaf.size, density)`` entries; the sparse form is a pytree of
  :class:`SparseUpdate` with leaf-local indices) or *global* (the tree is ravelled with
  ``jax.flatten_util.ravel_pytree``, one selection is made over all coordinates and the sparse form
  is one :class:`SparseUpdate` whose indices address the ravelled vector, i.e. the layout of a
  shared parameter buffer). :func:`flatten_sparse` turns a per-leaf sparse tree into the global
  form.
* :func:`ef_compress` is the error-feedback step ``a = e + u; sent = C(a); e' = a - sent``. For the
  unscaled compressors of this module it satisfies ``sent + e' == e + u`` exactly (element-wise, in
  the dtype of ``a``): a selected coordinate has ``sent = a`` and ``e' = a - a = 0``, an unselected
  one has ``sent = 0`` and ``e' = a``.

Selection algorithms (all exact, same result):

* ``"top_k"``: ``jax.lax.top_k`` on the scores, then an ascending sort of the ``k`` indices.
  Cost grows with ``k`` (CPU, d = 2**20: about 2 ms at k = d/1000, 7 ms at d/100, 50 ms at
  d/10, 150 ms at d/2).
* ``"radix"``: the k-th largest IEEE bit pattern of the (non-negative, float32) scores from two
  histograms (high 16 bits, then the low 15 bits within one high bucket), the selection packed 32
  positions per word (a second packing pass only when ties at the k-th value exceed what is
  left), and each output slot's position found in the words. Two scatter-add passes and one
  packing pass over the data, the rest on ``d / 32`` words or ``k`` slots (CPU, d = 2**20: about
  2-3 ms at k = d/100 and d/10, 4-7 ms at d/2). XLA:CPU has no faster exact selection or stream
  compaction primitive: ``jnp.nonzero(mask, size=k)`` alone takes ~7 ms there.
* ``"auto"`` (default) uses ``"radix"`` when ``d >= 2**14`` and ``512 * k > d``, ``"top_k"``
  otherwise (a small ``k`` is cheaper for ``top_k``, and below ``2**14`` coordinates both take
  well under a millisecond and ``"top_k"`` compiles faster).

``jax.lax.approx_max_k`` is not offered: on CPU it lowers to the exact ``top_k`` (same timings) and
on TPU it would make the selection approximate, which breaks the canonical form above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SparseUpdate",
    "k_from_density",
    "top_k",
    "rand_k",
    "to_dense",
    "add_sparse",
    "compress_tree",
    "flatten_sparse",
    "sparse_to_tree",
    "ef_compress",
]

PyTree = Any

ALGORITHMS = ("auto", "top_k", "radix")  # Selection algorithms (module constant, not exported).
METHODS = ("topk", "randk")
_AUTO_RADIX_MIN_SIZE = 2**14


class SparseUpdate(NamedTuple):
    """``k`` entries of a vector: what is added to a (shared) flat parameter buffer.

    Attributes:
      indices: int32 ``[k]``, distinct, ascending positions in the flat (ravelled) vector.
      values: ``[k]`` values at those positions, in the dtype of the compressed array.
    """

    indices: jax.Array
    values: jax.Array


def k_from_density(d: int, density: float) -> int:
    """Number of entries kept out of ``d`` at a given density.

    .. math::
      k = \\min(d, \\max(1, \\lceil \\rho d \\rceil))

    The ceiling is taken after subtracting a relative tolerance of ``1e-9``, so floating-point noise
    in ``density * d`` does not add an entry (``k_from_density(10, 0.7) == 7`` although
    ``0.7 * 10 == 7.000000000000001`` in binary floating point). Rounding up (rather than to the
    nearest integer) guarantees at least the requested fraction is kept and at least one entry.

    Args:
      d: number of coordinates, ``d >= 1``.
      density: fraction of coordinates kept, in ``(0, 1]``.

    Returns:
      ``k`` as a Python int.

    Example:
      >>> from jaxasync._src import compression
      >>> compression.k_from_density(1000, 0.01)
      10
    """
    check_density(density)
    d = int(d)
    if d < 1:
        raise ValueError(f"k_from_density: d must be >= 1, got {d}.")
    x = float(density) * d
    k = math.ceil(x - 1e-9 * max(1.0, x))
    return min(d, max(1, k))


def check_density(density) -> None:
    """Raises ``TypeError`` / ``ValueError`` unless ``density`` is a real number in ``(0, 1]``."""
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
        raise TypeError(
            f"density must be a Python float in (0, 1], got {density!r} of type {type(density).__name__}."
        )
    if not (0.0 < float(density) <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got density={density!r}.")


def _check_k(k, d: int, where: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{where}: k must be a static Python int, got {type(k).__name__}.")
    k = int(k)
    if not 1 <= k <= d:
        raise ValueError(f"{where}: k must satisfy 1 <= k <= d = {d}, got k={k}.")
    return k


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")


def _top_bucket(hist: jax.Array, k) -> tuple[jax.Array, jax.Array]:
    """The largest bucket ``b`` with ``sum(hist[b:]) >= k``, and ``sum(hist[b + 1:])``.

    Two levels of 256 rows, so no long cumulative sum (a slow ``reduce_window`` on XLA:CPU).
    """
    rows = hist.reshape(256, -1)
    total = jnp.sum(rows, axis=1)
    beyond = jnp.cumsum(total[::-1])[::-1] - total  # per row: count in the rows after it
    r = jnp.sum(beyond + total >= k, dtype=jnp.int32) - 1
    suffix = jnp.cumsum(rows[r][::-1])[::-1] + beyond[r]  # per bucket of row r: count from it on
    c = jnp.sum(suffix >= k, dtype=jnp.int32) - 1
    return r * rows.shape[1] + c, suffix[c] - rows[r, c]


def _pack(mask: jax.Array) -> jax.Array:
    """uint32 words: bit ``c`` of word ``r`` is ``mask[32 r + c]`` (False past the end)."""
    mask = jnp.pad(mask, (0, -mask.size % 32))
    bits = mask.reshape(-1, 32).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
    return jnp.sum(bits, axis=1, dtype=jnp.uint32)


def _low_bits(n: jax.Array) -> jax.Array:
    """uint32 words with the ``n`` lowest bits set, ``0 <= n <= 32``."""
    n = n.astype(jnp.uint32)
    return jnp.where(n >= 32, jnp.uint32(0xFFFFFFFF), (jnp.uint32(1) << jnp.minimum(n, 31)) - 1)


def _popcount(words: jax.Array) -> jax.Array:
    return jax.lax.population_count(words).astype(jnp.int32)


def _nth_set_bit(words: jax.Array, n: jax.Array) -> jax.Array:
    """Position of the ``n``-th (from 0) set bit of each word; 32 if the word has ``n`` or fewer."""
    bit = jnp.zeros(n.shape, jnp.int32)
    for half in (16, 8, 4, 2, 1):  # binary search: the last bit with at most n set bits below it
        bit = jnp.where(_popcount(words & _low_bits(bit + half)) <= n, bit + half, bit)
    return jnp.where(n < _popcount(words), bit, 32)


def _select_radix(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Ascending indices of the ``k`` largest non-negative float32 ``scores`` (ties: lower index).

    Also returns the bool mask of those positions (unpacked from the words: no extra pass).
    """
    # For non-negative IEEE floats the int32 bit pattern is monotone in the value. The k-th largest
    # pattern ``tau`` comes from two histograms (scatter-adds: high 16 bits, then the low 15 bits
    # inside the high bucket of ``tau``); the selection (``bits > tau`` and the first ``room`` ties)
    # is packed 32 per word, and output slot j gets the position of the j-th selected bit.
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    high = bits >> 15
    b1, above1 = _top_bucket(jnp.zeros(1 << 16, jnp.int32).at[high].add(1, mode="drop"), k)
    low = jnp.where(high == b1, bits & 0x7FFF, 1 << 15)  # out of range: dropped
    hist = jnp.zeros(1 << 15, jnp.int32).at[low].add(1, mode="drop")
    b2, above2 = _top_bucket(hist, k - above1)
    tau = (b1 << 15) | b2
    room = k - above1 - above2  # ties at tau to keep, lowest index first (1 <= room <= hist[b2])

    def first_ties():  # more ties at tau than room (rare): keep the lowest-index ones
        ties = _pack(bits == tau)
        count = _popcount(ties)
        keep = jnp.clip(room - (jnp.cumsum(count) - count), 0, count)  # ties kept per word
        return _pack(bits > tau) | (ties & _low_bits(_nth_set_bit(ties, keep)))

    words = jax.lax.cond(room == hist[b2], lambda: _pack(bits >= tau), first_ties)
    # Slot j: word w = number of words whose selections all come before j (a scatter of the word
    # ends, summed up), then the bit of w with what is left of j selected bits below it.
    count = _popcount(words)
    ends = jnp.cumsum(count)
    word = jnp.cumsum(jnp.zeros((k,), jnp.int32).at[ends].add(1, mode="drop"))
    bit = _nth_set_bit(words[word], jnp.arange(k, dtype=jnp.int32) - (ends[word] - count[word]))
    selected = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1 == 1
    return 32 * word + bit, selected.reshape(-1)[: scores.shape[0]]


def _select_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Same result as :func:`_select_radix`, through ``jax.lax.top_k``."""
    _, indices = jax.lax.top_k(scores, k)
    indices = jnp.sort(indices.astype(jnp.int32))
    return indices, jnp.zeros(scores.shape, bool).at[indices].set(True)


def _select(scores: jax.Array, k: int, algorithm: str) -> tuple[jax.Array, jax.Array]:
    """Ascending indices of the ``k`` largest ``scores``, and the bool mask of those positions."""
    d = scores.shape[0]
    if k == d:  # Everything is kept: no selection needed.
        return jnp.arange(d, dtype=jnp.int32), jnp.ones((d,), bool)
    if algorithm == "auto":
        algorithm = "radix" if d >= _AUTO_RADIX_MIN_SIZE and 512 * k > d else "top_k"
    if algorithm == "top_k":
        return _select_top_k(scores, k)
    return _select_radix(scores, k)


def _magnitudes(flat: jax.Array) -> jax.Array:
    # float32 holds every bfloat16/float16 magnitude exactly, so the order is preserved.
    if flat.dtype == jnp.float64:
        raise TypeError("top_k: float64 inputs are not supported; cast to float32.")
    return jnp.abs(flat).astype(jnp.float32)


def _random_scores(key: jax.Array, d: int) -> jax.Array:
    """``d`` i.i.d. positive normal float32 scores with 30 random bits each."""
    bits = jax.random.bits(key, (d,), jnp.uint32)
    # 30 random bits offset by the smallest normal float's bit pattern: every pattern is a positive,
    # normal (never denormal, so no flush-to-zero) finite float32, and the order is that of the bits.
    pattern = (bits >> 2).astype(jnp.int32) + jnp.int32(0x00800000)
    return jax.lax.bitcast_convert_type(pattern, jnp.float32)


def _gather(
    x: jax.Array, indices: jax.Array, selected: jax.Array, scale=None
) -> tuple[jax.Array, SparseUpdate]:
    """``(dense, sparse)`` of the selected entries of ``x`` (times ``scale``, rounded to its dtype)."""
    flat = x.reshape(-1)
    kept = flat if scale is None else (flat.astype(jnp.float32) * scale).astype(flat.dtype)
    dense = jnp.where(selected, kept, jnp.zeros_like(kept))  # one loop, fused into its reader
    return dense.reshape(x.shape), SparseUpdate(indices, kept[indices])


def top_k(x: jax.Array, k: int, *, algorithm: str = "auto") -> tuple[jax.Array, SparseUpdate]:
    """Keeps the ``k`` entries of largest magnitude.

    .. math::
      \\mathrm{TopK}(x)_j = x_j \\, [\\, |x_j| \\text{ is among the } k \\text{ largest } |x_i| \\,]

    Args:
      x: array of any shape (positions are those of ``x.ravel()``), floating dtype other than float64.
      k: static number of entries kept, ``1 <= k <= x.size``.
      algorithm: ``"auto"``, ``"top_k"`` or ``"radix"`` (see the module docstring); all exact.

    Returns:
      ``(dense, sparse)``: ``dense`` has the shape and dtype of ``x`` with every unselected entry
      zero; ``sparse`` is the :class:`SparseUpdate` of the ``k`` selected entries.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxasync._src import compression
      >>> dense, sparse = compression.top_k(jnp.array([0.5, -3.0, 1.0, 2.0]), 2)
      >>> dense.tolist(), sparse.indices.tolist(), sparse.values.tolist()
      ([0.0, -3.0, 0.0, 2.0], [1, 3], [-3.0, 2.0])

    References:
      Stich, Cordonnier & Jaggi, `Sparsified SGD with Memory
      <https://arxiv.org/abs/1809.07599>`_, 2018.
    """
    k = _check_k(k, x.size, "top_k")
    _check_algorithm(algorithm)
    flat = x.reshape(-1)
    return _gather(x, *_select(_magnitudes(flat), k, algorithm))


def rand_k(
    x: jax.Array,
    k: int,
    key: jax.Array,
    scale: bool = False,
    *,
    algorithm: str = "auto",
) -> tuple[jax.Array, SparseUpdate]:
    """Keeps ``k`` entries chosen uniformly at random without replacement.

    .. math::
      \\mathrm{RandK}(x)_j = s \\, x_j \\, [\\, j \\in S \\,], \\quad S \\sim \\mathrm{Unif}
      \\binom{[d]}{k}, \\quad s = d / k \\text{ if scale else } 1

    The subset is the ``k`` largest of ``d`` i.i.d. random 30-bit scores drawn from ``key``, so it is
    a deterministic function of ``key``. With ``scale=True`` the estimate is unbiased,
    ``E[RandK(x)] = x``, but no longer a contraction (do not combine it with error feedback).

    Args:
      x: array of any shape (positions are those of ``x.ravel()``).
      k: static number of entries kept, ``1 <= k <= x.size``.
      key: a ``jax.random`` key.
      scale: multiply the kept entries by ``d / k``.
      algorithm: ``"auto"``, ``"top_k"`` or ``"radix"`` (see the module docstring).

    Returns:
      ``(dense, sparse)`` as for :func:`top_k`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxasync._src import compression
      >>> dense, sparse = compression.rand_k(jnp.arange(1.0, 9.0), 3, jax.random.key(0))
      >>> int((dense != 0).sum()), sparse.indices.shape
      (3, (3,))

    References:
      Stich, Cordonnier & Jaggi, `Sparsified SGD with Memory
      <https://arxiv.org/abs/1809.07599>`_, 2018.
    """
    d = x.size
    k = _check_k(k, d, "rand_k")
    _check_algorithm(algorithm)
    return _gather(x, *_select(_random_scores(key, d), k, algorithm), d / k if scale and k < d else None)


def to_dense(sparse: SparseUpdate, d: int, dtype=None) -> jax.Array:
    """The dense ``[d]`` vector of a :class:`SparseUpdate` (repeated indices are summed).

    Args:
      sparse: the entries.
      d: length of the dense vector.
      dtype: output dtype; defaults to ``sparse.values.dtype``.

    Returns:
      ``zeros(d).at[sparse.indices].add(sparse.values)``.
    """
    dtype = sparse.values.dtype if dtype is None else dtype
    return jnp.zeros((d,), dtype).at[sparse.indices].add(sparse.values.astype(dtype))


def add_sparse(x: jax.Array, sparse: SparseUpdate) -> jax.Array:
    """``x.ravel()[indices] += values``, returned with the shape of ``x`` (what a buffer does).

    Optax updates carry their sign (``optax.sgd`` returns ``-lr * g``), so applying a sparsified
    update to parameters is ``add_sparse(params_flat, sent)``.

    Args:
      x: the (flat) buffer.
      sparse: the entries to add; values are cast to ``x.dtype``.

    Returns:
      The updated array.
    """
    flat = x.reshape(-1).at[sparse.indices].add(sparse.values.astype(x.dtype))
    return flat.reshape(x.shape)


def _compress_flat(flat, k, method, key, scale, algorithm):
    if method == "topk":
        return top_k(flat, k, algorithm=algorithm)
    return rand_k(flat, k, key, scale, algorithm=algorithm)


def compress_tree(
    tree: PyTree,
    density: float,
    *,
    method: str = "topk",
    key: jax.Array | None = None,
    per_leaf: bool = False,
    scale: bool = False,
    algorithm: str = "auto",
) -> tuple[PyTree, SparseUpdate | PyTree]:
    """Top-k / rand-k selection over a pytree, per leaf or global.

    Args:
      tree: pytree of floating arrays.
      density: fraction of coordinates kept, in ``(0, 1]`` (``k`` from :func:`k_from_density`, on the
        total size for global selection, on each leaf's size with ``per_leaf=True``).
      method: ``"topk"`` or ``"randk"``.
      key: ``jax.random`` key, required for ``"randk"`` (leaves get ``jax.random.split`` keys).
      per_leaf: select within each leaf (per-layer top-k) instead of over the whole tree.
      scale: rand-k only: multiply kept entries by ``d / k``.
      algorithm: selection algorithm (see the module docstring).

    Returns:
      ``(dense, sparse)``: ``dense`` is a pytree like ``tree``; ``sparse`` is one
      :class:`SparseUpdate` indexing the ravelled tree (global) or a pytree like ``tree`` with a
      :class:`SparseUpdate` per leaf (``per_leaf=True``). For global selection over leaves of mixed
      dtypes the values have the promoted dtype used by ``ravel_pytree``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxasync._src import compression
      >>> tree = {"w": jnp.array([[1.0, -4.0], [0.5, 2.0]]), "b": jnp.array([3.0])}
      >>> dense, sparse = compression.compress_tree(tree, 0.4)
      >>> dense["w"].tolist(), dense["b"].tolist(), sparse.indices.tolist()
      ([[0.0, -4.0], [0.0, 0.0]], [3.0], [0, 2])
    """
    check_density(density)
    _check_algorithm(algorithm)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}.")
    if method == "randk" and key is None:
        raise ValueError("compress_tree: method='randk' needs a PRNG key.")
    if method == "topk" and scale:
        raise ValueError("compress_tree: scale=True only applies to method='randk'.")
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree, (
            tree if per_leaf else SparseUpdate(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32))
        )
    if per_leaf:
        keys = list(jax.random.split(key, len(leaves))) if method == "randk" else [None] * len(leaves)
        outs = [
            _compress_flat(leaf.reshape(-1), k_from_density(leaf.size, density), method, lk, scale, algorithm)
            for leaf, lk in zip(leaves, keys, strict=True)
        ]
        dense = [o[0].reshape(leaf.shape) for o, leaf in zip(outs, leaves, strict=True)]
        return treedef.unflatten(dense), treedef.unflatten([o[1] for o in outs])
    flat, unravel = jax.flatten_util.ravel_pytree(tree)
    dense_flat, sparse = _compress_flat(
        flat, k_from_density(flat.size, density), method, key, scale, algorithm
    )
    return unravel(dense_flat), sparse


def _leaf_offsets(template: PyTree) -> list[int]:
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(template)]
    return [int(o) for o in np.cumsum([0] + sizes[:-1])]


def flatten_sparse(sparse_tree: PyTree, template: PyTree) -> SparseUpdate:
    """Turns per-leaf sparse entries into one :class:`SparseUpdate` over the ravelled tree.

    Leaf-local indices are shifted by the leaf's offset in ``jax.flatten_util.ravel_pytree(template)``
    (leaves in ``jax.tree.leaves`` order); the result is ascending because every leaf's indices are.

    Args:
      sparse_tree: pytree like ``template`` with a :class:`SparseUpdate` at each leaf.
      template: the pytree (or a pytree of ``jax.ShapeDtypeStruct``) the entries belong to.

    Returns:
      One :class:`SparseUpdate`; values are promoted to a common dtype.
    """
    treedef = jax.tree.structure(template)
    parts = treedef.flatten_up_to(sparse_tree)
    offsets = _leaf_offsets(template)
    if not parts:
        return SparseUpdate(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32))
    dtype = jnp.result_type(*[p.values.dtype for p in parts])
    return SparseUpdate(
        jnp.concatenate([p.indices + jnp.int32(o) for p, o in zip(parts, offsets, strict=True)]),
        jnp.concatenate([p.values.astype(dtype) for p in parts]),
    )


def sparse_to_tree(sparse: SparseUpdate | PyTree, template: PyTree) -> PyTree:
    """The dense pytree of a global :class:`SparseUpdate` or of a per-leaf sparse tree.

    Args:
      sparse: one :class:`SparseUpdate` over the ravelled ``template`` (global form), or a pytree
        like ``template`` with a :class:`SparseUpdate` per leaf (for a single-array template the two
        coincide).
      template: pytree of arrays (or ``jax.ShapeDtypeStruct``) giving structure, shapes and dtypes.

    Returns:
      A pytree like ``template``, zero outside the entries, in the template's dtypes.
    """
    leaves, treedef = jax.tree.flatten(template)
    sizes = [int(np.size(leaf)) for leaf in leaves]
    if isinstance(sparse, SparseUpdate):
        flat = to_dense(sparse, sum(sizes))
        offsets = _leaf_offsets(template)
        dense = [flat[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    else:
        dense = [to_dense(p, n) for p, n in zip(treedef.flatten_up_to(sparse), sizes, strict=True)]
    return treedef.unflatten(
        [x.astype(leaf.dtype).reshape(np.shape(leaf)) for x, leaf in zip(dense, leaves, strict=True)]
    )


def ef_compress(
    residual: PyTree,
    update: PyTree,
    compressor: Callable[[PyTree], Any],
    *,
    has_aux: bool = False,
):
    """One error-feedback step.

    .. math::
      a = e + u, \\qquad \\mathrm{sent} = C(a), \\qquad e' = a - \\mathrm{sent}

    ``a`` is computed in the dtype of ``residual`` (``update`` is cast to it first), and
    ``e' = a - sent.astype(a.dtype)``; ``sent`` keeps the dtype the compressor returns (it may round
    to a lower precision; the rounding error then stays in ``e'``). For compressors that either copy
    or zero each entry (unscaled top-k / rand-k) ``sent + e' == e + u`` holds exactly, element-wise.

    Args:
      residual: the error accumulator ``e`` (array or pytree).
      update: the new update ``u`` (same structure and shapes as ``residual``).
      compressor: ``a -> sent`` (same structure as ``a``), or ``a -> (sent, aux)`` with
        ``has_aux=True`` (for example ``lambda a: compression.top_k(a, k)``, whose ``aux`` is the
        :class:`SparseUpdate`).
      has_aux: whether ``compressor`` returns ``(sent, aux)``.

    Returns:
      ``(sent, new_residual)``, or ``(sent, new_residual, aux)`` with ``has_aux=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxasync._src import compression
      >>> e = jnp.zeros(4)
      >>> sent, e, sp = compression.ef_compress(
      ...     e, jnp.array([1.0, -2.0, 0.5, 0.25]), lambda a: compression.top_k(a, 1), has_aux=True)
      >>> sent.tolist(), e.tolist()
      ([0.0, -2.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.25])

    References:
      Stich, Cordonnier & Jaggi, `Sparsified SGD with Memory
      <https://arxiv.org/abs/1809.07599>`_, 2018;
      Karimireddy et al., `Error Feedback Fixes SignSGD and other Gradient Compression Schemes
      <https://arxiv.org/abs/1901.09847>`_, 2019.
    """
    a = jax.tree.map(lambda e, u: e + jnp.asarray(u).astype(e.dtype), residual, update)
    out = compressor(a)
    sent, aux = out if has_aux else (out, None)
    new_residual = jax.tree.map(lambda a_, s: a_ - s.astype(a_.dtype), a, sent)
    if has_aux:
        return sent, new_residual, aux
    return sent, new_residual
