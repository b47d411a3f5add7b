"""How jaxasync's executors compile: ``jax.jit`` with XLA options that suit event handlers."""

from __future__ import annotations

import jax


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)``, on CPU with XLA's region-based copy insertion.

    XLA:CPU's default copy insertion copies a buffer that is updated in place while another loop
    still reads its old value: every loop-carried node state and message pool of the simulator's
    event loop, on every event (R-FAST at n = 16: 2.5x the CPU time per event), and donated state leaves of
    a node's step. Region analysis proves most of those copies unneeded. The results are the same
    bits.
    """
    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", {"xla_cpu_copy_insertion_use_region_analysis": True})
    return jax.jit(fn, **kwargs)
