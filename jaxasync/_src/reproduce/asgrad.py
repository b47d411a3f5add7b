"""AsGrad (Islamov, Safaryan, Alistarh; AISTATS 2024): pure vs random vs shuffled asynchronous SGD.

The cheap reproduction of ALGORITHMS.md section 5.6 / 5.8: ``n = 10`` heterogeneous workers (worker
``i`` holds its own data and needs ``|N(s_i, s_i)| + 1`` time units per full local gradient,
``s_i = i + 1``), one server, the three job-assignment rules of :func:`jaxasync._src.algorithms.asgrad.
asgrad` (and ``shuffle_once`` as an ablation). Each rule gets its best step size ``2^-k`` from a small
grid, separately for each horizon ``T``, and the metric is ``||grad f(x_t)||`` averaged over the records
of the last 200 server iterations before ``T``; ``T = 3000`` and ``T = 8000`` are read from the same run.

Target (ALGORITHMS.md 8.1): pure ASGD stalls at a heterogeneity floor (its fast workers' data weigh
more), random and shuffled assignment keep improving from 3000 to 8000 iterations, and shuffled <=
random. Problems: FedProx ``synthetic(1, 1)`` (the prototype of 5.6) and LibSVM ``w7a`` (the paper's
dataset), both split contiguously; the homogeneous control gives every worker the same copy of all
the synthetic rows (``f_i = f``), and an i.i.d. deal of the rows shows the finite-sample floor.

Cost: every (problem, split) compiles once. The step size is a traced argument (``optimizer=
optax.sgd(lr)``) and the rule a traced index into a ``lax.switch`` over the four programs, so a whole
grid reuses one executable. Runs are sequential, not vmapped: under ``vmap`` the simulator's handler
``switch`` becomes a select that computes the full local gradient on every event (3 events per job).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import problems as problems_lib
from jaxasync._src import program as program_lib
from jaxasync._src import simulator as simulator_lib
from jaxasync._src.algorithms.asgrad import asgrad
from jaxasync._src.progress import Progress
from jaxasync._src.reproduce.common import Check, Report

NUM_WORKERS = 10
RULES = ("pure", "random", "shuffled", "shuffle_once")
_KEEP = (
    "steps",
    "server_iterations",
    "grad_norm",
    "jobs_min",
    "jobs_max",
    "staleness_mean",
    "queue_overflow",
    "overflow",
)

# Prototype numbers of ALGORITHMS.md 5.6 (synthetic(1,1), mean of the last 200 ||grad f||, 3 seeds).
PROTOTYPE = {"pure": (0.195, 0.215), "random": (0.137, 0.059), "shuffled": (0.055, 0.028)}


def asynchrony(num_workers: int = NUM_WORKERS) -> asynchrony_lib.Asynchrony:
    """AsGrad's "normal" compute times ``|N(s_i, s_i)| + 1`` with ``s_i = i + 1``; no message delay.

    The last entry is the server's (it never computes, so its scale is unused).
    """
    scales = [float(i + 1) for i in range(num_workers)] + [1.0]
    return asynchrony_lib.Asynchrony(compute_time=asynchrony_lib.abs_normal(scales))


def switched(programs: Sequence[program_lib.NodeProgram], index) -> program_lib.NodeProgram:
    """One program that runs ``programs[index]`` (``index`` may be traced): one compile for all rules.

    Only valid for :func:`asgrad` programs with the same ``num_workers`` and ``queue_capacity``: they
    share the state layout, and the assignment rule lives only in ``init`` (the
    ``AssignmentState``) and the server's ``receive["grad"]``; ``step``, ``ready``, ``evaluate`` and
    ``metrics`` do not depend on it, so they come from ``programs[0]``.
    """
    first = programs[0]

    def init(node, params, key):
        return jax.lax.switch(index, [p.init for p in programs], node, params, key)

    def receiver(cname):
        return lambda state, msg: jax.lax.switch(index, [p.receive[cname] for p in programs], state, msg)

    return dataclasses.replace(
        first, name="asgrad_switched", init=init, receive={c: receiver(c) for c in first.receive}
    )


class _Runner:
    """One compiled simulation of ``problem``: ``run(seed, lr, rule) -> records`` (numpy, one seed)."""

    def __init__(self, problem, steps: int, record_every: int, rules: Sequence[str] = RULES):
        self.rules = tuple(rules)
        n = problem.num_nodes
        spec = asynchrony(n)

        def fn(seed, lr, index):
            programs = [
                # Capacity n for every rule (pure never queues more than 1): identical state layouts.
                asgrad(num_workers=n, policy=r, optimizer=optax.sgd(lr), queue_capacity=n)
                for r in self.rules
            ]
            # Exactly n jobs exist at any time, so at most n messages per channel are in flight.
            static = simulator_lib.make_static(switched(programs, index), problem, spec, pool_size=2 * n)
            params = simulator_lib.make_params(spec, static.n)
            _, records = simulator_lib.run(
                static,
                params,
                seed,
                num_records=-(-steps // record_every),
                record_every=record_every,
                max_events_per_record=1000 * record_every,
            )
            return {k: records[k] for k in _KEEP}

        self._fn = jax.jit(fn)

    def run(self, seed: int, lr: float, rule: str) -> dict:
        out = self._fn(jnp.int32(seed), jnp.float32(lr), jnp.int32(self.rules.index(rule)))
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def _problem(n: int, dataset: str, split: str, w7a_rows: int):
    """AsGrad's problem; ``split="replicated"``: every worker holds the same copy of all the rows.

    The replicated split is the genuinely homogeneous control: ``f_i = f`` for every worker, so the
    speed-weighted objective of pure ASGD is ``f`` itself and no heterogeneity floor exists (an i.i.d.
    deal of finitely many rows still leaves the local losses different).
    """
    if split != "replicated":
        return problems_lib.asgrad_logistic(n, dataset=dataset, split=split, rows=w7a_rows, seed=0)
    base = problems_lib.asgrad_logistic(n, dataset=dataset, split="contiguous", rows=w7a_rows, seed=0)
    pooled = {k: np.concatenate([np.asarray(s[k]) for s in base.shards]) for k in ("x", "y")}
    return problems_lib.logistic_regression(
        [pooled] * n, nonconvex=0.1, init=1.0, name=f"asgrad_{dataset}_replicated"
    )


def speed_weights(num_workers: int = NUM_WORKERS) -> np.ndarray:
    """The share of pure ASGD's updates each worker makes, ``w_i ∝ 1 / E[D_i]`` (renewal rates)."""
    w = 1.0 / asynchrony(num_workers).compute_time.mean(num_workers + 1)[:num_workers]
    return w / w.sum()


