"""Asynchrony specifications: how long jobs take, how late messages are, what is lost, who crashes.

An :class:`Asynchrony` is a description, not a process: executors turn it into draws. The simulator
draws every duration from a counter-based key (``fold_in(seed, event)``), so the same seed gives the
same schedule bit for bit; the real runtime turns the same spec into sleeps, dropped sends and kills.

Distributions take per-node (or per-edge) scales: a scalar applies to everybody, a sequence gives one
value per node, and for message delays an ``[n, n]`` matrix gives one value per edge, indexed
``[src, dst]``. ``stragglers`` multiplies the compute times of some nodes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_KINDS = ("fixed", "exponential", "abs_normal", "poisson", "uniform")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A non-negative duration distribution with per-node or per-edge scale.

    Example: delays of mean 0.1 everywhere except 2.0 on the edge from node 0 to node 1::

        scale = np.full((n, n), 0.1)
        scale[0, 1] = 2.0
        jaxasync.Asynchrony(delay=jaxasync.exponential(scale))

    Attributes:
      kind: one of ``fixed`` (always ``scale``), ``exponential`` (mean ``scale``), ``abs_normal``
        (``|N(scale, scale)| + 1``, AsGrad's "normal"), ``poisson`` (Poisson with mean ``scale``),
        ``uniform`` (``U(0, scale) + 1``, AsGrad's "uniform").
      scale: finite non-negative floats: a scalar (every node), a sequence ``[n]`` (one per node:
        for message delays, the sending node's), or a matrix ``[n, n]`` (message delays only: one
        per edge, ``scale[src, dst]``; entries of pairs that are not edges are never used). ``n``
        counts every node a program runs, servers included.
    """

    kind: str
    scale: float | Sequence[float] | Sequence[Sequence[float]]

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown distribution kind {self.kind!r}; expected one of {_KINDS}")
        try:
            s = np.asarray(self.scale, np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.kind}: scale must be a number, a sequence or a square matrix of numbers, "
                f"got {self.scale!r}"
            ) from None
        if s.ndim > 2 or (s.ndim == 2 and s.shape[0] != s.shape[1]):
            raise ValueError(
                f"{self.kind}: scale must be a scalar, a per-node sequence [n] or a per-edge matrix "
                f"[n, n], got shape {s.shape}"
            )
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f"{self.kind}: scales must be finite and non-negative, got {self.scale}")

    @property
    def per_edge(self) -> bool:
        """Whether the scale is a per-edge ``[n, n]`` matrix."""
        return np.ndim(self.scale) == 2

    def scales(self, n: int) -> np.ndarray:
        """Per-node scales as float32 ``[n]``.

        Raises:
          ValueError: a sequence of the wrong length, or per-edge scales (see :meth:`edge_scales`).
        """
        s = np.asarray(self.scale, np.float32)
        if s.ndim == 0:
            return np.full((n,), s, np.float32)
        if s.ndim == 2:
            raise ValueError(f"{self.kind}: per-edge scales {s.shape} where one scale per node is expected")
        if s.shape[0] != n:
            raise ValueError(f"{self.kind}: {s.shape[0]} scales given for {n} nodes")
        return s

    def edge_scales(self, n: int) -> np.ndarray:
        """Per-edge scales as float32 ``[n, n]`` indexed ``[src, dst]`` (a per-node sequence gives
        every edge its sender's scale).

        Raises:
          ValueError: a sequence or matrix that does not fit ``n`` nodes.
        """
        s = np.asarray(self.scale, np.float32)
        if s.ndim < 2:
            return np.ascontiguousarray(np.broadcast_to(self.scales(n)[:, None], (n, n)))
        if s.shape != (n, n):
            raise ValueError(
                f"{self.kind}: per-edge scales of shape {s.shape} given for {n} nodes (expected {(n, n)})"
            )
        return s

    def mean(self, n: int) -> np.ndarray:
        """The mean of every node's (``[n]``) or, for per-edge scales, every edge's (``[n, n]``) draws."""
        s = (self.edge_scales(n) if self.per_edge else self.scales(n)).astype(np.float64)
        if self.kind == "abs_normal":  # E|N(s, s)| = s (sqrt(2/pi) e^{-1/2} + 1 - 2 Phi(-1))
            folded = s * (math.sqrt(2 / math.pi) * math.exp(-0.5) + 1 - 2 * 0.15865525393145707)
            return folded + 1
        if self.kind == "uniform":
            return s / 2 + 1
        return s


def fixed(scale):
    """Always ``scale``."""
    return Distribution("fixed", scale)


def exponential(mean):
    """Exponential with the given mean."""
    return Distribution("exponential", mean)


