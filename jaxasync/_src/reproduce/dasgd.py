"""DASGD (ALGORITHMS.md section 3.6): fixed-step convergence under staleness, and wall-clock.

Homogeneous least squares: one data set (``d = 50``, 1 600 rows, one planted solution, label noise
0.1) dealt into ``n`` equal contiguous shards (rows are i.i.d., so every node samples the same
distribution and ``f`` is the same for every ``n``); minibatch 8; compute times ``Exp(1)``.

* **Staleness sweep**: ``n in {4, 8, 16}``, message delays ``Exp(D)`` with ``D in {0.1, 1, 5}``, one fixed
  step ``eta = 0.025``. ``S_avg`` is the exact gradient-set staleness of the trace (``staleness_mean``:
  ``s_k`` = gradients computed before gradient ``k`` that its node had not applied). ``K(eps)`` is the
  number of gradients computed when ``||grad f(x_bar)||^2 <= eps`` first holds (``x_bar`` the mean of the
  node models), median over seeds; ``K_seq`` is the same for sequential SGD on the whole data set
  with the same step.
* **Wall-clock** (``n = 8``, ``D = 0.1``, best step of a small grid per method): time to
  ``||grad f||^2 <= 1e-2`` against synchronous all-reduce SGD (a barrier per round: a round lasts the
  slowest job plus the message delay) with and without one 5x straggler, and against parameter-server
  ASGD (`ps_asgd`) with a normal server and with a slow one. The simulator has no service queue, so
  a "slow server" is modelled as the asgrad docstring describes: the server's message delay is the
  job-download delay, here ``Exp(2)`` (workers upload with ``Exp(0.1)``), so every worker idles about
  two time units per gradient waiting for its next model.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import problem as problem_lib
from jaxasync._src import problems as problems_lib
from jaxasync._src import progress as progress_lib
from jaxasync._src import simulator as simulator_lib
from jaxasync._src.algorithms import asgrad as asgrad_lib
from jaxasync._src.algorithms import dasgd as dasgd_lib
from jaxasync._src.algorithms import gossip as gossip_lib
from jaxasync._src.algorithms import sequential as sequential_lib
from jaxasync._src.reproduce import common
from jaxasync._src.reproduce import curves as curves_lib

_ETA = 0.025  # the fixed step of the staleness sweep
_EPS = (1e-1, 1e-2)
_SERVER_DELAY = 2.0


def _problems(rows: int, dim: int):
    """The full data set as one shard, and a function ``n -> the same rows dealt to n nodes``."""
    base = problems_lib.least_squares(1, dim, rows, heterogeneity=0.0, noise=0.1, seed=0)
    shard = {k: np.asarray(v) for k, v in base.shards[0].items()}

    def make(n):
        m = rows // n
        shards = [{k: v[i * m : (i + 1) * m] for k, v in shard.items()} for i in range(n)]
        return problem_lib.Problem(
            problems_lib.least_squares_loss,
            jnp.zeros(dim),
            shards,
            batch_size=8,
            optimum=base.optimum,
            name="least_squares_homogeneous",
        )

    return make(1), make


def _expected_max_exponential(scales):
    """E[max_i X_i] for independent exponentials with the given means (numerically)."""
    grid = np.linspace(0.0, 200.0, 200001)
    cdf = np.prod([1.0 - np.exp(-grid / s) for s in scales], axis=0)
    return float(np.trapezoid(1.0 - cdf, grid))


def reproduce(quick: bool = False, progress: bool = True) -> common.Report:
    """Runs the DASGD reproduction and returns its report.

    Args:
      quick: the smoke-test version (n = 4, delays {0.1, 5}, no baselines but sequential SGD).
      progress: draw a progress bar on a terminal.

    Returns:
      A :class:`~jaxasync._src.reproduce.common.Report`.
    """
    start = time.monotonic()
    seq_problem, make_problem = _problems(1600, 50)
    delays = (0.1, 5.0) if quick else (0.1, 1.0, 5.0)
    sizes = (4,) if quick else (4, 8, 16)
    seeds = [0, 1] if quick else [0, 1, 2]
    steps = 500 if quick else 1000
    grid_lrs = (0.025, 0.05, 0.1)

    def spec(d, straggler=False, server=None, n=None):
        scale = d if server is None else [d] * n + [server]
        return asynchrony_lib.Asynchrony(
            delay=asynchrony_lib.exponential(scale), stragglers={0: 5.0} if straggler else None
        )

    # (label, n, make_program, problem, [(step, spec, tag)], steps, record_every)
    jobs = [
        (
            "sgd",
            1,
            lambda h: sequential_lib.sgd(optimizer=optax.sgd(h)),
            seq_problem,
            [(h, spec(0.0), "seq") for h in ((_ETA,) if quick else grid_lrs)],
            steps,
            5,
        )
    ]
    for n in sizes:
        runs = [(_ETA, spec(d), f"D={d:g}") for d in delays]
        if n == 8:  # step-size grid for the wall-clock comparison and the too-large-step regime
            runs += [(h, spec(d), f"D={d:g}") for h in grid_lrs[1:] for d in delays]
            runs += [(h, spec(0.1, straggler=True), "D=0.1 straggler") for h in grid_lrs]
        jobs.append(("dasgd", n, _dasgd(n), make_problem(n), runs, steps, 5))
    if not quick:
        jobs.append(
            (
                "allreduce",
                8,
                lambda h: gossip_lib.allreduce_sgd(num_nodes=8, optimizer=optax.sgd(h)),
                make_problem(8),
                [
                    (h, spec(0.1, straggler=s), "D=0.1" + (" straggler" if s else ""))
                    for h in (0.1, 0.2, 0.4, 0.8)
                    for s in (False, True)
                ],
                640,
                8,
            )
        )
        jobs.append(
            (
                "ps_asgd",
                8,
                lambda h: asgrad_lib.ps_asgd(num_workers=8, optimizer=optax.sgd(h)),
                make_problem(8),
                [
                    (h, spec(0.1, server=s, n=8), f"D=0.1 server {s:g}")
                    for h in grid_lrs
                    for s in (0.1, _SERVER_DELAY)
                ],
                steps,
                5,
            )
        )
    total = sum(len(runs) * len(seeds) for *_, runs, _, _ in jobs)
    bar = progress_lib.Progress("dasgd", total, enabled=None if progress else False)
    done = [0]

    def tick():
        done[0] += 1
        bar.update(done[0])

    res = {}
    for label, n, make, problem, runs, nsteps, every in jobs:
        # Every node sends to n - 1 others at rate 1: ~n (n - 1) D messages in flight, with bursts.
        pool = n * (n - 1) * int(3 * max(delays) + 2) + 64
        out = simulator_lib.sweep(
            make,
            problem,
            [(h, s) for h, s, _ in runs],
            seeds=seeds,
            steps=nsteps,
            record_every=every,
            pool_size=pool,
            overflow="raise",
            on_run=tick,
        )
        for (h, _, tag), trace in zip(runs, out):
            res[label, n, h, tag] = trace
    bar.close()

    def k_of(trace, eps):
        return float(np.median(curves_lib.first_steps(trace, "grad_norm", np.sqrt(eps))))

    def t_of(trace, eps):
        return float(np.median(trace.time_to("grad_norm", np.sqrt(eps))))

    def g2(trace):
        return float(np.median(trace.final("grad_norm") ** 2))

    columns = (
        ["experiment", "method", "n", "setting (delay Exp(D))", "lr", "S_avg"]
        + [f"K({e:g})" for e in _EPS]
        + [f"K-K_seq({_EPS[-1]:g})", f"t({_EPS[-1]:g})", "final |grad f|^2"]
    )
    rows, checks, notes, curves = [], [], [], {}
    seq = res["sgd", 1, _ETA, "seq"]
    k_seq = {e: k_of(seq, e) for e in _EPS}
    rows.append(
        ["staleness", "sequential SGD", 1, "-", _ETA, 0.0]
        + [k_seq[e] for e in _EPS]
        + [0.0, t_of(seq, _EPS[-1]), g2(seq)]
    )
    curves[f"sequential SGD lr={_ETA}"] = (seq["steps"][0], seq["grad_norm"][0] ** 2)
    points = []
    for n in sizes:
        for d in delays:
            tr = res["dasgd", n, _ETA, f"D={d:g}"]
            s_avg = float(np.mean(tr.final("staleness_mean")))
            ks = [k_of(tr, e) for e in _EPS]
            extra = ks[-1] - k_seq[_EPS[-1]]
            points.append((n, d, s_avg, ks[-1], extra))
            rows.append(
                ["staleness", "DASGD", n, f"D={d:g}", _ETA, s_avg] + ks + [extra, t_of(tr, _EPS[-1]), g2(tr)]
            )
            if n == max(sizes) or (n == 8 and d >= 1.0):
                curves[f"DASGD n={n} D={d:g} (S_avg {s_avg:.1f})"] = (tr["steps"][0], tr["grad_norm"][0] ** 2)

    converged = all(np.isfinite(p[3]) for p in points)
    checks.append(
        common.Check(
            f"fixed step eta={_ETA}: DASGD reaches |grad f|^2 <= {_EPS[-1]:g} for every n and delay",
            converged,
            ", ".join(f"n={n} D={d:g}: K={k:g}" for n, d, _, k, _ in points),
        )
    )
    s = np.array([p[2] for p in points])
    extra = np.array([p[4] for p in points])
    ok = np.isfinite(extra)
    spearman = _spearman(s[ok], extra[ok]) if ok.sum() > 2 else float("nan")
    slope, r2 = _linear_fit(s[ok], extra[ok]) if ok.sum() > 2 else (float("nan"), float("nan"))
    if quick:
        checks.append(
            common.Check(
                "S_avg grows with the message delay and the largest delay needs at least as many gradients",
                bool(np.all(np.diff(s) > 0)) and extra[-1] >= extra[0],
                f"S_avg {', '.join(f'{v:.2f}' for v in s)}; K - K_seq {', '.join(f'{v:g}' for v in extra)}",
            )
        )
    else:
        checks.append(
            common.Check(
                f"extra gradients K - K_seq (eps={_EPS[-1]:g}) grow with S_avg "
                "(linear fit: slope > 0, R^2 >= 0.8)",
                slope > 0 and r2 >= 0.8,
                f"slope {slope:.2f} gradients per unit of S_avg, R^2 {r2:.2f} (Spearman {spearman:.2f}: the "
                "points with small S_avg differ by seed noise only)",
            )
        )
        big = ok & (s >= 10)
        ratios = extra[big] / s[big]
        checks.append(
            common.Check(
                "... roughly in proportion to S_avg: (K - K_seq) / S_avg within a factor 3 over the points "
                "with "
                "S_avg >= 10",
                bool(big.sum() >= 2 and np.all(ratios > 0) and ratios.max() <= 3 * ratios.min()),
                ", ".join(f"S_avg {v:.1f}: {r:.2f}" for v, r in zip(s[big], ratios)),
            )
        )
        small = ok & (s < 10)
        notes.append(
            f"K - K_seq at S_avg < 10: {', '.join(f'{v:g}' for v in extra[small])} "
            "(seed noise: averaging the "
            "node models smooths the gradient noise a little); at S_avg >= 10: "
            + ", ".join(f"{v:g} (S_avg {a:.1f})" for v, a in zip(extra[big], s[big]))
            + (
                ": the ratio to S_avg rises with S_avg (faster than linear growth)"
                if np.all(np.diff(ratios[np.argsort(s[big])]) > 0)
                else ""
            )
            + "; the paper's bound is an upper bound linear in S_avg"
        )
        _wall_clock(res, delays, grid_lrs, rows, checks, notes, t_of, k_of, g2)
        big = res["dasgd", 8, grid_lrs[-1], f"D={max(delays):g}"]
        notes.append(
            f"too large a step with large staleness: eta={grid_lrs[-1]}, n=8, D={max(delays):g} "
            f"(S_avg {float(np.mean(big.final('staleness_mean'))):.1f}) ends at |grad f|^2 = {g2(big):.3g} "
            f"(eta={_ETA}: converges)"
        )
    notes += [
        "problem: homogeneous least squares, d=50, 1600 rows dealt to n nodes, noise 0.1, minibatch 8, "
        f"x0 = 0 (|grad f(x0)|^2 = {float(seq_problem.grad_norm(seq_problem.init_params)) ** 2:.3g}); "
        f"compute Exp(1); seeds {seeds}; K and t are seed medians, S_avg a seed mean",
        "S_avg is (n-1) x the mean delay here: the simulator evaluates a gradient when its job completes, "
        "on the model the node holds then, so staleness comes from updates still in flight, not from the "
        "job's duration (S_max is not measured by the trace)",
        "not run: the logistic-regression problem of ALGORITHMS.md 3.6 (time budget)",
        f"run time {time.monotonic() - start:.0f} s on this machine (compiles included)",
    ]
    if quick:
        notes.insert(0, "quick: n=4, delays {0.1, 5}, 2 seeds, 500 gradients; no wall-clock baselines")
    checks = [common.Check(c.claim, bool(c.passed), c.detail) for c in checks]  # numpy bools -> JSON
    title = "DASGD reproduction (ALGORITHMS.md 3.6)" + (" [quick]" if quick else "")
    return common.Report(
        "dasgd", title, columns, rows, checks, notes, curves, "gradients computed", "|grad f(x_bar)|^2"
    )


def _dasgd(n):
    # optax.sgd(h) rather than learning_rate=h: the sweep passes a traced step (one compile per grid).
    return lambda h: dasgd_lib.dasgd(num_nodes=n, optimizer=optax.sgd(h))


def _wall_clock(res, delays, lrs, rows, checks, notes, t_of, k_of, g2):
    """Time to |grad f|^2 <= eps at n = 8, best step per method, against all-reduce and PS-ASGD."""
    eps = _EPS[-1]

    def best(label, tag):
        cands = {h: tr for (m, n, h, t), tr in res.items() if m == label and n == 8 and t == tag}
        h = min(cands, key=lambda h: (t_of(cands[h], eps), -h))
        return h, cands[h]

    out = {}
    for label, tag, name in [
        ("dasgd", "D=0.1", "DASGD"),
        ("allreduce", "D=0.1", "all-reduce SGD"),
        ("dasgd", "D=0.1 straggler", "DASGD"),
        ("allreduce", "D=0.1 straggler", "all-reduce SGD"),
        ("ps_asgd", "D=0.1 server 0.1", "PS-ASGD"),
        ("ps_asgd", f"D=0.1 server {_SERVER_DELAY:g}", "PS-ASGD (slow server)"),
    ]:
        h, tr = best(label, tag)
        t = t_of(tr, eps)
        out[label, tag] = t
        s_avg = float(np.mean(tr.final("staleness_mean"))) if label != "allreduce" else "-"
        rows.append(["wall-clock", name, 8, tag, h, s_avg] + [k_of(tr, e) for e in _EPS] + ["-", t, g2(tr)])
    e_max = _expected_max_exponential([1.0] * 8)
    e_max_s = _expected_max_exponential([5.0] + [1.0] * 7)
    e_mean_s = (5.0 + 7.0) / 8
    for tag, expect in (("D=0.1", e_max), ("D=0.1 straggler", e_max_s / e_mean_s)):
        ratio = out["allreduce", tag] / out["dasgd", tag]
        checks.append(
            common.Check(
                f"{tag}: DASGD reaches |grad f|^2 <= {eps:g} sooner than all-reduce SGD, by a ratio near "
                f"E[max]/E[mean] of the compute times = {expect:.2f} (within a factor 2)",
                expect / 2 <= ratio <= 2 * expect,
                f"all-reduce t={out['allreduce', tag]:.3g}, DASGD t={out['dasgd', tag]:.3g}, "
                f"ratio {ratio:.2f}",
            )
        )
    slow = out["ps_asgd", f"D=0.1 server {_SERVER_DELAY:g}"]
    fast = out["ps_asgd", "D=0.1 server 0.1"]
    mine = out["dasgd", "D=0.1"]
    checks.append(
        common.Check(
            f"DASGD reaches |grad f|^2 <= {eps:g} sooner than PS-ASGD with a slow server (download Exp("
            f"{_SERVER_DELAY:g}))",
            slow > mine,
            f"PS-ASGD slow server t={slow:.3g} ({slow / mine:.2f}x DASGD); normal server t={fast:.3g} "
            f"({fast / mine:.2f}x)",
        )
    )
    notes.append(
        f"wall-clock: best step per method (DASGD and PS-ASGD {list(lrs)}, "
        "all-reduce {0.1, 0.2, 0.4, 0.8}, "
        "its step applies to the mean of 8 gradients); delays Exp(0.1) for every message except the slow "
        f"server's job downloads, Exp({_SERVER_DELAY:g}); E[max]/E[mean] computed for Exp(1) jobs "
        "(straggler: one node Exp(5))"
    )


def _linear_fit(x, y):
    """Least-squares slope of ``y`` on ``x`` and the fit's R^2."""
    a = np.vstack([x, np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    total = np.sum((y - y.mean()) ** 2)
    return float(coef[0]), float(1 - np.sum(resid**2) / total) if total > 0 else float("nan")


def _spearman(x, y):
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for u in np.unique(v):
            r[v == u] = r[v == u].mean()
        return r

    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])
