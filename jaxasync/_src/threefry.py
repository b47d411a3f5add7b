"""JAX's Threefry-2x32 PRNG with its hash unrolled: the same bits, a fraction of the cost in event loops.

On CPU, JAX lowers the Threefry hash as a ``while`` loop of five rolled rounds (it keeps compile times
short for programs that hash a few big arrays). The simulator hashes a few *scalars* per event, some
fifteen times per event, so each of those loops costs more than the event's arithmetic. The unrolled
hash is twenty rounds of elementwise integer operations that XLA fuses into one kernel.

``KEY_IMPL`` reproduces ``jax.random``'s default ``threefry2x32`` implementation bit for bit (with
``jax_threefry_partitionable``, the default since JAX 0.5): a key made with ``jax.random.key(seed,
impl=KEY_IMPL)`` gives the same ``split``, ``fold_in`` and random bits as ``jax.random.key(seed)``.
``tests/test_threefry.py`` checks it against JAX.
"""

from __future__ import annotations

import math

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def hash2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds) of ``(x1, x2)`` under the key ``(k1, k2)``."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _counters(shape) -> tuple[jax.Array, jax.Array]:
    """The high and low words of a uint64 iota of ``shape`` (high words are 0 below 2^32 elements)."""
    size = math.prod(shape)
    if size >= 2**32:
        raise NotImplementedError(f"at most 2^32 - 1 random values per call, asked for shape {shape}")
    lo = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    return jnp.zeros_like(lo), lo


def _seed(seed: jax.Array) -> jax.Array:
    seed = jnp.asarray(seed)
    if seed.shape or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise TypeError(f"a PRNG seed must be an integer scalar, got {seed!r}")
    hi = (seed >> 32).astype(jnp.uint32) if seed.dtype.itemsize == 8 else jnp.uint32(0)
    return jnp.stack([hi, seed.astype(jnp.uint32)])


def _split(key: jax.Array, shape) -> jax.Array:
    b1, b2 = hash2x32(key[0], key[1], *_counters(tuple(shape)))
    return jnp.stack([b1, b2], axis=b1.ndim)


def _fold_in(key: jax.Array, data) -> jax.Array:
    b1, b2 = hash2x32(key[0], key[1], jnp.uint32(0), jnp.asarray(data).astype(jnp.uint32))
    return jnp.stack([b1, b2])


def _random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
    b1, b2 = hash2x32(key[0], key[1], *_counters(tuple(shape)))
    if bit_width == 64:
        return (b1.astype(jnp.uint64) << np.uint64(32)) | b2.astype(jnp.uint64)
    bits = b1 ^ b2
    return bits if bit_width == 32 else bits.astype(jnp.dtype(f"uint{bit_width}"))


KEY_IMPL = jax.extend.random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="threefry2x32_unrolled",
    tag="fry_u",
)