def abs_normal(scale):
    """``|N(scale, scale)| + 1`` (the "normal" delays of the AsGrad code)."""
    return Distribution("abs_normal", scale)


def poisson(mean):
    """Poisson with the given mean (integer durations)."""
    return Distribution("poisson", mean)


def uniform(scale):
    """``U(0, scale) + 1``."""
    return Distribution("uniform", scale)


def sample(kind: str, key: jax.Array, scale: jax.Array) -> jax.Array:
    """One float32 draw of ``kind`` with the given (traced) scale."""
    if kind == "fixed":
        return scale
    if kind == "exponential":
        return scale * jax.random.exponential(key, dtype=jnp.float32)
    if kind == "abs_normal":
        return jnp.abs(scale + scale * jax.random.normal(key, dtype=jnp.float32)) + 1.0
    if kind == "poisson":  # jax.random.poisson takes only JAX's own threefry keys: the same bits, rewrapped
        key = jax.random.wrap_key_data(jax.random.key_data(key))
        return jax.random.poisson(key, scale).astype(jnp.float32)
    if kind == "uniform":
        return scale * jax.random.uniform(key, dtype=jnp.float32) + 1.0
    raise ValueError(f"unknown distribution kind {kind!r}")


def _as_distribution(x, what: str) -> Distribution:
    if isinstance(x, Distribution):
        return x
    if isinstance(x, int | float) or isinstance(x, Sequence | np.ndarray):
        return fixed(x)
    raise TypeError(f"{what}: expected a Distribution or a number, got {type(x).__name__}")


@dataclasses.dataclass(frozen=True)
class Asynchrony:
    """How asynchronous the world is.

    Attributes:
      compute_time: duration of one local job per node (Distribution or number; default ``Exp(1)``);
        its scale is a scalar or one value per node.
      delay: message delay (Distribution or number; default 0: instant delivery). Its scale is a
        scalar, one value per sending node ``[n]``, or one value per edge ``[n, n]`` indexed
        ``[src, dst]`` (a nested sequence or array is a fixed delay per edge). Only the simulator
        delays messages; the real runtimes ignore ``delay``.
      loss: probability that a message is lost, in [0, 1).
      crashes: ``{node: time}``; the node stops at that (simulated or wall-clock) time.
      stragglers: ``{node: factor}``; the node's compute times are multiplied by ``factor``.
    """

    compute_time: Distribution | float = dataclasses.field(default_factory=lambda: exponential(1.0))
    delay: Distribution | float = 0.0
    loss: float = 0.0
    crashes: Mapping[int, float] | None = None
    stragglers: Mapping[int, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "compute_time", _as_distribution(self.compute_time, "compute_time"))
        object.__setattr__(self, "delay", _as_distribution(self.delay, "delay"))
        if self.compute_time.per_edge:
            raise ValueError(
                "compute_time: scales are per node (a scalar or a sequence), got a matrix of shape "
                f"{np.shape(self.compute_time.scale)}; per-edge scales apply to delay only"
            )
        if not 0.0 <= float(self.loss) < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        for what, mapping in (("crashes", self.crashes), ("stragglers", self.stragglers)):
            for node, value in (mapping or {}).items():
                # bool is an int subclass: {True: 1.0} would silently name node 1
                if isinstance(node, bool) or not isinstance(node, int | np.integer) or node < 0:
                    raise ValueError(f"{what}: node ids must be non-negative integers, got {node!r}")
                if not np.isfinite(value) or value < 0:
                    raise ValueError(f"{what}: node {node} has invalid value {value}")
        for node, factor in (self.stragglers or {}).items():
            if factor <= 0:
                raise ValueError(f"stragglers: factor of node {node} must be positive, got {factor}")

    def check_nodes(self, n: int) -> None:
        """Raises ValueError if the spec names a node outside ``range(n)`` or has scales that do not
        fit ``n`` nodes (a sequence of another length, a per-edge matrix not ``[n, n]``)."""
        for what, mapping in (("crashes", self.crashes), ("stragglers", self.stragglers)):
            bad = sorted(k for k in (mapping or {}) if k >= n)
            if bad:
                raise ValueError(f"{what}: unknown node id(s) {bad} (there are {n} nodes)")
        self.compute_time.scales(n)
        self.delay.edge_scales(n)

    def straggler_factors(self, n: int) -> np.ndarray:
        f = np.ones((n,), np.float32)
        for node, factor in (self.stragglers or {}).items():
            f[node] = factor
        return f

    def crash_times(self, n: int) -> np.ndarray:
        t = np.full((n,), np.inf, np.float32)
        for node, time in (self.crashes or {}).items():
            t[node] = time
        return t
