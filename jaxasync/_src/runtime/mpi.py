"""The MPI runtime: one node per MPI rank, messages between ranks (scale-out between hosts).

Every rank of an ``mpiexec -n N`` job calls :func:`run_mpi` with the same algorithm, problem and
arguments; rank ``i`` runs node ``i`` of the program on its own data shard and rank 0 returns the
:class:`~jaxasync._src.trace.Trace` of the local runtime (:func:`jaxasync._src.runtime.local.run`),
the other ranks None. MPI comes from ``mpi4py`` (with the ``mpich`` wheel from PyPI, no system MPI
needed), imported on the first call.

Contract:

* **One handler loop.** A rank runs the local runtime's worker
  (:class:`~jaxasync._src.runtime.worker.Worker`, free mode) unchanged: the same compiled handlers,
  the same keys (``fold_in(fold_in(key(seed), node), local_step)``), straggler pacing and injected
  loss. Its control cells, counters and report register are process-local (:class:`LocalCells`,
  :class:`LocalRegister`) instead of shared memory, and its supervisor is a protocol on an MPI
  communicator instead of a parent process (:class:`_MpiWorker` overrides ``maybe_report``, which
  the worker calls once per round).
* **Messages only.** :class:`MpiTransport` implements the :class:`~.transport.Endpoint` protocol with
  non-blocking synchronous sends (``Issend``: finished once the receiver took the message, so at
  most ``mailbox_capacity`` untaken messages per edge, like a mailbox; plain ``Isend`` finishes as
  soon as MPI buffered it, which bounds nothing) and polling receives (``Improbe``) of fixed-size
  raw bytes (:class:`~.transport.Codec`) plus the sequence number, all outside ``jit``. Programs
  with shared objects (:class:`~jaxasync._src.program.Buffer`,
  :class:`~jaxasync._src.program.Registers`: Hogwild!, cluster SGD, ...) are rejected with a
  ``ValueError``: ranks on different hosts share no memory.
* **Stopping.** ``steps`` means what it means for the local runtime, local steps summed over the
  nodes, and is exact: data node ``i`` of ``D`` runs ``steps // D`` of them, plus one if
  ``i < steps % D`` (servers never step). A
  rank also stops stepping at ``time_limit`` seconds (its clock starts at a common barrier) and
  when rank 0 halts everybody (``target_loss`` reached, ``callback`` returned True, or no progress
  for ``stall_timeout`` seconds). A rank that stopped stepping keeps handling messages; when every
  rank has stopped, rank 0 runs counting waves until no message is in flight (the
  sent-minus-lost count of one wave equals the delivered count of the wave before, the
  four-counter method), then tells every rank to stop. So the final record has ``in_flight == 0``
  (``sent == lost + delivered + dropped``) unless the messages did not die out within
  ``drain_timeout`` (``meta["drained"]`` is then False). The final states are sent to rank 0, whose
  last record computes the metrics from them; ``wall_time`` is when the last rank stopped stepping.
* **Records.** Every ``record_every`` seconds each rank sends its state and counters to rank 0,
  which records a point (the local runtime's metrics) once every rank's report of that round is in.
  Mid-run records combine reports taken at about the same time on different clocks; only the last
  record is a consistent cut.
* **Failures.** A rank that raises sends its traceback to every other rank and re-raises; the others
  raise :class:`~jaxasync._src.runtime.local.WorkerError` ``"rank i failed: ..."``. A rank killed
  by a signal ends the whole job (``mpiexec`` cleans up); should the job survive it (fault-tolerance
  flags), every wait is still bounded: ``start_timeout`` for start-up, and ``stall_timeout`` for a
  silent rank (rank 0 halts the run, then gives up on ranks that do not stop; the others hear from
  rank 0 at least every ``stall_timeout / 4`` seconds and give up on it after ``stall_timeout``).
  Crash injection is not supported.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxasync._src.runtime import local as local_lib
from jaxasync._src.runtime import transport as transport_lib
from jaxasync._src.runtime import worker as worker_lib

# Tags of the control communicator (the data communicator's tag is the channel number).
_REPORT, _DONE, _PROBE, _COUNTS, _HALT, _STOP, _FINAL, _FAIL, _BEAT = range(1, 10)
_SEQ_BYTES = 8  # an int64 sequence number precedes every payload
_POLL_MISSES = 2  # empty probes before a poll gives up (see MpiEndpoint.poll)
# Default bound on the messages of an edge that the receiver has not taken. MPICH hands a receiver
# about one message per progress call, so a deep bound becomes a standing queue: R-FAST on 4 ranks
# (2 cores, 4000 steps) ended at loss 11-14 with 64, at 7.26-7.29 with 4 or 1 (the local runtime
# and the simulator: 7.25-7.37); 1 made the run ~25% slower.
_CAPACITY = 4
_FAIL_GRACE = 5.0  # seconds a failing rank waits for its notices to leave
_CLOSE_GRACE = 2.0  # seconds for unfinished sends at the end


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MPI runtime needs mpi4py and an MPI library: pip install 'jaxasync[mpi]' "
            "(mpi4py and the mpich wheel)"
        ) from e
    return MPI


# ---------------------------------------------------------------------------------- local stand-ins


class LocalCells:
    """Process-local stand-in for :class:`jaxasync.shm.AtomicArray` (one rank owns its cells)."""

    name = "local"

    def __init__(self, n: int):
        self.array = np.zeros(n, np.int64)

    def load(self, i: int) -> int:
        return int(self.array[i])

    def store(self, i: int, v: int) -> None:
        self.array[i] = v

    def fetch_add(self, i: int, d: int = 1) -> int:
        old = int(self.array[i])
        self.array[i] = old + d
        return old

    def __exit__(self, *exc) -> None:
        pass


class LocalRegister:
    """Process-local stand-in for a ``uint8`` :class:`jaxasync.shm.Register` (allocated on write)."""

    name = "local"

    def __init__(self, size: int):
        self.size, self.tag, self.value = size, -1, None

    def write(self, value: np.ndarray, tag: int) -> None:
        self.value, self.tag = np.array(value, np.uint8, copy=True), int(tag)

    def read(self, out: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        out = np.zeros(self.size, np.uint8) if out is None else out
        if self.value is not None:
            out[...] = self.value
        return self.tag, out

    def __exit__(self, *exc) -> None:
        pass


# ---------------------------------------------------------------------------------------- transport


class MpiTransport:
    """Messages between MPI ranks: node ``i`` is rank ``i`` of ``comm``.

    Args:
      comm: an ``mpi4py`` communicator used for data messages only (tag = channel number).
      out_tables, recv_slots: per channel, the graph's ``out_table`` and ``out_recv_slot``.
      sizes: per channel, bytes per message (``Codec.size``).
      capacity: messages per edge the receiver has not taken yet before :meth:`MpiEndpoint.send`
        says "no room" (default 4, see ``_CAPACITY``).
    """

    provides_shared_memory = False

    def __init__(self, comm, out_tables: list, recv_slots: list, sizes: list, capacity: int | None = None):
        self.comm, self.out_tables, self.recv_slots, self.sizes = comm, out_tables, recv_slots, sizes
        self.capacity = [
            transport_lib.mailbox_capacity(s, _CAPACITY if capacity is None else capacity) for s in sizes
        ]
        self.names: list = []  # no segments

    @classmethod
    def create(cls, graphs: list, sizes: list, capacity: int | None = None, comm=None) -> MpiTransport:
        if comm is None:
            comm = _mpi().COMM_WORLD
        tables = [np.asarray(g.out_table, np.int64).reshape(g.n, -1) for g in graphs]
        slots = [np.asarray(g.out_recv_slot, np.int64).reshape(g.n, -1) for g in graphs]
        return cls(comm, tables, slots, [max(int(s), 1) for s in sizes], capacity)

    def endpoint(self, node: int) -> MpiEndpoint:
        return MpiEndpoint(self, node)

    def close(self) -> None:
        pass


class MpiEndpoint:
    """A rank's end: unfinished ``Issend`` requests per edge and the receivers' slot table."""

    def __init__(self, transport: MpiTransport, node: int):
        self.MPI = _mpi()
        self.comm, self.node, self.sizes = transport.comm, node, transport.sizes
        self.capacity = transport.capacity
        self._out = collections.defaultdict(collections.deque)  # (channel, dst) -> [(request, buf)]
        self._slot = {}  # (channel, src) -> our index in src's out row (the receiver's in-slot)
        for ci, (table, slots) in enumerate(zip(transport.out_tables, transport.recv_slots)):
            for src in range(table.shape[0]):
                hit = np.nonzero(table[src] == node)[0]
                if hit.size:
                    self._slot[(ci, src)] = int(slots[src, hit[0]])
        self._status = self.MPI.Status()

    def send(self, channel: int, dst: int, seq: int, payload: np.ndarray) -> bool:
        queue = self._out[(channel, dst)]
        while queue and queue[0][0].Test():
            queue.popleft()
        if len(queue) >= self.capacity[channel]:
            return False
        buf = np.empty(_SEQ_BYTES + self.sizes[channel], np.uint8)
        buf[:_SEQ_BYTES].view(np.int64)[0] = seq
        buf[_SEQ_BYTES:] = payload
        # The buffer must live until the send finishes: it stays in the queue with its request.
        queue.append((self.comm.Issend([buf, self.MPI.BYTE], dst, tag=channel), buf))
        return True

    def poll(self) -> Iterator[transport_lib.Incoming]:
        MPI, st = self.MPI, self._status
        misses = 0
        while True:
            msg = self.comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, st)
            if msg is None:
                # MPICH moves about one arrived message per progress call into the queue a probe
                # sees: stopping at the first miss left a standing queue (~1.7 ms delay at one
                # message per round, 2-core machine); two more probes bring it to ~50 us.
                misses += 1
                if misses > _POLL_MISSES:
                    return
                continue
            misses = 0
            ci, src = st.Get_tag(), st.Get_source()
            buf = np.empty(_SEQ_BYTES + self.sizes[ci], np.uint8)
            if st.Get_count(MPI.BYTE) != buf.size:
                raise RuntimeError(
                    f"rank {self.node}: a message of {st.Get_count(MPI.BYTE)} bytes on channel {ci} from "
                    f"rank {src}, expected {buf.size} (do all ranks run the same program?)"
                )
            msg.Recv([buf, MPI.BYTE])
            seq = int(buf[:_SEQ_BYTES].view(np.int64)[0])
            yield transport_lib.Incoming(ci, src, self._slot[(ci, src)], seq, buf[_SEQ_BYTES:])

    def discard_incoming(self) -> int:
        """Receives and drops every message that has arrived; returns how many."""
        return sum(1 for _ in self.poll())

    def close(self, grace: float = _CLOSE_GRACE) -> None:
        """Waits up to ``grace`` seconds for unfinished sends (there are none after a drained run),
        then abandons the rest: cancelling a synchronous send whose receiver has exited crashed
        MPICH (SIGSEGV), and an abandoned one only keeps its buffer until the process exits."""
        reqs = [r for q in self._out.values() for r, _ in q]
        end = time.monotonic() + grace
        while reqs and time.monotonic() < end:
            reqs = [r for r in reqs if not r.Test()]
            if reqs:
                time.sleep(1e-3)
        self._abandoned = [(r, b) for q in self._out.values() for r, b in q if not r.Test()]
        self._out.clear()


# ---------------------------------------------------------------------------------------- control


class _Control:
    """Pickled control messages on their own communicator (sends are non-blocking and tracked)."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._reqs = []
        self._status = MPI.Status()
        self._backlog = collections.deque()  # messages that arrived during a wait, for the next poll

    def send(self, dst: int, tag: int, obj: Any = None) -> None:
        self._reqs.append(self.comm.isend(obj, dst, tag))
        if len(self._reqs) > 64:
            self._reqs = [r for r in self._reqs if not r.Test()]

    def others(self, tag: int, obj: Any = None) -> None:
        for r in range(self.size):
            if r != self.rank:
                self.send(r, tag, obj)

    def poll(self) -> Iterator[tuple[int, int, Any]]:
        """Every control message that has arrived, as ``(source, tag, object)``; a failure notice
        raises :class:`~jaxasync._src.runtime.local.WorkerError` at once."""
        while self._backlog:
            yield self._backlog.popleft()
        st = self._status
        while self.comm.iprobe(self.MPI.ANY_SOURCE, self.MPI.ANY_TAG, st):
            src, tag = st.Get_source(), st.Get_tag()
            obj = self.comm.recv(source=src, tag=tag)
            if tag == _FAIL:
                err = local_lib.WorkerError(f"rank {src} failed:\n{obj}")
                err.remote = True  # it already told everybody
                raise err
            yield src, tag, obj

    def flush(self, grace: float) -> bool:
        """Waits up to ``grace`` seconds for our sends to leave; True if they all did."""
        end = time.monotonic() + grace
        while self._reqs:
            self._reqs = [r for r in self._reqs if not r.Test()]
            if not self._reqs:
                break
            if time.monotonic() > end:  # abandoned, not cancelled (see MpiEndpoint.close)
                self._abandoned, self._reqs = self._reqs, []
                return False
            time.sleep(1e-3)
        return True

    def wait(self, request, what: str, timeout: float, spin: bool = False) -> None:
        """Waits for an MPI request (a barrier), at most ``timeout`` seconds; a failure notice
        raises, other control messages are kept for the next :meth:`poll`. With ``spin`` it only
        yields the core between two tests instead of sleeping (for waits known to be short)."""
        end = time.monotonic() + timeout
        while not request.Test():
            arrived = list(self.poll())
            self._backlog.extend(arrived)
            if time.monotonic() > end:
                raise local_lib.WorkerError(
                    f"rank {self.rank}: {what} did not complete within {timeout:.0f}s"
                )
            if spin:
                os.sched_yield()
            else:
                time.sleep(1e-3)


