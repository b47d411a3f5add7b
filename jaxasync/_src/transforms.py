# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Optax gradient transformations for asynchronous and communication-reduced SGD.

Contract:

* :func:`sparsify` is an ``optax.GradientTransformation``: top-k / rand-k sparsification of the
  updates, with error feedback by default. Its state is a :class:`SparsifyState` whose structure,
  shapes and dtypes never change between steps, with or without error feedback. With
  ``density=1.0`` it is the identity (bitwise), so it can be chained with any optimizer without
  changing that optimizer's trajectory.
* :func:`sparsify_update` is the same step as ``sparsify(...).update`` but also returns the
  :class:`~jaxasync._src.compression.SparseUpdate` form of what was sent, for node programs that
  apply it to a shared flat buffer (``BufferAddSparse``/``add_sparse``).
* :func:`scale_by_staleness` is an ``optax.GradientTransformationExtraArgs``: its ``update`` takes
  the staleness ``delay`` of the update (``update(updates, state, params=None, *, delay)``; inside
  :func:`optax.chain`, pass ``delay=`` to the chain's ``update`` and it is forwarded). With
  ``delay=0`` it is the identity (bitwise).
* Every update function is jit-able; none recompiles when only array values (including a traced
  ``delay``) change.
* ``update`` raises ``TypeError`` when the updates tree does not match the params in structure or
  leaf shapes: the params seen at ``init`` for :func:`sparsify` (its residual), the ``params``
  passed to ``update`` for :func:`scale_by_staleness` (whose state holds none). Structure and
  shapes are static, so the check costs nothing under jit. Factories raise ``ValueError`` for bad
  hyper-parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import compression

__all__ = [
    "SparsifyState",
    "sparsify",
    "sparsify_update",
    "ScaleByStalenessState",
    "scale_by_staleness",
]

PyTree = Any

_RULES = ("delay_adaptive", "inverse", "exponential", "none")


# ------------------------------------------------------------------------------------------------
# sparsify


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`.

    Attributes:
      residual: error-feedback memory ``e``, a pytree like the params (dtype ``residual_dtype`` or
        the params' dtypes). Stays zero without error feedback.
      key: base ``uint32[2]`` PRNG key; step ``t`` of rand-k uses ``jax.random.fold_in(key, t)``.
        Node programs may replace it (``state._replace(key=...)``) to give each node its own stream.
      count: int32 number of updates processed.
    """

    residual: optax.Updates
    key: jax.Array
    count: jax.Array


class _SparsifyConfig(NamedTuple):
    density: float
    method: str
    error_feedback: bool
    per_leaf: bool
    scale: bool
    algorithm: str


def _sparsify_config(density, method, error_feedback, per_leaf, scale, algorithm):
    compression.check_density(density)
    if method not in compression.METHODS:
        raise ValueError(f"sparsify: method must be one of {compression.METHODS}, got method={method!r}.")
    if scale and method != "randk":
        raise ValueError("sparsify: scale=True only applies to method='randk'.")
    if scale and error_feedback:
        raise ValueError(
            "sparsify: scale=True (unbiased rand-k, d/k times larger entries) is not a contraction, "
            "so error feedback can diverge with it; use scale=False with error_feedback=True, or "
            "error_feedback=False with scale=True."
        )
    if algorithm not in compression.ALGORITHMS:
        raise ValueError(
            f"sparsify: algorithm must be one of {compression.ALGORITHMS}, got algorithm={algorithm!r}."
        )
    return _SparsifyConfig(
        float(density), method, bool(error_feedback), bool(per_leaf), bool(scale), algorithm
    )


def _check_matches(updates: PyTree, params: PyTree, what: str, params_are: str = "seen at init") -> None:
    """Raises TypeError if ``updates`` differs from ``params`` in structure or leaf shapes.

    Both are static, so under jit this runs once, at trace time.
    """
    u_def, p_def = jax.tree.structure(updates), jax.tree.structure(params)
    if u_def != p_def:
        raise TypeError(
            f"{what}: the updates tree does not match the structure of the params {params_are}.\n"
            f"  updates: {u_def}\n  params:  {p_def}"
        )
    for (path, u), p in zip(jax.tree.leaves_with_path(updates), jax.tree.leaves(params), strict=True):
        if np.shape(u) != np.shape(p):
            raise TypeError(
                f"{what}: the updates leaf at {jax.tree_util.keystr(path)} has shape {np.shape(u)}, "
                f"but the params {params_are} have shape {np.shape(p)} there."
            )


def _sparsify_step(cfg: _SparsifyConfig, updates, state: SparsifyState):
    _check_matches(updates, state.residual, "sparsify")
    count = optax.safe_int32_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)

    if cfg.density == 1.0:
        # Identity, bitwise: every coordinate is sent, so the residual stays zero.
        if cfg.per_leaf:
            sparse = treedef.unflatten(
                [compression.SparseUpdate(jnp.arange(u.size, dtype=jnp.int32), u.reshape(-1)) for u in leaves]
            )
        else:
            flat, _ = jax.flatten_util.ravel_pytree(updates)
            sparse = compression.SparseUpdate(jnp.arange(flat.size, dtype=jnp.int32), flat)
        return updates, sparse, SparsifyState(state.residual, state.key, count)

    key = jax.random.fold_in(state.key, state.count)
    out_dtypes = treedef.unflatten([jnp.asarray(u).dtype for u in leaves])

    def compressor(a):
        dense, sparse = compression.compress_tree(
            a,
            cfg.density,
            method=cfg.method,
            key=key,
            per_leaf=cfg.per_leaf,
            scale=cfg.scale,
            algorithm=cfg.algorithm,
        )
        # The sent update has the dtype of the incoming updates (the residual may be wider).
        dense = jax.tree.map(lambda x, dt: x.astype(dt), dense, out_dtypes)
        if cfg.per_leaf:
            sparse = jax.tree.map(
                lambda s, dt: s._replace(values=s.values.astype(dt)),
                sparse,
                out_dtypes,
                is_leaf=lambda s: isinstance(s, compression.SparseUpdate),
            )
        else:
            dtype = jnp.result_type(*jax.tree.leaves(out_dtypes))
            sparse = sparse._replace(values=sparse.values.astype(dtype))
        return dense, sparse

    if cfg.error_feedback:
        sent, residual, sparse = compression.ef_compress(state.residual, updates, compressor, has_aux=True)
    else:
        sent, sparse = compressor(updates)
        residual = state.residual  # Stays zero; kept so the state structure is identical.
    return sent, sparse, SparsifyState(residual, state.key, count)


def sparsify(
    density: float,
    *,
    method: str = "topk",
    error_feedback: bool = True,
    per_leaf: bool = False,
    seed: int = 0,
    scale: bool = False,
    residual_dtype: Any | None = None,
    algorithm: str = "auto",
) -> optax.GradientTransformation:
    """Top-k / rand-k sparsification of the updates, with error feedback.

    With error feedback (EF-SGD, "sparsified SGD with memory"), each step sends the compressed sum
    of the new update and everything not sent before:

    .. math::
      a_t = e_t + u_t, \\qquad \\Delta_t = C(a_t), \\qquad e_{t+1} = a_t - \\Delta_t

    so that ``sum(sent) + residual == sum(updates)`` (exactly, per step, in the residual's dtype).
    Without error feedback, :math:`\\Delta_t = C(u_t)` and the remainder is discarded.
    :math:`C` keeps ``k = k_from_density(d, density)`` coordinates: those of largest magnitude
    (``"topk"``) or ``k`` uniformly random ones (``"randk"``); over the whole tree, or within each
    leaf with ``per_leaf=True``.

    **Chain order.** The EF-SGD rule compresses the scaled step :math:`e + \\eta g`, so put
    ``sparsify`` *after* the optimizer: ``optax.chain(optax.sgd(lr), sparsify(0.01))`` sends
    ``TopK(e - lr * g)`` (the sign is part of optax updates). Placed before it,
    ``optax.chain(sparsify(0.01), optax.sgd(lr))`` compresses raw gradients, which is the same for
    constant-step SGD but not for adaptive optimizers or schedules.

    ``density=1.0`` is the identity: the updates pass through untouched (bitwise) and the residual
    stays zero, so ``optax.chain(optax.sgd(lr), sparsify(1.0))`` reproduces ``optax.sgd(lr)``.

    Node programs that apply the sent update to a shared flat buffer use :func:`sparsify_update`
    (same step, also returns the sparse form).

    Args:
      density: fraction of coordinates sent, in ``(0, 1]``.
      method: ``"topk"`` (largest magnitudes) or ``"randk"`` (uniformly random coordinates).
      error_feedback: keep the unsent remainder and add it to the next update.
      per_leaf: select within each leaf (per-layer top-k) instead of over the whole tree.
      seed: seed of the rand-k PRNG key stored in the state.
      scale: rand-k only: multiply the sent entries by ``d / k`` (unbiased). Not allowed with error
        feedback (the scaled compressor is not a contraction).
      residual_dtype: dtype of the error-feedback memory; ``None`` uses the params' dtypes. A wider
        dtype (``jnp.float32`` for bfloat16 params) keeps the bits lost when rounding the sent update.
      algorithm: exact selection algorithm, ``"auto"``, ``"top_k"`` or ``"radix"``
        (see :mod:`jaxasync._src.compression`).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SparsifyState`.

    Raises:
      ValueError: density outside ``(0, 1]``, unknown method or algorithm, or ``scale=True`` with
        ``method="topk"`` or with error feedback.
      TypeError: (from ``update``) updates whose tree structure or leaf shapes differ from the
        params seen at ``init``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from jaxasync._src import transforms
      >>> params = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
      >>> opt = optax.chain(optax.sgd(0.1), transforms.sparsify(0.5))
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.array([4.0, -1.0, 2.0, 0.5])}
      >>> updates, state = opt.update(grads, state, params)
      >>> updates["w"].tolist()
      [-0.4000000059604645, 0.0, -0.20000000298023224, 0.0]
      >>> state[1].residual["w"].tolist()
      [0.0, 0.10000000149011612, 0.0, -0.05000000074505806]

    References:
      Stich, Cordonnier & Jaggi, `Sparsified SGD with Memory
      <https://arxiv.org/abs/1809.07599>`_, NeurIPS 2018;
      Alistarh et al., `The Convergence of Sparsified Gradient Methods
      <https://arxiv.org/abs/1809.10505>`_, NeurIPS 2018;
      Nadiradze et al., `Elastic Consistency: A Practical Consistency Model for Distributed
      Stochastic Gradient Descent <https://arxiv.org/abs/2001.05918>`_, AAAI 2021.
    """
    cfg = _sparsify_config(density, method, error_feedback, per_leaf, scale, algorithm)

    def init_fn(params):
        if residual_dtype is None:
            residual = jax.tree.map(jnp.zeros_like, params)
        else:
            residual = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), residual_dtype), params)
        return SparsifyState(residual=residual, key=jax.random.PRNGKey(seed), count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params  # Sparsification depends on the updates only.
        sent, _, state = _sparsify_step(cfg, updates, state)
        return sent, state

    return optax.GradientTransformation(init_fn, update_fn)


def sparsify_update(
    updates: optax.Updates,
    state: SparsifyState,
    *,
    density: float,
    method: str = "topk",
    error_feedback: bool = True,
    per_leaf: bool = False,
    scale: bool = False,
    algorithm: str = "auto",
) -> tuple[optax.Updates, compression.SparseUpdate | PyTree, SparsifyState]:
    """``sparsify(...).update`` that also returns the sparse form of the sent update.

    Pass the hyper-parameters the state's transform was built with (``seed`` and
    ``residual_dtype`` only matter at ``init``). The dense result and the new state are exactly those
    of ``sparsify(density, ...).update(updates, state)``.

    Args:
      updates: the updates (usually the output of the optimizer, e.g. ``-lr * g``).
      state: a :class:`SparsifyState` from ``sparsify(...).init(params)``.
      density: fraction of coordinates sent, in ``(0, 1]``.
      method: ``"topk"`` or ``"randk"``.
      error_feedback: keep and re-inject the unsent remainder.
      per_leaf: per-leaf selection.
      scale: rand-k only, without error feedback: scale entries by ``d / k``.
      algorithm: selection algorithm.

    Returns:
      ``(sent, sparse, new_state)``: ``sent`` is the dense pytree like ``updates``; ``sparse`` is one
      :class:`~jaxasync._src.compression.SparseUpdate` whose indices address
      ``jax.flatten_util.ravel_pytree(updates)[0]`` (global selection; what a shared flat buffer's
      ``add_sparse`` takes), or with ``per_leaf=True`` a pytree like ``updates`` of
      ``SparseUpdate`` with leaf-local indices (:func:`~jaxasync._src.compression.flatten_sparse`
      makes it global). ``k`` is fixed by the shapes and ``density``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxasync._src import transforms
      >>> tx = transforms.sparsify(0.25)
      >>> params = jnp.zeros(8)
      >>> state = tx.init(params)
      >>> sent, sparse, state = transforms.sparsify_update(
      ...     jnp.arange(8.0), state, density=0.25)
      >>> sparse.indices.tolist(), sparse.values.tolist()
      ([6, 7], [6.0, 7.0])
    """
    cfg = _sparsify_config(density, method, error_feedback, per_leaf, scale, algorithm)
    return _sparsify_step(cfg, updates, state)


# ------------------------------------------------------------------------------------------------
# scale_by_staleness


class ScaleByStalenessState(NamedTuple):
    """State of :func:`scale_by_staleness`.

    Attributes:
      count: int32 number of updates processed.
      max_delay: int32 largest (clamped) delay seen so far.
    """

    count: jax.Array
    max_delay: jax.Array


def _delay_adaptive_factor(tau, num_workers, smoothness=None, learning_rate=None):
    """Multiplicative step factor of the delay-adaptive rule (Mishchenko et al., 2022).

    The rule (as recalled, ALGORITHMS.md section 6) is the step size
    ``gamma_t = gamma if tau_t <= 2 n else min(gamma, 1 / (4 L tau_t))``. As a factor on an update
    already scaled by ``gamma``: ``1`` if ``tau <= 2 n``, else ``min(1, 1 / (4 L tau gamma))`` when
    ``L`` and ``gamma`` are known, else ``min(1, 2 n / tau)`` (a smoothness-free surrogate that is
    continuous at ``tau = 2 n`` and decays like ``1 / tau``).

    Args:
      tau: float32 delay (non-negative).
      num_workers: ``n``.
      smoothness: ``L`` or None.
      learning_rate: ``gamma`` or None (both or neither).

    Returns:
      float32 factor in ``(0, 1]``.
    """
    threshold = 2.0 * num_workers
    if smoothness is None:
        large = threshold / jnp.maximum(tau, 1.0)
    else:
        large = 1.0 / (4.0 * smoothness * learning_rate * jnp.maximum(tau, 1.0))
    return jnp.where(tau <= threshold, 1.0, jnp.minimum(1.0, large)).astype(jnp.float32)


def _check_delay(delay) -> jax.Array:
    """Validates ``delay`` and returns it as an int32 scalar (traced values are clamped at 0)."""
    if delay is None:
        raise TypeError(
            "scale_by_staleness: update() needs the staleness of the update, e.g. "
            "update(updates, state, params, delay=tau) (optax.chain forwards delay=)."
        )
    if isinstance(delay, bool) or isinstance(delay, np.bool_):
        raise TypeError("scale_by_staleness: delay must be an integer, got a bool.")
    if np.ndim(delay) != 0:
        raise ValueError(f"scale_by_staleness: delay must be a scalar, got shape {np.shape(delay)}.")
    dtype = delay.dtype if hasattr(delay, "dtype") else np.asarray(delay).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"scale_by_staleness: delay must be an integer, got dtype {dtype}.")
    if not isinstance(delay, jax.core.Tracer):
        if int(delay) < 0:
            raise ValueError(f"scale_by_staleness: delay must be >= 0, got delay={int(delay)}.")
    # Traced values cannot be checked here; negative ones are clamped to 0 (no scaling).
    return jnp.maximum(jnp.asarray(delay).astype(jnp.int32), 0)


def scale_by_staleness(
    rule: str = "delay_adaptive",
    *,
    num_workers: int | None = None,
    smoothness: float | None = None,
    learning_rate: float | None = None,
    decay: float | None = None,
    max_delay: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales each update by a factor that depends on its staleness ``delay``.

    An update computed at parameters read ``tau`` updates ago is multiplied by :math:`s(\\tau)`:

    ======================  ======================================================================
    ``rule``                :math:`s(\\tau)`
    ======================  ======================================================================
    ``"delay_adaptive"``    :math:`1` if :math:`\\tau \\le 2n`, else
                            :math:`\\min(1, 1/(4 L \\tau \\gamma))` given ``smoothness`` :math:`L`
                            and ``learning_rate`` :math:`\\gamma`, else :math:`\\min(1, 2n/\\tau)`
    ``"inverse"``           :math:`1 / (1 + \\tau)`
    ``"exponential"``       :math:`\\alpha^{\\tau}` with ``decay`` :math:`\\alpha \\in (0, 1]`
    ``"none"``              :math:`1` (only counts and tracks the largest delay)
    ======================  ======================================================================

    With ``max_delay`` set, updates with :math:`\\tau >` ``max_delay`` are dropped (set to zero).
    Every rule gives :math:`s(0) = 1` exactly, so with ``delay=0`` this is the identity (bitwise) and
    ``optax.chain(optax.sgd(lr), scale_by_staleness(...))`` reproduces ``optax.sgd(lr)``.

    The delay-adaptive rule turns the step size of Mishchenko et al. (2022),
    :math:`\\gamma_t = \\gamma` if :math:`\\tau_t \\le 2n` else :math:`\\min(\\gamma, 1/(4L\\tau_t))`
    (quoted from memory, see ALGORITHMS.md section 6), into a factor on updates already scaled by
    :math:`\\gamma`; without :math:`L` it uses the surrogate :math:`\\min(1, 2n/\\tau)`, which is
    continuous at :math:`\\tau = 2n` and decays like :math:`1/\\tau`. The inverse rule is the
    staleness-dependent learning rate of Zhang et al. (2016).

    ``delay`` must be a non-negative integer scalar: a concrete negative value raises ``ValueError``,
    a non-integer one ``TypeError``; a traced negative value cannot be detected and is clamped to 0.
    The factor is computed in float32 and applied in float32 before casting back to each leaf's
    dtype (one rounding for bfloat16).

    Args:
      rule: ``"delay_adaptive"``, ``"inverse"``, ``"exponential"`` or ``"none"``.
      num_workers: number of workers ``n`` (required by ``"delay_adaptive"``).
      smoothness: smoothness constant ``L`` (optional, ``"delay_adaptive"`` only, with
        ``learning_rate``).
      learning_rate: step size ``gamma`` of the optimizer this is chained with (with ``smoothness``).
      decay: ``alpha`` in ``(0, 1]`` (required by ``"exponential"``).
      max_delay: drop updates staler than this (``>= 0``); ``None`` keeps all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update is
      ``update(updates, state, params=None, *, delay)``; state :class:`ScaleByStalenessState`.

    Raises:
      ValueError: unknown rule, or missing / out-of-range hyper-parameters.
      TypeError: (from ``update``) updates whose tree structure or leaf shapes differ from the
        ``params`` passed with them, or a missing or non-integer ``delay``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from jaxasync._src import transforms
      >>> opt = optax.chain(optax.sgd(0.1), transforms.scale_by_staleness("inverse"))
      >>> params = jnp.array([1.0, 2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([1.0, 1.0]), state, params, delay=3)
      >>> updates.tolist()
      [-0.02500000037252903, -0.02500000037252903]

    References:
      Mishchenko, Bach, Even & Woodworth, `Asynchronous SGD Beats Minibatch SGD Under Arbitrary
      Delays <https://arxiv.org/abs/2206.07638>`_, NeurIPS 2022;
      Zhang, Gupta, Lian & Liu, `Staleness-Aware Async-SGD for Distributed Deep Learning
      <https://arxiv.org/abs/1511.05950>`_, IJCAI 2016.
    """
    if rule not in _RULES:
        raise ValueError(f"scale_by_staleness: rule must be one of {_RULES}, got rule={rule!r}.")
    if rule == "delay_adaptive":
        if (
            num_workers is None
            or isinstance(num_workers, bool)
            or int(num_workers) != num_workers
            or num_workers < 1
        ):
            raise ValueError(
                "scale_by_staleness: rule='delay_adaptive' needs num_workers, a positive int, got "
                f"num_workers={num_workers!r}."
            )
        if (smoothness is None) != (learning_rate is None):
            raise ValueError(
                "scale_by_staleness: pass both smoothness and learning_rate (the factor "
                "1 / (4 L tau gamma) needs both) or neither."
            )
        if smoothness is not None and not (smoothness > 0 and learning_rate > 0):
            raise ValueError(
                "scale_by_staleness: smoothness and learning_rate must be > 0, got "
                f"smoothness={smoothness!r}, learning_rate={learning_rate!r}."
            )
    elif num_workers is not None or smoothness is not None or learning_rate is not None:
        raise ValueError(
            f"scale_by_staleness: num_workers, smoothness and learning_rate only apply to "
            f"rule='delay_adaptive', not rule={rule!r}."
        )
    if rule == "exponential":
        if decay is None or not 0.0 < decay <= 1.0:
            raise ValueError(
                f"scale_by_staleness: rule='exponential' needs decay in (0, 1], got decay={decay!r}."
            )
    elif decay is not None:
        raise ValueError("scale_by_staleness: decay only applies to rule='exponential'.")
    if max_delay is not None and (
        isinstance(max_delay, bool) or int(max_delay) != max_delay or max_delay < 0
    ):
        raise ValueError(
            f"scale_by_staleness: max_delay must be a non-negative int, got max_delay={max_delay!r}."
        )

    def factor_fn(delay):
        tau = delay.astype(jnp.float32)
        if rule == "delay_adaptive":
            return _delay_adaptive_factor(tau, num_workers, smoothness, learning_rate)
        if rule == "inverse":
            return 1.0 / (1.0 + tau)
        if rule == "exponential":
            # exp(0 * log(alpha)) == 1 exactly, so delay 0 is the identity.
            return jnp.exp(tau * jnp.log(jnp.float32(decay)))
        return jnp.ones([], jnp.float32)

    def init_fn(params):
        del params  # The factor depends on the delay only.
        return ScaleByStalenessState(count=jnp.zeros([], jnp.int32), max_delay=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, delay=None, **extra_args):
        del extra_args  # Per-step values meant for other transforms of a chain.
        if params is not None:  # The factor ignores them, but a mismatch means a caller's bug.
            _check_matches(updates, params, "scale_by_staleness", "passed to update")
        delay = _check_delay(delay)
        factor = factor_fn(delay)

        def scale(u):
            # Low-precision leaves are scaled in float32 and rounded once.
            wide = jnp.promote_types(u.dtype, jnp.float32)
            scaled = (u.astype(wide) * factor.astype(wide)).astype(u.dtype)
            if max_delay is not None:
                scaled = jnp.where(delay > max_delay, jnp.zeros_like(scaled), scaled)
            return scaled

        updates = jax.tree.map(scale, updates)
        return updates, ScaleByStalenessState(
            count=optax.safe_int32_increment(state.count), max_delay=jnp.maximum(state.max_delay, delay)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
