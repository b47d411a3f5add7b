"""Shared-memory objects for several processes on one machine.

Four objects live in POSIX shared memory owned by the native core
(`csrc/jaxasync.h`, compiled as `jaxasync._native`):

* `AtomicArray`: `n` int64 cells with seq_cst `load`, `store`, `fetch_add` and
  `compare_exchange`.
* `Register`: a single-writer multi-reader vector with an int64 tag. Writes are
  wait-free; a read never returns a torn vector; a writer killed mid-write
  leaves readers with the last completed value. Before the first write a read
  returns tag -1 and zeros.
* `ParamBuffer`: a flat float32 buffer holding a pytree, with dense and sparse
  `add` in three modes ("racy", "relaxed", "atomic") and a shared step counter.
* `Mailbox`: a bounded single-producer single-consumer ring of fixed-size
  messages with an int64 tag.

Every object is made with `Cls.create(...)` (the creator) or `Cls.attach(name)`
(any process) and has:

* `.name`, the POSIX shared-memory name (`/jaxasync-<pid>-<random>` by default);
* `close()`, which unmaps it in this process, and `unlink()`, which removes the
  name (creator only: others get `PermissionError`);
* context-manager use: on exit it is closed, and unlinked if this handle is
  the creator;
* pickling as "attach by name", so passing it to a spawned process attaches.

If a creator forgets to unlink, a `weakref.finalize` unlinks when the creator
object is garbage-collected or at interpreter exit (not after SIGKILL: then the
name stays in /dev/shm until someone unlinks it). Segments therefore live as
long as their creator object: keep it referenced while others attach.

Inputs are checked before any native call: a wrong dtype raises `TypeError`,
a wrong shape or a non-contiguous array `ValueError`, an index out of range
`IndexError`; attaching to a missing name raises `FileNotFoundError`, creating
an existing one `FileExistsError`, a full /dev/shm `OSError` (ENOSPC) with
nothing left behind, and a segment of another kind or layout version
`ValueError`. Handles are not meant to be closed while another thread of the
same process is using them.
"""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxasync import _native

_ffi = _native.ffi
_lib = _native.lib
# Hot functions as module globals: attribute lookup on the cffi lib object costs
# about as much as a small call itself.
_from_buffer = _ffi.from_buffer
_atomic_load = _lib.ja_atomic_load
_atomic_store = _lib.ja_atomic_store
_atomic_fetch_add = _lib.ja_atomic_fetch_add
_atomic_cas = _lib.ja_atomic_compare_exchange
_register_write = _lib.ja_register_write
_register_read = _lib.ja_register_read
_mailbox_send = _lib.ja_mailbox_send
_mailbox_recv = _lib.ja_mailbox_recv
_f32_add = _lib.ja_f32_add
_f32_add_segments = _lib.ja_f32_add_segments

# Element types of registers and mailboxes; the header stores index + 1.
_DTYPES = tuple(
    np.dtype(name)
    for name in "float32 float64 int32 int64 float16 int8 int16 uint8 uint16 uint32 uint64".split()
)
_DTYPE_CODE = {dt: code for code, dt in enumerate(_DTYPES, start=1)}
_F32 = np.dtype(np.float32)
_KIND_NAMES = {
    _lib.JA_KIND_ATOMIC_ARRAY: "AtomicArray",
    _lib.JA_KIND_REGISTER: "Register",
    _lib.JA_KIND_PARAM_BUFFER: "ParamBuffer",
    _lib.JA_KIND_MAILBOX: "Mailbox",
}
_MODES = {"racy": _lib.JA_ADD_RACY, "relaxed": _lib.JA_ADD_RELAXED, "atomic": _lib.JA_ADD_ATOMIC}
_LEAF_FLOATS = 16  # 64 bytes of float32: every ParamBuffer leaf starts on a cache line
_MAX_ELEMENTS = 1 << 48


# ----------------------------------------------------------------------------- helpers


def _shm_name(name: str | None) -> str:
    """Returns a valid POSIX shm name: '/name', recognizable when generated."""
    if name is None:
        return f"/jaxasync-{os.getpid()}-{secrets.token_hex(4)}"
    if not isinstance(name, str) or not name.strip("/") or "/" in name.strip("/"):
        raise ValueError(f"invalid shared-memory name {name!r}: need a non-empty name without '/'")
    name = "/" + name.lstrip("/")
    if len(name) > 255:
        raise ValueError(f"shared-memory name too long ({len(name)} > 255 characters)")
    return name


