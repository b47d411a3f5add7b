"""Node programs: the contract between algorithms and executors.

An asynchronous algorithm is written once, as a :class:`NodeProgram`: a handful of pure, jit-able event
handlers on the state of one node. Executors (the simulator, the local multi-process runtime, MPI) decide
*when* each handler runs, deliver, delay or lose messages, and implement shared objects; they never look
inside an algorithm.

The events of node ``i``:

``init(node, params, key) -> state``
  Called once per node. ``node`` is an int32 scalar (it may be traced, so the same function serves every
  node under ``vmap``); ``params`` is the initial model pytree.

``step(state, grad_fn, batch, key) -> (state, Emit)``
  A local job completes: the node computes a stochastic gradient with the user's ``grad_fn(params,
  batch)`` (any model) on a ``batch`` of its own data and updates its state. It may send messages and
  apply operations to shared objects (both in the returned :class:`Emit`). An executor only calls ``step``
  when ``ready(state)`` is true.

``observe(state, views) -> state``
  Called right after the executor has applied the operations of a ``step`` (and once after ``init``):
  ``views`` maps each declared shared object to what the node reads from it now. A Hogwild worker keeps
  the view in its state and computes its next gradient on it, so staleness is the same thing in the
  simulator and in real processes.

``receive[channel](state, Message) -> (state, Emit)``
  One message arrived on ``channel``. Messages may be late, reordered or the survivors of lost ones; every
  message carries the sender's sequence number on that channel (monotone per edge), so receivers can keep
  the newest.

``ready(state) -> bool``
  Whether the node has local work (a server never computes; an AsGrad worker with an empty job queue is
  idle). When a node becomes ready, the executor starts its next job.

``params(state) -> params``
  The model the node would report.

Communication is declared, not performed. A :class:`Channel` is a graph plus a payload template; a
handler's :class:`Outbox` holds one payload per out-edge slot of the sending node (padded to the graph's
maximum out-degree, in the order of ``graph.out_table``) and a send mask. A handler that sends the same
payload on every slot it sends on returns a :class:`BroadcastOutbox` instead (one payload and the mask,
see :func:`broadcast_outbox`): it means the per-slot outbox :func:`expand_outbox` makes of it, but the
handler writes the payload once, and executors expand it only where they keep a copy per message.
Executors check every outbox against its channel (:func:`check_outbox`). Shared objects are declared
as :class:`Buffer` (one parameter pytree, Hogwild-style) or :class:`Registers` (each node owns ``slots``
single-writer tagged registers) and are changed only through the operations a handler returns
(:class:`BufferAdd`, :class:`BufferAddSparse`, :class:`RegisterWrite`).

Every handler must return pytrees of the same structure, shapes and dtypes on every call: executors
compile them once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

PyTree = Any
State = Any


class Message(NamedTuple):
    """One delivered message, as a receive handler sees it.

    Attributes:
      slot: int32 scalar, the sender's index in the receiver's ``in_table`` row of the channel graph.
      seq: int32 scalar, the sender's sequence number on this channel (starts at 0, +1 per send event).
      payload: the pytree that was sent (same structure as the channel's payload template).
    """

    slot: jax.Array
    seq: jax.Array
    payload: PyTree


class Outbox(NamedTuple):
    """Messages a handler sends on one channel: one payload per out-edge slot and a send mask.

    Attributes:
      payload: pytree like the channel's payload template whose leaves have an extra leading axis of
        size ``graph.max_out_degree`` (1 if the graph has no edges): row ``k`` goes to out-slot ``k``.
      mask: bool ``[max_out_degree]``, True where a message is sent (padding slots must be False).
    """

    payload: PyTree
    mask: jax.Array


class BroadcastOutbox(NamedTuple):
    """Messages a handler sends on one channel: the same payload on every out-edge slot of the mask.

    It means the :class:`Outbox` whose payload is ``payload`` repeated on every slot
    (:func:`expand_outbox`): receivers cannot tell the two apart. But the handler writes the payload
    once, not once per slot, so a model-sized update to ``m`` neighbours costs one model-sized write
    in the step. Executors expand it only where they store a copy per message (the simulator's
    in-flight pool); a runtime encodes it once and sends the same bytes on every slot of the mask.
    (A separate type rather than a flag on :class:`Outbox`: the form is part of the pytree
    structure, so it stays static under ``jit``, ``vmap`` and ``scan``.)

    Attributes:
      payload: pytree like the channel's payload template (no slot axis).
      mask: bool ``[max_out_degree]`` (1 if the graph has no edges), True on the out-slots the payload
        is sent on (padding slots must be False).
    """

    payload: PyTree
    mask: jax.Array


class BufferAdd(NamedTuple):
    """``buffer += delta`` on a :class:`Buffer` (delta is a pytree like the buffer's template)."""

    delta: PyTree


class BufferAddSparse(NamedTuple):
    """``flat_buffer[indices] += values`` on a :class:`Buffer` (indices into the ravelled pytree)."""

    indices: jax.Array
    values: jax.Array


class RegisterWrite(NamedTuple):
    """Writes ``(tag, value)`` into the node's own register ``slot`` if ``mask`` is true."""

    slot: jax.Array
    tag: jax.Array
    value: PyTree
    mask: jax.Array


class RegistersView(NamedTuple):
    """What a node reads from a :class:`Registers` object: every owner's slots.

    Attributes:
      tags: int32 ``[num_nodes, slots]``; -1 where nothing was written yet (or the register is not
        visible to the reader, e.g. it belongs to another cluster: its values then read as zeros).
      values: pytree with leaves ``[num_nodes, slots, ...]``.
    """

    tags: jax.Array
    values: PyTree


@dataclasses.dataclass(frozen=True)
class Channel:
    """A message kind: who may send to whom, and what one message holds.

    Attributes:
      graph: a :class:`jaxasync.topology.Graph`; an edge ``i -> j`` lets ``i`` send to ``j``.
      payload: pytree of arrays or ``jax.ShapeDtypeStruct`` describing one message, or a function of
        the model's parameters returning one (such as :func:`like_params`), so a factory need not
        know the model: executors call :func:`resolve` with the initial parameters.
      newest_only: the receiver needs only the newest message of each edge: receiving any of an
        edge's messages, in any order, leaves the state as receiving the newest of them alone, and
        edges do not interact (true of :func:`jaxasync.mixing.keep_newest` slots and running sums,
        false of increments). A real executor may then skip a waiting message when a newer one from
        the same sender is waiting too, so a slow node flooded by fast neighbours handles one
        message per edge, not all; the schedule-first simulator hands a job only the newest message
        of each in-edge (it then needs every step to send on every out-edge of the channel).
    """

    graph: Any
    payload: PyTree = None
    newest_only: bool = False


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A shared parameter pytree every node reads and adds to (Hogwild).

    Attributes:
      template: pytree of arrays giving structure, shapes and initial values; None means "the
        model's parameters", initialised by the executor to the problem's initial parameters.
    """

    template: PyTree = None


@dataclasses.dataclass(frozen=True)
class Registers:
    """Single-writer multi-reader registers: node ``i`` owns ``slots`` tagged registers.

    Attributes:
      template: pytree of arrays: the value of one register (or a function of the model's
        parameters returning one, as for :class:`Channel` payloads).
      slots: registers per owner (a ring indexed by ``tag % slots``).
      visible: optional bool ``[n, n]``; ``visible[i, j]`` says whether ``i`` can read ``j``'s registers
        (cluster-mates). None means everybody sees everybody.
    """

    template: PyTree
    slots: int = 1
    visible: Any = None


class Emit(NamedTuple):
    """What a handler sends: outboxes by channel name and operations by shared-object name.

    Channels or shared objects a handler does not use may be left out; executors fill the gap with an
    empty outbox / no operation.
    """

    outbox: Mapping[str, Outbox] = {}
    ops: Mapping[str, Any] = {}


def always_ready(state: State) -> jax.Array:
    """The default ``ready``: the node always has local work (executors may rely on this identity)."""
    del state  # every node of most algorithms always has local work
    return jnp.asarray(True)


def no_observe(state: State, views: Mapping[str, Any]) -> State:
    """The default ``observe``: reads nothing (executors skip it when they see this identity)."""
    del views  # programs without shared objects read nothing
    return state


@dataclasses.dataclass(frozen=True)
class NodeProgram:
    """An asynchronous algorithm as pure per-node event handlers (see the module docstring).

    Attributes:
      name: short algorithm name, used in traces and tables.
      init: ``(node, params, key) -> state``.
      step: ``(state, grad_fn, batch, key) -> (state, Emit)``.
      params: ``state -> params``.
      channels: message kinds by name.
      receive: a handler ``(state, Message) -> (state, Emit)`` per channel name.
      shared: shared objects by name.
      observe: ``(state, views) -> state``, called after a step's operations are applied.
      ready: ``state -> bool``, whether the node has local work.
      evaluate: optional ``(stacked_states, shared_views) -> params``: the model an observer evaluates
        (the server's, the shared buffer's). Default: the average of the live nodes' ``params``.
      metrics: optional ``stacked_states -> {name: scalar}``, algorithm-specific metrics (for example
        the staleness a server measured).
      num_nodes: the number of nodes the program is built for, or None if it adapts to the executor's.
      num_servers: nodes without data (parameter servers) after the data nodes: executors run
        ``problem.num_nodes + num_servers`` nodes, and server nodes must never be ``ready``.
      needs_shared_memory: True if the program cannot run without shared objects between its nodes.
      crash_tolerant: True if the algorithm keeps working when nodes crash (documented fault model).
    """

    name: str
    init: Callable[[jax.Array, PyTree, jax.Array], State]
    step: Callable[..., tuple[State, Emit]]
    params: Callable[[State], PyTree]
    channels: Mapping[str, Channel] = dataclasses.field(default_factory=dict)
    receive: Mapping[str, Callable[[State, Message], tuple[State, Emit]]] = dataclasses.field(
        default_factory=dict
    )
    shared: Mapping[str, Buffer | Registers] = dataclasses.field(default_factory=dict)
    observe: Callable[[State, Mapping[str, Any]], State] = no_observe
    ready: Callable[[State], jax.Array] = always_ready
    evaluate: Callable[[State, Mapping[str, Any]], PyTree] | None = None
    metrics: Callable[[State], Mapping[str, jax.Array]] | None = None
    num_nodes: int | None = None
    num_servers: int = 0
    needs_shared_memory: bool = False
    crash_tolerant: bool = False

    def __post_init__(self):
        missing = set(self.channels) - set(self.receive)
        if missing:
            raise ValueError(f"{self.name}: no receive handler for channel(s) {sorted(missing)}")
        extra = set(self.receive) - set(self.channels)
        if extra:
            raise ValueError(f"{self.name}: receive handler(s) for undeclared channel(s) {sorted(extra)}")
        for cname, ch in self.channels.items():
            if self.num_nodes is not None and ch.graph.n != self.num_nodes:
                raise ValueError(
                    f"{self.name}: channel {cname!r} has {ch.graph.n} nodes, program has {self.num_nodes}"
                )

    def check_nodes(self, n: int) -> None:
        """Raises ValueError if the program cannot run on ``n`` nodes (executors call this first)."""
        if self.num_nodes is not None and self.num_nodes != n:
            raise ValueError(f"{self.name} is built for {self.num_nodes} nodes but {n} were given")
        for cname, ch in self.channels.items():
            if ch.graph.n != n:
                raise ValueError(
                    f"{self.name}: channel {cname!r} is built for {ch.graph.n} nodes but {n} were given"
                )
        for name, spec in self.shared.items():
            visible = getattr(spec, "visible", None)
            if visible is not None and tuple(visible.shape) != (n, n):
                raise ValueError(
                    f"{self.name}: registers {name!r} have visibility for "
                    f"{visible.shape[0]} nodes but {n} were given"
                )


def like_params(params: PyTree) -> PyTree:
    """The template of a model-shaped payload or register: ``ShapeDtypeStruct`` per parameter leaf."""
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params)


def resolve(template: PyTree | Callable[[PyTree], PyTree], params: PyTree) -> PyTree:
    """A channel payload or register template, with callables applied to the model's ``params``."""
    return template(params) if callable(template) else template


def empty_outbox(channel: Channel) -> Outbox:
    """An outbox that sends nothing on ``channel`` (zeros, mask all False; needs a resolved payload)."""
    m = max(channel.graph.max_out_degree, 1)
    payload = jax.tree.map(lambda t: jnp.zeros((m, *t.shape), t.dtype), channel.payload)
    return Outbox(payload, jnp.zeros((m,), bool))


def broadcast_outbox(channel: Channel, node: jax.Array, payload: PyTree, send=True) -> BroadcastOutbox:
    """The same ``payload`` to every out-neighbour of ``node`` on ``channel`` (if ``send``).

    Args:
      channel: the channel (only its graph is read).
      node: int32 scalar, the sending node (may be traced).
      payload: one message, like the channel's payload template.
      send: bool scalar; False sends nothing (the mask is all False).

    Returns:
      A :class:`BroadcastOutbox`: the payload once, masked to the node's real out-slots.
    """
    m = max(channel.graph.max_out_degree, 1)
    table = jnp.asarray(channel.graph.out_table).reshape(channel.graph.n, -1)
    mask = (table[node] >= 0) & send if table.shape[1] else jnp.zeros((m,), bool)
    return BroadcastOutbox(payload, mask)


def expand_outbox(outbox: Outbox | BroadcastOutbox) -> Outbox:
    """The per-slot form of an outbox: a :class:`BroadcastOutbox`'s payload repeated on every slot.

    An :class:`Outbox` is returned as it is. Executors call this only where they need one payload
    per message (every executor's expansion is this one).
    """
    if isinstance(outbox, Outbox):
        return outbox
    slots = jnp.shape(outbox.mask)[0]
    payload = jax.tree.map(lambda x: jnp.broadcast_to(x, (slots, *jnp.shape(x))), outbox.payload)
    return Outbox(payload, outbox.mask)


def check_outbox(outbox: Any, template: PyTree, max_out_degree: int, what: str) -> None:
    """Raises TypeError naming ``what`` unless ``outbox`` fits a channel.

    Args:
      outbox: what a handler returned for the channel.
      template: the channel's resolved payload template (see :func:`resolve`).
      max_out_degree: the channel graph's maximum out-degree (an outbox has that many slots, or one
        if it is 0).
      what: names the handler and channel in the message.
    """
    if not isinstance(outbox, (Outbox, BroadcastOutbox)):
        raise TypeError(f"{what}: expected an Outbox or a BroadcastOutbox, got {type(outbox).__name__}")
    kind = type(outbox).__name__
    mask_shape, mask_dtype = jnp.shape(outbox.mask), jnp.result_type(outbox.mask)
    slots = mask_shape[0] if len(mask_shape) == 1 else -1
    # A graph without edges: one dead slot (the form of empty_outbox), or none.
    fits = slots == max_out_degree or (max_out_degree == 0 and slots == 1)
    if not fits or mask_dtype != jnp.bool_:
        raise TypeError(
            f"{what}: {kind} mask must be bool [{max(max_out_degree, 1)}] (one entry per out-slot of "
            f"the channel's graph), got {mask_dtype} {list(mask_shape)}"
        )
    ref_def, tree_def = jax.tree.structure(template), jax.tree.structure(outbox.payload)
    if ref_def != tree_def:
        raise TypeError(f"{what}: {kind} payload structure {tree_def} does not match the channel's {ref_def}")
    paths = jax.tree_util.tree_leaves_with_path(outbox.payload)
    for t, (path, x) in zip(jax.tree.leaves(template), paths):
        one, got = tuple(jnp.shape(t)), tuple(jnp.shape(x))
        want = one if isinstance(outbox, BroadcastOutbox) else (slots, *one)
        if got == want:
            continue
        hint = ""
        if isinstance(outbox, BroadcastOutbox) and got == (slots, *one):
            hint = " (one payload per slot: that is an Outbox)"
        elif isinstance(outbox, Outbox) and got == one:
            hint = " (one payload for every slot: that is a BroadcastOutbox)"
        raise TypeError(
            f"{what}: {kind} payload leaf {jax.tree_util.keystr(path) or '(root)'} has shape {got}, "
            f"expected {want} for the channel's payload {one}{hint}"
        )


def ravel_template(template: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens a template pytree to one vector (float32 for shared buffers) and returns the inverse."""
    flat, unravel = jax.flatten_util.ravel_pytree(template)
    return flat, unravel


def check_tree_match(reference: PyTree, tree: PyTree, what: str) -> None:
    """Raises TypeError naming ``what`` unless ``tree`` has the structure and shapes of ``reference``."""
    ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
    if ref_def != tree_def:
        raise TypeError(f"{what}: tree structure {tree_def} does not match the parameters' {ref_def}")
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(tree)):
        if jnp.shape(a) != jnp.shape(b):
            raise TypeError(
                f"{what}: leaf shape {jnp.shape(b)} does not match the parameters' {jnp.shape(a)}"
            )