def pure_floor(problem, weights: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """``||grad f(x_w)||`` at the stationary point ``x_w`` of the speed-weighted ``sum_i w_i f_i``.

    Pure ASGD applies worker ``i``'s gradients at rate ``w_i``, so (for small steps) it settles near
    ``x_w`` instead of a stationary point of ``f``: this is the floor section 5.3 predicts. Found by
    L-BFGS from ``x0`` (deterministic, no asynchrony).

    Returns:
      ``(||grad f(x_w)||, ||grad f_w(x_w)||)``; the second shows how well ``x_w`` was solved for.
    """
    data = jax.tree.map(lambda *xs: jnp.stack(xs), *problem.shards)  # equal shards (full gradients)
    loss_fn, opt = problem.loss_fn, optax.lbfgs()

    @jax.jit
    def solve(x, data, w):
        def weighted(x, w=w):
            return jnp.dot(w, jax.vmap(loss_fn, (None, 0))(x, data))

        value_and_grad = optax.value_and_grad_from_state(weighted)

        def body(carry, _):
            x, state = carry
            v, g = value_and_grad(x, state=state)
            u, state = opt.update(g, state, x, value=v, grad=g, value_fn=weighted)
            return (optax.apply_updates(x, u), state), None

        (x, _), _ = jax.lax.scan(body, (x, opt.init(x)), None, length=iters)
        uniform = jnp.full_like(w, 1.0 / w.shape[0])
        return jnp.linalg.norm(jax.grad(weighted)(x, uniform)), jnp.linalg.norm(jax.grad(weighted)(x))

    f, fw = solve(problem.init_params, data, jnp.asarray(weights, jnp.float32))
    return float(f), float(fw)


def _window_mean(records: dict, horizon: int, window: int) -> float:
    """Mean ``||grad f||`` over the records of server iterations in ``(horizon - window, horizon]``."""
    it = records["server_iterations"]
    sel = (it > horizon - window) & (it <= horizon)
    if not sel.any():  # should not happen (record_every < window); nearest record instead
        sel = np.abs(it - horizon) == np.min(np.abs(it - horizon))
    return float(np.mean(records["grad_norm"][sel]))


@dataclasses.dataclass
class _Result:
    """Best step size and seed-mean metric of one rule at each horizon."""

    k: dict  # horizon -> best k (step 2^-k)
    value: dict  # horizon -> mean over seeds at that k
    per_seed: dict  # horizon -> per-seed values at that k
    records: list  # the runs at the best k for the last horizon (one per seed)
    edge: list  # horizons whose best k is at the edge of the grid


def _sweep(runner, rules, ks, seeds, tune_seeds, horizons, window, bar, label) -> dict:
    """Runs the step-size grid on ``tune_seeds``, picks the best ``k`` per rule and horizon, then runs
    the remaining seeds at the picked step sizes. Returns ``{rule: _Result}``."""
    out = {}
    for rule in rules:
        runs = {}  # (k, seed) -> records

        def get(k, s):
            if (k, s) not in runs:
                bar.note = f"{label} {rule} 2^-{k} seed {s}"
                runs[k, s] = runner.run(s, 2.0**-k, rule)
                bar.advance()
            return runs[k, s]

        best = {}
        for h in horizons:
            scores = [np.mean([_window_mean(get(k, s), h, window) for s in tune_seeds]) for k in ks]
            best[h] = ks[int(np.argmin(scores))]
        per_seed = {h: np.array([_window_mean(get(best[h], s), h, window) for s in seeds]) for h in horizons}
        out[rule] = _Result(
            k=best,
            value={h: float(np.mean(v)) for h, v in per_seed.items()},
            per_seed=per_seed,
            records=[get(best[horizons[-1]], s) for s in seeds],
            edge=[h for h in horizons if len(ks) > 1 and best[h] in (min(ks), max(ks))],
        )
    return out


class _Bar:
    """A `Progress` counted in runs, with the current run as its note."""

    def __init__(self, total: int, enabled: bool):
        self.done, self.note = 0, ""
        self.bar = Progress("asgrad", total, enabled=None if enabled else False)

    def advance(self):
        self.done += 1
        self.bar.update(self.done, note=self.note)

    def close(self):
        self.bar.close()


def _seed_mean_curve(records: list) -> tuple[np.ndarray, np.ndarray]:
    x = np.mean([r["server_iterations"] for r in records], axis=0)
    y = np.mean([r["grad_norm"] for r in records], axis=0)
    return x, y


class Plan(NamedTuple):
    """What :func:`reproduce` runs (see :func:`plan`).

    Attributes:
      seeds: the seeds averaged.
      horizons: the two horizons ``T`` (server iterations), read from one run.
      window: the last server iterations before ``T`` whose ``||grad f||`` records are averaged.
      configs: one ``(dataset, split, rules, ks, tune_seeds, record_every)`` per problem: step sizes
        ``2^-k`` for ``k`` in ``ks``, tuned on ``tune_seeds``.
      w7a_rows: the w7a rows used.
    """

    seeds: tuple
    horizons: tuple
    window: int
    configs: list
    w7a_rows: int


def plan(quick: bool = False, seeds: Sequence[int] | None = None) -> Plan:
    """The problems, rules, step-size grids, seeds and horizons of the full or the quick reproduction."""
    if quick:
        seeds = tuple(seeds or (0, 1))
        horizons, window = (800, 2000), 100
        ks = (6,)
        configs = [("synthetic", "contiguous", RULES[:3], ks, seeds, 20)]
    else:
        seeds = tuple(seeds or (0, 1, 2))
        horizons, window = (3000, 8000), 200
        # Grids bracket the best step of every rule (exploratory scans over 2^-1..2^-10 were worse
        # outside them); w7a, whose jobs cost ~5x more, tunes on the first seed only.
        configs = [
            ("synthetic", "contiguous", RULES, (5, 6, 7, 8, 9), seeds, 20),
            ("synthetic", "iid", RULES[:3], (5, 6, 7, 8, 9), seeds, 20),
            ("synthetic", "replicated", RULES[:3], (5, 6, 7, 8, 9), seeds, 20),
            ("w7a", "contiguous", RULES[:3], (5, 6, 7, 8), seeds[:1], 40),
        ]
    w7a_rows = 12300  # half of the paper's 24 600 (see the notes)
    return Plan(seeds, horizons, window, configs, w7a_rows)


def reproduce(quick: bool = False, progress: bool = True, seeds: Sequence[int] | None = None) -> Report:
    """Runs the AsGrad reproduction and returns its :class:`Report`.

    Args:
      quick: a small version (synthetic problem only, 2000 iterations, one step size, 2 seeds) for
        the smoke test; its checks are relaxed sanity assertions, not the acceptance targets.
      progress: draw a progress bar on a terminal.
      seeds: seeds to average (default ``(0, 1, 2)``, quick ``(0, 1)``).

    Returns:
      The :class:`Report`.
    """
    start = time.monotonic()
    n = NUM_WORKERS
    seeds, horizons, window, configs, w7a_rows = plan(quick, seeds)
    steps = horizons[-1]
    total = sum(len(r) * (len(k) * len(t) + 2 * (len(seeds) - len(t))) for _, _, r, k, t, _ in configs)
    bar = _Bar(total, progress)

    results, floors = {}, {}
    for dataset, split, rules, ks, tune_seeds, rec in configs:
        problem = _problem(n, dataset, split, w7a_rows)
        bar.note = f"{dataset}/{split}: compiling"
        bar.bar.update(bar.done, note=bar.note, force=True)
        runner = _Runner(problem, steps, rec)
        results[dataset, split] = _sweep(
            runner, rules, ks, seeds, tune_seeds, horizons, window, bar, f"{dataset}/{split}"
        )
        floors[dataset, split] = pure_floor(problem, speed_weights(n))
    bar.close()

    h0, h1 = horizons
    rows, curves, edges = [], {}, []
    for (dataset, split), res in results.items():
        for rule, r in res.items():
            last = r.records
            jobs_ratio = np.mean([x["jobs_max"][-1] / max(x["jobs_min"][-1], 1) for x in last])
            rows.append(
                [
                    f"{dataset}/{split}",
                    rule,
                    f"2^-{r.k[h0]}",
                    r.value[h0],
                    f"2^-{r.k[h1]}",
                    r.value[h1],
                    r.value[h1] / r.value[h0],
                    float(jobs_ratio),
                    float(np.mean([x["staleness_mean"][-1] for x in last])),
                    floors[dataset, split][0] if rule == "pure" else "-",
                ]
            )
            if split == "contiguous" or quick:
                curves[f"{dataset} {rule} (2^-{r.k[h1]})"] = _seed_mean_curve(last)
            edges += [f"{dataset}/{split} {rule} at T={h}" for h in r.edge]

    checks = _quick_checks(results, floors, horizons) if quick else _full_checks(results, floors, horizons)
    elapsed = time.monotonic() - start
    notes = _notes(quick, seeds, horizons, window, w7a_rows, elapsed, edges, floors, results)
    columns = [
        "problem/split",
        "rule",
        f"gamma@{h0}",
        f"|grad f|@{h0}",
        f"gamma@{h1}",
        f"|grad f|@{h1}",
        f"ratio {h1}/{h0}",
        "jobs max/min",
        "mean delay",
        "pure floor (pred.)",
    ]
    title = "AsGrad: pure / random / shuffled ASGD, 10 workers, speeds 1..10, full local gradients" + (
        " [quick]" if quick else ""
    )
    return Report(
        name="asgrad",
        title=title,
        columns=columns,
        rows=rows,
        checks=checks,
        notes=notes,
        curves=curves,
        x_label="server iterations",
        y_label="||grad f(x_t)|| (mean over seeds)",
    )


def _full_checks(results: dict, floors: dict, horizons) -> list[Check]:
    h0, h1 = horizons
    checks = []
    for dataset in ("synthetic", "w7a"):
        res = results[dataset, "contiguous"]
        v = {rule: r.value for rule, r in res.items()}
        others = min(v["random"][h1], v["shuffled"][h1])
        ratio = v["pure"][h1] / v["pure"][h0]
        far = v["pure"][h1] / others
        checks.append(
            Check(
                f"{dataset}: pure ASGD stalls at a heterogeneity floor (|grad f| at T={h1} not meaningfully "
                f"below T={h0}, i.e. ratio >= 0.8, or >= 3x the best of random/shuffled)",
                bool(ratio >= 0.8 or far >= 3.0),
                f"pure {v['pure'][h0]:.3g} -> {v['pure'][h1]:.3g}, ratio {ratio:.2f}; "
                f"{far:.1f}x the best other rule at T={h1}",
            )
        )
        pred = floors[dataset, "contiguous"][0]
        checks.append(_floor_check(dataset, v["pure"][h1], pred, h1))
        for rule in ("random", "shuffled"):
            ratio = v[rule][h1] / v[rule][h0]
            checks.append(
                Check(
                    f"{dataset}: {rule} keeps improving from T={h0} to T={h1} (ratio <= 0.8)",
                    bool(ratio <= 0.8),
                    f"{v[rule][h0]:.3g} -> {v[rule][h1]:.3g}, ratio {ratio:.2f}",
                )
            )
        checks.append(
            Check(
                f"{dataset}: shuffled <= random at T={h0} and T={h1}",
                bool(all(v["shuffled"][h] <= v["random"][h] for h in horizons)),
                ", ".join(
                    f"T={h}: {v['shuffled'][h]:.3g} vs {v['random'][h]:.3g} "
                    f"({v['random'][h] / v['shuffled'][h]:.1f}x)"
                    for h in horizons
                ),
            )
        )
    het = {rule: r.value[h1] for rule, r in results["synthetic", "contiguous"].items()}
    same = {rule: r.value[h1] for rule, r in results["synthetic", "replicated"].items()}
    iid = {rule: r.value[h1] for rule, r in results["synthetic", "iid"].items()}
    spread = max(same.values()) / min(same.values())
    checks.append(
        Check(
            "homogeneous control (synthetic, every worker holds the same rows, f_i = f): the three rules "
            f"are similar (max/min of |grad f| at T={h1} <= 2)",
            bool(spread <= 2.0),
            ", ".join(f"{k} {x:.3g}" for k, x in same.items())
            + f"; max/min {spread:.2f}; predicted pure floor {floors['synthetic', 'replicated'][0]:.2g}",
        )
    )
    gap_het, gap_same = het["pure"] / het["shuffled"], same["pure"] / same["shuffled"]
    checks.append(
        Check(
            "homogeneous control: pure's gap to shuffled shrinks at least 2x without data heterogeneity "
            "(the floor comes from heterogeneity, not from the delays)",
            bool(gap_same * 2 <= gap_het),
            f"pure/shuffled at T={h1}: contiguous {gap_het:.1f}x, replicated {gap_same:.2f}x",
        )
    )
    checks.append(
        _floor_check(
            "synthetic i.i.d. split (finite-sample heterogeneity)",
            iid["pure"],
            floors["synthetic", "iid"][0],
            h1,
        )
    )
    bad = [
        f"{d}/{s} {rule}"
        for (d, s), res in results.items()
        for rule, r in res.items()
        if any(x["queue_overflow"][-1] or x["overflow"][-1] for x in r.records)
    ]
    checks.append(Check("no job dropped (queue and in-flight pool overflow 0)", not bad, ", ".join(bad)))
    return checks


def _floor_check(dataset: str, measured: float, predicted: float, horizon: int) -> Check:
    return Check(
        f"{dataset}: pure's |grad f| at T={horizon} is the predicted heterogeneity floor "
        "||grad f(x_w)|| of the speed-weighted objective, within 25%",
        bool(abs(measured / predicted - 1) <= 0.25),
        f"measured {measured:.3g}, predicted {predicted:.3g} (x{measured / predicted:.2f})",
    )


def _quick_checks(results: dict, floors: dict, horizons) -> list[Check]:
    h0, h1 = horizons
    res = results["synthetic", "contiguous"]
    first = {rule: float(np.mean([x["grad_norm"][0] for x in r.records])) for rule, r in res.items()}
    drop = {rule: r.value[h1] / first[rule] for rule, r in res.items()}
    records = [x for r in res.values() for x in r.records]
    ok_counts = all(
        not x["queue_overflow"][-1]
        and not x["overflow"][-1]
        and x["server_iterations"][-1] >= h1 - NUM_WORKERS
        for x in records
    )
    shuffled = res["shuffled"].records
    pure = res["pure"].records
    spread = max(int(x["jobs_max"][-1] - x["jobs_min"][-1]) for x in shuffled)
    pure_ratio = min(float(x["jobs_max"][-1] / max(x["jobs_min"][-1], 1)) for x in pure)
    return [
        Check(
            "every rule reduces |grad f| below half its value at x0 = ones",
            all(d < 0.5 for d in drop.values()),
            ", ".join(f"{k} x{d:.3f}" for k, d in drop.items()),
        ),
        Check(
            "bookkeeping: no job or message dropped, the server applied one gradient per job",
            bool(ok_counts),
        ),
        Check(
            "shuffled assigns every worker one job per block (jobs max - min <= 1); pure follows the "
            "speeds (fastest/slowest worker jobs >= 2)",
            bool(spread <= 1 and pure_ratio >= 2),
            f"shuffled max-min {spread}, pure max/min {pure_ratio:.1f}",
        ),
        _floor_check("synthetic", res["pure"].value[h1], floors["synthetic", "contiguous"][0], h1),
        Check(
            f"shuffled < pure at T={h1} (pure's heterogeneity bias is visible already)",
            bool(res["shuffled"].value[h1] < res["pure"].value[h1]),
            f"{res['shuffled'].value[h1]:.3g} vs {res['pure'].value[h1]:.3g}",
        ),
    ]


def _notes(quick, seeds, horizons, window, w7a_rows, elapsed, edges, floors, results) -> list[str]:
    h0, h1 = horizons
    residual = max(fw for _, fw in floors.values())
    notes = [
        f"Setting (ALGORITHMS.md 5.5/5.6): n = {NUM_WORKERS} workers + 1 server; worker i needs "
        "|N(s_i, s_i)| + 1 time units per job, s_i = i + 1 (mean 1.17 s_i + 1, fastest/slowest ~5.9x), "
        "no message delay; full local gradients; logistic loss + 0.1 sum x^2/(1+x^2); x0 = ones; "
        "clean queue semantics of 5.3 (not the public code's two quirks).",
        f"Metric: ||grad f(x_t)|| of the server model, mean over the records in the last {window} "
        f"server iterations before T, then over seeds {list(seeds)}; T = {h0} and {h1} are read from "
        f"one run of {h1} iterations; the step size 2^-k is chosen per rule and per T (column gamma).",
        "'jobs max/min' is the ratio of jobs the busiest and the least busy worker got (pure follows "
        "the speeds, shuffled is balanced); 'mean delay' is the mean staleness tau_t (n - 1 = 9 for "
        "every rule by job conservation: the rules differ in who computes, not in how stale).",
        "'pure floor (pred.)' = ||grad f(x_w)|| where x_w is the stationary point (L-BFGS, 100 "
        f"iterations, ||grad f_w(x_w)|| <= {residual:.1e}) of f_w = sum_i w_i f_i, "
        "w_i ∝ 1/E[compute time of i]: the objective pure ASGD actually minimises (section 5.3's "
        "explanation of its weakness).",
    ]
    if quick:
        notes.append(
            "QUICK smoke version: synthetic(1,1) only, one step size 2^-6, 2 seeds, T <= 2000; "
            "its numbers are not the acceptance numbers."
        )
    else:
        p = PROTOTYPE
        het_floor, iid_floor = floors["synthetic", "contiguous"][0], floors["synthetic", "iid"][0]
        iid = results["synthetic", "iid"]
        iid_gap = iid["pure"].value[h1] / iid["shuffled"].value[h1]
        notes += [
            "synthetic = FedProx synthetic(1,1), 100 rows and d = 30 per worker (our generator, so the "
            f"absolute values differ from the prototype of 5.6: pure {p['pure'][0]}/{p['pure'][1]}, "
            f"random {p['random'][0]}/{p['random'][1]}, shuffled {p['shuffled'][0]}/{p['shuffled'][1]}); "
            "grid 2^-5..2^-9, every seed in the selection.",
            f"w7a differs from the paper in size: the first {w7a_rows} rows (not 24 600; {w7a_rows // 10} "
            "contiguous rows per worker), d = 300, to keep the run within a few minutes on 2 shared "
            "cores (one 8000-iteration run took 7-9 s with all 24 600 rows vs 3.5-5.5 s with 12 300 "
            "on the loaded machine). Exploratory full-size runs gave the same picture, T=3000 -> 8000: "
            "pure 0.043 -> 0.040 (seed 0), random 0.0085 -> 0.0047, shuffled 0.0016 -> 0.0008 (3 "
            "seeds; shuffled's 3000 value from seed 0 at 2^-5). The step size is tuned on the first "
            "seed only (grid 2^-5..2^-8), the other seeds run at the chosen steps. The paper ran 500 "
            "iterations; T here follows 5.6.",
            "Homogeneous control (split 'replicated'): every worker holds the same copy of all 1000 "
            "synthetic rows, so f_i = f and pure ASGD's speed-weighted objective is f itself (predicted "
            f"floor {floors['synthetic', 'replicated'][0]:.1g}); the rules then differ only in their delay "
            "patterns. An earlier version used an i.i.d. deal (split 'iid', kept as a row): with 100 rows "
            "of d = 30 per worker the local losses still differ (finite-sample heterogeneity), so pure's "
            f"bias shrinks (its predicted floor drops {het_floor / iid_floor:.0f}x, to {iid_floor:.3g}) "
            f"but does not vanish: pure stays {iid_gap:.1f}x above shuffled there, as that floor predicts "
            "(checked above) -- not a homogeneous setting, so it no longer serves as the control.",
        ]
    if edges:
        notes.append("Best step at the edge of its grid (the optimum may lie outside): " + "; ".join(edges))
    notes.append(f"Run time: {elapsed:.0f} s including compiles (one per problem and split).")
    return notes
