"""The local multi-process runtime: one OS process per node, shared memory in the native core.

:func:`run` executes a :class:`~jaxasync._src.program.NodeProgram` for real: it spawns one worker
process per node (``multiprocessing`` "spawn" context, one XLA / BLAS thread each), places the
program's shared objects (:class:`~jaxasync._src.program.Buffer` -> ``ParamBuffer``,
:class:`~jaxasync._src.program.Registers` -> one ``Register`` per owner and slot) and one mailbox per
directed edge of every channel in POSIX shared memory, supervises the workers, samples metrics and
returns the simulator's :class:`~jaxasync._src.trace.Trace` with wall-clock time. Each worker is
sent only its own data shard.
:func:`replay` drives the same processes through an event log recorded by
:func:`jaxasync._src.simulator.record` and returns the final parameters, which match the
simulator's: one algorithm definition, two executors.

Semantics (what differs from the simulator, and why):

* **Asynchrony** is real: the operating system interleaves the workers (each yields its core
  after a step to a process waiting for one, see :mod:`.worker`). From an
  :class:`~jaxasync._src.asynchrony.Asynchrony` the runtime injects ``stragglers`` (a worker with
  factor ``f`` is paced like a processor ``f`` times slower at steps: after each step it sleeps
  until its round (the messages it handled, then the step) has lasted the round's CPU time plus
  ``f - 1`` times the step's, counted from when the previous round was due, so time lost waiting
  for a core or oversleeping is part of the slow-down rather than added to it
  (:class:`~jaxasync._src.runtime.worker.Pace`); messages that arrive meanwhile wait until its
  next round, which handles them before the next step; CPU time, unlike wall time, does not grow
  with the machine's load),
  ``loss`` (a Bernoulli draw per message before it is sent, counted in ``lost`` and, like the
  messages delivered, in ``bytes_sent``; their bytes in ``bytes_lost``)
  and ``crashes`` (``{node: seconds}``: the parent SIGKILLs that worker at that wall-clock time).
  ``compute_time`` and ``delay`` describe simulated time and are ignored here.
* **Messages** are never dropped for lack of room: a sender whose mailbox is full drains its own
  inbox (so two senders blocked on each other both make progress) and retries; it gives up, counting
  ``dropped``, only if the receiver is dead or the run is stopping. So the algorithms that need
  reliable delivery (all-reduce, DASGD, AsGrad's jobs) get it, and injected loss is the only loss.
* **Shared buffers** apply ``BufferAdd`` / ``BufferAddSparse`` in ``buffer_mode``: ``"atomic"``
  (default: compare-and-swap per element, no update is lost, so runs are comparable with the
  simulator), ``"relaxed"`` or ``"racy"`` (true Hogwild!: plain stores, concurrent updates of an
  element may be lost). Staleness is the number of buffer updates (by anyone) between a worker's
  read (``observe``) and each of its writes, from a shared counter, as in the simulator. Lost
  updates are measured exactly, not sampled: each worker sums the deltas it added (float64) and
  the parent compares their total with the buffer's net change when the run ends
  (``meta["lost_updates"]``; on by default in the modes that can lose updates).
* **Keys**: ``init`` gets :func:`~jaxasync._src.simulator.init_keys` like the simulator; the ``k``-th
  local step of node ``i`` gets ``fold_in(fold_in(key(seed), i), k)`` split into (batch, handler)
  keys. Deterministic per node; the interleaving is not.
* **Stopping**: ``steps`` is global and exact: a worker claims each step on a shared counter before
  running it, so the run completes exactly ``steps`` local steps (minus steps a killed worker had
  claimed). ``time_limit`` (seconds) and ``target_loss`` (checked at each record) stop it too.
* **Metrics**: every ``record_every`` seconds the parent asks the workers for their states (raw
  bytes in a per-node register), stacks them and computes the simulator's metrics with the same
  rules: ``program.evaluate(states, views)`` if defined, else the average of the live nodes' params;
  ``program.metrics(states)`` are added. A crashed node's last reported state stays in the stack.

Crash and error handling: a worker that raises makes :func:`run` stop everyone and raise
``RuntimeError("worker i failed: <its traceback>")``; a worker that dies by a signal is recorded
(``alive`` in the trace, ``meta["crashed"]``) if ``program.crash_tolerant``, otherwise the run stops
with a ``RuntimeError`` naming it. Ctrl-C (SIGINT to the parent) stops the workers and returns the
partial trace (``meta["interrupted"] = True``). The parent creates every segment and removes all of
them, and every child, on every exit path.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from jaxasync._src import progress as progress_lib
from jaxasync._src.runtime import transport as transport_lib
from jaxasync._src.runtime import worker as worker_lib

_MODES = ("atomic", "relaxed", "racy")
_POLL = 5e-3  # seconds between two supervision rounds of the parent (crash times: +- this)
_POLL_IDLE = 2e-2  # ... when no crash, record or time limit is due sooner (the parent shares the cores)


class WorkerError(RuntimeError):
    """A worker process failed (its traceback is in the message) or died unexpectedly."""


# ---------------------------------------------------------------------------------------- checks


def _check_args(algorithm, problem, workers, asynchrony, steps, time_limit, buffer_mode, transport):
    from jaxasync._src import program as program_lib

    if not isinstance(algorithm, program_lib.NodeProgram):
        raise TypeError(f"algorithm must be a NodeProgram, got {type(algorithm).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    workers = int(workers)
    if algorithm.num_nodes is not None and workers > algorithm.num_nodes:
        raise ValueError(
            f"{algorithm.name}: {workers} workers requested but the algorithm's topology has only "
            f"{algorithm.num_nodes} nodes"
        )
    for cname, ch in sorted(algorithm.channels.items()):
        if workers > ch.graph.n:
            raise ValueError(
                f"{algorithm.name}: {workers} workers requested but the topology of channel "
                f"{cname!r} has only {ch.graph.n} nodes"
            )
    algorithm.check_nodes(workers)
    if not hasattr(problem, "num_nodes") or not hasattr(problem, "sample"):
        raise TypeError(f"problem must be a jaxasync.Problem, got {type(problem).__name__}")
    servers = int(getattr(algorithm, "num_servers", 0))
    if problem.num_nodes + servers != workers:
        extra = f" plus {servers} data-less server(s)" if servers else ""
        raise ValueError(
            f"the problem has {problem.num_nodes} data shard(s){extra} but {workers} workers were "
            f"requested (one shard per worker{extra and ', plus the servers'})"
        )
    if asynchrony is not None:
        asynchrony.check_nodes(workers)
        if asynchrony.crashes and not algorithm.crash_tolerant:
            pass  # allowed: the run then fails with a clear error when the crash happens
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1
    ):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit!r}")
    if steps is None and time_limit is None:
        raise ValueError("pass steps and/or time_limit (target_loss alone might never be reached)")
    if buffer_mode not in _MODES:
        raise ValueError(f"buffer_mode must be one of {_MODES}, got {buffer_mode!r}")
    transport_cls = _transport_class(transport)
    if (algorithm.shared or algorithm.needs_shared_memory) and not getattr(
        transport_cls, "provides_shared_memory", False
    ):
        raise ValueError(
            f"{algorithm.name} needs shared memory (shared objects {sorted(algorithm.shared)}) but the "
            f"{getattr(transport_cls, '__name__', transport_cls)} transport does not provide it; "
            "use the local 'shm' transport"
        )
    for name, spec in algorithm.shared.items():
        if isinstance(spec, program_lib.Registers) and spec.slots < 1:
            raise ValueError(f"{algorithm.name}: registers {name!r} need slots >= 1")
    return workers, transport_cls


def _transport_class(transport):
    if transport is None:
        transport = "shm"
    if isinstance(transport, str):
        if transport == "mpi":
            raise ValueError(
                "transport='mpi' runs one node per MPI rank: call jaxasync.run_mpi(...) in every rank "
                "under `mpiexec -n N python script.py` (or `mpiexec -n N jaxasync run --transport mpi`)"
            )
        try:
            return transport_lib.TRANSPORTS[transport]
        except KeyError:
            raise ValueError(
                f"unknown transport {transport!r}; expected one of {sorted(transport_lib.TRANSPORTS)}"
            ) from None
    if not hasattr(transport, "create"):
        raise TypeError(f"transport must be a name or a transport class with create(), got {transport!r}")
    return transport


# ---------------------------------------------------------------------------------------- setup


class _Layout:
    """Host-side facts about a program on a problem: templates, codecs, the state structure."""

    def __init__(self, algorithm, problem, n: int, seed: int):
        import jax
        import jax.numpy as jnp

        from jaxasync._src import program as program_lib
        from jaxasync._src import simulator as simulator_lib

        self.n = n
        self.channel_names = tuple(sorted(algorithm.channels))
        self.graphs = [algorithm.channels[c].graph for c in self.channel_names]
        self.payload_codecs = [
            transport_lib.Codec(program_lib.resolve(algorithm.channels[c].payload, problem.init_params))
            for c in self.channel_names
        ]
        node_keys, _ = simulator_lib.init_keys(seed, n)
        self.state_shape = jax.eval_shape(
            lambda k: algorithm.init(jnp.int32(0), problem.init_params, k), node_keys[0]
        )
        self.state_codec = transport_lib.Codec(self.state_shape)
        self.buffers, self.unravels, self.registers = {}, {}, {}
        for name, spec in algorithm.shared.items():
            if isinstance(spec, program_lib.Buffer):
                template = problem.init_params if spec.template is None else spec.template
                self.buffers[name] = jax.tree.map(np.asarray, template)
                self.unravels[name] = jax.flatten_util.ravel_pytree(template)[1]
            else:
                template = program_lib.resolve(spec.template, problem.init_params)
                self.registers[name] = (spec, transport_lib.Codec(template))


def _create_shared(layout: _Layout, transport_cls, capacity, tallies: bool = False) -> worker_lib.Shared:
    from jaxasync._src import shm as shm_lib

    made = []

    def keep(obj):
        made.append(obj)
        return obj

    try:
        n = layout.n
        ctrl = keep(shm_lib.AtomicArray.create(worker_lib.ALIVE0 + n))
        counters = keep(shm_lib.AtomicArray.create(n * worker_lib.NCOUNT))
        reports = [keep(shm_lib.Register.create(layout.state_codec.size, np.uint8)) for _ in range(n)]
        buffers = {k: keep(shm_lib.ParamBuffer.create(t)) for k, t in layout.buffers.items()}
        registers = {}
        for k, (spec, codec) in layout.registers.items():
            registers[k] = [
                [keep(shm_lib.Register.create(codec.size, np.uint8)) for _ in range(spec.slots)]
                for _ in range(n)
            ]
        transport = keep(
            transport_cls.create(layout.graphs, [c.nbytes for c in layout.payload_codecs], capacity)
        )
        tally = {}
        if tallies:
            for k, pb in buffers.items():
                size = pb.size + worker_lib.Tally.EXTRA
                tally[k] = [keep(shm_lib.Register.create(size, np.float64)) for _ in range(n)]
    except BaseException:
        for obj in made:
            with contextlib.suppress(Exception):
                obj.close() if hasattr(obj, "_boxes") else obj.__exit__(None, None, None)
        raise
    for i in range(n):
        ctrl.store(worker_lib.ALIVE0 + i, 1)
    ctrl.store(worker_lib.LIMIT, -1)
    return worker_lib.Shared(ctrl, counters, reports, buffers, registers, transport, tally)


def _shard_problem(problem, node: int):
    """The problem as worker ``node`` needs it: its own data shard only (servers get the last one,
    as the simulator clips their node id). Samples are the same: the shard's size and rows are.

    Only a plain :class:`jaxasync.Problem` is cut; anything else is shipped whole.
    """
    from jaxasync._src import problem as problem_lib

    if type(problem) is not problem_lib.Problem or problem.num_nodes == 1:
        return problem
    i = min(node, problem.num_nodes - 1)
    return problem_lib.Problem(
        problem.loss_fn, problem.init_params, [problem.shards[i]], problem.batch_size, name=problem.name
    )


_MISSING = object()


@contextlib.contextmanager
def _child_env(env: dict):
    """Sets ``env`` (and ignores SIGINT, which children inherit) while processes are started.

    It also hides the parent's ``__main__`` from the "spawn" start method: everything a worker
    needs is cloudpickled, so the child does not re-import the user's script (which would re-run an
    unguarded script, and costs time even when guarded). This makes ``run`` usable from scripts
    without ``if __name__ == "__main__"`` and from notebooks.
    """
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    main = threading.current_thread() is threading.main_thread()
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    main_mod = sys.modules.get("__main__")
    hidden = {}
    if main_mod is not None:
        for attr in ("__spec__", "__file__"):
            hidden[attr] = main_mod.__dict__.get(attr, _MISSING)
        main_mod.__spec__ = None
        main_mod.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        for attr, value in hidden.items():
            if value is _MISSING:
                main_mod.__dict__.pop(attr, None)
            else:
                setattr(main_mod, attr, value)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if main:
            signal.signal(signal.SIGINT, old_int)


def _platform() -> str | None:
    try:
        import jax

        return jax.default_backend()
    except Exception:  # pragma: no cover
        return None


class _Procs:
    """The worker processes, their error pipes and their fates."""

    def __init__(self, jobs: list, env: dict):
        import cloudpickle

        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        payloads = [cloudpickle.dumps(job) for job in jobs]
        with _child_env(env):
            for i, payload in enumerate(payloads):
                r, w = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=worker_lib.main, args=(payload, w), name=f"jaxasync-worker-{i}", daemon=True
                )
                self.procs.append(p)
                self.conns.append(r)
                p.start()
                w.close()
        self.dead = {}  # node -> exit code

    def traceback_of(self, i: int, wait: float = 0.0) -> str | None:
        conn = self.conns[i]
        try:
            if conn.poll(wait):
                return conn.recv()
        except (EOFError, OSError):
            return None
        return None

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                with contextlib.suppress(Exception):
                    p.kill()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.join(5)
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))


def _describe_exit(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------- metrics


class _Metrics:
    """The simulator's metrics, computed in the parent from the workers' reported states."""

    def __init__(self, algorithm, problem, layout: _Layout, shared: worker_lib.Shared):
        import jax
        import jax.numpy as jnp

        from jaxasync._src import program as program_lib

        self.jax, self.layout, self.shared, self.algorithm = jax, layout, shared, algorithm
        self.n = layout.n
        self.program_lib = program_lib
        f_star = problem.f_star if getattr(problem, "f_star", None) is not None else float("nan")

        def fn(states, buffers, registers, alive):
            views = {k: layout.unravels[k](v) for k, v in buffers.items()}
            views.update(registers)
            w = alive.astype(jnp.float32) / jnp.maximum(jnp.sum(alive), 1)
            node_params = jax.vmap(algorithm.params)(states)
            if algorithm.evaluate is not None:
                x = algorithm.evaluate(states, views)
            else:
                x = jax.tree.map(
                    lambda a: jnp.tensordot(w, a.astype(jnp.float32), axes=1).astype(a.dtype),
                    node_params,
                )
            flat = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(node_params)
            flat = flat.astype(jnp.float32)
            mean = w @ flat
            loss = problem.loss(x)
            out = dict(
                loss=loss,
                grad_norm=problem.grad_norm(x),
                consensus=w @ jnp.sum(jnp.square(flat - mean), axis=1),
                gap=loss - f_star,
            )
            if algorithm.metrics is not None:
                out.update(algorithm.metrics(states))
            return out

        self.states0 = [None] * self.n
        example = self.read()
        self.fn = worker_lib.lift_jit(fn, *example)
        jax.block_until_ready(self.fn(*example))  # compile while the workers start

    def read(self, alive=None):
        """Current (states, buffers, registers, alive) from shared memory."""
        codec = self.layout.state_codec
        rows = np.zeros((self.n, codec.size), np.uint8)
        for i, reg in enumerate(self.shared.reports):
            reg.read(rows[i])
        states = codec.decode(rows, (self.n,))
        buffers = {}
        for k, pb in self.shared.buffers.items():
            out = np.empty(pb.size, np.float32)
            buffers[k] = pb.read(out)
        registers = {}
        for k, rows_ in self.shared.registers.items():
            spec, rc = self.layout.registers[k]
            raw = np.zeros((self.n, spec.slots, rc.size), np.uint8)
            tags = np.full((self.n, spec.slots), -1, np.int32)
            for o in range(self.n):
                for s in range(spec.slots):
                    tags[o, s], _ = rows_[o][s].read(raw[o, s])
            registers[k] = self.program_lib.RegistersView(tags, rc.decode(raw, (self.n, spec.slots)))
        if alive is None:
            alive = np.ones(self.n, bool)
        return states, buffers, registers, np.asarray(alive, bool)

    def node_params(self):
        states, *_ = self.read()
        return self.jax.device_get(self.jax.vmap(self.algorithm.params)(states))

    def shared_views(self):
        _, buffers, registers, _ = self.read()
        out = {k: self.jax.device_get(self.layout.unravels[k](v)) for k, v in buffers.items()}
        out.update(registers)
        return out

    def compute(self, alive) -> dict:
        out = self.jax.device_get(self.fn(*self.read(alive)))
        return {k: np.asarray(v) for k, v in out.items()}


def _counter_totals(shared: worker_lib.Shared, n: int) -> dict:
    c = shared.counters
    W = worker_lib
    rows = np.array([[c.load(i * W.NCOUNT + k) for k in range(W.NCOUNT)] for i in range(n)], np.int64)
    sent, lost, nbytes = rows[:, W.C_SENT], rows[:, W.C_LOST], rows[:, W.C_BYTES]
    # Workers count messages and bytes per node, not per channel: a node's lost messages times its
    # mean message size, exact (float64 division of integers) when a node's messages have one size.
    bytes_lost = np.sum(lost * nbytes / np.maximum(sent, 1))
    return dict(
        node_steps=rows[:, W.C_STEPS],
        sent=rows[:, W.C_SENT].sum(),
        lost=rows[:, W.C_LOST].sum(),
        delivered=rows[:, W.C_DELIVERED].sum(),
        dropped=rows[:, W.C_DROPPED].sum(),
        bytes_sent=rows[:, W.C_BYTES].sum(),
        bytes_lost=bytes_lost,
        stale_sum=rows[:, W.C_STALE_SUM].sum(),
        stale_max=rows[:, W.C_STALE_MAX].max(),
        updates=rows[:, W.C_UPDATES].sum(),
        busy=rows[:, W.C_BUSY],
        status=rows[:, W.C_STATUS],
        reported=rows[:, W.C_REPORTED],
        cpu_time=rows[:, W.C_CPU_US] * 1e-6,
    )


def _record(shared: worker_lib.Shared, metrics: _Metrics, n: int, now: float, alive) -> dict:
    """One record of a trace: the counters and the metrics of the reported states at ``now``."""
    tot = _counter_totals(shared, n)
    m = metrics.compute(alive)
    rec = dict(
        time=np.float32(now),
        events=np.int64(tot["node_steps"].sum() + tot["delivered"]),
        steps=np.int64(tot["node_steps"].sum()),
        node_steps=tot["node_steps"],
        node_cpu_time=tot["cpu_time"].astype(np.float32),
        in_flight=np.int64(tot["sent"] - tot["lost"] - tot["delivered"] - tot["dropped"]),
        sent=tot["sent"],
        lost=tot["lost"],
        delivered=tot["delivered"],
        dropped=tot["dropped"],
        overflow=np.int64(0),
        bytes_sent=np.float64(tot["bytes_sent"]),
        bytes_lost=np.float64(tot["bytes_lost"]),
        alive=np.int64(np.sum(alive)),
        staleness_mean=np.float32(tot["stale_sum"] / max(tot["updates"], 1)),
        staleness_max=np.int64(tot["stale_max"]),
    )
    rec.update(m)  # algorithm metrics may refine the staleness (e.g. a server's delays)
    return rec


# ---------------------------------------------------------------------------------------- the run


class _Session:
    """Everything one run owns; :meth:`close` releases it on every path."""

    def __init__(
        self, algorithm, problem, n, seed, transport_cls, capacity, jobs_extra, buffer_mode, tallies=False
    ):
        self.algorithm, self.problem, self.n, self.seed = algorithm, problem, n, seed
        self.buffer_mode = buffer_mode
        self.procs = None
        self.layout = _Layout(algorithm, problem, n, seed)
        self.shared = _create_shared(self.layout, transport_cls, capacity, tallies)
        try:
            # The buffers before any worker adds to them (to measure lost updates).
            self.buffers0 = {}
            for k in self.shared.tallies:
                pb = self.shared.buffers[k]
                self.buffers0[k] = pb.read(np.empty(pb.size, np.float32)).astype(np.float64)
            jobs = [
                dict(
                    program=algorithm,
                    problem=_shard_problem(problem, i),  # each worker gets only its own data
                    node=i,
                    n=n,
                    seed=seed,
                    shared=self.shared,
                    buffer_mode=buffer_mode,
                    **jobs_extra(i),
                )
                for i in range(n)
            ]
            self.procs = _Procs(jobs, worker_lib.thread_env(_platform()))
            self.metrics = _Metrics(algorithm, problem, self.layout, self.shared)
        except BaseException:
            self.close()
            raise

    def check(self, now: float, tolerate_crashes: bool, stopping: bool = False) -> list:
        """Raises on a failed worker; returns nodes that newly died by a signal."""
        new = []
        for i, p in enumerate(self.procs.procs):
            tb = self.procs.traceback_of(i)
            if tb is not None:
                raise WorkerError(f"worker {i} failed:\n{tb}")
            if i in self.procs.dead or p.exitcode is None:
                continue
            code = p.exitcode
            if stopping and code == 0:
                continue
            if code > 0:
                tb = self.procs.traceback_of(i, wait=1.0)
                raise WorkerError(f"worker {i} failed:\n{tb}" if tb else f"worker {i} {_describe_exit(code)}")
            self.procs.dead[i] = now
            self.shared.ctrl.store(worker_lib.ALIVE0 + i, 0)
            if code == 0:
                raise WorkerError(f"worker {i} exited before the run was stopped")
            if not tolerate_crashes:
                raise WorkerError(
                    f"worker {i} (pid {p.pid}) {_describe_exit(code)} at t={now:.2f}s; "
                    f"{self.algorithm.name} is not crash-tolerant (program.crash_tolerant is False), "
                    "so the run cannot continue"
                )
            new.append(i)
        return new

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        W = worker_lib
        while True:
            self.check(0.0, tolerate_crashes=False)
            status = [self.shared.counters.load(i * W.NCOUNT + W.C_STATUS) for i in range(self.n)]
            if all(s >= W.STATUS_READY for s in status):
                return
            if time.monotonic() > end:
                raise WorkerError(f"workers did not start within {timeout:.0f}s (status {status})")
            time.sleep(0.01)

    def request_reports(self, timeout: float) -> None:
        """Asks every live worker for its state and waits (at most ``timeout``) until they answered."""
        W = worker_lib
        want = self.shared.ctrl.fetch_add(W.REQUEST, 1) + 1
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            late = [
                i
                for i in range(self.n)
                if i not in self.procs.dead
                and self.procs.procs[i].exitcode is None
                and self.shared.counters.load(i * W.NCOUNT + W.C_REPORTED) < want
            ]
            if not late:
                return
            time.sleep(5e-4)

    def stop(self, timeout: float = 30.0) -> None:
        """Final report, stop flag, join (children that do not exit are killed)."""
        W = worker_lib
        self.shared.ctrl.fetch_add(W.REQUEST, 1)
        self.shared.ctrl.store(W.STOP, 1)
        self.procs.join(timeout)

    def lost_updates(self) -> dict | None:
        """Per buffer, the update mass the buffer lost (after the workers stopped); None if not
        measured or not measurable (a worker died before writing its tally)."""
        if not self.shared.tallies:
            return None
        out = {}
        for k, regs in self.shared.tallies.items():
            pb = self.shared.buffers[k]
            applied = np.zeros(pb.size, np.float64)
            mass, elements, adds = 0.0, 0, 0
            for reg in regs:
                tag, row = reg.read()
                if tag != 1:
                    return None  # a node died before it wrote its tally
                v, m, e, a = worker_lib.Tally.unpack(row)
                applied += v
                mass, elements, adds = mass + m, elements + e, adds + a
            net = pb.read(np.empty(pb.size, np.float32)).astype(np.float64) - self.buffers0[k]
            lost = applied - net
            largest = np.maximum(np.abs(self.buffers0[k]), np.abs(self.buffers0[k] + net))
            lost_mass = float(np.abs(lost).sum())
            fraction = lost_mass / mass if mass > 0 else 0.0
            out[k] = dict(
                adds=adds,
                element_updates=elements,
                applied_mass=mass,
                lost_mass=lost_mass,
                lost_fraction=fraction,
                # product first: exact for whole numbers (unit deltas), unlike fraction * elements
                lost_element_updates=lost_mass * elements / mass if mass > 0 else 0.0,
                max_abs_error=float(np.abs(lost).max(initial=0.0)),
                # float32 rounding of the buffer alone can explain up to about this much (half an
                # ulp of the larger of an element's initial and final value, per element update):
                rounding_bound=float(2.0**-24 * elements / max(pb.size, 1) * largest.sum()),
                buffer_mode=self.buffer_mode,
            )
        return out

    def close(self) -> None:
        try:
            if self.procs is not None:
                with contextlib.suppress(Exception):
                    self.shared.ctrl.store(worker_lib.STOP, 1)
                self.procs.kill_all()
        finally:
            self.shared.close()


def run(
    algorithm,
    problem,
    *,
    workers: int,
    asynchrony=None,
    steps: int | None = None,
    time_limit: float | None = None,
    seed: int = 0,
    target_loss: float | None = None,
    record_every: float | None = None,
    buffer_mode: str = "atomic",
    lost_updates: bool | None = None,
    mailbox_capacity: int | None = None,
    transport: Any = "shm",
    progress: bool | None = None,
    callback=None,
    start_timeout: float = 300.0,
    stall_timeout: float = 60.0,
):
    """Runs ``algorithm`` on ``problem`` with one real process per node and returns a :class:`Trace`.

    Args:
      algorithm: a :class:`~jaxasync._src.program.NodeProgram`.
      problem: a :class:`jaxasync.Problem` with one data shard per data node.
      workers: number of processes; must equal the program's number of nodes, i.e. the problem's
        shards plus the program's data-less servers (``program.num_servers``, e.g. AsGrad's server).
      asynchrony: optional :class:`jaxasync.Asynchrony`; its ``stragglers``, ``loss`` and ``crashes``
        (wall-clock seconds) are injected for real; ``compute_time`` and ``delay`` are ignored.
      steps: local steps (summed over the workers) to run; exact.
      time_limit: wall-clock seconds to run (after all workers are ready).
      seed: seed of the initial keys, the minibatches and the injected loss.
      target_loss: stop at the first record with ``loss <= target_loss``.
      record_every: seconds between two metric records (default ``time_limit / 50`` or 0.25 s).
      buffer_mode: ``"atomic"``, ``"relaxed"`` or ``"racy"`` (see the module docstring).
      lost_updates: measure the update mass the shared buffers lose (``meta["lost_updates"]``;
        default: in the ``"racy"`` and ``"relaxed"`` modes, which can lose updates). Each worker
        sums the deltas it adds in float64 (~10% of a Hogwild! step on a 19k-parameter MLP).
      mailbox_capacity: messages per mailbox (default: up to 64 and 8 MiB).
      transport: ``"shm"`` or a transport class (see :mod:`.transport`).
      progress: draw a progress bar on stderr (default: only if stderr is a terminal).
      callback: optional ``callback(record) -> bool | None`` called with each record (a dict of the
        metrics at that point); returning True stops the run (early stopping, live plots).
      start_timeout: seconds the workers may take to import jax and compile their handlers.
      stall_timeout: stop (with a warning and ``meta["stalled"] = True``) when no worker has
        completed a step or handled a message for this many seconds, e.g. because every worker is
        idle waiting for messages that were lost.

    Returns:
      A :class:`~jaxasync._src.trace.Trace` with the simulator's metric names (``time`` in wall-clock
      seconds since the workers started) plus ``meta`` (``executor="local"``, ``wall_time``,
      ``crashed`` = ``{node: seconds}``, ``interrupted``, ``buffer_mode``, ``lost_updates``: per
      shared buffer a dict with ``lost_mass`` = ``sum_j |applied_j - (final_j - initial_j)|``, the
      float64 sum of every delta the workers added against the buffer's net change, and
      ``applied_mass`` = ``sum |delta|``, ``lost_fraction`` (their ratio), ``element_updates``,
      ``lost_element_updates`` (``lost_fraction * element_updates``: how many element updates of
      average size the lost mass amounts to; exact when every delta element is +-1),
      ``max_abs_error``, ``rounding_bound`` (about the most that float32 rounding of the buffer
      alone could explain) and ``adds``; None when not measured or when a worker died before reporting).

    Raises:
      ValueError: bad arguments, before anything is spawned (more workers than the topology's
        nodes, fewer shards than workers, shared objects on a transport without shared memory, ...).
      WorkerError: (a ``RuntimeError``) a worker raised (its traceback is in the message), or died
        while the algorithm is not crash-tolerant.
    """
    from jaxasync._src import asynchrony as asynchrony_lib
    from jaxasync._src import trace as trace_lib

    n, transport_cls = _check_args(
        algorithm, problem, workers, asynchrony, steps, time_limit, buffer_mode, transport
    )
    asyn = asynchrony or asynchrony_lib.Asynchrony()
    stragglers = asyn.straggler_factors(n)
    crashes = {int(k): float(v) for k, v in (asyn.crashes or {}).items()}
    if record_every is None:
        record_every = time_limit / 50 if time_limit is not None else 0.25
    record_every = max(float(record_every), 0.01)

    def extra(i):
        return dict(straggler=float(stragglers[i]), loss=float(asyn.loss))

    if lost_updates is None:
        lost_updates = buffer_mode != "atomic"
    W = worker_lib
    session = _Session(
        algorithm,
        problem,
        n,
        seed,
        transport_cls,
        mailbox_capacity,
        extra,
        buffer_mode,
        tallies=bool(lost_updates),  # only programs with shared buffers get tallies
    )
    lost = None
    records, crashed, interrupted, note, stalled = [], {}, False, "", False
    bar = progress_lib.Progress(
        f"{algorithm.name} x{n}", steps if steps is not None else time_limit, enabled=progress
    )
    try:
        ctrl = session.shared.ctrl
        if steps is not None:
            ctrl.store(W.LIMIT, int(steps))
        session.wait_ready(start_timeout)
        killed = set()
        lost_claims = done = 0
        last_activity, last_change, stalled = -1, 0.0, False

        def alive_mask():
            return np.array([i not in session.procs.dead for i in range(n)])

        def record(now):
            rec = _record(session.shared, session.metrics, n, now, alive_mask())
            records.append(rec)
            return rec

        def wants_stop(rec):
            return bool(callback is not None and callback(dict(rec)))

        # The first record is the initial point: every worker reported its initial state before
        # it said it was ready, and nobody has started (a shared buffer is still untouched).
        rec = record(0.0)
        t0_ns = time.monotonic_ns()  # the workers stamp their finish on the same clock
        t0 = time.perf_counter()
        ctrl.store(W.START, 1)
        bar.start = time.monotonic()
        next_record = record_every
        try:
            stop_now = wants_stop(rec)
            while not stop_now:
                now = time.perf_counter() - t0
                for i in session.check(now, tolerate_crashes=algorithm.crash_tolerant):
                    crashed[i] = now
                    if session.shared.counters.load(i * W.NCOUNT + W.C_BUSY):
                        lost_claims += 1  # it had claimed a step it will never finish
                for i, t in crashes.items():
                    if i not in killed and now >= t:
                        killed.add(i)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(session.procs.procs[i].pid, signal.SIGKILL)
                if len(session.procs.dead) == n:
                    break
                done = sum(session.shared.counters.load(i * W.NCOUNT + W.C_STEPS) for i in range(n))
                activity = done + sum(
                    session.shared.counters.load(i * W.NCOUNT + W.C_DELIVERED) for i in range(n)
                )
                if activity != last_activity:
                    last_activity, last_change = activity, now
                elif now - last_change > stall_timeout:
                    stalled = True
                    break
                if steps is not None and done + lost_claims >= steps:
                    break
                if time_limit is not None and now >= time_limit:
                    break
                if now >= next_record:
                    session.request_reports(timeout=min(1.0, record_every))
                    rec = record(now)
                    next_record = now + record_every
                    if target_loss is not None and rec["loss"] <= target_loss:
                        break
                    if wants_stop(rec):
                        break
                bar.update(
                    done if steps is not None else round(now, 1),
                    note=f"loss={float(rec['loss']):.3g} alive={n - len(session.procs.dead)}",
                )
                # Sleep until the next thing that is due (a step-limited run's end is stamped by
                # the workers, so it needs no fast polling).
                due = [next_record - now] + [t - now for i, t in crashes.items() if i not in killed]
                if time_limit is not None:
                    due.append(time_limit - now)
                time.sleep(min(max(min(due), _POLL), _POLL_IDLE))
        except KeyboardInterrupt:
            interrupted = True
        end = time.perf_counter() - t0
        if not interrupted and steps is not None and done + lost_claims >= steps:
            # The budget ran out: the run ended when the last worker finished its last step (its
            # stamp), not when this loop (polling every _POLL seconds) noticed it.
            stamps = [session.shared.counters.load(i * W.NCOUNT + W.C_FINISH) for i in range(n)]
            last = max(stamps)
            if last > 0:
                end = min(end, max(0.0, (last - t0_ns) * 1e-9))
        session.stop()
        if not interrupted:
            for i in session.check(end, tolerate_crashes=algorithm.crash_tolerant, stopping=True):
                crashed[i] = end
        record(end)
        lost = session.lost_updates()
        note = f"loss={float(records[-1]['loss']):.3g}"
        bar.update(int(records[-1]["steps"]) if steps is not None else round(end, 1), note=note)
    finally:
        bar.close(note)
        session.close()

    metrics = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    meta = dict(
        algorithm=algorithm.name,
        problem=getattr(problem, "name", "problem"),
        nodes=n,
        workers=n,
        steps=steps,
        time_limit=time_limit,
        target_loss=target_loss,
        record_every=record_every,
        seed=seed,
        asynchrony=dict(
            loss=float(asyn.loss),
            crashes={str(k): float(v) for k, v in crashes.items()},
            stragglers={str(k): float(v) for k, v in (asyn.stragglers or {}).items()},
        ),
        executor="local",
        buffer_mode=buffer_mode,
        wall_time=float(end),
        crashed={str(k): float(v) for k, v in crashed.items()},
        interrupted=interrupted,
        stalled=stalled,
        lost_updates=lost,
    )
    if stalled:
        import warnings

        warnings.warn(
            f"{algorithm.name}: no progress for {stall_timeout:.0f}s (every worker idle?); stopped "
            f"after {int(records[-1]['steps'])} steps",
            stacklevel=2,
        )
    return trace_lib.Trace(metrics, meta)


def replay(
    algorithm,
    problem,
    record,
    *,
    timeout: float = 300.0,
    transport: Any = "shm",
    mailbox_capacity: int | None = None,
):
    """Replays a recorded simulation through real worker processes.

    Every worker executes its node's events of ``record.events`` in the recorded global order (a
    shared turn counter), with the simulator's keys, on the real shared objects and mailboxes.

    Args:
      algorithm: the program that was simulated.
      problem: the problem it was simulated on.
      record: a :class:`~jaxasync._src.simulator.Replay` from :func:`jaxasync._src.simulator.record`.
      timeout: seconds for the whole replay (after the workers started).
      transport: as in :func:`run`.
      mailbox_capacity: as in :func:`run`.

    Returns:
      A :class:`~jaxasync._src.simulator.Replay` with the same events and the final ``node_params``
      and ``shared`` objects of the real run (compare them with ``record``'s).
    """
    from jaxasync._src import simulator as simulator_lib

    n = problem.num_nodes + int(getattr(algorithm, "num_servers", 0))
    n, transport_cls = _check_args(algorithm, problem, n, None, None, 1.0, "atomic", transport)
    events = simulator_lib.EventLog(*(np.asarray(a) for a in record.events))
    seed = int(record.seed)
    W = worker_lib
    session = _Session(
        algorithm,
        problem,
        n,
        seed,
        transport_cls,
        mailbox_capacity,
        lambda i: dict(events=events),
        "atomic",
    )
    try:
        session.wait_ready(timeout)
        ctrl = session.shared.ctrl
        ctrl.store(W.START, 1)
        end = time.monotonic() + timeout
        total = len(events.event)
        while ctrl.load(W.TURN) < total:
            session.check(0.0, tolerate_crashes=False)
            if time.monotonic() > end:
                raise WorkerError(
                    f"replay did not finish within {timeout:.0f}s (at event {ctrl.load(W.TURN)} of {total})"
                )
            time.sleep(_POLL)
        session.request_reports(timeout=30.0)
        session.stop()
        node_params = session.metrics.node_params()
        shared = session.metrics.shared_views()
    finally:
        session.close()
    return simulator_lib.Replay(events, node_params, shared, seed)
