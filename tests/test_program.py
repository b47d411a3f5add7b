"""The node-program contract: outbox forms (per-slot and broadcast), their checks and equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src import program as program_lib
from jaxasync._src import simulator as simulator_lib
from jaxasync._src.algorithms import registry

N = 4


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(n):
        a = rng.normal(size=(16, 3)).astype(np.float32)
        shards.append({"a": a, "b": (a @ np.ones(3)).astype(np.float32)})
    loss = lambda x, d: 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)
    return ja.Problem(loss, jnp.zeros(3), shards, batch_size=4)


def _per_slot(program):
    """``program`` with every BroadcastOutbox expanded by its handlers (one payload per slot)."""

    def expand(emit):
        if emit is None:
            return emit
        return emit._replace(outbox={c: program_lib.expand_outbox(ob) for c, ob in emit.outbox.items()})

    def step(state, grad_fn, batch, key):
        state, emit = program.step(state, grad_fn, batch, key)
        return state, expand(emit)

    def wrap(receive):
        def receive_per_slot(state, msg):
            state, emit = receive(state, msg)
            return state, expand(emit)

        return receive_per_slot

    receive = {c: wrap(f) for c, f in program.receive.items()}
    return dataclasses.replace(program, step=step, receive=receive)


def _step_outboxes(program, problem):
    """The outbox types a program's step returns, by channel (traced, not run)."""
    state = jax.eval_shape(program.init, jnp.int32(0), problem.init_params, jax.random.key(0))
    batch = jax.eval_shape(lambda k: problem.sample(k, 0), jax.random.key(0))
    _, emit = jax.eval_shape(
        lambda s, b: program.step(s, problem.grad_fn, b, jax.random.key(0)), state, batch
    )
    return {c: type(ob) for c, ob in emit.outbox.items()}


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


def test_broadcast_outbox_masks_the_real_out_slots():
    graph = ja.topology.star(4)  # the centre has 3 out-neighbours, a leaf 1 (padded to 3)
    channel = ja.Channel(graph, jnp.zeros(2))
    leaf = int(np.flatnonzero(np.asarray(graph.out_degree) == 1)[0])
    ob = program_lib.broadcast_outbox(channel, jnp.int32(leaf), jnp.ones(2))
    assert isinstance(ob, ja.BroadcastOutbox) and ob.payload.shape == (2,)
    np.testing.assert_array_equal(ob.mask, np.asarray(graph.out_table)[leaf] >= 0)
    silent = program_lib.broadcast_outbox(channel, jnp.int32(leaf), jnp.ones(2), send=False)
    assert not bool(silent.mask.any())


ASYN = ja.Asynchrony(delay=ja.exponential(0.5), loss=0.1)


@pytest.mark.parametrize(
    "name", ["dasgd", "cluster_sgd", "rfast", "allreduce_sgd", "dpsgd", "adpsgd", "asgrad"]
)
def test_broadcast_and_per_slot_forms_give_identical_events_and_states(name):
    problem = _problem(N)
    program = registry.build(name, N, learning_rate=0.05)
    per_slot = _per_slot(program)
    # Not vacuous: the algorithm broadcasts, the wrapper does not.
    forms = _step_outboxes(program, problem)
    assert program_lib.BroadcastOutbox in forms.values(), forms
    assert set(_step_outboxes(per_slot, problem).values()) == {program_lib.Outbox}
    a = simulator_lib.record(program, problem, ASYN, steps=40, seed=2)
    b = simulator_lib.record(per_slot, problem, ASYN, steps=40, seed=2)
    assert np.any(a.events.kind > 0)  # messages were delivered
    jax.tree.map(np.testing.assert_array_equal, a.events, b.events)
    jax.tree.map(np.testing.assert_array_equal, a.node_params, b.node_params)
    jax.tree.map(np.testing.assert_array_equal, a.shared, b.shared)


@pytest.mark.parametrize("name", ["dasgd", "cluster_sgd"])
def test_broadcast_and_per_slot_forms_give_identical_traces(name):
    problem = _problem(N)
    program = registry.build(name, N, learning_rate=0.05)
    a = ja.simulate(program, problem, ASYN, steps=60, seed=1)
    b = ja.simulate(_per_slot(program), problem, ASYN, steps=60, seed=1)
    assert a["sent"][-1] > 0 and set(a.metrics) == set(b.metrics)
    for k in a.metrics:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_schedule_executor_gives_identical_traces_for_both_forms():
    problem = _problem(N)
    program = registry.build("rfast", N, learning_rate=0.05)  # a broadcast and a per-slot channel
    a = ja.simulate(program, problem, ASYN, steps=60, seed=1, executor="schedule")
    b = ja.simulate(_per_slot(program), problem, ASYN, steps=60, seed=1, executor="schedule")
    assert a["sent"][-1] > 0
    for k in a.metrics:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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
