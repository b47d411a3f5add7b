"""Message transport between the nodes of a real run: a small interface and its shared-memory backend.

Algorithms never see a transport. A worker turns each message of a handler's outbox into raw bytes
(:class:`Codec`) and hands them to its :class:`Endpoint`; the receiving worker polls its endpoint and
decodes. Everything above this module (the worker loop, replay, metrics) only uses

``Endpoint.send(channel, dst, seq, payload) -> bool``
  Enqueues one message on edge ``node -> dst`` of channel number ``channel`` (channels in sorted name
  order, like the simulator). ``payload`` is a ``uint8`` array of ``Codec.nbytes`` bytes, ``seq`` the
  sender's sequence number on that channel. Returns False when the edge has no room *right now*
  (the caller decides whether to retry or drop); never blocks.

``Endpoint.poll() -> iterator of Incoming(channel, src, slot, seq, payload)``
  Every message that arrived since the last poll, per edge in send order (no order across edges).
  ``slot`` is the sender's index in the receiver's ``in_table`` row (``graph.out_recv_slot``).

``Transport.endpoint(node) -> Endpoint`` picks a node's end, in the worker process;
``Transport.close()`` releases the creator's resources in the parent. ``provides_shared_memory``
says whether :class:`~jaxasync._src.program.Buffer` / :class:`~jaxasync._src.program.Registers`
objects can live next to it (an MPI transport between hosts says False).

:class:`ShmTransport` is one single-producer single-consumer :class:`~jaxasync._src.shm.Mailbox` of
``uint8`` messages per directed edge and channel, tag = ``seq``. Raw bytes carry every dtype exactly
(int tags, bfloat16, ...). The parent creates (and finally unlinks) every mailbox; the transport
pickles as the list of names, and an endpoint attaches only to its own edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

from jaxasync._src import shm as shm_lib

# A mailbox holds at most this many bytes of messages (capacity is reduced for big payloads).
_MAILBOX_BYTES = 8 << 20
_MAX_CAPACITY = 64


class Incoming(NamedTuple):
    """One received message: channel number, sender, sender's in-slot, sequence number, raw bytes."""

    channel: int
    src: int
    slot: int
    seq: int
    payload: np.ndarray


class Endpoint(Protocol):
    """One node's end of a transport (see the module docstring)."""

    def send(self, channel: int, dst: int, seq: int, payload: np.ndarray) -> bool: ...

    def poll(self) -> Iterator[Incoming]: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """A way for ``n`` nodes to exchange fixed-size messages on the edges of channel graphs."""

    provides_shared_memory: bool

    def endpoint(self, node: int) -> Endpoint: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple
    dtype: np.dtype
    offset: int
    nbytes: int
    key_impl: Any = None  # typed PRNG keys travel as their key data (uint32)


