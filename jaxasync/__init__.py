"""jaxasync: asynchronous and decentralized stochastic optimization in JAX.

Layers (see the README): pure JAX node programs and Optax transforms (``jaxasync.algorithms``,
``jaxasync.sparsify``, ...); executors that drive them (``jaxasync.simulate`` and ``jaxasync.sweep``;
the local multi-process runtime ``jaxasync.run`` and the MPI one ``jaxasync.run_mpi``); the native
shared-memory core (``jaxasync.shm``, imported on demand).
"""

from jaxasync import agreement as agreement
from jaxasync import algorithms as algorithms
from jaxasync import assignment as assignment
from jaxasync import compression as compression
from jaxasync import mixing as mixing
from jaxasync import problems as problems
from jaxasync import reproductions as reproductions
from jaxasync import schedules as schedules
from jaxasync import topology as topology
from jaxasync._src.asynchrony import Asynchrony as Asynchrony
from jaxasync._src.asynchrony import Distribution as Distribution
from jaxasync._src.asynchrony import abs_normal as abs_normal
from jaxasync._src.asynchrony import exponential as exponential
from jaxasync._src.asynchrony import fixed as fixed
from jaxasync._src.asynchrony import poisson as poisson
from jaxasync._src.asynchrony import uniform as uniform
from jaxasync._src.problem import Problem as Problem
from jaxasync._src.program import BroadcastOutbox as BroadcastOutbox
from jaxasync._src.program import Buffer as Buffer
from jaxasync._src.program import BufferAdd as BufferAdd
from jaxasync._src.program import BufferAddSparse as BufferAddSparse
from jaxasync._src.program import Channel as Channel
from jaxasync._src.program import Emit as Emit
from jaxasync._src.program import Message as Message
from jaxasync._src.program import NodeProgram as NodeProgram
from jaxasync._src.program import Outbox as Outbox
from jaxasync._src.program import Registers as Registers
from jaxasync._src.program import RegistersView as RegistersView
from jaxasync._src.program import RegisterWrite as RegisterWrite
from jaxasync._src.program import like_params as like_params
from jaxasync._src.reproduce import reproduce as reproduce
from jaxasync._src.simulator import record as record
from jaxasync._src.simulator import simulate as simulate
from jaxasync._src.simulator import sweep as sweep
from jaxasync._src.trace import Trace as Trace
from jaxasync._src.transforms import ScaleByStalenessState as ScaleByStalenessState
from jaxasync._src.transforms import SparsifyState as SparsifyState
from jaxasync._src.transforms import scale_by_staleness as scale_by_staleness
from jaxasync._src.transforms import sparsify as sparsify
from jaxasync._src.transforms import sparsify_update as sparsify_update

__version__ = "0.1.0"

__all__ = (
    "replay",
    "run",
    "run_mpi",
    "shm",
    "WorkerError",
    "agreement",
    "algorithms",
    "assignment",
    "compression",
    "like_params",
    "mixing",
    "problems",
    "record",
    "reproduce",
    "reproductions",
    "scale_by_staleness",
    "ScaleByStalenessState",
    "schedules",
    "sparsify",
    "sparsify_update",
    "SparsifyState",
    "Asynchrony",
    "BroadcastOutbox",
    "Buffer",
    "BufferAdd",
    "BufferAddSparse",
    "Channel",
    "Distribution",
    "Emit",
    "Message",
    "NodeProgram",
    "Outbox",
    "Problem",
    "Registers",
    "RegistersView",
    "RegisterWrite",
    "Trace",
    "abs_normal",
    "exponential",
    "fixed",
    "poisson",
    "simulate",
    "sweep",
    "topology",
    "uniform",
)

# The real executors and the native core load on first use, so that pure-JAX users (and a build
# without a C compiler) can import the package.
_LAZY = {
    "run": ("jaxasync._src.runtime.local", "run"),
    "replay": ("jaxasync._src.runtime.local", "replay"),
    "run_mpi": ("jaxasync._src.runtime.mpi", "run_mpi"),
    "WorkerError": ("jaxasync._src.runtime.local", "WorkerError"),
    "shm": ("jaxasync.shm", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxasync' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)
