"""Tests for jaxasync.shm and the native core: exact counts, invariants, lifecycle.

Multi-process tests use the "spawn" context and join with a deadline, so a hang
fails instead of blocking. No test asserts on timings.
"""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import pathlib
import pickle
import re
import signal
import struct
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxasync import shm
from jaxasync._src import native_build

CTX = multiprocessing.get_context("spawn")
DEADLINE = 60.0  # seconds for any group of child processes
HEADER = pathlib.Path(native_build.HEADER)


def _ours() -> set[str]:
    # Only names made by this process: other programs may use /dev/shm meanwhile.
    pid = str(os.getpid())
    return {n for n in os.listdir("/dev/shm") if n.startswith("jaxasync-") and pid in n}


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must leave /dev/shm as it found it (children are checked where used)."""
    before = _ours()
    yield
    assert _ours() - before == set(), "shared-memory segments left behind"


def _run(*procs, timeout=DEADLINE):
    """Starts processes, joins them by a deadline, kills stragglers, checks exit codes."""
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"processes hung: {hung}"
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _dev_shm(name: str) -> pathlib.Path:
    return pathlib.Path("/dev/shm") / name.lstrip("/")


def _wait_for(cond, what, timeout=DEADLINE):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.001)


# ----------------------------------------------------------------------------- workers
# Module-level so spawned children can import them; objects arrive pickled
# (attach by name).


def _overlapping_loop(ctl, k, parties, min_reps, body):
    """Runs `body` at least `min_reps` times, until every party has; returns the count.

    Children start slowly and at different times: they meet at a barrier first,
    then each keeps going until all have done their minimum, so the work of the
    slowest always overlaps the others'. ctl cells: 0 barrier, 1 parties done,
    2 + k reps of party k.
    """
    ctl.fetch_add(0, 1)
    while ctl.load(0) < parties:
        os.sched_yield()
    reps = 0
    while reps < min_reps or ctl.load(1) < parties:
        body(reps)
        reps += 1
        if reps == min_reps:
            ctl.fetch_add(1, 1)
    ctl.store(2 + k, reps)


def _fetch_add_worker(arr, ctl, k, parties):
    def body(reps):
        for _ in range(1000):
            arr.fetch_add(0, 1)
        for _ in range(250):  # a CAS-loop increment of cell 1
            seen = arr.load(1)
            while True:
                ok, seen = arr.compare_exchange(1, seen, seen + 1)
                if ok:
                    break

    _overlapping_loop(ctl, k, parties, 100, body)


def _param_worker(buf, mode, ctl, k, parties):
    ones = np.ones(buf.size, np.float32)
    idx = _sparse_indices(k, buf.size)

    def body(reps):
        for _ in range(10):
            buf.add(ones, scale=1.0, mode=mode)
        buf.add_sparse(
            idx.astype(np.int32) if reps % 2 else idx, np.full(idx.size, 2.0, np.float32), mode=mode
        )
        buf.next_step()

    _overlapping_loop(ctl, k, parties, 2000, body)


def _sparse_indices(k, size):
    return np.random.default_rng(k).integers(0, size, 1024, dtype=np.int64)  # many repeats


def _payload(tag, shape):
    return (np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) * 7 + tag) ^ 0x5A5A


def _producer(box, n):
    for tag in range(n):
        value = _payload(tag, box.shape)
        while not box.send(value, tag):
            os.sched_yield()


def _consumer(box, n, result):
    out = np.empty(box.shape, box.dtype)
    expected, bad = 0, 0
    while expected < n:
        got = box.recv(out) if expected % 2 else box.recv()  # both paths
        if got is None:
            os.sched_yield()
            continue
        tag, value = got
        bad += tag != expected or not np.array_equal(value, _payload(tag, box.shape))
        expected += 1
    result.store(0, expected)
    result.store(1, bad)
    result.store(2, int(box.recv() is not None))  # nothing extra


def _register_writer(reg, stop):
    tag = 0
    value = np.empty(reg.shape, reg.dtype)
    while not stop.load(0):
        value.fill(tag)
        reg.write(value, tag)
        tag += 1


def _register_reader(reg, reads, result, slot):
    torn = backwards = 0
    last = -1
    out = np.empty(reg.shape, reg.dtype)
    for _ in range(reads):
        tag, value = reg.read(out)
        torn += not (value == max(tag, 0)).all()  # before any write: tag -1, zeros
        backwards += tag < last
        last = tag
    result.store(slot, torn)
    result.store(slot + 1, backwards)


def _reader_until_stopped(reg, flags):
    """Reads until flags[0] is set, counting torn reads in flags[2].

    In phase flags[1] = p > 0 it counts its reads in flags[2 + 2p] and stores
    the last tag seen in flags[3 + 2p].
    """
    out = np.empty(reg.shape, reg.dtype)
    torn = 0
    counts = {1: 0, 2: 0}
    while not flags.load(0):
        phase = flags.load(1)
        tag, value = reg.read(out)
        torn += not (value == max(tag, 0)).all()
        if phase:
            counts[phase] += 1
            flags.store(3 + 2 * phase, tag)
            flags.store(2 + 2 * phase, counts[phase])
    flags.store(2, torn)


def _sleep_attached(obj, ready):
    ready.fetch_add(0, 1)
    time.sleep(60)


def _create_and_forget(names):
    # Creates segments, never closes or unlinks them, and exits normally.
    a = shm.AtomicArray.create(3)
    b = shm.Register.create(5)
    names.send([a.name, b.name])
    names.close()


def _use_pickled(objs):
    arr, reg, box, buf = objs
    arr.fetch_add(0, 41)
    reg.write(np.full(reg.shape, 3.5, reg.dtype), 9)
    assert box.send(np.arange(4, dtype=np.int32), 11)
    buf.add(buf.read(), scale=1.0, mode="atomic")  # doubles every parameter


# ----------------------------------------------------------------------------- native module


def _header_prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter types) for every ja_ function in the header."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    protos = {}
    for ret, name, params in re.findall(r"([\w \t*]+?)\s*\b(ja_\w+)\s*\(([^)]*)\)\s*;", text):
        types = (
            []
            if params.strip() in ("", "void")
            else [re.sub(r"\s*\b\w+$", "", p.strip()) for p in params.split(",")]
        )
        protos[name] = (ret.strip(), types)
    return protos


def test_native_extension_is_built():
    import jaxasync._native as native  # fails loudly if the C core was not compiled

    expected = {
        "ja_segment_create",
        "ja_segment_attach",
        "ja_segment_close",
        "ja_segment_unlink",
        "ja_atomic_fetch_add",
        "ja_atomic_compare_exchange",
        "ja_register_write",
        "ja_register_read",
        "ja_f32_add",
        "ja_f32_add_sparse_i64",
        "ja_mailbox_send",
        "ja_mailbox_recv",
        "ja_step_fetch_add",
    }
    assert expected <= set(dir(native.lib))
    assert native.lib.JA_LAYOUT_VERSION >= 1


def test_cdef_is_derived_from_header_and_matches_compiled_module():
    import jaxasync._native as native

    assert native_build.CDEF == native_build.cdef_from_header(HEADER.read_text())
    assert "_Atomic" not in native_build.CDEF
    protos = _header_prototypes()
    compiled = {n for n in dir(native.lib) if n.startswith("ja_")}
    assert set(protos) == compiled
    ffi = native.ffi
    for name, (ret, params) in protos.items():
        fn = ffi.typeof(getattr(native.lib, name))
        assert fn.result == ffi.typeof(ret), name
        assert list(fn.args) == [ffi.typeof(p) for p in params], name
    # The integer constants of the header are the compiled ones.
    for name, value in re.findall(r"#define\s+(JA_\w+)\s+(0x[0-9a-fA-F]+|\d+)", HEADER.read_text()):
        if hasattr(native.lib, name):
            assert getattr(native.lib, name) == int(value, 0), name


def test_header_struct_fits_and_is_aligned():
    import jaxasync._native as native

    assert native.ffi.sizeof("ja_header") <= native.lib.JA_HEADER_SIZE
    assert native.ffi.offsetof("ja_header", "version") == 8


# ----------------------------------------------------------------------------- AtomicArray


def test_atomic_array_operations():
    with shm.AtomicArray.create(4) as a:
        assert len(a) == 4 and [a.load(i) for i in range(4)] == [0] * 4
        assert a.fetch_add(2, 5) == 0 and a.fetch_add(2, -2) == 5 and a.load(2) == 3
        a.store(3, -(2**63))
        assert a.load(3) == -(2**63)
        assert a.compare_exchange(2, 3, 10) == (True, 3)
        assert a.compare_exchange(2, 3, 11) == (False, 10)
        assert a.load(2) == 10
        a.store(0, 2**63 - 1)
        assert a.fetch_add(0, 1) == 2**63 - 1 and a.load(0) == -(2**63)  # wraps


def test_atomic_array_bad_input():
    with shm.AtomicArray.create(4) as a:
        for op, args in [("load", ()), ("store", (1,)), ("fetch_add", (1,)), ("compare_exchange", (0, 1))]:
            with pytest.raises(IndexError, match="index 4 out of range .* length 4"):
                getattr(a, op)(4, *args)
            with pytest.raises(IndexError, match="index -1 out of range"):
                getattr(a, op)(-1, *args)
        with pytest.raises(TypeError):
            a.fetch_add(0, 1.5)
    with pytest.raises(TypeError, match="n must be an int"):
        shm.AtomicArray.create(2.0)
    with pytest.raises(ValueError, match=r"n must be in \[1"):
        shm.AtomicArray.create(0)


def test_fetch_add_and_cas_from_processes_are_exact():
    procs = 3
    with shm.AtomicArray.create(2) as a, shm.AtomicArray.create(2 + procs) as ctl:
        _run(*[CTX.Process(target=_fetch_add_worker, args=(a, ctl, k, procs)) for k in range(procs)])
        reps = sum(ctl.load(2 + k) for k in range(procs))
        assert reps >= 100 * procs
        assert a.load(0) == 1000 * reps
        assert a.load(1) == 250 * reps


# ----------------------------------------------------------------------------- Register


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_register_round_trip(dtype):
    with shm.Register.create((2, 3), dtype) as reg:
        tag, value = reg.read()
        assert tag == -1 and value.dtype == dtype and not value.any()  # before any write
        for t in range(5):  # more writes than slots
            x = (np.arange(6).reshape(2, 3) + t).astype(dtype)
            reg.write(x, tag=100 + t)
            out = np.empty((2, 3), dtype)
            tag, got = reg.read(out)
            assert tag == 100 + t and got is out and np.array_equal(out, x)
            assert reg.read(out)[1] is out and np.array_equal(reg.read()[1], x)
        assert reg.version == 5 and reg.shape == (2, 3) and reg.dtype == dtype


def test_register_bad_input():
    with shm.Register.create(4, np.float32) as reg:
        with pytest.raises(TypeError, match="dtype float32, got float64"):
            reg.write(np.zeros(4), 1)
        with pytest.raises(ValueError, match=r"shape \(4,\), got \(5,\)"):
            reg.write(np.zeros(5, np.float32), 1)
        with pytest.raises(ValueError, match="non-contiguous"):
            reg.write(np.zeros(8, np.float32)[::2], 1)
        with pytest.raises(TypeError, match="dtype float32, got int32"):
            reg.read(np.zeros(4, np.int32))
        with pytest.raises(ValueError, match="non-contiguous"):
            reg.read(np.zeros(8, np.float32)[::2])
        with pytest.raises(ValueError, match="read-only"):
            ro = np.zeros(4, np.float32)
            ro.flags.writeable = False
            reg.read(ro)
        with pytest.raises(TypeError):
            reg.write(np.zeros(4, np.float32), 1.5)  # tags are ints
    with pytest.raises(TypeError, match="unsupported dtype complex64"):
        shm.Register.create(4, np.complex64)
    with pytest.raises(ValueError, match="positive ints"):
        shm.Register.create((3, 0))


def test_register_reads_are_never_torn():
    reads = 100_000
    with shm.Register.create(1024, np.int64) as reg, shm.AtomicArray.create(5) as ctl:
        writer = CTX.Process(target=_register_writer, args=(reg, ctl))
        readers = [CTX.Process(target=_register_reader, args=(reg, reads, ctl, 1 + 2 * k)) for k in range(2)]
        writer.start()
        try:
            _wait_for(lambda: reg.version > 0, "the first write")
            _run(*readers)
        finally:
            ctl.store(0, 1)
            writer.join(DEADLINE)
            if writer.is_alive():
                writer.kill()
        assert writer.exitcode == 0
        assert [ctl.load(k) for k in range(1, 5)] == [0, 0, 0, 0]  # torn, backwards per reader
        assert reg.version > 1  # the writer kept writing during the reads


def _odd_slot_seq(name: str) -> bool:
    """Whether some register slot is mid-write (odd seq), from the raw segment."""
    import jaxasync._native as native

    ffi, lib = native.ffi, native.lib
    raw = _dev_shm(name).read_bytes()
    h = ffi.from_buffer("ja_header *", bytearray(raw[: lib.JA_HEADER_SIZE]))
    seqs = [
        struct.unpack_from("<Q", raw, h.data_offset + k * h.slot_stride)[0]
        for k in range(lib.JA_REGISTER_SLOTS)
    ]
    return any(s % 2 for s in seqs)


def test_register_survives_writer_killed_mid_write():
    # The test process itself only does wait-free things (write, version, atomic
    # flags); every read that could hang happens in a child with a deadline.
    shape = (1 << 18,)  # 2 MiB per write: a kill almost always lands inside one
    mid_write = False
    for _attempt in range(5):
        with (
            shm.Register.create(shape, np.int64) as reg,
            shm.AtomicArray.create(1) as stop,
            shm.AtomicArray.create(8) as flags,
        ):
            writer = CTX.Process(target=_register_writer, args=(reg, stop))
            reader = CTX.Process(target=_reader_until_stopped, args=(reg, flags))
            try:
                writer.start()
                reader.start()
                _wait_for(lambda: reg.version > 20, "writes")  # noqa: B023
                os.kill(writer.pid, signal.SIGKILL)
                writer.join(DEADLINE)
                mid_write = mid_write or _odd_slot_seq(reg.name)
                last_tag = reg.version - 1  # the writer's tags are 0, 1, 2, ...
                flags.store(1, 1)
                _wait_for(lambda: flags.load(4) >= 1000, "reads after the kill")  # noqa: B023
                assert flags.load(5) == last_tag  # readers keep the last completed value
                # A new writer takes over from the dead one.
                reg.write(np.full(shape, last_tag + 1, np.int64), last_tag + 1)
                flags.store(1, 2)
                _wait_for(lambda: flags.load(6) >= 10, "reads after the takeover")  # noqa: B023
                assert flags.load(7) == last_tag + 1
                flags.store(0, 1)
                reader.join(DEADLINE)
                assert reader.exitcode == 0, "reader hung or failed"
                assert flags.load(2) == 0  # no torn read before or after the kill
            finally:
                for p in (writer, reader):
                    if p.is_alive():
                        p.kill()
                        p.join(5)
        if mid_write:
            break
    assert mid_write, "never killed the writer inside a write in 5 attempts"


# ----------------------------------------------------------------------------- Mailbox


def test_mailbox_fifo_full_and_empty():
    with shm.Mailbox.create(3, (2,), np.float64) as box:
        assert box.recv() is None and len(box) == 0 and box.capacity == 3
        for round_ in range(4):  # wraps around the ring several times
            for k in range(3):
                assert box.send(np.array([round_, k], np.float64), tag=10 * round_ + k)
            assert not box.send(np.zeros(2), tag=99) and len(box) == 3
            for k in range(3):
                tag, value = box.recv()
                assert tag == 10 * round_ + k and value.tolist() == [round_, k]
            assert box.recv() is None


def test_mailbox_bad_input():
    with shm.Mailbox.create(2, 3, np.int32) as box:
        with pytest.raises(TypeError, match="dtype int32, got int64"):
            box.send(np.zeros(3, np.int64), 0)
        with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)"):
            box.send(np.zeros(2, np.int32), 0)
        with pytest.raises(ValueError, match="non-contiguous"):
            box.send(np.zeros(6, np.int32)[::2], 0)
        with pytest.raises(TypeError, match="dtype int32, got float32"):
            box.recv(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="capacity must be in"):
        shm.Mailbox.create(0, 3)


# The autouse leak check wraps the whole test, not each example: that is intended.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.none()), max_size=40))
def test_mailbox_matches_a_bounded_queue(ops):
    """Sends (ints) and receives (None) behave like a deque of capacity 4."""
    model = deque()
    with shm.Mailbox.create(4, (), np.int64) as box:
        for op in ops:
            if op is None:
                got = box.recv()
                want = model.popleft() if model else None
                assert (got if got is None else (got[0], int(got[1]))) == (
                    None if want is None else (want, want)
                )
            else:
                ok = box.send(np.int64(op), op)
                assert ok == (len(model) < 4)
                if ok:
                    model.append(op)
            assert len(box) == len(model)


def test_mailbox_between_processes_loses_duplicates_and_reorders_nothing():
    n = 100_000
    with shm.Mailbox.create(8, (4,), np.int64) as box, shm.AtomicArray.create(3) as res:
        _run(CTX.Process(target=_consumer, args=(box, n, res)), CTX.Process(target=_producer, args=(box, n)))
        assert [res.load(0), res.load(1), res.load(2)] == [n, 0, 0]
        assert box.recv() is None


# ----------------------------------------------------------------------------- ParamBuffer


@pytest.mark.parametrize("mode", ["racy", "relaxed", "atomic"])
def test_param_add_single_writer_is_exact(mode):
    rng = np.random.default_rng(0)
    template = {
        "a": rng.standard_normal((5, 7)).astype(np.float32),
        "b": (rng.standard_normal(3).astype(np.float32), rng.standard_normal((2, 2, 2)).astype(np.float32)),
    }
    ref = np.concatenate([template["a"].ravel(), template["b"][0], template["b"][1].ravel()])
    with shm.ParamBuffer.create(template) as buf:
        assert buf.size == ref.size
        for k in range(3):
            delta = rng.standard_normal(buf.size).astype(np.float32)
            scale = -0.37 * (k + 1)
            buf.add(delta, scale=scale, mode=mode)
            ref = ref + np.float32(scale) * delta
            idx = rng.integers(0, buf.size, 20).astype(np.int32 if k % 2 else np.int64)
            vals = rng.standard_normal(20).astype(np.float32)
            buf.add_sparse(idx, vals, scale=0.5, mode=mode)
            np.add.at(ref, idx, np.float32(0.5) * vals)  # repeats accumulate in order
            np.testing.assert_array_equal(buf.read(np.empty(buf.size, np.float32)), ref)
        # A pytree delta goes to the same places as its flat form.
        tree_delta = {
            "a": np.ones((5, 7), np.float32),
            "b": (np.full(3, 2.0), np.full((2, 2, 2), 3.0, np.float32)),
        }
        buf.add(tree_delta, scale=0.25, mode=mode)
        flat = np.concatenate([np.ones(35), np.full(3, 2.0), np.full(8, 3.0)]).astype(np.float32)
        ref = ref + np.float32(0.25) * flat
        np.testing.assert_array_equal(buf.read(np.empty(buf.size, np.float32)), ref)


@pytest.mark.parametrize("mode", ["racy", "relaxed", "atomic"])
def test_add_kernels_on_unaligned_pointers_and_odd_lengths(mode):
    import jaxasync._native as native

    ffi, lib = native.ffi, native.lib
    code = {"racy": lib.JA_ADD_RACY, "relaxed": lib.JA_ADD_RELAXED, "atomic": lib.JA_ADD_ATOMIC}
    rng = np.random.default_rng(2)
    for start in range(3):  # 4-byte offsets: 8-byte aligned or not
        for n in [0, 1, 2, 3, 4, 5, 17, 64, 101]:
            dst = rng.standard_normal(n + 8).astype(np.float32)
            src = rng.standard_normal(n).astype(np.float32)
            want = dst.copy()
            want[start : start + n] += np.float32(1.5) * src
            view = dst[start : start + n]
            lib.ja_f32_add(
                ffi.from_buffer("float[]", view), ffi.from_buffer("float[]", src), n, 1.5, code[mode]
            )
            np.testing.assert_array_equal(dst, want)  # neighbours untouched


def test_param_atomic_add_from_processes_is_exact():
    procs = 3
    with (
        # Small, so the processes really collide on the same elements.
        shm.ParamBuffer.create({"w": np.zeros((8, 8), np.float32), "b": np.zeros(7, np.float32)}) as buf,
        shm.AtomicArray.create(2 + procs) as ctl,
    ):
        _run(*[CTX.Process(target=_param_worker, args=(buf, "atomic", ctl, k, procs)) for k in range(procs)])
        reps = [ctl.load(2 + k) for k in range(procs)]
        expected = np.full(buf.size, 10.0 * sum(reps), np.float32)
        for k in range(procs):  # the sparse part, replayed
            np.add.at(expected, _sparse_indices(k, buf.size), np.float32(2.0 * reps[k]))
        np.testing.assert_array_equal(buf.read(np.empty(buf.size, np.float32)), expected)
        assert buf.step == sum(reps)


def test_param_pytree_round_trip_and_attach_rebuilds_the_tree():
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    rng = np.random.default_rng(1)
    template = {
        "dense": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": np.zeros(4, np.float32)},
        "f64": rng.standard_normal(5),
        "bf16": np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3),
        "spec": jax.ShapeDtypeStruct((2,), jnp.float32),
        "list": [np.float32(1.5)],
    }
    with shm.ParamBuffer.create(template) as buf:
        out = buf.read()
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(template)
        np.testing.assert_array_equal(out["dense"]["w"], np.asarray(template["dense"]["w"]))
        assert out["f64"].dtype == np.float64
        np.testing.assert_array_equal(out["f64"], template["f64"].astype(np.float32))
        assert out["bf16"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(out["bf16"], template["bf16"])
        np.testing.assert_array_equal(out["spec"], np.zeros(2, np.float32))
        assert out["list"][0] == 1.5 and out["list"][0].shape == ()

        other = pickle.loads(pickle.dumps(buf))  # attach by name
        try:
            assert other.treedef == buf.treedef and other.shapes == buf.shapes
            assert other.dtypes == buf.dtypes and other.size == buf.size == 12 + 4 + 5 + 6 + 2 + 1
            ones = {
                "dense": jax.tree_util.tree_map(jnp.ones_like, template["dense"]),
                "f64": np.ones(5),
                "bf16": np.ones((2, 3), ml_dtypes.bfloat16),
                "spec": np.ones(2, np.float32),
                "list": [np.float32(1)],
            }
            other.add(ones, mode="atomic")
            again = buf.read()
            np.testing.assert_array_equal(again["dense"]["b"], np.ones(4, np.float32))
            np.testing.assert_array_equal(again["bf16"], template["bf16"] + 1)
            assert again["list"][0] == 2.5
            buf.write(ones | {"list": [np.float32(-1)]})
            assert other.read()["list"][0] == -1.0
            np.testing.assert_array_equal(other.read()["f64"], np.ones(5))
        finally:
            other.close()


def test_param_leaves_are_64_byte_aligned_in_the_segment():
    import jaxasync._native as native

    template = [np.full(3, 1.0, np.float32), np.full(17, 2.0, np.float32), np.full((2, 2), 3.0, np.float32)]
    with shm.ParamBuffer.create(template) as buf:
        raw = _dev_shm(buf.name).read_bytes()
        h = native.ffi.from_buffer("ja_header *", bytearray(raw[: native.lib.JA_HEADER_SIZE]))
        assert h.data_offset % 64 == 0
        data = np.frombuffer(raw, np.float32, offset=h.data_offset)
        offsets = [0, 16, 48]  # floats: 3 -> pad to 16, 17 -> pad to 32
        for off, leaf in zip(offsets, template):
            np.testing.assert_array_equal(data[off : off + leaf.size], leaf.ravel())
        assert not data[3:16].any() and not data[33:48].any()  # padding stays zero
        buf.add_sparse(np.array([2, 3, 19, 20], np.int64), np.ones(4, np.float32))
        got = buf.read()
        assert got[0][2] == 2 and got[1][0] == 3 and got[1][16] == 3 and got[2][0, 0] == 4


def test_param_shape_templates_and_steps():
    with shm.ParamBuffer.create(10) as a, shm.ParamBuffer.create((2, 3)) as b:
        assert a.treedef is None and a.read().shape == (10,) and not a.read().any()
        assert b.read().shape == (2, 3) and b.size == 6
        b.add(np.ones((2, 3)), scale=2.0)  # the single leaf's shape; floats are cast
        b.add(np.ones(6, np.float32))  # the flat form
        np.testing.assert_array_equal(b.read(), np.full((2, 3), 3.0, np.float32))
        assert [a.next_step() for _ in range(3)] == [0, 1, 2] and a.step == 3


def test_param_bad_input():
    with shm.ParamBuffer.create({"w": np.zeros((2, 3), np.float32)}) as buf:
        with pytest.raises(TypeError, match="dtype float32, got float64"):
            buf.add(np.zeros(6))
        with pytest.raises(ValueError, match="non-contiguous"):
            buf.add(np.zeros(12, np.float32)[::2])
        with pytest.raises(TypeError, match="structure"):
            buf.add({"v": np.zeros((2, 3), np.float32)})
        with pytest.raises(ValueError, match=r"shape \(3, 2\), expected \(2, 3\)"):
            buf.add({"w": np.zeros((3, 2), np.float32)})
        with pytest.raises(TypeError, match="floating dtype"):
            buf.add({"w": np.zeros((2, 3), np.int32)})
        with pytest.raises(ValueError, match="mode must be"):
            buf.add(np.zeros(6, np.float32), mode="fast")
        with pytest.raises(IndexError, match="index 6 out of range for ParamBuffer of size 6"):
            buf.add_sparse(np.array([0, 6]), np.ones(2, np.float32))
        with pytest.raises(IndexError, match="index -1 out of range"):
            buf.add_sparse(np.array([-1], np.int32), np.ones(1, np.float32))
        with pytest.raises(TypeError, match="int32 or int64"):
            buf.add_sparse(np.array([0], np.uint8), np.ones(1, np.float32))
        with pytest.raises(TypeError, match="dtype float32, got float64"):
            buf.add_sparse(np.array([0]), np.ones(1))
        with pytest.raises(ValueError, match=r"shape \(1,\), got \(2,\)"):
            buf.add_sparse(np.array([0]), np.ones(2, np.float32))
        with pytest.raises(ValueError, match="non-contiguous"):
            buf.add_sparse(np.arange(4)[::2], np.ones(2, np.float32))
        with pytest.raises(ValueError, match=r"shape \(6,\), got \(5,\)"):
            buf.read(np.empty(5, np.float32))
        with pytest.raises(TypeError, match="dtype float32, got float64"):
            buf.read(np.empty(6))
        buf.add_sparse(np.array([], np.int64), np.array([], np.float32))  # a no-op
    with pytest.raises(TypeError, match="floating dtype"):
        shm.ParamBuffer.create({"n": np.zeros(3, np.int32)})


# ----------------------------------------------------------------------------- lifecycle


def test_names_and_existence_errors():
    with shm.AtomicArray.create(1) as a:
        assert a.name.startswith("/jaxasync-") and a.is_creator and a.creator_pid == os.getpid()
        with pytest.raises(FileExistsError):
            shm.Register.create(3, name=a.name)
        b = shm.AtomicArray.attach(a.name.lstrip("/"))  # the leading slash is optional
        with pytest.raises(PermissionError, match="only the creator"):
            b.unlink()
        b.close()
        b.close()  # idempotent
        with pytest.raises(ValueError, match="is closed"):
            b.load(0)
    with pytest.raises(FileNotFoundError):
        shm.AtomicArray.attach(a.name)
    with pytest.raises(ValueError, match="invalid shared-memory name"):
        shm.AtomicArray.create(1, name="a/b")
    with pytest.raises(TypeError, match="create"):
        shm.AtomicArray()


def test_unlinked_on_exit_and_on_exception():
    with shm.ParamBuffer.create(4) as buf:
        name = buf.name
        assert _dev_shm(name).exists()
    assert not _dev_shm(name).exists() and buf.closed
    with pytest.raises(RuntimeError, match="boom"), shm.Mailbox.create(2, 2) as box:
        name = box.name
        raise RuntimeError("boom")
    assert not _dev_shm(name).exists()


def test_forgotten_creator_unlinks_at_gc_and_at_interpreter_exit():
    import gc

    reg = shm.Register.create(3)
    name = reg.name
    del reg
    gc.collect()
    assert not _dev_shm(name).exists()

    recv, send = CTX.Pipe(duplex=False)
    _run(CTX.Process(target=_create_and_forget, args=(send,)))
    names = recv.recv()
    assert names and not any(_dev_shm(n).exists() for n in names)


def test_child_killed_while_attached_leaves_nothing():
    with shm.AtomicArray.create(1) as ready, shm.Register.create(8) as reg:
        child = CTX.Process(target=_sleep_attached, args=(reg, ready))
        child.start()
        try:
            _wait_for(lambda: ready.load(0) == 1, "the child to attach")
            os.kill(child.pid, signal.SIGKILL)
            child.join(DEADLINE)
            assert child.exitcode == -signal.SIGKILL
        finally:
            if child.is_alive():
                child.kill()
        reg.write(np.ones(8, np.float32), 1)  # still fully usable by the creator
        assert reg.read()[0] == 1
        name = reg.name
    assert not _dev_shm(name).exists()


def test_pickled_objects_attach_in_a_spawned_child():
    with (
        shm.AtomicArray.create(1) as arr,
        shm.Register.create(3, np.float64) as reg,
        shm.Mailbox.create(2, 4, np.int32) as box,
        shm.ParamBuffer.create({"x": np.arange(4, dtype=np.float32)}) as buf,
    ):
        _run(CTX.Process(target=_use_pickled, args=((arr, reg, box, buf),)))
        assert arr.load(0) == 41
        tag, value = reg.read()
        assert tag == 9 and value.tolist() == [3.5] * 3
        tag, msg = box.recv()
        assert tag == 11 and msg.tolist() == [0, 1, 2, 3]
        np.testing.assert_array_equal(buf.read()["x"], 2 * np.arange(4, dtype=np.float32))
        clone = pickle.loads(pickle.dumps(arr))
        assert clone.name == arr.name and not clone.is_creator and clone.load(0) == 41
        clone.close()


def _set_version(name: str, version: int) -> None:
    import jaxasync._native as native

    offset = native.ffi.offsetof("ja_header", "version")
    with open(_dev_shm(name), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        struct.pack_into("<I", m, offset, version)


def test_header_checks_on_attach():
    with shm.Register.create(4) as reg:
        with pytest.raises(ValueError, match="holds a Register, not a Mailbox"):
            shm.Mailbox.attach(reg.name)
        _set_version(reg.name, 99)
        with pytest.raises(ValueError, match="layout version 99"):
            shm.Register.attach(reg.name)
        _set_version(reg.name, 1)
        shm.Register.attach(reg.name).close()
    junk = _dev_shm(f"jaxasync-test-junk-{os.getpid()}")
    try:
        junk.write_bytes(b"x" * 10)
        with pytest.raises(ValueError, match="too small"):
            shm.AtomicArray.attach(junk.name)
        junk.write_bytes(b"x" * 4096)
        with pytest.raises(ValueError, match="bad magic"):
            shm.AtomicArray.attach(junk.name)
    finally:
        junk.unlink()


def test_more_than_dev_shm_holds_is_enospc_and_leaves_nothing():
    vfs = os.statvfs("/dev/shm")
    too_many_cells = vfs.f_blocks * vfs.f_frsize // 64 + 1  # one 64-byte line per cell
    name = f"/jaxasync-test-enospc-{os.getpid()}"
    with pytest.raises(OSError) as info:
        shm.AtomicArray.create(too_many_cells, name=name)
    assert info.value.errno == errno.ENOSPC and info.value.filename == name
    assert not _dev_shm(name).exists()


def test_docstring_examples_run():
    import doctest

    from jaxasync._src import shm as module

    assert doctest.testmod(module).failed == 0
