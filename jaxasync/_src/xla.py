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


@jax.tree_util.register_pytree_node_class
class _Unique:
    """An output pytree flattened to its distinct values; the aux data says where each one goes."""

    def __init__(self, values, where):
        self.values, self.where = list(values), where

    def tree_flatten(self):
        return self.values, self.where

    @classmethod
    def tree_unflatten(cls, where, values):
        return cls(values, where)

    def expand(self):
        index, treedef = self.where
        return treedef.unflatten([self.values[i] for i in index])


def jit_unique_outputs(fn, **kwargs):
    """:func:`jit` for a handler ``fn -> (state, *rest)``: a value it returns twice is written once.

    A jitted function that returns one traced value twice (a node step's ``y`` as its register
    write and as its message) gets two output buffers, and XLA fills the second with a copy (4 MB at
    d = 2^20, run as one single-threaded ``memcpy`` on CPU). Here a value in ``rest`` that was
    already returned (in ``state`` or earlier in ``rest``) is not returned again: the caller gets
    the same ``jax.Array`` in both places, as ``fn`` returned it. The leaves of ``state`` keep a
    buffer each, since callers donate the state to their next call and a buffer can be donated only
    once; donating it still invalidates the arrays of ``rest`` that share its buffers, so the
    executors consume a handler's messages and shared-object writes before they pass its state on.

    The returned callable also has ``lower``, like a jitted function.
    """

    def distinct(*args, **kw):
        out = fn(*args, **kw)
        own = len(jax.tree.leaves(out[0])) if isinstance(out, tuple) and out else 0
        leaves, treedef = jax.tree.flatten(out)
        first, values, index = {}, [], []
        for k, leaf in enumerate(leaves):
            # The same traced value is the same Python object.
            if k >= own and id(leaf) in first:
                index.append(first[id(leaf)])
                continue
            first.setdefault(id(leaf), len(values))
            index.append(len(values))
            values.append(leaf)
        return _Unique(values, (tuple(index), treedef))

    compiled = jit(distinct, **kwargs)

    def call(*args, **kw):
        return compiled(*args, **kw).expand()

    call.lower = compiled.lower
    return call