class Codec:
    """Pytree of fixed shapes and dtypes <-> flat ``uint8`` bytes (exact for every dtype).

    Args:
      template: pytree of arrays or ``jax.ShapeDtypeStruct``.
    """

    def __init__(self, template: Any):
        import jax

        leaves, self.treedef = jax.tree.flatten(template)
        self.leaves = []
        off = 0
        for t in leaves:
            impl = None
            if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
                impl = getattr(t.dtype, "_impl", None)
                t = jax.eval_shape(jax.random.key_data, t)
            shape = tuple(int(d) for d in np.shape(t))
            dtype = np.dtype(t.dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.leaves.append(Leaf(shape, dtype, off, nbytes, impl))
            off += nbytes
        self.has_keys = any(leaf.key_impl is not None for leaf in self.leaves)
        self.nbytes = off
        self.size = max(off, 1)  # a mailbox / register needs at least one byte

    def host_leaves(self, tree: Any) -> list:
        """The leaves of ``tree`` as host numpy arrays (typed keys as their key data)."""
        import jax

        leaves = jax.tree.leaves(tree)
        if self.has_keys:
            leaves = [
                jax.random.key_data(x) if spec.key_impl is not None else x
                for spec, x in zip(self.leaves, leaves)
            ]
        return [np.asarray(x) for x in leaves]  # (not jax.device_get: ~12 us more per leaf)

    def encode(self, leaves: list, index: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Host leaves (from :meth:`host_leaves`; optionally their ``[index]`` row) -> ``uint8[size]``."""
        out = np.empty(self.size, np.uint8) if out is None else out
        for spec, x in zip(self.leaves, leaves):
            a = np.asarray(x if index is None else x[index])
            out[spec.offset : spec.offset + spec.nbytes] = (
                np.ascontiguousarray(a, spec.dtype).view(np.uint8).reshape(-1)
            )
        return out

    def decode_leaves(self, buf: np.ndarray, lead: tuple = ()) -> list:
        """``uint8[*lead, size]`` -> new host arrays ``[*lead, *shape]`` per leaf."""
        out = []
        for spec in self.leaves:
            raw = buf[..., spec.offset : spec.offset + spec.nbytes]
            a = np.ascontiguousarray(raw).view(spec.dtype).reshape(tuple(lead) + spec.shape)
            if spec.key_impl is not None:
                import jax

                a = jax.random.wrap_key_data(a, impl=spec.key_impl)
            out.append(a)
        return out

    def decode(self, buf: np.ndarray, lead: tuple = ()) -> Any:
        import jax

        return jax.tree.unflatten(self.treedef, self.decode_leaves(buf, lead))


def mailbox_capacity(payload_bytes: int, capacity: int | None) -> int:
    """The default capacity: up to 64 messages and 8 MiB per mailbox, at least 2."""
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"mailbox capacity must be a positive int, got {capacity!r}")
        return capacity
    return int(max(2, min(_MAX_CAPACITY, _MAILBOX_BYTES // max(payload_bytes, 1))))


class ShmTransport:
    """One SPSC ``uint8`` :class:`~jaxasync._src.shm.Mailbox` per directed edge and channel.

    Create it in the parent with :meth:`create`; pass it to workers (it pickles as names) and call
    :meth:`endpoint` there. Only the creating object unlinks (:meth:`close`).

    Args (of :meth:`create`):
      graphs: one :class:`jaxasync.topology.Graph` per channel, channels in sorted name order.
      sizes: bytes per message of each channel.
      capacity: messages per mailbox, or None for :func:`mailbox_capacity`'s default.
    """

    provides_shared_memory = True

    def __init__(self, edges: dict, out_tables: list, recv_slots: list, boxes: dict | None = None):
        self.edges = edges  # (channel, src, dst) -> mailbox name
        self.out_tables = out_tables
        self.recv_slots = recv_slots
        self._boxes = boxes  # creator's handles (parent only)

    @classmethod
    def create(cls, graphs: list, sizes: list, capacity: int | None = None) -> ShmTransport:
        edges, boxes, out_tables, recv_slots = {}, {}, [], []
        try:
            for ci, (g, nbytes) in enumerate(zip(graphs, sizes)):
                table = np.asarray(g.out_table, np.int64).reshape(g.n, -1)
                slots = np.asarray(g.out_recv_slot, np.int64).reshape(g.n, -1)
                out_tables.append(table)
                recv_slots.append(slots)
                cap = mailbox_capacity(nbytes, capacity)
                for src in range(g.n):
                    for dst in table[src]:
                        if dst < 0:
                            continue
                        box = shm_lib.Mailbox.create(cap, (max(nbytes, 1),), np.uint8)
                        boxes[(ci, src, int(dst))] = box
                        edges[(ci, src, int(dst))] = box.name
        except BaseException:
            for box in boxes.values():
                box.__exit__(None, None, None)
            raise
        return cls(edges, out_tables, recv_slots, boxes)

    def __getstate__(self):
        return dict(edges=self.edges, out_tables=self.out_tables, recv_slots=self.recv_slots)

    def __setstate__(self, d):
        self.__init__(d["edges"], d["out_tables"], d["recv_slots"], None)

    @property
    def names(self) -> list:
        return list(self.edges.values())

    def endpoint(self, node: int) -> ShmEndpoint:
        return ShmEndpoint(self, node)

    def close(self) -> None:
        """Closes and unlinks every mailbox (creator only; idempotent)."""
        boxes, self._boxes = self._boxes or {}, None
        for box in boxes.values():
            box.__exit__(None, None, None)


class ShmEndpoint:
    """A node's outgoing and incoming mailboxes."""

    def __init__(self, transport: ShmTransport, node: int):
        self.node = node
        self._out, self._in = {}, []
        try:
            for (ci, src, dst), name in transport.edges.items():
                if src == node:
                    self._out[(ci, dst)] = shm_lib.Mailbox.attach(name)
                if dst == node:
                    row = transport.out_tables[ci][src]
                    j = int(np.nonzero(row == dst)[0][0])
                    slot = int(transport.recv_slots[ci][src, j])
                    self._in.append((ci, src, slot, shm_lib.Mailbox.attach(name)))
        except BaseException:
            self.close()
            raise

    def send(self, channel: int, dst: int, seq: int, payload: np.ndarray) -> bool:
        return self._out[(channel, dst)].send(payload, seq)

    def poll(self) -> Iterator[Incoming]:
        for ci, src, slot, box in self._in:
            while True:
                got = box.recv()
                if got is None:
                    break
                tag, value = got
                yield Incoming(ci, src, slot, int(tag), value)

    def close(self) -> None:
        for box in self._out.values():
            box.close()
        for *_, box in self._in:
            box.close()
        self._out, self._in = {}, []


TRANSPORTS = {"shm": ShmTransport}