class _Coordinator:
    """Rank 0's view of the run: the other ranks' reports, the records, the stopping protocol."""

    RUN, DRAIN, STOPPED = range(3)

    def __init__(
        self, *, n, shared, metrics, record_every, target_loss, callback, stall_timeout, drain_timeout
    ):
        self.n, self.shared, self.metrics = n, shared, metrics
        self.record_every, self.target_loss, self.callback = record_every, target_loss, callback
        self.stall_timeout, self.drain_timeout = stall_timeout, drain_timeout
        self.records = []
        self.report_round = np.full(n, -1, np.int64)  # newest report round per rank
        self.report_time = np.zeros(n)
        self.done = {}  # rank -> time it stopped stepping
        self.finals = set()
        self.phase = self.RUN
        self.halted, self.halt_time = False, 0.0
        self.stalled = False
        self.next_round = 1
        self.last_activity, self.last_change = -1, 0.0
        self.wave, self.wave_counts, self.previous_wave = 0, {}, None
        self.drain_started = None
        self.drained = False

    def store(self, rank: int, row: np.ndarray, state: np.ndarray | None) -> None:
        base = rank * worker_lib.NCOUNT
        self.shared.counters.array[base : base + worker_lib.NCOUNT] = row
        if state is not None:
            self.shared.reports[rank].write(state, 0)

    def record(self, now: float) -> dict:
        rec = local_lib._record(self.shared, self.metrics, self.n, now, np.ones(self.n, bool))
        self.records.append(rec)
        return rec


