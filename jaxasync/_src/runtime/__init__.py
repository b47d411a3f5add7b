"""Real executors of node programs: the local multi-process runtime (shared memory).

See :mod:`jaxasync._src.runtime.local` for the semantics, :mod:`.transport` for the message
transport interface (an MPI transport plugs in there), :mod:`.worker` for the worker loop (progress bar:
:mod:`jaxasync._src.progress`).
"""

from jaxasync._src.runtime.local import WorkerError as WorkerError
from jaxasync._src.runtime.local import replay as replay
from jaxasync._src.runtime.local import run as run
from jaxasync._src.runtime.transport import Codec as Codec
from jaxasync._src.runtime.transport import ShmTransport as ShmTransport
from jaxasync._src.runtime.transport import Transport as Transport

__all__ = ("Codec", "ShmTransport", "Transport", "WorkerError", "replay", "run")
