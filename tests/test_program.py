"""The node-program contract: outbox forms (per-slot and broadcast), and their checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src import program as program_lib

N = 4


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(n):
        a = rng.normal(size=(16, 3)).astype(np.float32)
        shards.append({"a": a, "b": (a @ np.ones(3)).astype(np.float32)})
    loss = lambda x, d: 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)
    return ja.Problem(loss, jnp.zeros(3), shards, batch_size=4)


# -------------------------------------------------------------------------------- the two forms


def test_expand_outbox_repeats_the_payload_per_slot():
    payload = {"w": jnp.arange(3.0), "t": jnp.int32(7)}
    mask = jnp.array([True, False, True])
    ob = program_lib.expand_outbox(program_lib.BroadcastOutbox(payload, mask))
    assert isinstance(ob, program_lib.Outbox)
    np.testing.assert_array_equal(ob.payload["w"], np.tile(np.arange(3.0), (3, 1)))
    np.testing.assert_array_equal(ob.payload["t"], [7, 7, 7])
    np.testing.assert_array_equal(ob.mask, mask)
    per_slot = program_lib.Outbox({"w": jnp.zeros((3, 3)), "t": jnp.zeros(3, jnp.int32)}, mask)
    assert program_lib.expand_outbox(per_slot) is per_slot
    # Under vmap (the schedule executor expands every node's outbox at once).
    stacked = jax.vmap(program_lib.expand_outbox)(
        program_lib.BroadcastOutbox(jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 4), bool))
    )
    assert stacked.payload.shape == (2, 4, 3)
    np.testing.assert_array_equal(stacked.payload[1, 2], [3.0, 4.0, 5.0])


# -------------------------------------------------------------------------------- bad outboxes

_TEMPLATE = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "t": jax.ShapeDtypeStruct((), jnp.int32)}
_ONE = {"w": jnp.zeros(3), "t": jnp.int32(0)}
_TWO = {"w": jnp.zeros((2, 3)), "t": jnp.zeros(2, jnp.int32)}
_MASK = jnp.ones(2, bool)


@pytest.mark.parametrize(
    "outbox, match",
    [  # (dict leaves in key order: "t" before "w")
        (
            program_lib.BroadcastOutbox(_TWO, _MASK),
            r"leaf \['t'\] has shape \(2,\), expected \(\).*that is an Outbox",
        ),
        (
            program_lib.Outbox(_ONE, _MASK),
            r"leaf \['t'\] has shape \(\), expected \(2,\).*that is a BroadcastOutbox",
        ),
        (
            program_lib.Outbox({"w": jnp.zeros((2, 4)), "t": _TWO["t"]}, _MASK),
            r"leaf \['w'\] has shape \(2, 4\), expected \(2, 3\)",
        ),
        (program_lib.BroadcastOutbox(_ONE, jnp.ones(3, bool)), r"mask must be bool \[2\].*got bool \[3\]"),
        (program_lib.BroadcastOutbox(_ONE, jnp.ones(2, jnp.int32)), r"mask must be bool \[2\].*got int32"),
        (program_lib.BroadcastOutbox({"w": jnp.zeros(3)}, _MASK), "payload structure"),
        ((_TWO, _MASK), "expected an Outbox or a BroadcastOutbox, got tuple"),
    ],
)
def test_check_outbox_names_the_problem(outbox, match):
    with pytest.raises(TypeError, match="^prog: outbox on channel 'c': .*" + match):
        program_lib.check_outbox(outbox, _TEMPLATE, 2, "prog: outbox on channel 'c'")
    program_lib.check_outbox(program_lib.BroadcastOutbox(_ONE, _MASK), _TEMPLATE, 2, "ok")
    program_lib.check_outbox(program_lib.Outbox(_TWO, _MASK), _TEMPLATE, 2, "ok")


def _sender(make_outbox, cname="x"):
    graph = ja.topology.ring(N)
    channel = ja.Channel(graph, jnp.zeros(3))

    def step(state, grad_fn, batch, key):
        del grad_fn, batch, key  # sends its params, unchanged
        return state, ja.Emit(outbox={cname: make_outbox(channel, state)})

    return ja.NodeProgram(
        "sender",
        lambda node, params, key: params,
        step,
        lambda s: s,
        channels={"x": channel},
        receive={"x": lambda s, msg: (s, ja.Emit())},
    )


@pytest.mark.parametrize("executor", ["events", "schedule"])
def test_executors_reject_bad_outboxes_clearly(executor):
    per_slot_as_broadcast = _sender(lambda ch, s: ja.BroadcastOutbox(jnp.stack([s, s]), jnp.ones(2, bool)))
    with pytest.raises(TypeError, match=r"sender: outbox on channel 'x': BroadcastOutbox payload leaf"):
        ja.simulate(per_slot_as_broadcast, _problem(N), steps=8, executor=executor)
    unstacked = _sender(lambda ch, s: ja.Outbox(s, jnp.ones(2, bool)))
    with pytest.raises(TypeError, match=r"that is a BroadcastOutbox"):
        ja.simulate(unstacked, _problem(N), steps=8, executor=executor)
    undeclared = _sender(lambda ch, s: ja.BroadcastOutbox(s, jnp.ones(2, bool)), cname="y")
    with pytest.raises(ValueError, match=r"sender: outbox on undeclared channel\(s\) \['y'\]"):
        ja.simulate(undeclared, _problem(N), steps=8, executor=executor)
    good = _sender(lambda ch, s: ja.BroadcastOutbox(s, jnp.ones(2, bool)))  # ring: 2 out-slots each
    assert ja.simulate(good, _problem(N), steps=8, executor=executor)["sent"][-1] > 0
