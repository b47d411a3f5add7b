"""Tests for jaxasync._src.assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxasync._src import assignment

NAMES = ["pure", "random", "shuffled", "shuffle_once"]


def _finishers(num_jobs, n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, n, num_jobs), jnp.int32)


@pytest.mark.parametrize("name", NAMES)
def test_draw_assignments_equals_stepping_assign(name):
    policy = assignment.assignment_policy(name)
    key, n, num_jobs = jax.random.key(3), 5, 23
    finished = _finishers(num_jobs, n)
    drawn = assignment.draw_assignments(policy, key, n, finished_workers=finished)
    state, stepped = policy.init(key, n), []
    assign = jax.jit(policy.assign)
    for t in range(num_jobs):
        worker, state = assign(state, finished[t])
        stepped.append(int(worker))
    assert drawn.dtype == jnp.int32 and drawn.tolist() == stepped
    assert int(state.count) == num_jobs
    assert ((drawn >= 0) & (drawn < n)).all()


def test_pure_gives_the_job_to_the_finisher():
    finished = _finishers(40, 6)
    policy = assignment.pure_assignment()
    drawn = assignment.draw_assignments(policy, jax.random.key(0), 6, finished_workers=finished)
    assert drawn.tolist() == finished.tolist()
    with pytest.raises(ValueError, match="finished_workers"):
        assignment.draw_assignments(policy, jax.random.key(0), 6, num_jobs=10)
    with pytest.raises(ValueError, match="finishing worker"):
        policy.assign(policy.init(jax.random.key(0), 6), None)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_shuffled_gives_each_worker_exactly_one_job_per_block(n):
    blocks = 12
    drawn = assignment.draw_assignments(
        assignment.shuffled_assignment(), jax.random.key(1), n, num_jobs=blocks * n
    )
    perms = np.asarray(drawn).reshape(blocks, n)
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(n))
    if n > 3:
        assert len({tuple(p) for p in perms}) > 1  # fresh permutations, not one reused


_BLOCKS = 5  # fixed, so each n compiles one scan per policy


@settings(max_examples=12, deadline=None)
@given(
    # n = 65 takes the sorting branch of `permutation` (counting below 65).
    n=st.one_of(st.integers(1, 8), st.just(65)),
    seed=st.integers(0, 2**31 - 1),
    order_seed=st.integers(0, 2**31 - 1),
)
def test_assignment_invariants_for_any_n_seed_and_finishing_order(n, seed, order_seed):
    key, finished = jax.random.key(seed), _finishers(_BLOCKS * n, n, order_seed)

    def blocks(name):
        policy = assignment.assignment_policy(name)
        return np.asarray(assignment.draw_assignments(policy, key, n, finished_workers=finished))

    # Shuffled: every block of n jobs gives each worker exactly one, whoever finished.
    shuffled = blocks("shuffled").reshape(_BLOCKS, n)
    np.testing.assert_array_equal(np.sort(shuffled, axis=1), np.broadcast_to(np.arange(n), shuffled.shape))
    # Shuffle-once: one permutation, repeated.
    once = blocks("shuffle_once").reshape(_BLOCKS, n)
    np.testing.assert_array_equal(np.sort(once[0]), np.arange(n))
    np.testing.assert_array_equal(once, np.broadcast_to(once[0], once.shape))
    # Pure: the job goes back to the worker that finished.
    np.testing.assert_array_equal(blocks("pure"), np.asarray(finished))


def test_shuffle_once_reuses_one_permutation():
    n = 6
    drawn = assignment.draw_assignments(
        assignment.shuffle_once_assignment(), jax.random.key(2), n, num_jobs=5 * n
    )
    perms = np.asarray(drawn).reshape(5, n)
    assert sorted(perms[0].tolist()) == list(range(n))
    assert (perms == perms[0]).all()
    assert perms[0].tolist() != list(range(n))  # really shuffled (fixed seed)


def test_random_is_uniform_and_independent_of_the_finisher():
    n, num_jobs = 5, 5000
    policy = assignment.random_assignment()
    drawn = assignment.draw_assignments(policy, jax.random.key(4), n, num_jobs=num_jobs)
    counts = np.bincount(np.asarray(drawn), minlength=n)
    expected = num_jobs / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # df = 4: P(chi2 > 20.5) ~ 4e-4 for a uniform sampler (fixed seed)
    # Not the shuffled rule in disguise: some block of n misses a worker.
    blocks = np.asarray(drawn).reshape(-1, n)
    assert any(len(set(b.tolist())) < n for b in blocks)
    # The finisher does not matter.
    other = assignment.draw_assignments(
        policy, jax.random.key(4), n, finished_workers=_finishers(num_jobs, n)
    )
    assert other.tolist() == drawn.tolist()


def test_policies_vmap_over_keys():
    policy = assignment.shuffled_assignment()
    keys = jax.random.split(jax.random.key(0), 3)
    drawn = jax.vmap(lambda k: assignment.draw_assignments(policy, k, 4, num_jobs=8))(keys)
    assert drawn.shape == (3, 8)
    for row in np.asarray(drawn):
        assert sorted(row[:4].tolist()) == [0, 1, 2, 3]


def test_errors():
    with pytest.raises(ValueError, match="unknown assignment policy 'fifo'"):
        assignment.assignment_policy("fifo")
    with pytest.raises(ValueError, match="positive int"):
        assignment.random_assignment().init(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="num_jobs"):
        assignment.draw_assignments(assignment.random_assignment(), jax.random.key(0), 3)
    with pytest.raises(ValueError, match="shape"):
        assignment.draw_assignments(
            assignment.pure_assignment(), jax.random.key(0), 3, 4, finished_workers=[0, 1]
        )
    assert {assignment.assignment_policy(name).name for name in NAMES} == set(NAMES)
    assert [assignment.assignment_policy(name).uses_finisher for name in NAMES] == [
        True,
        False,
        False,
        False,
    ]


def test_counting_permutation_equals_jax_permutation():
    """The sort-free permutation draws JAX's permutation, bit for bit, for default and unrolled keys."""
    from jaxasync._src import threefry
    from jaxasync._src.assignment import permutation

    for impl in (None, threefry.KEY_IMPL):
        keys = jax.random.split(jax.random.key(3, impl=impl), 300)
        for n in (1, 2, 7, 16, 64):
            want = jax.vmap(lambda k, n=n: jax.random.permutation(k, n))(keys)
            got = jax.jit(jax.vmap(lambda k, n=n: permutation(k, n)))(keys)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == jnp.int32
