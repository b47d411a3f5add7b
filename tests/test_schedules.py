"""Tests for jaxasync._src.schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxasync._src import schedules


def test_constant():
    schedule = jax.jit(schedules.constant(0.25))
    assert float(schedule(0)) == 0.25 and float(schedule(1000)) == 0.25
    assert schedule(jnp.arange(3)).shape == (3,)
    assert schedule(3).dtype == jnp.float32


def test_inverse_time():
    beta, mu, t0 = 2.0, 0.1, 40.0
    schedule = jax.jit(schedules.inverse_time(beta, mu, t0))
    counts = np.arange(0, 1000, 37)
    np.testing.assert_allclose(schedule(counts), beta / (mu * (counts + t0)), rtol=1e-6)
    assert float(schedule(0)) == pytest.approx(0.5)
    for bad in [dict(beta=0.0), dict(mu=-1.0), dict(t0=0.0)]:
        args = dict(beta=beta, mu=mu, t0=t0) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            schedules.inverse_time(**args)


def test_delay_adaptive_without_smoothness():
    gamma, n = 0.1, 4
    step = jax.jit(schedules.delay_adaptive(gamma, n))
    delays = np.arange(0, 60)
    got = np.asarray(step(0, delays))
    expected = np.where(delays <= 2 * n, gamma, gamma * 2 * n / np.maximum(delays, 1))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (np.diff(got) <= 0).all() and got.max() <= np.float32(gamma)


def test_delay_adaptive_with_smoothness():
    gamma, n, smoothness = 0.05, 3, 2.0
    step = schedules.delay_adaptive(gamma, n, smoothness=smoothness)
    assert float(step(0, 2 * n)) == pytest.approx(gamma)
    assert float(step(0, 2 * n + 1)) == pytest.approx(min(gamma, 1 / (4 * smoothness * 7)))
    assert float(step(0, 100)) == pytest.approx(1 / (4 * smoothness * 100))
    big = schedules.delay_adaptive(1e-4, n, smoothness=smoothness)
    assert float(big(0, 100)) == pytest.approx(1e-4)  # already below 1/(4 L tau): kept


def test_delay_adaptive_matches_the_l_rule_at_the_matching_gamma():
    n, smoothness = 5, 3.0
    gamma = 1 / (8 * n * smoothness)
    with_l = schedules.delay_adaptive(gamma, n, smoothness=smoothness)
    without_l = schedules.delay_adaptive(gamma, n)
    delays = jnp.arange(0, 200)
    np.testing.assert_allclose(with_l(0, delays), without_l(0, delays), rtol=1e-6)


def test_delay_adaptive_accepts_a_base_schedule_and_a_threshold():
    base = schedules.inverse_time(1.0, 1.0, 1.0)
    step = schedules.delay_adaptive(base, n=2, threshold=1)
    assert float(step(1, 0)) == pytest.approx(0.5)
    assert float(step(1, 4)) == pytest.approx(0.5 / 4)
    counts, delays = jnp.array([0, 1, 3]), jnp.array([1, 2, 3])
    np.testing.assert_allclose(step(counts, delays), [1.0, 0.25, 0.25 / 3], rtol=1e-6)


def test_delay_adaptive_errors():
    with pytest.raises(ValueError, match="positive int n"):
        schedules.delay_adaptive(0.1, 0)
    with pytest.raises(ValueError, match="smoothness"):
        schedules.delay_adaptive(0.1, 2, smoothness=0.0)
    with pytest.raises(ValueError, match="threshold"):
        schedules.delay_adaptive(0.1, 2, threshold=-1)