class _MpiWorker(worker_lib.Worker):
    """The local runtime's worker with MPI control messages in place of a parent process."""

    def setup_mpi(self, *, control, coordinator, time_limit, record_every, stall_timeout, bar):
        self.control, self.coord = control, coordinator
        self.time_limit, self.record_every, self.bar = time_limit, record_every, bar
        self.stall_timeout = stall_timeout
        self.heard = 0.0  # when rank 0 last spoke to us (its heartbeat, or we sent its last beat)
        self.bar_steps = self.ctrl.load(worker_lib.LIMIT) >= 0
        self.t0 = self.t0_ns = None  # set at the common start
        self.next_report = record_every
        self.done_sent = False

    # --------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def row_now(self) -> np.ndarray:
        self.publish_counters()
        r = self.row
        return self.counters.array[r : r + worker_lib.NCOUNT].copy()

    def state_bytes(self) -> np.ndarray:
        return self.state_codec.encode(self.state_codec.host_leaves(self.state))

    def network_counts(self) -> tuple[int, int]:
        """(messages put on the network, messages handled) by this rank so far."""
        st = self.stats
        return st["sent"] - st["lost"] - st["dropped"], st["delivered"]

    def halt(self) -> None:
        """No more steps (the next claim fails); a step under way is not interrupted."""
        W = worker_lib
        claimed, limit = self.ctrl.load(W.CLAIMED), self.ctrl.load(W.LIMIT)
        self.ctrl.store(W.LIMIT, claimed if limit < 0 else min(limit, claimed))

    def stepping_done(self) -> float | None:
        """The time this rank stopped stepping, or None if it has not."""
        W = worker_lib
        finish = self.counters.load(self.row + W.C_FINISH)
        if finish:
            return max(0.0, (finish - self.t0_ns) * 1e-9)
        limit = self.ctrl.load(W.LIMIT)
        if 0 <= limit <= self.ctrl.load(W.CLAIMED) and not self.counters.load(self.row + W.C_BUSY):
            return self.elapsed()  # halted while waiting (not ready): it will never claim again
        return None

    # --------------------------------------------------------------------- the loop's hook

    def maybe_report(self, force: bool = False) -> None:
        """Once per round: control messages, periodic reports, the local stopping rules."""
        del force  # the initial report is sent by the driver
        if self.t0 is None or self.ctrl.load(worker_lib.STOP):
            return
        now = self.elapsed()
        rank0 = self.node == 0
        for src, tag, obj in self.control.poll():
            self.heard = now
            self.on_message(src, tag, obj, now)
        if rank0 and now - self.heard >= self.stall_timeout / 4:
            self.heard = now
            self.control.others(_BEAT)  # lets the others tell a silent rank 0 from a long run
        elif not rank0 and now - self.heard > self.stall_timeout:
            raise local_lib.WorkerError(
                f"rank {self.node}: no word from rank 0 for {self.stall_timeout:.0f}s (did it die?)"
            )
        if self.time_limit is not None and now >= self.time_limit:
            self.halt()
        if now >= self.next_report:
            k = int(now // self.record_every)
            self.next_report = (k + 1) * self.record_every
            if rank0:
                self.coord.store(0, self.row_now(), self.state_bytes())
                self.on_report(0, k, now)
            else:
                self.control.send(0, _REPORT, (k, now, self.row_now(), self.state_bytes()))
        if not self.done_sent:
            t = self.stepping_done()
            if t is not None:
                self.done_sent = True
                if rank0:
                    self.coord.done[0] = t
                else:
                    self.control.send(0, _DONE, (t, self.row_now()))
        if rank0:
            self.coordinate(now)

    def on_message(self, src: int, tag: int, obj: Any, now: float) -> None:
        if tag == _BEAT:
            pass
        elif tag == _HALT:
            self.halt()
        elif tag == _PROBE:
            self.control.send(0, _COUNTS, (obj, *self.network_counts()))
        elif tag == _STOP:
            self.ctrl.store(worker_lib.STOP, 1)
        elif self.node == 0:
            self.on_rank0_message(src, tag, obj, now)
        else:
            raise RuntimeError(f"rank {self.node}: unexpected control message {tag} from rank {src}")

    def on_rank0_message(self, src: int, tag: int, obj: Any, now: float) -> None:
        coord = self.coord
        if tag == _REPORT:
            k, t, row, state = obj
            coord.store(src, row, state)
            coord.report_time[src] = t
            self.on_report(src, k, now)
        elif tag == _DONE:
            t, row = obj
            coord.store(src, row, None)
            coord.done[src] = t
        elif tag == _COUNTS:
            wave, sent, delivered = obj
            if wave == coord.wave:
                coord.wave_counts[src] = (sent, delivered)
        elif tag == _FINAL:
            row, state, t = obj
            coord.store(src, row, state)
            coord.finals.add(src)
        else:
            raise RuntimeError(f"rank 0: unexpected control message {tag} from rank {src}")

    def on_report(self, rank: int, k: int, now: float) -> None:
        coord = self.coord
        coord.report_round[rank] = k
        if rank == 0:
            coord.report_time[0] = now
        if coord.phase != coord.RUN or coord.report_round.min() < coord.next_round:
            return
        coord.next_round = int(coord.report_round.min()) + 1
        rec = coord.record(float(coord.report_time.max()))
        done = int(rec["steps"]) if self.bar_steps else round(now, 1)
        self.bar.update(done, note=f"loss={float(rec['loss']):.3g}")
        stop = coord.target_loss is not None and rec["loss"] <= coord.target_loss
        stop = stop or bool(coord.callback is not None and coord.callback(dict(rec)))
        if stop:
            self.halt_all()

    def halt_all(self) -> None:
        if not self.coord.halted:
            self.coord.halted, self.coord.halt_time = True, self.elapsed()
            self.control.others(_HALT)
            self.halt()

    def coordinate(self, now: float) -> None:
        """Rank 0's stopping rules (see the module docstring)."""
        coord = self.coord
        if coord.phase == coord.RUN:
            activity = int(
                sum(
                    coord.shared.counters.load(i * worker_lib.NCOUNT + k)
                    for i in range(coord.n)
                    for k in (worker_lib.C_STEPS, worker_lib.C_DELIVERED)
                )
            )
            if activity != coord.last_activity:
                coord.last_activity, coord.last_change = activity, now
            elif now - coord.last_change > coord.stall_timeout and not coord.halted:
                coord.stalled = True
                self.halt_all()
            if coord.halted and now - coord.halt_time > coord.stall_timeout:
                missing = sorted(set(range(coord.n)) - set(coord.done))
                raise local_lib.WorkerError(
                    f"rank 0: ranks {missing} did not stop stepping within {coord.stall_timeout:.0f}s of "
                    "being halted"
                )
            if len(coord.done) == coord.n:
                coord.phase, coord.drain_started = coord.DRAIN, now
                self.start_wave()
            return
        if coord.phase != coord.DRAIN:
            return
        if len(coord.wave_counts) == coord.n:
            sent = sum(s for s, _ in coord.wave_counts.values())
            delivered = sum(d for _, d in coord.wave_counts.values())
            if coord.previous_wave is not None and sent == coord.previous_wave[1]:
                coord.drained = True
                self.stop_all()
                return
            coord.previous_wave = (sent, delivered)
            self.start_wave()
        if now - coord.drain_started > coord.drain_timeout:
            self.stop_all()

    def start_wave(self) -> None:
        coord = self.coord
        coord.wave += 1
        coord.wave_counts = {0: self.network_counts()}
        self.control.others(_PROBE, coord.wave)

    def stop_all(self) -> None:
        self.coord.phase = self.coord.STOPPED
        self.control.others(_STOP)
        self.ctrl.store(worker_lib.STOP, 1)


# ---------------------------------------------------------------------------------------- the run


def _shares(steps: int | None, n: int, data_nodes: int | None = None) -> list:
    """Each rank's exact part of ``steps``: split over the data nodes, none for the servers (which
    never step); -1 (no limit) without ``steps``."""
    m = n if data_nodes is None else data_nodes
    if steps is None:
        return [-1] * n
    return [steps // m + (1 if i < steps % m else 0) if i < m else 0 for i in range(n)]


def run_mpi(
    algorithm,
    problem,
    *,
    steps: int | None = None,
    time_limit: float | None = None,
    seed: int = 0,
    asynchrony=None,
    target_loss: float | None = None,
    record_every: float | None = None,
    mailbox_capacity: int | None = None,
    progress: bool | None = None,
    callback=None,
    comm=None,
    start_timeout: float = 300.0,
    stall_timeout: float = 60.0,
    drain_timeout: float = 30.0,
):
    """Runs ``algorithm`` on ``problem`` with one node per MPI rank; call it in every rank.

    Example (``mpiexec -n 4 python train.py``)::

      import jaxasync as ja

      problem = ja.problems.least_squares(4, dim=20, samples_per_node=64, batch_size=8)
      ring = ja.topology.ring(4)
      program = ja.algorithms.rfast(ring, ring, learning_rate=0.02)
      trace = ja.run_mpi(program, problem, steps=4000)
      if trace is not None:  # rank 0
          print(trace.final("loss"))

    Args:
      algorithm: a message-passing :class:`~jaxasync._src.program.NodeProgram` (no shared objects).
      problem: a :class:`jaxasync.Problem`; the same on every rank (rank ``i`` uses shard ``i``).
      steps: local steps summed over the data nodes, split exactly (see the module docstring);
        lock-step algorithms (D-PSGD, all-reduce) need a multiple of the number of data nodes
        (a node with one step more would wait for its neighbours' next round until
        ``stall_timeout``).
      time_limit: wall-clock seconds each rank steps for (after the common start).
      seed: seed of the initial keys, the minibatches and the injected loss.
      asynchrony: optional :class:`jaxasync.Asynchrony`; ``stragglers`` and ``loss`` are injected as
        in the local runtime; ``crashes`` are not supported (ValueError).
      target_loss: halt every rank at the first record with ``loss <= target_loss``.
      record_every: seconds between two records (default ``time_limit / 50`` or 0.25 s).
      mailbox_capacity: messages per edge the receiver has not taken yet before a sender waits
        (draining its own inbox meanwhile), like the local runtime's mailbox capacity (default 4:
        a deeper queue between ranks only delays messages).
      progress: draw a progress bar on rank 0's stderr (default: if it is a terminal).
      callback: ``callback(record) -> bool | None`` on rank 0 at each record; True halts the run.
      comm: the ``mpi4py`` communicator whose ranks are the nodes (default ``COMM_WORLD``).
      start_timeout: seconds the ranks may take to compile their handlers and meet.
      stall_timeout: halt (with a warning and ``meta["stalled"]``) when no rank has completed a step
        or handled a message for this long; also bounds how long a rank waits for a silent rank.
      drain_timeout: seconds rank 0 waits for the messages in flight to die out once every rank
        stopped stepping.

    Returns:
      On rank 0, a :class:`~jaxasync._src.trace.Trace` with the local runtime's metrics and
      ``meta["executor"] = "mpi"`` (plus ``ranks``, ``hosts``, ``drained``, ``drain_time``); on the
      other ranks None.

    Raises:
      ValueError: bad arguments (on every rank, before any communication), e.g. a program with
        shared objects, or a communicator whose size is not the program's number of nodes.
      WorkerError: (a ``RuntimeError``) a rank failed (``"rank i failed: <traceback>"``), or a wait
        timed out.
    """
    from jaxasync._src import asynchrony as asynchrony_lib
    from jaxasync._src import program as program_lib
    from jaxasync._src import progress as progress_lib
    from jaxasync._src import trace as trace_lib

    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, n = comm.Get_rank(), comm.Get_size()
    shared_memory = isinstance(algorithm, program_lib.NodeProgram) and (
        algorithm.shared or algorithm.needs_shared_memory
    )
    if shared_memory:
        raise ValueError(
            f"{algorithm.name} needs shared memory (shared objects {sorted(algorithm.shared)}) but the MPI "
            "transport has none (ranks may be on different hosts): run it on one machine with "
            "jaxasync.run"
        )
    servers = int(getattr(algorithm, "num_servers", 0))
    if getattr(problem, "num_nodes", None) is not None and problem.num_nodes + servers != n:
        extra = f" plus {servers} data-less server(s)" if servers else ""
        raise ValueError(
            f"{n} MPI ranks but the problem has {problem.num_nodes} data shard(s){extra}: run one rank "
            "per node (mpiexec -n <shards + servers>)"
        )
    n, _ = local_lib._check_args(algorithm, problem, n, asynchrony, steps, time_limit, "atomic", MpiTransport)
    asyn = asynchrony or asynchrony_lib.Asynchrony()
    if asyn.crashes:
        raise ValueError("crash injection is not supported by the MPI runtime; use jaxasync.run")
    if record_every is None:
        record_every = time_limit / 50 if time_limit is not None else 0.25
    record_every = max(float(record_every), 0.01)

    # Two private communicators (our tags never meet the user's), made without a blocking call.
    (data_comm, r1), (ctrl_comm, r2) = comm.Idup(), comm.Idup()
    end = time.monotonic() + start_timeout
    while not MPI.Request.Testall([r1, r2]):
        if time.monotonic() > end:
            raise local_lib.WorkerError(f"rank {rank}: the other ranks did not call run_mpi")
        time.sleep(1e-3)
    control = _Control(ctrl_comm, MPI)
    worker = coord = None
    bar = progress_lib.Progress(
        f"{algorithm.name} x{n} ranks",
        steps if steps is not None else time_limit,
        enabled=progress if rank == 0 else False,
    )
    try:
        layout = local_lib._Layout(algorithm, problem, n, seed)
        transport = MpiTransport.create(
            layout.graphs, [c.nbytes for c in layout.payload_codecs], mailbox_capacity, comm=data_comm
        )
        W = worker_lib
        ctrl = LocalCells(W.ALIVE0 + n)
        for i in range(n):
            ctrl.store(W.ALIVE0 + i, 1)
        ctrl.store(W.LIMIT, _shares(steps, n, n - servers)[rank])
        counters = LocalCells(n * W.NCOUNT)
        reports = [LocalRegister(layout.state_codec.size) for _ in range(n)]
        shared = W.Shared(ctrl, counters, reports, {}, {}, transport)
        worker = _MpiWorker(
            program=algorithm,
            problem=local_lib._shard_problem(problem, rank),
            node=rank,
            n=n,
            seed=seed,
            shared=shared,
            buffer_mode="atomic",
            straggler=float(asyn.straggler_factors(n)[rank]),
            loss=float(asyn.loss),
        )
        if rank == 0:
            coord = _Coordinator(
                n=n,
                shared=shared,
                metrics=local_lib._Metrics(algorithm, problem, layout, shared),
                record_every=record_every,
                target_loss=target_loss,
                callback=callback,
                stall_timeout=stall_timeout,
                drain_timeout=drain_timeout,
            )
        worker.setup_mpi(
            control=control,
            coordinator=coord,
            time_limit=time_limit,
            record_every=record_every,
            stall_timeout=stall_timeout,
            bar=bar,
        )

        # The initial states (record 0) and host names go to rank 0, then a common start. Rank 0
        # enters the barrier only with every initial report in, so none can be overtaken by a
        # later message of a rank that already started.
        hosts = {rank: MPI.Get_processor_name()}
        if rank == 0:
            coord.store(0, worker.row_now(), worker.state_bytes())
            end = time.monotonic() + start_timeout
            while len(hosts) < n:
                for src, tag, obj in control.poll():
                    if tag != _REPORT:
                        raise RuntimeError(f"rank 0: unexpected control message {tag} from rank {src}")
                    coord.store(src, obj[2], obj[3])
                    hosts[src] = obj[4]
                if time.monotonic() > end:
                    missing = sorted(set(range(n)) - set(hosts))
                    raise local_lib.WorkerError(
                        f"rank 0: ranks {missing} were not ready within {start_timeout:.0f}s"
                    )
                time.sleep(1e-3)
            coord.report_round[:] = 0
            coord.record(0.0)
        else:
            control.send(0, _REPORT, (0, 0.0, worker.row_now(), worker.state_bytes(), hosts[rank]))
        control.wait(ctrl_comm.Ibarrier(), "the start (all ranks ready)", start_timeout)
        # A second barrier, spun: the first one's sleeping waits let ranks leave up to ~1 ms apart,
        # and a rank that starts first stays about that many steps ahead of its neighbours.
        control.wait(ctrl_comm.Ibarrier(), "the start", stall_timeout, spin=True)
        bar.start = time.monotonic()
        worker.t0, worker.t0_ns = time.perf_counter(), time.monotonic_ns()
        ctrl.store(W.START, 1)

        worker.run()  # returns when rank 0 says STOP

        # The final states go to rank 0.
        end_time = worker.elapsed()
        if rank == 0:
            coord.store(0, worker.row_now(), worker.state_bytes())
            deadline = time.monotonic() + stall_timeout
            while len(coord.finals) < n - 1:
                for src, tag, obj in control.poll():
                    if tag == _FINAL:
                        worker.on_rank0_message(src, tag, obj, end_time)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, n)) - coord.finals)
                    raise local_lib.WorkerError(f"rank 0: no final state from ranks {missing}")
                time.sleep(1e-3)
        else:
            control.send(0, _FINAL, (worker.row_now(), worker.state_bytes(), end_time))
        control.flush(stall_timeout)
        control.wait(ctrl_comm.Ibarrier(), "the final barrier", stall_timeout)
    except BaseException as e:
        # Tell everybody (they raise instead of waiting for us), then fail here too.
        with contextlib.suppress(Exception):
            if not getattr(e, "remote", False):
                control.others(_FAIL, traceback.format_exc())
            control.flush(_FAIL_GRACE)
        raise
    finally:
        bar.close()
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.endpoint.discard_incoming()
            worker.close()
        for c in (data_comm, ctrl_comm):
            with contextlib.suppress(Exception):
                c.Free()

    if rank != 0:
        return None
    wall = max(coord.done.values()) if coord.done else end_time
    last = coord.records[-1]["time"] if coord.records else 0.0
    coord.record(max(wall, float(last)))
    records = coord.records
    metrics = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    meta = dict(
        algorithm=algorithm.name,
        problem=getattr(problem, "name", "problem"),
        nodes=n,
        workers=n,
        ranks=n,
        hosts=len(set(hosts.values())),
        steps=steps,
        time_limit=time_limit,
        target_loss=target_loss,
        record_every=record_every,
        seed=seed,
        asynchrony=dict(
            loss=float(asyn.loss),
            crashes={},
            stragglers={str(k): float(v) for k, v in (asyn.stragglers or {}).items()},
        ),
        executor="mpi",
        buffer_mode="atomic",
        wall_time=float(wall),
        crashed={},
        interrupted=False,
        stalled=coord.stalled,
        drained=coord.drained,
        drain_time=float(end_time - coord.drain_started) if coord.drain_started is not None else 0.0,
        lost_updates=None,
    )
    if coord.stalled:
        import warnings

        warnings.warn(
            f"{algorithm.name}: no progress for {stall_timeout:.0f}s (every rank idle?); halted after "
            f"{int(records[-1]['steps'])} steps",
            stacklevel=2,
        )
    return trace_lib.Trace(metrics, meta)
