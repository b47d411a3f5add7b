"""Tests for jaxasync._src.xla: how the executors compile handlers."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxasync._src import xla


def _handler(state, g):
    """A step whose new value is kept twice in the state and sent twice (a write and a message)."""
    y = state["x"] - 0.5 * g
    return {"x": y, "last": y, "t": state["t"] + 1}, {"write": y, "message": {"y": y, "t": state["t"]}}


def _state():
    return {"x": jnp.arange(6.0), "last": jnp.zeros(6), "t": jnp.int32(0)}


def test_a_value_returned_again_after_the_state_is_one_array():
    fn = xla.jit_unique_outputs(_handler, donate_argnums=0)
    state, emit = fn(_state(), jnp.ones(6))
    assert emit["write"] is emit["message"]["y"]
    assert any(emit["write"] is state[k] for k in ("x", "last"))
    assert emit["message"]["t"] is not state["t"]  # the old count: a different value
    # Inside the state every leaf keeps its own buffer: the state is donated to the next call.
    assert state["x"] is not state["last"]


def test_it_computes_what_jit_computes_across_donated_calls():
    fn = xla.jit_unique_outputs(_handler, donate_argnums=0)
    reference = jax.jit(_handler)
    state, expected = _state(), _state()
    for _ in range(3):
        state, emit = fn(state, jnp.ones(6))
        expected, emit_expected = reference(expected, jnp.ones(6))
        for a, b in zip(jax.tree.leaves((state, emit)), jax.tree.leaves((expected, emit_expected))):
            np.testing.assert_array_equal(a, b)
    assert int(state["t"]) == 3


def test_the_compiled_program_returns_each_value_once():
    lowered = xla.jit_unique_outputs(_handler).lower(_state(), jnp.ones(6))
    # state: x, last, t; rest: the old t (the sent and the written y are in the state).
    assert len(jax.tree.leaves(lowered.out_info)) == 4
    assert len(jax.tree.leaves(jax.jit(_handler).lower(_state(), jnp.ones(6)).out_info)) == 6
