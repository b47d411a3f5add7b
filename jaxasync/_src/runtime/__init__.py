"""Real executors of node programs: the local multi-process runtime (shared memory) and MPI.

See :mod:`jaxasync._src.runtime.local` for the semantics, :mod:`.transport` for the message
transport interface, :mod:`.worker` for the worker loop (progress bar: :mod:`jaxasync._src.progress`)
and :mod:`.mpi` for one node per MPI rank (the same worker loop, messages between ranks).
"""

from jaxasync._src.runtime.local import WorkerError as WorkerError
from jaxasync._src.runtime.local import replay as replay
from jaxasync._src.runtime.local import run as run
from jaxasync._src.runtime.mpi import MpiTransport as MpiTransport
from jaxasync._src.runtime.mpi import run_mpi as run_mpi
from jaxasync._src.runtime.transport import Codec as Codec
from jaxasync._src.runtime.transport import ShmTransport as ShmTransport
from jaxasync._src.runtime.transport import Transport as Transport

__all__ = (
    "Codec",
    "MpiTransport",
    "ShmTransport",
    "Transport",
    "WorkerError",
    "replay",
    "run",
    "run_mpi",
)
