"""Real executors of node programs: the local multi-process runtime (shared memory).

See :mod:`jaxasync._src.runtime.local` for the semantics, :mod:`.transport` for the message
transport interface (an MPI transport plugs in there), :mod:`.worker` for the worker loop and
:mod:`.progress` for the terminal progress bar.
"""

from jaxasync._src.runtime.local import WorkerError as WorkerError
from jaxasync._src.runtime.local import replay as replay
from jaxasync._src.runtime.local import run as run
from jaxasync._src.runtime.progress import ProgressBar as ProgressBar
from jaxasync._src.runtime.transport import Codec as Codec
from jaxasync._src.runtime.transport import ShmTransport as ShmTransport
from jaxasync._src.runtime.transport import Transport as Transport

__all__ = ("Codec", "ProgressBar", "ShmTransport", "Transport", "WorkerError", "replay", "run")
