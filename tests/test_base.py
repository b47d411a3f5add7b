"""Shared algorithm helpers: factory checks, and a user gradient that does not match the model."""

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxasync._src.algorithms import base, registry

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
BATCH = jnp.zeros((4, 3))


@pytest.mark.parametrize("name", sorted(registry.BUILDERS))
def test_a_gradient_tree_that_does_not_match_the_params_is_a_type_error(name):
    program = registry.build(name, 4, learning_rate=0.1)
    state = program.init(jnp.int32(0), PARAMS, jax.random.key(0))
    wrong = lambda params, batch: {"w": jnp.zeros((3, 2))}  # "b" is missing
    with pytest.raises(TypeError, match=r"grad_fn\(params, batch\)"):
        jax.eval_shape(lambda s: program.step(s, wrong, BATCH, jax.random.key(1)), state)


def test_a_gradient_of_the_wrong_shape_is_a_type_error():
    wrong = lambda params, batch: {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}
    with pytest.raises(TypeError, match=r"leaf shape \(2, 3\)"):
        base.gradient(wrong, PARAMS, BATCH)


def test_gradient_is_cast_to_the_params_dtypes():
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    g = base.gradient(lambda p, b: {"w": jnp.ones(3, jnp.float32)}, params, None)
    assert g["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(learning_rate=None, optimizer=None), ValueError, "exactly one"),
        (dict(learning_rate=0.1, optimizer=optax.sgd(0.1)), ValueError, "exactly one"),
        (dict(learning_rate=-1.0, optimizer=None), ValueError, "positive"),
        (dict(learning_rate=None, optimizer="adam"), TypeError, "GradientTransformation"),
    ],
)
def test_local_optimizer_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        base.local_optimizer("algo", **kwargs)


def test_positive_int_and_graph_checks():
    assert base.positive_int("algo", "n", 3) == 3
    with pytest.raises(ValueError, match="n"):
        base.positive_int("algo", "n", 0)
    with pytest.raises(TypeError, match="algo: graph"):
        base.check_graph("algo", [[0, 1], [1, 0]])
