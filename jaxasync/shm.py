"""Shared-memory objects over the native core (see `jaxasync._src.shm`)."""

from jaxasync._src.shm import AtomicArray as AtomicArray
from jaxasync._src.shm import Mailbox as Mailbox
from jaxasync._src.shm import ParamBuffer as ParamBuffer
from jaxasync._src.shm import Register as Register

__all__ = (
    "AtomicArray",
    "Mailbox",
    "ParamBuffer",
    "Register",
)
