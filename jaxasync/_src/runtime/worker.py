"""The worker process of the local runtime: one node program driven by real time and real messages.

A worker runs the handlers of one node exactly like the simulator does for that node
(:mod:`jaxasync._src.simulator`): a **step** event is ``step -> apply ops -> observe -> send``; a
**delivery** is ``receive -> apply ops -> send``; ``ready(state)`` gates steps. What differs is who
decides the order: in *free* mode the wall clock and the operating system (the interleaving is real,
the keys are ``fold_in(fold_in(key(seed), node), local_step)``); in *replay* mode a recorded event log
(each worker waits for its turn on a shared counter and derives keys with
:func:`~jaxasync._src.simulator.event_keys`).

A free-mode worker runs rounds: the messages waiting now (batched per channel), then one step.
For an always-ready program whose receive handlers only update the state (R-FAST, gossip), the
waiting messages and the step run in one compiled call, and such handlers cost no per-message
host work. A straggler sleeps after each step (see :mod:`.local` and :class:`Pace`); any other
worker yields its core after each step to a process waiting for one (``os.sched_yield``), so
workers that outnumber the cores alternate step by step rather than by the scheduler's time
slices. Each worker has one XLA:CPU thread (:func:`thread_env`).

The parent creates every shared segment; the worker attaches by name (:class:`Shared`) and never
unlinks. Everything a worker reports goes through shared memory: counters in one ``AtomicArray`` row,
its full state (raw bytes) in a ``Register`` when the parent asks for a report, and a formatted
traceback through a pipe if it fails.

:meth:`Worker.maybe_report` is the worker's one contact with its supervisor: it runs once per
round, in a straggler's sleep and while a send waits for room, each time before the worker reads
``STOP``. The MPI runtime (:mod:`.mpi`) runs this same loop on process-local control cells and
overrides that method to exchange control messages with rank 0 instead of a parent process.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import time
import traceback

import numpy as np

# Control cells (one AtomicArray shared by everybody).
STOP, CLAIMED, LIMIT, REQUEST, VERSION, TURN, START, _RESERVED = range(8)
ALIVE0 = 8  # ALIVE0 + node: 1 while the node is alive (the parent clears it when it dies)

# Per-node counter rows (one AtomicArray of n * NCOUNT cells).
(
    C_STEPS,
    C_SENT,
    C_LOST,
    C_DELIVERED,
    C_DROPPED,
    C_BYTES,
    C_STALE_SUM,
    C_STALE_MAX,
    C_UPDATES,
    C_BUSY,
    C_STATUS,
    C_REPORTED,
    C_RETRIES,
    C_FINISH,
    C_CPU_US,
) = range(15)
NCOUNT = 16
STATUS_READY, STATUS_RUNNING, STATUS_DONE = 1, 2, 3

# Idle back-off: sleep this long (doubling up to the max) when a loop iteration did nothing.
_IDLE_MIN, _IDLE_MAX = 20e-6, 1e-3
_SYNC_EVERY = 32
_STRAGGLE_SLICE = 5e-3  # a sleeping straggler looks at report requests and the stop flag this often
BATCH = 8  # messages of one channel handled by one compiled call when several are waiting


def _row(j, x):
    return x[j]


def thread_env(parent_platform: str | None) -> dict:
    """Environment for a child: one XLA / BLAS thread (set before the child imports jax).

    XLA:CPU runs a program's operations on an intra-op thread pool of one thread per core unless
    ``NPROC`` says otherwise (the pool's size is read from it, then from the CPU count). With two
    threads a worker's Hogwild! step on the bench's MLP cost ~30% more CPU (handing work between
    the threads) and one worker used 1.4 cores, which two workers on two cores cannot.
    """
    env = {
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip(),
        "NPROC": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    if parent_platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def lift_jit(fn, *example_args, donate_first: bool = False):
    """``jax.jit(fn)`` with the arrays ``fn`` closes over (data shards, tables) passed as arguments.

    A jitted closure embeds its captured arrays in the compiled program as constants, which makes
    compilation slow and memory-hungry for data sets; here they are traced once with
    ``jax.make_jaxpr`` and handed to the compiled function as ordinary inputs.

    With ``donate_first`` the first argument (a node's state) is donated: XLA writes the new state
    into its buffers instead of allocating fresh ones every call, and the caller must not use the
    argument again (the worker always replaces its state by the result). Compiled like the
    simulator's handlers, with a value returned in several places (a register write that is also
    a message) computed and returned once (:func:`jaxasync._src.xla.jit_unique_outputs`): the
    worker consumes a handler's messages and writes before it passes the state on.
    """
    import jax

    from jaxasync._src import xla as xla_lib

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    out_tree = jax.tree.structure(out_shape)
    consts = [jax.numpy.asarray(c) for c in closed.consts]
    jaxpr = closed.jaxpr

    @functools.partial(xla_lib.jit_unique_outputs, donate_argnums=(1,) if donate_first else ())
    def lifted(consts, *args):
        out = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    def call(*args):
        return lifted(consts, *args)

    return call


class Shared:
    """Handles of the shared objects of one run (attached in workers, created in the parent).

    Attributes:
      ctrl: ``AtomicArray`` of control cells.
      counters: ``AtomicArray`` of ``n * NCOUNT`` per-node counters.
      reports: per node, a ``uint8`` ``Register`` holding the node's state as raw bytes.
      buffers: ``{name: ParamBuffer}`` for each :class:`~jaxasync._src.program.Buffer`.
      registers: ``{name: [[Register] * slots] * n]}`` for each ``Registers`` object (``uint8``).
      transport: the message transport (see :mod:`.transport`).
      tallies: ``{name: [Register] * n}`` (float64, ``buffer size + 3``) per buffer when lost
        updates are measured, else ``{}``: what each node added to the buffer (see
        :class:`Tally`), written once when the node stops.
    """

    def __init__(self, ctrl, counters, reports, buffers, registers, transport, tallies=None):
        self.ctrl, self.counters, self.reports = ctrl, counters, reports
        self.buffers, self.registers, self.transport = buffers, registers, transport
        self.tallies = tallies or {}

    def names(self) -> list:
        out = [self.ctrl.name, self.counters.name] + [r.name for r in self.reports]
        out += [b.name for b in self.buffers.values()]
        out += [r.name for rows in self.registers.values() for row in rows for r in row]
        out += [r.name for row in self.tallies.values() for r in row]
        out += self.transport.names
        return out

    def close(self) -> None:
        """Closes (and, in the creating process, unlinks) every segment; idempotent."""
        tallies = [r for row in self.tallies.values() for r in row]
        for obj in [self.ctrl, self.counters, *self.reports, *self.buffers.values(), *tallies]:
            obj.__exit__(None, None, None)
        for rows in self.registers.values():
            for row in rows:
                for r in row:
                    r.__exit__(None, None, None)
        self.transport.close()


class Pace:
    """The clock of a straggler with factor ``f``: like a processor ``f`` times slower at steps.

    A round (the messages waiting, then one step) is due ``c + (f - 1) s`` seconds after it began,
    ``c`` being the CPU time of the whole round and ``s`` that of its step (CPU time, unlike wall
    time, does not grow with the machine's load); the straggler sleeps until then. A round begins
    when the previous one was due (:meth:`kept`), so the time a round loses waiting for a core (a
    machine with fewer cores than workers) or oversleeping counts toward the next one's slow-down
    instead of adding to it; a round that took longer than its due time is not made up for. A
    round without a step (waiting for messages) begins the clock anew.

    Args:
      factor: ``f``; 1 is a normal worker (its rounds are due when they end).
      clock, cpu_clock: wall and CPU clocks in seconds (``time.perf_counter``, ``time.process_time``).
    """

    def __init__(self, factor: float, clock=time.perf_counter, cpu_clock=time.process_time):
        self.factor, self.clock, self.cpu_clock = float(factor), clock, cpu_clock
        self.begin, self.begin_cpu, self._kept = clock(), cpu_clock(), False
        self._due = self._asked = self.begin

    def round(self) -> None:
        """A round begins (where the last one was due if it kept the pace, else now)."""
        if not self._kept:
            self.begin, self.begin_cpu = self.clock(), self.cpu_clock()
        self._kept = False

    def due(self, step_cpu: float, cpu_now: float) -> float:
        """When this round is due (wall clock), its step having taken ``step_cpu`` CPU seconds and
        the process's CPU clock reading ``cpu_now`` at its end."""
        self._due = self.begin + (cpu_now - self.begin_cpu) + (self.factor - 1.0) * step_cpu
        self._asked = self.clock()
        return self._due

    def kept(self) -> None:
        """The round is over (slept until :meth:`due`): the next begins when this one was due, or
        when :meth:`due` was asked if that is later (an overrun is not carried over; oversleeping
        is)."""
        self.begin, self.begin_cpu, self._kept = max(self._due, self._asked), self.cpu_clock(), True


class Tally:
    """What one node added to one shared buffer, in float64, to measure lost updates.

    ``applied`` is the sum of every delta the node handed to the buffer (dense or sparse);
    ``mass`` the sum of their absolute values, ``elements`` the number of element updates and
    ``adds`` the number of add calls. The parent compares the buffer's net change with the sum of
    all nodes' ``applied``: in ``"atomic"`` mode they agree up to float32 rounding of the buffer,
    in ``"racy"`` / ``"relaxed"`` mode the difference is the mass of overwritten updates.
    Costs two passes over each delta (~20 us per add at 19k parameters).
    """

    EXTRA = 3  # mass, elements, adds after the vector

    def __init__(self, size: int):
        self.applied = np.zeros(size, np.float64)
        self.mass = 0.0
        self.elements = 0
        self.adds = 0
        self._scratch = np.empty(size, np.float32)

    def add(self, delta: np.ndarray) -> None:
        np.add(self.applied, delta, out=self.applied)
        self.mass += float(np.abs(delta, out=self._scratch).sum(dtype=np.float64))
        self.elements += delta.size
        self.adds += 1

    def add_sparse(self, indices: np.ndarray, values: np.ndarray) -> None:
        np.add.at(self.applied, indices, values)  # repeated indices add up, as in the buffer
        self.mass += float(np.abs(values).sum(dtype=np.float64))
        self.elements += values.size
        self.adds += 1

    def packed(self) -> np.ndarray:
        return np.concatenate([self.applied, [self.mass, self.elements, self.adds]])

    @staticmethod
    def unpack(row: np.ndarray) -> tuple:
        """``(applied, mass, elements, adds)`` of a packed row."""
        v, (mass, elements, adds) = row[: -Tally.EXTRA], row[-Tally.EXTRA :]
        return v, float(mass), int(elements), int(adds)


def main(payload: bytes, conn) -> None:
    """Entry point of a worker process (``payload`` is the cloudpickled job description)."""
    import signal

    # The parent handles Ctrl-C and stops us through shared memory (we were started with SIGINT
    # ignored; keep it that way once jax is imported).
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # pragma: no cover - not the main thread
        pass
    worker = None
    try:
        import cloudpickle

        job = cloudpickle.loads(payload)
        worker = Worker(**job)
        worker.run()
        code = 0
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        code = 1
        try:
            conn.send(traceback.format_exc())
        except Exception:  # pragma: no cover - parent gone
            pass
    finally:
        if worker is not None:
            worker.close()
        try:
            conn.close()
        except Exception:  # pragma: no cover
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Worker:
    """One node of a run (see the module docstring)."""

    def __init__(
        self,
        *,
        program,
        problem,
        node: int,
        n: int,
        seed: int,
        shared: Shared,
        buffer_mode: str,
        straggler: float = 1.0,
        loss: float = 0.0,
        events=None,
    ):
        import jax
        import jax.numpy as jnp

        from jaxasync._src import program as program_lib
        from jaxasync._src import simulator as simulator_lib
        from jaxasync._src.runtime import transport as transport_lib

        self.jax, self.jnp, self.P = jax, jnp, program_lib
        self.program, self.problem = program, problem
        self.node, self.n, self.seed = node, n, seed
        self.shared = shared
        self.ctrl, self.counters = shared.ctrl, shared.counters
        self.row = node * NCOUNT
        self.buffer_mode = buffer_mode
        self.straggler = float(straggler)
        self.loss = float(loss)
        self.rng = np.random.default_rng([seed, node, 0x6A61])
        self.events = events
        self.endpoint = shared.transport.endpoint(node)
        self.channel_names = tuple(sorted(program.channels))
        self.out_tables = [
            np.asarray(program.channels[c].graph.out_table, np.int64).reshape(n, -1)
            for c in self.channel_names
        ]
        self.codecs = [
            transport_lib.Codec(program_lib.resolve(program.channels[c].payload, problem.init_params))
            for c in self.channel_names
        ]
        self.newest_only = [program.channels[c].newest_only for c in self.channel_names]
        self.seq = [0] * len(self.channel_names)
        self.pending = collections.deque()  # messages drained while blocked on a full mailbox
        self.stash = {}  # replay: (channel, src, seq) -> payload
        self.stats = dict.fromkeys(
            ["steps", "sent", "lost", "delivered", "dropped", "bytes", "stale_sum", "stale_max", "updates"],
            0,
        )
        self.read_version = 0
        self.reported = -1
        self.local_steps = 0
        self.cpu0 = time.process_time_ns()  # reset when the run starts
        self.inflight = collections.deque()  # `ready` outputs of dispatched, unconfirmed steps

        # Shared-object layout (as the simulator unravels them).
        self.buffer_names = [k for k, s in program.shared.items() if isinstance(s, program_lib.Buffer)]
        self.register_names = [k for k, s in program.shared.items() if isinstance(s, program_lib.Registers)]
        self.register_codecs = {
            k: transport_lib.Codec(program_lib.resolve(program.shared[k].template, problem.init_params))
            for k in self.register_names
        }
        self.visible = {}
        for k in self.register_names:
            vis = program.shared[k].visible
            self.visible[k] = np.ones(n, bool) if vis is None else np.asarray(vis, bool).reshape(n, n)[node]
        self.unravels = {}
        for k in self.buffer_names:
            spec = program.shared[k]
            template = problem.init_params if spec.template is None else spec.template
            self.unravels[k] = jax.flatten_util.ravel_pytree(template)[1]
        self.buffer_sizes = {k: shared.buffers[k].size for k in self.buffer_names}
        self.tallies = {k: Tally(self.buffer_sizes[k]) for k in shared.tallies}
        # Programs without shared objects and without their own observe skip the observe call.
        self.needs_observe = bool(program.shared) or program.observe is not program_lib.no_observe
        # A program that is always ready, sends nothing and has no shared objects never needs the
        # step's result on the host: its steps are dispatched asynchronously (like a plain jitted
        # loop), with a sync every _SYNC_EVERY steps to bound the queue.
        self.always_ready = program.ready is program_lib.always_ready
        self.pipelined = self.always_ready and not program.channels and not program.shared
        # After each step a worker that interacts with others yields its core to a process waiting
        # for one (a no-op when none is): on a machine with fewer cores than workers they then
        # alternate step by step rather than by the scheduler's time slices (milliseconds), so a
        # message reaches a neighbour that was waiting for a core a step later, not a slice later,
        # and a straggler that wakes up gets a core at once. The straggler row of bench/runtime.py:
        # R-FAST / all-reduce 0.63-1.60x (median 1.59) -> 1.88-2.26x (median 1.96), 5 runs each.
        self.yields = not self.pipelined and hasattr(os, "sched_yield")

        self._build(simulator_lib)

    # ------------------------------------------------------------------ compiled handlers

    def _build(self, simulator_lib) -> None:
        from jaxasync._src import threefry

        jax, jnp, P = self.jax, self.jnp, self.P
        program, problem, node = self.program, self.problem, self.node
        seed, replay = self.seed, self.events is not None
        node32 = jnp.int32(node)
        # A step's minibatch key is fold_in(batch_key, step) and its handler key fold_in(handler_key,
        # step): one Threefry hash each per step, and none for a handler that ignores its key. The
        # two node keys are drawn once, here, as unrolled-Threefry keys (JAX's bits, see
        # jaxasync._src.threefry): on XLA:CPU JAX's own hash is a loop, ~10-20 us per hash.
        node_key = jax.random.fold_in(jax.random.key(seed, impl=threefry.KEY_IMPL), node32)
        batch_key, handler_key = jax.random.fold_in(node_key, 0), jax.random.fold_in(node_key, 1)
        # Server nodes (after the data nodes) never step; clip like the simulator does.
        data_node = jnp.int32(min(node, problem.num_nodes - 1))

        def flat_ops(emit):
            emit = P.Emit() if emit is None else emit
            ops = {}
            for name, op in dict(emit.ops).items():
                if isinstance(op, P.BufferAdd):
                    flat = jax.flatten_util.ravel_pytree(op.delta)[0].astype(jnp.float32)
                    op = P.BufferAdd(flat)
                elif isinstance(op, P.BufferAddSparse):
                    op = P.BufferAddSparse(
                        jnp.asarray(op.indices).astype(jnp.int32).reshape(-1),
                        jnp.asarray(op.values).astype(jnp.float32).reshape(-1),
                    )
                ops[name] = op
            outbox = {}
            for k, ob in dict(emit.outbox).items():  # checked as the simulator checks them
                if k not in program.channels:
                    raise ValueError(f"{program.name}: outbox on undeclared channel {k!r}")
                ch = program.channels[k]
                template = P.resolve(ch.payload, problem.init_params)
                what = f"{program.name}: outbox on channel {k!r}"
                P.check_outbox(ob, template, ch.graph.max_out_degree, what)
                outbox[k] = ob  # a BroadcastOutbox stays one payload: _send encodes it once
            return outbox, ops

        def step_fn(state, counter):
            if replay:
                k_batch, k_handler, _, _ = simulator_lib.event_keys(seed, counter)
            else:
                k_batch = jax.random.fold_in(batch_key, counter)
                k_handler = jax.random.fold_in(handler_key, counter)
            batch = problem.sample(k_batch, data_node)
            state, emit = program.step(state, problem.grad_fn, batch, k_handler)
            outbox, ops = flat_ops(emit)
            return state, outbox, ops, program.ready(state)

        def observe_fn(state, buffers, registers):
            views = {}
            for k in self.buffer_names:
                views[k] = self.unravels[k](buffers[k])
            for k in self.register_names:
                views[k] = registers[k]
            state = program.observe(state, views)
            return state, program.ready(state)

        def make_receive(cname):
            def receive_fn(state, slot, seq, payload):
                msg = P.Message(slot, seq, payload)
                state, emit = program.receive[cname](state, msg)
                outbox, ops = flat_ops(emit)
                return state, outbox, ops, program.ready(state)

            return receive_fn

        def make_receive_many(cname):
            # BATCH messages of one channel in one call (the first `count` are real). Exact: the
            # handlers run in order and receive handlers read no shared object, so applying their
            # operations after the batch (in order) changes nothing they see.
            # A loop of `count` iterations (not BATCH with the state selected after each handler:
            # that select rewrote the whole state BATCH times, ~40 us per call for R-FAST at d=1000);
            # the outputs of message j land in row j (rows from `count` on stay zero, unread).
            def receive_many_fn(state, slots, seqs, payloads, count):
                def one(st, j):
                    payload = jax.tree.map(lambda p: p[j], payloads)
                    new, emit = program.receive[cname](st, P.Message(slots[j], seqs[j], payload))
                    return new, flat_ops(emit)

                out_shape = jax.eval_shape(one, state, jnp.int32(0))[1]
                outs0 = jax.tree.map(lambda a: jnp.zeros((BATCH, *a.shape), a.dtype), out_shape)

                def body(j, carry):
                    st, outs = carry
                    st, out = one(st, j)
                    outs = jax.tree.map(lambda o, v: o.at[j].set(v), outs, out)
                    return st, outs

                state, (outboxes, opss) = jax.lax.fori_loop(0, count, body, (state, outs0))
                return state, outboxes, opss, program.ready(state)

            return receive_many_fn

        def init_fn(key):
            return program.init(node32, problem.init_params, key)

        node_keys, _ = simulator_lib.init_keys(seed, self.n)
        state = jax.jit(init_fn)(node_keys[node])
        self.state = state
        i32 = jnp.int32(0)
        # Every handler donates the state it is given (the worker keeps only the newest state), so
        # XLA updates it in place instead of allocating a new model-sized buffer per event.
        self.step_fn = lift_jit(step_fn, state, i32, donate_first=True)
        buffers0, registers0 = self._read_views()
        self.observe_fn = lift_jit(observe_fn, state, buffers0, registers0, donate_first=True)
        self.receive_fns, self.receive_many_fns = [], []
        zb = np.zeros(BATCH, np.int32)
        for ci, cname in enumerate(self.channel_names):
            payload0 = self.codecs[ci].decode(np.zeros(self.codecs[ci].size, np.uint8))
            self.receive_fns.append(
                lift_jit(make_receive(cname), state, i32, i32, payload0, donate_first=True)
            )
            if self.events is None:  # free mode batches floods of messages
                payloads0 = self.codecs[ci].decode(
                    np.zeros((BATCH, self.codecs[ci].size), np.uint8), (BATCH,)
                )
                self.receive_many_fns.append(
                    lift_jit(make_receive_many(cname), state, zb, zb, payloads0, i32, donate_first=True)
                )

        # Always-ready programs whose receive handlers only update the state (R-FAST, gossip):
        # the messages waiting at a step run in the same compiled call as the step, one dispatch
        # per round instead of one per channel plus one. Exact: the handlers run first, in order,
        # and have no operations or messages to apply after them.
        self.fused_fn = None
        self.quiet = [
            self._receive_is_quiet(make_receive(c), state, ci) for ci, c in enumerate(self.channel_names)
        ]
        if self.receive_many_fns and self.always_ready and self.straggler == 1.0 and all(self.quiet):
            many = [make_receive_many(c) for c in self.channel_names]

            def fused_fn(state, counter, slots, seqs, payloads, counts):
                for ci, fn in enumerate(many):
                    state = fn(state, slots[ci], seqs[ci], payloads[ci], counts[ci])[0]
                return step_fn(state, counter)

            fused0 = (
                np.zeros((len(many), BATCH), np.int32),  # slots
                np.zeros((len(many), BATCH), np.int32),  # seqs
                tuple(c.decode(np.zeros((BATCH, c.size), np.uint8), (BATCH,)) for c in self.codecs),
                np.zeros(len(many), np.int32),  # counts
            )
            self.fused_fn = lift_jit(fused_fn, state, i32, *fused0, donate_first=True)

        def copy():  # a warm-up call consumes (donates) its state: give it a copy
            return jax.tree.map(jnp.copy, state)

        # Warm up (compile) every handler on the initial state; results are discarded (pure).
        jax.block_until_ready(self.step_fn(copy(), i32))
        for ci, fn in enumerate(self.receive_fns):
            payload0 = self.codecs[ci].decode(np.zeros(self.codecs[ci].size, np.uint8))
            jax.block_until_ready(fn(copy(), i32, i32, payload0))
        for ci, fn in enumerate(self.receive_many_fns):
            payloads0 = self.codecs[ci].decode(np.zeros((BATCH, self.codecs[ci].size), np.uint8), (BATCH,))
            jax.block_until_ready(fn(copy(), zb, zb, payloads0, i32))
        if self.fused_fn is not None:
            jax.block_until_ready(self.fused_fn(copy(), i32, *fused0))
        # The initial observe is real: the simulator observes once after init.
        self.read_version = self.ctrl.load(VERSION)
        state, ready = self.observe_fn(state, buffers0, registers0)
        self.state, self.ready = state, bool(ready)
        from jaxasync._src.runtime import transport as transport_lib

        self.state_codec = transport_lib.Codec(state)

    def _receive_is_quiet(self, receive_fn, state, ci: int) -> bool:
        """True if the receive handler of channel ``ci`` emits no message and no operation."""
        payload = self.codecs[ci].decode(np.zeros(self.codecs[ci].size, np.uint8))
        i32 = self.jnp.int32(0)
        _, outbox, ops, _ = self.jax.eval_shape(receive_fn, state, i32, i32, payload)
        return not self.jax.tree.leaves((outbox, ops))

    # ------------------------------------------------------------------ shared objects

    def _read_views(self):
        buffers = {}
        for k in self.buffer_names:
            out = np.empty(self.buffer_sizes[k], np.float32)  # fresh: jax may alias it
            buffers[k] = self.shared.buffers[k].read(out)
        registers = {}
        for k in self.register_names:
            regs = self.shared.registers[k]
            slots = len(regs[0])
            codec = self.register_codecs[k]
            raw = np.zeros((self.n, slots, codec.size), np.uint8)
            tags = np.full((self.n, slots), -1, np.int32)
            for owner in range(self.n):
                if not self.visible[k][owner]:
                    continue
                for s in range(slots):
                    tag, _ = regs[owner][s].read(raw[owner, s])
                    tags[owner, s] = tag
            registers[k] = self.P.RegistersView(tags, codec.decode(raw, (self.n, slots)))
        return buffers, registers

    def _apply_ops(self, ops: dict, count_staleness: bool) -> None:
        P = self.P
        for name in self.program.shared:
            op = ops.get(name)
            if op is None:
                continue
            tally = self.tallies.get(name)
            if isinstance(op, P.BufferAdd):
                delta = np.asarray(op.delta)
                self.shared.buffers[name].add(delta, mode=self.buffer_mode)
                if tally is not None:
                    tally.add(delta)
            elif isinstance(op, P.BufferAddSparse):
                indices, values = np.asarray(op.indices), np.asarray(op.values)
                self.shared.buffers[name].add_sparse(indices, values, mode=self.buffer_mode)
                if tally is not None:
                    tally.add_sparse(indices, values)
            elif isinstance(op, P.RegisterWrite):
                if bool(op.mask):
                    regs = self.shared.registers[name][self.node]
                    slot = int(op.slot)
                    codec = self.register_codecs[name]
                    value = codec.encode(codec.host_leaves(op.value))
                    regs[slot].write(value, int(op.tag))
                continue
            else:
                raise TypeError(f"{self.program.name}: unsupported operation {type(op).__name__} on {name!r}")
            v = self.ctrl.fetch_add(VERSION, 1)
            if count_staleness:
                stale = v - self.read_version
                st = self.stats
                st["stale_sum"] += stale
                st["stale_max"] = max(st["stale_max"], stale)
                st["updates"] += 1

    # ------------------------------------------------------------------ messages

    def _drain(self) -> None:
        for msg in self.endpoint.poll():
            self.pending.append(msg)

    def _alive(self, node: int) -> bool:
        return self.ctrl.load(ALIVE0 + node) == 1

    def _send(self, outbox: dict) -> None:
        for ci, cname in enumerate(self.channel_names):
            ob = outbox.get(cname)
            if ob is None:
                continue
            mask = np.asarray(ob.mask)
            table = self.out_tables[ci][self.node]
            want = mask[: table.shape[0]] & (table >= 0)
            if not want.any():
                continue
            seq = self.seq[ci]
            self.seq[ci] += 1
            codec = self.codecs[ci]
            leaves = codec.host_leaves(ob.payload)
            # One payload for every slot: encoded once, the same bytes (never written again) sent on each.
            same = codec.encode(leaves) if isinstance(ob, self.P.BroadcastOutbox) else None
            for j in np.nonzero(want)[0]:
                dst = int(table[j])
                self.stats["sent"] += 1
                self.stats["bytes"] += codec.nbytes
                if self.loss and self.events is None and self.rng.random() < self.loss:
                    self.stats["lost"] += 1
                    continue
                buf = codec.encode(leaves, int(j)) if same is None else same
                self._send_one(ci, dst, seq, buf)

    def _send_one(self, ci: int, dst: int, seq: int, buf: np.ndarray) -> None:
        """Sends reliably: while the mailbox is full, drain our own inbox (no deadlock) and retry;
        give up (count ``dropped``) if the receiver died or the run is stopping."""
        wait = _IDLE_MIN
        while not self.endpoint.send(ci, dst, seq, buf):
            self.maybe_report()  # a blocked sender still answers its supervisor (and sees STOP)
            if not self._alive(dst) or self.ctrl.load(STOP):
                self.stats["dropped"] += 1
                return
            self._drain()
            time.sleep(wait)
            wait = min(2 * wait, _IDLE_MAX)

    # ------------------------------------------------------------------ events

    def _after_ops_and_state(self, state, outbox, ops, step: bool):
        # np.asarray per leaf, not jax.device_get: that starts an asynchronous copy of every leaf
        # before reading them, ~12 us per leaf more on XLA:CPU (an R-FAST step has 4 such leaves).
        outbox, ops = self.jax.tree.map(np.asarray, (outbox, ops))
        self._apply_ops(ops, count_staleness=step)
        if step and self.needs_observe:
            buffers, registers = self._read_views()
            self.read_version = self.ctrl.load(VERSION)
            state, ready = self.observe_fn(state, buffers, registers)
            self.ready = bool(ready)
        self.state = state
        self._send(outbox)

    def do_step(self, counter: int) -> None:
        if self.fused_fn is not None and self.pending:
            state, outbox, ops, ready = self._step_with_inbox(counter)
        else:
            state, outbox, ops, ready = self.step_fn(self.state, np.int32(counter))
        self.local_steps += 1
        if self.pipelined:
            # Dispatched, not done: the step counter only counts completed steps. The queue of
            # dispatched steps is bounded by waiting for the step _SYNC_EVERY steps back (its
            # `ready` output, which is not donated), never for the newest one: the queue never
            # drains, so a late wake-up of this thread does not leave the compute thread idle.
            self.state = state
            if self.straggler != 1.0:
                self.sync()
                return
            self.inflight.append(ready)
            if len(self.inflight) > _SYNC_EVERY:
                self.inflight.popleft().block_until_ready()
                self.stats["steps"] = self.local_steps - len(self.inflight)
            return
        if not self.always_ready:
            self.ready = bool(ready)
        self._after_ops_and_state(state, outbox, ops, step=True)
        self.stats["steps"] = self.local_steps

    def _take_pending(self) -> list:
        """The drained messages, without those a newer waiting one makes redundant (channels
        declared ``newest_only``: only the newest message of each edge changes the state). The
        skipped ones arrived at a live node: they count as delivered."""
        msgs = list(self.pending)
        self.pending.clear()
        if not any(self.newest_only):
            return msgs
        newest = {}
        for m in msgs:
            if self.newest_only[m.channel]:
                key = (m.channel, m.src)
                if key not in newest or m.seq > newest[key].seq:
                    newest[key] = m
        keep = [m for m in msgs if not self.newest_only[m.channel] or newest[(m.channel, m.src)] is m]
        self.stats["delivered"] += len(msgs) - len(keep)
        return keep

    def _step_with_inbox(self, counter: int):
        """The pending messages (the last BATCH of each channel; earlier ones first, batched) and
        the step, in one compiled call (see ``fused_fn`` in ``_build``)."""
        by_channel = collections.defaultdict(list)
        for m in self._take_pending():
            by_channel[m.channel].append(m)
        nch = len(self.codecs)
        slots, seqs = np.zeros((nch, BATCH), np.int32), np.zeros((nch, BATCH), np.int32)
        counts = np.zeros(nch, np.int32)
        payloads = []
        for ci, codec in enumerate(self.codecs):
            ms = by_channel.get(ci, [])
            while len(ms) > BATCH:  # a flood: the earliest in full batches first
                self.do_receive_many(ci, ms[:BATCH])
                ms = ms[BATCH:]
            raw = np.zeros((BATCH, codec.size), np.uint8)
            for j, m in enumerate(ms):
                raw[j], slots[ci, j], seqs[ci, j] = m.payload, m.slot, m.seq
            counts[ci] = len(ms)
            payloads.append(codec.decode(raw, (BATCH,)))
        self.stats["delivered"] += int(counts.sum())
        return self.fused_fn(self.state, np.int32(counter), slots, seqs, tuple(payloads), counts)

    def sync(self) -> None:
        """Waits for the dispatched steps; from then on they count in ``stats["steps"]``."""
        if self.stats["steps"] != self.local_steps:
            self.jax.block_until_ready(self.state)
            self.inflight.clear()
            self.stats["steps"] = self.local_steps

    def do_receive(self, msg) -> None:
        ci = msg.channel
        payload = self.codecs[ci].decode(msg.payload)
        state, outbox, ops, ready = self.receive_fns[ci](
            self.state, np.int32(msg.slot), np.int32(msg.seq), payload
        )
        if not self.always_ready:  # reading it waits for the handler; otherwise it runs async
            self.ready = bool(ready)
        self.stats["delivered"] += 1
        if self.quiet[ci]:
            self.state = state
            return
        self._after_ops_and_state(state, outbox, ops, step=False)

    def do_receive_many(self, ci: int, msgs: list) -> None:
        """Up to BATCH messages of channel ``ci`` in one compiled call."""
        k = len(msgs)
        codec = self.codecs[ci]
        raw = np.zeros((BATCH, codec.size), np.uint8)
        slots, seqs = np.zeros(BATCH, np.int32), np.zeros(BATCH, np.int32)
        for j, m in enumerate(msgs):
            raw[j], slots[j], seqs[j] = m.payload, m.slot, m.seq
        payloads = codec.decode(raw, (BATCH,))
        state, outboxes, opss, ready = self.receive_many_fns[ci](
            self.state, slots, seqs, payloads, np.int32(k)
        )
        if not self.always_ready:
            self.ready = bool(ready)
        self.state = state
        self.stats["delivered"] += k
        if self.quiet[ci]:  # the handler emits nothing: no per-message work (and no wait)
            return
        outboxes, opss = self.jax.tree.map(np.asarray, (outboxes, opss))
        for j in range(k):
            pick = functools.partial(_row, j)
            self._apply_ops(self.jax.tree.map(pick, opss), count_staleness=False)
            self._send(self.jax.tree.map(pick, outboxes))

    def receive_pending(self) -> bool:
        """Handles the messages drained so far (batched per channel); True if there were any."""
        if not self.pending:
            return False
        msgs = self._take_pending()
        if not self.receive_many_fns:
            for m in msgs:
                self.do_receive(m)
            return True
        by_channel = collections.defaultdict(list)
        for m in msgs:  # per channel in arrival order (arrival order across mailboxes is arbitrary)
            by_channel[m.channel].append(m)
        for ci, ms in sorted(by_channel.items()):
            for start in range(0, len(ms), BATCH):
                chunk = ms[start : start + BATCH]
                if len(chunk) == 1:
                    self.do_receive(chunk[0])
                else:
                    self.do_receive_many(ci, chunk)
        return True

    # ------------------------------------------------------------------ reporting

    def publish_counters(self, full: bool = True) -> None:
        """Stores the counters in our row (only the step count unless ``full``)."""
        c, r, st = self.counters, self.row, self.stats
        c.store(r + C_STEPS, st["steps"])
        if not full:
            return
        c.store(r + C_SENT, st["sent"])
        c.store(r + C_LOST, st["lost"])
        c.store(r + C_DELIVERED, st["delivered"])
        c.store(r + C_DROPPED, st["dropped"])
        c.store(r + C_BYTES, st["bytes"])
        c.store(r + C_STALE_SUM, st["stale_sum"])
        c.store(r + C_STALE_MAX, st["stale_max"])
        c.store(r + C_UPDATES, st["updates"])
        # CPU time of all this process's threads since the start (a load-robust measure of work).
        c.store(r + C_CPU_US, (time.process_time_ns() - self.cpu0) // 1000)

    def maybe_report(self, force: bool = False) -> None:
        """Publishes the state (raw bytes, tag = request number) if the parent asked for it."""
        want = self.ctrl.load(REQUEST)
        if want <= self.reported and not force:
            return
        buf = self.state_codec.encode(self.state_codec.host_leaves(self.state))
        self.publish_counters()
        self.shared.reports[self.node].write(buf, want)
        self.reported = want
        self.counters.store(self.row + C_REPORTED, want)

    # ------------------------------------------------------------------ loops

    def run(self) -> None:
        self.maybe_report(force=True)  # the initial state, before we say we are ready
        self.counters.store(self.row + C_STATUS, STATUS_READY)
        while not self.ctrl.load(START):  # the parent starts everybody at once
            if self.ctrl.load(STOP):
                return
            time.sleep(2e-4)
        self.cpu0 = time.process_time_ns()
        self.counters.store(self.row + C_STATUS, STATUS_RUNNING)
        if self.events is None:
            self._free()
        else:
            self._replay()
        self.sync()
        for k, tally in self.tallies.items():  # after our last add (the parent reads them after join)
            self.shared.tallies[k][self.node].write(tally.packed(), 1)
        self.publish_counters()
        self.counters.store(self.row + C_STATUS, STATUS_DONE)
        self.maybe_report()

    def _out_of_steps(self) -> None:
        """The global step budget is used up: finish our steps and stamp the time (the parent's
        wall time of a step-limited run ends at the last stamp)."""
        self.sync()
        self.publish_counters()
        self.counters.store(self.row + C_FINISH, time.monotonic_ns())

    def _free(self) -> None:
        ctrl, row, counters = self.ctrl, self.row, self.counters
        messages = bool(self.channel_names)
        stepping = True
        idle = _IDLE_MIN
        rounds = 0
        pace = Pace(self.straggler)
        while True:
            did = stepped = False
            pace.round()
            # One round: the messages that are here now, then (if ready) one step. Bounding the
            # receives per round keeps a node that is flooded by faster neighbours stepping.
            if messages:
                self._drain()
                if not (stepping and self.fused_fn is not None):  # else the step receives them
                    did = self.receive_pending()
            self.maybe_report()
            if ctrl.load(STOP):
                return
            if stepping and self.ready:
                counters.store(row + C_BUSY, 1)
                claim = ctrl.fetch_add(CLAIMED, 1)
                limit = ctrl.load(LIMIT)  # read at each claim: the MPI runtime lowers it to halt a node
                if limit >= 0 and claim >= limit:
                    counters.store(row + C_BUSY, 0)
                    stepping = False
                    self.receive_pending()
                    self._out_of_steps()
                elif self.straggler != 1.0:
                    self.jax.block_until_ready(self.state)  # queued receives are not this step's work
                    c0 = time.process_time()
                    self.do_step(self.local_steps)
                    c1 = time.process_time()
                    counters.store(row + C_STEPS, self.stats["steps"])  # before BUSY: see below
                    counters.store(row + C_BUSY, 0)
                    self.publish_counters(full=messages)
                    if not self._straggle(pace.due(c1 - c0, c1) - time.perf_counter()):
                        return
                    pace.kept()
                    did = True
                else:
                    self.do_step(self.local_steps)
                    # The step count is published before BUSY is cleared: the step of a worker
                    # killed around here counts as done or as a lost claim (or, between the two
                    # stores, both), never as neither (the parent would wait for it until the
                    # stall timeout).
                    counters.store(row + C_STEPS, self.stats["steps"])
                    counters.store(row + C_BUSY, 0)
                    did = stepped = True
            if did:
                rounds += 1
                self.publish_counters(full=messages or rounds % 8 == 0)
                idle = _IDLE_MIN
                if stepped and self.yields:
                    os.sched_yield()
            else:
                self.publish_counters()
                time.sleep(idle)
                idle = min(2 * idle, _IDLE_MAX)

    def _straggle(self, seconds: float) -> bool:
        """A straggler's extra time after a step (until its :class:`Pace` says the round is due),
        spent like a slower processor would spend it, busy with the step: messages wait in the
        mailboxes until its next round (which handles them before stepping, batched); it still
        answers report requests and the stop flag every few ms. Returns False if the run is
        stopping."""
        end = time.perf_counter() + seconds
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return True
            time.sleep(min(left, _STRAGGLE_SLICE))
            self.maybe_report()
            if self.ctrl.load(STOP):
                return False

    def _replay(self) -> None:
        ev = self.events
        mine = np.nonzero(ev.node == self.node)[0]
        for e in mine:
            idle = _IDLE_MIN
            while self.ctrl.load(TURN) != e:
                self._stash_incoming()
                self.maybe_report()
                if self.ctrl.load(STOP):
                    return
                time.sleep(idle)
                idle = min(2 * idle, 2e-4)
            kind = int(ev.kind[e])
            if bool(ev.live[e]) and kind >= 0:
                if kind == 0:
                    self.do_step(int(ev.event[e]))
                else:
                    key = (kind - 1, int(ev.src[e]), int(ev.seq[e]))
                    idle = _IDLE_MIN
                    while key not in self.stash:
                        self._stash_incoming()
                        if key in self.stash:
                            break
                        if self.ctrl.load(STOP):
                            return
                        time.sleep(idle)
                        idle = min(2 * idle, 2e-4)
                    self.do_receive(self.stash.pop(key))
            self.publish_counters()
            self.ctrl.store(TURN, int(e) + 1)
        # Our part is done; keep answering report requests until the parent stops the run.
        while not self.ctrl.load(STOP):
            self._stash_incoming()
            self.maybe_report()
            time.sleep(1e-3)

    def _stash_incoming(self) -> None:
        self._drain()
        while self.pending:
            m = self.pending.popleft()
            self.stash[(m.channel, m.src, m.seq)] = m

    def close(self) -> None:
        for obj in (self.endpoint, self.shared):
            try:
                obj.close()
            except Exception:  # pragma: no cover
                pass