def _raise_errno(name: str) -> None:
    err = _ffi.errno
    raise OSError(err, os.strerror(err), name)


def _count(n: Any, what: str) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(n).__name__}")
    if not 1 <= n <= _MAX_ELEMENTS:
        raise ValueError(f"{what} must be in [1, 2**48], got {n}")
    return int(n)


def _shape(shape: Any) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(shape) > _lib.JA_MAX_NDIM:
        raise ValueError(f"shape {shape} has more than {_lib.JA_MAX_NDIM} dimensions")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"shape {shape} must be a tuple of positive ints")
    _count(int(np.prod(shape, dtype=np.int64)) if shape else 1, "number of elements")
    return tuple(int(d) for d in shape)


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _DTYPE_CODE:
        names = ", ".join(d.name for d in _DTYPES)
        raise TypeError(f"unsupported dtype {dt}; supported: {names}")
    return dt


def _checked(a: Any, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Returns `a` as an ndarray after checking dtype, shape, contiguity and alignment."""
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    if a.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {a.shape}")
    flags = a.flags
    if not flags.c_contiguous:
        raise _non_contiguous(what)
    if not flags.aligned:
        raise ValueError(f"{what} is not aligned to its itemsize")
    return a


def _non_contiguous(what: str) -> ValueError:
    return ValueError(f"{what} is non-contiguous; pass np.ascontiguousarray(...)")


def _bytes_ptr(a: Any, dtype: np.dtype, shape: tuple[int, ...], what: str) -> Any:
    """A cffi pointer to the bytes of `a`, checked like `_checked` (for memcpy'd payloads).

    The fast path (an ndarray of exactly this dtype and shape) leaves the
    contiguity check to `from_buffer`, which refuses non-C-contiguous arrays.
    """
    if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape:
        a = _checked(a, dtype, shape, what)
    try:
        return _from_buffer(a)
    except ValueError:
        raise _non_contiguous(what) from None


def _out_ptr(out: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    if type(out) is not np.ndarray:
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    _checked(out, dtype, shape, "out")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return _ffi.from_buffer(out, require_writable=True)


class _Mapping:
    """What the finalizer needs: the mapping, and the name while we own it."""

    __slots__ = ("base", "size", "creator", "owned_name", "owner_pid")

    def __init__(self, base: Any, size: int, name: str, creator: bool):
        self.base, self.size, self.creator = base, size, creator
        self.owned_name = name if creator else None  # None once unlinked
        self.owner_pid = os.getpid()

    def unmap(self) -> None:
        if self.base is not None:
            _lib.ja_segment_close(self.base, self.size)
            self.base = None

    def unlink(self) -> None:
        # A forked child inherits the handle but must not remove the name.
        if self.owned_name is not None and os.getpid() == self.owner_pid:
            name, self.owned_name = self.owned_name, None
            if _lib.ja_segment_unlink(name.encode()) != 0 and _ffi.errno != errno.ENOENT:
                _raise_errno(name)

    def release(self) -> None:
        self.unmap()
        self.unlink()


def _attach_by_name(cls: type, name: str) -> Any:
    return cls.attach(name)


# ----------------------------------------------------------------------------- base


class _Segment:
    """A mapped segment: naming, header checks, lifecycle, pickling."""

    _KIND: int = 0
    _KEEP = frozenset({"_name", "_state", "_finalizer", "_creator_pid"})

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs  # construction goes through create() / attach()
        raise TypeError(f"use {type(self).__name__}.create(...) or .attach(name)")

    @classmethod
    def _create(
        cls,
        name: str | None,
        *,
        shape: tuple[int, ...],
        dtype: np.dtype,
        count: int,
        capacity: int = 0,
        meta: bytes = b"",
    ) -> Any:
        name = _shm_name(name)
        h = _ffi.new("ja_header *")
        h.kind, h.dtype, h.itemsize = cls._KIND, _DTYPE_CODE[dtype], dtype.itemsize
        h.ndim = len(shape)
        h.shape[0 : len(shape)] = shape
        h.count, h.capacity, h.meta_size = count, capacity, len(meta)
        base = _lib.ja_segment_create(name.encode(), h, meta)
        if base == _ffi.NULL:
            _raise_errno(name)
        return cls._open(base, _ffi.cast("ja_header *", base).size, name, creator=True)

    @classmethod
    def attach(cls, name: str) -> Any:
        """Maps the existing segment `name`, created by any process.

        Raises:
          FileNotFoundError: no such segment.
          ValueError: it is not a jaxasync segment of this kind and layout version.
        """
        name = _shm_name(name)
        size = _ffi.new("uint64_t *")
        base = _lib.ja_segment_attach(name.encode(), size)
        if base == _ffi.NULL:
            if _ffi.errno == errno.EBADMSG:
                raise ValueError(
                    f"{name!r} is not a jaxasync segment: {size[0]} bytes is too small "
                    "for a header (or its creator has not finished)"
                )
            _raise_errno(name)
        try:
            cls._check_header(base, size[0], name)
        except BaseException:
            _lib.ja_segment_close(base, size[0])
            raise
        return cls._open(base, size[0], name, creator=False)

    @classmethod
    def _check_header(cls, base: Any, size: int, name: str) -> None:
        h = _ffi.cast("ja_header *", base)
        if _lib.ja_header_magic_acquire(h) != _lib.JA_MAGIC:
            raise ValueError(f"{name!r} is not a jaxasync segment (bad magic) or is being created")
        if h.version != _lib.JA_LAYOUT_VERSION:
            raise ValueError(
                f"{name!r} has layout version {h.version}; this build reads layout version "
                f"{_lib.JA_LAYOUT_VERSION} (rebuild or recreate the segment)"
            )
        if h.kind != cls._KIND:
            kind = _KIND_NAMES.get(h.kind, f"unknown kind {h.kind}")
            raise ValueError(f"{name!r} holds a {kind}, not a {cls.__name__}")
        if not 1 <= h.dtype <= len(_DTYPES) or h.itemsize != _DTYPES[h.dtype - 1].itemsize:
            raise ValueError(f"{name!r} has an unknown dtype code {h.dtype}")
        # Recompute the layout from the header's inputs: a corrupt header must
        # not let us index outside the mapping.
        again = _ffi.new("ja_header *", h[0])
        if (
            h.ndim > _lib.JA_MAX_NDIM
            or _lib.ja_layout(again) != size
            or h.size != size
            or (again.data_offset, again.slot_stride) != (h.data_offset, h.slot_stride)
        ):
            raise ValueError(f"{name!r} has an inconsistent header (corrupt segment?)")

    @classmethod
    def _open(cls, base: Any, size: int, name: str, creator: bool) -> Any:
        self = cls.__new__(cls)
        self._name = name
        self._state = _Mapping(base, size, name, creator)
        self._finalizer = weakref.finalize(self, _Mapping.release, self._state)
        self._base = base
        self._header = _ffi.cast("ja_header *", base)
        self._creator_pid = int(self._header.creator_pid)
        try:
            self._setup()
        except BaseException:
            self._finalizer()
            raise
        return self

    def _setup(self) -> None:
        """Caches what the hot paths need from the header."""

    def _header_shape(self) -> tuple[int, ...]:
        h = self._header
        return tuple(int(h.shape[k]) for k in range(h.ndim))

    def _header_dtype(self) -> np.dtype:
        return _DTYPES[self._header.dtype - 1]

    @property
    def name(self) -> str:
        """The POSIX shared-memory name; `Cls.attach(name)` maps it elsewhere."""
        return self._name

    @property
    def is_creator(self) -> bool:
        """Whether this handle created the segment (and may unlink it)."""
        return self._state.creator

    @property
    def closed(self) -> bool:
        return self._state.base is None

    @property
    def creator_pid(self) -> int:
        return self._creator_pid

    def close(self) -> None:
        """Unmaps the segment in this process (idempotent); the name stays."""
        if self._state.base is None:
            return
        # Drop every cached pointer and view first; a later use raises ValueError.
        for attr in [a for a in self.__dict__ if a not in self._KEEP]:
            del self.__dict__[attr]
        self._state.unmap()

    def unlink(self) -> None:
        """Removes the name (creator only, idempotent); mappings stay valid until closed.

        Raises:
          PermissionError: this handle attached to the segment, or was inherited
            by a forked child, so it does not own the name.
        """
        if not self._state.creator:
            raise PermissionError(
                f"only the creator (pid {self._creator_pid}) unlinks {self._name!r}; "
                "this handle attached to it"
            )
        if os.getpid() != self._state.owner_pid:
            raise PermissionError(
                f"{self._name!r} belongs to process {self._state.owner_pid}, not to this forked child"
            )
        self._state.unlink()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._state.unlink()  # a no-op unless this process created it

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_by_name, (type(self), self._name))

    def __getattr__(self, attr: str) -> Any:
        # Only reached for missing attributes, i.e. cached ones after close().
        state = self.__dict__.get("_state")
        if state is not None and state.base is None and attr.startswith("_"):
            raise ValueError(f"{type(self).__name__} {self.__dict__['_name']!r} is closed")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("creator" if self.is_creator else "attached")
        return f"{type(self).__name__}(name={self._name!r}, {state})"


# ----------------------------------------------------------------------------- AtomicArray


class AtomicArray(_Segment):
    """`n` shared int64 cells; every operation is atomic and seq_cst.

    Each cell sits on its own 64-byte line, so processes hammering different
    cells do not false-share. Indices are `0 <= i < len(self)` (no negative
    indexing).

    Example:
      >>> counters = AtomicArray.create(4)
      >>> counters.fetch_add(0, 5)
      0
      >>> counters.compare_exchange(0, 5, 7)
      (True, 5)
      >>> counters.load(0)
      7
      >>> counters.close(); counters.unlink()
    """

    _KIND = _lib.JA_KIND_ATOMIC_ARRAY

    @classmethod
    def create(cls, n: int, name: str | None = None) -> AtomicArray:
        """Creates `n` cells, all 0.

        Args:
          n: number of cells (>= 1).
          name: shared-memory name; None picks `/jaxasync-<pid>-<random>`.
        """
        n = _count(n, "n")
        return cls._create(name, shape=(n,), dtype=np.dtype(np.int64), count=n)

    def _setup(self) -> None:
        self._n = int(self._header.count)

    def __len__(self) -> int:
        return self._n

    def _index_error(self, i: Any) -> IndexError:
        return IndexError(f"index {i} out of range for AtomicArray of length {self._n}")

    def load(self, i: int) -> int:
        """Returns cell `i` (seq_cst load)."""
        if not 0 <= i < self._n:
            raise self._index_error(i)
        return _atomic_load(self._base, i)

    def store(self, i: int, v: int) -> None:
        """Sets cell `i` to `v` (seq_cst store)."""
        if not 0 <= i < self._n:
            raise self._index_error(i)
        _atomic_store(self._base, i, v)

    def fetch_add(self, i: int, d: int = 1) -> int:
        """Adds `d` to cell `i` (wrapping at 64 bits) and returns the old value (seq_cst)."""
        if not 0 <= i < self._n:
            raise self._index_error(i)
        return _atomic_fetch_add(self._base, i, d)

    def compare_exchange(self, i: int, expected: int, desired: int) -> tuple[bool, int]:
        """Sets cell `i` to `desired` if it equals `expected` (strong, seq_cst).

        Returns:
          `(ok, observed)`: whether the exchange happened, and the value seen
          (equal to `expected` exactly when `ok`).
        """
        if not 0 <= i < self._n:
            raise self._index_error(i)
        observed = _atomic_cas(self._base, i, expected, desired)
        return observed == expected, observed

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + (f", n={self._n})" if not self.closed else ")")


# ----------------------------------------------------------------------------- Register


class Register(_Segment):
    """Single-writer multi-reader vector register with an int64 tag.

    `write` is wait-free and is made visible by one release store; `read`
    returns the last completed `(tag, value)` and never a torn vector, even if
    the writer was killed mid-write. Before the first write, `read` returns
    `(-1, zeros)`. At most one process writes at a time (a new writer may take
    over after the old one died).

    Example:
      >>> reg = Register.create(3, np.float32)
      >>> reg.write(np.ones(3, np.float32), tag=1)
      >>> reg.read()
      (1, array([1., 1., 1.], dtype=float32))
      >>> reg.close(); reg.unlink()
    """

    _KIND = _lib.JA_KIND_REGISTER

    @classmethod
    def create(cls, shape: Any, dtype: Any = np.float32, name: str | None = None) -> Register:
        """Creates a register holding one array of `shape` and `dtype`.

        Args:
          shape: an int or a tuple of ints.
          dtype: float32, float64, int32, int64 (and other fixed-size ints,
            float16).
          name: shared-memory name; None picks one.
        """
        shape, dtype = _shape(shape), _dtype(dtype)
        return cls._create(name, shape=shape, dtype=dtype, count=int(np.prod(shape, dtype=int)))

    def _setup(self) -> None:
        self._shape = self._header_shape()
        self._dtype = self._header_dtype()
        self._out = self._out_cdata = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def write(self, value: Any, tag: int) -> None:
        """Publishes `value` (exact dtype and shape, C-contiguous) with `tag`."""
        _register_write(self._base, _bytes_ptr(value, self._dtype, self._shape, "value"), tag)

    def read(self, out: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        """Returns `(tag, value)` of the last completed write.

        Args:
          out: optional array of the register's dtype and shape to fill
            (checked once, then reused cheaply when passed again).
        """
        if out is None:
            out = np.empty(self._shape, self._dtype)
            return _register_read(self._base, _from_buffer(out)), out
        if out is not self._out:
            self._out_cdata = _out_ptr(out, self._dtype, self._shape)
            self._out = out
        return _register_read(self._base, self._out_cdata), out

    @property
    def version(self) -> int:
        """Number of completed writes (a relaxed snapshot)."""
        return int(_lib.ja_register_version_relaxed(self._base))


# ----------------------------------------------------------------------------- Mailbox


class Mailbox(_Segment):
    """Bounded single-producer single-consumer ring of `(tag, array)` messages.

    One process (or thread) sends and one receives; messages arrive in order,
    none lost or duplicated. `send` returns False when the ring is full and
    `recv` returns None when it is empty; neither blocks.

    Example:
      >>> box = Mailbox.create(8, (2,), np.float32)
      >>> box.send(np.array([1, 2], np.float32), tag=7)
      True
      >>> box.recv()
      (7, array([1., 2.], dtype=float32))
      >>> box.recv() is None
      True
      >>> box.close(); box.unlink()
    """

    _KIND = _lib.JA_KIND_MAILBOX

    @classmethod
    def create(cls, capacity: int, shape: Any, dtype: Any = np.float32, name: str | None = None) -> Mailbox:
        """Creates an empty ring of `capacity` messages of `shape` and `dtype`."""
        capacity, shape, dtype = _count(capacity, "capacity"), _shape(shape), _dtype(dtype)
        count = int(np.prod(shape, dtype=int))
        return cls._create(name, shape=shape, dtype=dtype, count=count, capacity=capacity)

    def _setup(self) -> None:
        self._shape = self._header_shape()
        self._dtype = self._header_dtype()
        self._capacity = int(self._header.capacity)
        self._tag = _ffi.new("int64_t *")  # the single consumer's tag cell
        self._out = self._out_cdata = None
        self._spare = self._spare_cdata = None  # reused while recv finds nothing

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Messages waiting (a snapshot)."""
        return int(_lib.ja_mailbox_size(self._base))

    def send(self, value: Any, tag: int) -> bool:
        """Enqueues a copy of `value` with `tag`; returns False if the ring is full."""
        ptr = _bytes_ptr(value, self._dtype, self._shape, "value")
        return _mailbox_send(self._base, ptr, tag) == 1

    def recv(self, out: np.ndarray | None = None) -> tuple[int, np.ndarray] | None:
        """Dequeues the oldest message as `(tag, value)`, or returns None if empty.

        Args:
          out: optional array to fill (checked once, then reused cheaply).
        """
        if out is None:
            if self._spare is None:
                self._spare = np.empty(self._shape, self._dtype)
                self._spare_cdata = _ffi.from_buffer(self._spare)
            if not _mailbox_recv(self._base, self._spare_cdata, self._tag):
                return None
            out, self._spare = self._spare, None
            return self._tag[0], out
        if out is not self._out:
            self._out_cdata = _out_ptr(out, self._dtype, self._shape)
            self._out = out
        if not _mailbox_recv(self._base, self._out_cdata, self._tag):
            return None
        return self._tag[0], out


# ----------------------------------------------------------------------------- ParamBuffer


class _Spec(NamedTuple):
    """A leaf known only by shape and dtype (its values start at zero)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _is_float(dt: np.dtype) -> bool:
    # bfloat16 and the float8 types of ml_dtypes have kind 'V'.
    return dt.kind == "f" or (dt.kind == "V" and "float" in dt.name)


def _has_values(leaf: Any) -> bool:
    return isinstance(leaf, (np.ndarray, np.generic, float)) or hasattr(leaf, "__array__")


def _template_leaves(template: Any) -> tuple[Any, list[Any]]:
    """Returns (treedef or None for a single array, leaves) of a template."""
    if isinstance(template, (int, np.integer)) and not isinstance(template, bool):
        return None, [_Spec(_shape(template), _F32)]
    if isinstance(template, tuple) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in template
    ):
        return None, [_Spec(_shape(template), _F32)]
    if hasattr(template, "shape") and hasattr(template, "dtype"):
        return None, [template]
    import jax  # only pytree templates need jax

    leaves, treedef = jax.tree_util.tree_flatten(template)
    if not leaves:
        raise ValueError("template has no leaves")
    return (None if jax.tree_util.treedef_is_leaf(treedef) else treedef), leaves


def _leaf_spec(leaf: Any) -> _Spec:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        shape, dtype = tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)
    else:
        a = np.asarray(leaf)
        shape, dtype = a.shape, a.dtype
    if not _is_float(dtype):
        raise TypeError(f"parameter leaves must have a floating dtype (stored as float32), got {dtype}")
    return _Spec(shape, dtype)


class ParamBuffer(_Segment):
    """A shared flat float32 buffer holding a pytree, for Hogwild-style training.

    Leaves are stored as float32 at 64-byte-aligned offsets (zero padding in
    between). Leaves of other floating dtypes (bfloat16, float16, float64) are
    cast to float32 on the way in and back to their dtype by `read()`;
    non-floating leaves are rejected with TypeError. The structure (treedef,
    shapes, dtypes) is pickled into the segment, so `attach` rebuilds it.

    Updates take one of two forms:

    * flat: an array of shape `(size,)` and dtype float32 (never cast), the
      parameters in `tree_leaves` order without padding;
    * a pytree with the template's structure (a bare array of the leaf's shape
      for a single-array template), whose floating leaves are cast to float32.

    Modes of `add` / `add_sparse` (each element is updated independently; no
    mode orders the buffer with other memory, but `next_step` is seq_cst):

    * "racy": plain vectorized loads and stores; concurrent updates of the
      same element may be lost.
    * "relaxed": relaxed 32-bit atomic load and store per element; no torn
      element, concurrent updates may be lost.
    * "atomic": compare-exchange loop per element; no update is lost.

    Example:
      >>> params = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
      >>> buf = ParamBuffer.create(params)
      >>> buf.add({"w": np.ones((2, 3)), "b": np.ones(3)}, scale=-0.1, mode="atomic")
      >>> buf.read()["b"]
      array([-0.1, -0.1, -0.1], dtype=float32)
      >>> buf.next_step(), buf.step
      (0, 1)
      >>> buf.close(); buf.unlink()
    """

    _KIND = _lib.JA_KIND_PARAM_BUFFER

    @classmethod
    def create(cls, template: Any, name: str | None = None) -> ParamBuffer:
        """Creates a buffer shaped like `template`, holding its values.

        Args:
          template: a pytree of arrays (numpy, jax, or anything with `shape`
            and `dtype`, such as `jax.ShapeDtypeStruct`, which starts at zero),
            or an int / tuple of ints giving the shape of one zero float32 array.
          name: shared-memory name; None picks one.
        """
        treedef, leaves = _template_leaves(template)
        specs = [_leaf_spec(leaf) for leaf in leaves]
        shapes = tuple(s.shape for s in specs)
        dtypes = tuple(s.dtype for s in specs)
        sizes, offsets, padded = _leaf_layout(shapes)
        meta = pickle.dumps((treedef, shapes, dtypes))
        self = cls._create(name, shape=(sum(sizes),), dtype=_F32, count=padded, meta=meta)
        try:
            for leaf, off, n in zip(leaves, offsets, sizes):
                if _has_values(leaf) and not isinstance(leaf, _Spec):
                    self._view[off : off + n] = np.asarray(leaf, dtype=np.float32).ravel()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _setup(self) -> None:
        h = self._header
        meta = _ffi.buffer(_ffi.cast("char *", self._base) + h.meta_offset, h.meta_size)
        try:  # the structure, pickled by the creator (same user: trusted)
            self._treedef, self._shapes, self._dtypes = pickle.loads(meta[:])
        except Exception as e:
            raise ValueError(f"{self._name!r}: cannot read the stored pytree structure") from e
        sizes, offsets, padded = _leaf_layout(self._shapes)
        if padded != h.count:
            raise ValueError(f"{self._name!r}: the stored structure does not match the buffer size")
        self._size = sum(sizes)
        self._flat_shape = (self._size,)
        self._sizes, self._offsets, self._nseg = sizes, offsets, len(sizes)
        self._seg = np.array([(o, n) for o, n in zip(offsets, sizes)], np.int64).ravel()
        self._seg_cdata = _ffi.from_buffer("int64_t[]", self._seg)
        starts = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
        self._starts, self._shift = starts, np.asarray(offsets, np.int64) - starts
        self._data = _ffi.cast("float *", _ffi.cast("char *", self._base) + h.data_offset)
        self._view = np.frombuffer(_ffi.buffer(self._data, padded * 4), np.float32)
        self._out = self._out_cdata = None

    @property
    def size(self) -> int:
        """Number of parameters (without padding)."""
        return self._size

    @property
    def treedef(self) -> Any:
        """The template's jax treedef, or None for a single-array template."""
        return self._treedef

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        return self._dtypes

    @property
    def step(self) -> int:
        """The shared step counter (seq_cst load)."""
        return _lib.ja_step_load(self._base)

    def next_step(self) -> int:
        """Claims a step: seq_cst fetch_add on the counter; returns the value before.

        The claimed steps of all processes are distinct and consecutive, which
        makes them timestamps for staleness. This process's earlier adds happen
        before the claim.
        """
        return _lib.ja_step_fetch_add(self._base, 1)

    def _flat(self, x: Any) -> np.ndarray | None:
        """`x` as the checked flat float32 form, or None if it is a pytree."""
        if getattr(x, "shape", None) != self._flat_shape:
            return None
        return _checked(x, _F32, self._flat_shape, "flat delta")

    def _flat_ptr(self, x: Any) -> Any:
        """A `float *` to `x` in the checked flat form, or None if it is a pytree."""
        if not (
            type(x) is np.ndarray and x.dtype is _F32 and x.shape == self._flat_shape and x.flags.aligned
        ):
            x = self._flat(x)
            if x is None:
                return None
        try:
            return _from_buffer("float[]", x)
        except ValueError:  # from_buffer refuses non-C-contiguous arrays
            raise _non_contiguous("flat delta") from None

    def _leaves(self, tree: Any, what: str) -> list[np.ndarray]:
        """Float32 contiguous leaves of `tree`, checked against the template."""
        if self._treedef is None:
            leaves = [tree]
        else:
            import jax

            leaves, treedef = jax.tree_util.tree_flatten(tree)
            if treedef != self._treedef:
                raise TypeError(f"{what} has structure {treedef}, but the buffer holds {self._treedef}")
        out = []
        for k, (leaf, shape) in enumerate(zip(leaves, self._shapes)):
            a = np.asarray(leaf)
            if not _is_float(a.dtype):
                raise TypeError(f"{what} leaf {k} has dtype {a.dtype}; expected a floating dtype")
            if a.shape != shape:
                raise ValueError(f"{what} leaf {k} has shape {a.shape}, expected {shape}")
            out.append(np.ascontiguousarray(a, dtype=np.float32))
        return out

    def add(self, delta: Any, scale: float = 1.0, mode: str = "racy") -> None:
        """Adds `scale * delta` to the buffer.

        Args:
          delta: flat float32 array of shape `(size,)`, or a pytree like the template.
          scale: multiplier, e.g. `-learning_rate`.
          mode: "racy", "relaxed" or "atomic" (see the class docstring).
        """
        m = _MODES.get(mode)
        if m is None:
            raise ValueError(f"mode must be 'racy', 'relaxed' or 'atomic', got {mode!r}")
        src = self._flat_ptr(delta)
        if src is not None:
            _f32_add_segments(self._data, src, self._seg_cdata, self._nseg, scale, m)
            return
        for a, off, n in zip(self._leaves(delta, "delta"), self._offsets, self._sizes):
            _f32_add(self._data + off, _from_buffer("float[]", a), n, scale, m)

    def add_sparse(self, indices: Any, values: Any, scale: float = 1.0, mode: str = "racy") -> None:
        """Adds `scale * values[k]` to parameter `indices[k]` for every k.

        Args:
          indices: 1-D int32 or int64 indices into the flat parameter vector
            (without padding, `tree_leaves` order); repeats accumulate.
          values: float32 array of the same shape.
          scale: multiplier.
          mode: "racy", "relaxed" or "atomic".
        """
        m = _MODES.get(mode)
        if m is None:
            raise ValueError(f"mode must be 'racy', 'relaxed' or 'atomic', got {mode!r}")
        idx = indices if type(indices) is np.ndarray else np.asarray(indices)
        if idx.dtype != np.int32 and idx.dtype != np.int64:
            raise TypeError(f"indices must have dtype int32 or int64, got {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        idx = _checked(idx, idx.dtype, idx.shape, "indices")
        vals = _checked(values, _F32, idx.shape, "values")
        if not idx.size:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._size:
            bad = lo if lo < 0 else hi
            raise IndexError(f"index {bad} out of range for ParamBuffer of size {self._size}")
        if self._nseg > 1:  # skip the padding between leaves
            idx = idx + self._shift[np.searchsorted(self._starts, idx, side="right") - 1]
        vals_cdata = _ffi.from_buffer("float[]", vals)
        if idx.dtype == np.int32:
            idx_cdata = _ffi.from_buffer("int32_t[]", idx)
            _lib.ja_f32_add_sparse_i32(self._data, idx_cdata, vals_cdata, idx.size, scale, m)
        else:
            idx_cdata = _ffi.from_buffer("int64_t[]", idx)
            _lib.ja_f32_add_sparse_i64(self._data, idx_cdata, vals_cdata, idx.size, scale, m)

    def read(self, out: np.ndarray | None = None) -> Any:
        """Copies the parameters out (plain loads: no snapshot across elements).

        Args:
          out: optional flat float32 array of shape `(size,)` to fill (checked
            once, then reused cheaply when passed again).

        Returns:
          `out` if given, else a pytree of new numpy arrays in the template's
          structure and leaf dtypes.
        """
        if out is None:
            leaves = [
                self._view[off : off + n].reshape(shape).astype(dtype)
                for off, n, shape, dtype in zip(self._offsets, self._sizes, self._shapes, self._dtypes)
            ]
            if self._treedef is None:
                return leaves[0]
            import jax

            return jax.tree_util.tree_unflatten(self._treedef, leaves)
        if out is not self._out:
            self._out_cdata = _ffi.cast("float *", _out_ptr(out, _F32, self._flat_shape))
            self._out = out
        _lib.ja_f32_gather_segments(self._out_cdata, self._data, self._seg_cdata, self._nseg)
        return out

    def write(self, params: Any) -> None:
        """Sets the parameters (plain stores; meant for quiescent moments).

        Args:
          params: flat float32 array of shape `(size,)`, or a pytree like the template.
        """
        flat = self._flat(params)
        leaves = self._leaves(params, "params") if flat is None else None
        start = 0
        for k, (off, n) in enumerate(zip(self._offsets, self._sizes)):
            src = flat[start : start + n] if leaves is None else leaves[k].ravel()
            self._view[off : off + n] = src
            start += n


def _leaf_layout(shapes: Sequence[tuple[int, ...]]) -> tuple[list[int], list[int], int]:
    """Returns (sizes, offsets, padded total) with every offset 64-byte aligned."""
    sizes, offsets, off = [], [], 0
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        sizes.append(n)
        offsets.append(off)
        off += -(-n // _LEAF_FLOATS) * _LEAF_FLOATS
    return sizes, offsets, off
