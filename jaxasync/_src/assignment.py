# Copyright 2025 The jaxasync Authors. Licensed under the Apache License 2.0.
"""Job-assignment policies of server-based asynchronous SGD (AsGrad).

After the server applies the gradient of job ``t`` (returned by the *finishing*
worker ``j_t``) it hands a new job to worker ``k_t``. A policy decides ``k_t``:

* ``pure``: ``k_t = j_t``, every worker always has exactly one job;
* ``random``: ``k_t ~ Uniform{0..n-1}`` i.i.d. (queues can grow);
* ``shuffled``: a fresh random permutation ``pi`` of the workers every block of
  ``n`` jobs, ``k_t = pi[t mod n]``: each worker gets exactly one job per block;
* ``shuffle_once``: one permutation drawn at the start and reused for every block.

Contract: a policy is an `AssignmentPolicy` ``(init, assign)`` of pure, jit-able
functions, in the style of ``optax.GradientTransformation``:

* ``init(key, n) -> AssignmentState``;
* ``assign(state, finished_worker) -> (worker, state)``: the int32 worker that gets
  job ``state.count``. Only ``pure`` reads ``finished_worker``; the others ignore it.

The decision never depends on the iterates, so an executor draws it together
with the event schedule: step by step with ``assign`` when it also simulates who
finishes (``pure``), or all at once with `draw_assignments`
(``policy.uses_finisher`` is False).

References:
  Islamov, Safaryan and Alistarh, "AsGrad: a sharp unified analysis of
  asynchronous-SGD algorithms", AISTATS 2024 (arXiv:2310.20452).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AssignmentPolicy",
    "AssignmentState",
    "assignment_policy",
    "draw_assignments",
    "pure_assignment",
    "random_assignment",
    "shuffle_once_assignment",
    "shuffled_assignment",
]


class AssignmentState(NamedTuple):
    """State of an assignment policy.

    Attributes:
      count: int32, number of jobs assigned so far (the index of the next job).
      key: PRNG key for future draws.
      perm: int32 ``[n]``, the current permutation of workers (shuffled rules;
        the identity otherwise).
    """

    count: jax.Array
    key: jax.Array
    perm: jax.Array


class AssignmentPolicy(NamedTuple):
    """A job-assignment rule as a pair of pure functions.

    Attributes:
      init: ``(key, n) -> AssignmentState``.
      assign: ``(state, finished_worker) -> (worker, state)``.
      name: ``"pure"``, ``"random"``, ``"shuffled"`` or ``"shuffle_once"``.
      uses_finisher: whether ``assign`` depends on ``finished_worker``.
    """

    init: Callable[[jax.Array, int], AssignmentState]
    assign: Callable[[AssignmentState, jax.Array | None], tuple[jax.Array, AssignmentState]]
    name: str
    uses_finisher: bool


def _init(key, n: int, permute: bool) -> AssignmentState:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of workers n must be a positive int, got {n!r}.")
    n = int(n)  # a static shape
    key, sub = jax.random.split(key)
    perm = jax.random.permutation(sub, n) if permute else jnp.arange(n)
    return AssignmentState(jnp.zeros((), jnp.int32), key, perm.astype(jnp.int32))


def _init_identity(key, n: int) -> AssignmentState:
    return _init(key, n, permute=False)


def _init_permuted(key, n: int) -> AssignmentState:
    return _init(key, n, permute=True)


def _advance(state: AssignmentState, perm=None, key=None) -> AssignmentState:
    return AssignmentState(
        count=state.count + 1,
        key=state.key if key is None else key,
        perm=state.perm if perm is None else perm,
    )


# The rules are module-level functions, so two policies of the same kind compare and
# hash equal: `draw_assignments` compiles once per (policy, n, num_jobs).


def _assign_pure(state, finished_worker):
    if finished_worker is None:
        raise ValueError("pure assignment needs the finishing worker of every job.")
    return jnp.asarray(finished_worker, jnp.int32), _advance(state)


def _assign_random(state, finished_worker=None):
    del finished_worker  # the draw is independent of who finished
    key, sub = jax.random.split(state.key)
    worker = jax.random.randint(sub, (), 0, state.perm.shape[0], dtype=jnp.int32)
    return worker, _advance(state, key=key)


def permutation(key: jax.Array, n: int) -> jax.Array:
    """``jax.random.permutation(key, n)`` (int32) by counting instead of sorting.

    JAX sorts ``n`` random 32-bit keys (one round for ``n <= 1625``); here each index's position is
    the number of smaller keys (ties to the lower index). The permutations are the same whenever the
    ``n`` keys are distinct (all but ~``n^2 / 2^33`` of the draws). ``n^2`` fused comparisons cost
    far less than a sort call on XLA:CPU, above all under ``vmap``, where a ``switch`` runs every
    branch on every event.
    """
    if n > 64:  # counting is O(n^2): sort
        return jax.random.permutation(key, n).astype(jnp.int32)
    _, sub = jax.random.split(key)
    bits = jax.random.bits(sub, (n,), jnp.uint32)
    ids = jnp.arange(n, dtype=jnp.int32)
    before = (bits[None, :] < bits[:, None]) | (
        (bits[None, :] == bits[:, None]) & (ids[None, :] < ids[:, None])
    )
    position = jnp.sum(before, axis=1, dtype=jnp.int32)  # where index i goes
    return jnp.sum(jnp.where(position[None, :] == ids[:, None], ids[None, :], 0), axis=1, dtype=jnp.int32)


def _assign_shuffled(state, finished_worker=None):
    del finished_worker  # the draw is independent of who finished
    n = state.perm.shape[0]
    key, sub = jax.random.split(state.key)
    fresh = permutation(sub, n)
    perm = jnp.where(state.count % n == 0, fresh, state.perm)  # new block: new permutation
    return perm[state.count % n], _advance(state, perm=perm, key=key)


def _assign_shuffle_once(state, finished_worker=None):
    del finished_worker  # the draw is independent of who finished
    return state.perm[state.count % state.perm.shape[0]], _advance(state)


def pure_assignment() -> AssignmentPolicy:
    """Pure asynchronous SGD: the new job goes to the worker that just finished.

    Example:
      >>> policy = pure_assignment()
      >>> state = policy.init(jax.random.key(0), 4)
      >>> worker, state = policy.assign(state, 2)
      >>> int(worker)
      2
    """
    return AssignmentPolicy(_init_identity, _assign_pure, "pure", True)


def random_assignment() -> AssignmentPolicy:
    """Each job goes to a worker drawn uniformly at random, independently.

    References:
      Koloskova, Stich and Jaggi, "Sharper convergence guarantees for
      asynchronous SGD for distributed and federated learning", NeurIPS 2022.
    """
    return AssignmentPolicy(_init_identity, _assign_random, "random", False)


def shuffled_assignment() -> AssignmentPolicy:
    """Shuffled asynchronous SGD: each block of ``n`` jobs visits every worker once.

    A fresh random permutation is drawn at the start of every block
    (``count % n == 0``), like random reshuffling over workers.
    """
    return AssignmentPolicy(_init_identity, _assign_shuffled, "shuffled", False)


def shuffle_once_assignment() -> AssignmentPolicy:
    """Like `shuffled_assignment`, but one permutation (drawn at ``init``) for every block."""
    return AssignmentPolicy(_init_permuted, _assign_shuffle_once, "shuffle_once", False)


_POLICIES = {
    "pure": pure_assignment,
    "random": random_assignment,
    "shuffled": shuffled_assignment,
    "shuffle_once": shuffle_once_assignment,
}


def assignment_policy(name: str) -> AssignmentPolicy:
    """The policy called ``name``: one of ``pure``, ``random``, ``shuffled``, ``shuffle_once``."""
    if name not in _POLICIES:
        raise ValueError(f"unknown assignment policy {name!r}; choose one of {sorted(_POLICIES)}.")
    return _POLICIES[name]()


def draw_assignments(
    policy: AssignmentPolicy,
    key: jax.Array,
    n: int,
    num_jobs: int | None = None,
    finished_workers=None,
) -> jax.Array:
    """Draws the workers of jobs ``0 .. num_jobs - 1`` at once (a ``lax.scan`` of ``assign``).

    Gives exactly the sequence of calling ``policy.assign`` step by step from
    ``policy.init(key, n)``.

    Args:
      policy: an `AssignmentPolicy`.
      key: PRNG key.
      n: number of workers.
      num_jobs: number of jobs; may be omitted when ``finished_workers`` is given.
      finished_workers: int ``[num_jobs]``, the worker finishing each job;
        required by policies with ``uses_finisher`` (``pure``), ignored otherwise.

    Returns:
      int32 ``[num_jobs]``.

    Example:
      >>> w = draw_assignments(shuffled_assignment(), jax.random.key(0), 4, 8)
      >>> sorted(w[:4].tolist()), sorted(w[4:].tolist())
      ([0, 1, 2, 3], [0, 1, 2, 3])
    """
    if finished_workers is None:
        if policy.uses_finisher:
            raise ValueError(
                f"the {policy.name!r} policy depends on who finishes each job: pass "
                "finished_workers (or call policy.assign step by step)."
            )
        if num_jobs is None:
            raise ValueError("pass num_jobs (or finished_workers).")
        xs = jnp.zeros((num_jobs,), jnp.int32)  # placeholders, ignored by the policy
    else:
        xs = jnp.asarray(finished_workers, jnp.int32)
        if xs.ndim != 1 or (num_jobs is not None and xs.shape[0] != num_jobs):
            raise ValueError(f"finished_workers must have shape [num_jobs]={num_jobs}, got {xs.shape}.")

    return _draw(policy, key, n, xs)


@functools.partial(jax.jit, static_argnames=("policy", "n"))
def _draw(policy: AssignmentPolicy, key, n: int, finished_workers) -> jax.Array:
    def step(state, finished):
        worker, state = policy.assign(state, finished)
        return state, worker

    _, workers = jax.lax.scan(step, policy.init(key, n), finished_workers)
    return workers
