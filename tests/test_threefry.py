"""The simulator's unrolled Threefry keys give JAX's default bits exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxasync._src.threefry import KEY_IMPL

DRAWS = {
    "split": lambda k: jax.random.key_data(jax.random.split(k, 5)),
    "split_2d": lambda k: jax.random.key_data(jax.random.split(k, (2, 3))),
    "fold_in": lambda k: jax.random.key_data(jax.random.fold_in(k, 123)),
    "bits32": lambda k: jax.random.bits(k, (7,)),
    "bits8": lambda k: jax.random.bits(k, (3, 4), jnp.uint8),
    "normal": lambda k: jax.random.normal(k, (5,)),
    "randint": lambda k: jax.random.randint(k, (8,), 0, 64),
    "exponential": lambda k: jax.random.exponential(k, (3,)),
    "bernoulli": lambda k: jax.random.bernoulli(k, 0.3, (9,)),
    "permutation": lambda k: jax.random.permutation(k, 16),
    "uniform_scalar": lambda k: jax.random.uniform(k, ()),
    "nested_jit": jax.jit(lambda k: jax.random.normal(jax.random.fold_in(jax.random.split(k, 3)[1], 9))),
    "vmapped": lambda k: jax.vmap(lambda s: jax.random.uniform(s, (2,)))(jax.random.split(k, 4)),
}


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, -1])
@pytest.mark.parametrize("draw", sorted(DRAWS))
def test_same_bits_as_jax(seed, draw):
    if not jax.config.jax_threefry_partitionable:
        pytest.skip("KEY_IMPL reproduces the partitionable Threefry layout (JAX's default)")
    ours, theirs = jax.random.key(seed, impl=KEY_IMPL), jax.random.key(seed)
    np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(theirs))
    np.testing.assert_array_equal(np.asarray(DRAWS[draw](ours)), np.asarray(DRAWS[draw](theirs)))


def test_no_rolled_loop_in_the_hash():
    fn = jax.jit(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)))
    assert "while" not in fn.lower(jax.random.key(0, impl=KEY_IMPL)).compile().as_text()
